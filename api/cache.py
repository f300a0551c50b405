"""Response cache: Redis when configured (shared by every gunicorn worker), else in-process.

Only successful responses are stored; the key is the path plus the query parameters sorted by
name, so ``?a=1&b=2`` and ``?b=2&a=1`` share an entry.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from operator import itemgetter
from typing import Protocol

import msgspec
import redis

KEY_PREFIX = "aicrm:api:cache:"


_encode = msgspec.json.Encoder().encode
_name = itemgetter(0)


def cache_key(path: str, params: Iterable[tuple[str, str]]) -> str:
    """The path and the (name, value) pairs as JSON, so no name or value can pass for a
    separator (``?agent%3Dalpha%26window=1d`` is one parameter, not two), sorted by name alone:
    a repeated name keeps the order its values came in (the first is the one a view reads).
    JSON text starts with ``[``, so no key of this form equals one of the earlier
    ``path?k=v`` form still in a shared Redis."""
    return KEY_PREFIX + hashlib.sha256(_encode((path, sorted(params, key=_name)))).hexdigest()


class ResponseCache(Protocol):
    def get(self, key: str) -> bytes | None: ...

    def set(self, key: str, body: bytes, ttl: float) -> None: ...

    def close(self) -> None: ...


class MemoryCache:
    """A bounded TTL map for one process."""

    def __init__(self, max_entries: int = 1024) -> None:
        self.max_entries = max_entries
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            hit = self._data.get(key)
            if hit is None:
                return None
            expires, body = hit
            if expires <= time.monotonic():
                del self._data[key]
                return None
            return body

    def set(self, key: str, body: bytes, ttl: float) -> None:
        with self._lock:
            self._data[key] = (time.monotonic() + ttl, body)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def close(self) -> None:
        with self._lock:
            self._data.clear()


class RedisCache:
    """Entries in Redis with SET PX; a Redis outage degrades to no caching, never to errors."""

    def __init__(self, url: str, socket_timeout: float = 0.5) -> None:
        self.client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
        )

    def get(self, key: str) -> bytes | None:
        try:
            value = self.client.get(key)
        except redis.RedisError:
            return None
        return value if isinstance(value, bytes) else None

    def set(self, key: str, body: bytes, ttl: float) -> None:
        try:
            self.client.set(key, body, px=max(1, int(ttl * 1000)))
        except redis.RedisError:
            pass

    def close(self) -> None:
        self.client.close()


def make_cache(redis_url: str | None) -> ResponseCache:
    return RedisCache(redis_url) if redis_url else MemoryCache()
