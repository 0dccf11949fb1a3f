"""Many small files in a row: claimed, delivered and finished in batches (claims.py,
JobStore.claim_many/finalize_many, the dispatcher's finisher), exactly once, crash or not."""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from alertd import names, wal
from alertd.config import CsvConfig
from alertd.dispatch import MAX_RUNNING, Dispatcher
from alertd.jobs import JobStore
from alertd.protocol import Counts

from bench.gen_csv import generate
from tests.helpers import get_stats
from tests.procs import Alertd, poll, write_config

ROWS = 10


def _stage(dirpath: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` files of ROWS rows each, every id unique across them (a seed per file)."""
    dirpath.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = dirpath / f"small-{i:04d}.csv"
        generate(str(p), ROWS, seed=seed + i)
        out.append(p)
    return out


def _rename_all(a: Alertd, files: list[Path]) -> None:
    inbox = a.cfg.paths.inbox_dir
    for p in files:
        os.rename(p, inbox / p.name)


def _final_rows(state: Path) -> dict[str, int]:
    """Per job, the rows the WALs' chunk markers say are final."""
    return {job: sum(c.rows for c in r.chunks.values())
            for job, r in wal.recover(state / "wal").items()}


def test_hundreds_of_small_files_each_row_once_each_job_done(tmp_path, mock, alertd):
    n = 300
    port = mock()
    files = _stage(tmp_path / "staging", n)  # same filesystem as the inbox: a rename
    a = alertd(write_config(tmp_path / "alertd.toml", port))
    _rename_all(a, files)
    summaries = a.wait_summaries(n, timeout=60)
    assert len(summaries) == n
    assert {s["status"] for s in summaries} == {"complete"}
    assert all((s["rows"], s["delivered"], s["rejected"], s["dead"]) == (ROWS, ROWS, 0, 0)
               for s in summaries), [s for s in summaries if s["delivered"] != ROWS][:3]
    assert sorted(s["file"] for s in summaries) == sorted(p.name for p in files)
    assert len({s["job"] for s in summaries}) == n
    stats = get_stats(port)
    assert (stats["received"], stats["unique"], stats["duplicates"]) == (n * ROWS, n * ROWS, 0)
    state = a.state
    assert not [e for e in os.listdir(a.cfg.paths.inbox_dir) if not e.startswith(".")]
    assert not os.listdir(state / "spool")
    assert sorted(p.name.split("--", 1)[1] for p in (state / "done").glob("*--*.csv")) == \
        sorted(p.name for p in files)
    assert _final_rows(state) == {s["job"]: ROWS for s in summaries}
    r = a.cli("verify", summaries[-1]["job"])
    assert r.returncode == 0, r.stdout + r.stderr


def test_kill9_amid_small_files_then_restart_finishes_every_job(tmp_path, mock, alertd):
    n = 200
    port = mock()
    files = _stage(tmp_path / "staging", n, seed=5000)
    cfg = write_config(tmp_path / "alertd.toml", port, rate={"limit": 1500})
    a = alertd(cfg)
    _rename_all(a, files)
    poll(lambda: len(list((a.state / "done").glob("*.summary.json"))) >= 20, 30,
         "some jobs to finish")
    a.kill9()
    b = alertd(cfg)
    summaries = b.wait_summaries(n, timeout=60)
    assert len(summaries) == n and {s["status"] for s in summaries} == {"complete"}
    assert all(s["delivered"] == ROWS for s in summaries)
    assert len({s["file"] for s in summaries}) == n  # no file claimed twice, none lost
    stats = get_stats(port)
    assert stats["unique"] == n * ROWS  # at least once; duplicates only from the kill
    assert _final_rows(b.state) == {s["job"]: ROWS for s in summaries}
    assert not os.listdir(b.state / "spool")


def test_a_batch_claim_that_crashed_before_its_manifests_keeps_every_name(tmp_path):
    """jobseq keeps the names of a whole batch of ids: a claim that crashed after the
    renames and before the manifests still knows each file's full name."""
    state = tmp_path / "state"
    store = JobStore(state)
    files = ["a.csv", "b.csv", "c" * 240 + ".csv"]
    ids = store.allocate_ids(files)
    assert ids == ["j000001", "j000002", "j000003"]
    assert json.loads((state / "jobseq").read_text())["last"] == 3
    for job_id, name in zip(ids, files):
        (state / "spool" / names.state_name(job_id, name)).write_bytes(b"user_id\nu1\n")
    jobs = JobStore(state).load_unfinished(CsvConfig(), 4096)
    assert [(j.id, j.name) for j in jobs] == list(zip(ids, files))
    assert JobStore(state).allocate_id("d.csv") == "j000004"  # ids never reused


def test_claim_many_claims_in_order_and_skips_what_is_not_a_file(tmp_path):
    state, inbox = tmp_path / "state", tmp_path / "inbox"
    inbox.mkdir()
    store = JobStore(state)
    (inbox / "1.csv").write_bytes(b"user_id\nu1\n")
    (inbox / "dir.csv").mkdir()
    (inbox / "3.csv").write_bytes(b"\x00\x01" * 100)  # binary: failed/, not a job
    (inbox / "4.csv").write_bytes(b"user_id\nu4\nu5\n")
    paths = [inbox / n for n in ("1.csv", "dir.csv", "gone.csv", "3.csv", "4.csv")]
    jobs = store.claim_many(paths, CsvConfig(), 4096)
    assert [j and (j.id, j.name) for j in jobs] == \
        [("j000001", "1.csv"), None, None, None, ("j000003", "4.csv")]
    assert (inbox / "dir.csv").is_dir()
    assert (state / "failed" / "j000002--3.csv.reason").exists()
    for j in jobs:
        if j is not None:
            assert json.loads((state / "spool" / f"{j.id}.json").read_text())["size"] == j.size
            j.park()


def test_jobs_waiting_only_for_acks_free_their_running_slot(tmp_path):
    """A job planned to the end leaves its running slot: more than MAX_RUNNING one-chunk
    jobs have their chunks out at once; a dead worker's chunk brings its job back."""
    state, inbox = tmp_path / "state", tmp_path / "inbox"
    inbox.mkdir()
    n = MAX_RUNNING + 36
    for i in range(n):
        (inbox / f"{i}.csv").write_bytes(b"user_id\nu%d\n" % i)
    store = JobStore(state)
    jobs = store.claim_many(sorted(inbox.iterdir()), CsvConfig(), 4096)
    d = Dispatcher(state, store)
    for j in jobs:
        d.add(j)
    chunks = []
    while (c := d.next_chunk()) is not None and len(chunks) <= n:
        chunks.append(c)
    assert len(chunks) == n and len({c.job for c in chunks}) == n
    assert {d.state(j.id) for j in jobs} == {"running"}
    asyncio.run(d.requeue([chunks[0]]))  # its worker died before the ack
    again = d.next_chunk()
    assert again is not None and (again.job, again.seq) == (chunks[0].job, chunks[0].seq)
    assert d.next_chunk() is None
    for c in chunks[1:] + [again]:
        d.ack(c.job, c.seq, Counts(rows=1, delivered=1))
    assert not d.jobs
    assert len(list((state / "done").glob("*.summary.json"))) == n
