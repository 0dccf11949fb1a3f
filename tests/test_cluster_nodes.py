"""Cluster mode end to end: several `alertd run` nodes on one shared state dir and one real
redis-server, against the real mock webhook."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench.gen_csv import generate
from tests.helpers import get_stats
from tests.procs import ROOT, Alertd, write_config

NODES = ("n1", "n2", "n3")


def node_config(tmp_path: Path, name: str, port: int, redis_url: str, **sections: dict) -> Path:
    """Node `name`'s config: the shared state dir tmp_path/state, its own WALs and socket."""
    cluster = {"redis": redis_url, "node": name, "lease": 3.0, **sections.pop("cluster", {})}
    return write_config(tmp_path / f"{name}.toml", port, cluster=cluster,
                        paths={"state_dir": str(tmp_path / "state")}, **sections)


def start_nodes(tmp_path: Path, alertd, port: int, redis_url: str, names=NODES,
                **sections: dict) -> dict[str, Alertd]:
    return {n: alertd(node_config(tmp_path, n, port, redis_url, **sections)) for n in names}


def delivered_by_node(state: Path, job: str) -> Counter:
    """Delivered rows of `job` per node, from each node's own WALs."""
    out: Counter = Counter()
    for wal in (state / "nodes").glob("*/wal/worker-*.wal"):
        node = wal.parent.parent.name
        for line in wal.read_bytes().splitlines():
            if b'"out":"delivered"' in line and f'"job":"{job}"'.encode() in line:
                out[node] += 1
    return out


def test_three_nodes_share_one_job_exactly_once(tmp_path, mock, redis, alertd):
    rows = 300_000
    port = mock()
    nodes = start_nodes(tmp_path, alertd, port, redis.url, workers={"count": 1},
                        rate={"limit": 20_000})
    n1 = nodes["n1"]
    generate(str(tmp_path / "big.csv"), rows, seed=11)
    n1.drop_link(tmp_path / "big.csv", "big.csv")
    [s] = n1.wait_summaries(1, timeout=180)
    stats = get_stats(port)
    per_node = delivered_by_node(n1.state, s["job"])
    print(f"3 nodes, {rows} rows: {dict(per_node)} delivered per node, receiver "
          f"{stats['unique']} unique, {stats['duplicates']} duplicates, "
          f"{s['duration_s']} s")
    assert s["delivered"] + s["rejected"] == rows and s["dead"] == 0
    assert stats["unique"] == s["delivered"] and stats["duplicates"] == 0
    assert set(per_node) == set(NODES)
    assert all(per_node[n] >= 0.15 * rows for n in NODES), per_node
    for name in ("n2", "n3"):  # verify from any node: every node's WAL is read
        v = nodes[name].cli("verify", s["job"])
        assert v.returncode == 0, v.stdout + v.stderr


def test_a_node_with_another_rate_is_refused(tmp_path, mock, redis, alertd):
    port = mock()
    start_nodes(tmp_path, alertd, port, redis.url, names=("n1",), rate={"limit": 1000})
    cfg = node_config(tmp_path, "n2", port, redis.url, rate={"limit": 2000})
    r = subprocess.run([sys.executable, "-m", "alertd", "run", "--config", str(cfg)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "[rate]" in r.stderr and "cluster" in r.stderr, r.stderr

