"""The one harness for running the real `alertd run`, in tests and in the benchmarks:
config files, start, wait, drop files, stop, kill -9.

Every wait polls a condition with a deadline; nothing sleeps to synchronise.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
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


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def to_toml(sections: dict[str, dict[str, Any]],
            overrides: dict[str, dict[str, Any]] | None = None) -> str:
    """Render {section: {key: value}}, with `overrides` merged key by key, as a config file."""
    sections = {name: dict(keys) for name, keys in sections.items()}
    for name, keys in (overrides or {}).items():
        sections.setdefault(name, {}).update(keys)
    return "".join(f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in keys.items())
                   + "\n" for name, keys in sections.items())


def write_config(path: Path, port: int | None = None, *, url: str | None = None,
                 **sections: dict[str, Any]) -> Path:
    """A config with state in <path.parent>/state, posting to 127.0.0.1:`port` (or `url`);
    `sections` override/add keys."""
    base: dict[str, dict[str, Any]] = {
        "paths": {"state_dir": "state"},
        "webhook": {"url": url or f"http://127.0.0.1:{port}/hook", "timeout": 5.0},
        "workers": {"count": 2},
        "retry": {"base_delay": 0.05, "max_delay": 1.0},
        "shutdown": {"grace": 10.0},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(base, sections))
    return path


class Alertd:
    """One `alertd run` process tree; as a context manager it always stops."""

    def __init__(self, cfg_path: Path) -> None:
        self.cfg_path = cfg_path
        self.cfg = config.load(cfg_path)
        self.proc: subprocess.Popen | None = None
        self.log_path = cfg_path.parent / "alertd.log"

    @property
    def state(self) -> Path:
        return self.cfg.state_dir

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, wait: bool = True, env: dict[str, str] | None = None,
              timeout: float = 60) -> Alertd:
        with open(self.log_path, "a") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "alertd", "run", "--config", str(self.cfg_path)],
                cwd=ROOT, stdout=log, stderr=log, env={**os.environ, **(env or {})})
        if wait:
            try:
                poll(self._ready, timeout, "alertd to be ready")
            except AssertionError:
                self.stop()
                raise
        return self

    def __enter__(self) -> Alertd:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

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
        """SIGTERM (drain); a tree that does not exit in time is killed and that is an error."""
        if self.proc is None:
            return 0
        pids = self.pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
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

    def drop_link(self, source: Path, name: str) -> float:
        """Hard-link `source` into the inbox under a dot name, then rename it to `name` (one
        generated file serves many runs without a copy); returns time.time() of the rename."""
        inbox = self.cfg.paths.inbox_dir
        inbox.mkdir(parents=True, exist_ok=True)
        tmp = inbox / f".{name}.tmp"
        os.link(source, tmp)
        t = time.time()
        os.rename(tmp, inbox / name)
        return t

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
