"""API keys: read from the environment variable config.json names, compared in constant time.

Keys arrive as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; they are never logged
(observability.RedactFilter removes them from any record) and never part of a cache key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from typing import Protocol

from .errors import ApiError


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="aicrm-api"'})


def keys_from_env(env_var: str, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    raw = (os.environ if environ is None else environ).get(env_var, "")
    return tuple(k.strip() for k in raw.split(",") if k.strip())


class HeaderLookup(Protocol):
    """What reading a key needs of the request headers (werkzeug's, a mapping, a WSGI view)."""

    def get(self, name: str, /) -> str | None: ...


def presented_key(headers: HeaderLookup) -> str | None:
    """The key a request carries, from either header."""
    auth = headers.get("Authorization")
    if auth:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    key = headers.get("X-API-Key")
    return key.strip() if key and key.strip() else None


class KeyChecker:
    """Compares against every configured key, so timing says nothing about which one matched."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(k.encode() for k in keys)

    @property
    def configured(self) -> bool:
        return bool(self._keys)

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(k.decode() for k in self._keys)

    def valid(self, key: str | None) -> bool:
        if key is None:
            return False
        given = key.encode()
        ok = False
        for k in self._keys:
            ok |= hmac.compare_digest(given, k)
        return ok

    def check(self, headers: HeaderLookup) -> str:
        """The request's key, or Unauthorized."""
        key = presented_key(headers)
        if key is None:
            raise Unauthorized("an API key is required (Authorization: Bearer or X-API-Key)")
        if not self.valid(key):
            raise Unauthorized("invalid API key")
        return key


def key_id(key: str) -> str:
    """A stable, non-reversible name for a key (rate-limit buckets, logs)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]
