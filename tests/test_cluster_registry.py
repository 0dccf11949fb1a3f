"""Job ids, the job registry, control and heartbeats against a real redis-server."""
from __future__ import annotations

import asyncio
import multiprocessing
import os

import pytest
from alertd.cluster.registry import ControlRefused, Registry, UnknownJob
from alertd.cluster.store import Store
from alertd.protocol import Counts


def _allocate(url: str, n: int, floor: int, go, out) -> None:
    async def run() -> tuple[int, list[str]]:
        store = Store(url)
        reg = Registry(store)
        go.wait(30)
        ids = [await reg.next_job_id(floor) for _ in range(n)]
        await store.close()
        return floor, ids
    out.put(asyncio.run(run()))


def test_job_ids_are_unique_across_concurrent_nodes_and_respect_the_floor(redis):
    ctx = multiprocessing.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    # Each node's state dir already holds ids up to its floor; the highest one wins.
    procs = [ctx.Process(target=_allocate, args=(redis.url, 100, floor, go, out))
             for floor in (41, 7, 0)]
    for p in procs:
        p.start()
    go.set()
    results = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    ids = [i for _, node in results for i in node]
    assert len(ids) == 300 and len(set(ids)) == 300
    assert all(len(i) == 7 and i.startswith("j") for i in ids)
    for floor, node in results:  # each node's ids lie above what its state dir had
        assert all(int(i[1:]) > floor for i in node), (floor, node[:3])
        assert [int(i[1:]) for i in node] == sorted(int(i[1:]) for i in node)  # monotonic

    async def later() -> None:
        store = Store(redis.url)
        reg = Registry(store)
        assert await reg.next_job_id(10_000) == "j010001"  # a node with more history
        assert await reg.next_job_id(0) == "j010002"  # never goes back down
        await store.close()
    asyncio.run(later())


def test_control_is_visible_to_every_node_through_one_counter(redis):
    async def run() -> None:
        sa, sb = Store(redis.url), Store(redis.url)
        a, b = Registry(sa), Registry(sb)
        await a.register("j000001", "big.csv", owner="host-a", rows=0)
        await a.register("j000002", "small.csv", owner="host-a", priority="low")
        v0 = await b.control_version()
        assert await b.controls() == {"j000001": ("queued", "normal"),
                                      "j000002": ("queued", "low")}
        v1 = await b.control("j000001", "pause")  # from another node than the owner
        assert v1 > v0 and await a.control_version() == v1
        assert (await a.controls())["j000001"] == ("paused", "normal")
        with pytest.raises(ControlRefused, match="j000001 is paused: cannot pause"):
            await a.control("j000001", "pause")
        await a.control("j000001", "resume")
        await a.control("j000002", "priority", "high")
        assert await b.controls() == {"j000001": ("running", "normal"),
                                      "j000002": ("queued", "high")}
        await a.control("j000002", "cancel")
        await a.finish("j000002", "cancelled", Counts(rows=5, delivered=2, cancelled=3))
        assert "j000002" not in await b.controls()
        with pytest.raises(ControlRefused, match="finished job"):
            await b.control("j000002", "resume")
        with pytest.raises(UnknownJob, match="no such job: j000404"):
            await b.control("j000404", "cancel")
        with pytest.raises(ValueError):
            await b.control("j000001", "priority", "urgent")
        job = await b.job("j000002")
        assert job["state"] == "cancelled" and job["delivered"] == "2" and job["owner"] == "host-a"
        await a.update("j000001", Counts(rows=10, delivered=10), planned="1024")
        assert [j["job"] for j in await b.jobs()] == ["j000001", "j000002"]
        assert (await b.job("j000001"))["planned"] == "1024"
        for s in (sa, sb):
            await s.close()
    asyncio.run(run())


def test_heartbeats_ages_by_redis_time_and_lapsed_nodes(redis):
    async def run() -> None:
        store = Store(redis.url)
        reg = Registry(store)
        ea, eb = await reg.boot("host-a"), await reg.boot("host-b")
        assert (ea, eb) == (1, 1) and await reg.boot("host-a") == 2
        await reg.heartbeat("host-a", os.getpid(), 2, 5999.5, 2, lease=0.3)
        await reg.heartbeat("host-b", 4242, 1, 10.0, 4, lease=0.3)
        nodes = await reg.nodes()
        assert [(n.name, n.pid, n.epoch, n.workers) for n in nodes] == \
            [("host-a", os.getpid(), 2, 2), ("host-b", 4242, 1, 4)]
        assert all(0 <= n.age < 0.2 for n in nodes) and nodes[0].rate == 5999.5
        assert await reg.lapsed(0.3) == []
        # host-b stops beating; host-a goes on.
        for _ in range(8):
            await asyncio.sleep(0.05)
            await reg.heartbeat("host-a", os.getpid(), 2, 6000, 2, lease=0.3)
        lapsed = await reg.lapsed(0.3)
        assert [n.name for n in lapsed] == ["host-b"] and lapsed[0].age > 0.3
        await reg.leave("host-a")
        assert [n.name for n in await reg.nodes()] == ["host-b"]
        await store.close()
    asyncio.run(run())
