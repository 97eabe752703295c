"""The one exception the coordinator's logic raises; the app turns it into a JSON 4xx."""

from __future__ import annotations


class ApiError(Exception):
    """A refusal: HTTP ``status`` with a ``detail`` that names the field or rule broken."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


def not_found(job_id: str) -> ApiError:
    return ApiError(404, f"job not found: {job_id}")


MINER_NOT_REGISTERED = "miner not registered"
