"""Test helpers: a scripted miner speaking the miner API over real HTTP."""

from __future__ import annotations

import time
from typing import Any

import httpx
from nacl.signing import SigningKey

from miner.wire.receipts import build_miner_receipt, key_id, sha256_hex, sign_receipt
from tests.servers import RunningCoordinator

RTX_3090 = {"name": "NVIDIA GeForce RTX 3090", "memory_mb": 24576}


def capabilities(key: SigningKey | None, *, gpus: list[dict[str, Any]] | None = None,
                 models: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    caps: dict[str, Any] = {"gpus": gpus if gpus is not None else [RTX_3090], "cuda": "12.4",
                            "models": models if models is not None else ["tiny"], "price": 0.01, **extra}
    if key is not None:
        caps["receipt_key"] = {"alg": "Ed25519", "key_id": key_id(key.verify_key)}
    return caps


class ScriptedMiner:
    """One miner identity: its id, its receipt key and an httpx client with its headers."""

    def __init__(self, coordinator: RunningCoordinator, miner_id: str = "rig-01", *, key: SigningKey | None = None,
                 timeout: float = 40.0) -> None:
        self.miner_id = miner_id
        self.key = key or SigningKey.generate()
        self.http = httpx.Client(base_url=coordinator.url, timeout=timeout,
                                 headers={"X-Api-Key": coordinator.miner_key, "X-Miner-ID": miner_id})

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ScriptedMiner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def register(self, concurrency: int = 1, held_jobs: list[str] | None = None, **caps: Any) -> httpx.Response:
        body: dict[str, Any] = {"capabilities": capabilities(self.key, **caps), "concurrency": concurrency}
        if held_jobs is not None:
            body["held_jobs"] = held_jobs
        response = self.http.post("/v1/miners/register", json=body)
        assert response.status_code == 200, response.text
        return response

    def heartbeat(self, **body: Any) -> httpx.Response:
        return self.http.post("/v1/miners/heartbeat", json=body)

    def poll(self, max_wait: float = 0) -> httpx.Response:
        return self.http.post("/v1/miners/poll", json={"max_wait_seconds": max_wait})

    def claim(self, max_wait: float = 5) -> dict[str, Any]:
        response = self.poll(max_wait)
        assert response.status_code == 200, (response.status_code, response.text)
        return response.json()

    def receipt(self, job_id: str, output: str = "out", /, **overrides: Any) -> dict[str, Any]:
        now = time.time()
        body = build_miner_receipt(job_id=job_id, miner_id=self.miner_id, model="tiny",
                                   prompt_digest=sha256_hex("prompt"), output=output, started_at=now - 0.1,
                                   completed_at=now, gpu_seconds=0.1, gpu_uuid=None, runner="fake")
        body.update(overrides)
        return sign_receipt(body, self.key)

    def result(self, job_id: str, output: str = "out", receipt: dict[str, Any] | None = None,
               **fields: Any) -> httpx.Response:
        result = {"output": output, "metadata": {"tokens": 1},
                  "receipt": receipt if receipt is not None else self.receipt(job_id, output)}
        return self.http.post(f"/v1/miners/{job_id}/result",
                              json={"result": result, "metrics": {"duration_ms": 100}, **fields})

    def fail(self, job_id: str, code: str = "RUNNER_ERROR", message: str = "boom") -> httpx.Response:
        return self.http.post(f"/v1/miners/{job_id}/fail", json={"error_code": code, "error_message": message})
