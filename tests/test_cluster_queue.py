"""The chunk stream against a real redis-server: exactly-once acks, reclaim, fencing,
a lost group, and a Redis killed with -9 and restarted on its AOF."""
from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

from alertd.cluster.descriptor import from_fields, to_fields
from alertd.cluster.queue import ChunkQueue, Taken
from alertd.cluster.store import RedisDown, Store
from alertd.protocol import Chunk, CsvLayout


def _desc(i: int) -> dict[str, str]:
    return {"job": "j000001", "seq": str(i)}


async def _until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = await pred()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.02)


def test_three_consumers_ack_every_chunk_exactly_once(redis):
    async def run() -> None:
        stores = [Store(redis.url) for _ in range(4)]
        pub = ChunkQueue(stores[0], "planner")
        await pub.ensure_group()
        for i in range(90):
            await pub.publish(_desc(i))
        acked: dict[str, list[str]] = {}

        async def consume(q: ChunkQueue) -> None:
            deadline = time.monotonic() + 10
            while sum(map(len, acked.values())) < 90 and time.monotonic() < deadline:
                for t in await q.take(4, block_ms=50):
                    await asyncio.sleep(0.001)  # the chunk's work, then its fsync
                    assert await q.ack(t, {**t.fields, "node": q.node, "delivered": "1"})
                    acked.setdefault(q.node, []).append(t.fields["seq"])
        queues = [ChunkQueue(s, f"node-{k}") for k, s in enumerate(stores[1:])]
        tail = await pub.acks_tail()
        await asyncio.gather(*(consume(q) for q in queues))
        # The planner's feed: one ack record per chunk, naming the node that acked it.
        records: list[dict] = []
        while len(records) < 100:
            got = await pub.read_acks(tail, 50, block_ms=50)
            if not got:
                break
            tail = got[-1][0]
            records += [f for _, f in got]
        assert sorted(int(r["seq"]) for r in records) == list(range(90))
        assert {r["node"] for r in records} == set(acked)
        seqs = [s for node in acked.values() for s in node]
        assert sorted(seqs, key=int) == [str(i) for i in range(90)]  # each once
        assert len(acked) == 3  # all three took part
        assert await pub.backlog() == 0  # acked entries leave the stream
        assert redis.client().xpending(pub.key, "nodes")["pending"] == 0
        for s in stores:
            await s.close()
    asyncio.run(run())


def test_a_dead_nodes_chunks_are_reclaimed_and_it_is_fenced_out(redis):
    async def run() -> None:
        sa, sb, sc = Store(redis.url), Store(redis.url), Store(redis.url)
        a, b, c = ChunkQueue(sa, "a"), ChunkQueue(sb, "b"), ChunkQueue(sc, "c")
        await a.ensure_group()
        for i in range(6):
            await a.publish(_desc(i))
        held_a = await a.take(5)
        held_c = await c.take(1)
        assert len(held_a) == 5 and len(held_c) == 1 and held_a[0].epoch == 1
        assert await b.reclaim_from(["a", "c"], 400, 10) == []  # not idle long enough yet
        # c renews its claim while it works; a has died and renews nothing.
        got: list[Taken] = []

        async def b_reclaims() -> bool:
            assert await c.renew(held_c) == [True]
            got.extend(await b.reclaim_from(["a", "c"], 400, 10))
            return len(got) >= 5
        await _until(b_reclaims, 5, "b to reclaim a's entries")
        assert sorted(t.id for t in got) == sorted(t.id for t in held_a)  # not c's
        assert all(t.epoch == 2 and t.fields["job"] == "j000001" for t in got)
        for t in held_a:
            assert not await a.still_owner(t.id, "a", t.epoch)
            assert not await a.ack(t, {"job": "j000001"})  # cannot ack b's claim away
        assert await a.acks_tail() == "0-0"  # and recorded nothing
        assert await a.renew(held_a) == [False] * 5
        assert all([await b.still_owner(t.id, "b", t.epoch) for t in got])
        for t in got:
            assert await b.ack(t)
        assert await c.still_owner(held_c[0].id, "c", 1)
        assert await c.ack(held_c[0])
        assert await a.backlog() == 0
        for s in (sa, sb, sc):
            await s.close()
    asyncio.run(run())


def test_a_restarted_node_adopts_its_own_chunks_and_fences_its_old_run(redis):
    async def run() -> None:
        s1, s2 = Store(redis.url), Store(redis.url)
        old = ChunkQueue(s1, "a")
        await old.ensure_group()
        for i in range(3):
            await old.publish(_desc(i))
        before = await old.take(3)
        new = ChunkQueue(s2, "a")  # same node name, next process
        adopted = await new.adopt_own()
        assert sorted(t.id for t in adopted) == sorted(t.id for t in before)
        assert all(t.epoch == 2 for t in adopted)
        assert not any([await old.still_owner(t.id, "a", t.epoch) for t in before])
        assert all([await new.ack(t) for t in adopted])
        for s in (s1, s2):
            await s.close()
    asyncio.run(run())


def test_a_lost_group_is_recreated_not_looped_on(redis):
    async def run() -> None:
        s = Store(redis.url)
        q = ChunkQueue(s, "a")
        await q.ensure_group()
        await q.publish(_desc(0))
        assert len(await q.take(1)) == 1
        redis.client().flushall()  # a Redis that came back without the stream
        t = time.monotonic()
        assert await q.take(1, block_ms=100) == []
        assert time.monotonic() - t < 1.0
        assert [g["name"] for g in redis.client().xinfo_groups(q.key)] == ["nodes"]
        await q.publish(_desc(1))
        assert [x.fields["seq"] for x in await q.take(1)] == ["1"]
        # Redis killed and started again with its AOF gone: the same, through an ack.
        stale = Taken("1-0", {}, 1)
        redis.kill9()
        shutil.rmtree(Path(redis.dir) / "appendonlydir")
        redis.start()
        await _until(s.ping, 5, "the store to reconnect")
        assert await q.ack(stale) is False  # NOGROUP inside a script: recreated too
        assert await q.take(1) == []
        await s.close()
    asyncio.run(run())


def test_kill9_and_restart_on_the_aof_keeps_acks_and_pending(redis):
    async def run() -> None:
        s = Store(redis.url)
        a, b = ChunkQueue(s, "a"), ChunkQueue(s, "b")
        await a.ensure_group()
        for i in range(10):
            await a.publish(_desc(i))
        held = await a.take(10)
        for t in held[:4]:
            assert await a.ack(t)
        redis.kill9()
        try:
            await a.take(1)
            raise AssertionError("a take with Redis down must raise")
        except RedisDown as e:
            assert "redis unreachable at redis://127.0.0.1" in str(e)
        redis.start()
        await _until(s.ping, 5, "the store to reconnect")
        assert await a.backlog() == 6  # the acked four stayed acked (and deleted)
        assert redis.client().xpending(a.key, "nodes")["pending"] == 6
        assert all([await a.still_owner(t.id, "a", 1) for t in held[4:]])  # still a's
        assert not await a.still_owner(held[0].id, "a", 1)
        assert await b.take(10) == []  # nothing is delivered twice as new
        await s.close()
    asyncio.run(run())


def test_the_planner_lock_has_one_holder_until_it_lapses_or_is_released(redis):
    async def run() -> None:
        s = Store(redis.url)
        q = ChunkQueue(s, "a")
        assert await q.claim_lock("*", "a#1", 300)
        assert await q.claim_lock("*", "a#1", 300)  # renewed by its holder
        assert not await q.claim_lock("*", "b#1", 300)
        # a stalls past the lock's time to live: b takes the role.
        await _until(lambda: q.claim_lock("*", "b#1", 300), 3, "the planner lock to lapse")
        assert not await q.claim_lock("*", "a#1", 300)  # a finds out: it must not plan on
        await q.release_lock("*", "a#1")  # only its holder can release it
        assert not await q.claim_lock("*", "c#1", 300)
        await q.release_lock("*", "b#1")
        assert await q.claim_lock("*", "c#1", 300)
        await s.close()
    asyncio.run(run())


def test_chunk_descriptors_round_trip(tmp_path):
    layout = CsvLayout(b";", 4, 1, 2, 128, 4096, (("plan", 3), ("x", 0)), False)
    c = Chunk("j000042", str(tmp_path / "spool" / "j000042--a b.csv"), "a b.csv", 7, 100, 900,
              layout, 1796170000.123456)
    fields = to_fields(c, tmp_path)
    assert fields["path"] == "spool/j000042--a b.csv"
    assert all(isinstance(v, str) for v in fields.values())
    back = from_fields(fields, tmp_path)
    assert back == c
    other = from_fields(fields, Path("/mnt/alertd"))  # another node mounts it elsewhere
    assert other.path == "/mnt/alertd/spool/j000042--a b.csv"
