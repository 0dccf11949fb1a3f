"""The state every alertd process shares: one ctypes struct in shared memory.

It holds the token bucket, the shared pause, the circuit-breaker state and a
slot per worker (pid, heartbeat, counters). Only plain numbers live here;
every read-modify-write goes through the one lock (see ratelimit.py).
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

MAX_WORKERS = 64  # slots; config caps workers.count to this


class WorkerSlot(ctypes.Structure):
    _fields_ = [
        ("pid", ctypes.c_int64),  # 0 = slot unused
        ("heartbeat", ctypes.c_double),  # time.monotonic() of the worker's last tick
        ("sent", ctypes.c_uint64),  # requests sent (attempts), for rates and CPU/delivery
        ("delivered", ctypes.c_uint64),  # rows that ended delivered
        ("in_flight", ctypes.c_int64),  # requests awaiting a response now
        ("pending", ctypes.c_int64),  # rows read but not final (in flight + awaiting retry)
        ("wal_error", ctypes.c_int32),  # 1 while the worker's WAL cannot be written, 0 = healthy
    ]


class SharedState(ctypes.Structure):
    _fields_ = [
        ("rate", ctypes.c_double),  # tokens per second over all workers; <= 0 = unlimited
        ("burst", ctypes.c_double),  # bucket capacity
        ("tokens", ctypes.c_double),  # tokens available at `stamp`
        ("stamp", ctypes.c_double),  # time.monotonic() of the last refill
        ("pause_until", ctypes.c_double),  # time.monotonic(): nobody sends before (429 Retry-After)
        # Adaptive rate (ratelimit.py): when the last 429 cut the rate, and the send
        # rate the supervisor measured over the last second (base for a first cut).
        ("adapt_at", ctypes.c_double),
        ("observed_rate", ctypes.c_double),
        # Circuit breaker (breaker.py).
        ("breaker_state", ctypes.c_int32),  # 0 closed, 1 open
        ("breaker_reason", ctypes.c_int32),  # why it opened: 1 failures, 2 410 Gone
        ("breaker_until", ctypes.c_double),  # time.monotonic() of the next probe while open
        ("breaker_opened_at", ctypes.c_double),  # time.time() it last opened
        ("breaker_opens", ctypes.c_uint64),  # times it opened since start
        ("probes", ctypes.c_uint64),  # probes sent while open
        ("win_start", ctypes.c_double),  # the current 1 s window of attempt results
        ("win_ok", ctypes.c_uint32),
        ("win_fail", ctypes.c_uint32),
        ("prev_ok", ctypes.c_uint32),  # the window before it
        ("prev_fail", ctypes.c_uint32),
        ("consecutive_fail", ctypes.c_uint32),
        # 1: tokens come only from deposits (cluster leases, cluster/bucket.py), never from
        # the clock; `rate` is then the cluster's rate, for batch sizes and status.
        ("leased", ctypes.c_int32),
        ("workers", WorkerSlot * MAX_WORKERS),
    ]


LOCK_STUCK = 0.5  # seconds the shared lock may stay held after a worker's death


@dataclass(frozen=True)
class Shared:
    """The struct plus its lock; passed to workers when they are spawned."""

    state: Any  # a SharedState living in shared memory
    lock: Any  # multiprocessing.Lock

    @classmethod
    def create(cls, ctx: multiprocessing.context.BaseContext) -> Shared:
        return cls(state=ctx.RawValue(SharedState), lock=ctx.Lock())

    def slot(self, index: int) -> WorkerSlot:
        return self.state.workers[index]

    def free_lock_of_the_dead(self, timeout: float = LOCK_STUCK) -> bool:
        """After a worker died abnormally: if the lock is still held `timeout` seconds
        later, it was held by the dead (killed inside a take or a breaker update, a few
        microseconds of arithmetic): release it, or every process would stop at its next
        take. True when it did."""
        if self.lock.acquire(timeout=timeout):
            self.lock.release()
            return False
        self.lock.release()  # a semaphore: any process may release it
        return True

    def release(self, timeout: float = 5.0) -> None:
        """Once no worker is left: unlink the lock's semaphore and stop multiprocessing's
        resource tracker, so that the supervisor is the last process of the daemon to exit.

        The spawn context starts the tracker (a child process) with the first named lock
        or spawned worker. Left alone it exits only when it sees the supervisor's end of
        its pipe close, i.e. just after the supervisor: systemd, seeing the main process
        gone, SIGKILLs it as a leftover of the unit on every stop. CPython has no public
        call for this; these are the ones its own tests use.
        """
        from multiprocessing import resource_tracker, util

        util._run_finalizers(0)  # what exit would run now: the SemLock unlinks, unregisters
        tracker = resource_tracker._resource_tracker
        fd, pid = tracker._fd, tracker._pid
        if fd is None or pid is None:
            return
        tracker._fd = tracker._pid = None
        os.close(fd)  # EOF on its pipe: it cleans up what is still registered and exits
        deadline = time.monotonic() + timeout
        try:
            while os.waitpid(pid, os.WNOHANG) == (0, 0):
                if time.monotonic() >= deadline:
                    os.kill(pid, signal.SIGKILL)  # it ignores TERM and INT by design
                    os.waitpid(pid, 0)
                    return
                time.sleep(0.01)
        except ChildProcessError:
            pass  # already reaped
