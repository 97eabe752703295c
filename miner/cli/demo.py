"""``aitbc-miner demo``: a local coordinator and a miner on loopback, one job, verified receipts.

It prints the miner's receipt and then the coordinator's own, each verified with the
same verifier against its signer's key.

Everything lives in a temporary folder and on 127.0.0.1; nothing touches the network or
the host's miner configuration. With ``--runner auto`` the job runs on the transformers
runner over a tiny random-weight Llama built offline (when torch and transformers are
installed and the runner is available), else on the fake runner.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import secrets
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from miner.wire.errors import ConfigError

DEMO_MODEL = "llama2"
JOB_TIMEOUT_S = 120.0


def _transformers_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "runners.transformers"))


def demo_model(runner: str, workdir: Path) -> tuple[dict[str, Any], str]:
    """The ``[[models]]`` entry for the demo and a line describing it.

    ``auto`` picks transformers when it can be used, else the fake runner; an explicit
    ``transformers`` that cannot be used is a :class:`ConfigError`.
    """
    if runner == "fake" or (runner == "auto" and not _transformers_available()):
        note = "fake runner (deterministic CPU text; install the 'transformers' extra to run a real model)"
        return {"name": DEMO_MODEL, "runner": "fake", "delay_s": 0.2, "max_new_tokens": 24}, note
    if not _transformers_available():
        raise ConfigError("--runner transformers needs torch and transformers: pip install 'aitbc-miner[transformers]'")
    from runners.tinyllama import build_tiny_llama

    path = build_tiny_llama(workdir / "tiny-llama")
    note = (
        f"transformers runner on a tiny random-weight Llama built offline in {path} (its text is noise); "
        'to serve a real checkpoint, add a [[models]] table with runner = "transformers" and '
        'path = "/models/Llama-2-7b-chat-hf" to miner.toml'
    )
    return {"name": DEMO_MODEL, "runner": "transformers", "path": str(path)}, note


def _loopback_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


async def _demo(args: argparse.Namespace, workdir: Path) -> int:
    import uvicorn

    from coordinator.app import create_app
    from coordinator.client import Client
    from miner.daemon.agent import Agent
    from miner.daemon.settings import load_settings
    from miner.wire.receipts import verify_receipt

    client_key, miner_key = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    model, note = demo_model(args.runner, workdir)
    sock = _loopback_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    app = create_app(workdir / "coordinator.db", client_keys=[client_key], miner_keys=[miner_key], rate_limits=None)
    server_config = uvicorn.Config(
        app, log_level="warning", log_config=None, lifespan="on", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(server_config)
    server_task = asyncio.create_task(server.serve(sockets=[sock]))
    # Keyword settings override the environment, so a host's AITBC_MINER_* cannot leak in.
    config = workdir / "miner.toml"
    config.write_text("# settings are passed as keywords by the demo\n", encoding="utf-8")
    settings = load_settings(
        config,
        miner_id="demo-miner",
        state_dir=workdir / "miner-state",
        region=None,
        concurrency=1,
        coordinator={"url": url, "api_key": miner_key, "long_poll_s": 5, "heartbeat_interval_s": 5},
        gpus={"enabled": False},
        metrics={"enabled": False},
        models=[model],
        log={"level": "warning", "format": "console"},
    )
    agent = Agent(settings, max_jobs=1, handle_signals=False)
    print(f"local coordinator: {url}\nminer runner:      {note}", flush=True)
    try:
        async with asyncio.timeout(10):
            while not server.started:
                await asyncio.sleep(0.01)
        miner_task = asyncio.create_task(agent.serve())
        with Client(url, client_key) as client:
            payload = {
                "model": DEMO_MODEL,
                "prompt": args.prompt,
                "parameters": {"max_new_tokens": 24, "temperature": 0},
            }
            job = await asyncio.to_thread(client.submit_job, payload, ttl_seconds=300)
            print(f"submitted job:     {job['job_id']}", flush=True)
            final = await asyncio.to_thread(client.wait, job["job_id"], JOB_TIMEOUT_S)
            if final["state"] != "COMPLETED":
                print(f"the job ended {final['state']}: {final.get('error')}", file=sys.stderr)
                return 1
            answer = await asyncio.to_thread(client.get_job_result, job["job_id"])
            coordinator_key = (await asyncio.to_thread(client.get_receipt_key))["key_id"]
        await asyncio.wait_for(miner_task, 30)
        receipt = answer["receipt"]
        print(f"\noutput:\n  {answer['result']['output']}\n")
        print("receipt (signed by the miner):")
        print(json.dumps(receipt, indent=2, sort_keys=True))
        verify_receipt(receipt, agent.key_id)
        print(f"\nreceipt verified: Ed25519 signature by the miner's registered key {agent.key_id}")
        own = answer["coordinator_receipt"]
        print("\nreceipt (signed by the coordinator, GET /v1/receipts/key):")
        print(json.dumps(own, indent=2, sort_keys=True))
        verify_receipt(own, coordinator_key)
        print(f"\ncoordinator receipt verified: Ed25519 signature by the coordinator's key {coordinator_key}")
        return 0
    finally:
        if not agent.should_exit.is_set():
            agent.request_exit("demo over")
        server.should_exit = True
        await asyncio.wait_for(server_task, 10)
        sock.close()


def demo_from_cli(args: argparse.Namespace) -> int:
    """Run the demo in a temporary folder; 0 when the receipt verifies."""
    from miner.ops.logs import configure_logging

    configure_logging("warning", "console", stream=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="aitbc-miner-demo-") as tmp:
        return asyncio.run(_demo(args, Path(tmp)))
