"""Where a worker's time goes: py-spy on alertd's processes during a delivery to nginx.

python -m bench.profile [--workers N] [--rows N] [--seconds S]: prints the top
functions by own and by inclusive samples and writes a flamegraph SVG to
bench/results/. Needs py-spy (bench/requirements.txt) and ptrace rights.
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from tests.procs import ROOT, Alertd

from . import measure
from .gen_csv import generate
from .scenarios import bench_config
from .sink import SAMPLE_SECRET, Nginx

RESULTS = ROOT / "bench" / "results"


def _function(frame: str) -> str:
    # "name (file.py:123)" -> "name (file.py)": samples of one function add up over lines.
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def summarise(raw: Path, top: int = 20) -> str:
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = [_function(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return f"{raw.name}: no samples"
    out = [f"{raw.stem}: {total} samples", "  own time:"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in own.most_common(top)]
    out.append("  inclusive:")
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(top)]
    return "\n".join(out)


def _spy(exe: str, pid: int, seconds: float, fmt: str, out: Path) -> subprocess.Popen:
    return subprocess.Popen([exe, "record", "-p", str(pid), "-d", f"{seconds:g}", "-r", "250",
                             "--nonblocking", "-f", fmt, "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.profile", description=__doc__)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--rows", type=int, default=3_000_000)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args(argv)
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(exe):
        print("bench.profile: py-spy not found (pip install -r bench/requirements.txt)",
              file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="alertd-profile-"))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(parents=True, exist_ok=True)
    spies: list[subprocess.Popen] = []
    try:
        generate(str(work / "p.csv"), args.rows, seed=7)
        with Nginx(work, workers=os.cpu_count() or 2) as nginx:
            cfg = bench_config(work / "alertd-profile", nginx.url, SAMPLE_SECRET,
                               workers={"count": args.workers})
            with Alertd(cfg) as d:
                targets = [("supervisor", d.pid)] + [
                    (f"worker-{w['index']}", w["pid"]) for w in d.status()["workers"]]
                d.drop_link(work / "p.csv", "p.csv")
                time.sleep(1.0)  # past the claim: profile the steady state
                n0, c0 = d.delivered_now(), measure.cpu_split(d.pid)
                for name, pid in targets:
                    spies.append(_spy(exe, pid, args.seconds, "raw", work / f"{name}.txt"))
                # One flamegraph of the first worker, for the eye.
                svg = RESULTS / f"profile-{stamp}-worker.svg"
                spies.append(_spy(exe, targets[1][1], args.seconds, "flamegraph", svg))
                for s in spies:
                    s.wait(args.seconds + 60)
                n1, c1 = d.delivered_now(), measure.cpu_split(d.pid)
        n = max(n1 - n0, 1)
        print(f"{n} deliveries in the profiled window; CPU µs/delivery: " + ", ".join(
            f"{k} {(c1[k] - c0[k]) / n * 1e6:.1f}" for k in c1))
        print("(py-spy's sampling slows the processes it samples: use the shares, not the rate)")
        for name, _ in targets:
            raw = work / f"{name}.txt"
            print(summarise(raw) if raw.exists() else f"{name}: py-spy wrote nothing")
        print(f"flamegraph: {svg.relative_to(ROOT)}" if svg.exists() else "no flamegraph")
        return 0
    finally:
        for s in spies:
            if s.poll() is None:
                s.kill()
                s.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
