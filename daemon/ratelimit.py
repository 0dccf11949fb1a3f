"""The shared rate budget: a token bucket over shm.SharedState.

Workers take tokens in small batches so the cross-process lock is taken a few
hundred times a second, not per request. A shared `pause_until` (set on 429
+ Retry-After) stops every worker at once. Never blocks the event loop.
"""
from __future__ import annotations

import asyncio
import math
import time

from .shm import Shared

# A batch is at most this many seconds' worth of the rate: small enough that
# tokens parked in one worker barely skew the shared rate.
BATCH_SECONDS = 0.005
MAX_BATCH = 64


LEASE_WAIT = 0.002  # leased: how long a worker waits for the next deposit


def configure(shared: Shared, limit: float, burst: float, leased: bool = False) -> None:
    """Apply a (new) rate; keeps the tokens already earned, capped to the new burst.
    `leased`: the tokens come only from deposits (a cluster's shared budget), never
    from this host's clock."""
    st = shared.state
    with shared.lock:
        now = time.monotonic()
        st.leased = int(leased and limit > 0)
        if st.leased:
            pass  # deposits already made stay: they were leased from the cluster
        elif st.stamp == 0.0:
            st.tokens = 0.0  # start empty: a fresh daemon must not open with a burst
        else:
            st.tokens = min(st.tokens, burst)
        st.stamp = now
        st.rate = float(limit)
        st.burst = float(burst)


def take(shared: Shared, want: int) -> tuple[int, float]:
    """Take up to `want` tokens now. Returns (granted, seconds to wait if none granted)."""
    st = shared.state
    with shared.lock:
        now = time.monotonic()
        if st.pause_until > now:
            return 0, st.pause_until - now
        if st.leased:
            if st.tokens >= 1.0:
                granted = min(want, int(st.tokens))
                st.tokens -= granted
                return granted, 0.0
            return 0, LEASE_WAIT
        rate = st.rate
        if rate <= 0.0:
            return want, 0.0
        tokens = min(st.burst, st.tokens + (now - st.stamp) * rate)
        st.stamp = now
        if tokens >= 1.0:
            granted = min(want, int(tokens))
            st.tokens = tokens - granted
            return granted, 0.0
        st.tokens = tokens
        return 0, (1.0 - tokens) / rate


def pause(shared: Shared, seconds: float) -> None:
    """Hold every worker for `seconds` (never shortens a longer pause)."""
    st = shared.state
    with shared.lock:
        st.pause_until = max(st.pause_until, time.monotonic() + seconds)


TIMER_RESOLUTION = 0.002  # seconds: below this, a pause's end is awaited turn by turn


class TokenBudget:
    """A worker's view of the shared bucket: `await acquire()` before each request.

    Tokens parked here are spent only outside a pause: a 429 stops every sender at
    once, including ones holding tokens they took before it.
    """

    def __init__(self, shared: Shared) -> None:
        self._shared = shared
        self._st = shared.state
        self._local = 0
        self._seen_over = 0.0  # a pause_until already seen in the past: no clock read needed
        self._resume: asyncio.Future[None] | None = None  # the lanes' shared wait for a pause

    def _batch(self) -> int:
        rate = self._st.rate
        if rate <= 0.0:
            return MAX_BATCH
        return max(1, min(MAX_BATCH, math.ceil(rate * BATCH_SECONDS)))

    def _paused(self) -> bool:
        until = self._st.pause_until
        if until == self._seen_over:  # the hot path: one shared read, no clock
            return False
        if until > time.monotonic():
            return True
        self._seen_over = until
        return False

    def try_take(self) -> bool:
        """A token without waiting: one parked here, or the rate is unlimited; never in a pause."""
        if self._paused():
            return False
        if self._local > 0:
            self._local -= 1
            return True
        return self._st.rate <= 0.0

    def give_back(self) -> None:
        """Return a token try_take just gave, unused (nothing to send after all)."""
        if self._st.rate > 0.0:
            self._local += 1

    async def acquire(self) -> None:
        while True:
            if self._paused():
                await self._pause_over()
                continue
            # Another lane may have parked tokens while this one slept: use them first,
            # and never overwrite parked tokens (that would lose them, and the rate).
            if self._local > 0:
                self._local -= 1
                return
            if self._st.rate <= 0.0:  # unlimited: skip the lock entirely
                return
            granted, wait = take(self._shared, self._batch())
            if granted:
                self._local += granted - 1
                return
            await asyncio.sleep(min(wait, 1.0))

    async def _pause_over(self) -> None:
        """Until the pause ends (or a second passes). Every lane waiting for it wakes in the
        same loop turn, so the requests they hold leave together: with a timer each, the
        first lanes' requests could be answered with a new 429 before a lane whose timer
        fired a millisecond later sent its own, and that one would wait a whole new pause."""
        left = self._st.pause_until - time.monotonic()
        if left < TIMER_RESOLUTION:
            # The loop's timers tick in milliseconds: a timer this short would fire up to a
            # tick late, after the other lanes' requests were answered (maybe with a new
            # 429). Look again at the next turn instead.
            await asyncio.sleep(0)
            return
        waiter = self._resume
        if waiter is None or waiter.done():
            loop = asyncio.get_running_loop()
            waiter = self._resume = loop.create_future()
            loop.call_later(min(left, 1.0), lambda: waiter.done() or waiter.set_result(None))
        await asyncio.shield(waiter)  # a lane cancelled while waiting leaves it to the others

    def drop_local(self) -> None:
        """Forget parked tokens (after a rate change) so the new rate applies at once."""
        self._local = 0


# ---------------------------------------------------------------- adaptive rate (AIMD)

DECREASE = 0.7  # a 429 multiplies the shared rate by this...
CUT_SPACING = 1.0  # ...at most once per this many seconds (one burst of 429s = one cut)
HOLD_AFTER_CUT = 2.0  # no increase this soon after a cut
INCREASE_SHARE = 0.02  # each second without a cut adds this share of the limit
MIN_RATE = 1.0


def throttled(shared: Shared) -> None:
    """The receiver answered 429: cut the rate every worker shares."""
    st = shared.state
    with shared.lock:
        now = time.monotonic()
        if now - st.adapt_at < CUT_SPACING:
            return
        base = st.rate if st.rate > 0 else st.observed_rate
        if base <= 0:
            return
        st.rate = max(MIN_RATE, base * DECREASE)
        st.burst = max(1.0, st.rate / 20.0)
        st.tokens = min(st.tokens, st.burst)
        st.adapt_at = now


def recover_rate(shared: Shared, limit: float, burst: float) -> None:
    """Once a second (supervisor): additive increase back toward the configured limit."""
    st = shared.state
    with shared.lock:
        now = time.monotonic()
        if st.adapt_at == 0.0 or st.rate <= 0 or now - st.adapt_at < HOLD_AFTER_CUT:
            return
        if limit > 0 and st.rate >= limit:
            return
        rate = st.rate + max(MIN_RATE, INCREASE_SHARE * (limit if limit > 0 else st.rate))
        st.rate = min(rate, limit) if limit > 0 else rate
        st.burst = burst if st.rate == limit else max(1.0, st.rate / 20.0)
