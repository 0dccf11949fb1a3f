"""systemd integration: the unit passes `systemd-analyze verify` and scores well in
`security --offline`; a real `alertd run` speaks sd_notify on a datagram socket the
test binds; logs carry journald priorities under JOURNAL_STREAM, or are JSON."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers import start_mock, stop_process
from tests.procs import ROOT, Alertd, poll, write_config

UNIT = ROOT / "systemd" / "alertd.service"
INSTALLED_EXEC = "/opt/alertd/.venv/bin/alertd"
MAX_EXPOSURE = 2.0  # systemd's scale: 0 = locked down ... 10 = fully exposed; < 2 is "OK"


def _analyze() -> str:
    """systemd-analyze, installed from apt in CI if missing (never on a developer's box)."""
    exe = shutil.which("systemd-analyze")
    if exe is None and os.environ.get("CI") == "true" and os.geteuid() == 0 \
            and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "systemd"],
                       capture_output=True, timeout=300,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd); in CI "
                    "(CI=true, root) this test installs it itself")
    return exe


@pytest.fixture
def unit_copy(tmp_path) -> Path:
    """The unit with ExecStart pointed at this checkout's alertd: verify insists that
    the binary exists, and /opt/alertd exists only after `make install-systemd`."""
    exe = Path(sys.executable).parent / "alertd"
    cmd = str(exe) if exe.exists() else f"{sys.executable} -m alertd"
    text = UNIT.read_text()
    assert INSTALLED_EXEC in text
    p = tmp_path / "alertd.service"
    p.write_text(text.replace(INSTALLED_EXEC, cmd))
    return p


def test_unit_verifies(unit_copy):
    exe = _analyze()
    p = subprocess.run([exe, "verify", "--man=no", str(unit_copy)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and not p.stderr.strip() and not p.stdout.strip(), p.stderr


def test_unit_security_exposure(unit_copy):
    exe = _analyze()
    p = subprocess.run([exe, "security", "--offline=true", "--no-pager",
                        f"--threshold={int(MAX_EXPOSURE * 10)}", str(unit_copy)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for alertd\.service: ([\d.]+) (\w+)", p.stdout)
    assert m, p.stdout + p.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE and p.returncode == 0, p.stdout


def test_unit_matches_the_daemon():
    """Settings the daemon relies on, and TimeoutStopSec beyond grace + the kill margin."""
    text = UNIT.read_text()
    keys = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))
    assert keys["Type"] == "notify"
    assert keys["ExecReload"] == f"{INSTALLED_EXEC} reload --config /etc/alertd/alertd.toml"
    assert keys["StateDirectoryMode"] == "0751" and keys["SupplementaryGroups"] == "alertd-producers"
    assert keys["ExecStart"] == f"{INSTALLED_EXEC} run --config /etc/alertd/alertd.toml"
    assert keys["StateDirectory"] == "alertd" and keys["ConfigurationDirectory"] == "alertd"
    assert keys["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6"
    from alertd import config
    cfg = config.load(ROOT / "systemd" / "alertd.toml")
    assert str(cfg.state_dir) == "/var/lib/alertd"
    assert int(keys["TimeoutStopSec"].rstrip("s")) > cfg.shutdown.grace + 10
    make = (ROOT / "Makefile").read_text()
    assert "install-systemd:" in make and "systemd/alertd.service" in make


class NotifySocket:
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append(dict(line.split("=", 1) for line in
                                      data.decode().splitlines() if "=" in line))

    def index(self, key: str, start: int = 0) -> int | None:
        for i, m in enumerate(self.messages[start:], start):
            if key in m:
                return i
        return None

    def wait(self, key: str, start: int = 0, timeout: float = 10) -> int:
        poll(lambda: self.index(key, start) is not None, timeout, f"{key} after message {start}")
        return self.index(key, start)

    def close(self) -> None:
        self._stop = True
        self._t.join(2)
        self.sock.close()


def test_sd_notify_ready_reloading_stopping_in_order(tmp_path):
    mock, port = start_mock()
    ns = NotifySocket(tmp_path / "notify.sock")
    a = Alertd(write_config(tmp_path / "alertd.toml", port))
    try:
        a.start(env={"NOTIFY_SOCKET": str(ns.path), "WATCHDOG_USEC": "1000000"})
        ready = ns.wait("READY")
        ns.wait("WATCHDOG", ready)
        a.proc.send_signal(signal.SIGHUP)
        rel = ns.wait("RELOADING", ready + 1)
        usec = int(ns.messages[rel]["MONOTONIC_USEC"])
        assert abs(usec / 1e6 - _monotonic()) < 10  # CLOCK_MONOTONIC, as systemd wants
        ns.wait("READY", rel + 1)
        assert a.stop(timeout=30) == 0
        stopping = ns.index("STOPPING", rel + 1)
        assert stopping is not None, ns.messages
        assert any("STATUS" in m for m in ns.messages)
        assert ns.messages[ready]["READY"] == "1" and ns.messages[rel]["RELOADING"] == "1"
    finally:
        if a.proc is not None and a.proc.poll() is None:
            a.stop()
        ns.close()
        stop_process(mock)


def _monotonic() -> float:
    import time
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def _run_briefly(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> list[str]:
    """Start alertd, drop one small file, stop it; return its stderr lines."""
    mock, port = start_mock()
    cfg = write_config(tmp_path / "alertd.toml", port)
    log = tmp_path / "stderr.log"
    log.touch()
    st = os.stat(log)
    env = {k: v.replace("{stream}", f"{st.st_dev}:{st.st_ino}") for k, v in (env or {}).items()}
    a = Alertd(cfg)
    a.log_path = log
    try:
        proc = subprocess.Popen([sys.executable, "-m", "alertd", "run", "--config", str(cfg),
                                 *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=open(log, "a"), env={**os.environ, **env})
        a.proc = proc
        poll(lambda: a._ready(), 30, "alertd ready")
        a.drop("x.csv", b"user_id\nu1\nu2\n")
        a.wait_summaries(1, timeout=30)
        assert a.stop() == 0
    finally:
        if a.proc is not None and a.proc.poll() is None:
            a.stop()
        stop_process(mock)
    return log.read_text().splitlines()


def test_journald_priorities_and_no_timestamps(tmp_path):
    lines = _run_briefly(tmp_path, env={"JOURNAL_STREAM": "{stream}"})
    assert lines and all(re.match(r"^<[0-7]>(supervisor|worker-\d+): ", ln) for ln in lines), lines
    assert any(ln.startswith("<6>supervisor: alertd ready") for ln in lines)
    assert not any(re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", ln) for ln in lines)


def test_journal_stream_of_another_file_is_ignored(tmp_path):
    """A JOURNAL_STREAM inherited by a process whose stderr goes elsewhere: plain text."""
    lines = _run_briefly(tmp_path, env={"JOURNAL_STREAM": "1:2"})
    assert lines and all(re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ", ln)
                         for ln in lines), lines


def test_log_format_json(tmp_path):
    lines = _run_briefly(tmp_path, "--log-format", "json")
    docs = [json.loads(ln) for ln in lines]
    assert docs and all({"ts", "level", "process", "msg"} <= d.keys() for d in docs)
    assert any(d["msg"].startswith("alertd ready") and d["level"] == "info" for d in docs)


# A stand-in for systemd's view of a stop: a child subreaper (as systemd is) starts the
# daemon and, once it has exited, lists whatever of it is still there. Anything that
# outlived the supervisor, alive or a zombie, is re-parented here; under systemd it would
# be SIGKILLed ("Killing process N (python3) with signal SIGKILL").
REAPER = r"""
import ctypes, json, os, subprocess, sys, time
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    raise SystemExit("prctl(PR_SET_CHILD_SUBREAPER) failed")
p = subprocess.Popen(sys.argv[1:], start_new_session=True)
print(p.pid, flush=True)
rc = p.wait()
left = []
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    try:
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        break
    if info is None:  # orphans still running: name them, end them
        for name in os.listdir("/proc"):
            try:
                with open(f"/proc/{name}/stat") as f:
                    if name.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                        cmd = open(f"/proc/{name}/cmdline").read().replace("\0", " ")
                        left.append(f"{name} {cmd or open(f'/proc/{name}/comm').read()} (alive)")
                        os.kill(int(name), 9)
            except (OSError, ValueError, IndexError):
                pass
        time.sleep(0.05)
        continue
    with open(f"/proc/{info.si_pid}/comm") as f:
        left.append(f"{info.si_pid} {f.read().strip()} (exited after the supervisor)")
    os.waitpid(info.si_pid, 0)
print(json.dumps({"rc": rc, "left": left}), flush=True)
"""


def test_term_leaves_no_process_behind_the_supervisor(tmp_path):
    """The supervisor exits last: workers and multiprocessing's resource tracker are gone
    before it, so a `systemctl stop` has nothing to SIGKILL."""
    mock, port = start_mock()
    cfg_path = write_config(tmp_path / "alertd.toml", port, shutdown={"grace": 5.0})
    from alertd import commands, config
    cfg = config.load(cfg_path)
    log = open(tmp_path / "alertd.log", "w")
    reaper = subprocess.Popen([sys.executable, "-c", REAPER, sys.executable, "-m", "alertd",
                               "run", "--config", str(cfg_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        pid = int(reaper.stdout.readline())
        poll(lambda: commands.ready(cfg), 60, "alertd ready")
        a = Alertd(cfg_path)
        a.drop("x.csv", b"user_id\nu1\nu2\n")
        a.wait_summaries(1, timeout=30)
        os.kill(pid, signal.SIGTERM)
        out, _ = reaper.communicate(timeout=5.0 + 10)
        doc = json.loads(out.strip().splitlines()[-1])
        assert doc["rc"] == 0, (tmp_path / "alertd.log").read_text()
        assert doc["left"] == [], doc["left"]
    finally:
        if reaper.poll() is None:
            reaper.kill()
            reaper.wait()
        log.close()
        stop_process(mock)
