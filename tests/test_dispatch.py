"""The dispatcher over real spool files: round robin between jobs, strict priority, a bound
on the jobs that hold an open plan, and acks that finish jobs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from alertd import dispatch
from alertd.config import CsvConfig
from alertd.dispatch import Dispatcher
from alertd.jobs import JobStore
from alertd.protocol import Counts

CHUNK = 64  # bytes: a few rows per chunk, so every job has many chunks


def _claim(store: JobStore, inbox: Path, name: str, rows: int):
    p = inbox / name
    p.write_bytes(b"user_id\n" + b"".join(b"u%05d\n" % i for i in range(rows)))
    job = store.claim(p, CsvConfig(), CHUNK)
    assert job is not None
    return job


@pytest.fixture
def setup(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    store = JobStore(tmp_path / "state")
    return store, inbox, Dispatcher(tmp_path / "state", store)


def _ack(d: Dispatcher, c) -> None:
    rows = sum(1 for _ in range(c.start, c.end, 7))  # "u00000\n" is 7 bytes
    d.ack(c.job, c.seq, Counts(rows=rows, delivered=rows))


def test_chunks_go_round_robin_over_jobs(setup):
    store, inbox, d = setup
    big = [_claim(store, inbox, f"big{i}.csv", 200) for i in range(3)]
    for j in big:
        d.add(j)
    small = _claim(store, inbox, "small.csv", 5)
    d.add(small)
    order = [d.next_chunk().job for _ in range(8)]
    # Every job gets a chunk in each pass; the small one is served in the first pass, not
    # after the big ones are planned out.
    assert order[:4] == [big[0].id, big[1].id, big[2].id, small.id]
    assert small.id not in order[4:] and set(order[4:7]) == {j.id for j in big}


def test_priority_is_strict_and_round_robin_within_a_level(setup):
    store, inbox, d = setup
    low = _claim(store, inbox, "low.csv", 50)
    normal = _claim(store, inbox, "normal.csv", 50)
    hi1, hi2 = _claim(store, inbox, "h1.csv", 50), _claim(store, inbox, "h2.csv", 50)
    d.add(low, "low")
    d.add(normal)
    d.add(hi1, "high")
    d.add(hi2, "high")
    seen = []
    while (c := d.next_chunk()) is not None:
        seen.append(c.job)
    # All of the high jobs' chunks before any normal one, normal before low.
    first_normal, first_low = seen.index(normal.id), seen.index(low.id)
    assert set(seen[:first_normal]) == {hi1.id, hi2.id}
    assert seen[:4] == [hi1.id, hi2.id, hi1.id, hi2.id]
    assert set(seen[first_normal:first_low]) == {normal.id}
    assert set(seen[first_low:]) == {low.id}


def test_queued_jobs_hold_no_plan_until_a_slot_frees(setup, monkeypatch):
    monkeypatch.setattr(dispatch, "MAX_RUNNING", 2)
    store, inbox, d = setup
    fds_before = len(os.listdir("/proc/self/fd"))
    jobs = [_claim(store, inbox, f"f{i}.csv", 3) for i in range(5)]  # a claim keeps its fd
    for j in jobs:
        d.add(j)
    assert len(os.listdir("/proc/self/fd")) - fds_before == 2  # two open plans, not five
    assert [d.state(j.id) for j in jobs] == ["running"] * 2 + ["queued"] * 3
    # Finishing the running jobs promotes the queued ones, oldest first; all end complete.
    handed = 0
    while (c := d.next_chunk()) is not None:
        handed += 1
        _ack(d, c)
    assert handed == 5 and not d.jobs
    assert [s["job"] for s in d.finished] == [j.id for j in jobs]
    assert all(s["status"] == "complete" and s["rows"] == 3 for s in d.finished)
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_an_empty_file_finishes_when_added(setup):
    store, inbox, d = setup
    (inbox / "e.csv").write_bytes(b"user_id\n")
    job = store.claim(inbox / "e.csv", CsvConfig(), CHUNK)
    d.add(job)
    assert not d.jobs and d.finished[-1]["rows"] == 0 and d.next_chunk() is None
