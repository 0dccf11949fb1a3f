"""Before/after in one run: wrk, then alertd from two source trees (and the pure row path)
against the same nginx, 1 and 2 workers, interleaved so both see the same machine.

python -m bench.ab --base DIR [--rows1 N] [--rows2 N] [--pure] [--json OUT]

DIR is a checkout (or `git archive`) of the reference commit: its `daemon/` is run as
package `alertd` through PYTHONPATH (the venv's editable install of this tree is found
after PYTHONPATH). Prints one line per run and the JSON of everything.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import scenarios
from .gen_csv import generate
from .sink import Nginx, run_wrk


@contextmanager
def _env(extra: dict[str, str]):  # noqa: ANN202 (a context manager of nothing)
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _package_dir(base: Path, work: Path) -> Path:
    """A directory holding `alertd` -> base/daemon, for PYTHONPATH."""
    pkg = work / "base-pkg"
    pkg.mkdir()
    (pkg / "alertd").symlink_to(base.resolve() / "daemon")
    return pkg


def wrk_with_cpu(url: str, work: Path, seconds: float) -> dict[str, Any]:
    """run_wrk (it measures wrk's CPU per request), without wrk's raw output."""
    w = run_wrk(url, work, seconds)
    w.pop("output", None)
    return w


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.ab", description=__doc__)
    ap.add_argument("--base", type=Path, required=True, help="reference source tree")
    ap.add_argument("--rows1", type=int, default=600_000)
    ap.add_argument("--rows2", type=int, default=900_000)
    ap.add_argument("--pure", action="store_true", help="also this tree with ALERTD_PURE_PYTHON=1")
    ap.add_argument("--timeout", type=float, default=90)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="alertd-ab-"))
    pkg = _package_dir(args.base, work)
    trees = [("before", {"PYTHONPATH": str(pkg)}), ("after", {})]
    if args.pure:
        trees.append(("after-pure", {"ALERTD_PURE_PYTHON": "1"}))
    data = {1: work / "w1.csv", 2: work / "w2.csv"}
    generate(str(data[1]), args.rows1, seed=1)
    generate(str(data[2]), args.rows2, seed=2)
    out: dict[str, Any] = {"load_before": os.getloadavg(), "runs": []}
    with Nginx(work, workers=os.cpu_count() or 2) as nginx:
        out["wrk"] = [wrk_with_cpu(nginx.url, work, 10)]
        print(f"wrk: {out['wrk'][0]['requests_per_s']:,.0f}/s, "
              f"{out['wrk'][0]['cpu_us_per_request']} µs CPU/request", flush=True)
        for workers in (1, 2):
            for label, extra in trees:
                with _env(extra):
                    r = scenarios.throughput(nginx, work, data[workers],
                                             args.rows1 if workers == 1 else args.rows2,
                                             workers, args.timeout, tag=f"-{label}")
                r.pop("series", None)
                r["tree"] = label
                out["runs"].append(r)
                wrk = out["wrk"][0]["requests_per_s"]
                print(f"{label:10s} {workers}w: {r['deliveries_per_s']:>9,.0f}/s "
                      f"({r['deliveries_per_s'] / wrk:.3f} x wrk), "
                      f"{r['cpu_us_per_delivery']} µs CPU/delivery, complete={r['complete']}, "
                      f"split={r['cpu_split_s']}", flush=True)
        out["wrk"].append(wrk_with_cpu(nginx.url, work, 10))
        print(f"wrk again: {out['wrk'][1]['requests_per_s']:,.0f}/s, "
              f"{out['wrk'][1]['cpu_us_per_request']} µs CPU/request", flush=True)
    out["load_after"] = os.getloadavg()
    text = json.dumps(out, indent=1, default=str)
    if args.json:
        args.json.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
