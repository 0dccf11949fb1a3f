"""One `python -m alertd run` under benchmark: config, start, drop a file, summaries, stop.

Files arrive the way producers should deliver them (hard link under a dot
name, then rename), so one generated CSV serves every run without a copy.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from alertd import commands, config

ROOT = Path(__file__).resolve().parent.parent


def write_config(dirpath: Path, url: str, secret: str, **sections: dict[str, Any]) -> Path:
    """alertd.toml in `dirpath`, state in `dirpath`/state; `sections` override keys."""
    base: dict[str, dict[str, Any]] = {
        "paths": {"state_dir": "state"},
        "webhook": {"url": url, "secrets": [secret], "timeout": 10.0},
        "workers": {"count": 2},
        "rate": {"limit": 0},
        "shutdown": {"grace": 10.0},
    }
    dirpath.mkdir(parents=True, exist_ok=True)
    path = dirpath / "alertd.toml"
    path.write_text(config.to_toml(base, sections))
    return path


class Alertd:
    """The daemon's process tree; use as a context manager so it always stops."""

    def __init__(self, cfg_path: Path) -> None:
        self.cfg_path = cfg_path
        self.cfg = config.load(cfg_path)
        self.log_path = cfg_path.parent / "alertd.log"
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60) -> Alertd:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "alertd", "run", "--config", str(self.cfg_path)],
                cwd=ROOT, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"alertd not ready after {timeout} s (see {self.log_path})")
            time.sleep(0.05)
        self.cfg.paths.inbox_dir.mkdir(parents=True, exist_ok=True)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"alertd exited with {self.proc.returncode} "
                               f"(see {self.log_path})")
        return commands.ready(self.cfg)

    def status(self) -> dict[str, Any]:
        return commands.fetch_status(self.cfg, timeout=2)

    def delivered(self) -> int:
        return sum(w["delivered"] for w in self.status()["workers"])

    def drop(self, source: Path, name: str) -> float:
        """Hard-link `source` into the inbox as `name` by rename; returns time.time() of it."""
        inbox = self.cfg.paths.inbox_dir
        tmp = inbox / f".{name}.tmp"
        os.link(source, tmp)
        t = time.time()
        os.rename(tmp, inbox / name)
        return t

    def summaries(self) -> list[dict[str, Any]]:
        out = []
        for p in sorted((self.cfg.state_dir / "done").glob("*.summary.json")):
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                pass  # being written: the next poll reads it whole
        return out

    def wait_summary(self, timeout: float) -> dict[str, Any] | None:
        """The first job summary, or None when `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"alertd exited with {self.proc.returncode} "
                                   f"(see {self.log_path})")
            s = self.summaries()
            if s:
                return s[0]
            time.sleep(0.05)
        return None

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM (drain), then SIGKILL the whole tree if it does not exit in time."""
        if self.proc is None:
            return None
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        for k in kids:  # only our own children, by pid, and only if still there
            try:
                k.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc = None
        return rc

    def __enter__(self) -> Alertd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
