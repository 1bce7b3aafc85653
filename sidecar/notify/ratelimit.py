"""Discord rate-limit budgets: wait before a bucket is empty instead of collecting 429s.

Discord answers every webhook request with ``X-RateLimit-Limit``, ``-Remaining`` and
``-Reset-After``. A budget remembers them and, before each request, says whether to send now
or how long to wait. When the window is over and its size is known, a new one is assumed to
start with the next request, as Discord's buckets do; when nothing is known yet, one request
goes alone and the others wait for the headers it brings back.

``LocalBudget`` lives in one process. ``RedisBudget`` keeps the same state in one Redis hash
per webhook, updated by Lua scripts so that every replica draws from one budget; if Redis
fails, the notifier falls back to its local budget and says so in the log.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    # redis-py costs about 10 MB resident; it is imported only when a Redis backend is used.
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

# While one request discovers the bucket, the others look again this often (seconds).
PROBE_POLL = 0.05
# A discovering request that never reports back frees the bucket after this long.
PROBE_TIMEOUT = 10.0
# After a Redis failure the local budget answers alone for this long, so that an outage
# costs one failed call per period instead of one (with the client's retries) per request.
REDIS_COOLDOWN = 5.0


class Budget(Protocol):
    """Rate-limit state of one webhook."""

    async def take(self) -> float:
        """Claim one request: 0 to send now, else seconds to wait before asking again."""
        ...

    async def observe(self, limit: int, remaining: int, reset_after: float) -> None:
        """Record the ``X-RateLimit-*`` headers of an answer."""
        ...

    async def block(self, retry_after: float) -> None:
        """Send nothing for ``retry_after`` seconds (after a 429)."""
        ...

    async def answered(self) -> None:
        """An answer without rate-limit headers arrived: stop waiting for them."""
        ...


class LocalBudget:
    """The budget of one webhook in this process; callers serialise their requests."""

    def __init__(self) -> None:
        self.limit: int | None = None
        self.window = 0.0
        self.remaining = 0
        self.reset_at = 0.0
        self.blocked_until = 0.0
        self.probing_until = 0.0

    async def take(self) -> float:
        now = time.monotonic()
        if self.blocked_until > now:
            return self.blocked_until - now
        if self.reset_at <= now:
            if self.limit is None or self.window <= 0:
                if self.probing_until > now:
                    return min(self.probing_until - now, PROBE_POLL)
                self.probing_until = now + PROBE_TIMEOUT
                return 0.0
            self.remaining, self.reset_at = self.limit, now + self.window
        if self.remaining <= 0:
            return self.reset_at - now
        self.remaining -= 1
        return 0.0

    async def observe(self, limit: int, remaining: int, reset_after: float) -> None:
        now = time.monotonic()
        if self.reset_at > now and remaining > self.remaining:
            # Requests claimed but not yet answered are not in Discord's count yet.
            remaining = self.remaining
        self.limit = limit
        if remaining == limit - 1:
            self.window = reset_after
        self.remaining = remaining
        self.reset_at = now + reset_after
        self.probing_until = 0.0

    async def block(self, retry_after: float) -> None:
        now = time.monotonic()
        self.blocked_until = max(self.blocked_until, now + retry_after)
        self.remaining = 0
        self.reset_at = max(self.reset_at, now + retry_after)
        self.probing_until = 0.0

    async def answered(self) -> None:
        self.probing_until = 0.0


_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_TAKE = (
    _NOW
    + """
local state = redis.call('HMGET', KEYS[1],
  'blocked', 'reset', 'remaining', 'limit', 'window', 'probe')
local blocked = tonumber(state[1]) or 0
if blocked > now then return blocked - now end
local reset = tonumber(state[2]) or 0
local remaining = tonumber(state[3]) or 0
if reset <= now then
  local limit = tonumber(state[4])
  local window = tonumber(state[5]) or 0
  if limit == nil or window <= 0 then
    local probe = tonumber(state[6]) or 0
    if probe > now then return math.min(probe - now, tonumber(ARGV[1])) end
    redis.call('HSET', KEYS[1], 'probe', now + tonumber(ARGV[2]))
    redis.call('PEXPIRE', KEYS[1], 600000)
    return 0
  end
  remaining = limit
  reset = now + window
  redis.call('HSET', KEYS[1], 'reset', reset)
end
if remaining <= 0 then return reset - now end
redis.call('HSET', KEYS[1], 'remaining', remaining - 1)
redis.call('PEXPIRE', KEYS[1], 600000)
return 0
"""
)

_OBSERVE = (
    _NOW
    + """
local limit = tonumber(ARGV[1])
local remaining = tonumber(ARGV[2])
local reset_after = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'reset', 'remaining')
local reset = tonumber(state[1]) or 0
local current = tonumber(state[2])
if reset > now and current ~= nil and current < remaining then remaining = current end
redis.call('HSET', KEYS[1], 'limit', limit, 'remaining', remaining, 'reset', now + reset_after)
if remaining == limit - 1 then redis.call('HSET', KEYS[1], 'window', reset_after) end
redis.call('HDEL', KEYS[1], 'probe')
redis.call('PEXPIRE', KEYS[1], 600000)
return 0
"""
)

_BLOCK = (
    _NOW
    + """
local until_ms = now + tonumber(ARGV[1])
local blocked = tonumber(redis.call('HGET', KEYS[1], 'blocked')) or 0
if until_ms > blocked then redis.call('HSET', KEYS[1], 'blocked', until_ms) end
redis.call('HSET', KEYS[1], 'remaining', 0)
redis.call('HDEL', KEYS[1], 'probe')
redis.call('PEXPIRE', KEYS[1], 600000)
return 0
"""
)


def budget_key(prefix: str, webhook_url: str) -> str:
    """The Redis key of a webhook's budget: a hash of the URL, so no token is ever stored."""
    digest = hashlib.sha256(webhook_url.split("?")[0].encode()).hexdigest()[:24]
    return f"{prefix}discord:ratelimit:{digest}"


class RedisBudget:
    """One budget per webhook shared by every replica through Redis (times in Redis's clock).

    A Redis failure is logged and the local budget answers instead, so a Redis outage slows
    nothing down beyond what the local headers allow; Redis is tried again every few seconds.
    """

    def __init__(self, redis: Redis, key: str, fallback: LocalBudget | None = None) -> None:
        from redis.exceptions import RedisError

        self._redis_errors: type[RedisError] = RedisError
        self.redis = redis
        self.key = key
        self.fallback = fallback or LocalBudget()
        self._take = redis.register_script(_TAKE)
        self._observe = redis.register_script(_OBSERVE)
        self._block = redis.register_script(_BLOCK)
        self._failing = False
        self._retry_at = 0.0

    def _available(self) -> bool:
        return not self._failing or time.monotonic() >= self._retry_at

    async def take(self) -> float:
        if not self._available():
            return await self.fallback.take()
        try:
            wait_ms = await self._take(
                keys=[self.key], args=[int(PROBE_POLL * 1000), int(PROBE_TIMEOUT * 1000)]
            )
        except self._redis_errors as error:
            self._report(error)
            return await self.fallback.take()
        self._recovered()
        return max(int(wait_ms), 0) / 1000

    async def observe(self, limit: int, remaining: int, reset_after: float) -> None:
        await self.fallback.observe(limit, remaining, reset_after)
        if not self._available():
            return
        try:
            await self._observe(
                keys=[self.key], args=[limit, remaining, max(int(reset_after * 1000), 0)]
            )
        except self._redis_errors as error:
            self._report(error)

    async def block(self, retry_after: float) -> None:
        await self.fallback.block(retry_after)
        if not self._available():
            return
        try:
            await self._block(keys=[self.key], args=[max(int(retry_after * 1000), 1)])
        except self._redis_errors as error:
            self._report(error)

    async def answered(self) -> None:
        await self.fallback.answered()
        if not self._available():
            return
        try:
            await self.redis.hdel(self.key, "probe")
        except self._redis_errors as error:
            self._report(error)

    def _report(self, error: RedisError) -> None:
        if not self._failing:
            logger.warning(
                "shared Discord rate-limit budget unavailable, using this replica's own: %s",
                error,
            )
        self._failing = True
        self._retry_at = time.monotonic() + REDIS_COOLDOWN

    def _recovered(self) -> None:
        if self._failing:
            logger.info("shared Discord rate-limit budget available again")
        self._failing = False
