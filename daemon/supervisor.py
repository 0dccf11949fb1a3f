"""The supervisor: the process arbiter. Claims files, spawns, reaps and respawns workers,
reloads, drains, talks to systemd.

One process on uvloop. It hands workers the chunk descriptors dispatch.py chooses, over
pipes (at most PREFETCH each), so it always knows which chunks a dead worker held; it never
touches payloads.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from . import config as config_mod
from . import ratelimit, replay, signals, systemd, wal, worker
from .breaker import Breaker
from .claims import Claims
from .cluster.node import ClusterNode
from .cluster.planner import Planner
from .cluster.store import RedisDown
from .config import Config
from .dispatch import Dispatcher, NoSuchJob, NotAllowed
from .errors import EXIT_FAILURE, EXIT_OK, ConfigError
from .intake import Intake
from .jobs import Job, JobStore
from .jobsapi import listing, view
from .protocol import (
    JOB_ACTIONS,
    Chunk,
    ChunkAck,
    ChunkFailed,
    Counts,
    Drain,
    Fence,
    JobControl,
    Progress,
    Ready,
    Reload,
)
from .retention import Retention
from .shm import MAX_WORKERS, Shared
from .signals import Control
from .status import StatusServer
from .watcher import InboxWatcher

log = logging.getLogger("alertd.supervisor")

PREFETCH = 2  # chunks handed to a worker ahead of its acks: one working, one waiting
# ...or more while they are tiny (one host): many small files' chunks wait for their
# acks at once, so one WAL commit covers many of them. Kept to a few thousand rows: a
# worker works its chunks in order, so what it holds is what a job dropped now (a small
# or a high-priority one) waits behind.
PREFETCH_BYTES = 32 << 10  # bytes of chunks a worker may hold beyond PREFETCH chunks
PREFETCH_MAX = 64  # chunks a worker holds at most, however small
RESPAWN_DELAY = 1.0  # a worker that died young waits this long before its successor starts
HUNG_AFTER = 30.0  # seconds without a heartbeat (it ticks ten times a second) = stuck
SETTLE_TIMEOUT = 10.0  # seconds a stopping supervisor waits for summaries being written


@dataclass
class WorkerHandle:
    index: int
    proc: Any  # multiprocessing.Process
    conn: Connection
    started: float
    generation: int
    chunks: dict[tuple[str, int], Chunk] = field(default_factory=dict)
    ready: bool = False
    retiring: bool = False
    # Its latest Progress: per job, outcomes final in chunks not yet acked (not durable).
    progress: dict[str, Counts] = field(default_factory=dict)


class Supervisor:
    def __init__(self, cfg: Config, log_level: int = logging.INFO) -> None:
        self.cfg = cfg
        self.log_level = log_level
        self.ctx = multiprocessing.get_context("spawn")
        self.shared = Shared.create(self.ctx)
        self.store = JobStore(cfg.state_dir, keep_sources=cfg.retention.done_files > 0)
        self.dispatch = Dispatcher(cfg.state_dir, self.store)
        self.workers: dict[int, WorkerHandle] = {}
        self.generation = 0
        self.draining = False
        self.controls: asyncio.Queue[Control] = asyncio.Queue()
        self.last_reload: dict[str, Any] = {"ok": None, "at": None, "error": None}
        self.reload_counts = {"succeeded": 0, "failed": 0}  # for /metrics
        self.started_at = time.time()
        self._stopped = asyncio.Event()
        self._watcher: InboxWatcher | None = None
        self._status: StatusServer | None = None
        self._retention = Retention(cfg.state_dir)
        self._claims = Claims(self.store, lambda: self.cfg, self._on_job)
        self._tasks: list[asyncio.Task[None]] = []
        self._exit_code = EXIT_OK
        self._control_lock = asyncio.Lock()  # one job control at a time: check, persist, apply
        # Where workers' chunks come from: the Dispatcher on one host; in a cluster, the
        # shared stream (cluster/node.py), which the planner node fills from its Dispatcher.
        self.source: Any = self.dispatch
        self.node: ClusterNode | None = None
        self.planner: Planner | None = None

    # ------------------------------------------------------------ main loop

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        inbox = cfg.paths.inbox_dir  # made (or refused) by statedir.prepare
        # The listener first: if its address is taken the start is refused (ConfigError)
        # before a worker, a claim or a WAL exists, so nothing is left to clean up.
        intake = Intake(lambda: self.cfg, lambda: len(self.dispatch.jobs), self._claims.claim,
                        self._refusing_files)
        self._status = StatusServer(cfg, self.snapshot, intake)
        self._status.jobs = self
        await self._status.start()
        cluster = bool(cfg.cluster.redis)
        ratelimit.configure(self.shared, cfg.rate.limit, cfg.rate.effective_burst,
                            leased=cluster)
        if cluster:
            self.node = node = ClusterNode(cfg, self.shared, self._room, self._pump)
            await node.join()  # a [rate] or [webhook] unlike the cluster's: ConfigError
            self.source = node
            self.planner = Planner(node.queue, self.dispatch, cfg.state_dir,
                                   f"{cfg.cluster.node}:{node.epoch}", cfg.cluster.lease,
                                   lambda: len(node.nodes), self._plan)
            node.on_control = self._tell_workers
            node.on_fence = self._fence_chunk
            node.planning = lambda: bool(self.planner and self.planner.active)
        else:
            await self._plan(set())
        signals.install(loop, self.controls)
        for _ in range(cfg.workers.count):
            self._spawn()
        if self.node is not None and self.planner is not None:
            self.node.start(self._background)
            self._background(self.planner.run(self.node.stop), "cluster planner")
        await self._wait_ready()
        systemd.notify("READY=1", f"STATUS=watching {inbox}")
        log.info("alertd ready: %d workers, watching %s", cfg.workers.count, inbox)
        self._background(self._tick(), "housekeeping")
        while not self._stopped.is_set():
            get = loop.create_task(self.controls.get())
            stop = loop.create_task(self._stopped.wait())
            done, _ = await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if get in done:
                self._control(get.result())
            else:
                get.cancel()
        for t in self._tasks:
            t.cancel()
        try:  # the summaries of jobs that became final; a restart would write them too
            await asyncio.wait_for(self.dispatch.settle(), SETTLE_TIMEOUT)
        except TimeoutError:
            log.error("job summaries not written within %g s: the next start writes them",
                      SETTLE_TIMEOUT)
        if self.node is not None:
            await self.node.leave(self.planner.holder if self.planner and self.planner.active
                                  else None)
        await self._status.stop()
        self.shared.release()
        log.info("alertd stopped" if self._exit_code == EXIT_OK else
                 f"alertd stopped after a fatal error (exit status {self._exit_code})")
        return self._exit_code

    async def _plan(self, already: set[tuple[str, int]]) -> None:
        """Take up the planning: recover unfinished jobs, then claim files (on one host at
        start; in a cluster when this node becomes the planner, which also answers the
        other nodes' job control and shows them its jobs)."""
        del already  # the planner skips them itself: on the stream already
        cfg = self.cfg
        if self.node is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.store.refresh_ids)
            self._background(self.node.relay.serve(self._asked, self.node.stop), "cluster control")
            self._background(self._show_jobs(), "cluster jobs")
        await self.dispatch.recover(cfg.csv, cfg.workers.chunk_bytes)
        self._watcher = InboxWatcher(cfg.paths.inbox_dir, self._claims.arrived,
                                     self._claims.rescan)
        self._watcher.start(asyncio.get_running_loop())
        self._claims.rescan()
        self._background(self._claims.run(), "claims")
        self._kick()

    async def _asked(self, job_id: str, action: str,
                     priority: str | None) -> tuple[int, dict[str, Any]]:
        """Another node's job-control request, answered as the API would."""
        try:
            doc = await self.control_job(job_id, action, priority)
        except NoSuchJob as e:
            return 404, {"error": str(e)}
        except NotAllowed as e:
            return 409, {"error": str(e)}
        except ValueError as e:
            return 400, {"error": str(e)}
        return 200, doc

    async def _show_jobs(self) -> None:
        assert self.node is not None
        while True:
            try:
                await self.node.relay.publish_listing(listing(self.dispatch))
            except RedisDown:
                pass
            await asyncio.sleep(1.0)

    def job_views(self) -> list[dict[str, Any]] | None:
        """The planner's job listing on a cluster node that does not plan; None when this
        node holds the jobs itself."""
        if self.node is not None and not (self.planner and self.planner.active):
            return self.node.relay.listing
        return None

    def _fence_chunk(self, job_id: str, seq: int, claim: int) -> None:
        """This node's claim on the chunk lapsed (or may have): the worker holding it
        writes nothing more for it; the chunk is no longer this node's to track."""
        for w in self.workers.values():
            if w.chunks.pop((job_id, seq), None) is not None:
                try:
                    w.conn.send(Fence(job_id, seq, claim))
                except OSError:
                    pass  # a dying worker writes nothing more anyway

    def _tell_workers(self, job_id: str, action: str) -> None:
        for w in self.workers.values():
            try:
                w.conn.send(JobControl(job_id, action))
            except OSError:
                pass  # a dying worker: its chunks come back through requeue

    def _refusing_files(self) -> str | None:
        """Why an upload is refused now (503), or None."""
        if self.draining:
            return "draining: no new files are taken"
        if self.job_views() is not None:
            return ("this cluster node does not plan jobs: upload to the planner node "
                    "(alertd status shows which one it is), or drop the file in the inbox")
        return None

    def _room(self) -> int:
        """Chunks this node's workers can take now (what a cluster node buffers)."""
        return PREFETCH * sum(1 for w in self.workers.values() if w.ready and not w.retiring)

    def _kick(self) -> None:
        """The Dispatcher may have chunks: hand them out (or publish them, as planner)."""
        if self.planner is not None:
            self.planner.kick()
        self._pump()

    def _background(self, coro: Any, name: str, forever: bool = True) -> None:
        """Run a task beside the main loop. If it fails, or a `forever` one ends at all, the
        supervisor is no longer whole and the daemon ends."""
        t = asyncio.get_running_loop().create_task(coro, name=name)
        t.add_done_callback(self._task_done if forever else self._oneoff_done)
        self._tasks.append(t)

    def _oneoff_done(self, t: asyncio.Task[None]) -> None:
        self._tasks.remove(t)
        if not t.cancelled() and t.exception() is not None:
            self._task_done(t)

    def _task_done(self, t: asyncio.Task[None]) -> None:
        if t.cancelled() or self._stopped.is_set():  # stopping: every task ends now
            return
        exc = t.exception()
        what = f"{type(exc).__name__}: {exc}" if exc is not None else "it returned"
        # Half alive (no rescans, no hung-worker kill, no watchdog pings) is worse than
        # dead: stop, and let the exit status tell systemd to restart us.
        log.critical("fatal: the supervisor's %s task ended (%s); stopping with exit status %d "
                     "so that the service manager restarts alertd", t.get_name(), what,
                     EXIT_FAILURE, exc_info=exc)
        self._exit_code = EXIT_FAILURE
        if not self.draining:
            self.handle_term()
        self._hurry()

    def _control(self, c: Control) -> None:
        if c is Control.RELOAD:
            self.handle_hup()
        elif c is Control.DRAIN:
            self.handle_term()

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(w.ready for w in self.workers.values()):
            await asyncio.sleep(0.02)

    async def _tick(self) -> None:
        """Housekeeping once a second: systemd status and watchdog, a safety rescan."""
        wd = systemd.watchdog_interval()
        n = 0
        last_sent, last_t = 0, time.monotonic()
        while True:
            await asyncio.sleep(min(1.0, wd or 1.0))
            n += 1
            sent, now = sum(s.sent for s in self._slots()), time.monotonic()
            rate = max(0, sent - last_sent) / max(1e-3, now - last_t)
            self.shared.state.observed_rate = rate
            last_sent, last_t = sent, now
            if self.cfg.rate.adaptive:
                ratelimit.recover_rate(self.shared, self.cfg.rate.limit,
                                       self.cfg.rate.effective_burst)
            self._kill_hung(now)
            pending = sum(s.pending for s in self._slots())
            extra = ["WATCHDOG=1"] if wd else []
            systemd.notify(*extra, f"STATUS={rate:.0f} requests/s, {len(self.dispatch.jobs)} jobs, "
                                   f"{pending} pending rows")
            if n % 10 == 0 and not self.draining and self._watcher is not None:
                self._claims.rescan()  # inotify can overflow; a rescan costs one listdir
            if n % 60 == 0:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, self._retention.collect,
                                           self.cfg.wal.retention)
                await loop.run_in_executor(None, self._retention.collect_done,
                                           self.cfg.retention.done_files)

    def _kill_hung(self, now: float) -> None:
        """A worker whose loop has not ticked for HUNG_AFTER s is stuck: kill it; the exit
        handler re-runs its chunks and starts a successor."""
        for w in self.workers.values():
            beat = self.shared.slot(w.index).heartbeat
            if w.ready and beat and now - beat > HUNG_AFTER and w.proc.is_alive():
                log.error("worker %d (pid %s) has not ticked for %.0f s: killing it",
                          w.index, w.proc.pid, now - beat)
                w.proc.kill()

    def _slots(self) -> list[Any]:
        return [self.shared.slot(i) for i in self.workers]

    # ------------------------------------------------------------ files and jobs

    def _on_job(self, job: Job, priority: str = "normal") -> None:
        """A file was claimed: it joins the schedule and its chunks go out."""
        self.dispatch.add(job, priority)
        self._kick()

    def _pump(self) -> None:
        """Hand out chunks, round robin over the live workers, until each holds enough
        (_wants_more) or nothing is left."""
        if self.draining:
            return
        live = [w for w in self.workers.values() if w.ready and not w.retiring]
        paused = self.dispatch.paused
        while live:
            for w in list(live):
                if not self._wants_more(w, paused):
                    live.remove(w)
                    continue
                c = self.source.next_chunk()
                if c is None:
                    return
                w.chunks[(c.job, c.seq)] = c
                w.conn.send(c)

    def _wants_more(self, w: WorkerHandle, paused: dict[str, bool]) -> bool:
        """PREFETCH chunks, or up to PREFETCH_MAX while they hold under PREFETCH_BYTES
        (not in a cluster, whose node buffers PREFETCH per worker). A paused job's chunks
        stay with the worker that holds them, unacked; they do not count here, so they
        never keep other jobs' chunks from it."""
        held = [c for (job, _), c in w.chunks.items() if job not in paused]
        if len(held) < PREFETCH:
            return True
        return self.node is None and len(held) < PREFETCH_MAX and \
            sum(c.end - c.start for c in held) < PREFETCH_BYTES

    async def control_job(self, job_id: str, action: str,
                          priority: str | None = None) -> dict[str, Any]:
        """pause/resume/cancel a job or set its priority: checked (NoSuchJob, NotAllowed),
        persisted (a cancel's range record in the WAL, then spool/<job>.control.json), then
        applied and told to every worker, so a restart never undoes what was answered.
        Returns the job's view. A cluster node that does not plan asks the planner."""
        if self.job_views() is not None:
            assert self.node is not None
            try:
                code, body = await self.node.relay.ask(job_id, action, priority)
            except RedisDown as e:
                raise NotAllowed(f"cluster: {e}") from None
            if code == 404:
                raise NoSuchJob(body["error"])
            if code != 200:
                raise NotAllowed(body["error"])
            return body
        async with self._control_lock:
            d = self.dispatch
            d.check(job_id, action, priority)
            job = d.jobs[job_id]
            doc = d.control_doc(job_id, action, priority)
            loop = asyncio.get_running_loop()
            if action == "cancel":
                rec = wal.encode_cancel(job_id, job.data_start, max(job.size, job.data_start),
                                        time.time())
                await loop.run_in_executor(None, wal.append_durable,
                                           self.cfg.wal_dir, wal.CONTROL_WAL, rec)
            await loop.run_in_executor(None, self.store.write_control, job_id, doc["state"],
                                       doc["priority"])
            try:
                d.check(job_id, action, priority)  # it may have finished while we wrote
            except (NoSuchJob, NotAllowed):
                # Finished meanwhile: finalize removes the file, maybe before we wrote it.
                if job_id not in d.jobs or d.finishing(job_id):
                    self.store.control_path(job_id).unlink(missing_ok=True)
                raise
            d.apply(job_id, action, priority)
            if action in JOB_ACTIONS:
                self._tell_workers(job_id, action)
                if self.node is not None:  # and the workers of every other node
                    try:
                        await self.node.relay.announce(job_id, action)
                    except RedisDown as e:
                        log.error("%s: %s not announced to the other nodes: %s", job_id,
                                  action, e)
            log.info("%s: %s%s", job_id, action, f" {priority}" if priority else "")
            self._kick()
        return view(self.dispatch, self.dispatch.find(job_id) or {})

    async def replay(self, of: str | None) -> list[tuple[str, bool]]:
        """Start a replay job for the dead letters of `of` (None: of every finished job
        that has some); (replay job id, started now) each, an already running replay of
        the same letters (False) instead of a second one. NoSuchJob, NotAllowed."""
        async with self._control_lock:
            d, sd = self.dispatch, self.cfg.state_dir
            loop = asyncio.get_running_loop()
            if self.draining:
                raise NotAllowed("alertd is stopping: replay once it runs again")
            if self.job_views() is not None:
                raise NotAllowed("this cluster node does not plan jobs: run dlq replay on the "
                                 "planner node (alertd status shows which one it is)")
            if of is None:
                targets = await loop.run_in_executor(None, replay.replayable, sd)
            elif of in d.jobs and d.jobs[of].kind == "replay":
                raise NotAllowed(f"{of} is itself a replay (of {d.jobs[of].replay_of}): its "
                                 f"letters that fail again go back to that job's DLQ")
            elif of in d.jobs:
                raise NotAllowed(f"{of} is {d.state(of)}: replay its dead letters once it is "
                                 f"final")
            elif not (sd / "done" / f"{of}.summary.json").exists():
                raise NoSuchJob(f"no such job: {of}")
            else:
                targets = [of]
            out = []
            for j in targets:
                active = d.replaying(j)
                if active is not None:
                    out.append((active.id, False))
                    continue
                job = await loop.run_in_executor(None, replay.create, self.store, j,
                                                 self.cfg.workers.chunk_bytes)
                if job is None:
                    if of is not None:
                        raise NotAllowed(f"{j} has no dead letters to replay")
                    continue
                log.info("%s: replaying the %d bytes of dead letters of %s", job.id, job.size, j)
                self._on_job(job)
                out.append((job.id, True))
            return out

    # ------------------------------------------------------------ workers

    def _free_index(self) -> int:
        for i in range(MAX_WORKERS):
            if i not in self.workers:
                return i
        raise RuntimeError("no free worker slot")

    def _spawn(self) -> WorkerHandle:
        index = self._free_index()
        parent, child = self.ctx.Pipe(duplex=True)
        slot = self.shared.slot(index)
        slot.sent = slot.delivered = slot.in_flight = slot.pending = 0
        slot.heartbeat = 0.0  # not the previous occupant's: a stale beat would look hung
        with signals.blocked():
            proc = self.ctx.Process(target=worker.main, name=f"alertd-worker-{index}",
                                    args=(index, child, self.cfg, self.shared, self.log_level))
            proc.start()
        child.close()
        w = WorkerHandle(index, proc, parent, time.monotonic(), self.generation)
        self.workers[index] = w
        loop = asyncio.get_running_loop()
        loop.add_reader(parent.fileno(), self._on_worker_msg, w)
        # uvloop's add_reader made it non-blocking: a send into a full pipe would raise
        # half-way through a message. What goes to a worker is bounded (PREFETCH_MAX chunks
        # and control messages), so a blocking send never waits long.
        os.set_blocking(parent.fileno(), True)
        loop.add_reader(proc.sentinel, self._on_worker_exit, w)
        return w

    def _on_worker_msg(self, w: WorkerHandle) -> None:
        try:
            while w.conn.poll():
                self._handle_msg(w, w.conn.recv())
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(w.conn.fileno())

    def _handle_msg(self, w: WorkerHandle, msg: object) -> None:
        if isinstance(msg, Progress):
            w.progress = msg.counts
        elif isinstance(msg, ChunkAck):
            w.chunks.pop((msg.job, msg.seq), None)
            self.source.ack(msg.job, msg.seq, msg.counts)
            self._kick()
        elif isinstance(msg, Ready):
            w.ready = True
            log.info("worker %d ready (pid %d)", w.index, msg.pid)
            self._pump()
        elif isinstance(msg, ChunkFailed):
            w.chunks.pop((msg.job, msg.seq), None)
            self.source.chunk_failed(msg.job, msg.seq, msg.reason)
            self._kick()

    def _on_worker_exit(self, w: WorkerHandle) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(w.proc.sentinel)
        self._on_worker_msg(w)  # acks it sent before dying still count
        try:
            loop.remove_reader(w.conn.fileno())
        except (OSError, ValueError):
            pass
        w.proc.join(0)
        code = w.proc.exitcode
        del self.workers[w.index]
        w.conn.close()
        self.shared.slot(w.index).pid = 0
        if code != 0 and self.shared.free_lock_of_the_dead():
            log.error("worker %d died holding the shared lock (rate budget, breaker): "
                      "released it", w.index)
        if w.chunks:
            held, w.chunks = list(w.chunks.values()), {}
            self._background(self._requeue(held), "requeue", forever=False)
        if not (self.draining or w.retiring):
            log.error("worker %d (pid %s) exited with %s; replacing it", w.index, w.proc.pid, code)
            young = time.monotonic() - w.started < 5
            loop.call_later(RESPAWN_DELAY if young else 0, self._respawn)
        elif code not in (0, None):
            log.warning("worker %d exited with %s while stopping", w.index, code)
        if self.draining and not self.workers:
            self._stopped.set()
        self._pump()

    def _respawn(self) -> None:
        if not self.draining:
            self._spawn()

    async def _requeue(self, held: list[Chunk]) -> None:
        await self.source.requeue(held)
        self._kick()

    # ------------------------------------------------------------ signals

    def handle_hup(self) -> None:
        systemd.notify("RELOADING=1", systemd.monotonic_usec())
        path = self.cfg.source
        try:
            new = config_mod.load(path)
        except ConfigError as e:
            error = config_mod.redact(str(e))  # ConfigError never quotes secrets: belt and braces
            log.error("reload failed, keeping the running config: %s", error)
            self._reload_done(False, error)
            systemd.notify("READY=1")
            return
        old = self.cfg
        if new.paths != old.paths or new.status != old.status or new.cluster != old.cluster:
            # The watcher, the job store, the listener and the cluster node were built on
            # the old ones.
            log.warning("reload: [paths], [status] and [cluster] apply only at restart; "
                        "keeping the running ones")
            new = dataclasses.replace(new, paths=old.paths, status=old.status,
                                      cluster=old.cluster)
        if old.cluster.redis and (new.rate != old.rate or new.webhook != old.webhook):
            error = ("reload: in a cluster [rate] and [webhook] are the same on every node: "
                     "change them on every node, clear the fingerprint and restart them "
                     "(README, Running several nodes)")
            log.error("reload failed, keeping the running config: %s", error)
            self._reload_done(False, error)
            systemd.notify("READY=1")
            return
        if new.workers.count != old.workers.count and \
                len(self.workers) + new.workers.count > MAX_WORKERS:
            error = (f"reload: [workers] count {new.workers.count} needs that many free worker "
                     f"slots while the running ones drain, and {len(self.workers)} of "
                     f"{MAX_WORKERS} are in use; retry once the retiring workers have stopped")
            log.error("reload failed, keeping the running config: %s", error)
            self._reload_done(False, error)
            systemd.notify("READY=1")
            return
        for w in new.warnings:
            log.warning("%s", w)
        self.cfg = new
        self.store.keep_sources = new.retention.done_files > 0
        ratelimit.configure(self.shared, new.rate.limit, new.rate.effective_burst,
                            leased=bool(new.cluster.redis))
        if new.workers.count != old.workers.count:
            self._replace_generation()
        else:
            for w in self.workers.values():
                if not w.retiring:
                    w.conn.send(Reload(new))
        self._reload_done(True)
        log.info("reloaded %s", path)
        systemd.notify("READY=1")

    def _replace_generation(self) -> None:
        """Start the new generation first, then drain the old: never fewer workers."""
        self.generation += 1
        old = [w for w in self.workers.values() if not w.retiring]
        for _ in range(self.cfg.workers.count):
            self._spawn()
        for w in old:
            w.retiring = True
            w.conn.send(Drain())

    def handle_term(self) -> None:
        if self.draining:
            log.warning("second stop signal: hurrying")
            self._hurry()
            return
        self.draining = True
        if self.node is not None:
            self.node.draining = True
        self._claims.stop()
        systemd.notify("STOPPING=1")
        log.info("draining: no new files or chunks; finishing requests in flight")
        if self._watcher is not None:
            self._watcher.stop()
        for w in self.workers.values():
            w.conn.send(Drain())
        loop = asyncio.get_running_loop()
        loop.call_later(self.cfg.shutdown.grace, self._hurry)
        loop.call_later(self.cfg.shutdown.grace + 10, self._kill_stragglers)
        if not self.workers:
            self._stopped.set()

    def _hurry(self) -> None:
        for w in self.workers.values():
            try:
                w.conn.send(Drain(hurry=True))
            except OSError:
                pass

    def _kill_stragglers(self) -> None:
        for w in list(self.workers.values()):
            log.error("worker %d did not stop in time: killing it", w.index)
            w.proc.kill()

    # ------------------------------------------------------------ status

    def snapshot(self) -> dict[str, Any]:
        """The raw /v1/status document; status.py adds rates, ETAs, RSS/CPU and totals."""
        st = self.shared.state
        now = time.monotonic()
        workers = []
        for w in self.workers.values():
            s = self.shared.slot(w.index)
            workers.append({"index": w.index, "pid": w.proc.pid, "ready": w.ready,
                            "retiring": w.retiring, "generation": w.generation,
                            "chunks": len(w.chunks), "sent": s.sent,
                            "delivered": s.delivered, "in_flight": s.in_flight,
                            "pending": s.pending, "wal_error": bool(s.wal_error),
                            "heartbeat_age": round(now - s.heartbeat, 3) if s.heartbeat else None})
        return {"pid": os.getpid(), "started_at": self.started_at, "draining": self.draining,
                "config": str(self.cfg.source) if self.cfg.source else None,
                "generation": self.generation,
                "jobs": self._jobs_live(), "finished": self.dispatch.finished,
                "workers": workers,
                "rate": {"limit": st.rate, "configured_limit": self.cfg.rate.limit,
                         "burst": st.burst, "adaptive": self.cfg.rate.adaptive,
                         "paused_for": max(0.0, st.pause_until - now)},
                "breaker": {**Breaker(self.shared).describe(),
                            "probe_in": max(0.0, st.breaker_until - now) if st.breaker_state else 0.0},
                "reload": {**self.last_reload, **self.reload_counts},
                **({"cluster": {**self.node.describe(),
                                "planner": bool(self.planner and self.planner.active)}}
                   if self.node is not None else {})}

    def _jobs_live(self) -> list[dict[str, Any]]:
        """The dispatcher's jobs (counts as of acked chunks: durable), each with `live`:
        those plus what the workers last reported as final but not yet acked."""
        jobs = self.dispatch.snapshot()
        for j in jobs:
            live = Counts(**{k: j[k] for k in Counts.__slots__})
            for w in self.workers.values():
                c = w.progress.get(j["job"])
                if c is not None:
                    live.add(c)
            j["live"] = live.as_dict()
        return jobs

    def _reload_done(self, ok: bool, error: str | None = None) -> None:
        self.last_reload = {"ok": ok, "at": time.time(), "error": error}
        self.reload_counts["succeeded" if ok else "failed"] += 1
