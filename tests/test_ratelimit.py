"""The shared token bucket, exercised from several real processes at once."""
from __future__ import annotations

import asyncio
import multiprocessing
import time

from alertd import ratelimit
from alertd.shm import Shared


def _spend(shared: Shared, seconds: float, out, ready, go) -> None:
    async def run() -> int:
        budget = ratelimit.TokenBudget(shared)
        n = 0
        ready.put(1)
        go.wait(30)  # all processes spend over the same window
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await budget.acquire()
            n += 1
        return n
    out.put(asyncio.run(run()))


def test_bucket_is_shared_across_processes():
    ctx = multiprocessing.get_context("spawn")
    shared = Shared.create(ctx)
    ratelimit.configure(shared, 1000, 50)
    out, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_spend, args=(shared, 2.0, out, ready, go)) for _ in range(3)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=30)  # every child is at the start line
    go.set()
    counts = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    total = sum(counts)
    # 2 s at 1000/s, plus at most a burst (filled while waiting) and the tokens parked
    # per process; the lower bound allows for a child that wakes from the start late.
    assert total <= 2000 + 50 + 3 * ratelimit.MAX_BATCH, counts
    assert total >= 1500, counts
    assert all(c > 200 for c in counts), counts  # nobody starves


def test_take_starts_empty_and_refills_at_the_rate():
    shared = Shared.create(multiprocessing.get_context("spawn"))
    ratelimit.configure(shared, 100, 10)
    granted, wait = ratelimit.take(shared, 5)
    assert granted == 0 and 0 < wait <= 0.011
    shared.state.stamp -= 0.05  # as if 50 ms had passed
    assert ratelimit.take(shared, 64)[0] == 5
    shared.state.stamp -= 10  # a long idle time refills only up to the burst
    assert ratelimit.take(shared, 64)[0] == 10


def test_unlimited_rate_grants_everything():
    shared = Shared.create(multiprocessing.get_context("spawn"))
    ratelimit.configure(shared, 0, 1)
    assert ratelimit.take(shared, 64) == (64, 0.0)


def test_pause_holds_everyone():
    shared = Shared.create(multiprocessing.get_context("spawn"))
    ratelimit.configure(shared, 0, 1)
    ratelimit.pause(shared, 0.5)
    granted, wait = ratelimit.take(shared, 1)
    assert granted == 0 and 0.4 < wait <= 0.5
    ratelimit.pause(shared, 0.1)  # a shorter pause never cuts a longer one
    assert ratelimit.take(shared, 1)[1] > 0.3


def test_a_pause_holds_tokens_already_parked_in_a_worker():
    shared = Shared.create(multiprocessing.get_context("spawn"))
    ratelimit.configure(shared, 100_000, 5000)
    shared.state.stamp -= 1.0  # a full bucket
    budget = ratelimit.TokenBudget(shared)

    async def run() -> tuple[int, float]:
        await budget.acquire()  # takes a batch: the rest stays parked here
        assert budget._local == ratelimit.MAX_BATCH - 1
        ratelimit.pause(shared, 0.5)  # another worker got a 429
        sent = sum(1 for _ in range(200) if budget.try_take())
        t0 = time.monotonic()
        await budget.acquire()
        return sent, time.monotonic() - t0
    sent, waited = asyncio.run(run())
    assert sent == 0
    assert 0.4 < waited < 1.0
    assert budget._local == ratelimit.MAX_BATCH - 2  # parked tokens are kept for afterwards


def test_a_pause_holds_an_unlimited_rate_too():
    shared = Shared.create(multiprocessing.get_context("spawn"))
    ratelimit.configure(shared, 0, 1)
    budget = ratelimit.TokenBudget(shared)
    assert budget.try_take()
    ratelimit.pause(shared, 0.3)
    assert not budget.try_take()
    t0 = time.monotonic()
    asyncio.run(budget.acquire())
    assert time.monotonic() - t0 > 0.25
    assert budget.try_take()
