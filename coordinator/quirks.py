"""Behaviour switches: the local coordinator's own rules, or the reference service's quirks.

The default :data:`LOCAL` behaviour is the published API done right (long-poll, ``/fail``
frees the slot, ownership checks, ``cancelled_jobs`` in the heartbeat answer, a miner id
bound to the miner API key that first registered it, a job handed only to a miner that
registered its model). The :data:`REFERENCE` behaviour reproduces what the running
reference coordinator does (docs/protocol.md, "The reference service"), so the miner can
be tested against it on loopback. Constraint matching is the same in both; the reference
service does not look at ``payload.model``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class MinerRateLimits:
    """Per client IP and per endpoint, per ``window_s`` seconds (reference service)."""

    poll: int = 100
    heartbeat: int = 100
    register: int = 50
    result: int = 50
    fail: int = 50
    window_s: float = 60.0


@dataclass(frozen=True)
class Behaviour:
    """What differs between the local coordinator and the reference service."""

    name: str
    long_poll: bool = True  # hold an empty poll up to max_wait_seconds
    fail_frees_slot: bool = True  # /fail gives the miner its slot back
    heartbeat_sets_inflight: bool = False  # the heartbeat's "inflight" overwrites the count
    report_cancelled: bool = True  # heartbeat answers list "cancelled_jobs"
    cancelled_state: str = "CANCELLED"
    strict_outcomes: bool = True  # 409 for a result/fail from a non-holder or on a finished job
    bind_miner_keys: bool = True  # 403 for a miner id used with another key than the one that registered it
    dispatch_by_model: bool = True  # a job goes only to a miner whose capabilities.models include payload.model
    miner_rate_limits: MinerRateLimits | None = field(default=None)


LOCAL = Behaviour(name="local")
REFERENCE = Behaviour(
    name="reference",
    long_poll=False,
    fail_frees_slot=False,
    heartbeat_sets_inflight=True,
    report_cancelled=False,
    cancelled_state="CANCELED",
    strict_outcomes=False,
    bind_miner_keys=False,
    dispatch_by_model=False,
    miner_rate_limits=MinerRateLimits(),
)


def behaviour_for(quirks: str | Behaviour | None, miner_rate_limits: MinerRateLimits | None = None) -> Behaviour:
    """``None``/``"local"`` -> :data:`LOCAL`; ``"reference"`` -> :data:`REFERENCE`.

    ``miner_rate_limits`` replaces the reference limits (tests lower them).
    """
    if isinstance(quirks, Behaviour):
        chosen = quirks
    elif quirks in (None, "", "local", "none"):
        chosen = LOCAL
    elif quirks == "reference":
        chosen = REFERENCE
    else:
        raise ValueError(f"unknown quirks mode {quirks!r}; use 'reference' or leave it unset")
    if miner_rate_limits is not None and chosen.miner_rate_limits is not None:
        chosen = replace(chosen, miner_rate_limits=miner_rate_limits)
    return chosen
