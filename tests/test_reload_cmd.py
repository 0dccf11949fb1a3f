"""`alertd reload` against a real `alertd run`: it validates the file itself (exit 2, no
HUP), signals the daemon found through the status API and waits for that daemon's own
result (0 live, 1 rejected with the daemon's reason), or exits 3 when nobody answers."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

import pytest

from tests.procs import ROOT, SECRET, Alertd, poll, write_config

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def reload_counts(a: Alertd) -> tuple[int, int]:
    r = a.status()["reload"]
    return r["succeeded"], r["failed"]


def test_a_good_config_is_live_when_reload_exits_0(tmp_path, mock, alertd):
    port = mock()
    cfg = write_config(tmp_path / "alertd.toml", port, rate={"limit": 100})
    a = alertd(cfg)
    write_config(cfg, port, rate={"limit": 250})
    r = a.cli("reload")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"reloaded {cfg.resolve()}" in r.stdout
    # No poll: the change is live by the time the command returns.
    st = a.status()
    assert st["rate"]["configured_limit"] == 250 and st["reload"]["ok"] is True
    assert reload_counts(a) == (1, 0)


def test_a_file_the_cli_rejects_exits_2_and_sends_nothing(tmp_path, mock, alertd):
    port = mock()
    cfg = write_config(tmp_path / "alertd.toml", port, rate={"limit": 100})
    a = alertd(cfg)
    cfg.write_text(cfg.read_text().replace("limit = 100", "limit = -1"))
    r = a.cli("reload")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip() == "alertd: config: [rate] limit must be >= 0, got -1"
    # Reloads run in order: had the bad file been signalled, the next result would
    # follow a failed one.
    write_config(cfg, port, rate={"limit": 300})
    assert a.cli("reload").returncode == 0
    assert reload_counts(a) == (1, 0)
    assert a.status()["rate"]["configured_limit"] == 300


def test_an_older_failure_is_not_taken_for_this_reload(tmp_path, mock, alertd):
    port = mock()
    cfg = write_config(tmp_path / "alertd.toml", port)
    a = alertd(cfg)
    cfg.write_text(cfg.read_text().replace("[rate]", "") + "[rate]\nlimit = -5\n")
    a.proc.send_signal(signal.SIGHUP)  # a plain HUP with a broken file: recorded as failed
    poll(lambda: reload_counts(a) == (0, 1), 10, "the failed HUP reload")
    write_config(cfg, port, rate={"limit": 40})
    r = a.cli("reload")
    assert r.returncode == 0, r.stdout + r.stderr
    assert reload_counts(a) == (1, 1) and a.status()["rate"]["configured_limit"] == 40


def _drop_dac_caps() -> None:
    """Run as root without the capabilities that bypass file modes, as the unit does
    (CapabilityBoundingSet= empty): files are then checked by owner, group and mode."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the daemon runs without the "
                    "capabilities root's `alertd reload` has")
def test_a_file_only_the_daemon_cannot_read_exits_1_with_its_reason(tmp_path, mock, alertd):
    """The operator's root can read the new secrets file, the capability-less daemon
    cannot: the command passes its own check, the daemon refuses and keeps running."""
    port = mock()
    ok = tmp_path / "secrets"
    ok.write_text(SECRET + "\n")
    ok.chmod(0o600)
    cfg = write_config(tmp_path / "alertd.toml", port, webhook={"secrets_file": str(ok)})
    a = alertd(cfg, start=False)
    with open(a.log_path, "a") as log:
        a.proc = subprocess.Popen([sys.executable, "-m", "alertd", "run", "--config", str(cfg)],
                                  cwd=ROOT, stdout=log, stderr=log, preexec_fn=_drop_dac_caps)
    poll(a._ready, 60, "alertd to be ready")
    rotated = tmp_path / "secrets.new"
    rotated.write_text(SECRET + "\n")
    rotated.chmod(0o600)
    os.chown(rotated, 65534, 65534)  # nobody's: the daemon's root without DAC caps is "other"
    write_config(cfg, port, webhook={"secrets_file": str(rotated)})
    r = a.cli("reload")
    assert r.returncode == 1, r.stdout + r.stderr
    st = a.status()
    reason = st["reload"]["error"]
    assert st["reload"]["ok"] is False
    assert reason.startswith(f"config: [webhook] secrets_file {rotated}: ") \
        and "Permission denied" in reason, reason
    assert r.stderr == f"alertd: reload failed, the daemon keeps its running config: {reason}\n"
    assert a.proc.poll() is None
    a.drop("x.csv", b"user_id\nu1\n")  # still delivering, on the old secret
    [s] = a.wait_summaries(1, timeout=30)
    assert s["delivered"] == 1


def test_no_daemon_exits_3(tmp_path):
    cfg = write_config(tmp_path / "alertd.toml", 9)
    a = Alertd(cfg)
    r = a.cli("reload")
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stderr.startswith("alertd: cannot reach alertd at ") and r.stderr.count("\n") == 1


def test_another_file_than_the_daemons_exits_2(tmp_path, mock, alertd):
    port = mock()
    a = alertd(write_config(tmp_path / "alertd.toml", port))
    other = tmp_path / "other.toml"
    other.write_text(a.cfg_path.read_text())
    r = subprocess.run([sys.executable, "-m", "alertd", "reload", "--config", str(other)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"runs {a.cfg_path.resolve()}, not {other.resolve()}" in r.stderr
    assert reload_counts(a) == (0, 0)
