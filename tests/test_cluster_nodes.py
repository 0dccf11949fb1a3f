"""Cluster mode end to end: several `alertd run` nodes on one shared state dir and one real
redis-server, against the real mock webhook."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from alertd.commands import _UnixHTTPConnection
from prometheus_client.parser import text_string_to_metric_families

from bench.gen_csv import generate
from tests.helpers import TIMING, get_stats, post_json
from tests.procs import ROOT, Alertd, poll, write_config
from tests.test_status import validate

NODES = ("n1", "n2", "n3")
pytestmark = TIMING  # three daemons, a Redis and a mock each: never two at once


def node_config(tmp_path: Path, name: str, port: int, redis_url: str, **sections: dict) -> Path:
    """Node `name`'s config: the shared state dir tmp_path/state, its own WALs and socket."""
    cluster = {"redis": redis_url, "node": name, "lease": 3.0, **sections.pop("cluster", {})}
    return write_config(tmp_path / f"{name}.toml", port, cluster=cluster,
                        paths={"state_dir": str(tmp_path / "state")}, **sections)


def start_nodes(tmp_path: Path, alertd, port: int, redis_url: str, names=NODES,
                **sections: dict) -> dict[str, Alertd]:
    return {n: alertd(node_config(tmp_path, n, port, redis_url, **sections)) for n in names}


def planner_of(nodes: dict[str, Alertd], but: str = "") -> str:
    """The name of the node that plans (not `but`), once there is one."""
    return poll(lambda: next((n for n, a in nodes.items()
                              if n != but and a.status()["cluster"]["planner"]), None), 30,
                "a planner")


def _get(a: Alertd, path: str, want: int = 200) -> str:
    conn = _UnixHTTPConnection(str(a.cfg.node_dir / "alertd.sock"), 5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == want, (path, resp.status)
        return resp.read().decode()
    finally:
        conn.close()


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
    # The status document and the metrics of every node show the cluster.
    commands = 0
    for a in nodes.values():
        st = a.status()
        validate(st, "Status")
        assert len(st["cluster"]["nodes"]) == 3 and st["cluster"]["redis"] == "up"
        fams = {f.name: f for f in text_string_to_metric_families(_get(a, "/metrics"))}
        assert fams["alertd_cluster_nodes"].samples[0].value == 3
        assert fams["alertd_redis_up"].samples[0].value == 1
        commands += fams["alertd_redis_commands"].samples[0].value
    print(f"Redis commands per 1,000 deliveries: {commands * 1000 / rows:.1f} (whole run, "
          f"three nodes, idle seconds included)")


def test_a_node_with_another_rate_is_refused(tmp_path, mock, redis, alertd):
    port = mock()
    start_nodes(tmp_path, alertd, port, redis.url, names=("n1",), rate={"limit": 1000})
    cfg = node_config(tmp_path, "n2", port, redis.url, rate={"limit": 2000})
    r = subprocess.run([sys.executable, "-m", "alertd", "run", "--config", str(cfg)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "[rate]" in r.stderr and "cluster" in r.stderr, r.stderr



def _wal_rows(state: Path, node: str, job: str) -> int:
    return sum(line.count(f'"job":"{job}","ck"'.encode()) for wal in
               (state / "nodes" / node / "wal").glob("worker-*.wal")
               for line in [wal.read_bytes()])


def test_kill9_of_a_node_mid_job_its_chunks_are_reclaimed(tmp_path, mock, redis, alertd):
    rows, limit, lease = 150_000, 8_000, 3.0
    port = mock()
    nodes = start_nodes(tmp_path, alertd, port, redis.url, workers={"count": 1},
                        rate={"limit": limit})
    n1, n2 = nodes["n1"], nodes["n2"]
    generate(str(tmp_path / "big.csv"), rows, seed=12)
    n1.drop_link(tmp_path / "big.csv", "big.csv")
    poll(lambda: get_stats(port)["unique"] > rows // 4, 60, "a quarter of the rows")
    n2.kill9()  # the supervisor and its worker at once, as a power loss would
    killed_at = time.monotonic()
    [s] = n1.wait_summaries(1, timeout=lease + 60)
    took = time.monotonic() - killed_at
    stats = get_stats(port)
    print(f"kill -9 of n2 at 25%: the job ended {took:.1f} s later (lease {lease} s), "
          f"{stats['duplicates']} duplicates at the receiver")
    assert s["delivered"] + s["rejected"] == rows and stats["unique"] == s["delivered"]
    assert took <= lease + 30
    assert stats["duplicates"] <= 64 + 2 * 0.05 * limit  # in flight + one fsync interval
    v = n1.cli("verify", s["job"])
    assert v.returncode == 0, v.stdout + v.stderr
    # n2 comes back after its chunks were taken over: it writes nothing for them.
    before = _wal_rows(n1.state, "n2", s["job"])
    n2.start()
    poll(lambda: any(n["name"] == "n2" and n["age"] < 2 for n in
                     n2.status()["cluster"]["nodes"]), 30, "n2 to rejoin")
    assert _wal_rows(n1.state, "n2", s["job"]) == before
    assert n1.cli("verify", s["job"]).returncode == 0


def test_redis_killed_mid_job_nothing_is_sent_until_it_is_back(tmp_path, mock, redis, alertd):
    rows, limit = 60_000, 5_000
    port = mock()
    nodes = start_nodes(tmp_path, alertd, port, redis.url, workers={"count": 1},
                        rate={"limit": limit})
    n1 = nodes["n1"]
    generate(str(tmp_path / "big.csv"), rows, seed=13)
    n1.drop_link(tmp_path / "big.csv", "big.csv")
    poll(lambda: get_stats(port)["unique"] > rows // 5, 60, "a fifth of the rows")
    redis.kill9()

    def settled() -> int:
        # Requests in flight, and tokens leased before the kill (two leases of 50 ms of
        # the rate per node at most), end within moments: then nothing more may arrive.
        before = get_stats(port)["received"]
        time.sleep(0.3)
        return before if get_stats(port)["received"] == before else 0
    down = poll(settled, 10, "requests in flight at the kill to end")
    poll(lambda: "unreachable" in json.dumps(n1.status()["cluster"]), 10,
         "status to say redis is unreachable")
    health = json.loads(_get(n1, "/healthz", 503))
    assert not health["ok"] and "redis unreachable" in health["error"]
    time.sleep(4.5)  # Redis stays down 5 s: measuring that nothing is sent meanwhile
    assert get_stats(port)["received"] == down, "requests were sent while Redis was down"
    redis.restart()
    [s] = n1.wait_summaries(1, timeout=120)
    stats = get_stats(port)
    print(f"redis down 5 s mid-job: {down} received before, 0 during, job complete, "
          f"{stats['duplicates']} duplicates")
    assert s["delivered"] + s["rejected"] == rows and stats["unique"] == s["delivered"]
    assert stats["duplicates"] == 0
    assert n1.cli("verify", s["job"]).returncode == 0
    for a in nodes.values():
        assert "NOGROUP" not in a.log()


def test_three_nodes_keep_one_rate_limit_between_them(tmp_path, mock, redis, alertd):
    limit = 6000
    port = mock("--mode", "ratelimit", "--rate", str(limit))
    nodes = start_nodes(tmp_path, alertd, port, redis.url, workers={"count": 1},
                        rate={"limit": limit})
    n1 = nodes["n1"]
    generate(str(tmp_path / "big.csv"), 100_000, seed=14)
    n1.drop_link(tmp_path / "big.csv", "big.csv")
    poll(lambda: get_stats(port)["received"] > limit * 2, 30, "two seconds of sending")
    t0, r0 = time.monotonic(), get_stats(port)["received"]
    time.sleep(8)  # the measurement window of the steady rate, not a synchronisation
    t1, r1 = time.monotonic(), get_stats(port)["received"]
    rate = (r1 - r0) / (t1 - t0)
    stats = get_stats(port)
    print(f"3 nodes sharing rate.limit = {limit}: {rate:.0f}/s at the receiver over "
          f"{t1 - t0:.1f} s ({rate / limit:.4f}), by status {stats['by_status']}")
    assert abs(rate - limit) <= 0.01 * limit, rate
    assert "429" not in stats["by_status"], stats["by_status"]
    per = {n: a.status()["cluster"] for n, a in nodes.items()}
    assert all(len(c["nodes"]) == 3 for c in per.values())
    assert sum(c["planner"] for c in per.values()) == 1


def test_kill9_of_the_planner_another_node_takes_its_role(tmp_path, mock, redis, alertd):
    rows, limit, lease = 120_000, 8_000, 3.0
    port = mock()
    nodes = start_nodes(tmp_path, alertd, port, redis.url, workers={"count": 1},
                        rate={"limit": limit})
    planner = planner_of(nodes)
    p = nodes[planner]
    generate(str(tmp_path / "big.csv"), rows, seed=15)
    p.drop_link(tmp_path / "big.csv", "big.csv")
    poll(lambda: get_stats(port)["unique"] > rows // 4, 60, "a quarter of the rows")
    p.kill9()
    killed_at = time.monotonic()
    other = nodes[next(n for n in NODES if n != planner)]
    [s] = other.wait_summaries(1, timeout=2 * lease + 60)
    took = time.monotonic() - killed_at
    stats = get_stats(port)
    now = [n for n in NODES if n != planner and nodes[n].status()["cluster"]["planner"]]
    print(f"kill -9 of the planner at 25%: {now} took its role, the job ended {took:.1f} s "
          f"later, {stats['duplicates']} duplicates")
    assert len(now) == 1
    assert s["delivered"] + s["rejected"] == rows and stats["unique"] == s["delivered"]
    assert took <= 2 * lease + 30
    assert stats["duplicates"] <= 64 + 2 * 0.05 * limit
    v = other.cli("verify", s["job"])
    assert v.returncode == 0, v.stdout + v.stderr


def test_job_control_from_any_node_acts_on_every_node(tmp_path, mock, redis, alertd):
    port = mock()
    nodes = start_nodes(tmp_path, alertd, port, redis.url, workers={"count": 1},
                        rate={"limit": 3000})
    planner = planner_of(nodes)
    other = nodes[next(n for n in NODES if n != planner)]
    generate(str(tmp_path / "big.csv"), 60_000, seed=16)
    other.drop_link(tmp_path / "big.csv", "big.csv")
    views = poll(lambda: json.loads(other.cli("jobs", "--json").stdout)["jobs"], 30,
                 "the job listed on a node that does not plan")
    job = views[0]["job"]
    poll(lambda: get_stats(port)["unique"] > 3000, 30, "some rows delivered")
    r = other.cli("pause", job)
    assert r.returncode == 0 and "paused" in r.stdout, r.stdout + r.stderr
    time.sleep(1.0)  # pause takes effect within 1 s on every node
    held = get_stats(port)["received"]
    time.sleep(2.0)  # measuring that nothing more arrives while paused
    assert get_stats(port)["received"] == held
    assert other.cli("pause", job).returncode == 1  # already paused, said by the planner
    assert other.cli("cancel", "j999999").returncode == 1
    assert other.cli("resume", job).returncode == 0
    [s] = other.wait_summaries(1, timeout=120)
    stats = get_stats(port)
    assert s["delivered"] + s["rejected"] == 60_000 and stats["duplicates"] == 0
    text = other.cli("status").stdout
    assert all(n in text for n in NODES), text


def test_the_breaker_and_a_reload_are_the_clusters(tmp_path, mock, redis, alertd):
    port = mock("--mode", "fail")
    nodes = start_nodes(tmp_path, alertd, port, redis.url, names=("n1", "n2"),
                        workers={"count": 1}, retry={"max_attempts": 3, "base_delay": 0.01})
    n1 = nodes["n1"]
    n1.drop("down.csv", b"user_id\n" + b"".join(b"u%d\n" % i for i in range(2000)))
    poll(lambda: all(a.status()["breaker"]["state"] == "open" for a in nodes.values()), 30,
         "the breaker to be open on both nodes")
    r0, t0 = get_stats(port)["received"], time.monotonic()
    time.sleep(2.0)  # the window over which the probe rate is measured
    rate = (get_stats(port)["received"] - r0) / (time.monotonic() - t0)
    print(f"breaker open on both nodes: {rate:.1f} requests/s at the receiver")
    assert rate <= 6, rate  # two probes a second per node, nothing else
    post_json(port, "/control", {"mode": "ok"})
    [s] = n1.wait_summaries(1, timeout=60)
    assert s["delivered"] + s["dead"] == 2000 and s["dead"] <= 20
    # A reload may not change [rate] on one node only: refused, the running config kept.
    node_config(tmp_path, "n1", port, redis.url, workers={"count": 1},
                retry={"max_attempts": 3, "base_delay": 0.01}, rate={"limit": 1234})
    r = n1.cli("reload")
    assert r.returncode == 1 and "same on every node" in r.stdout + r.stderr, r.stdout + r.stderr
    assert n1.status()["rate"]["configured_limit"] == 0


def test_a_node_stopped_mid_job_leaves_its_chunks_to_the_others(tmp_path, mock, redis, alertd):
    rows, limit, lease = 100_000, 8_000, 3.0
    port = mock()
    nodes = start_nodes(tmp_path, alertd, port, redis.url, workers={"count": 1},
                        rate={"limit": limit})
    planner = planner_of(nodes)
    leaving = nodes[next(n for n in NODES if n != planner)]
    generate(str(tmp_path / "big.csv"), rows, seed=17)
    nodes[planner].drop_link(tmp_path / "big.csv", "big.csv")
    poll(lambda: get_stats(port)["unique"] > rows // 4, 60, "a quarter of the rows")
    assert leaving.stop() == 0  # a clean stop: drain, ack, leave the node list
    [s] = nodes[planner].wait_summaries(1, timeout=lease + 60)
    stats = get_stats(port)
    assert s["delivered"] + s["rejected"] == rows and stats["unique"] == s["delivered"]
    assert stats["duplicates"] == 0
    assert nodes[planner].cli("verify", s["job"]).returncode == 0


class Cut:
    """A TCP proxy to Redis for one node: `cut()` drops its connections and refuses new
    ones (the node is cut off from Redis, not from the receiver); `heal()` lets it back."""

    def __init__(self, port: int) -> None:
        import socket
        import threading

        self.target = port
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        self.open = True
        self.conns: list = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            if not self.open:
                c.close()
                continue
            u = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self.conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.close()
            except OSError:
                pass

    def cut(self) -> None:
        import socket

        self.open = False
        with self._lock:
            for s in self.conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.conns = []

    def heal(self) -> None:
        self.open = True


def test_a_node_cut_off_from_redis_writes_nothing_for_chunks_taken_from_it(
        tmp_path, mock, redis, alertd):
    rows, lease = 60_000, 3.0
    port = mock("--latency-ms", "20")  # a slow receiver: a chunk takes seconds per worker
    proxy = Cut(redis.port)
    via = f"redis://127.0.0.1:{proxy.port}/0"
    nodes = {n: alertd(node_config(tmp_path, n, port, via if n == "n2" else redis.url,
                                   workers={"count": 1, "concurrency": 32}))
             for n in NODES}
    planner = planner_of(nodes)
    n2 = nodes["n2"]
    if planner == "n2":  # the cut node must not be the planner: restart it as a worker node
        n2.stop()
        n2.start()
        planner = planner_of(nodes, but="n2")
    generate(str(tmp_path / "big.csv"), rows, seed=18)
    nodes[planner].drop_link(tmp_path / "big.csv", "big.csv")
    poll(lambda: n2.status()["workers"][0]["chunks"] > 0 and get_stats(port)["unique"] > 3000,
         60, "n2 to deliver a chunk")
    proxy.cut()  # n2 still reaches the receiver; with no rate limit it could send on
    poll(lambda: "fencing" in n2.log(), 30, "n2 to fence its claims")
    time.sleep(2 * lease)  # the others take its chunks over meanwhile (measured below)
    proxy.heal()
    [s] = nodes[planner].wait_summaries(1, timeout=120)
    stats = get_stats(port)
    print(f"n2 cut off from Redis mid-chunk: {stats['duplicates']} duplicates at the receiver")
    assert s["delivered"] + s["rejected"] == rows and stats["unique"] == s["delivered"]
    v = nodes[planner].cli("verify", s["job"])  # no row has two final outcomes
    assert v.returncode == 0, v.stdout + v.stderr
    assert stats["duplicates"] <= 32 + 64  # what was in flight at the fence, and its lease
