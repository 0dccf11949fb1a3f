"""The worker on the row path: the compiled and the pure-Python path deliver the same
input with the same bytes on the wire and the same WAL records (a real Worker per path
in its own process, its clock frozen, against a raw receiver), and a bug inside an
attempt is still logged once and its row retried or dead-lettered."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.test_receivers_hostile import OK, Receiver, _worker_run

ROOT = Path(__file__).resolve().parent.parent


def _csv(mode: str) -> bytes:
    long = b"u0," + b"x" * 300 + b",eu\n"  # the first line: longer than max_line_bytes
    rows = [long]
    for i in range(1, 41):
        if i % 9 == 0:
            rows.append(b"," + b"no id,eu\n")  # a reject
        elif mode == "fields":
            rows.append(f'u{i},"msg, {i} \u00e9",r{i % 3}\n'.encode())
        else:
            rows.append(f"u{i}\n".encode())
    return b"user_id,message,region\n" + b"".join(rows)


def _run(tmp: Path, mode: str, pure: bool) -> tuple[dict[str, Any], list[str], list[bytes],
                                                        bytes]:
    out = tmp / ("pure" if pure else "compiled")
    out.mkdir()
    csv = tmp / "rows.csv"
    env = {k: v for k, v in os.environ.items() if k != "ALERTD_PURE_PYTHON"}
    if pure:
        env["ALERTD_PURE_PYTHON"] = "1"
    p = subprocess.run([sys.executable, "-m", "tests.rowpath_worker_run", str(out), str(csv),
                        mode], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout.splitlines()[-1])
    # Each run has its own receiver port: the Host line is the one difference allowed.
    requests = [re.sub(r"\r\nHost: 127\.0\.0\.1:\d+\r\n", "\r\nHost: RX\r\n", json.loads(x))
                for x in (out / "requests.jsonl").read_text().splitlines()]
    wal = b"".join(f.read_bytes() for f in sorted((out / "state" / "wal").glob("*.wal")))
    rejects = (out / "state" / "rejects" / "j000001.jsonl").read_bytes()
    return info, requests, wal.splitlines(), rejects


@pytest.mark.parametrize("mode", ["plain", "fields"])
def test_both_row_paths_put_the_same_bytes_on_the_wire_and_in_the_wal(tmp_path, mode):
    (tmp_path / "rows.csv").write_bytes(_csv(mode))
    fast = _run(tmp_path, mode, pure=False)
    pure = _run(tmp_path, mode, pure=True)
    assert fast[0]["impl"] == "compiled" and pure[0]["impl"] == "pure"
    # 41 rows: u0 (too long) and 4 without an id rejected, 36 delivered; u7, u17, u37 retried.
    assert fast[0]["counts"] == pure[0]["counts"]
    c = fast[0]["counts"]
    assert (c["rows"], c["delivered"], c["rejected"], c["dead"]) == (41, 36, 5, 0)
    assert len(fast[1]) == 36 + 3
    # Every request byte, retries (re-signed) included; when a retry goes out among the new
    # rows depends on its jittered backoff, so the order may differ, and so may the WAL's.
    assert sorted(fast[1]) == sorted(pure[1])
    assert sorted(fast[2]) == sorted(pure[2]) and len(fast[2]) == 41 + 1  # rows, the marker
    assert fast[3] == pure[3]
    if mode == "fields":
        body = json.loads(fast[1][0].split("\r\n\r\n", 1)[1])
        assert body["data"]["fields"] == {"region": "r1"} and body["data"]["message"] == "msg, 1 é"


def test_an_exception_in_an_attempt_is_logged_once_and_its_row_retried(tmp_path, caplog):
    with Receiver(lambda r: OK) as rx:
        def break_it(w: Any) -> None:
            build, failed = w._request, set()

            def flaky(a: Any) -> bytes:  # each attempt's request, on every send path
                req = build(a)  # the attempt counted, as a bug while sending would find it
                if int(a.uid[1:]) % 3 == 0 and a.uid not in failed:  # a bug, once per third row
                    failed.add(a.uid)
                    raise RuntimeError("send bug")
                return req
            w._request = flaky
        ack, dead = _worker_run(tmp_path, rx.url, 30, break_it, caplog)
    assert (ack.counts.rows, ack.counts.delivered, ack.counts.dead) == (30, 30, 0)
    assert len(rx.ids()) == 30
    bugs = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert len(bugs) == 1 and bugs[0].exc_info is not None  # once, with its traceback


def test_a_row_that_always_hits_a_bug_is_dead_lettered_with_the_reason(tmp_path, caplog):
    with Receiver(lambda r: OK) as rx:
        def break_it(w: Any) -> None:
            build = w._request

            def broken(a: Any) -> bytes:
                req = build(a)
                if a.uid == "u7":
                    raise ValueError("cannot send u7")
                return req
            w._request = broken
        ack, dead = _worker_run(tmp_path, rx.url, 20, break_it, caplog)
    assert (ack.counts.rows, ack.counts.delivered, ack.counts.dead) == (20, 19, 1)
    [d] = dead
    assert d["user_id"] == "u7" and d["attempts"] == 3
    assert d["error"] == "internal error: ValueError: cannot send u7"
