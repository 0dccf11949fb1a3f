"""`make demo`: the main job on local defaults, start to finish, in one command.

Starts the mock webhook (verifying signatures) and alertd under ./var/demo,
drops a 200,000-row CSV into the inbox, shows progress, prints one result
line, stops both and exits non-zero if any count is wrong.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
from alertd import commands, config  # noqa: E402

from bench.gen_csv import generate  # noqa: E402
from tests.procs import to_toml  # noqa: E402

SECRET = "whsec_ZGVtby1zZWNyZXQtZm9yLWFsZXJ0ZC1tYWtlLWRlbW8="  # demo only


def start_mock(var: Path, engine: str) -> tuple[subprocess.Popen, int]:
    log = open(var / "mock.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "mock_webhook", "--port", "0", "--secret", SECRET,
                          "--engine", engine],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    line = p.stdout.readline()  # the mock prints its address once it listens
    if "listening on" not in line:
        p.kill()
        sys.exit(f"demo: mock webhook did not start: {line!r} (see {var}/mock.log)")
    port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
    return p, port


def mock_stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
        return json.load(r)


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise SystemExit(f"demo: timed out waiting for {what}")


def stop(p: subprocess.Popen) -> int:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    try:
        return p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        return p.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--mock-engine", choices=("fast", "aiohttp"), default="fast",
                    help="the mock webhook's engine (aiohttp: the slow one, for comparison)")
    args = ap.parse_args()
    var = ROOT / "var" / "demo"
    shutil.rmtree(var, ignore_errors=True)
    var.mkdir(parents=True)
    mock, port = start_mock(var, args.mock_engine)
    mock_proc = psutil.Process(mock.pid)
    cfg_path = var / "alertd.toml"
    cfg_path.write_text("# written by `make demo`\n" + to_toml({
        "paths": {"state_dir": "state"},
        "webhook": {"url": f"http://127.0.0.1:{port}/hooks/alerts", "secrets": [SECRET]},
        "workers": {"count": args.workers}}))
    cfg = config.load(cfg_path)
    alertd_log = open(var / "alertd.log", "w")
    alertd = subprocess.Popen([sys.executable, "-m", "alertd", "run", "--config", str(cfg_path)],
                              cwd=ROOT, stderr=alertd_log)
    rc = 1
    try:
        def ready():
            try:
                return commands.fetch_status(cfg, timeout=1)
            except commands.Unavailable:
                if alertd.poll() is not None:
                    raise SystemExit(f"demo: alertd exited with {alertd.returncode} "
                                     f"(see {var}/alertd.log)") from None
                return None
        wait_for(ready, 60, "alertd to start")
        inbox = cfg.paths.inbox_dir
        print(f"demo: mock webhook ({args.mock_engine} engine) on 127.0.0.1:{port}, "
              f"alertd with {args.workers} workers, "
              f"state in {cfg.state_dir.relative_to(ROOT)}")
        generate(str(inbox / "demo.csv"), args.rows, seed=1)
        print(f"demo: dropped {args.rows} rows into {inbox.relative_to(ROOT)}/demo.csv")
        done = cfg.state_dir / "done"
        summary_path = None
        tty, next_line = sys.stdout.isatty(), 0.0
        while summary_path is None:
            found = sorted(done.glob("*.summary.json"))
            if found:
                summary_path = found[0]
                break
            st = ready()
            sent = sum(w["delivered"] for w in st["workers"])
            # A terminal gets one line redrawn; a log (CI, a pipe) one line every 2 s.
            if tty:
                print(f"\r  delivered {sent:>8}/{args.rows}", end="", flush=True)
            elif time.monotonic() >= next_line:
                print(f"  delivered {sent:>8}/{args.rows}", flush=True)
                next_line = time.monotonic() + 2.0
            time.sleep(0.5)
        print(f"{chr(13) if tty else ''}  delivered {args.rows:>8}/{args.rows}")
        s = json.loads(summary_path.read_text())
        stats = mock_stats(port)
        from datetime import datetime
        t0 = datetime.fromisoformat(s["started_at"].replace("Z", "+00:00"))
        t1 = datetime.fromisoformat(s["finished_at"].replace("Z", "+00:00"))
        secs = (t1 - t0).total_seconds()
        cpu = mock_proc.cpu_times()
        mock_us = (cpu.user + cpu.system) / max(stats["received"], 1) * 1e6
        print(f"demo: mock webhook verified {stats['received']} signatures, "
              f"{stats['unique']} unique ids, {mock_us:.0f} µs CPU per request")
        print(f"demo: delivered {s['delivered']}/{args.rows}, duplicates {stats['duplicates']}, "
              f"rejected {s['rejected']}, dead {s['dead']} in {secs:.1f} s "
              f"({s['delivered'] / secs:.0f}/s)")
        ok = (s["delivered"] == args.rows and s["rows"] == args.rows and s["dead"] == 0
              and s["rejected"] == 0 and stats["unique"] == args.rows
              and stats["duplicates"] == 0 and stats["bad_signatures"] == 0)
        if not ok:
            print(f"demo: counts are wrong: summary {s}, mock {stats}", file=sys.stderr)
        rc = 0 if ok else 1
    finally:
        code = stop(alertd)
        stop(mock)
        if code != 0:
            print(f"demo: alertd exited with {code} (see {var}/alertd.log)", file=sys.stderr)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
