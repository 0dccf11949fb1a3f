"""Cluster mode against single-host mode, same machine, same minute: `python -m bench.cluster`.

Three runs against one fast mock webhook, each on a fresh state dir and (for the cluster
runs) a fresh redis-server with AOF: one node single-host, the same node in cluster mode,
three nodes in cluster mode. The same rate limit everywhere, set far above what the
machine reaches, so that the leased budget is exercised but never binds. Prints
deliveries/s, the ratios, and Redis commands per 1,000 deliveries, both as alertd counts
them (round trips) and as `INFO commandstats` does (which also counts the commands
scripts run inside Redis).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.gen_csv import generate
from tests.helpers import get_stats, start_mock, stop_process
from tests.procs import Alertd, write_config
from tests.redis_server import RedisServer

LIMIT = 1_000_000  # far above this machine's rate: the budget is leased, never the bound


def _run(work: Path, csv: Path, rows: int, port: int, nodes: int, redis: RedisServer | None,
         workers: int, limit: int) -> dict[str, Any]:
    state = work / "state"
    daemons = []
    for i in range(nodes):
        sections: dict[str, Any] = {"workers": {"count": workers}, "rate": {"limit": limit},
                                    "paths": {"state_dir": str(state)}}
        if redis is not None:
            sections["cluster"] = {"redis": redis.url, "node": f"n{i + 1}", "lease": 5.0}
        daemons.append(Alertd(write_config(work / f"n{i + 1}.toml", port, **sections)).start())
    try:
        before = redis.client().info("commandstats") if redis is not None else {}
        t0 = time.monotonic()
        daemons[0].drop_link(csv, "bench.csv")
        [s] = daemons[0].wait_summaries(1, timeout=600)
        took = time.monotonic() - t0
        out: dict[str, Any] = {"nodes": nodes, "cluster": redis is not None,
                               "rate": round(s["delivered"] / took), "seconds": round(took, 2)}
        if redis is not None:
            after = redis.client().info("commandstats")
            calls = sum(v["calls"] for v in after.values()) - \
                sum(v["calls"] for v in before.values())
            sent = sum(d.status()["cluster"]["commands"] for d in daemons)
            out["redis_calls_per_1000"] = round(calls * 1000 / s["delivered"], 2)
            out["round_trips_per_1000"] = round(sent * 1000 / s["delivered"], 2)
        return out
    finally:
        for d in daemons:
            d.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--workers", type=int, default=1, help="workers per node")
    ap.add_argument("--limit", type=int, default=LIMIT,
                    help="rate.limit of every run (default: far above what is reached)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="alertd-cluster-bench-") as tmp:
        tmpdir = Path(tmp)
        csv = tmpdir / "bench.csv"
        generate(str(csv), args.rows, seed=21)
        results = []
        for nodes, cluster in ((1, False), (1, True), (3, True)):
            mock, port = start_mock()
            redis = RedisServer(tmpdir / f"redis-{nodes}-{cluster}").start() if cluster else None
            try:
                r = _run(tmpdir / f"run-{nodes}-{cluster}", csv, args.rows, port, nodes, redis,
                         args.workers, args.limit)
                r["receiver_unique"] = get_stats(port)["unique"]
                results.append(r)
                print(r, flush=True)
            finally:
                stop_process(mock)
                if redis is not None:
                    redis.stop()
        single, one, three = results
        print(f"\ncluster 1 node / single host: {one['rate'] / single['rate']:.2f} "
              f"({one['rate']:,}/s vs {single['rate']:,}/s)")
        print(f"cluster 3 nodes / 1 node: {three['rate'] / one['rate']:.2f} "
              f"({three['rate']:,}/s on this 2-core machine)")
        for r in (one, three):
            print(f"{r['nodes']} node(s): Redis commands per 1,000 deliveries: "
                  f"{r['round_trips_per_1000']} round trips (alertd), "
                  f"{r['redis_calls_per_1000']} calls (INFO commandstats)")


if __name__ == "__main__":
    main()
