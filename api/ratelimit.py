"""Rate limits: fixed windows per client over all data endpoints, in Redis or in-process.

With Redis every gunicorn worker and API instance counts in the same keys. One Lua script per
request increments each configured window, reads its remaining time and, for a cached endpoint,
fetches the stored response in the same round trip, so a cache hit costs one Redis call in all.
A Redis outage lets requests through rather than failing them.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from limits import RateLimitItem, parse_many

from .errors import ApiError

KEY_PREFIX = "aicrm:api:limit:"
_REFUSED_MAX = 10_000
_PACKED_MAX = 4096
"""Clients whose packed limiter call a process keeps (RedisCounters)."""
"""Refused clients a process remembers (RateLimiter.refused_recently)."""

_SCRIPT = """
local n = tonumber(ARGV[1])
local out = {}
local ok = true
for i = 1, n do
  local count = redis.call('INCR', KEYS[i])
  local ttl = redis.call('PTTL', KEYS[i])
  if ttl < 0 then
    ttl = tonumber(ARGV[1 + i])
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
  out[2 * i - 1] = count
  out[2 * i] = ttl
  if count > tonumber(ARGV[1 + n + i]) then ok = false end
end
if ok and #KEYS > n then
  out[2 * n + 1] = redis.call('GET', KEYS[n + 1])
end
return out
"""
"""KEYS: the window counters, then optionally a cache key; ARGV: n, n window lengths (ms),
n limits. Returns count, remaining ms for each window, then the cached body (nil on a miss or
when a limit is exceeded)."""


class RateLimited(ApiError):
    status = 429
    code = "rate_limited"


@dataclass(frozen=True, slots=True)
class WindowState:
    """One configured limit after this request's hit."""

    limit: RateLimitItem
    count: int
    reset_in: float
    """Seconds until the window ends."""

    @property
    def exceeded(self) -> bool:
        return self.count > self.limit.amount

    @property
    def remaining(self) -> int:
        return max(0, self.limit.amount - self.count)

    def headers(self) -> dict[str, str]:
        headers = {
            "X-RateLimit-Limit": str(self.limit.amount),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(math.ceil(time.time() + self.reset_in)),
        }
        if self.exceeded:
            headers["Retry-After"] = str(max(1, math.ceil(self.reset_in)))
        return headers


class Counters(Protocol):
    def hit(self, windows: Sequence[tuple[str, int, int]],
            prefetch: str | None) -> tuple[list[tuple[int, float]], bytes | None]:
        """Count one hit in each (key, seconds, limit) window: (count, seconds left) each,
        and the value stored under ``prefetch`` when every count is within its limit."""
        ...

    def close(self) -> None: ...


class MemoryCounters:
    """Windows of one process (no redis_url)."""

    def __init__(self, sweep_at: int = 10_000) -> None:
        self._data: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()
        self._sweep_at = sweep_at

    def hit(self, windows: Sequence[tuple[str, int, int]],
            prefetch: str | None) -> tuple[list[tuple[int, float]], bytes | None]:
        now = time.monotonic()
        out = []
        with self._lock:
            for key, seconds, _ in windows:
                count, ends = self._data.get(key, (0, 0.0))
                if ends <= now:
                    count, ends = 0, now + seconds
                count += 1
                self._data[key] = (count, ends)
                out.append((count, ends - now))
            if len(self._data) > self._sweep_at:
                self._data = {k: v for k, v in self._data.items() if v[1] > now}
        return out, None

    def close(self) -> None:
        with self._lock:
            self._data.clear()


class _ThreadConnection:
    """A thread's Redis connection, disconnected as soon as the thread's storage goes: redis-py
    connections sit in reference cycles, and left to the cycle collector their socket can be
    finalized first (an unclosed-socket warning, the close left to chance)."""

    __slots__ = ("conn", "used", "__weakref__")

    def __init__(self, conn: redis.connection.AbstractConnection) -> None:
        self.conn = conn
        self.used = False

    def __del__(self) -> None:
        try:
            self.conn.disconnect()
        except Exception:  # noqa: BLE001 - nothing to report to at interpreter teardown
            pass


class RedisCounters:
    """Windows in Redis, shared by every process: one EVALSHA per request.

    Each thread keeps its own connection, made with the client's settings (address, password,
    database, TLS, timeouts), and talks to it directly: checking a connection out of redis-py's
    pool and through its retry wrapper cost more CPU than the script call itself (about 110 us
    against 45 us per request, in-process). A connection that fails after it has served before
    is reconnected once (Redis restarted); a script Redis no longer holds is sent in full.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._sha = hashlib.sha1(_SCRIPT.encode()).hexdigest()
        self._local = threading.local()
        self._lock = threading.Lock()
        # Weak, as in PrometheusClient: a connection lives as long as its thread.
        self._open: weakref.WeakSet[_ThreadConnection] = weakref.WeakSet()
        self._packed: dict[tuple[str, ...], Any] = {}
        """EVALSHA calls without a cache key, packed, per client (at most ``_PACKED_MAX``)."""

    def _connection(self) -> _ThreadConnection:
        held: _ThreadConnection | None = getattr(self._local, "held", None)
        if held is None:
            pool = self.client.connection_pool
            held = _ThreadConnection(pool.connection_class(**pool.connection_kwargs))
            self._local.held = held
            with self._lock:
                self._open.add(held)
        return held

    def _call(self, *args: Any, packed: Any = None) -> Any:
        for attempt in (0, 1):
            held = self._connection()
            reused = held.used
            try:
                if packed is None:
                    held.conn.send_command(*args)
                else:
                    held.conn.send_packed_command(packed)
                reply = held.conn.read_response()
            except (redis.ConnectionError, redis.TimeoutError):
                held.conn.disconnect()
                held.used = False
                if reused and attempt == 0:
                    continue
                raise
            held.used = True
            return reply
        raise AssertionError("unreachable")

    def hit(self, windows: Sequence[tuple[str, int, int]],
            prefetch: str | None) -> tuple[list[tuple[int, float]], bytes | None]:
        keys = [w[0] for w in windows]
        if prefetch is not None:
            keys.append(prefetch)
        args = [len(windows), *(w[1] * 1000 for w in windows), *(w[2] for w in windows)]
        packed = None
        if prefetch is None:
            # The same client's call is the same bytes every time: packed once.
            ident = tuple(keys)
            packed = self._packed.get(ident)
            if packed is None:
                if len(self._packed) >= _PACKED_MAX:
                    self._packed = {}
                packed = self._packed[ident] = self._connection().conn.pack_command(
                    "EVALSHA", self._sha, len(keys), *keys, *args)
        try:
            reply = self._call("EVALSHA", self._sha, len(keys), *keys, *args, packed=packed)
        except redis.exceptions.NoScriptError:
            reply = self._call("EVAL", _SCRIPT, len(keys), *keys, *args)
        n = len(windows)
        out = [(int(reply[2 * i]), int(reply[2 * i + 1]) / 1000) for i in range(n)]
        body = reply[2 * n] if len(reply) > 2 * n else None
        return out, body if isinstance(body, bytes) else None

    def close(self) -> None:
        with self._lock:
            conns, self._open = list(self._open), weakref.WeakSet()
        for held in conns:
            held.conn.disconnect()
        self._local = threading.local()
        self.client.close()


class RateLimiter:
    """``spec`` in limits syntax (``120/minute``, ``10/second;1000/hour``), per client key."""

    def __init__(self, spec: str, counters: Counters, logger: logging.Logger) -> None:
        self.limits: list[RateLimitItem] = list(parse_many(spec))
        self.counters = counters
        self.logger = logger
        self._windows = [(f"{item.amount}/{item.get_expiry()}", item.get_expiry(), item.amount)
                         for item in self.limits]
        self._failing_since = 0.0
        self._refused: dict[str, float] = {}
        """Clients this process has refused, to the end of the window that refused them
        (monotonic): ``refused_recently``."""

    def refused_recently(self, client: str) -> bool:
        """Whether this process has refused ``client`` in a window that has not ended yet.
        Only what this process saw (other workers count in the same windows), so a "no" is
        no promise: the caller must still ask ``hit``."""
        until = self._refused.get(client)
        if until is None:
            return False
        if until > time.monotonic():
            return True
        self._refused.pop(client, None)
        return False

    def _remember_refused(self, client: str, reset_in: float) -> None:
        now = time.monotonic()
        if len(self._refused) >= _REFUSED_MAX:
            # A copy first: another thread may add to the map meanwhile (that entry may be
            # lost, which costs its client one early query).
            self._refused = {c: t for c, t in list(self._refused.items()) if t > now}
            if len(self._refused) >= _REFUSED_MAX:
                # Refused clients beyond the bound: forgetting one costs it one early query.
                self._refused.clear()
        self._refused[client] = now + reset_in

    def hit(self, client: str, prefetch: str | None = None
            ) -> tuple[WindowState | None, bytes | None]:
        """The state to report (an exceeded window first, else the one with the fewest requests
        left) and the prefetched value; (None, None) when the counters are unreachable."""
        windows = [(f"{KEY_PREFIX}{client}:{w}", s, a) for w, s, a in self._windows]
        try:
            counts, body = self.counters.hit(windows, prefetch)
        except redis.RedisError as exc:
            now = time.monotonic()
            if now - self._failing_since > 60:
                self._failing_since = now
                self.logger.warning("rate limit storage unavailable: requests are let through",
                                    extra={"error": type(exc).__name__})
            return None, None
        states = [WindowState(item, count, reset_in)
                  for item, (count, reset_in) in zip(self.limits, counts, strict=True)]
        exceeded = [s for s in states if s.exceeded]
        if exceeded:
            refusing = max(exceeded, key=lambda s: s.reset_in)
            self._remember_refused(client, refusing.reset_in)
            return refusing, None
        return min(states, key=lambda s: s.remaining), body

    def close(self) -> None:
        self.counters.close()
