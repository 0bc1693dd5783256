"""Per-key request limits shared by every gateway replica: one token bucket per API key
id in Redis, refilled by Redis's own clock (replicas' clocks never disagree about it).

Serving matters more than limiting: when Redis cannot answer, the call is let through, the
outage logged (at most every ``LOG_EVERY_S``), and Redis left alone for ``PAUSE_AFTER_FAILURE_S``
so that requests do not each wait for its timeout. Give the limiter a client that does not
retry (``limiter_client``): a retry is a request kept waiting."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import redis.asyncio as redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ftops_runtime.auth import AuthPrincipal
from ftops_runtime.errors import ResourceExhausted

log = logging.getLogger(__name__)

KEY_PREFIX = "ftops:ratelimit:"
LOG_EVERY_S = 30.0
PAUSE_AFTER_FAILURE_S = 2.0

# KEYS[1] the bucket; ARGV rate (tokens/s), burst (capacity). Returns {allowed, wait_s}.
# The bucket expires once it would be full again: idle keys cost no memory.
_TOKEN_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return {allowed, tostring(wait)}
"""


@dataclass(frozen=True)
class Limit:
    rps: float
    burst: int

    @classmethod
    def of(cls, rps: float, burst: int = 0) -> Limit:
        return cls(rps, max(1, burst or math.ceil(rps)))


def parse_team_limits(spec: str) -> dict[str, Limit]:
    """'support=5:10,research=20' -> per-team limits (burst defaults to the rate)."""
    limits: dict[str, Limit] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        team, sep, value = item.partition("=")
        rps, _, burst = value.partition(":")
        try:
            rate, size = float(rps), int(burst or 0)
        except ValueError:
            rate, size = -1.0, -1
        if not sep or not team.strip() or not 0 < rate < math.inf or size < 0:
            raise ValueError(
                f"rate_limit_teams entry {item!r} must look like 'team=rps' or "
                "'team=rps:burst' with rps > 0"
            )
        limits[team.strip()] = Limit.of(rate, size)
    return limits


def limiter_client(url: str, timeout_s: float) -> redis.Redis:
    """A Redis client for the limiter: one try, a short timeout."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


class RateLimiter:
    """``check(principal)`` raises RESOURCE_EXHAUSTED once the key's bucket is empty."""

    def __init__(
        self,
        client: redis.Redis,
        default: Limit | None,
        teams: dict[str, Limit] | None = None,
        *,
        key_prefix: str = "",
    ) -> None:
        self._redis = client
        # The installation namespace's Redis prefix: limits are per installation.
        self._key_prefix = key_prefix + KEY_PREFIX
        self._default = default
        self._teams = dict(teams or {})
        self._script = client.register_script(_TOKEN_BUCKET)
        self._last_warning = -math.inf
        self._paused_until = -math.inf

    def limit_for(self, principal: AuthPrincipal) -> Limit | None:
        team_limits = [self._teams[t] for t in principal.roles if t in self._teams]
        if team_limits:
            return max(team_limits, key=lambda limit: (limit.rps, limit.burst))
        return self._default

    async def check(self, principal: AuthPrincipal) -> None:
        # Without authentication there is no key to count by (development mode).
        if principal.anonymous:
            return
        limit = self.limit_for(principal)
        if limit is None or time.monotonic() < self._paused_until:
            return
        try:
            allowed, wait = await self._script(
                keys=[self._key_prefix + principal.key_id], args=[limit.rps, limit.burst]
            )
        except (redis.RedisError, OSError) as exc:
            self._warn(exc)
            return
        if int(allowed):
            return
        wait_s = max(float(wait), 0.001)
        raise ResourceExhausted(
            f"rate limit of API key {principal.key_id} reached ({limit.rps:g} requests/s, "
            f"burst {limit.burst}): retry in {wait_s:.3f}s",
            retry_after_ms=math.ceil(wait_s * 1000),
        )

    async def close(self) -> None:
        await self._redis.aclose()

    def _warn(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._paused_until = now + PAUSE_AFTER_FAILURE_S
        if now - self._last_warning >= LOG_EVERY_S:
            self._last_warning = now
            log.warning("rate limits not enforced, Redis unreachable (serving anyway): %s", exc)
