"""Fair scheduling end to end: a small file dropped behind large ones is not held back."""
from __future__ import annotations

import time
from datetime import datetime

from bench.gen_csv import generate
from tests.helpers import TIMING
from tests.procs import poll, write_config
from tests.test_jobs import _job_of


def _ts(x: str) -> float:
    return datetime.fromisoformat(x.replace("Z", "+00:00")).timestamp()


def _five_running(tmp_path, mock, alertd, rows: int, prefix: str):
    """A daemon busy with five jobs of `rows` rows each, delivering; returns it and the file."""
    port = mock()
    # Small chunks: the mock's ~9k/s would make the default 256 KiB chunks (13k rows) take
    # seconds each; the schedule, not the chunk size, is under test.
    a = alertd(write_config(tmp_path / "alertd.toml", port, workers={"chunk_bytes": 16384}))
    big = tmp_path / "big.csv"
    generate(str(big), rows, seed=5)
    for i in range(5):
        a.drop_link(big, f"{prefix}{i}.csv")
    poll(lambda: a.delivered_now() > 2_000, 60, "the large jobs to be delivering")
    return a, big


@TIMING
def test_a_small_job_behind_five_large_ones_finishes_within_seconds(tmp_path, mock, alertd):
    a, _ = _five_running(tmp_path, mock, alertd, 400_000, "big")
    t_drop = time.time()
    a.drop("small.csv", b"user_id\n" + b"".join(b"s%d\n" % i for i in range(100)))
    [s] = poll(lambda: [x for x in a.summaries() if x["file"] == "small.csv"], 30,
               "the small job's summary")
    waited = _ts(s["finished_at"]) - t_drop
    print(f"\nsmall job: summary {waited:.2f} s after its drop, behind five 400,000-row jobs")
    assert s["delivered"] == 100 and s["rows"] == 100
    assert waited < 3.0
    # The large jobs were all running side by side, none finished before the small one.
    st = a.status()
    assert len(st["jobs"]) == 5 and all(j["state"] == "running" for j in st["jobs"])
    assert all(j["delivered"] > 0 for j in st["jobs"]), [j["delivered"] for j in st["jobs"]]


def test_a_high_priority_job_overtakes_five_running_normal_ones(tmp_path, mock, alertd):
    a, big = _five_running(tmp_path, mock, alertd, 40_000, "n")
    a.drop_link(big, "hi.csv")  # as large as each normal job, and dropped after them
    job = _job_of(a, "hi.csv")["job"]
    r = a.cli("priority", job, "high")
    assert r.returncode == 0 and "priority high" in r.stdout, r.stderr
    ss = a.wait_summaries(6, timeout=180)
    order = [s["file"] for s in sorted(ss, key=lambda s: _ts(s["finished_at"]))]
    print(f"\npriority: finish order {order}")
    assert order[0] == "hi.csv"
    assert all(s["delivered"] == 40_000 for s in ss)
    assert {s["file"]: s["priority"] for s in ss} == {"hi.csv": "high",
                                                     **{f"n{i}.csv": "normal" for i in range(5)}}
    assert a.cli("priority", job, "urgent").returncode == 2  # bad usage
    assert a.cli("priority", job, "low").returncode == 1  # complete
