"""Fixtures shared by the process-level tests: mock webhooks and alertd daemons that
are always stopped, whatever the test did."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import start_mock, stop_process
from tests.procs import Alertd


class Mocks:
    """`mocks(*args, record=None) -> port` starts a mock webhook; `stop(port)` ends one."""

    def __init__(self) -> None:
        self.procs: dict[int, object] = {}

    def __call__(self, *args: str, record: str | Path | None = None) -> int:
        p, port = start_mock(*args, record=record)
        self.procs[port] = p
        return port

    def stop(self, port: int) -> int:
        return stop_process(self.procs.pop(port))

    def close(self) -> None:
        for p in self.procs.values():
            stop_process(p)
        self.procs.clear()


@pytest.fixture
def mock() -> Iterator[Mocks]:
    m = Mocks()
    yield m
    m.close()


@pytest.fixture
def alertd() -> Iterator:
    """`alertd(cfg_path, start=True) -> Alertd`; every one is stopped at the end."""
    started: list[Alertd] = []

    def make(cfg_path: Path, start: bool = True) -> Alertd:
        a = Alertd(cfg_path)
        started.append(a)
        return a.start() if start else a
    yield make
    for a in started:
        if a.proc is not None and a.proc.poll() is None:
            a.stop()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator:
    """A real redis-server (AOF, own port and dir) for cluster tests; stopped at the end."""
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()
