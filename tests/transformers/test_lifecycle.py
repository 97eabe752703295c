"""Start-up checks, cancellation, deadlines, failures and shutdown of the transformers runner."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from miner.wire.errors import ConfigError, DeviceError, ErrorCode, JobError
from runners.base import RunnerContext
from runners.transformers import TransformersRunner
from tests.transformers.helpers import job, running, spec

LONG = 1500  # new tokens: seconds of work on the tiny model, so a stop lands mid-generation


def start_error(*specs, context: RunnerContext | None = None) -> ConfigError:
    async def scenario():
        runner = TransformersRunner(list(specs), context or RunnerContext())
        try:
            with pytest.raises(ConfigError) as info:
                await runner.start()
        finally:
            await runner.aclose()
        return info.value

    return asyncio.run(scenario())


def test_import_does_not_import_torch() -> None:
    """Importing runners.transformers (as `aitbc-miner probe` does) leaves torch unimported."""
    code = "import sys, runners.transformers as t; assert t.available(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_pickle_only_weights_are_refused(model_copy) -> None:
    """A folder with only .bin weights is refused at start, naming safetensors."""
    folder = model_copy("pickled", drop=("model.safetensors",))
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    error = start_error(spec("pickled", folder))
    assert "pickle weights (pytorch_model.bin)" in str(error) and "safetensors" in str(error)
    assert "models[name='pickled'].path" in str(error)


def test_remote_code_models_are_refused(model_copy) -> None:
    """A config with an auto_map (custom code) is refused at start: trust_remote_code stays off."""
    folder = model_copy("remote", config_update={"auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilModel"}})
    error = start_error(spec("remote", folder))
    assert "auto_map" in str(error) and "trust_remote_code" in str(error)


def test_hub_id_needs_a_pinned_revision() -> None:
    """A hub id without a 40-hex commit revision is refused before any download."""
    assert "pinned commit hash" in str(start_error(spec("llama2", "meta-llama/Llama-2-7b-hf")))
    assert "got 'main'" in str(start_error(spec("llama2", "meta-llama/Llama-2-7b-hf", revision="main")))


def test_missing_folder_and_bad_options_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    """A path that is neither a folder nor a hub id, an unknown device or a typo'd option stops start."""
    assert "neither a local folder" in str(start_error(spec("m", tmp_path / "nowhere")))
    assert "unknown device 'tpu:0'" in str(start_error(spec("m", tiny_model, device="tpu:0")))
    assert "max_batch_szie" in str(start_error(spec("m", tiny_model, max_batch_szie=4)))
    assert "models[name='m'].dtype" in str(start_error(spec("m", tiny_model, dtype="float8")))


def test_cuda_device_without_a_gpu_is_refused(tiny_model: Path) -> None:
    """A model asking for a GPU on a miner that has none stops start, naming the setting and the fix."""
    error = start_error(spec("m", tiny_model, device="cuda:0"))
    assert "models[name='m'].device: asks for a GPU" in str(error) and 'device = "cpu"' in str(error)
    error = start_error(spec("m", tiny_model, devices=[0]))
    assert "models[name='m'].devices: asks for a GPU" in str(error)


def test_lazy_model_is_advertised_then_loaded_on_first_use(tiny_model: Path) -> None:
    """With preload=false the checked model is advertised, and loaded by its first job."""

    async def scenario():
        async with running(spec("lazy", tiny_model, preload=False)) as runner:
            before = (runner.ready_models(), runner.loaded("lazy"))
            result = await runner.run(job("lazy", "hi", max_new_tokens=3))
            return before, result, runner.loaded("lazy")

    (ready, loaded_before), result, loaded_after = asyncio.run(scenario())
    assert ready == ["lazy"] and loaded_before is None
    assert result.completion_tokens == 3 and loaded_after is not None


def test_cancel_stops_a_running_job_within_a_step(tiny_model: Path) -> None:
    """Cancelling a long generation fails it CANCELLED mid-way, and the next job runs."""

    async def scenario():
        async with running(spec("tiny", tiny_model, max_new_tokens=LONG)) as runner:
            long = job("tiny", "hello", max_new_tokens=LONG)
            task = asyncio.create_task(runner.run(long))
            await asyncio.sleep(0.5)
            long.cancel()
            with pytest.raises(JobError) as info:
                await task
            after = await runner.run(job("tiny", "hi", max_new_tokens=2))
            return info.value, after

    error, after = asyncio.run(scenario())
    assert error.code == ErrorCode.CANCELLED
    done = int(error.message.split("stopped after ")[1].split(" ")[0])
    assert 0 < done < LONG
    assert after.completion_tokens == 2


def test_deadline_stops_a_running_job(tiny_model: Path) -> None:
    """A job that passes its deadline mid-generation fails DEADLINE_EXCEEDED before finishing."""

    async def scenario():
        async with running(spec("tiny", tiny_model, max_new_tokens=LONG)) as runner:
            with pytest.raises(JobError) as info:
                await runner.run(job("tiny", "hello", max_new_tokens=LONG, deadline=time.monotonic() + 0.4))
            return info.value

    error = asyncio.run(scenario())
    assert error.code == ErrorCode.DEADLINE_EXCEEDED
    assert int(error.message.split("stopped after ")[1].split(" ")[0]) < LONG


def test_cancelled_row_leaves_its_batch_companions_running(tiny_model: Path) -> None:
    """Cancelling one job of a batch stops that row only; its companion completes in full."""

    async def scenario():
        options = {"max_new_tokens": LONG, "batch_wait_ms": 200, "batch_window_ms": 1000}
        async with running(spec("tiny", tiny_model, **options)) as runner:
            victim = job("tiny", "hello", max_new_tokens=LONG)
            tasks = [
                asyncio.create_task(runner.run(victim)),
                asyncio.create_task(runner.run(job("tiny", "x", max_new_tokens=300))),
            ]
            await asyncio.sleep(0.4)
            victim.cancel()
            return await asyncio.gather(*tasks, return_exceptions=True)

    cancelled, survivor = asyncio.run(scenario())
    assert isinstance(cancelled, JobError) and cancelled.code == ErrorCode.CANCELLED
    assert survivor.completion_tokens == 300 and survivor.extra["batch_size"] == 2


def test_cancel_while_queued_answers_without_waiting_for_the_batch(tiny_model: Path) -> None:
    """A queued job cancelled behind a long one fails CANCELLED while the long one still runs."""

    async def scenario():
        async with running(spec("tiny", tiny_model, max_new_tokens=LONG, max_batch_size=1)) as runner:
            long = job("tiny", "hello", max_new_tokens=LONG)
            long_task = asyncio.create_task(runner.run(long))
            await asyncio.sleep(0.2)
            queued = job("tiny", "hi")
            queued_task = asyncio.create_task(runner.run(queued))
            await asyncio.sleep(0.1)
            queued.cancel()
            with pytest.raises(JobError) as info:
                await queued_task
            still_running = not long_task.done()
            long.cancel()
            await asyncio.gather(long_task, return_exceptions=True)
            return info.value, still_running

    error, still_running = asyncio.run(scenario())
    assert error.code == ErrorCode.CANCELLED and still_running


def test_close_fails_running_jobs_with_shutdown(tiny_model: Path) -> None:
    """aclose stops a running job with SHUTDOWN and the runner advertises nothing afterwards."""

    async def scenario():
        runner = TransformersRunner([spec("tiny", tiny_model, max_new_tokens=LONG)], RunnerContext())
        await runner.start()
        task = asyncio.create_task(runner.run(job("tiny", "hello", max_new_tokens=LONG)))
        await asyncio.sleep(0.3)
        await runner.aclose()
        return await asyncio.gather(task, return_exceptions=True), runner.ready_models()

    (error,), ready = asyncio.run(scenario())
    assert isinstance(error, JobError) and error.code == ErrorCode.SHUTDOWN
    assert ready == []


def test_out_of_memory_retries_the_batch_smaller(tiny_model: Path) -> None:
    """An out-of-memory in a batched forward is retried in smaller batches with unchanged outputs."""
    prompts = ["hello", "the miner", "x", "seed"]

    async def scenario():
        options = {"batch_wait_ms": 200, "batch_window_ms": 1000}
        async with running(spec("tiny", tiny_model, **options)) as runner:
            alone = [await runner.run(job("tiny", p, max_new_tokens=8)) for p in prompts]

            def oom_when_batched(module, args, kwargs):
                ids = kwargs.get("input_ids")
                if ids is not None and ids.shape[0] > 1:
                    raise torch.OutOfMemoryError("CUDA out of memory (simulated by the test)")

            hook = runner.loaded("tiny").model.register_forward_pre_hook(oom_when_batched, with_kwargs=True)
            try:
                together = await asyncio.gather(*(runner.run(job("tiny", p, max_new_tokens=8)) for p in prompts))
            finally:
                hook.remove()
            return alone, together

    alone, together = asyncio.run(scenario())
    assert [r.output for r in together] == [r.output for r in alone]
    assert [r.extra["batch_size"] for r in together] == [1, 1, 1, 1]


@pytest.mark.parametrize(
    "error",
    [torch.OutOfMemoryError("CUDA out of memory (simulated)"), RuntimeError("CUDA error: out of memory (simulated)")],
)
def test_out_of_memory_alone_fails_the_job(tiny_model: Path, error: Exception) -> None:
    """A job that runs out of memory on its own fails OUT_OF_MEMORY and the runner keeps serving."""

    async def scenario():
        async with running(spec("tiny", tiny_model)) as runner:

            def oom(module, args):
                raise error

            hook = runner.loaded("tiny").model.register_forward_pre_hook(oom)
            with pytest.raises(JobError) as info:
                await runner.run(job("tiny", "hello"))
            hook.remove()
            return info.value, await runner.run(job("tiny", "hello", max_new_tokens=2)), runner.ready_models()

    error, after, ready = asyncio.run(scenario())
    assert error.code == ErrorCode.OUT_OF_MEMORY
    assert after.completion_tokens == 2 and ready == ["tiny"]


def test_device_error_withdraws_the_models(tiny_model: Path) -> None:
    """A CUDA error that breaks the device raises DeviceError for its jobs and withdraws its models from ready_models."""

    async def scenario():
        async with running(spec("tiny", tiny_model)) as runner:

            def broken(module, args):
                raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated by the test)")

            runner.loaded("tiny").model.register_forward_pre_hook(broken)
            with pytest.raises(DeviceError) as first:
                await runner.run(job("tiny", "hello"))
            with pytest.raises(DeviceError):
                await runner.run(job("tiny", "hello"))
            return first.value, runner.ready_models()

    error, ready = asyncio.run(scenario())
    assert "illegal memory access" in str(error)
    assert ready == []


def test_other_generation_errors_fail_only_that_batch(tiny_model: Path) -> None:
    """An unexpected exception in generate fails the job RUNNER_ERROR and the next job runs."""

    async def scenario():
        async with running(spec("tiny", tiny_model)) as runner:

            def bad(module, args):
                raise ValueError("shape mismatch (simulated by the test)")

            hook = runner.loaded("tiny").model.register_forward_pre_hook(bad)
            with pytest.raises(JobError) as info:
                await runner.run(job("tiny", "hello"))
            hook.remove()
            return info.value, await runner.run(job("tiny", "hello", max_new_tokens=2))

    error, after = asyncio.run(scenario())
    assert error.code == ErrorCode.RUNNER_ERROR and "ValueError" in error.message
    assert after.completion_tokens == 2


def test_fingerprint_follows_the_weights(model_copy) -> None:
    """A local model's revision is a content fingerprint: same files same value, new weights a new one."""
    from runners.hf.source import fingerprint

    a, b = model_copy("a"), model_copy("b")
    assert fingerprint(a) == fingerprint(b)
    data = bytearray((b / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (b / "model.safetensors").write_bytes(bytes(data))
    assert fingerprint(a) != fingerprint(b)
    assert json.loads((a / "config.json").read_text())["model_type"] == "llama"
