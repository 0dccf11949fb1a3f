"""The checks of `make test-systemd`, run as root inside the booted container.

systemd 252 is PID 1 here; the checkout is /src (read-only), the wheelhouse /wheels,
and /out is where the results go: one `PASS name` or `FAIL name: why` line per check.
Stdlib only (it runs on the image's python3 before anything is installed). Every wait
is bounded. Not collected by pytest: boot-test.sh starts it through a unit.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

OUT = Path("/out")
SRC = Path("/src")
VENV = Path("/opt/alertd/.venv")
ALERTD = VENV / "bin" / "alertd"
CONF_DIR = Path("/etc/alertd")
CONF = CONF_DIR / "alertd.toml"
SECRETS = CONF_DIR / "secrets"
STATE = Path("/var/lib/alertd")
INBOX = STATE / "inbox"
SECRET = "whsec_dGVzdC1zZWNyZXQtZm9yLWFsZXJ0ZC10ZXN0cw=="
UNIT = "alertd.service"
WATCHDOG_SEC, ABORT_SEC, RESTART_SEC = 30, 10, 2  # as in systemd/alertd.service

results: list[tuple[str, bool, str]] = []


class Failed(Exception):
    pass


def record(name: str, ok: bool, detail: str = "") -> None:
    line = f"PASS {name}" if ok else f"FAIL {name}: {detail}"
    results.append((name, ok, detail))
    print(line, flush=True)
    with open(OUT / "results", "a") as f:
        f.write(line.replace("\n", " | ") + "\n")


def check(name: str, fn: Callable[[], str | None]) -> bool:
    """Run one check; a Failed or any exception is its FAIL line, never the end of the run."""
    t = time.monotonic()
    try:
        note = fn()
    except Failed as e:
        record(name, False, str(e))
        return False
    except Exception as e:  # a bug in a check is a failure too, with where it happened
        record(name, False, f"{type(e).__name__}: {e} ({traceback.format_exc(limit=-1).strip()})")
        return False
    record(name, True, "")
    with open(OUT / "timings", "a") as f:
        f.write(f"{name}: {time.monotonic() - t:.1f} s{'; ' + note if note else ''}\n")
    return True


def expect(cond: Any, why: str) -> None:
    if not cond:
        raise Failed(why)


def run(*cmd: str, timeout: float = 120, user: str | None = None,
        input: str | None = None) -> subprocess.CompletedProcess:
    if user is not None:
        cmd = ("runuser", "-u", user, "--", *cmd)
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    except subprocess.TimeoutExpired:
        raise Failed(f"{' '.join(cmd)} did not finish within {timeout} s") from None


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise Failed(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def prop(name: str) -> str:
    return run("systemctl", "show", "-p", name, "--value", UNIT).stdout.strip()


def active() -> str:
    return run("systemctl", "is-active", UNIT).stdout.strip()


def status() -> dict[str, Any] | None:
    r = run(str(ALERTD), "status", "--json", "--config", str(CONF), timeout=20)
    return json.loads(r.stdout) if r.returncode == 0 else None


def cursor() -> str:
    out = run("journalctl", "-n", "0", "--show-cursor", "-q").stdout
    m = re.search(r"-- cursor: (\S+)", out)
    return m.group(1) if m else ""


def journal(after: str = "") -> str:
    args = ["journalctl", "-u", UNIT, "--no-pager", "-o", "cat"]
    if after:
        args += ["--after-cursor", after]
    return run(*args).stdout


def write_config(port: int, limit: float | str) -> None:
    text = (f'[paths]\nstate_dir = "{STATE}"\n\n'
            f'[webhook]\nurl = "http://127.0.0.1:{port}/hook"\ntimeout = 5.0\n'
            f'secrets_file = "{SECRETS}"\n\n'
            f'[rate]\nlimit = {limit}\n\n[workers]\ncount = 2\n\n'
            f'[retry]\nbase_delay = 0.05\nmax_delay = 1.0\n')
    tmp = CONF.with_name(".alertd.toml.tmp")
    tmp.write_text(text)
    os.chown(tmp, 0, group_id("alertd"))
    tmp.chmod(0o640)
    os.replace(tmp, CONF)


def group_id(name: str) -> int:
    import grp
    return grp.getgrnam(name).gr_gid


class Mock:
    """mock_webhook from the checkout, on the install's venv (it has aiohttp)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [str(VENV / "bin" / "python"), "-m", "mock_webhook", "--port", "0", "--secret", SECRET],
            cwd=SRC, env={**os.environ, "PYTHONPATH": str(SRC), "PYTHONDONTWRITEBYTECODE": "1"},
            stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        m = re.search(r"listening on http://[^:]+:(\d+)/", line)
        if m is None:
            raise Failed(f"mock_webhook did not start: {line!r}")
        self.port = int(m.group(1))

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=5) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# ---------------------------------------------------------------- the checks


def install() -> str:
    r = run("make", "-C", str(SRC), "install-systemd",
            "PIP_OPTS=--no-index --find-links /wheels", timeout=600)
    expect(r.returncode == 0, f"make install-systemd exited {r.returncode}: "
                              f"{(r.stdout + r.stderr)[-1500:]}")
    r = run("systemd-analyze", "verify", "--man=no", f"/etc/systemd/system/{UNIT}")
    expect(r.returncode == 0 and not r.stderr.strip(), f"verify: {r.stderr.strip()}")
    expect(not list((VENV / "lib").glob("python3*/site-packages/mock_webhook")),
           "mock_webhook was installed")
    return None


def configure(mock: Mock) -> None:
    SECRETS.write_text(SECRET + "\n")
    os.chown(SECRETS, 0, group_id("alertd"))
    SECRETS.chmod(0o640)
    write_config(mock.port, 1000)
    for user in ("producer1", "producer2"):
        if run("getent", "passwd", user).returncode != 0:
            r = run("useradd", "--create-home", "--groups", "alertd-producers", user)
            expect(r.returncode == 0, f"useradd {user}: {r.stderr}")


def start() -> str:
    t = time.monotonic()
    r = run("systemctl", "start", UNIT, timeout=120)
    took = time.monotonic() - t
    expect(r.returncode == 0, f"systemctl start exited {r.returncode}: {r.stderr.strip()}; "
                              f"journal: {journal()[-1500:]}")
    expect(active() == "active", f"is-active says {active()!r}")
    st = status()
    expect(st and len(st["workers"]) == 2 and all(w["ready"] for w in st["workers"]),
           f"READY before every worker was up: {st and st['workers']}")
    return f"systemctl start returned after {took:.1f} s"


def modes() -> None:
    def mode(p: Path) -> tuple[str, str, str]:
        import grp
        import pwd
        st = p.stat()
        return (f"{st.st_mode & 0o7777:04o}", pwd.getpwuid(st.st_uid).pw_name,
                grp.getgrgid(st.st_gid).gr_name)
    want = {STATE: ("0751", "alertd", "alertd"), INBOX: ("3770", "alertd", "alertd-producers"),
            CONF_DIR: ("0750", "root", "alertd"), CONF: ("0640", "root", "alertd")}
    got = {p: mode(p) for p in want}
    expect(got == want, f"modes: {got}")


def deliver(mock: Mock, name: str) -> None:
    before = mock.stats()["received"]
    rows = 50
    data = "user_id\n" + "".join(f"u{i}\n" for i in range(rows))
    # The way a producer should write: a hidden temporary name, then a rename.
    r = run("sh", "-c", f"umask 027 && cat > {INBOX}/.{name}.tmp && mv {INBOX}/.{name}.tmp "
            f"{INBOX}/{name}", user="producer1", input=data)
    expect(r.returncode == 0, f"producer1 could not drop a file: {r.stderr.strip()}")

    def summary() -> dict[str, Any] | None:
        for p in (STATE / "done").glob("*.summary.json"):
            s = json.loads(p.read_text())
            if s["file"] == name:
                return s
        return None
    s = wait_for(summary, 60, f"the job summary of {name}")
    expect((s["rows"], s["delivered"], s["dead"], s["rejected"]) == (rows, rows, 0, 0),
           f"summary {s}")
    st = mock.stats()
    expect(st["received"] - before == rows and st["bad_signatures"] == 0, f"mock stats {st}")
    return None


def producers_see_nothing_else() -> None:
    denied = {
        "read the config": ("cat", str(CONF)),
        "read the secrets": ("cat", str(SECRETS)),
        "list the state directory": ("ls", str(STATE)),
        "list the WALs": ("ls", str(STATE / "wal")),
        "list done/": ("ls", str(STATE / "done")),
        "use the status API": (str(ALERTD), "status", "--config", "/dev/null"),
    }
    allowed = []
    for what, cmd in denied.items():
        if cmd[0] == str(ALERTD):  # no config to read: ask the socket directly
            cmd = ("python3", "-c", "import socket; s = socket.socket(socket.AF_UNIX); "
                   f"s.connect('{STATE / 'alertd.sock'}')")
        if run(*cmd, user="producer1").returncode == 0:
            allowed.append(what)
    expect(not allowed, f"a producer can {', '.join(allowed)}")
    # Sticky inbox: producer2 cannot delete or rename producer1's (hidden, unclaimed) file.
    r = run("sh", "-c", f"umask 027 && echo x > {INBOX}/.p1.tmp", user="producer1")
    expect(r.returncode == 0, f"producer1 cannot write the inbox: {r.stderr.strip()}")
    try:
        rm = run("rm", "-f", str(INBOX / ".p1.tmp"), user="producer2")
        mv = run("mv", str(INBOX / ".p1.tmp"), str(INBOX / ".p2.tmp"), user="producer2")
        expect((INBOX / ".p1.tmp").exists() and rm.returncode != 0 and mv.returncode != 0,
               "producer2 removed or renamed producer1's file")
        gid = (INBOX / ".p1.tmp").stat().st_gid
        expect(gid == group_id("alertd-producers"), f"a dropped file's group is {gid}")
    finally:
        (INBOX / ".p1.tmp").unlink(missing_ok=True)


def reload_good(mock: Mock) -> None:
    write_config(mock.port, 500)
    r = run("systemctl", "reload", UNIT, timeout=60)
    expect(r.returncode == 0, f"systemctl reload exited {r.returncode}: {r.stderr.strip()}; "
                              f"journal: {journal()[-800:]}")
    st = status()
    expect(st and st["rate"]["configured_limit"] == 500 and st["reload"]["ok"] is True,
           f"the new config is not live: {st and (st['rate'], st['reload'])}")


def reload_broken(mock: Mock) -> None:
    pid = prop("MainPID")
    c = cursor()
    write_config(mock.port, -1)
    try:
        r = run("systemctl", "reload", UNIT, timeout=60)
        expect(r.returncode != 0, "systemctl reload of a broken config exited 0")
        expect(active() == "active" and prop("MainPID") == pid,
               f"unit {active()}, main pid {pid} -> {prop('MainPID')}")
        st = status()
        expect(st and st["rate"]["configured_limit"] == 500,
               f"the old config is gone: {st and st['rate']}")
        wait_for(lambda: "config: [rate] limit must be >= 0, got -1" in journal(c), 10,
                 "the config error in the journal")
    finally:
        write_config(mock.port, 500)


def reload_unreadable_secrets(mock: Mock) -> None:
    """root's `alertd reload` can read a secrets file the service cannot: the command's own
    check passes, the daemon refuses, and the command says why (exit 1)."""
    rotated = CONF_DIR / "secrets.root-only"
    rotated.write_text(SECRET + "\n")
    rotated.chmod(0o600)  # root:root: not the service's to read
    text = CONF.read_text()
    CONF.write_text(text.replace(str(SECRETS), str(rotated)))
    try:
        r = run(str(ALERTD), "reload", "--config", str(CONF), timeout=60)
        expect(r.returncode == 1 and "reload failed, the daemon keeps its running config: "
               f"config: [webhook] secrets_file {rotated}" in r.stderr
               and "Permission denied" in r.stderr, f"exit {r.returncode}: {r.stderr.strip()}")
        st = status()
        expect(active() == "active" and st and st["reload"]["ok"] is False
               and st["rate"]["configured_limit"] == 500, f"after the refused reload: {st}")
    finally:
        write_config(mock.port, 500)
        rotated.unlink()


def worker_crash() -> str:
    st = status()
    expect(st, "no status")
    main = prop("MainPID")
    restarts = prop("NRestarts")
    victim = st["workers"][0]
    os.kill(victim["pid"], signal.SIGKILL)

    def replaced() -> dict[str, Any] | None:
        s = status()
        ws = [w for w in (s or {}).get("workers", []) if w["index"] == victim["index"]]
        return ws[0] if ws and ws[0]["pid"] != victim["pid"] and ws[0]["ready"] else None
    t = time.monotonic()
    new = wait_for(replaced, 20, f"worker {victim['index']} (pid {victim['pid']}) replaced")
    expect(prop("MainPID") == main and prop("NRestarts") == restarts and active() == "active",
           "the unit restarted instead of the supervisor replacing its worker")
    return f"worker pid {victim['pid']} -> {new['pid']} in {time.monotonic() - t:.1f} s"


def stop() -> str:
    c = cursor()
    t = time.monotonic()
    r = run("systemctl", "stop", UNIT, timeout=120)
    took = time.monotonic() - t
    expect(r.returncode == 0, f"systemctl stop exited {r.returncode}")

    def stopped() -> str | None:
        j = journal(c)
        return j if "Deactivated successfully" in j or "Stopped alertd" in j else None
    text = wait_for(stopped, 10, "the stop in the journal")
    expect("SIGKILL" not in text, "systemd killed something: " + " | ".join(
        ln for ln in text.splitlines() if "SIGKILL" in ln))
    expect(prop("Result") == "success" and prop("ExecMainStatus") == "0",
           f"Result={prop('Result')} ExecMainStatus={prop('ExecMainStatus')}")
    return f"systemctl stop returned after {took:.1f} s"


def watchdog() -> str:
    main = prop("MainPID")
    restarts = int(prop("NRestarts"))
    c = cursor()
    t = time.monotonic()
    os.kill(int(main), signal.SIGSTOP)  # the loop can no longer ping
    bound = WATCHDOG_SEC + ABORT_SEC + RESTART_SEC + 30

    def restarted() -> bool:
        return int(prop("NRestarts")) > restarts and prop("MainPID") not in ("0", main) \
            and active() == "active"
    wait_for(restarted, bound, f"a restart by the watchdog (NRestarts {restarts}, pid {main})",
             interval=0.5)
    took = time.monotonic() - t
    j = journal(c)
    expect("Failed with result 'watchdog'" in j, f"no watchdog failure in the journal: {j[-600:]}")
    st = wait_for(status, 30, "the restarted daemon's status API")
    expect(str(st["pid"]) == prop("MainPID"), f"status pid {st['pid']} != MainPID")
    return f"restarted {took:.1f} s after SIGSTOP (WatchdogSec={WATCHDOG_SEC})"


def main() -> int:
    OUT.mkdir(exist_ok=True)
    (OUT / "results").write_text("")
    (OUT / "timings").write_text("")
    t0 = time.monotonic()
    mock = None
    try:
        if not check("install: make install-systemd (offline wheelhouse), unit verifies", install):
            return 1
        mock = Mock()
        configure(mock)
        if not check("start: systemctl start returns once READY; is-active", start):
            return 1
        check("modes: state 0751, inbox 3770 alertd:alertd-producers, /etc/alertd 0750", modes)
        check("deliver: a producer's file is claimed, signed and delivered",
              lambda: deliver(mock, "drop.csv"))
        check("permissions: a producer reads nothing of alertd's; sticky inbox",
              producers_see_nothing_else)
        check("reload: a good config -> systemctl reload 0, new config live",
              lambda: reload_good(mock))
        check("reload: a broken config -> non-zero, unit active on the old config",
              lambda: reload_broken(mock))
        check("reload as root: secrets the service cannot read -> exit 1 with the daemon's "
              "reason", lambda: reload_unreadable_secrets(mock))
        check("worker crash: kill -9 a worker, the supervisor replaces it", worker_crash)
        check("stop: systemctl stop, nothing SIGKILLed, exit 0", stop)
        if not check("start again", start):
            return 1
        check("watchdog: SIGSTOP the supervisor -> systemd kills and restarts it", watchdog)
        check("deliver after the watchdog restart", lambda: deliver(mock, "again.csv"))
    finally:
        with open(OUT / "timings", "a") as f:
            f.write(f"checks: {time.monotonic() - t0:.1f} s\n")
        (OUT / "journal.txt").write_text(run("journalctl", "-b", "--no-pager").stdout)
        run("systemctl", "stop", UNIT, timeout=120)
        if mock is not None:
            mock.stop()
        with open(OUT / "results", "a") as f:
            f.write("END\n")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
