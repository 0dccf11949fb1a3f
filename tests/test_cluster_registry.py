"""Node heartbeats against a real redis-server: ages by Redis TIME, lapsed nodes."""
from __future__ import annotations

import asyncio
import os

from alertd.cluster.registry import Registry
from alertd.cluster.store import Store


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
