"""First contact: what an operator sees when a start cannot work. Each refusal is exit 2
and one line naming the thing, and leaves behind nothing that this start created."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from alertd import commands, config

from tests.procs import ROOT, Alertd, poll, write_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_refused(cfg: Path, timeout: float = 30, **env: str) -> tuple[int, list[str]]:
    """`alertd run` that is expected to refuse: (exit code, stderr lines). A daemon that
    starts instead is stopped (and the test fails on its exit code)."""
    p = subprocess.Popen([sys.executable, "-m", "alertd", "run", "--config", str(cfg)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **env})
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for c in psutil.Process(p.pid).children(recursive=True):
            c.kill()
        p.send_signal(signal.SIGKILL)
        out, err = p.communicate()
        return -1, [f"still running after {timeout} s (not refused)"]
    return p.returncode, err.splitlines()


def test_status_port_in_use_is_one_line_and_leaves_nothing(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = write_config(tmp_path / "a.toml", 1,
                           status={"listen": f"127.0.0.1:{port}", "token": "t-1"})
        cfg.chmod(0o600)  # it holds a token: else a warning line comes first
        code, err = run_refused(cfg)
    assert code == 2, err
    assert err == [f"alertd: config: [status] listen 127.0.0.1:{port}: address already in use "
                   "(another process listens there)"]
    assert not (tmp_path / "state").exists()  # this start made it, and removed it


def test_a_live_daemons_socket_is_not_taken_over(tmp_path, mock, alertd):
    port = mock()
    first = alertd(write_config(tmp_path / "first.toml", port, paths={"state_dir": "one"}))
    sock = first.state / "alertd.sock"
    cfg = write_config(tmp_path / "second.toml", port, paths={"state_dir": "two"},
                       status={"listen": str(sock)})
    code, err = run_refused(cfg)
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith(f"alertd: config: [status] listen {sock}: "
                                               "another process") and "own [status] listen" in err[0]
    assert first.status()["pid"] == first.proc.pid  # still reachable on its socket
    assert not (tmp_path / "two").exists()
    assert first.stop() == 0

    # Now nobody answers: the socket file left behind is stale and is replaced.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()
    assert sock.is_socket()
    second = alertd(cfg)
    assert commands.fetch_status(config.load(cfg))["pid"] == second.proc.pid
    assert second.stop() == 0


def test_no_config_says_how_to_point_at_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ALERTD_CONFIG"}
    default = config.DEFAULT_CONFIG_PATH
    if os.path.exists(default):
        pytest.skip(f"{default} exists on this machine")
    for args in (["run"], ["status"], ["tail"]):
        p = subprocess.run([sys.executable, "-m", "alertd", *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 2
        [line] = p.stderr.splitlines()
        assert line.startswith(f"alertd: config: {default}: no such file; ")
        for hint in ("--config FILE", "ALERTD_CONFIG=FILE", "systemd/alertd.toml"):
            assert hint in line, line

    # ALERTD_CONFIG is honoured: this config is read (no daemon: exit 3, not 2).
    cfg = write_config(tmp_path / "a.toml", 1)
    p = subprocess.run([sys.executable, "-m", "alertd", "status"], cwd=ROOT,
                       env={**env, "ALERTD_CONFIG": str(cfg)}, capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 3 and "cannot reach alertd" in p.stderr
    # A config that exists but is wrong gets no such hint.
    (tmp_path / "b.toml").write_text("[rate]\nlimit = 1\n")
    p = subprocess.run([sys.executable, "-m", "alertd", "run", "--config",
                        str(tmp_path / "b.toml")], cwd=ROOT, capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 2 and "ALERTD_CONFIG" not in p.stderr


def test_a_mistyped_inbox_is_an_error_not_a_new_tree(tmp_path):
    inbox = tmp_path / "incomming" / "inbox"
    cfg = write_config(tmp_path / "a.toml", 1, paths={"inbox": str(inbox)})
    code, err = run_refused(cfg)
    assert code == 2
    assert err == [f"alertd: config: [paths] inbox {inbox}: its parent folder {inbox.parent} "
                   "does not exist (a typo? create it first)"]
    assert not inbox.parent.exists() and not (tmp_path / "state").exists()


@pytest.mark.parametrize("which", ["inbox", "state_dir"])
def test_a_file_where_a_folder_should_be_says_so(tmp_path, which):
    state = tmp_path / "state"
    target = tmp_path / "inbox" if which == "inbox" else state
    target.write_text("not a folder\n")
    cfg = write_config(tmp_path / "a.toml", 1, paths={"inbox": str(tmp_path / "inbox")})
    code, err = run_refused(cfg)
    assert code == 2
    assert err == [f"alertd: config: [paths] {which} {target} exists and is not a folder"]
    if which == "inbox":
        assert not state.exists()  # made by this start before the inbox was checked: removed


def test_inbox_on_another_filesystem_is_refused_and_cleaned_up(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test folder")
    inbox = shm / f"alertd-test-{os.getpid()}-{time.monotonic_ns()}"
    cfg = write_config(tmp_path / "a.toml", 1, paths={"inbox": str(inbox)})
    try:
        code, err = run_refused(cfg)
        assert code == 2
        assert err == [f"alertd: config: [paths] inbox {inbox} must be on the same filesystem "
                       f"as state_dir {tmp_path / 'state'}"]
        assert not inbox.exists() and not (tmp_path / "state").exists()
        # What existed before the start stays.
        inbox.mkdir()
        (tmp_path / "state").mkdir()
        code, _ = run_refused(cfg)
        assert code == 2 and inbox.is_dir() and (tmp_path / "state").is_dir()
        assert sorted(os.listdir(tmp_path / "state")) == []
    finally:
        if inbox.exists():
            inbox.rmdir()


def test_a_refused_start_keeps_a_running_daemons_state(tmp_path, mock, alertd):
    """The lock refusal (exit 1): the running daemon's folders and lock are untouched."""
    a = alertd(write_config(tmp_path / "a.toml", mock()))
    before = sorted(os.listdir(a.state))
    code, err = run_refused(a.cfg_path)
    assert code == 1 and err == [f"alertd: another alertd is already running on {a.state}"]
    assert sorted(os.listdir(a.state)) == before
    poll(lambda: a.status()["pid"] == a.proc.pid, 5, "the first daemon to answer")
    assert isinstance(a, Alertd) and a.stop() == 0
