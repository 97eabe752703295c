"""``aitbc-miner verify-job``: a buyer's spot-check of saved results, re-run on this machine.

A miner serves a tiny random Llama through the transformers runner on the CPU against the
real local coordinator and runs a greedy job, a seeded sampled job and an unseeded one; the
buyer saves each ``GET /v1/jobs/{id}/result`` answer with the payload it submitted. The
command is run in-process through ``miner.cli.main`` on those files (and on edited copies),
with a ``miner.toml`` serving the same model folder (or another one) for the re-runs.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

pytest.importorskip("transformers")

from coordinator.client import Client  # noqa: E402
from miner.cli.main import main  # noqa: E402
from miner.daemon.agent import Agent  # noqa: E402
from miner.wire.receipts import key_id, sha256_hex, sign_receipt  # noqa: E402
from tests.daemon.helpers import miner_settings  # noqa: E402
from tests.servers import run_coordinator  # noqa: E402

MODEL = "tiny"
JOBS = {
    "greedy": {"max_new_tokens": 12, "temperature": 0},
    "seeded": {"max_new_tokens": 12, "temperature": 0.9, "top_p": 0.95, "seed": 1234},
    "unseeded": {"max_new_tokens": 12, "temperature": 0.9},
}
PROMPT = "The miner claims a job from the coordinator and"


@dataclass
class Mined:
    """The saved answers (with payload) by job kind, the miner's key_id and the model folder."""

    answers: dict[str, dict[str, Any]]
    miner_key_id: str
    model_path: Path
    folder: Path


@pytest.fixture(scope="module")
def mined(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mined]:
    """Run the three jobs once for the whole module, as a buyer would, and keep the answers."""
    from runners.tinyllama import build_tiny_llama

    folder = tmp_path_factory.mktemp("verify")
    model_path = build_tiny_llama(folder / "tiny-llama")
    with run_coordinator(folder / "coordinator.db", rate_limits=None) as coordinator:
        settings = miner_settings(
            folder / "miner-state",
            coordinator.url,
            coordinator={"api_key": coordinator.miner_key},
            models=[{"name": MODEL, "runner": "transformers", "path": str(model_path)}],
        )
        agent = Agent(settings, max_jobs=len(JOBS), handle_signals=False)
        with Client(coordinator.url, coordinator.client_key) as client:
            payloads = {
                kind: {"model": MODEL, "prompt": f"{PROMPT} {kind}", "parameters": params}
                for kind, params in JOBS.items()
            }
            ids = {kind: client.submit_job(p, ttl_seconds=300)["job_id"] for kind, p in payloads.items()}

            async def serve() -> int:
                async with asyncio.timeout(120):
                    return await agent.serve()

            assert asyncio.run(serve()) == 0
            answers = {}
            for kind, job_id in ids.items():
                assert client.get_job(job_id)["state"] == "COMPLETED"
                answers[kind] = {**client.get_job_result(job_id), "payload": payloads[kind]}
    assert agent.key_id is not None
    yield Mined(answers=answers, miner_key_id=agent.key_id, model_path=model_path, folder=folder)


def _save(tmp_path: Path, answer: dict[str, Any], name: str = "answer.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(answer), encoding="utf-8")
    return path


def _config(tmp_path: Path, model_path: Path, **options: str) -> Path:
    extra = "".join(f'{k} = "{v}"\n' for k, v in options.items())
    path = tmp_path / "miner.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n\n[gpus]\nenabled = false\n\n'
        f'[[models]]\nname = "{MODEL}"\nrunner = "transformers"\npath = "{model_path}"\n{extra}',
        encoding="utf-8",
    )
    return path


def _verify(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, dict[str, Any]]:
    """Run ``verify-job --json ARGS``; its exit status and its report, checks by name."""
    capsys.readouterr()
    code = main(["verify-job", "--json", *map(str, args)])
    report = json.loads(capsys.readouterr().out)
    assert report["exit"] == code and report["ok"] == (code == 0)
    report["by_name"] = {c["check"]: c for c in report["checks"]}
    return code, report


def _failed(report: dict[str, Any]) -> list[str]:
    return [c["check"] for c in report["checks"] if c["ok"] is False]


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_a_greedy_and_a_seeded_job_reproduce(
    kind: str, mined: Mined, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every check passes and the re-run on this machine gives the receipt's output: exit 0."""
    answer = mined.answers[kind]
    assert answer["receipt"]["sampling"] == kind
    result = _save(tmp_path, answer)
    code, report = _verify(
        capsys, "--result", result, "--config", _config(tmp_path, mined.model_path),
        "--public-key", mined.miner_key_id,
    )
    assert code == 0, report
    checks = report["by_name"]
    for name in ("signature", "output", "prompt", "params", "model", "reproducible", "revision", "dtype", "rerun"):
        assert checks[name]["ok"] is True, checks[name]
    assert "--public-key" in checks["signature"]["detail"]
    assert "same output" in checks["rerun"]["detail"]
    assert answer["receipt"]["model_revision"] in checks["revision"]["detail"]


def test_without_config_the_receipt_checks_pass_and_the_rerun_is_skipped(
    mined: Mined, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checks 1-2 only, in text: one line each, the rerun said to be skipped, no prompt or output printed."""
    answer = mined.answers["greedy"]
    monkeypatch.delenv("AITBC_MINER_CONFIG", raising=False)  # the --config default
    capsys.readouterr()
    code = main(["verify-job", "--result", str(_save(tmp_path, answer))])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "integrity only" in out and "SKIP rerun: skipped: pass --config" in out
    assert out.splitlines()[-1] == "verified: every check matches"
    assert PROMPT not in out and answer["result"]["output"] not in out


def test_a_tampered_output_fails_the_output_check(
    mined: Mined, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    answer = copy.deepcopy(mined.answers["greedy"])
    answer["result"]["output"] += " and a little more"
    code, report = _verify(capsys, "--result", _save(tmp_path, answer), "--config", _config(tmp_path, mined.model_path))
    assert code == 1
    assert _failed(report) == ["output"]
    assert report["by_name"]["rerun"]["ok"] is None  # not re-run once a check failed


def test_changed_parameters_fail_the_params_check(
    mined: Mined, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    answer = copy.deepcopy(mined.answers["seeded"])
    answer["payload"]["parameters"]["seed"] = 4321
    code, report = _verify(capsys, "--result", _save(tmp_path, answer))
    assert code == 1
    assert _failed(report) == ["params"]


def test_an_unseeded_sampled_job_cannot_be_reproduced(
    mined: Mined, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The signature and hashes match, but there is nothing to compare a re-run with: exit 3."""
    answer = mined.answers["unseeded"]
    assert answer["receipt"]["sampling"] == "unseeded"
    code, report = _verify(capsys, "--result", _save(tmp_path, answer), "--config", _config(tmp_path, mined.model_path))
    assert code == 3
    assert _failed(report) == []
    assert "without a seed" in report["by_name"]["reproducible"]["detail"]
    assert "rerun" not in report["by_name"]


@pytest.mark.parametrize("differs", ["revision", "dtype"])
def test_another_model_revision_or_dtype_is_named_and_not_compared(
    differs: str, mined: Mined, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A configuration serving other weights under the job's model name, or the same weights in
    another dtype: exit 1 naming what differs, and the outputs are not compared."""
    from runners.tinyllama import build_tiny_llama

    answer = mined.answers["greedy"]
    if differs == "revision":
        config = _config(tmp_path, build_tiny_llama(tmp_path / "other-llama", seed=1))
        expected = answer["receipt"]["model_revision"]
    else:
        config = _config(tmp_path, mined.model_path, dtype="bfloat16")
        expected = answer["receipt"]["dtype"]
    code, report = _verify(capsys, "--result", _save(tmp_path, answer), "--config", config)
    assert code == 1
    assert _failed(report) == [differs]
    assert expected in report["by_name"][differs]["detail"]
    assert report["by_name"]["rerun"]["ok"] is None


def test_a_signed_output_the_model_did_not_produce_is_caught_by_the_rerun(
    mined: Mined, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A miner that signs text its model did not write: the hashes match, the re-run does not, and
    the first differing token is named with its position; pinning the real miner's key fails too."""
    from transformers import AutoTokenizer

    answer = copy.deepcopy(mined.answers["greedy"])
    real = answer["result"]["output"]
    words = real.split()
    assert len(words) >= 2
    forged = real[: real.index(words[1], real.index(words[0]) + len(words[0]))] + "FORGED text here"
    answer["result"]["output"] = forged
    receipt = {k: v for k, v in answer["receipt"].items() if k != "signature"}
    receipt["output_sha256"] = sha256_hex(forged)
    impostor = SigningKey.generate()
    answer["receipt"] = sign_receipt(receipt, impostor)
    result = _save(tmp_path, answer)

    code, report = _verify(capsys, "--result", result, "--config", _config(tmp_path, mined.model_path))
    assert code == 1
    assert _failed(report) == ["rerun"]
    tokenizer = AutoTokenizer.from_pretrained(mined.model_path)
    old, new = (tokenizer.convert_ids_to_tokens(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (forged, real))
    position = next(i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b)
    detail = report["by_name"]["rerun"]["detail"]
    assert f"first difference at token {position}" in detail
    assert f"delivered {old[position]!r}, re-run {new[position]!r}" in detail
    assert real not in detail

    code, report = _verify(capsys, "--result", result, "--public-key", mined.miner_key_id)
    assert code == 1 and _failed(report) == ["signature"]
    assert key_id(impostor.verify_key) != mined.miner_key_id


@pytest.mark.parametrize(
    ("content", "what"),
    [
        ("not json {", "cannot read JSON"),
        ('{"result": {"output": "x"}}', "no miner receipt"),
        ("payload-missing", "no payload"),
    ],
)
def test_an_unusable_file_exits_2(
    content: str, what: str, mined: Mined, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if content == "payload-missing":
        content = json.dumps({k: v for k, v in mined.answers["greedy"].items() if k != "payload"})
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    code, report = _verify(capsys, "--result", path)
    assert code == 2
    assert report["checks"][0]["check"] == "file" and what in report["checks"][0]["detail"]
    code, report = _verify(capsys, "--result", tmp_path / "missing.json")
    assert code == 2
