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


# ---------------------------------------------------------------- job control


def _drain(d: Dispatcher) -> list:
    out = []
    while (c := d.next_chunk()) is not None:
        out.append(c)
    return out


def test_pause_stops_handing_out_and_resume_goes_on(setup):
    store, inbox, d = setup
    a, b = _claim(store, inbox, "a.csv", 50), _claim(store, inbox, "b.csv", 50)
    d.add(a)
    d.add(b)
    first = d.next_chunk()
    assert first.job == a.id
    d.check(a.id, "pause")
    d.apply(a.id, "pause")
    assert d.state(a.id) == "paused"
    with pytest.raises(dispatch.NotAllowed, match="already paused"):
        d.check(a.id, "pause")
    handed = _drain(d)
    assert handed and {c.job for c in handed} == {b.id}  # nothing of the paused job
    _ack(d, first)  # a paused job's chunk in flight still finishes
    for c in handed:
        _ack(d, c)
    assert b.id not in d.jobs and a.id in d.jobs and d.state(a.id) == "paused"
    d.check(a.id, "resume")
    d.apply(a.id, "resume")
    assert d.state(a.id) == "running"
    with pytest.raises(dispatch.NotAllowed, match="not paused"):
        d.check(a.id, "resume")
    for c in _drain(d):
        assert c.job == a.id
        _ack(d, c)
    assert [s["status"] for s in d.finished] == ["complete", "complete"]
    assert d.finished[-1]["rows"] == 50 and d.finished[-1]["cancelled"] == 0


def test_a_paused_job_frees_its_running_slot(setup, monkeypatch):
    monkeypatch.setattr(dispatch, "MAX_RUNNING", 1)
    store, inbox, d = setup
    a, b = _claim(store, inbox, "a.csv", 20), _claim(store, inbox, "b.csv", 20)
    d.add(a)
    d.add(b)
    assert (d.state(a.id), d.state(b.id)) == ("running", "queued")
    d.apply(a.id, "pause")
    assert d.state(b.id) == "running" and d.next_chunk().job == b.id


def test_cancel_ends_the_job_with_every_row_counted(setup):
    store, inbox, d = setup
    job = _claim(store, inbox, "c.csv", 100)  # 7-byte rows, 64-byte chunks: 12 chunks
    d.add(job)
    c0, c1 = d.next_chunk(), d.next_chunk()
    _ack(d, c0)
    d.check(job.id, "cancel")
    d.apply(job.id, "cancel")
    assert d.state(job.id) == "cancelled" and d.next_chunk() is None
    with pytest.raises(dispatch.NotAllowed, match="already cancelled"):
        d.check(job.id, "cancel")
    # The chunk at a worker comes back with the outcomes its requests in flight got.
    d.ack(job.id, c1.seq, Counts(rows=2, delivered=2))
    [s] = d.finished
    delivered = sum(1 for _ in range(c0.start, c0.end, 7)) + 2
    assert s["status"] == "cancelled" and s["rows"] == 100
    assert (s["delivered"], s["cancelled"]) == (delivered, 100 - delivered)
    with pytest.raises(dispatch.NotAllowed, match="is cancelled"):
        d.check(job.id, "pause")
    assert d.find(job.id) is s


def test_unknown_job_and_finished_jobs_refuse_actions(setup):
    store, inbox, d = setup
    with pytest.raises(dispatch.NoSuchJob, match="no such job: j999999"):
        d.check("j999999", "pause")
    job = _claim(store, inbox, "done.csv", 3)
    d.add(job)
    for c in _drain(d):
        _ack(d, c)
    for action in ("pause", "resume", "cancel"):
        with pytest.raises(dispatch.NotAllowed, match="complete"):
            d.check(job.id, action)
    with pytest.raises(dispatch.NotAllowed, match="complete"):
        d.check(job.id, "priority", "high")


def test_raising_priority_serves_the_job_before_any_further_normal_chunk(setup):
    store, inbox, d = setup
    normals = [_claim(store, inbox, f"n{i}.csv", 200) for i in range(5)]
    for j in normals:
        d.add(j)
    assert [d.next_chunk().job for _ in range(5)] == [j.id for j in normals]
    late = _claim(store, inbox, "late.csv", 50)
    d.add(late)
    d.apply(late.id, "priority", "high")
    assert d.priority[late.id] == "high"
    order = []
    while (c := d.next_chunk()).job == late.id:
        order.append(c.job)
    # Every chunk of the high job went out before the next normal one.
    assert len(order) > 3 and late.planned_all and c.job in {j.id for j in normals}
    # Lowered to low, a job gets nothing while normal ones have chunks to hand out.
    low = _claim(store, inbox, "l.csv", 50)
    d.add(low)
    d.apply(low.id, "priority", "low")
    assert low.id not in [d.next_chunk().job for _ in range(20)]
    assert d.priority[low.id] == "low"


def test_persisted_control_is_kept_when_a_job_is_added_again(setup):
    """What load_unfinished/recover hand the dispatcher after a restart."""
    store, inbox, d = setup
    paused, cancelled, high = (_claim(store, inbox, f"{n}.csv", 30)
                               for n in ("p", "c", "h"))
    store.write_control(paused.id, "paused", "low")
    store.write_control(cancelled.id, "cancelled", "normal")
    store.write_control(high.id, "running", "high")
    for job in (paused, cancelled, high):
        job.control = store.read_control(job.id)
        d.add(job, job.control["priority"])
    assert (d.state(paused.id), d.priority[paused.id]) == ("paused", "low")
    assert d.priority[high.id] == "high" and d.next_chunk().job == high.id
    [s] = d.finished
    assert s["job"] == cancelled.id and s["status"] == "cancelled" and s["cancelled"] == 30
    assert not store.control_path(cancelled.id).exists()  # gone with the summary


def test_finished_jobs_and_failed_claims_are_listed_after_a_restart(setup):
    store, inbox, d = setup
    job = _claim(store, inbox, "ok.csv", 3)
    d.add(job)
    for c in _drain(d):
        _ack(d, c)
    (inbox / "bin.csv").write_bytes(b"\x00\x01" * 100)
    assert store.claim(inbox / "bin.csv", CsvConfig(), CHUNK) is None
    d.take_claim_failures()
    assert [s["status"] for s in d.finished] == ["complete", "failed"]
    again = JobStore(store.state_dir).load_finished()
    assert [(s["file"], s["status"]) for s in again] == [("ok.csv", "complete"),
                                                          ("bin.csv", "failed")]
    assert "binary" in again[1]["reason"]


@pytest.mark.parametrize("body", [
    b"a\n\nb\r\nc", b"a\r\nb\r\n", b"x" * 5000 + b"\nshort\n" + b"y" * 3000, b"", b"\n\n\n",
    b"ok\n\x00\xff\n\"un,balanced\n"])
def test_counting_a_cancelled_jobs_rows_agrees_with_the_row_reader(tmp_path, body):
    from alertd import chunker
    from alertd.jobs import count_rows
    p = tmp_path / "f.csv"
    p.write_bytes(b"user_id\n" + body)
    fd = os.open(p, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        want = sum(sum(1 for _ in chunker.read_rows(fd, s, e, 1024))
                   for s, e in chunker.plan(chunker.FileView(fd, size), 8, 64, 1024))
    finally:
        os.close(fd)
    assert count_rows(p, 8) == want


def test_after_a_restart_earlier_jobs_are_listed_but_not_counted_as_finished_since_start(setup):
    import asyncio
    store, inbox, d = setup
    job = _claim(store, inbox, "ok.csv", 3)
    d.add(job)
    for c in _drain(d):
        _ack(d, c)
    d2 = Dispatcher(store.state_dir, JobStore(store.state_dir))
    asyncio.run(d2.recover(CsvConfig(), CHUNK))
    assert d2.finished == []  # status totals count jobs handled since start only
    assert [s["job"] for s in d2.recently_finished()] == [job.id]
    with pytest.raises(dispatch.NotAllowed, match="complete"):
        d2.check(job.id, "cancel")
