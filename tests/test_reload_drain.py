"""Reload (HUP) and drain (TERM) of a real `alertd run` under load, against the real mock:
every row reaches the endpoint exactly once whatever the signals, and status shows it."""
from __future__ import annotations

import signal
import time

from bench.gen_csv import generate
from tests.helpers import get_stats
from tests.procs import Alertd, poll, write_config


def reloads(a: Alertd) -> int:
    return a.status()["reload"]["succeeded"]


def assert_exactly_once(a: Alertd, port: int, rows: int) -> dict:
    [s] = a.wait_summaries(1, timeout=120)
    assert (s["rows"], s["delivered"], s["dead"], s["rejected"]) == (rows, rows, 0, 0), s
    stats = get_stats(port)
    assert (stats["unique"], stats["duplicates"]) == (rows, 0), stats
    r = a.cli("verify", s["job"])
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    return s


def test_ten_hups_alternating_rate_limits_deliver_every_row_once(tmp_path, mock, alertd):
    port = mock()
    cfg = tmp_path / "alertd.toml"
    a = alertd(write_config(cfg, port, rate={"limit": 20000}))
    generate(str(a.cfg.paths.inbox_dir / "big.csv"), 100_000, seed=9)
    for i in range(10):
        # Spread the HUPs over the job: each waits for more deliveries.
        poll(lambda i=i: a.status()["totals"]["delivered_live"] >= (i + 1) * 7_000, 60,
             f"{(i + 1) * 7_000} deliveries before HUP {i + 1}")
        limit = 0 if i % 2 == 0 else 20000
        write_config(cfg, port, rate={"limit": limit})
        t = time.time()
        a.proc.send_signal(signal.SIGHUP)
        poll(lambda i=i: reloads(a) == i + 1, 10, f"reload {i + 1} to apply")
        st = a.status()
        assert st["reload"]["ok"] is True and st["reload"]["at"] >= t - 1
        assert st["rate"]["limit"] == limit
    assert_exactly_once(a, port, 100_000)
    st = a.status()
    assert (st["reload"]["succeeded"], st["reload"]["failed"]) == (10, 0)
    assert a.cli("status").stdout.count("last reload ok") == 1


def test_a_broken_config_on_hup_keeps_the_running_one(tmp_path, mock, alertd):
    port = mock()
    cfg = tmp_path / "alertd.toml"
    a = alertd(write_config(cfg, port, rate={"limit": 5000}))
    generate(str(a.cfg.paths.inbox_dir / "b.csv"), 20_000, seed=1)
    poll(lambda: a.status()["totals"]["delivered_live"] > 2_000, 30, "delivery to start")
    cfg.write_text(cfg.read_text().replace("limit = 5000", "limit = -5"))
    a.proc.send_signal(signal.SIGHUP)
    st = poll(lambda: (d := a.status())["reload"]["failed"] == 1 and d, 10, "the failed reload")
    assert st["reload"]["ok"] is False
    assert st["reload"]["error"] == "config: [rate] limit must be >= 0, got -5"
    assert st["rate"]["limit"] == 5000  # still the old config
    assert "reload failed, keeping the running config" in a.log()
    # The file on disk is broken now; `alertd status` still reaches the daemon.
    r = a.cli("status")
    assert r.returncode == 0 and "warning: config: [rate] limit" in r.stderr
    assert "last reload FAILED" in r.stdout and "[rate] limit must be >= 0" in r.stdout
    assert_exactly_once(a, port, 20_000)
    assert a.proc.poll() is None


def test_hup_from_two_to_three_workers_replaces_the_generation(tmp_path, mock, alertd):
    port = mock()
    cfg = tmp_path / "alertd.toml"
    a = alertd(write_config(cfg, port, rate={"limit": 6000}))
    generate(str(a.cfg.paths.inbox_dir / "w.csv"), 40_000, seed=3)
    poll(lambda: a.status()["totals"]["delivered_live"] > 5_000, 30, "delivery to start")
    old = set(a.worker_pids())
    write_config(cfg, port, rate={"limit": 6000}, workers={"count": 3})
    a.proc.send_signal(signal.SIGHUP)

    def three_new() -> dict | None:
        st = a.status()
        ws = st["workers"]
        live = [w for w in ws if not w["retiring"] and w["ready"]]
        return st if len(ws) == 3 and len(live) == 3 and not old & {w["pid"] for w in ws} \
            else None
    st = poll(three_new, 60, "3 workers of the new generation and the old ones gone")
    assert st["generation"] == 1 and all(w["generation"] == 1 for w in st["workers"])
    assert_exactly_once(a, port, 40_000)


def test_term_mid_job_exits_0_within_grace_and_a_restart_finishes(tmp_path, mock, alertd):
    port = mock()
    grace = 5.0
    cfg = write_config(tmp_path / "alertd.toml", port, rate={"limit": 5000},
                       shutdown={"grace": grace})
    a = alertd(cfg)
    generate(str(a.cfg.paths.inbox_dir / "t.csv"), 30_000, seed=8)
    poll(lambda: a.status()["totals"]["delivered_live"] > 5_000, 30, "delivery to start")
    t = time.monotonic()
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(grace + 5) == 0
    assert time.monotonic() - t <= grace, "drain took longer than [shutdown] grace"
    assert not a.summaries()
    assert "draining" in a.log()
    b = alertd(cfg)
    assert_exactly_once(b, port, 30_000)


def test_a_hup_that_changes_paths_keeps_the_running_ones(tmp_path, mock, alertd):
    port = mock()
    cfg = tmp_path / "alertd.toml"
    a = alertd(write_config(cfg, port))
    other = tmp_path / "elsewhere"
    other.mkdir()
    write_config(cfg, port, paths={"state_dir": "state", "inbox": str(other)},
                 rate={"limit": 1234})
    a.proc.send_signal(signal.SIGHUP)
    poll(lambda: reloads(a) == 1, 10, "the reload")
    st = a.status()
    assert st["rate"]["configured_limit"] == 1234  # the rest of the file applied
    assert "apply only at restart; keeping the running ones" in a.log()
    # Files keep arriving through the inbox the daemon watches, and none is taken from the
    # folder the new file names (that takes a restart).
    (other / "ignored.csv").write_bytes(b"user_id\nx1\n")
    a.drop("kept.csv", b"user_id\nk1\nk2\n")
    [s] = a.wait_summaries(1, timeout=30)
    assert s["file"] == "kept.csv" and s["delivered"] == 2
    # An observation window, not a synchronisation: the periodic rescan (every 10 s) would
    # claim from the new folder if the reload had let [paths] through.
    time.sleep(11)
    assert (other / "ignored.csv").exists() and len(a.summaries()) == 1
