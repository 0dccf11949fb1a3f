"""POST /v1/files on a real `alertd run`, over its unix socket: a 1 GB upload streamed with
bounded memory, and each back-pressure answer (400, 413, 429, 507) and an upload cut
mid-body leaving no file and no job behind. Every answer is checked against docs/openapi.yaml."""
from __future__ import annotations

import asyncio
import hashlib
import http.client
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp import web
from alertd import config, intake

from tests.procs import Alertd, poll, write_config
from tests.test_status import validate_response

MiB = 1 << 20


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float = 30) -> None:
        super().__init__("localhost", timeout=timeout, blocksize=MiB)
        self._path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def upload(a: Alertd, query: str, body: Any, headers: dict[str, str] | None = None,
           ) -> tuple[int, dict[str, Any] | None]:
    """POST /v1/files?query; the answer checked against the OpenAPI document."""
    conn = UnixHTTPConnection(a.state / "alertd.sock")
    try:
        headers = headers or {}
        conn.request("POST", f"/v1/files?{query}", body=body, headers=headers,
                     encode_chunked=headers.get("Transfer-Encoding") == "chunked")
        r = conn.getresponse()
        doc = validate_response("/v1/files", "post", r.status, r.headers, r.read())
        return r.status, doc
    finally:
        conn.close()


def rows(n: int, start: int = 0) -> bytes:
    return b"".join(b"u%d,disk full on host-%d\n" % (i, i % 97) for i in range(start, start + n))


CSV = b"user_id,message\n" + rows(100)


def leftovers(a: Alertd) -> list[str]:
    """Everything an upload could leave: inbox entries (its dot directory), spool files."""
    inbox = a.cfg.paths.inbox_dir
    return sorted([f"inbox/{n}" for n in os.listdir(inbox)]
                  + [f"spool/{n}" for n in os.listdir(a.state / "spool")])


def next_job_id(a: Alertd) -> str:
    """The id the next upload gets: proves that refused uploads took none."""
    code, doc = upload(a, "name=probe.csv", CSV)
    assert code == 201, doc
    return doc["job"]


@pytest.fixture
def slow(tmp_path, mock, alertd):
    """alertd with small intake limits, sending 2 rows a second (jobs stay unfinished)."""
    port = mock()
    cfg = write_config(tmp_path / "alertd.toml", port, rate={"limit": 2, "burst": 1},
                       intake={"max_bytes": 2 * MiB, "max_jobs": 2}, shutdown={"grace": 1.0})
    return alertd(cfg)


def test_upload_of_1_gb_streams_with_bounded_memory(tmp_path, mock, alertd):
    """A 1 GB file of ~1 KB rows, sent with Content-Length: the daemon's RSS (supervisor
    and workers) stays far below the file; the spool file is the body byte for byte; the
    job delivers."""
    msg = b"m" * 1000
    src = tmp_path / "big.csv"
    block = 1024
    with open(src, "wb") as f:
        f.write(b"user_id,message\n")
        for b in range(1000):
            f.write(b"".join(b"u%04d%04d,%s\n" % (b, i, msg) for i in range(block)))
    size = src.stat().st_size
    assert size > 10**9
    port = mock()
    a = alertd(write_config(tmp_path / "alertd.toml", port))
    peak: dict[int, int] = {}
    peak_sum = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            total = 0
            for pid in a.pids():
                try:
                    rss = psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    continue
                peak[pid] = max(peak.get(pid, 0), rss)
                total += rss
            peak_sum[0] = max(peak_sum[0], total)
            time.sleep(0.05)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.monotonic()
    try:
        with open(src, "rb") as f:
            code, doc = upload(a, "name=big.csv&priority=low", f,
                               {"Content-Length": str(size), "Content-Type": "text/csv"})
        took = time.monotonic() - t
        assert code == 201, doc
        assert doc["bytes"] == size and doc["name"] == "big.csv"
        [job] = a.status()["jobs"]
        assert job["job"] == doc["job"] and job["priority"] == "low" and job["bytes"] == size
        poll(lambda: a.delivered_now() > 0, 30, "a first delivery")
    finally:
        done.set()
        sampler.join()
    a.stop()
    workers = max(v for p, v in peak.items() if p != a.pid)
    print(f"\n1 GB upload: {size} bytes in {took:.1f} s ({size / took / MiB:.0f} MiB/s); peak RSS "
          f"supervisor {peak[a.pid] / MiB:.0f} MiB, largest worker {workers / MiB:.0f} MiB, "
          f"all processes together {peak_sum[0] / MiB:.0f} MiB")
    assert peak_sum[0] < 250 * MiB
    assert leftovers(a) == [f"spool/{doc['job']}--big.csv", f"spool/{doc['job']}.json"]

    def digest(p: Path) -> str:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(8 * MiB):
                h.update(chunk)
        return h.hexdigest()
    assert digest(a.state / "spool" / f"{doc['job']}--big.csv") == digest(src)


def test_bad_names_and_priorities_are_400_and_leave_nothing(slow):
    a = slow
    for query, says in [("", "name: the query parameter is required"),
                        ("name=", "name: must not be empty"),
                        ("name=../x", "'/'"), ("name=a/b.csv", "'/'"),
                        ("name=x%00.csv", "NUL"),
                        ("name=.hidden.csv", "must not start with a dot"),
                        ("name=..", "must not start with a dot"),
                        ("name=" + "n" * 256, "longer than 255 bytes"),
                        ("name=" + "%C3%A9" * 128, "longer than 255 bytes (256)"),
                        ("name=x.csv&priority=urgent", "priority: must be high, normal, low")]:
        code, doc = upload(a, query, CSV)
        assert code == 400 and says in doc["error"], (query, doc)
    assert leftovers(a) == []
    code, doc = upload(a, "name=" + "n" * 251 + ".csv", CSV)  # 255 bytes: allowed
    assert code == 201 and doc["job"] == "j000001"


def test_body_over_max_bytes_is_413_declared_or_chunked(slow):
    a = slow
    big = b"user_id,message\n" + rows(120_000)  # ~3 MiB: over [intake] max_bytes 2 MiB
    code, doc = upload(a, "name=big.csv", big)  # Content-Length: refused from the head
    assert code == 413 and "max_bytes 2097152" in doc["error"] and str(len(big)) in doc["error"]
    chunks = (big[i:i + 64 * 1024] for i in range(0, len(big), 64 * 1024))
    code, doc = upload(a, "name=big.csv", chunks, {"Transfer-Encoding": "chunked"})
    assert code == 413 and "max_bytes 2097152" in doc["error"], doc  # counted as it came
    poll(lambda: leftovers(a) == [], 5, "no upload directory left")
    code, doc = upload(a, "name=fits.csv", iter([big[:MiB], big[MiB:2 * MiB - 100]]),
                       {"Transfer-Encoding": "chunked"})
    assert code == 201 and doc["bytes"] == 2 * MiB - 100 and doc["job"] == "j000001"


def test_429_with_retry_after_when_max_jobs_are_unfinished(slow):
    a = slow
    ids = []
    for prio in ("high", "low"):
        code, doc = upload(a, f"name={prio}.csv&priority={prio}", CSV)
        assert code == 201
        ids.append(doc["job"])
    conn = UnixHTTPConnection(a.state / "alertd.sock")
    conn.request("POST", "/v1/files?name=third.csv", body=CSV)
    r = conn.getresponse()
    doc = validate_response("/v1/files", "post", r.status, r.headers, r.read())
    conn.close()
    assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
    assert "2 (queued, running, paused or uploading) of [intake] max_jobs 2" in doc["error"]
    st = a.status()
    assert {j["job"]: j["priority"] for j in st["jobs"]} == dict(zip(ids, ("high", "low")))
    assert [n for n in leftovers(a) if n.startswith("inbox/")] == []
    assert len(a.summaries()) == 0 and len(st["jobs"]) == 2


def test_507_when_the_upload_would_leave_less_than_min_free_bytes(tmp_path, mock, alertd):
    port = mock()
    cfg = write_config(tmp_path / "alertd.toml", port, intake={"min_free_bytes": 1 << 60})
    a = alertd(cfg)
    code, doc = upload(a, "name=x.csv", CSV)
    assert code == 507 and "min_free_bytes 1152921504606846976" in doc["error"], doc
    code, doc = upload(a, "name=x.csv", iter([CSV]), {"Transfer-Encoding": "chunked"})
    assert code == 507
    assert leftovers(a) == [] and a.status()["jobs"] == []
    # [intake] applies at a reload: with room to spare again the same upload is taken.
    cfg.write_text(cfg.read_text().replace("min_free_bytes = 1152921504606846976",
                                           "min_free_bytes = 0"))
    a.proc.send_signal(signal.SIGHUP)
    poll(lambda: a.status()["reload"]["succeeded"] == 1, 10, "the reload")
    code, doc = upload(a, "name=x.csv", CSV)
    assert code == 201 and doc["job"] == "j000001"


def test_507_while_a_chunked_body_eats_the_free_space(tmp_path, mock, alertd):
    """No Content-Length to check up front: the free space is watched as the body is
    written, and the upload stops once it would leave less than min_free_bytes."""
    port = mock()
    inbox_fs = tmp_path
    margin = 256 * MiB  # what the upload may take; the body is 1 GiB
    cfg = write_config(tmp_path / "alertd.toml", port,
                       intake={"min_free_bytes": 1}, shutdown={"grace": 1.0})
    a = alertd(cfg)
    cfg.write_text(cfg.read_text().replace(
        "min_free_bytes = 1", f"min_free_bytes = {intake.free_bytes(inbox_fs) - margin}"))
    a.proc.send_signal(signal.SIGHUP)
    poll(lambda: a.status()["reload"]["succeeded"] == 1, 10, "the reload")
    line = b"u1,%s\n" % (b"x" * 1000)
    block = b"user_id,message\n" + line * 1000

    def body():
        for _ in range(1024):
            yield block
    code, doc = upload(a, "name=huge.csv", body(), {"Transfer-Encoding": "chunked"})
    assert code == 507 and "not enough space" in doc["error"], doc
    poll(lambda: leftovers(a) == [], 10, "the partial upload to be removed")
    assert a.status()["jobs"] == []
    [got] = re.findall(r"upload huge.csv refused or aborted after (\d+) bytes", a.log())
    assert 64 * MiB < int(got) < 1024 * MiB  # stopped on the way, neither at once nor at the end


def test_upload_cut_mid_body_leaves_no_file_and_no_job(slow):
    """The client goes away 1 MiB into a declared 2 MiB body: the partial file (which was
    on disk, in a dot directory of the inbox) is removed and no job id is taken."""
    a = slow
    inbox = a.cfg.paths.inbox_dir
    body = b"user_id,message\n" + rows(100_000)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(a.state / "alertd.sock"))
    s.sendall(b"POST /v1/files?name=cut.csv HTTP/1.1\r\nHost: x\r\n"
              b"Content-Length: %d\r\n\r\n" % (2 * MiB) + body[:MiB])

    def partial() -> list[Path]:
        return [p for d in inbox.glob(".intake-*") for p in d.iterdir()
                if p.name == "cut.csv" and p.stat().st_size >= 512 * 1024]
    [p] = poll(partial, 10, "the partial upload on disk")
    assert p.stat().st_mode & 0o777 == 0o600
    s.close()
    poll(lambda: leftovers(a) == [], 10, "the partial upload to be removed")
    assert a.status()["jobs"] == [] and "upload cut.csv refused or aborted after" in a.log()
    assert next_job_id(a) == "j000001"


def test_start_sweeps_its_own_leftover_uploads_only(tmp_path, mock, alertd):
    """An upload a crash interrupted is removed at the next start; one of another daemon
    sharing the inbox (another state directory) is left alone."""
    cfg = write_config(tmp_path / "alertd.toml", mock())
    c = config.load(cfg)
    inbox = c.paths.inbox_dir
    ours = inbox / f"{intake.upload_prefix(c.state_dir)}0123456789abcdef"
    theirs = inbox / f"{intake.upload_prefix(tmp_path / 'other')}0123456789abcdef"
    for d in (ours, theirs):
        d.mkdir(parents=True)
        (d / "half.csv").write_bytes(CSV[:50])
    a = alertd(cfg)
    assert not ours.exists() and (theirs / "half.csv").exists()
    assert "left by an upload a previous run did not finish" in a.log()
    assert a.status()["jobs"] == [] and a.summaries() == []


def test_refused_before_the_body_with_expect_100_continue(slow):
    """A client that asks first (curl does for large bodies) learns of the 413 without
    sending the body, and never gets a 100 Continue."""
    a = slow
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(a.state / "alertd.sock"))
    with s:
        s.sendall(b"POST /v1/files?name=big.csv HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % (3 * MiB))
        r = http.client.HTTPResponse(s)
        r.begin()
        assert r.status == 413
        validate_response("/v1/files", "post", r.status, r.headers, r.read())
    assert leftovers(a) == []


def test_stalled_body_is_408_and_removed(tmp_path, monkeypatch):
    """A client that stops sending mid-body (and keeps the connection open) does not
    hold the upload forever: after BODY_IDLE_TIMEOUT the partial file goes. In-process
    (the real handler on a real unix socket), with the timeout cut to 0.5 s."""
    monkeypatch.setattr(intake, "BODY_IDLE_TIMEOUT", 0.5)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    cfg = config.from_dict({"webhook": {"url": "http://127.0.0.1:1/"},
                            "paths": {"state_dir": str(tmp_path)}}, tmp_path)
    claimed: list[Path] = []

    async def claim(path: Path, priority: str) -> None:
        claimed.append(path)

    handler = intake.Intake(lambda: cfg, lambda: 0, claim, lambda: False)
    sock = tmp_path / "s.sock"

    async def main() -> tuple[int, bytes, list[str]]:
        app = web.Application()
        app.router.add_post("/v1/files", handler.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.UnixSite(runner, str(sock)).start()
        try:
            r, w = await asyncio.open_unix_connection(str(sock))
            w.write(b"POST /v1/files?name=stall.csv HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Length: 1000000\r\n\r\n" + CSV)
            await w.drain()
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            body = await r.read(200)
            w.close()
            await w.wait_closed()
            return int(head.split()[1]), body, os.listdir(inbox)
        finally:
            await runner.cleanup()
    status, body, left = asyncio.run(main())
    assert status == 408 and b"nothing received for 0.5 s" in body
    assert left == [] and claimed == []
