"""The state every alertd process shares: one ctypes struct in shared memory.

It holds the token bucket, the shared pause, the circuit-breaker state and a
slot per worker (pid, heartbeat, counters). Only plain numbers live here;
every read-modify-write goes through the one lock (see ratelimit.py).
"""
from __future__ import annotations

import ctypes
import multiprocessing
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
        ("generation", ctypes.c_int64),  # unused (reserved): supervisor.py counts generations
        ("workers", WorkerSlot * MAX_WORKERS),
    ]


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
