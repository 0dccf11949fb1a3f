"""The planner role: one node of the cluster at a time claims files, plans every job with
the single-host Dispatcher (fair scheduling, priorities, lazy plans, control state),
publishes its chunks on the shared stream and turns the acks of every node back into
Dispatcher.ack, which finalises jobs as on one host.

The role is a Redis lock renewed every second with a time to live of `[cluster] lease`;
when its node dies another takes it over: the jobs are recovered from the shared spool
and every node's WAL as at a start, and chunks still on the stream (published, not yet
acked) are left there rather than published twice. The stream is kept short (a few
chunks per worker of the cluster), so the order in which nodes take chunks stays the
order the Dispatcher chose.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..protocol import Counts
from .descriptor import to_fields
from .queue import ChunkQueue
from .store import RedisDown

log = logging.getLogger("alertd.cluster")

ROLE = "*"  # the planner lock's name: one planner for the whole cluster
BACKLOG_PER_NODE = 8  # chunks on the stream per node: enough to keep every worker busy


class Planner:
    def __init__(self, queue: ChunkQueue, dispatch: Any, state_dir: Any, holder: str,
                 lease: float, nodes: Callable[[], int],
                 become: Callable[[set[tuple[str, int]]], Awaitable[None]]) -> None:
        self.queue = queue
        self.dispatch = dispatch  # the supervisor's Dispatcher: it plans and finalises
        self.state_dir = state_dir
        self.holder = holder
        self.lease = lease
        self._nodes = nodes
        self._become = become  # recover the jobs and start claiming files (supervisor)
        self.active = False
        self._kick = asyncio.Event()
        self._on_stream = 0  # published and not yet acked
        self._already: set[tuple[str, int]] = set()  # on the stream when the role was taken
        self._acked = "0-0"

    def kick(self) -> None:
        """A job was added or changed: look for chunks to publish."""
        self._kick.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Hold (or wait for) the role; while held, publish and take acks."""
        tasks: list[asyncio.Task[None]] = []
        store = self.queue.store
        while not stop.is_set():
            # For two leases after this node last failed to reach Redis (any of its calls),
            # leave the role to the node that had it: its lock expired during the outage,
            # and it renews as soon as it reaches Redis again.
            if not self.active and time.monotonic() - store.failed_at < 2 * self.lease:
                await asyncio.sleep(1.0)
                continue
            try:
                mine = await self.queue.claim_lock(ROLE, self.holder, int(self.lease * 1000))
            except RedisDown:
                await asyncio.sleep(0.5)
                continue
            if not mine and self.active:
                # Another node holds the role: a second planner would publish twice.
                raise RuntimeError("the planner role was taken over by another node while "
                                   "this one held it (Redis unreachable longer than the lease?)")
            if mine and not self.active:
                try:
                    await self._take_role()
                except RedisDown:
                    continue  # the lock is ours for a lease: try again
                tasks = [asyncio.get_running_loop().create_task(self._publish(stop)),
                         asyncio.get_running_loop().create_task(self._acks(stop))]
            # The planner renews every second; the others ask only once a lease, so after
            # Redis comes back the living planner, not a newcomer, gets its role back.
            await asyncio.sleep(1.0 if self.active else self.lease)
        for t in tasks:
            t.cancel()

    async def _take_role(self) -> None:
        entries = await self.queue.store.call("XRANGE", self.queue.key, "-", "+")
        self._already = {(f["job"], int(f["seq"])) for f in
                         (dict(zip(e[1][::2], e[1][1::2])) if isinstance(e[1], list) else e[1]
                          for e in entries or [])}
        self._on_stream = len(self._already)
        self._acked = await self.queue.acks_tail()
        log.info("cluster: %s is the planner (%d chunks already on the stream)", self.holder,
                 self._on_stream)
        self.active = True
        await self._become(self._already)

    async def _publish(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self._on_stream >= BACKLOG_PER_NODE * max(1, self._nodes()):
                await self._wait(0.05)
                continue
            c = self.dispatch.next_chunk()
            if c is None:
                await self._wait(0.2)
                continue
            if (c.job, c.seq) in self._already:  # published by the previous planner
                self._already.discard((c.job, c.seq))
                continue
            fields = to_fields(c, self.state_dir)
            while True:  # handed out by the Dispatcher: it must reach the stream
                try:
                    await self.queue.publish(fields)
                    break
                except RedisDown:
                    await asyncio.sleep(0.2)
            self._on_stream += 1

    async def _acks(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                recs = await self.queue.read_acks(self._acked, 256, block_ms=500)
            except RedisDown:
                await asyncio.sleep(0.2)
                continue
            for rid, f in recs:
                self._acked = rid
                self._on_stream = max(0, self._on_stream - 1)
                job, seq = f["job"], int(f["seq"])
                if "failed" in f:
                    self.dispatch.chunk_failed(job, seq, f["failed"])
                else:
                    self.dispatch.ack(job, seq, Counts(**{k: int(f[k]) for k in
                                                          Counts.__slots__ if k in f}))
            if recs:
                self.kick()

    async def _wait(self, timeout: float) -> None:
        self._kick.clear()
        try:
            await asyncio.wait_for(self._kick.wait(), timeout)
        except TimeoutError:
            pass
