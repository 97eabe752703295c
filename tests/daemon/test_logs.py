"""Logs: JSON off a TTY, job context on every job line, one summary per job, no secrets or prompts."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import structlog

from miner.ops.logs import configure_logging, job_context, register_secret, reset_logging
from runners.base import Job, RunResult
from runners.fake import FakeRunner
from tests.daemon.helpers import TEST_API_KEY, ScriptedCoordinator, fake_miner, job


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_lines_off_a_tty_with_bound_job_context(log_stream: io.StringIO) -> None:
    """Off a TTY each line is JSON; lines inside job_context carry job_id and model."""
    log = structlog.get_logger("t")
    with job_context("j1", "llama2"):
        log.info("inside")
    log.info("outside")
    inside, outside = _lines(log_stream)
    assert inside["job_id"] == "j1" and inside["model"] == "llama2" and inside["level"] == "info"
    assert "job_id" not in outside and "timestamp" in outside


def test_console_format_and_level_filter() -> None:
    """format=console renders text; below the configured level nothing is written."""
    stream = io.StringIO()
    configure_logging("warning", "console", stream=stream)
    try:
        log = structlog.get_logger("t")
        log.info("hidden")
        log.warning("shown", n=1)
    finally:
        reset_logging()
    text = stream.getvalue()
    assert "hidden" not in text and "shown" in text and not text.lstrip().startswith("{")


def test_registered_secrets_are_masked(log_stream: io.StringIO) -> None:
    """A registered secret is replaced by *** wherever it would be logged."""
    register_secret("s3cr3t-value-xyz")
    structlog.get_logger("t").info("oops", detail={"header": "X-Api-Key: s3cr3t-value-xyz"})
    text = log_stream.getvalue()
    assert "s3cr3t-value-xyz" not in text and "***" in text


def test_daemon_logs_one_summary_per_job_and_never_the_prompt_or_key(tmp_path: Path, log_stream: io.StringIO) -> None:
    """A daemon run logs a summary line per job with its outcome and tokens, and no prompt text or API key."""
    prompt = "PRIVATE-PROMPT-TEXT that must stay out of logs"
    coord = ScriptedCoordinator([job("j1", prompt=prompt), job("j2", model="absent", prompt=prompt)])
    agent = fake_miner(tmp_path, coord, max_jobs=2)
    assert asyncio.run(agent.serve()) == 0
    text = log_stream.getvalue()
    assert "PRIVATE-PROMPT-TEXT" not in text and TEST_API_KEY not in text
    summaries = {line["job_id"]: line for line in _lines(log_stream) if line["event"] == "job_finished"}
    assert summaries["j1"]["outcome"] == "completed" and summaries["j1"]["completion_tokens"]
    assert summaries["j2"]["outcome"] == "failed" and summaries["j2"]["code"] == "MODEL_NOT_SERVED"
    assert all(line["model"] for line in summaries.values())


class LeakyRunner(FakeRunner):
    """A runner whose exception message quotes the prompt (a bug the daemon must contain)."""

    async def run(self, job: Job) -> RunResult:
        raise ValueError(f"cannot handle {job.request.prompt}")


def test_runner_exception_text_never_reaches_the_logs(tmp_path: Path, log_stream: io.StringIO) -> None:
    """When a runner's exception quotes the prompt, the daemon logs the type and frames, not the message."""
    coord = ScriptedCoordinator([job("j1", prompt="SECRET-PROMPT-IN-EXCEPTION")])
    agent = fake_miner(tmp_path, coord, max_jobs=1, runner_classes={"fake": LeakyRunner})
    assert asyncio.run(agent.serve()) == 0
    text = log_stream.getvalue()
    assert "SECRET-PROMPT-IN-EXCEPTION" not in text and "ValueError" in text
    assert coord.fails["j1"][0]["error_code"] == "INTERNAL_ERROR"
    assert "SECRET" not in coord.fails["j1"][0]["error_message"]


def test_hostile_model_names_are_safe_in_logs_and_metrics(tmp_path: Path, log_stream: io.StringIO) -> None:
    """A model name with a lone surrogate or huge length is escaped and cut in logs and never becomes a metric label."""
    coord = ScriptedCoordinator([job("j1", model="\udc80" + "m" * 5000)])
    agent = fake_miner(tmp_path, coord, max_jobs=1)
    assert asyncio.run(agent.serve()) == 0
    assert coord.fails["j1"][0]["error_code"] == "MODEL_NOT_SERVED"
    line = next(entry for entry in _lines(log_stream) if entry["event"] == "job_finished")
    assert str(line["model"]).startswith("\\udc80") and len(str(line["model"])) < 200
    rendered = agent.metrics.render().decode()
    assert 'model="other"' in rendered and "mmmmmmmm" not in rendered
