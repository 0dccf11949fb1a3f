"""What a hostile or broken receiver can do to alertd, end to end: real `alertd run`
against small raw asyncio servers written here (odd Retry-After values, endless
headers, closed ports, names that do not resolve), plus the config that decides
what alertd itself may put on the wire."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from tests.procs import Alertd, poll, write_config

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
Reply = bytes | Callable[[asyncio.StreamWriter], Awaitable[None]] | None


@dataclass
class Request:
    n: int  # arrival order over the receiver's life, from 0
    at: float  # time.monotonic() it arrived
    id: str  # webhook-id
    attempt: int  # how many times this id arrived so far, this one included
    headers: dict[str, str] = field(default_factory=dict)


class Receiver:
    """A raw HTTP/1.1 receiver on 127.0.0.1 in its own thread and loop.

    `handler(request) -> reply` per request: bytes are written as the response, an
    async function streams its own, None never answers. Keep-alive, one at a time.
    """

    def __init__(self, handler: Callable[[Request], Reply], port: int = 0,
                 tls: ssl.SSLContext | None = None) -> None:
        self.handler, self.port, self.tls = handler, port, tls
        self.requests: list[Request] = []
        self.attempts: dict[str, int] = {}
        self.lock = threading.Lock()
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self.handshake_errors = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/hook"

    def __enter__(self) -> Receiver:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        assert self._started.wait(10), "receiver did not start"
        return self

    def __exit__(self, *exc: Any) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        srv = await asyncio.start_server(self._conn, "127.0.0.1", self.port, ssl=self.tls,
                                         reuse_address=True)
        self.port = srv.sockets[0].getsockname()[1]
        self._started.set()
        await self._stop.wait()
        srv.close()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")[1:]
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (ln.partition(":") for ln in lines if ln)}
                await reader.readexactly(int(headers.get("content-length", "0")))
                wid = headers.get("webhook-id", "")
                with self.lock:
                    self.attempts[wid] = self.attempts.get(wid, 0) + 1
                    req = Request(len(self.requests), time.monotonic(), wid, self.attempts[wid],
                                  headers)
                    self.requests.append(req)
                reply = self.handler(req)
                if reply is None:
                    await reader.read()  # hang until the client gives up
                    return
                if isinstance(reply, bytes):
                    writer.write(reply)
                    await writer.drain()
                else:
                    await reply(writer)
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError):
            if self.tls is not None:
                self.handshake_errors += 1
        finally:
            writer.close()

    def ids(self) -> set[str]:
        with self.lock:
            return set(self.attempts)


def rows_csv(n: int) -> bytes:
    return b"user_id\n" + b"".join(b"u%d\n" % i for i in range(n))


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def config_for(tmp_path: Any, url: str, **sections: dict[str, Any]) -> Any:
    sections = {**sections, "webhook": {"url": url, "timeout": 5.0, **sections.get("webhook", {})}}
    return write_config(tmp_path / "a.toml", 1, **sections)


def dead_letters(a: Alertd, job: str) -> list[dict[str, Any]]:
    p = a.state / "dlq" / f"{job}.jsonl"
    return [json.loads(x) for x in p.open()] if p.exists() else []


# ------------------------------------------------------------------ Retry-After


def test_a_retry_after_of_non_ascii_digits_never_stalls_a_worker(tmp_path, alertd):
    # b"\xb2" is '²' in Latin-1: str.isdigit() says yes, float() says no.
    bad = b"HTTP/1.1 429 Too Many\r\nRetry-After: \xb2\r\nContent-Length: 0\r\n\r\n"
    with Receiver(lambda r: bad if r.attempt == 1 else OK) as rx:
        a = alertd(config_for(tmp_path, rx.url, workers={"count": 1, "concurrency": 4},
                              retry={"base_delay": 0.01, "max_delay": 0.05}))
        a.drop("r.csv", rows_csv(60))
        [s] = a.wait_summaries(1, timeout=60)
    assert (s["delivered"], s["dead"]) == (60, 0)
    assert "Traceback" not in a.log()


def test_an_unbounded_retry_after_is_capped_at_max_delay(tmp_path, alertd):
    huge = b"HTTP/1.1 429 Too Many\r\nRetry-After: 100000000\r\nContent-Length: 0\r\n\r\n"
    with Receiver(lambda r: huge if r.attempt == 1 else OK) as rx:
        a = alertd(config_for(tmp_path, rx.url, workers={"count": 1, "concurrency": 4},
                              retry={"base_delay": 0.05, "max_delay": 0.5}))
        a.drop("r.csv", rows_csv(40))
        [s] = a.wait_summaries(1, timeout=60)
        reqs = list(rx.requests)
    assert (s["delivered"], s["dead"]) == (40, 0)
    first = {r.id: r.at for r in reqs if r.attempt == 1}
    gaps = [r.at - first[r.id] for r in reqs if r.attempt == 2]
    print(f"429 + Retry-After: 1e8 -> retried after at most {max(gaps):.2f} s (max_delay 0.5)")
    assert max(gaps) < 0.5 + 1.0  # the cap, plus scheduling slack on a loaded machine


def test_after_a_429_no_worker_starts_a_request_until_the_pause_ends(tmp_path, alertd):
    told: list[float] = []

    def handler(r: Request) -> bytes:
        if r.n == 300:  # both workers are warm and hold parked tokens by now
            told.append(time.monotonic())
            return b"HTTP/1.1 429 Too Many\r\nRetry-After: 2\r\nContent-Length: 0\r\n\r\n"
        return OK
    with Receiver(handler) as rx:
        # 10k/s: tokens come in batches of 50, so each worker parks some.
        a = alertd(config_for(tmp_path, rx.url, workers={"count": 2, "concurrency": 2},
                              rate={"limit": 10_000}, retry={"max_delay": 5.0}))
        a.drop("r.csv", rows_csv(3000))
        [s] = a.wait_summaries(1, timeout=90)
        reqs = list(rx.requests)
    assert (s["delivered"], s["dead"]) == (3000, 0)
    t429 = told[0]
    during = [r for r in reqs if t429 < r.at < t429 + 1.9]
    after = [r for r in reqs if r.at >= t429 + 1.9]
    print(f"requests arriving during the 2 s pause: {len(during)} (in flight at the 429: <= 3)")
    # Only requests already on their way when the 429 was written may arrive: one
    # per other lane (2 workers x 2 lanes, minus the one that got the 429).
    assert len(during) <= 3, [round(r.at - t429, 3) for r in during]
    assert after and after[0].at - t429 < 5


def test_dlq_replay_follows_the_same_policy_as_the_workers(tmp_path, alertd):
    phase = {"replay": False}
    ra = b"HTTP/1.1 429 Too Many\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n"

    def handler(r: Request) -> bytes:
        if not phase["replay"]:
            return b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
        return ra if r.attempt == 2 else OK  # the replay's first try is an id's 2nd arrival
    with Receiver(handler) as rx:
        a = alertd(config_for(tmp_path, rx.url, retry={"max_attempts": 1, "max_delay": 2.0}))
        a.drop("r.csv", rows_csv(20))
        [s] = a.wait_summaries(1, timeout=60)
        assert s["dead"] == 20
        phase["replay"] = True
        t0 = time.monotonic()
        r = a.cli("dlq", "replay", s["job"])
        took = time.monotonic() - t0
    # A 429 spends no attempt (max_attempts = 1 still leaves the retry) and its
    # Retry-After holds the replay's sends.
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (a.state / "dlq" / f"{s['job']}.jsonl").exists()
    assert took >= 1.0
    assert a.cli("verify", s["job"]).returncode == 0


# ------------------------------------------------------------------ response heads


def test_an_endless_header_is_cut_off_and_the_worker_stays_small(tmp_path, alertd):
    budget = {"bytes": 300 << 20}  # never more than this in total, whatever the client does
    lock = threading.Lock()

    async def endless(w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        block = b"a" * (64 << 10)
        while True:
            with lock:
                if budget["bytes"] <= 0:
                    return
                budget["bytes"] -= len(block)
            w.write(block)
            await w.drain()
    with Receiver(lambda r: endless) as rx:
        a = alertd(config_for(tmp_path, rx.url, webhook={"timeout": 3.0},
                              workers={"count": 1, "concurrency": 4},
                              retry={"max_attempts": 2, "base_delay": 0.05}))
        a.drop("r.csv", rows_csv(6))
        wpid = poll(lambda: a.worker_pids(), 30, "a worker")[0]
        proc = psutil.Process(wpid)
        peak = 0
        deadline = time.monotonic() + 60
        while not a.summaries() and time.monotonic() < deadline:
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.05)
        [s] = a.wait_summaries(1, timeout=5)
    print(f"endless header: worker peak RSS {peak / 2**20:.1f} MiB; "
          f"receiver streamed {(300 << 20) - budget['bytes'] >> 20} MiB")
    assert peak < 120 << 20, f"worker RSS reached {peak / 2**20:.0f} MiB"
    assert (s["delivered"], s["dead"]) == (0, 6)
    assert s["possible_duplicates"] == 6  # a cut response may have been processed
    dead = dead_letters(a, s["job"])
    assert {d["error"] for d in dead} == {"protocol: response head over 64 KiB"}
    assert all(d["attempts"] == 2 for d in dead)


def test_a_timeout_says_so_once(tmp_path, alertd):
    with Receiver(lambda r: None) as rx:
        a = alertd(config_for(tmp_path, rx.url, webhook={"timeout": 0.5},
                              retry={"max_attempts": 1}))
        a.drop("r.csv", rows_csv(3))
        [s] = a.wait_summaries(1, timeout=30)
        port = rx.port
    assert {d["error"] for d in dead_letters(a, s["job"])} == {
        f"timeout: no response from 127.0.0.1:{port} within 0.5 s"}


# ------------------------------------------------------------------ unreachable endpoints


def _log_lines(a: Alertd, pattern: str) -> list[str]:
    return [ln for ln in a.log().splitlines() if re.search(pattern, ln)]


def test_a_closed_port_is_one_warning_and_recovery_another(tmp_path, alertd):
    port = free_port()
    a = alertd(config_for(tmp_path, f"http://127.0.0.1:{port}/hook",
                          retry={"max_attempts": 3, "base_delay": 0.01}))
    a.drop("r.csv", rows_csv(200))
    poll(lambda: a.status()["breaker"]["state"] == "open", 30, "the breaker to open")
    poll(lambda: a.status()["breaker"]["probes"] >= 6, 30, "a few failed probes")
    opened = _log_lines(a, "unreachable")
    assert len(opened) == 1, opened
    assert f"endpoint 127.0.0.1:{port} unreachable: connect: 127.0.0.1:{port}: connection " \
           "refused; breaker opened" in opened[0]
    with Receiver(lambda r: OK, port=port):
        [s] = a.wait_summaries(1, timeout=60)
    assert (s["delivered"], s["dead"]) == (200, 0)
    assert len(_log_lines(a, f"endpoint 127.0.0.1:{port} reachable again; breaker closed")) == 1
    assert len(_log_lines(a, "unreachable")) == 1
    assert not _log_lines(a, "Traceback|never retrieved|Fatal error")


def test_a_name_that_does_not_resolve_is_one_warning(tmp_path, alertd):
    a = alertd(config_for(tmp_path, "http://alertd-test.invalid/hook",
                          retry={"max_attempts": 3, "base_delay": 0.01}))
    a.drop("r.csv", rows_csv(200))
    poll(lambda: a.status()["breaker"]["state"] == "open", 60, "the breaker to open")
    poll(lambda: a.status()["breaker"]["probes"] >= 6, 30, "a few failed probes")
    opened = _log_lines(a, "unreachable")
    assert len(opened) == 1, opened
    assert "endpoint alertd-test.invalid:80 unreachable: connect: cannot resolve " \
           "alertd-test.invalid" in opened[0]
    assert not _log_lines(a, "Traceback|never retrieved|gaierror")


# ------------------------------------------------------------------ configured headers


def test_a_framing_header_refuses_to_start_with_exit_2(tmp_path):
    cfg = config_for(tmp_path, "http://127.0.0.1:9/hook",
                     webhook={"headers": {"Content-Length": "0"}})
    r = subprocess.run([sys.executable, "-m", "alertd", "run", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "config: [webhook] headers.Content-Length controls how the request is framed" \
        in r.stderr


def test_a_reload_with_a_non_latin1_header_fails_and_keeps_the_old_config(tmp_path, alertd):
    with Receiver(lambda r: OK) as rx:
        cfg = config_for(tmp_path, rx.url, webhook={"headers": {"X-Team": "ops"}})
        a = alertd(cfg)
        pids = sorted(a.worker_pids())
        cfg.write_text(cfg.read_text().replace('"X-Team" = "ops"', '"X-Team" = "\\u20ac"'))
        os.kill(a.proc.pid, signal.SIGHUP)
        st = poll(lambda: (d := a.status())["reload"]["failed"] == 1 and d, 10, "the failed reload")
        assert st["reload"]["error"] == ("config: [webhook] headers.X-Team value has a "
                                         "character outside Latin-1 (U+20AC at position 0)")
        a.drop("r.csv", rows_csv(5))
        [s] = a.wait_summaries(1, timeout=30)
        assert s["delivered"] == 5
        assert {r.headers.get("x-team") for r in rx.requests} == {"ops"}
        assert sorted(a.worker_pids()) == pids  # no worker died


# ------------------------------------------------------------------ a bug inside an attempt


def _worker_run(tmp_path: Any, url: str, n: int, break_it: Callable[[Any], None],
                caplog: Any) -> tuple[Any, list[dict[str, Any]]]:
    """Run one real Worker in this process on an n-row chunk; break_it(worker) injects
    the bug. Returns the chunk's ack and the DLQ lines."""
    import multiprocessing

    from alertd import config, worker
    from alertd.protocol import Chunk, ChunkAck, CsvLayout, Drain
    from alertd.shm import Shared

    state = tmp_path / "state"
    cfg = config.from_dict({"paths": {"state_dir": str(state)},
                            "webhook": {"url": url, "timeout": 5.0},
                            "workers": {"count": 1, "concurrency": 4},
                            "retry": {"max_attempts": 3, "base_delay": 0.01, "max_delay": 0.05}},
                           tmp_path)
    data = rows_csv(n)
    path = tmp_path / "rows.csv"
    path.write_bytes(data)
    start = data.index(b"\n") + 1
    chunk = Chunk("j000001", str(path), "rows.csv", 0, start, len(data),
                  CsvLayout(ncols=1), time.time())
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=True)
    w = worker.Worker(0, child, cfg, Shared.create(ctx))
    break_it(w)
    parent.send(chunk)

    async def main() -> Any:
        task = asyncio.ensure_future(w.run())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            while parent.poll():
                msg = parent.recv()
                if isinstance(msg, ChunkAck):
                    parent.send(Drain())
                    await asyncio.wait_for(task, 10)
                    return msg
            await asyncio.sleep(0.01)
        task.cancel()
        raise AssertionError("the chunk never finished: a row was left unsettled")
    with caplog.at_level("ERROR", logger="alertd.worker"):
        ack = asyncio.run(main())
    dlq = state / "dlq" / "j000001.jsonl"
    return ack, [json.loads(x) for x in dlq.open()] if dlq.exists() else []


# The tests that inject a bug into an attempt are in test_rowpath_worker.py (at the send).
