"""Everything a runner plugin needs, from one module.

``from runners.api import Runner, Job, RunResult, ModelSpec, RunnerContext, JobError,
ErrorCode, ConfigError, parse_options`` is all a third-party runner imports; the contract
is described in :mod:`runners.base` and ``docs/plugins.md``. The older paths
(``runners.base``, ``runners.fake``, ``miner.errors``) keep working.
"""

from miner.wire.errors import ConfigError, DeviceError, ErrorCode, JobError
from miner.wire.receipts import canonical_json
from runners.base import (
    GpuInfo,
    Job,
    ModelSpec,
    Runner,
    RunnerContext,
    RunResult,
    parse_options,
)
from runners.params import GenerationParams, TextRequest, apply_stop

__all__ = [
    "ConfigError",
    "DeviceError",
    "ErrorCode",
    "GenerationParams",
    "GpuInfo",
    "Job",
    "JobError",
    "ModelSpec",
    "Runner",
    "RunnerContext",
    "RunResult",
    "TextRequest",
    "apply_stop",
    "canonical_json",
    "parse_options",
]
