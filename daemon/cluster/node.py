"""One node of a cluster, as the supervisor sees it: the chunk source of its workers.

Every node takes chunks from the shared stream into a small local buffer and hands them
to its workers through the same calls the single-host Dispatcher answers (next_chunk,
ack, chunk_failed, requeue). One node at a time also plans (planner.py). This node's
claims are renewed while it lives; a node that stops renewing has its chunks reclaimed
here, with the rows its WAL (on the shared storage) already settled skipped. Redis down
means no tokens, no new chunks and acks that wait: nothing is sent that cannot be
accounted for, and everything resumes by itself.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from .. import wal
from ..breaker import REASON_FAILURES, Breaker
from ..config import Config
from ..jobs import partial_counts
from ..protocol import Chunk, Counts
from ..shm import Shared
from .bucket import ClusterBucket, LeaseFeeder, SharedSink, endpoint_of
from .descriptor import from_fields
from .fingerprint import check_fingerprint, cluster_config_fingerprint
from .planner import ROLE
from .queue import ChunkQueue, Taken
from .registry import NodeInfo, Registry
from .relay import Relay
from .store import RedisDown, Store

log = logging.getLogger("alertd.cluster")

TICK = 0.5  # seconds between looks at renewals, reclaims, heartbeats and the planner lock
FENCE_AFTER = 0.8  # x lease: a claim not confirmed for this long is fenced here
WATCH = 0.25  # seconds between looks for such claims
BREAKER_POLL = 1.0  # seconds between looks at the cluster's breaker key
BREAKER_TTL = 2.0  # the key outlives its node's open breaker by this much


class ClusterNode:
    def __init__(self, cfg: Config, shared: Shared, want: Callable[[], int],
                 wake: Callable[[], None]) -> None:
        c = cfg.cluster
        self.cfg = cfg
        self.node = c.node
        self.lease = c.lease
        self.state_dir = cfg.state_dir
        self.store = Store(c.redis, timeout=1.0)
        self.queue = ChunkQueue(self.store, self.node)
        self.registry = Registry(self.store)
        self.relay = Relay(self.store, self.lease)
        # Pause, resume or cancel announced by the planner: the supervisor tells its workers.
        self.on_control: Callable[[str, str], None] = lambda job, action: None
        self.planning: Callable[[], bool] = lambda: False
        self.shared = shared
        self.bucket: ClusterBucket | None = None
        self.feeder: LeaseFeeder | None = None
        if cfg.rate.limit > 0:
            self.bucket = ClusterBucket(self.store, endpoint_of(cfg.webhook.url),
                                        cfg.rate.limit, cfg.rate.effective_burst)
            self.feeder = LeaseFeeder(self.bucket, SharedSink(shared))
        self._want = want  # chunks the workers can take now (PREFETCH x ready workers)
        self._wake = wake  # the supervisor hands chunks out (its _pump)
        self._buffer: deque[tuple[Taken, Chunk]] = deque()
        self._held: dict[tuple[str, int], Taken] = {}
        # Entry id -> time.monotonic() a request that confirmed this node's claim was sent
        # (the take, or the last renewal that found it ours). Past FENCE_AFTER x lease, the
        # claim may be another node's soon: fenced here before it can be.
        self._since: dict[str, float] = {}
        self._fenced_out = False  # claims fenced locally: take back those still ours
        # The supervisor tells the worker holding (job, seq) under claim `claim` to stop.
        self.on_fence: Callable[[str, int, int], None] = lambda job, seq, claim: None
        self._more = asyncio.Event()
        self.stop = asyncio.Event()
        self.draining = False  # stopping: take no new chunk (the others get what is left)
        self.epoch = 0
        self.nodes: list[NodeInfo] = []
        self.fenced = 0  # chunks whose claim lapsed before their ack: the rows are another's
        self._grace_until = 0.0  # no reclaim before (monotonic): Redis just came back
        self._pause_seen = 0.0
        self._cut_seen = 0.0
        self._tasks: list[asyncio.Task[Any]] = []

    # ------------------------------------------------------------ lifecycle

    async def join(self) -> None:
        """Check this node's [rate]/[webhook] against the cluster's (ConfigMismatch: a
        ConfigError, exit 2) and announce it. Redis down: keep starting; the loops retry."""
        try:
            await check_fingerprint(self.store, cluster_config_fingerprint(self.cfg), self.node)
            self.epoch = await self.registry.boot(self.node)
            await self.queue.ensure_group()
            # What this node's previous run held (killed before its acks): taken back at
            # once, with a new claim that fences the old run out.
            for t in await self.queue.adopt_own():
                await self._take(t, from_fields(t.fields, self.state_dir), settled=True)
        except RedisDown as e:
            log.error("cluster: %s; sending nothing until it answers", e)

    def start(self, spawn: Callable[[Any, str], None]) -> None:
        spawn(self._consume(), "cluster chunks")
        spawn(self._upkeep(), "cluster upkeep")
        spawn(self._renew(), "cluster renewals")
        spawn(self._controls(), "cluster control")
        spawn(self._watch(), "cluster fencing")
        if self.feeder is not None:
            spawn(self._feed(), "cluster budget")
        spawn(self._breaker(), "cluster breaker")

    async def leave(self, planner: str | None = None) -> None:
        """A clean stop: out of the node list at once, and the planner role (`planner`,
        its holder) free for another node without waiting out the lease."""
        if self._tasks:  # acks of chunks finished while draining: their outcomes are fsynced
            await asyncio.wait(list(self._tasks), timeout=5.0)
        self.stop.set()
        try:
            await self.registry.leave(self.node)
            if planner is not None:
                await self.queue.release_lock(ROLE, planner)
        except RedisDown:
            pass
        await self.store.close()

    @property
    def up(self) -> bool:
        return self.store.up

    @property
    def error(self) -> str | None:
        return None if self.store.up else self.store.error

    # ------------------------------------------------------------ the chunk source

    def next_chunk(self) -> Chunk | None:
        if not self._buffer:
            self._more.set()
            return None
        taken, chunk = self._buffer.popleft()
        self._held[(chunk.job, chunk.seq)] = taken
        if len(self._buffer) < self._want():
            self._more.set()
        return chunk

    def ack(self, job: str, seq: int, counts: Counts) -> None:
        """A worker's ChunkAck: the chunk's outcomes are fsynced in this node's WAL."""
        taken = self._held.pop((job, seq), None)
        if taken is not None:
            self._since.pop(taken.id, None)
            self._later(self._ack(taken, {"job": job, "seq": str(seq), "node": self.node,
                                          **{k: str(v) for k, v in counts.as_dict().items()}}))

    def chunk_failed(self, job: str, seq: int, reason: str) -> None:
        taken = self._held.pop((job, seq), None)
        if taken is not None:
            self._since.pop(taken.id, None)
            self._later(self._ack(taken, {"job": job, "seq": str(seq), "node": self.node,
                                          "failed": reason}))

    async def requeue(self, chunks: Iterable[Chunk]) -> None:
        """A local worker died holding `chunks`: they stay this node's (the claims are
        renewed), re-run here without the rows its WAL already settled."""
        for chunk in chunks:
            taken = self._held.pop((chunk.job, chunk.seq), None)
            if taken is not None:
                await self._take(taken, chunk, settled=True)
        self._wake()

    def _later(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(t)
        t.add_done_callback(self._tasks.remove)

    async def _ack(self, taken: Taken, record: dict[str, str]) -> None:
        while True:
            try:
                ok = await self.queue.ack(taken, record)
                break
            except RedisDown:
                await asyncio.sleep(0.2)  # the WAL has the outcomes: the ack can wait
        if not ok:
            self.fenced += 1
            log.warning("cluster: the claim of %s chunk %s lapsed before its ack; another "
                        "node has it now", record["job"], record["seq"])

    # ------------------------------------------------------------ loops

    async def _consume(self) -> None:
        while not self.stop.is_set():
            room = 0 if self.draining else self._want() - len(self._buffer)
            if room <= 0:
                self._more.clear()
                try:
                    await asyncio.wait_for(self._more.wait(), 0.5)
                except TimeoutError:
                    pass
                continue
            sent = time.monotonic()
            try:
                got = await self.queue.take(room, block_ms=500)
            except RedisDown:
                await asyncio.sleep(0.2)
                continue
            for t in got:
                self._since[t.id] = sent
                await self._take(t, from_fields(t.fields, self.state_dir))
            if got:
                self._wake()

    async def _take(self, taken: Taken, chunk: Chunk, settled: bool = False) -> None:
        """Buffer a chunk; one delivered before (reclaimed, adopted, re-run: `settled` or a
        later claim) first learns from the WALs which of its rows are settled, or is
        acked at once if all are."""
        chunk = dataclasses.replace(chunk, claim=taken.epoch)
        self._since.setdefault(taken.id, time.monotonic())
        if settled or taken.epoch > 1:
            loop = asyncio.get_running_loop()
            rec = (await loop.run_in_executor(None, wal.recover, self.state_dir / "wal",
                                              [chunk.job])).get(chunk.job)
            if rec is not None and chunk.seq in rec.chunks:
                self._held[(chunk.job, chunk.seq)] = taken
                self.ack(chunk.job, chunk.seq, rec.chunks[chunk.seq])
                return
            if rec is not None and chunk.seq in rec.partial:
                done, prior = partial_counts(rec.partial[chunk.seq])
                chunk = dataclasses.replace(chunk, done=done, prior=prior)
        self._buffer.append((taken, chunk))

    async def _renew(self) -> None:
        """Every lease/6 (at least 0.5 s): renew the claims this node holds or buffers, so
        a long chunk is never taken from a live node, and learn of those it lost."""
        every = max(0.5, self.lease / 6)
        while not self.stop.is_set():
            await asyncio.sleep(every)
            try:
                mine = list(self._held.values()) + [t for t, _ in self._buffer]
                sent = time.monotonic()
                lost = []
                for t, ok in zip(mine, await self.queue.renew(mine)):
                    if ok:
                        self._since[t.id] = sent
                    else:
                        lost.append(t.id)
                if lost:  # taken over while this node was cut off
                    log.warning("cluster: %d chunks held here were taken over by another node",
                                len(lost))
                    self._fence(set(lost))
                if self._fenced_out:  # what it fenced but Redis still says is its own
                    keep = [t.id for t in self._held.values()] + [t.id for t, _ in self._buffer]
                    back = await self.queue.adopt_own(keep=keep)
                    self._fenced_out = False  # only once Redis answered
                    for t in back:
                        await self._take(t, from_fields(t.fields, self.state_dir), settled=True)
                    if back:
                        log.info("cluster: took back %d chunks still this node's", len(back))
                        self._wake()
            except RedisDown as e:
                log.debug("cluster renew: %s", e)

    async def _upkeep(self) -> None:
        every = max(1.0, self.lease / 3)
        last = 0.0
        while not self.stop.is_set():
            await asyncio.sleep(TICK)
            now = time.monotonic()
            if now - last < every:
                continue
            last = now
            try:
                if not self.epoch:
                    await self.join()
                # Reclaim only from a node whose heartbeat lapsed, and never in the first
                # lease after Redis came back: every entry and heartbeat looks idle then,
                # though their nodes are alive and about to renew them.
                alive = {n.name for n in self.nodes if n.age <= self.lease}
                lapsed = [] if now < self._grace_until else [
                    c for c, pending in (await self.queue.consumers()).items()
                    if pending and c not in alive and c != self.node]
                got = await self.queue.reclaim_from(lapsed, int(self.lease * 1000), 64)
                for t in got:
                    log.warning("cluster: took over %s chunk %s from a node that stopped "
                                "renewing it", t.fields.get("job"), t.fields.get("seq"))
                    await self._take(t, from_fields(t.fields, self.state_dir))
                if got:
                    self._wake()
                rate = self.shared.state.observed_rate  # requests/s over the last second
                await self.registry.heartbeat(self.node, os.getpid(), self.epoch, rate,
                                              self.cfg.workers.count, self.lease)
                self.nodes = await self.registry.nodes()
                if not self.planning():
                    await self.relay.fetch_listing()
            except RedisDown as e:
                log.debug("cluster upkeep: %s", e)
                self._grace_until = time.monotonic() + self.lease + every

    async def _watch(self) -> None:
        """Fence every claim not confirmed for FENCE_AFTER x lease: by then another node
        may take it over (it needs `lease` of idle time by Redis's clock, counted from a
        renewal Redis ran after it was sent), so this node writes nothing more for it."""
        while not self.stop.is_set():
            await asyncio.sleep(WATCH)
            limit = time.monotonic() - FENCE_AFTER * self.lease
            old = {i for i, t in self._since.items() if t < limit}
            if old:
                log.warning("cluster: no renewal confirmed for %.1f s (Redis unreachable?): "
                            "fencing %d claims", FENCE_AFTER * self.lease, len(old))
                self._fence(old)

    def _fence(self, ids: set[str]) -> None:
        """Stop working on these claims: the workers drop their chunks unrecorded; the
        buffered ones go. Whatever is still this node's is claimed anew later."""
        for key, t in list(self._held.items()):
            if t.id in ids:
                del self._held[key]
                self.on_fence(key[0], key[1], t.epoch)
        self._buffer = deque((t, c) for t, c in self._buffer if t.id not in ids)
        for i in ids:
            self._since.pop(i, None)
        self._fenced_out = True

    async def _controls(self) -> None:
        """Twice a second: job control announced by the planner reaches this node's
        workers (pause and cancel hold rows of chunks already taken here)."""
        while not self.stop.is_set():
            await asyncio.sleep(TICK)
            try:
                changes = await self.relay.changes()
            except RedisDown:
                continue
            if not self.planning():  # the planner told its own workers when it applied it
                for job, action in changes:
                    self.on_control(job, action)

    async def _breaker(self) -> None:
        """The circuit breaker, cluster-wide: a node whose breaker opened on its own
        failures keeps a Redis key alive; the others open theirs while it lives (they then
        send only their own probes, and close on the first that succeeds)."""
        br, key = Breaker(self.shared), self.store.key("breaker")
        tripped = False  # opened here because another node's breaker is open
        while not self.stop.is_set():
            await asyncio.sleep(BREAKER_POLL)
            try:
                if br.is_open and not tripped:
                    await self.store.call("SET", key, self.node, "PX", int(BREAKER_TTL * 1000))
                elif not br.is_open:
                    tripped = False
                    holder = await self.store.call("GET", key)
                    if holder and holder != self.node and br.trip(REASON_FAILURES):
                        tripped = True
                        log.warning("cluster: breaker opened here too: node %s cannot reach "
                                    "the endpoint (only probes go out until one succeeds)",
                                    holder)
            except RedisDown:
                pass

    async def _feed(self) -> None:
        """Leases into the local bucket; a local 429 pause or adaptive cut goes cluster-wide."""
        assert self.feeder is not None and self.bucket is not None
        st = self.shared.state
        while not self.stop.is_set():
            try:
                now = time.monotonic()
                if st.pause_until > now and st.pause_until != self._pause_seen:
                    self._pause_seen = st.pause_until
                    await self.bucket.pause(st.pause_until - now)
                if st.adapt_at and st.adapt_at != self._cut_seen:
                    self._cut_seen = st.adapt_at
                    await self.bucket.throttled()
            except RedisDown:
                pass
            delay = await self.feeder.step()
            if delay > 0:
                await asyncio.sleep(min(delay, 0.05))

    def describe(self) -> dict[str, Any]:
        return {"node": self.node, "redis": "up" if self.store.up else "unreachable",
                "error": self.error, "epoch": self.epoch, "commands": self.store.commands,
                "fenced": self.fenced, "buffered": len(self._buffer), "held": len(self._held),
                "lease": self.lease, "nodes": [dataclasses.asdict(n) for n in self.nodes],
                "jobs": [] if self.planning() else self.relay.listing}
