"""The measured runs: alertd end to end, first request latency, rate precision, baseline.

Each function starts what it needs, returns a dict of figures, and stops every
process it started, on error too. Every wait has a deadline.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.procs import ROOT, Alertd, write_config

from . import measure
from .sink import SAMPLE_SECRET, MockSink, Nginx, wait_listening


def bench_config(dirpath: Path, url: str, secret: str, **sections: dict[str, Any]) -> Path:
    """alertd.toml in `dirpath` for a benchmark run: signed, no rate limit; `sections` override."""
    return write_config(dirpath / "alertd.toml", url=url, **{
        "webhook": {"url": url, "secrets": [secret], "timeout": 10.0},
        "rate": {"limit": 0}, **sections})


def first_summary(d: Alertd, timeout: float) -> dict[str, Any] | None:
    """The first job summary, or None when `timeout` passes first (a daemon that exits raises)."""
    try:
        return d.wait_summaries(1, timeout)[0]
    except AssertionError:
        if d.proc is not None and d.proc.poll() is None:
            return None
        raise


def _iso(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def throughput(nginx: Nginx | MockSink, workdir: Path, csv: Path, rows: int, workers: int,
               timeout: float, tag: str = "", pipeline: int = 1) -> dict[str, Any]:
    """Drop `csv` into a fresh alertd; deliveries/s, CPU/delivery, peak RSS, a rate series.
    `pipeline` > 1: HTTP/1.1 pipelining at that depth ([workers] pipeline)."""
    cfg = bench_config(workdir / f"alertd{tag}-w{workers}-p{pipeline}", nginx.url, SAMPLE_SECRET,
                       workers={"count": workers, "pipeline": pipeline})
    with Alertd(cfg) as d:
        sampler = measure.Sampler(d.pid, progress=d.delivered_now).start()
        try:
            cpu0, split0 = measure.cpu_seconds(d.pid), measure.cpu_split(d.pid)
            t_drop = d.drop_link(csv, "bench.csv")
            since = time.monotonic() - sampler.t0  # the plot's x axis starts at the drop
            summary = first_summary(d, timeout)
            t_end = time.time()
            cpu1, split1 = measure.cpu_seconds(d.pid), measure.cpu_split(d.pid)
            delivered_now = d.delivered_now()
        finally:
            sampler.stop()
    out: dict[str, Any] = {"workers": workers, "pipeline": pipeline, "rows": rows,
                           "complete": summary is not None,
                           "peak_rss_mb": measure.peak_rss_mb(sampler),
                           "series": [(round(t - since, 3), v) for t, v in sampler.rates()],
                           "wall_s": round(t_end - t_drop, 3)}
    if summary is not None:
        dur = _iso(summary["finished_at"]) - _iso(summary["started_at"])
        n = summary["delivered"]
        out.update(summary={k: v for k, v in summary.items()}, duration_s=round(dur, 3),
                   deliveries_per_s=round(n / dur, 1),
                   cpu_us_per_delivery=round((cpu1 - cpu0) / max(n, 1) * 1e6, 2))
    else:
        # Out of time: rate and CPU over what was delivered so far, flagged incomplete.
        dur = t_end - t_drop
        out.update(delivered=delivered_now, duration_s=round(dur, 3),
                   deliveries_per_s=round(delivered_now / dur, 1),
                   cpu_us_per_delivery=round((cpu1 - cpu0) / max(delivered_now, 1) * 1e6, 2))
    out["cpu_s"] = round(cpu1 - cpu0, 3)
    # Where the CPU goes: the supervisor (planning, acks, status API) vs the workers.
    out["cpu_split_s"] = {k: round(split1[k] - split0[k], 3) for k in split1}
    return out


def against_mock(workdir: Path, csv: Path, rows: int, workers: int, timeout: float,
                 engine: str = "fast") -> dict[str, Any]:
    """throughput() with the mock webhook as the sink: the rate, and whether the mock saw
    every row once with a good signature (nginx cannot tell)."""
    with MockSink(workdir, engine) as mock:
        cpu0, (r0, w0) = mock.cpu_seconds(), mock.syscalls()
        out = throughput(mock, workdir, csv, rows, workers, timeout, tag="-mock")
        cpu1, (r1, w1) = mock.cpu_seconds(), mock.syscalls()
        st = mock.stats()
        n = max(st["received"], 1)
        # The fast engine's compiled hot path is built by make install; without it the
        # same engine runs on httptools alone (slower): the report says which ran.
        compiled = importlib.util.find_spec("mock_webhook._hot") is not None \
            and not os.environ.get("MOCK_WEBHOOK_PURE")
        out["mock"] = {"engine": engine + (", compiled" if compiled and engine == "fast" else ""),
                       "received": st["received"], "unique": st["unique"],
                       "duplicates": st["duplicates"], "bad_signatures": st["bad_signatures"],
                       "by_status": st["by_status"],
                       "cpu_us_per_request": round((cpu1 - cpu0) / n * 1e6, 2),
                       "reads_per_request": round((r1 - r0) / n, 3),
                       "writes_per_request": round((w1 - w0) / n, 3),
                       "rss_mb": mock.rss_mb()}
    # A run that timed out is flagged incomplete; its counts can still show duplicates.
    out["counts_ok"] = (st["duplicates"] == 0 and st["bad_signatures"] == 0
                        and (st["unique"] == rows or not out["complete"]))
    return out


def first_request(nginx: Nginx, workdir: Path, csv: Path, label: str,
                  seconds: float) -> dict[str, Any]:
    """Rename `csv` into a running alertd's inbox; ms to the first request at the sink,
    then peak RSS over `seconds` of delivery (the file need not finish)."""
    cfg = bench_config(workdir / f"alertd-first-{label}", nginx.log_url, SAMPLE_SECRET,
                       workers={"count": 2})
    with Alertd(cfg) as d:
        nginx.truncate_log()
        sampler = measure.Sampler(d.pid, progress=d.delivered_now).start()
        try:
            t_drop = d.drop_link(csv, f"{label}.csv")
            first = None
            deadline = time.monotonic() + min(seconds, 30)
            while first is None and time.monotonic() < deadline:
                first = nginx.first_request_at()
                time.sleep(0.005)
            end = time.monotonic() + max(0.0, seconds - (time.time() - t_drop))
            while time.monotonic() < end:
                time.sleep(0.1)
            delivered = d.delivered_now()
            elapsed = time.time() - t_drop
        finally:
            sampler.stop()
    return {"label": label, "file_bytes": csv.stat().st_size,
            "first_request_ms": None if first is None else round((first - t_drop) * 1000, 1),
            "peak_rss_mb": measure.peak_rss_mb(sampler), "seconds": round(elapsed, 2),
            "delivered": delivered, "deliveries_per_s": round(delivered / elapsed, 1),
            "note": "sink writes an access log in this run"}


def _mock_stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
        return json.load(r)


def rate_precision(workdir: Path, csv: Path, rate: int, seconds: float,
                   warmup: float = 2.0) -> dict[str, Any]:
    """alertd at rate.limit=`rate`, 2 workers, against the mock enforcing the same rate."""
    from .sink import free_port

    port = free_port()
    log = open(workdir / "mock.log", "wb")
    mock = subprocess.Popen([sys.executable, "-m", "mock_webhook", "--port", str(port),
                             "--mode", "ratelimit", "--rate", str(rate)],
                            cwd=ROOT, stdout=log, stderr=log)
    try:
        wait_listening(port, 15, mock)
        cfg = bench_config(workdir / "alertd-rate", f"http://127.0.0.1:{port}/hook",
                           SAMPLE_SECRET, workers={"count": 2}, rate={"limit": rate})
        with Alertd(cfg) as d:
            d.drop_link(csv, "rate.csv")
            # Skip the start (claim, spawn of the first chunk): measure the steady state.
            deadline = time.monotonic() + 30
            while _mock_stats(port)["received"] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(warmup)
            s0, t0 = _mock_stats(port), time.monotonic()
            series = []  # (s, received) every 0.5 s: shows stalls a window average hides
            while time.monotonic() - t0 < seconds:
                time.sleep(min(0.5, max(0.0, seconds - (time.monotonic() - t0))))
                series.append((round(time.monotonic() - t0, 3), _mock_stats(port)["received"]))
            s1, t1 = _mock_stats(port), time.monotonic()
        got = s1["received"] - s0["received"]
        ok = s1["by_status"].get("200", 0) - s0["by_status"].get("200", 0)
        achieved = got / (t1 - t0)
        return {"configured": rate, "window_s": round(t1 - t0, 3), "requests": got,
                "achieved_per_s": round(achieved, 1), "ratio": round(achieved / rate, 4),
                "ok_per_s": round(ok / (t1 - t0), 1),
                "http_429": s1["by_status"].get("429", 0), "by_status": s1["by_status"],
                "series": [(t, n - s0["received"]) for t, n in series]}
    finally:
        mock.terminate()
        try:
            mock.wait(10)
        except subprocess.TimeoutExpired:
            mock.kill()
            mock.wait()
        log.close()


def baseline(nginx: Nginx, csv: Path, max_seconds: float) -> dict[str, Any]:
    """bench/baseline.py in its own process against the same sink."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.baseline", "--url", nginx.url,
                             "--csv", str(csv), "--secret", SAMPLE_SECRET, "--concurrency", "64",
                             "--max-seconds", str(max_seconds)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = measure.Sampler(proc.pid).start()
    try:
        stdout, stderr = proc.communicate(timeout=max_seconds + 60)
    finally:
        sampler.stop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"baseline failed ({proc.returncode}): {stderr[-2000:]}")
    return {**json.loads(stdout.strip().splitlines()[-1]),
            "peak_rss_mb": measure.peak_rss_mb(sampler)}


def small_files(nginx: Nginx | MockSink, workdir: Path, files: int, rows: int = 10,
                timeout: float = 120.0, workers: int = 2) -> dict[str, Any]:
    """`files` CSV files of `rows` rows each, renamed into a running alertd's inbox one
    after another as fast as possible; files/s from the first rename to the last job's
    summary (`finished_at`), rows delivered, and whether every job completed in time."""
    from .gen_csv import generate

    cfg = bench_config(workdir / "alertd-small", nginx.url, SAMPLE_SECRET,
                       workers={"count": workers})
    staging = workdir / "alertd-small" / "staging"  # same filesystem as the inbox: rename
    staging.mkdir(parents=True, exist_ok=True)
    srcs = []
    for i in range(files):
        p = staging / f"small-{i:05d}.csv"
        generate(str(p), rows, seed=1000 + i)
        srcs.append(p)
    with Alertd(cfg) as d:
        inbox, done = d.cfg.paths.inbox_dir, d.state / "done"
        cpu0, split0 = measure.cpu_seconds(d.pid), measure.cpu_split(d.pid)
        t_first = time.time()
        for p in srcs:
            os.rename(p, inbox / p.name)
        t_renamed = time.time()
        deadline = time.monotonic() + timeout
        finished = 0
        while time.monotonic() < deadline:
            if d.proc is not None and d.proc.poll() is not None:
                raise RuntimeError(f"alertd exited with {d.proc.returncode}:\n{d.log()[-3000:]}")
            finished = sum(1 for n in os.listdir(done) if n.endswith(".summary.json"))
            if finished >= files:
                break
            time.sleep(0.05)
        t_seen = time.time()
        cpu1, split1 = measure.cpu_seconds(d.pid), measure.cpu_split(d.pid)
        summaries = d.summaries()
        left_in_inbox = sum(1 for n in os.listdir(inbox) if not n.startswith("."))
    complete = len(summaries) >= files and all(s.get("status") == "complete" for s in summaries)
    end = max((_iso(s["finished_at"]) for s in summaries), default=t_seen)
    dur = max(1e-3, (end if complete else t_seen) - t_first)
    delivered = sum(s.get("delivered", 0) for s in summaries)
    return {"files": files, "rows_per_file": rows, "workers": workers, "complete": complete,
            "jobs_finished": len(summaries), "rows_delivered": delivered,
            "rows_expected": files * rows, "duration_s": round(dur, 3),
            "files_per_s": round(len(summaries) / dur, 1),
            "rename_s": round(t_renamed - t_first, 3), "left_in_inbox": left_in_inbox,
            "cpu_s": round(cpu1 - cpu0, 3),
            "cpu_split_s": {k: round(split1[k] - split0[k], 3) for k in split1}}
