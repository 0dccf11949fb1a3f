"""Fair scheduling end to end: a small file dropped behind large ones is not held back."""
from __future__ import annotations

import time
from datetime import datetime

from bench.gen_csv import generate
from tests.procs import poll, write_config


def _ts(x: str) -> float:
    return datetime.fromisoformat(x.replace("Z", "+00:00")).timestamp()


def test_a_small_job_behind_five_large_ones_finishes_within_seconds(tmp_path, mock, alertd):
    port = mock()
    # Small chunks: the mock's ~9k/s would make the default 256 KiB chunks (13k rows) take
    # seconds each; the schedule, not the chunk size, is under test.
    a = alertd(write_config(tmp_path / "alertd.toml", port, workers={"chunk_bytes": 16384}))
    big = tmp_path / "big.csv"
    generate(str(big), 400_000, seed=5)
    for i in range(5):
        a.drop_link(big, f"big{i}.csv")
    poll(lambda: a.delivered_now() > 2_000, 60, "the large jobs to be delivering")
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
