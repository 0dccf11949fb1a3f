"""A worker killed while it holds the shared lock must not stop every other process."""
from __future__ import annotations

import multiprocessing
import os
import signal
import time

from alertd.shm import Shared


def _hold(lock, ready) -> None:  # noqa: ANN001 (multiprocessing handles)
    lock.acquire()
    ready.set()
    time.sleep(60)


def test_the_lock_of_a_worker_killed_inside_it_is_released():
    ctx = multiprocessing.get_context("spawn")
    shared = Shared.create(ctx)
    assert shared.free_lock_of_the_dead(timeout=0.05) is False  # free: left as it is
    assert shared.lock.acquire(timeout=0.1)
    shared.lock.release()
    ready = ctx.Event()
    p = ctx.Process(target=_hold, args=(shared.lock, ready))
    p.start()
    assert ready.wait(30)
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    assert not shared.lock.acquire(timeout=0.1)  # what every other process would hit
    assert shared.free_lock_of_the_dead(timeout=0.1) is True
    assert shared.lock.acquire(timeout=0.1)  # usable again
    shared.lock.release()
