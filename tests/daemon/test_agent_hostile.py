"""The daemon against a scripted coordinator: hostile answers, ordering, cancellation, disk trouble."""

from __future__ import annotations

import asyncio
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from miner.outbox.store import Outbox, OutboxEntry
from miner.wire.errors import DeviceError, ErrorCode
from miner.wire.receipts import verify_receipt
from runners.base import Job, RunResult
from runners.fake import FakeRunner
from tests.daemon.helpers import ScriptedCoordinator, fake_miner, job


def test_malformed_poll_answers_never_crash_the_daemon(tmp_path: Path) -> None:
    """Non-JSON, wrong types, 500, 429, timeouts and refused connections are survived; good jobs still run."""
    coord = ScriptedCoordinator([job("good")])
    coord.script(
        "poll",
        httpx.Response(200, text="<html>oops</html>"),
        httpx.Response(200, json=["not", "an", "object"]),
        httpx.Response(200, json={"job_id": 17, "payload": {}}),
        httpx.Response(500, json={"detail": "internal"}),
        httpx.Response(429, json={"detail": "Rate limit exceeded"}, headers={"Retry-After": "0.05"}),
        httpx.ReadTimeout("timed out"),
        httpx.ConnectError("connection refused"),
        httpx.Response(200, json={"job_id": "badpayload", "payload": "a string"}),
        httpx.Response(
            200, json={"job_id": "badconstraints", "payload": {"model": "llama2", "prompt": "x"}, "constraints": "gpu"}
        ),
    )
    coord.script("heartbeat", httpx.Response(200, text="nope"), httpx.Response(500), httpx.Response(200, json=[1]))
    agent = fake_miner(tmp_path, coord, max_jobs=3)
    assert asyncio.run(agent.serve()) == 0
    assert list(coord.results) == ["good"]
    verify_receipt(coord.results["good"][0]["result"]["receipt"], agent.key_id)
    assert coord.fails["badpayload"][0]["error_code"] == ErrorCode.INVALID_PAYLOAD
    assert coord.fails["badconstraints"][0]["error_code"] == ErrorCode.INVALID_PAYLOAD
    assert len(agent.outbox) == 0


def test_result_survives_500s_and_429_until_acknowledged(tmp_path: Path) -> None:
    """A result refused with 500 then 429 stays in the outbox and is delivered once accepted."""
    coord = ScriptedCoordinator([job("j1")])
    coord.script(
        "result",
        httpx.Response(500),
        httpx.Response(429, headers={"Retry-After": "0.1"}),
        httpx.ConnectError("refused"),
    )
    agent = fake_miner(tmp_path, coord, max_jobs=1)
    assert asyncio.run(agent.serve()) == 0
    assert len(coord.endpoint_calls("result")) == 4
    assert len(coord.results["j1"]) == 1
    assert len(agent.outbox) == 0 and agent.outbox.state("j1") == "acked"


def test_heartbeat_follows_every_job_end_with_the_true_inflight_count(tmp_path: Path) -> None:
    """After a /fail the next heartbeat reports inflight 0, so the reference coordinator frees the slot."""
    coord = ScriptedCoordinator([job("bad", model="not-served")])
    agent = fake_miner(tmp_path, coord, settings={"coordinator": {"heartbeat_interval_s": 60}})

    def heartbeat_after_fail() -> bool:
        events = [e for e, _, _ in coord.calls]
        return "fail" in events and "heartbeat" in events[events.index("fail") :]

    async def scenario() -> None:
        task = asyncio.create_task(agent.serve())
        await coord.wait_for(heartbeat_after_fail)  # the timer is 60 s: only the job end can trigger it
        agent.request_exit("test over")
        await task

    asyncio.run(scenario())
    sequence = [(e, b.get("inflight")) for e, _, b in coord.calls if e in ("fail", "heartbeat")]
    assert sequence[sequence.index(("fail", None)) + 1] == ("heartbeat", 0)
    assert coord.fails["bad"][0]["error_code"] == ErrorCode.MODEL_NOT_SERVED


def test_heartbeat_404_re_registers_after_flushing_the_outbox(tmp_path: Path) -> None:
    """A 404 heartbeat makes the miner deliver pending outcomes and then register again."""
    coord = ScriptedCoordinator([job("j1")])
    coord.script("result", httpx.Response(503))  # j1 waits in the outbox
    # the first heartbeat (at start) succeeds; the one after the job ends gets 404
    coord.script("heartbeat", lambda request: None, httpx.Response(404, json={"detail": "miner not registered"}))
    agent = fake_miner(tmp_path, coord)

    async def scenario() -> None:
        task = asyncio.create_task(agent.serve())
        await coord.wait_for(lambda: coord.registrations >= 2)
        agent.request_exit("test over")
        await task

    asyncio.run(scenario())
    order = [e for e, _, _ in coord.calls if e in ("register", "result")]
    second_register = [i for i, e in enumerate(order) if e == "register"][1]
    assert "result" in order[1:second_register] and coord.results["j1"]


def test_outbox_is_delivered_before_registering(tmp_path: Path) -> None:
    """Outcomes left by a previous run go out before the miner registers again."""
    state = tmp_path / "state"

    async def leave_outcomes() -> None:
        box = Outbox(state)
        await box.open()
        await box.put(OutboxEntry("old-1", "fail", {"error_code": "SHUTDOWN", "error_message": "bye", "metrics": {}}))
        await box.put(OutboxEntry("old-2", "result", {"result": {"output": "x"}, "metrics": {}}))
        await box.aclose()

    asyncio.run(leave_outcomes())
    coord = ScriptedCoordinator()
    agent = fake_miner(tmp_path, coord, exit_when_idle=0.2)
    assert asyncio.run(agent.serve()) == 0
    order = [(e, j) for e, j, _ in coord.calls if e in ("register", "result", "fail")]
    assert order[:3] == [("fail", "old-1"), ("result", "old-2"), ("register", None)]


def test_a_job_offered_again_after_delivery_is_not_run_twice(tmp_path: Path) -> None:
    """A job whose result was acknowledged is not run again when re-offered; it is failed at once instead."""
    coord = ScriptedCoordinator([job("j1"), job("j1"), job("j2")])
    agent = fake_miner(tmp_path, coord, max_jobs=2)
    assert asyncio.run(agent.serve()) == 0
    assert len(coord.results["j1"]) == 1 and len(coord.results["j2"]) == 1
    assert agent.outcomes["completed"] == 2
    assert [f["error_code"] for f in coord.fails["j1"]] == [ErrorCode.INTERNAL_ERROR]
    assert "already delivered" in coord.fails["j1"][0]["error_message"]


def test_a_job_offered_again_gets_the_outcome_the_miner_still_holds(tmp_path: Path) -> None:
    """Re-offered jobs whose outcome is pending or was rejected get that same outcome submitted, not a re-run."""
    state = tmp_path / "state"

    async def leave_a_rejected_outcome() -> None:
        box = Outbox(state)
        await box.open()
        await box.put(OutboxEntry("rej", "result", {"result": {"output": "refused once"}, "metrics": {}}))
        await box.reject("rej", "HTTP 409: not yours")
        await box.aclose()

    asyncio.run(leave_a_rejected_outcome())
    coord = ScriptedCoordinator([job("a"), job("a"), job("rej"), job("new")])
    coord.script("result", *[httpx.Response(503)] * 3)  # "a" is still pending when it is offered again
    agent = fake_miner(tmp_path, coord, max_jobs=2)
    assert asyncio.run(agent.serve()) == 0
    assert agent.outcomes == {"completed": 2}  # "a" and "new" ran once each
    assert len(coord.results["a"]) == 1 and "a" not in coord.fails
    assert [r["result"]["output"] for r in coord.results["rej"]] == ["refused once"]
    assert coord.results["new"] and not list((state / "outbox" / "rejected").glob("*.json"))


def test_miner_not_registered_on_result_keeps_the_result_and_registers_again(tmp_path: Path) -> None:
    """A 404 "miner not registered" to /result keeps the outcome, re-registers, then delivers it."""
    coord = ScriptedCoordinator([job("j1")])

    def forget(request: httpx.Request) -> httpx.Response:
        coord.forgotten = True
        return httpx.Response(404, json={"detail": "miner not registered"})

    coord.script("result", forget)
    agent = fake_miner(tmp_path, coord)

    async def scenario() -> None:
        task = asyncio.create_task(agent.serve())
        await coord.wait_for(lambda: "j1" in coord.results)
        agent.request_exit("test over")
        await task

    asyncio.run(scenario())
    registers = [i for i, (e, _, _) in enumerate(coord.calls) if e == "register"]
    assert [coord.calls[i][2]["held_jobs"] for i in registers] == [[], ["j1"]]
    # the coordinator accepted nothing while it had forgotten the miner, so this came after registering again
    assert len(coord.results["j1"]) == 1 and agent.outbox.state("j1") == "acked"
    assert not list((tmp_path / "state" / "outbox" / "rejected").glob("*.json"))


def test_cancelled_job_stops_and_is_not_submitted(tmp_path: Path) -> None:
    """A job listed in cancelled_jobs stops early and neither /result nor /fail is sent for it."""
    coord = ScriptedCoordinator([job("hang", prompt="please HANG")])
    agent = fake_miner(
        tmp_path,
        coord,
        max_jobs=1,
        settings={"models": [{"name": "llama2", "runner": "fake", "fail_mode": "hang", "fail_marker": "HANG"}]},
    )

    async def scenario() -> None:
        task = asyncio.create_task(agent.serve())
        await coord.wait_for(lambda: "hang" in agent.inflight)
        coord.cancelled.add("hang")
        await asyncio.wait_for(task, 20)

    asyncio.run(scenario())
    assert agent.outcomes == {"cancelled": 1}
    assert "hang" not in coord.results and "hang" not in coord.fails
    assert not agent.outbox.pending()


def test_runner_exception_fails_the_job_and_the_daemon_goes_on(tmp_path: Path) -> None:
    """An unexpected runner exception becomes INTERNAL_ERROR with a safe message; later jobs still run."""
    coord = ScriptedCoordinator([job("boom", prompt="BOOM"), job("fine")])
    agent = fake_miner(
        tmp_path,
        coord,
        max_jobs=2,
        settings={"models": [{"name": "llama2", "runner": "fake", "fail_mode": "exception", "fail_marker": "BOOM"}]},
    )
    assert asyncio.run(agent.serve()) == 0
    fail = coord.fails["boom"][0]
    assert fail["error_code"] == ErrorCode.INTERNAL_ERROR and "BOOM" not in fail["error_message"]
    assert coord.results["fine"]


def test_expired_job_is_failed_without_running(tmp_path: Path) -> None:
    """A job whose expires_at has passed is failed DEADLINE_EXCEEDED at once."""
    past = (datetime.now(UTC) - timedelta(seconds=5)).replace(tzinfo=None).isoformat()
    coord = ScriptedCoordinator([job("late", expires_at=past)])
    agent = fake_miner(tmp_path, coord, max_jobs=1)
    assert asyncio.run(agent.serve()) == 0
    assert coord.fails["late"][0]["error_code"] == ErrorCode.DEADLINE_EXCEEDED


def test_ttl_bounds_a_hanging_job(tmp_path: Path) -> None:
    """A job that runs past its ttl_seconds is failed DEADLINE_EXCEEDED."""
    coord = ScriptedCoordinator([job("slow", prompt="HANG", ttl_seconds=0.3)])
    agent = fake_miner(
        tmp_path,
        coord,
        max_jobs=1,
        settings={"models": [{"name": "llama2", "runner": "fake", "fail_mode": "hang", "fail_marker": "HANG"}]},
    )
    assert asyncio.run(agent.serve()) == 0
    assert coord.fails["slow"][0]["error_code"] == ErrorCode.DEADLINE_EXCEEDED


def test_drain_fails_leftover_jobs_with_shutdown(tmp_path: Path) -> None:
    """On a graceful exit, a job still running after drain_grace_s is failed SHUTDOWN through the outbox."""
    coord = ScriptedCoordinator([job("hang", prompt="HANG")])
    agent = fake_miner(
        tmp_path,
        coord,
        settings={
            "drain_grace_s": 0.2,
            "models": [{"name": "llama2", "runner": "fake", "fail_mode": "hang", "fail_marker": "HANG"}],
        },
    )

    async def scenario() -> int:
        task = asyncio.create_task(agent.serve())
        await coord.wait_for(lambda: "hang" in agent.inflight)
        agent.handle_signal(15)
        return await asyncio.wait_for(task, 20)

    assert asyncio.run(scenario()) == 0
    assert coord.fails["hang"][0]["error_code"] == ErrorCode.SHUTDOWN
    assert len(agent.outbox) == 0


def test_second_signal_forces_exit(tmp_path: Path) -> None:
    """A second signal during the drain ends serve() at once with exit code 1."""
    coord = ScriptedCoordinator([job("hang", prompt="HANG")])
    agent = fake_miner(
        tmp_path,
        coord,
        settings={
            "drain_grace_s": 600,
            "models": [{"name": "llama2", "runner": "fake", "fail_mode": "hang", "fail_marker": "HANG"}],
        },
    )

    async def scenario() -> int:
        task = asyncio.create_task(agent.serve())
        await coord.wait_for(lambda: "hang" in agent.inflight)
        agent.handle_signal(15)
        await asyncio.sleep(0.1)
        agent.handle_signal(15)
        return await asyncio.wait_for(task, 20)

    assert asyncio.run(scenario()) == 1


def test_unwritable_state_stops_claiming_until_it_recovers(tmp_path: Path) -> None:
    """When the outbox cannot be written, the result is still delivered, claiming pauses, and resumes after."""
    coord = ScriptedCoordinator([job("j1")])
    agent = fake_miner(
        tmp_path,
        coord,
        max_jobs=2,
        disk_probe_s=0.1,
        settings={"models": [{"name": "llama2", "runner": "fake", "delay_s": 0.3}]},
    )
    outbox_dir = tmp_path / "state" / "outbox"

    async def scenario() -> None:
        task = asyncio.create_task(agent.serve())
        async with asyncio.timeout(20):
            while "j1" not in agent.inflight:
                await asyncio.sleep(0.01)
        # While j1 runs, so its result cannot be written. Renamed away first: the miner's disk
        # probe writes and deletes files in the folder, which would race a plain rmtree.
        gone = outbox_dir.with_name("outbox.gone")
        outbox_dir.rename(gone)
        shutil.rmtree(gone)
        outbox_dir.write_text("the disk is gone")
        await coord.wait_for(lambda: "j1" in coord.results)
        assert not agent.health.disk_ok and "cannot write" in agent.health.disk_reason
        polls = len(coord.endpoint_calls("poll"))
        coord.jobs.append(job("j2"))
        await asyncio.sleep(0.3)
        assert len(coord.endpoint_calls("poll")) == polls  # not claiming while the disk is bad
        outbox_dir.unlink()
        await asyncio.wait_for(task, 20)

    asyncio.run(scenario())
    assert agent.health.disk_ok and coord.results["j2"]
    assert (outbox_dir / "acked.log").read_text().split()[-1] == "j2"


class ToggleRunner(FakeRunner):
    """A fake runner whose models are ready only while ``ready`` is set (an engine coming and going)."""

    ready = False

    def ready_models(self) -> list[str]:
        return super().ready_models() if ToggleRunner.ready else []


def test_models_not_ready_are_not_advertised_until_they_are(tmp_path: Path) -> None:
    """With nothing ready the miner registers no models and claims nothing; once ready it re-registers and serves."""
    ToggleRunner.ready = False
    coord = ScriptedCoordinator([job("j1")])
    agent = fake_miner(tmp_path, coord, max_jobs=1, runner_classes={"fake": ToggleRunner})

    async def scenario() -> None:
        task = asyncio.create_task(agent.serve())
        await coord.wait_for(lambda: len(coord.endpoint_calls("heartbeat")) >= 2)
        assert coord.endpoint_calls("poll") == []
        ToggleRunner.ready = True
        await asyncio.wait_for(task, 20)

    asyncio.run(scenario())
    registrations = [body for e, _, body in coord.calls if e == "register"]
    assert [r["capabilities"]["models"] for r in registrations] == [[], ["llama2"]]
    assert all(r["held_jobs"] == [] for r in registrations)
    assert coord.results["j1"]


def test_re_registering_names_the_jobs_still_held(tmp_path: Path) -> None:
    """A re-registration while a job runs sends that job in held_jobs, so the coordinator does not requeue it."""
    coord = ScriptedCoordinator([job("long", prompt="HANG")])
    agent = fake_miner(
        tmp_path,
        coord,
        settings={
            "drain_grace_s": 0.1,
            "models": [{"name": "llama2", "runner": "fake", "fail_mode": "hang", "fail_marker": "HANG"}],
        },
    )

    async def scenario() -> None:
        task = asyncio.create_task(agent.serve())
        await coord.wait_for(lambda: "long" in agent.inflight)
        coord.script("heartbeat", httpx.Response(404, json={"detail": "miner not registered"}))
        await coord.wait_for(lambda: coord.registrations >= 2)
        agent.request_exit("test over")
        await task

    asyncio.run(scenario())
    registrations = [body["held_jobs"] for e, _, body in coord.calls if e == "register"]
    assert registrations == [[], ["long"]]


class BrokenGpuRunner(FakeRunner):
    """A runner whose device fails: every job raises DeviceError, as the transformers runner does after a CUDA fault."""

    async def run(self, job: Job) -> RunResult:
        raise DeviceError("CUDA error: an illegal memory access was encountered")


def test_device_error_fails_the_job_and_exits_non_zero(tmp_path: Path) -> None:
    """A DeviceError fails the job DEVICE_ERROR, stops claiming, and serve() returns 1 so systemd restarts the miner."""
    coord = ScriptedCoordinator([job("j1"), job("j2")])
    agent = fake_miner(tmp_path, coord, runner_classes={"fake": BrokenGpuRunner})
    assert asyncio.run(asyncio.wait_for(agent.serve(), 30)) == 1
    assert coord.fails["j1"][0]["error_code"] == ErrorCode.DEVICE_ERROR
    assert "illegal memory access" in coord.fails["j1"][0]["error_message"]
    assert "j2" not in coord.fails and "j2" not in coord.results
