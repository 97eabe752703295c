"""What the ``openai`` runner knows about one engine: does it answer, which models it lists.

An :class:`EngineState` is one base URL with its API key. It reads ``GET /models`` at
start and every ``recheck_interval_s`` (and is told at once when a job finds the engine
gone or a model missing), and logs a line only when what it can serve changes.
"""

from __future__ import annotations

import asyncio

import httpx
import structlog

from runners.openai_wire import MODELS_PATH, match_served, parse_model_list

log = structlog.get_logger("runners.openai")


class EngineState:
    """One engine and the configured models on it (job-facing name -> the engine's name)."""

    def __init__(self, base_url: str, api_key: str | None, *, check_models: bool, recheck_interval_s: float) -> None:
        self.base_url = base_url
        self.check_models = check_models
        self.recheck_interval_s = recheck_interval_s
        self.served: dict[str, str] = {}
        self.listed: dict[str, str | None] = {}  # id -> owned_by, as GET /models answered
        self.problem: str | None = "not checked yet"
        self.usage_in_stream = True  # cleared for an engine that refuses stream_options
        self._api_key = api_key
        self._last_state: str | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def unready_reason(self, served_model: str) -> str | None:
        """Why ``served_model`` cannot be advertised now, or ``None`` when it can."""
        if self.problem is not None:
            return self.problem
        if self.check_models and match_served(served_model, self.listed) is None:
            return f"the engine does not list {served_model!r}"
        return None

    def owner_of(self, served_model: str) -> str | None:
        listed_as = match_served(served_model, self.listed)
        return self.listed.get(listed_as) if listed_as is not None else None

    def mark_unreachable(self, kind: str) -> None:
        self.problem, self.listed = f"not reachable ({kind})", {}
        self._log_transition()

    def forget(self, served_model: str) -> None:
        """The engine answered 404 for ``served_model``: stop advertising it until listed again."""
        listed_as = match_served(served_model, self.listed)
        if listed_as is not None:
            del self.listed[listed_as]
            self._log_transition()

    async def check(self, client: httpx.AsyncClient) -> None:
        """Read ``GET /models`` and update what is listed; log only changes."""
        try:
            response = await client.get(self.base_url + MODELS_PATH, headers=self.headers())
        except httpx.HTTPError as exc:
            self.problem, self.listed = f"not reachable ({type(exc).__name__})", {}
        else:
            self.problem, self.listed = self._judge(response)
        self._log_transition()

    async def recheck_forever(self, client: httpx.AsyncClient) -> None:
        while True:
            await asyncio.sleep(self.recheck_interval_s)
            try:
                await self.check(client)
            except Exception as exc:  # the re-check must never take the daemon down
                log.error("engine_check_error", base_url=self.base_url, error=repr(exc))

    def _judge(self, response: httpx.Response) -> tuple[str | None, dict[str, str | None]]:
        status = response.status_code
        if status in (401, 403):
            return f"the engine refused the API key ({status}); check api_key_file", {}
        if 300 <= status < 400:
            where = f"GET {self.base_url}{MODELS_PATH}"
            return f"{where} answered with a redirect ({status}); set base_url to where it points", {}
        if status >= 400:
            if not self.check_models:
                return None, {}
            return (
                f"GET {self.base_url}{MODELS_PATH} answered {status}; check that base_url ends with /v1, "
                "or set check_models = false for an engine without a model list"
            ), {}
        try:
            return None, parse_model_list(response.json())
        except ValueError as exc:
            if not self.check_models:
                return None, {}
            return f"GET {self.base_url}{MODELS_PATH} did not return a model list ({exc})", {}

    def _log_transition(self) -> None:
        ready = sorted(name for name, served in self.served.items() if self.unready_reason(served) is None)
        missing = {name: served for name, served in self.served.items() if self.unready_reason(served) is not None}
        state = f"{self.problem}|{ready}"
        if state == self._last_state:
            return
        self._last_state = state
        if self.problem is not None:
            log.warning(
                "engine_unavailable",
                base_url=self.base_url,
                problem=self.problem,
                models=sorted(missing),
                recheck_s=self.recheck_interval_s,
            )
            return
        log.info("engine_ready", base_url=self.base_url, models=ready)
        if missing:
            log.warning(
                "engine_models_not_listed",
                base_url=self.base_url,
                models=sorted(missing),
                served_models=sorted(set(missing.values())),
                listed=sorted(self.listed)[:20],
            )
