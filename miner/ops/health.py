"""The health state of the miner: written by the daemon, read by ``/healthz``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class HealthState:
    """What ``/healthz`` reports; the daemon writes the fields, the server reads them.

    Healthy only while registered, with a heartbeat acknowledged within three heartbeat
    intervals, not draining, with a writable state folder, and with at least one GPU that
    its health checks let serve (one drained GPU of several is reported, not unhealthy).
    """

    registered: bool = False
    last_heartbeat: float | None = None  # time.time() of the last acknowledged heartbeat
    heartbeat_interval_s: float = 15.0
    draining: bool = False
    disk_ok: bool = True
    disk_reason: str = ""
    registration_error: str = ""  # why the miner is not registered yet (shown until it is)
    gpus_drained: dict[int, str] = field(default_factory=dict)  # NVML index -> why it takes no new job
    gpus_total: int = 0

    def check(self, now: float | None = None) -> tuple[bool, str]:
        """``(healthy, reason)``; the reason is ``"ok"`` when healthy."""
        now = time.time() if now is None else now
        if self.draining:
            return False, "draining: not claiming, finishing in-flight jobs before exit"
        if not self.disk_ok:
            return False, f"state folder unusable: {self.disk_reason or 'write failed'}"
        if self.gpus_total and len(self.gpus_drained) >= self.gpus_total:
            why = "; ".join(f"GPU {i}: {reason}" for i, reason in sorted(self.gpus_drained.items()))
            return False, f"no GPU can serve: {why}"
        if not self.registered:
            why = f": {self.registration_error}" if self.registration_error else ""
            return False, f"not registered with the coordinator{why}"
        if self.last_heartbeat is None:
            return False, "no heartbeat acknowledged yet"
        age = now - self.last_heartbeat
        limit = 3 * self.heartbeat_interval_s
        if age > limit:
            return False, f"last acknowledged heartbeat {age:.0f}s ago (limit {limit:.0f}s)"
        return True, "ok"
