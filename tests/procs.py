"""Running the real `alertd run` in tests: config files, start, wait, stop, kill -9.

Every wait polls a condition with a deadline; nothing sleeps to synchronise.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from alertd import commands, config

from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
SECRET = "whsec_dGVzdC1zZWNyZXQtZm9yLWFsZXJ0ZC10ZXN0cw=="


def poll(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """wait_until with the argument order these tests read best."""
    return wait_until(pred, timeout, interval=interval, what=what)


def write_config(path: Path, port: int, **sections: dict[str, Any]) -> Path:
    """A config with state in <path.parent>/state; `sections` override/add keys."""
    base: dict[str, dict[str, Any]] = {
        "paths": {"state_dir": "state"},
        "webhook": {"url": f"http://127.0.0.1:{port}/hook", "timeout": 5.0},
        "workers": {"count": 2},
        "retry": {"base_delay": 0.05, "max_delay": 1.0},
        "shutdown": {"grace": 10.0},
    }
    path.write_text(config.to_toml(base, sections))
    return path


class Alertd:
    """One `alertd run` process tree."""

    def __init__(self, cfg_path: Path) -> None:
        self.cfg_path = cfg_path
        self.cfg = config.load(cfg_path)
        self.proc: subprocess.Popen | None = None
        self.log_path = cfg_path.parent / "alertd.log"

    @property
    def state(self) -> Path:
        return self.cfg.state_dir

    def start(self, wait: bool = True, env: dict[str, str] | None = None) -> Alertd:
        with open(self.log_path, "a") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "alertd", "run", "--config", str(self.cfg_path)],
                cwd=ROOT, stdout=log, stderr=log, env={**os.environ, **(env or {})})
        if wait:
            poll(self._ready, 60, "alertd to be ready")
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"alertd exited with {self.proc.returncode}:\n{self.log()}")
        return commands.ready(self.cfg)

    def status(self) -> dict[str, Any]:
        return commands.fetch_status(self.cfg, timeout=2)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def pids(self) -> list[int]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            p = psutil.Process(self.proc.pid)
            return [p.pid] + [c.pid for c in p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.status()["workers"]]

    def sent_now(self) -> int:
        return sum(w["sent"] for w in self.status()["workers"])

    def delivered_now(self) -> int:
        return sum(w["delivered"] for w in self.status()["workers"])

    def kill9(self) -> None:
        """SIGKILL the supervisor and every worker at once, as a crash would."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        poll(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                             for p in pids), 10, "killed processes to vanish")

    def stop(self, timeout: float = 60) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for pid in self.pids():
                os.kill(pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"alertd did not stop within {timeout} s:\n{self.log()}") from None

    def drop(self, name: str, data: bytes) -> Path:
        """Write a file the way producers should: a temporary name, then rename."""
        inbox = self.cfg.paths.inbox_dir
        inbox.mkdir(parents=True, exist_ok=True)
        tmp = inbox / f".{name}.tmp"
        tmp.write_bytes(data)
        os.rename(tmp, inbox / name)
        return inbox / name

    def summaries(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted((self.state / "done").glob(
            "*.summary.json"))]

    def wait_summaries(self, n: int, timeout: float = 120) -> list[dict[str, Any]]:
        def enough() -> list[dict[str, Any]] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"alertd exited with {self.proc.returncode}:\n{self.log()}")
            s = self.summaries()
            return s if len(s) >= n else None
        return poll(enough, timeout, f"{n} job summaries", interval=0.1)

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "alertd", *args, "--config",
                               str(self.cfg_path)], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
