"""The cluster rate budget against a real redis-server: several nodes, one limit."""
from __future__ import annotations

import asyncio
import multiprocessing
import time

import pytest
from alertd import ratelimit
from alertd.cluster.bucket import ClusterBucket, LeaseFeeder, SharedSink, endpoint_of
from alertd.cluster.store import Store
from alertd.shm import Shared

EP = "127.0.0.1:9000"


class Spender:
    """A sink whose workers spend every token the moment it lands (a node at full load)."""

    def __init__(self) -> None:
        self.due: list[tuple[float, int]] = []  # (monotonic, tokens) per deposit
        self.paused = 0.0

    def level(self) -> float:
        return 0.0

    def deposit(self, tokens: int, rate: float) -> None:
        self.due.append((time.monotonic(), tokens))

    def pause(self, seconds: float) -> None:
        self.paused = max(self.paused, seconds)


def _node(url: str, seconds: float, ready, go, out) -> None:
    async def run() -> tuple[list[tuple[float, int]], int]:
        store = Store(url)
        bucket = ClusterBucket(store, EP, 6000, 300)
        grants: list[tuple[float, int]] = []  # (Redis time the tokens are due, tokens)
        lease = bucket.lease

        async def recording(want: int):
            g = await lease(want)
            if g.granted:
                grants.append((g.now + g.wait, g.granted))
            return g
        bucket.lease = recording  # type: ignore[method-assign]
        feeder = LeaseFeeder(bucket, Spender())
        await store.ping()
        ready.put(1)
        go.wait(30)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            delay = await feeder.step()
            if delay:
                await asyncio.sleep(delay)
        await store.close()
        return grants, store.commands
    out.put(asyncio.run(run()))


def test_three_nodes_share_one_limit_with_few_commands(redis):
    ctx = multiprocessing.get_context("spawn")
    ready, go, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_node, args=(redis.url, 3.0, ready, go, out)) for _ in range(3)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=30)
    client = redis.client()
    client.config_resetstat()
    go.set()
    results = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    per_node = [grants for grants, _ in results]
    sent = sum(n for _, n in results) - len(procs)  # each node's ping before the start line
    # What went over the wire, as Redis counted it (commands a script runs inside Redis
    # are not round trips: the scripts' own TIME, HMGET, HSET, PEXPIRE are left out).
    stats = client.info("commandstats")
    calls = sum(stats.get(k, {}).get("calls", 0) for k in ("cmdstat_evalsha", "cmdstat_eval"))
    assert calls == sent  # the store counts what it sends
    grants = sorted(g for node in per_node for g in node)
    tokens = sum(n for _, n in grants)
    # Steady part: from 0.5 s after the first lease. At a grant's due time the bucket has
    # paid out exactly the tokens of every grant due by then, so the rate between two due
    # times is exact, unless nodes left the bucket full (it would then cap at the burst).
    t0 = grants[0][0]
    steady = [(t, n) for t, n in grants if t >= t0 + 0.5]
    span = steady[-1][0] - steady[0][0]
    rate = sum(n for _, n in steady[1:]) / span
    assert span > 1.5
    assert abs(rate - 6000) <= 60, f"cluster rate {rate:.1f}/s"
    shares = [sum(n for _, n in node) / tokens for node in per_node]
    assert min(shares) > 0.2, shares  # no node starved
    assert calls * 1000 / tokens <= 10, f"{calls} commands for {tokens} tokens"
    print(f"cluster rate {rate:.1f}/s over {span:.2f} s, shares {shares}, "
          f"{calls * 1000 / tokens:.2f} commands per 1000 tokens")


def test_pause_is_seen_by_every_node_in_redis_time(redis, monkeypatch):
    async def run() -> None:
        stores = [Store(redis.url) for _ in range(3)]
        buckets = [ClusterBucket(s, EP, 1000, 50) for s in stores]
        sinks = [Spender() for _ in stores]
        feeders = [LeaseFeeder(b, s) for b, s in zip(buckets, sinks)]
        assert (await buckets[0].lease(10)).granted == 10
        # Every node's wall clock an hour off: nothing changes, the scripts read TIME.
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 3600)
        assert await buckets[1].pause(0.6) == pytest.approx(0.6, abs=0.01)
        redis_now = await stores[0].time()
        for f, sink in zip(feeders, sinks):
            await f.step()
            assert 0.5 < sink.paused <= 0.6
        g = await buckets[2].lease(10)
        assert g.paused and g.granted == 0
        assert abs(g.now + g.wait - (redis_now + 0.6)) < 0.05
        assert abs(g.now - real()) < 1.0 and abs(g.now - time.time()) > 3000
        assert await buckets[0].pause(0.1) > 0.4  # a shorter pause never shortens it
        await asyncio.sleep(g.wait + 0.02)
        assert (await buckets[2].lease(10)).granted == 10
        for s in stores:
            await s.close()
    asyncio.run(run())


def test_adaptive_cut_is_shared_once_per_second_and_recovers(redis):
    async def run() -> None:
        a, b = Store(redis.url), Store(redis.url)
        ba, bb = ClusterBucket(a, EP, 1000, 50), ClusterBucket(b, EP, 1000, 50)
        await ba.lease(1)
        assert await ba.throttled() == pytest.approx(700)
        assert await bb.throttled() == pytest.approx(700)  # the same burst of 429s: one cut
        assert (await bb.lease(1)).rate == pytest.approx(700)
        # Back-date the last cut: 5 s of growth after the 2 s hold at 2 % of the limit/s.
        key = ba.key
        now = await a.time()
        redis.client().hset(key, mapping={"cut": now - 7, "fa": now - 7, "f": 0.5})
        assert (await bb.lease(1)).rate == pytest.approx(600, abs=2)
        for s in (a, b):
            await s.close()
    asyncio.run(run())


def test_unlimited_grants_all_but_still_pauses(redis):
    async def run() -> None:
        s = Store(redis.url)
        b = ClusterBucket(s, EP, 0, 0)
        assert (await b.lease(64)).granted == 64
        await b.pause(0.5)
        g = await b.lease(64)
        assert g.granted == 0 and g.paused
        await s.close()
    asyncio.run(run())


def test_feeder_fills_the_local_shared_bucket_and_stops_without_redis(redis):
    ctx = multiprocessing.get_context("spawn")
    shared = Shared.create(ctx)
    ratelimit.configure(shared, 1000, 50)

    async def run() -> None:
        s = Store(redis.url)
        feeder = LeaseFeeder(ClusterBucket(s, EP, 1000, 50), SharedSink(shared))
        while feeder.leased < 20:
            await asyncio.sleep(await feeder.step())
        assert shared.state.tokens >= 20 and shared.state.rate == 1000
        shared.state.tokens = 0.0
        redis.kill9()
        t = time.monotonic()
        assert await feeder.step() == 0.1  # Redis down: no tokens, a short sleep
        assert time.monotonic() - t < 1.5 and shared.state.tokens == 0.0
        await s.close()
    asyncio.run(run())


def test_endpoint_names_the_receiver():
    assert endpoint_of("https://hooks.example.com/a?b=1") == "hooks.example.com:443"
    assert endpoint_of("http://127.0.0.1:9000/hook") == "127.0.0.1:9000"
    assert endpoint_of("http://[::1]/x") == "[::1]:80"
