"""`make bench`: every reference and alertd run in one go, then the JSON, table and plot.

python -m bench.run [--quick] [--keep]. Works in a temp dir (deleted unless
--keep) and stops every process it starts, on error and on Ctrl-C too.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tests.procs import ROOT

from . import plot, report, scenarios
from .gen_csv import generate
from .sink import Nginx, run_wrk

RESULTS = ROOT / "bench" / "results"
ROW_BYTES = 21  # gen_csv's line width without a message column
PIPELINE = 8  # [workers] pipeline of the pipelined run


@dataclass(frozen=True)
class Sizes:
    wrk_s: float
    baseline_s: float
    w1_rows: int
    w2_rows: int
    run_timeout: float
    first: tuple[tuple[str, int, float], ...]  # (label, file bytes, seconds of delivery)
    rate_s: float
    rate_rows: int
    micro_max_time: float
    small_files: int  # 10-row files renamed into the inbox one after another


# Full: each alertd run is >= 15 s at ~100k/s, the whole suite well under 10 min
# even when alertd is slower (every run stops at run_timeout).
FULL = Sizes(wrk_s=10, baseline_s=15, w1_rows=2_000_000, w2_rows=3_000_000, run_timeout=75,
             first=(("100MB", 100_000_000, 15), ("1GB", 1_000_000_000, 20)),
             rate_s=30, rate_rows=200_000, micro_max_time=1.0, small_files=3_000)
QUICK = Sizes(wrk_s=3, baseline_s=4, w1_rows=200_000, w2_rows=300_000, run_timeout=30,
              first=(("20MB", 20_000_000, 4), ("100MB", 100_000_000, 5)),
              rate_s=5, rate_rows=50_000, micro_max_time=0.2, small_files=500)


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _version(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (p.stdout + p.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def micro(workdir: Path, max_time: float) -> list[dict[str, Any]]:
    """bench/test_micro.py under pytest-benchmark; the means, per call and per row."""
    out = workdir / "micro.json"
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(ROOT / "bench" / "test_micro.py"), "--benchmark-only",
                        f"--benchmark-max-time={max_time}", f"--benchmark-json={out}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"micro-benchmarks failed:\n{p.stdout[-3000:]}{p.stderr[-2000:]}")
    doc = json.loads(out.read_text())
    return [{"name": b["name"].removeprefix("test_"), "mean_us": round(b["stats"]["mean"] * 1e6, 3),
             "median_us": round(b["stats"]["median"] * 1e6, 3),
             "rounds": b["stats"]["rounds"], "rows_per_call": b["extra_info"].get("rows_per_call")}
            for b in doc["benchmarks"]]


class Suite:
    """Runs the phases in order, timing each; one phase failing does not stop the rest."""

    def __init__(self, sizes: Sizes, workdir: Path, results: dict[str, Any],
                 keep: bool = False) -> None:
        self.sizes = sizes
        self.keep = keep
        self.work = workdir
        self.r = results
        self.data = workdir / "data"
        self.data.mkdir()

    def phase(self, name: str, fn: Callable[[], Any], key: str | None = None) -> Any:
        say(f"{name} ...")
        t0 = time.monotonic()
        try:
            value = fn()
        except Exception as e:  # recorded and reported; the remaining phases still run
            self.r.setdefault("errors", []).append({"phase": name, "error": str(e),
                                                    "traceback": traceback.format_exc()})
            say(f"{name} FAILED: {e}")
            value = None
        self.r["timings"][name] = round(time.monotonic() - t0, 1)
        if not self.keep:
            # A run's state dir holds its WALs and a hard link to its input (up to a
            # GB): free the disk now rather than at the end.
            for d in self.work.glob("alertd-*"):
                shutil.rmtree(d, ignore_errors=True)
        if key is not None and value is not None:
            self.r[key] = value
        return value

    def csv(self, name: str, rows: int, seed: int) -> Path:
        path = self.data / f"{name}.csv"
        if not path.exists():
            generate(str(path), rows, seed=seed)
        return path

    def run(self) -> None:
        s = self.sizes
        self.phase("generate", lambda: [self.csv("w1", s.w1_rows, 1), self.csv("w2", s.w2_rows, 2),
                                        self.csv("rate", s.rate_rows, 3)])
        with Nginx(self.work, workers=os.cpu_count() or 2) as nginx:
            self.r["sink"] = {"url": nginx.url, "nginx_workers": nginx.workers}
            wrk = self.phase("wrk", lambda: run_wrk(nginx.url, self.work, s.wrk_s), "wrk")
            if wrk:
                say(f"wrk: {wrk['requests_per_s']:,.0f} requests/s, "
                    f"{wrk['cpu_us_per_request']} µs CPU/request (its own user+sys)")
            b = self.phase("baseline", lambda: scenarios.baseline(
                nginx, self.data / "w1.csv", s.baseline_s), "baseline")
            if b:
                say(f"baseline: {b['deliveries_per_s']:,.0f} deliveries/s")
            self.r["alertd"] = []
            # The default (one request at a time per connection, as wrk sends), then 2 workers
            # with [workers] pipeline = PIPELINE (the same file as the 2-worker run).
            for workers, rows, pipe in ((1, s.w1_rows, 1), (2, s.w2_rows, 1),
                                        (2, s.w2_rows, PIPELINE)):
                name = f"alertd-{workers}w" + (f"-pipeline{pipe}" if pipe > 1 else "")
                a = self.phase(name, lambda w=workers, n=rows, p=pipe: scenarios.throughput(
                    nginx, self.work, self.data / f"w{w}.csv", n, w, s.run_timeout, pipeline=p))
                if a:
                    self.r["alertd"].append(a)
                    say(f"{name}: {a['deliveries_per_s']:,.0f} deliveries/s, "
                        f"{a['cpu_us_per_delivery']} µs CPU/delivery")
            # Same file and workers as the 2-worker nginx run, right after it: the ratio of
            # the two is what the mock costs alertd (the target is >= 0.8).
            m = self.phase("alertd-vs-mock", lambda: scenarios.against_mock(
                self.work, self.data / "w2.csv", s.w2_rows, 2, s.run_timeout), "alertd_mock")
            if m:
                say(f"alertd 2 workers vs the mock: {m['deliveries_per_s']:,.0f} deliveries/s, "
                    f"mock {m['mock']['cpu_us_per_request']} µs CPU/request, "
                    f"counts {'ok' if m['counts_ok'] else 'WRONG'}")
            self.r["first_request"] = []
            for i, (label, size, secs) in enumerate(s.first):
                def first(label: str = label, size: int = size, secs: float = secs,
                          seed: int = 10 + i) -> dict[str, Any]:
                    path = self.csv(f"first-{label}", size // ROW_BYTES, seed)
                    try:
                        return scenarios.first_request(nginx, self.work, path, label, secs)
                    finally:
                        path.unlink(missing_ok=True)  # a GB of disk: not kept past its run
                f = self.phase(f"first-{label}", first)
                if f:
                    self.r["first_request"].append(f)
                    say(f"{label}: first request {f['first_request_ms']} ms, "
                        f"peak RSS {f['peak_rss_mb']} MB")
        q = self.phase("rate", lambda: scenarios.rate_precision(
            self.work, self.data / "rate.csv", 5000, s.rate_s), "rate")
        if q:
            say(f"rate: {q['achieved_per_s']:,.1f}/s of {q['configured']}, {q['http_429']} × 429")

        def small() -> dict[str, Any]:
            with Nginx(self.work, workers=os.cpu_count() or 2) as nginx:
                return scenarios.small_files(nginx, self.work, s.small_files)
        f = self.phase("small-files", small, "small_files")
        if f:
            say(f"small files: {f['files_per_s']:,.1f} files/s ({f['jobs_finished']} of "
                f"{f['files']} jobs, {f['rows_delivered']:,} rows in {f['duration_s']} s)")
        self.phase("micro", lambda: micro(self.work, s.micro_max_time), "micro")
        # The ratios the table prints, also in the JSON for whoever compares runs later.
        wrk = (self.r.get("wrk") or {}).get("requests_per_s")
        wrk_cpu = (self.r.get("wrk") or {}).get("cpu_us_per_request")
        base = (self.r.get("baseline") or {}).get("deliveries_per_s")
        for a in self.r["alertd"]:
            a["x_wrk"] = round(a["deliveries_per_s"] / wrk, 3) if wrk else None
            a["x_wrk_cpu"] = round(a["cpu_us_per_delivery"] / wrk_cpu, 2) if wrk_cpu else None
            a["x_baseline"] = round(a["deliveries_per_s"] / base, 2) if base else None
        m = self.r.get("alertd_mock")
        two = next((a for a in self.r["alertd"] if a["workers"] == 2), None)
        if m and two:
            m["x_nginx"] = round(m["deliveries_per_s"] / two["deliveries_per_s"], 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.run", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="short runs, to try the suite out")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (state, logs)")
    args = ap.parse_args(argv)
    for tool in ("nginx", "wrk"):
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
            say(f"{tool} not found: install it (make bench does: apt-get install nginx-light wrk)")
            return 2
    stamp = datetime.now(timezone.utc)
    results: dict[str, Any] = {
        "started_at": stamp.isoformat(timespec="seconds"), "quick": args.quick, "timings": {},
        "host": {"cpus": os.cpu_count(), "python": f"Python {platform.python_version()}",
                 "platform": platform.platform(), "nginx": _version(["nginx", "-v"]),
                 "wrk": _version(["wrk", "--version"]), "load_before": _load()}}
    work = Path(tempfile.mkdtemp(prefix="alertd-bench-"))
    say(f"working in {work}" + (" (kept)" if args.keep else ""))
    t0 = time.monotonic()
    try:
        Suite(QUICK if args.quick else FULL, work, results, keep=args.keep).run()
    except KeyboardInterrupt:
        say("interrupted: writing what was measured")
        results.setdefault("errors", []).append({"phase": "all", "error": "interrupted"})
    finally:
        results["host"]["load_after"] = _load()
        results["timings"]["total"] = round(time.monotonic() - t0, 1)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = RESULTS / stamp.strftime("%Y%m%dT%H%M%SZ")
    json_path = base.with_suffix(".json")
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    png = None
    try:
        png = plot.plot(results, base.with_suffix(".png"))
    except ImportError as e:
        say(f"no plot: {e} (pip install -r bench/requirements.txt)")
    print(report.render(results))
    print()
    print(f"results: {json_path.relative_to(ROOT)}" + (f", plot: {png.relative_to(ROOT)}" if png else ""))
    for e in results.get("errors", []):
        say(f"error in {e['phase']}: {e['error']}")
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
