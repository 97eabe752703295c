"""What the owner is told as the miner works: a periodic summary line and the idle warning.

:class:`Activity` counts the jobs that ended, their tokens and GPU-seconds, and the time
with no job in flight, since the last summary line. Every ``log.summary_interval_s`` the
daemon logs ``miner_summary`` (jobs completed and failed, tokens, GPU-seconds, the earnings
they represent at the advertised ``price`` per GPU-second, jobs and earnings per hour, time
idle) and starts a new window. After ``log.idle_warning_s`` with no job it logs
``miner_idle`` once per idle spell, with the likely causes the miner can see: how the
coordinator answered its polls (204s: no job for it, 429s: rate limited, errors), and what
it offers (price, region, models).

The poll answers come from the claimer's ``answers`` counter (``job``, ``empty``,
``rate_limited``, ``error``, ``not_registered``, ``auth``); the clock is monotonic seconds.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

HOUR_S = 3600.0


@dataclass
class Window:
    """The figures of one summary window."""

    started: float
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    tokens: int = 0
    gpu_seconds: float = 0.0
    idle_s: float = 0.0
    polls: Counter[str] = field(default_factory=Counter)


class Activity:
    """Counts work for the summary line and notices long idle spells (see the module docstring).

    ``price`` is per GPU-second; ``models`` and ``answers`` are read when a line is made, so
    they show what the miner offers and what the coordinator said at that moment.
    """

    def __init__(
        self,
        *,
        price: float,
        region: str | None,
        models: Callable[[], Sequence[str]],
        answers: Callable[[], Mapping[str, int]] = dict,
        idle_warning_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.price = price
        self.region = region
        self._models = models
        self._answers = answers
        self.idle_warning_s = idle_warning_s
        self._clock = clock
        now = clock()
        self.window = Window(started=now)
        self._answers_at_window = Counter(answers())
        self._answers_at_idle = Counter(answers())
        self.inflight = 0
        self.idle_since: float | None = now  # None while a job runs
        self._idle_counted_until = now
        self._idle_warned = False
        # Totals since start, for /metrics and ``aitbc-miner status``.
        self.total = Window(started=now)

    # -- what the pipeline reports --------------------------------------------------------

    def job_started(self) -> None:
        now = self._clock()
        if self.inflight == 0 and self.idle_since is not None:
            self._count_idle(now)
            self.idle_since = None
        self.inflight += 1

    def job_ended(self, outcome: str, completion_tokens: int | None, gpu_seconds: float | None) -> None:
        """One job ended: ``outcome`` is ``completed``, ``failed`` or ``cancelled``."""
        for window in (self.window, self.total):
            if outcome == "completed":
                window.completed += 1
                window.tokens += max(completion_tokens or 0, 0)
                window.gpu_seconds += max(gpu_seconds or 0.0, 0.0)
            elif outcome == "failed":
                window.failed += 1
            else:
                window.cancelled += 1
        self.inflight = max(self.inflight - 1, 0)
        if self.inflight == 0:
            now = self._clock()
            self.idle_since = now
            self._idle_counted_until = now
            self._idle_warned = False
            self._answers_at_idle = Counter(self._answers())

    # -- what the daemon logs -------------------------------------------------------------

    def idle_for(self) -> float:
        """Seconds since the last job ended (or since start); 0 while a job runs."""
        return 0.0 if self.idle_since is None else max(self._clock() - self.idle_since, 0.0)

    def _count_idle(self, now: float) -> None:
        if self.idle_since is not None:
            spent = max(now - self._idle_counted_until, 0.0)
            self.window.idle_s += spent
            self.total.idle_s += spent
            self._idle_counted_until = now

    def take_summary(self) -> dict[str, Any]:
        """The figures of the window that ends now (the fields of ``miner_summary``); a new one starts."""
        now = self._clock()
        self._count_idle(now)
        w = self.window
        span = max(now - w.started, 1e-9)
        answers = Counter(self._answers())
        polls = answers - self._answers_at_window
        earnings = w.gpu_seconds * self.price
        line = {
            "window_s": round(span, 1),
            "jobs_completed": w.completed,
            "jobs_failed": w.failed,
            "jobs_cancelled": w.cancelled,
            "tokens": w.tokens,
            "gpu_seconds": round(w.gpu_seconds, 3),
            "earnings": round(earnings, 6),
            "jobs_per_hour": round(w.completed * HOUR_S / span, 2),
            "earnings_per_hour": round(earnings * HOUR_S / span, 6),
            "idle_s": round(w.idle_s, 1),
            "polls_empty": polls.get("empty", 0),
            "polls_rate_limited": polls.get("rate_limited", 0),
        }
        self.window = Window(started=now)
        self._answers_at_window = answers
        return line

    def idle_warning(self) -> dict[str, Any] | None:
        """The ``miner_idle`` fields once per idle spell longer than ``idle_warning_s``; else ``None``."""
        idle = self.idle_for()
        if self.idle_warning_s <= 0 or self._idle_warned or self.idle_since is None or idle < self.idle_warning_s:
            return None
        self._idle_warned = True
        polls = Counter(self._answers()) - self._answers_at_idle
        return {"idle_s": round(idle, 1), "polls": dict(sorted(polls.items())), "causes": self.idle_causes(polls)}

    def idle_causes(self, polls: Mapping[str, int]) -> list[str]:
        """The likely reasons no job came, from what the miner can see, most telling first."""
        causes: list[str] = []
        models = list(self._models())
        if polls.get("auth"):
            causes.append(
                f"the coordinator refused the credentials on {polls['auth']} poll(s): check coordinator.api_key"
            )
        if polls.get("not_registered"):
            causes.append(f"the coordinator did not know this miner on {polls['not_registered']} poll(s)")
        if polls.get("rate_limited"):
            causes.append(
                f"the coordinator rate-limited {polls['rate_limited']} poll(s) (429): lower "
                "coordinator.max_polls_per_minute or run fewer miners behind one address"
            )
        if polls.get("error"):
            causes.append(f"{polls['error']} poll(s) failed: the coordinator is unreachable or erroring")
        if not models:
            causes.append("no model is ready to serve: see the model_load lines above")
        if polls.get("empty"):
            where = f" in region {self.region!r}" if self.region else ""
            causes.append(
                f"the coordinator had no job for this miner in {polls['empty']} poll(s): the price "
                f"{self.price:g} per GPU-second may be above what jobs offer, the models "
                f"{', '.join(models) or '(none)'} may be ones nobody asks for now, or no job's constraints "
                f"(GPU memory, region{where}) match this miner"
            )
        if not any(polls.values()):
            causes.append("no poll was answered: not registered, no model ready, or the state folder refuses writes")
        return causes


class Reachability:
    """Notices when the coordinator comes back after an outage (fed by every request's outcome).

    :meth:`observe` takes the request's error kind (``None`` for an answer); ``timeout``,
    ``connect``, ``5xx`` and ``bad_answer`` mean unreachable. When an answer ends an outage it
    returns ``(seconds, failed requests)``, so the caller can log ``coordinator_reachable_again``.
    """

    UNREACHABLE = frozenset({"timeout", "connect", "5xx", "bad_answer"})

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.down_since: float | None = None
        self.failures = 0

    def observe(self, error: str | None) -> tuple[float, int] | None:
        if error in self.UNREACHABLE:
            if self.down_since is None:
                self.down_since = self._clock()
            self.failures += 1
            return None
        if self.down_since is None:
            return None
        outage = (self._clock() - self.down_since, self.failures)
        self.down_since = None
        self.failures = 0
        return outage
