"""Authentication and rate limiting, as FastAPI dependencies.

Clients send their key as ``X-Api-Key`` or as ``Authorization: Bearer <client key>`` (the
AITBC command-line client sends only the latter); miners send ``X-Api-Key``. A job belongs
to the hash of the client key that submitted it (keys themselves are never stored). A miner is named by ``X-Miner-ID``,
or by its key when the header is absent (as the reference service does). A miner id is
bound to the hash of the miner key that first registered it: every miner call under that
id with another key is refused 403 (not in reference-quirks mode).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable

from fastapi import Header, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from coordinator.errors import ApiError
from coordinator.ratelimit import retry_after_header
from coordinator.state import config_of, dispatcher_of

API_KEY = APIKeyHeader(name="X-Api-Key", auto_error=False, description="client or miner API key")
BEARER = HTTPBearer(auto_error=False, description="client API key as a bearer token (instead of X-Api-Key)")
BEARER_CREDENTIALS = Security(BEARER)
MAX_MINER_ID = 128


def key_owner(api_key: str) -> str:
    """The stable, non-secret name of a client key (jobs are stored under it)."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:32]


def is_known_key(api_key: str | None, keys: frozenset[str]) -> bool:
    if not api_key:
        return False
    found = False
    for key in keys:
        found |= hmac.compare_digest(key.encode("utf-8"), api_key.encode("utf-8", "surrogatepass"))
    return found


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def known_client_key(candidates: tuple[str | None, ...], keys: frozenset[str]) -> str | None:
    """The first of ``candidates`` (X-Api-Key, then the bearer token) that is a client key."""
    for candidate in candidates:
        if is_known_key(candidate, keys):
            return candidate
    return None


def client_auth(category: str) -> Callable[..., Awaitable[str]]:
    """A dependency returning the caller's owner id, after the ``category`` rate limit.

    The key is read from ``X-Api-Key`` or ``Authorization: Bearer``; either one that is a
    client key authenticates the call.
    """

    async def dependency(request: Request, api_key: str | None = Security(API_KEY),
                         bearer: HTTPAuthorizationCredentials | None = BEARER_CREDENTIALS) -> str:
        config = config_of(request)
        token = bearer.credentials if bearer is not None else None
        found = known_client_key((api_key, token), config.client_keys)
        if found is None:
            raise ApiError(401, "Invalid API key")
        api_key = found
        owner = key_owner(api_key)
        limits = config.rate_limits
        if limits is not None:
            limit = limits.limit(category)
            wait = config.client_buckets.take((category, owner), limit, limits.window_s)
            if wait is not None:
                raise ApiError(
                    429,
                    f"Rate limit exceeded: {limit} {category} requests per {limits.window_s:g} s per API key",
                    headers={"Retry-After": retry_after_header(wait)},
                )
        return owner

    return dependency


def miner_auth(endpoint: str) -> Callable[..., Awaitable[str]]:
    """A dependency returning the calling miner's id (reference-mode limits applied)."""

    async def dependency(
        request: Request,
        api_key: str | None = Security(API_KEY),
        x_miner_id: str | None = Header(None, alias="X-Miner-ID", max_length=MAX_MINER_ID,
                                  description="miner id (default: the API key)"),
    ) -> str:
        config = config_of(request)
        limits = config.behaviour.miner_rate_limits
        if limits is not None:
            host = request.client.host if request.client else "unknown"
            if not config.miner_windows.take((endpoint, host), getattr(limits, endpoint), limits.window_s):
                raise ApiError(429, "Rate limit exceeded", headers={"Retry-After": retry_after_header(limits.window_s)})
        if api_key is None or not is_known_key(api_key, config.miner_keys):
            raise ApiError(401, "Invalid API key")
        miner_id = x_miner_id if x_miner_id is not None else api_key
        if not miner_id.strip() or len(miner_id) > MAX_MINER_ID:
            raise ApiError(422, f"X-Miner-ID: must be 1 to {MAX_MINER_ID} characters")
        dispatcher_of(request).check_key(miner_id, key_owner(api_key))
        return miner_id

    return dependency
