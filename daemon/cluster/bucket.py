"""The cluster's shared rate budget: one token bucket per endpoint, in Redis, in Lua.

The clock is Redis `TIME`, read inside the scripts: nodes' clocks never enter the
budget. Nodes lease small batches (LEASE_SECONDS of the rate) into their local
shared-memory bucket, so Redis sees one command per batch, not per request. The bucket
also holds the cluster-wide 429 pause and the adaptive rate factor (ratelimit.py's AIMD
constants), so one node's 429 slows every node. It never sends and never sleeps itself.
"""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from .. import ratelimit
from ..ratelimit import CUT_SPACING, DECREASE, HOLD_AFTER_CUT, INCREASE_SHARE, MIN_RATE
from ..shm import Shared
from .store import RedisDown, Script, Store

LEASE_SECONDS = 0.05  # a lease is this much of the cluster rate (300 tokens at 6,000/s)
PAUSE_POLL = 0.1  # an idle feeder still looks for a cluster pause this often
IDLE_TTL_MS = 3_600_000  # a bucket nobody leases from for an hour goes away

# Shared by the scripts: the adaptive factor `f` (rate = limit * f) as of time `fa`, grown
# by INCREASE_SHARE of the limit per second once HOLD_AFTER_CUT has passed since `cut`.
_PRELUDE = f"""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local h = redis.call('HMGET', KEYS[1], 'tok', 'ts', 'pu', 'f', 'fa', 'cut')
local tok, ts, pu = tonumber(h[1]), tonumber(h[2]), tonumber(h[3]) or 0
local f, fa, cut = tonumber(h[4]) or 1, tonumber(h[5]) or now, tonumber(h[6]) or 0
local limit, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
if f < 1 then
  local from = math.max(fa, cut + {HOLD_AFTER_CUT})
  if now > from then f = math.min(1, f + {INCREASE_SHARE} * (now - from)) end
end
local rate = math.max({MIN_RATE}, limit * f)
if f < 1 then burst = math.max(1, rate / 20) end
if tok == nil or ts == nil then tok, ts = 0, now end
if limit > 0 then tok = math.min(burst, tok + math.max(0, now - ts) * rate) end
"""
_SAVE = f"""
redis.call('HSET', KEYS[1], 'tok', tostring(tok), 'ts', tostring(now), 'pu', tostring(pu),
           'f', tostring(f), 'fa', tostring(now), 'cut', tostring(cut))
redis.call('PEXPIRE', KEYS[1], {IDLE_TTL_MS})
"""

# ARGV: limit, burst, want. Grants `want` tokens in one command, even when the bucket
# holds fewer: the lease then reserves tokens still to come and tells the node to wait
# until they are there (`wait`). Reserving instead of refusing keeps it at one command
# per lease however many nodes compete; at most one second of the rate is reserved ahead.
_LEASE = Script(_PRELUDE + """
local want = tonumber(ARGV[3])
local granted, wait, paused = 0, 0, 0
if pu > now then
  wait, paused = pu - now, 1
elseif limit <= 0 then
  granted = want
else
  want = math.max(1, math.min(want, math.floor(burst)))
  local ahead = math.max(burst, rate)
  if tok - want >= -ahead then
    granted, tok = want, tok - want
    if tok < 0 then wait = -tok / rate end
  else
    wait = (want - ahead - tok) / rate
  end
end
""" + _SAVE + """
return {granted, tostring(wait), tostring(limit > 0 and rate or 0), paused, tostring(now),
        tostring(tok)}
""")

# ARGV: limit, burst. A 429: multiply the factor by DECREASE, at most once per CUT_SPACING.
_THROTTLE = Script(_PRELUDE + f"""
if limit <= 0 or now - cut < {CUT_SPACING} then return tostring(rate) end
f = math.max({MIN_RATE} / limit, f * {DECREASE})
cut = now
rate = math.max({MIN_RATE}, limit * f)
tok = math.min(tok, math.max(1, rate / 20))
""" + _SAVE + "return tostring(rate)")

# ARGV: limit, burst, seconds. Never shortens a longer pause; returns the pause left.
_PAUSE = Script(_PRELUDE + """
pu = math.max(pu, now + tonumber(ARGV[3]))
""" + _SAVE + "return tostring(pu - now)")

_PAUSE_LEFT = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local pu = tonumber(redis.call('HGET', KEYS[1], 'pu')) or 0
return tostring(math.max(0, pu - now))
""")


def endpoint_of(url: str) -> str:
    """host:port of a webhook URL (the budget is the receiver's, whatever the path)."""
    p = urlsplit(url)
    port = p.port or (443 if p.scheme == "https" else 80)
    host = p.hostname or ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Grant:
    """`granted` tokens, to be spent only `wait` seconds from now (0: at once). While
    paused: none, and `wait` is the pause left. None granted, not paused: too much is
    reserved ahead already, ask again after `wait`."""

    granted: int
    wait: float
    rate: float  # the cluster rate now (limit x adaptive factor); 0 = unlimited
    paused: bool  # a cluster-wide pause (429) is in force for `wait` more seconds
    now: float  # Redis TIME of the lease
    left: float  # tokens in the cluster bucket after it (< 0: reserved ahead)


class ClusterBucket:
    """The bucket of one endpoint. Every method may raise RedisDown: no budget."""

    def __init__(self, store: Store, endpoint: str, limit: float, burst: float) -> None:
        self.store = store
        self.key = store.key("bucket", endpoint)
        self.configure(limit, burst)

    def configure(self, limit: float, burst: float) -> None:
        """A reload's new [rate]: the next script call applies it (the bucket keeps its
        tokens, capped to the new burst)."""
        self.limit = float(limit)
        self.burst = float(burst)

    def lease_size(self) -> int:
        if self.limit <= 0:
            return ratelimit.MAX_BATCH
        return max(1, min(int(self.burst), math.ceil(self.limit * LEASE_SECONDS)))

    async def lease(self, want: int) -> Grant:
        r = await self.store.script(_LEASE, [self.key], [self.limit, self.burst, want])
        return Grant(int(r[0]), float(r[1]), float(r[2]), bool(r[3]), float(r[4]), float(r[5]))

    async def pause(self, seconds: float) -> float:
        """Every node holds its sends for `seconds` of Redis time; returns the pause left."""
        return float(await self.store.script(_PAUSE, [self.key], [self.limit, self.burst, seconds]))

    async def pause_left(self) -> float:
        return float(await self.store.script(_PAUSE_LEFT, [self.key], []))

    async def throttled(self) -> float:
        """The receiver answered 429 (rate.adaptive): cut the cluster rate; returns it."""
        return float(await self.store.script(_THROTTLE, [self.key], [self.limit, self.burst]))



# ---------------------------------------------------------------- into the local bucket


class TokenSink(Protocol):
    """Where leased tokens go: the node's local bucket, spent by its workers."""

    def level(self) -> float: ...
    def deposit(self, tokens: int, rate: float) -> None: ...
    def pause(self, seconds: float) -> None: ...


class SharedSink:
    """The node's shm bucket fed by leases instead of its clock. Needs ratelimit.take to
    honour a "leased" source (see the cluster todo note): until then TokenBudget would
    also refill it from the clock, and integration must not use it."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    def level(self) -> float:
        return self.shared.state.tokens

    def deposit(self, tokens: int, rate: float) -> None:
        st = self.shared.state
        with self.shared.lock:
            st.tokens += tokens
            st.rate = rate  # workers size their batches from it; status shows it
            st.stamp = time.monotonic()

    def pause(self, seconds: float) -> None:
        ratelimit.pause(self.shared, seconds)


class LeaseFeeder:
    """Keeps a node's local bucket topped up from the cluster bucket (one task per node,
    in the supervisor). Leases only when the local level is below half a lease, so an
    idle node costs Redis one pause poll per PAUSE_POLL; Redis down means no new tokens.
    A lease that reserves tokens ahead is deposited once they are due (node clocks only
    measure that interval: their offsets never matter)."""

    def __init__(self, bucket: ClusterBucket, sink: TokenSink) -> None:
        self.bucket = bucket
        self.sink = sink
        self.leases = 0
        self.leased = 0  # tokens leased since start
        self.rate = bucket.limit
        self._polled = 0.0

    async def step(self) -> float:
        """One look at the local level (and maybe one lease, deposited when due);
        returns how long to sleep before the next look."""
        size = self.bucket.lease_size()
        try:
            # Lease again as soon as the last lease is being spent: with a reservation
            # always in the queue, the cluster's grants never pause between two leases
            # (at half a lease, three nodes reached 97 % of the limit, not 100 %).
            if self.sink.level() >= size:
                now = time.monotonic()
                if now - self._polled >= PAUSE_POLL:
                    self._polled = now
                    left = await self.bucket.pause_left()
                    if left > 0:
                        self.sink.pause(left)
                return min(0.05, max(0.001, size / max(self.rate, 1.0) / 4))
            g = await self.bucket.lease(size)
        except RedisDown:
            return 0.1  # nothing leased, nothing sent; the store backs off by itself
        self._polled = time.monotonic()
        self.rate = g.rate or self.rate
        if g.paused:
            self.sink.pause(g.wait)
            return min(g.wait, 0.5)
        if not g.granted:
            return min(max(g.wait, 0.001), 0.5)
        if g.wait > 0:
            await asyncio.sleep(g.wait)
        self.leases += 1
        self.leased += g.granted
        self.sink.deposit(g.granted, g.rate)
        return 0.0
