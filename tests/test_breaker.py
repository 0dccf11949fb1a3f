"""The shared circuit breaker, driven directly."""
from __future__ import annotations

import multiprocessing

from alertd import breaker
from alertd.breaker import Breaker, Gate
from alertd.shm import Shared


def fresh() -> Breaker:
    return Breaker(Shared.create(multiprocessing.get_context("spawn")))


def test_mostly_failing_first_attempts_open_it_and_a_success_closes_it():
    b = fresh()
    b.record(2, 0)
    for _ in range(7):
        b.record(0, 1)
    assert not b.is_open  # 7 of 9 failed: below 80%
    b.record(0, 1)
    b.record(0, 1)
    assert b.is_open  # 9 of 11 failed
    assert b.describe()["reason"] == "most recent attempts failed"
    b.record(1, 0)  # a probe got through
    assert not b.is_open and b.describe()["opens"] == 1


def test_a_minority_of_failures_never_opens_it():
    b = fresh()
    for _ in range(100):
        b.record(9, 0)
        b.record(0, 1)
    assert not b.is_open


def test_consecutive_failures_open_it_even_when_slow():
    b = fresh()
    st = b._st
    for _ in range(breaker.CONSECUTIVE):
        b.record(0, 1)
        st.win_start -= 10  # as if a long time passed: the windows forget, the run does not
    assert b.is_open


def test_open_breaker_admits_one_probe_per_interval():
    b = fresh()
    b.trip(breaker.REASON_GONE)
    assert b.describe()["reason"] == "410 Gone"
    b._st.breaker_until = 0.0  # the probe slot is due
    assert b.admit() is Gate.PROBE
    assert b.admit() is Gate.HOLD  # everyone else waits for the next slot
    assert b.describe()["probes"] == 1


def test_closed_breaker_sends():
    assert fresh().admit() is Gate.SEND
