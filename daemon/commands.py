"""The operator commands besides `run`: status, tail, verify, dlq list.

They read the state directory and the status API; they never change a job.
Each returns an exit code (errors.py).
"""
from __future__ import annotations

import heapq
import http.client
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from . import chunker, wal
from .config import Config
from .errors import EXIT_FAILURE, EXIT_OK, AlertdError

FINAL = {"delivered", "rejected", "dead"}


class Unavailable(AlertdError):
    """The daemon's status API cannot be reached."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def fetch_status(cfg: Config, timeout: float = 5.0) -> dict[str, Any]:
    kind, addr = cfg.status_address()
    headers = {}
    if kind == "unix":
        conn: http.client.HTTPConnection = _UnixHTTPConnection(str(addr), timeout)
    else:
        conn = http.client.HTTPConnection(addr[0], addr[1], timeout=timeout)
        headers["Authorization"] = f"Bearer {cfg.status.token}"
    try:
        conn.request("GET", "/v1/status", headers=headers)
        resp = conn.getresponse()
        body = resp.read()
    except OSError as e:
        raise Unavailable(f"cannot reach alertd at {addr}: {e.strerror or e}") from None
    finally:
        conn.close()
    if resp.status != 200:
        raise Unavailable(f"status API at {addr} answered {resp.status}")
    return orjson.loads(body)


def _bar(frac: float, width: int = 24) -> str:
    n = max(0, min(width, int(frac * width + 0.5)))
    return "[" + "#" * n + "." * (width - n) + "]"


def render(doc: dict[str, Any]) -> str:
    lines = []
    rate = doc["rate"]
    limit = f"{rate['limit']:g}/s" if rate["limit"] > 0 else "unlimited"
    lines.append(f"alertd pid {doc['pid']}  rate {limit}  "
                 f"{'DRAINING  ' if doc['draining'] else ''}workers {len(doc['workers'])}")
    if doc["reload"]["ok"] is False:
        lines.append(f"last reload FAILED: {doc['reload']['error']}")
    lines.append(f"{'JOB':9} {'FILE':24} {'PROGRESS':26} {'ROWS':>10} {'DELIVERED':>10} "
                 f"{'REJECTED':>9} {'DEAD':>7}")
    for j in doc["jobs"]:
        frac = j["bytes_done"] / j["bytes"] if j["bytes"] else 1.0
        lines.append(f"{j['job']:9} {j['file'][:24]:24} {_bar(frac)} {j['rows']:>10} "
                     f"{j['delivered']:>10} {j['rejected']:>9} {j['dead']:>7}"
                     + (f"  FAILED: {j['failed']}" if j["failed"] else ""))
    if not doc["jobs"]:
        lines.append("(no job in progress)")
    for w in doc["workers"]:
        lines.append(f"worker {w['index']:<2} pid {w['pid']:<7} sent {w['sent']:>10} "
                     f"in flight {w['in_flight']:>4} pending {w['pending']:>5}"
                     + ("  WAL ERROR" if w["wal_error"] else ""))
    return "\n".join(lines)


def status(cfg: Config, as_json: bool = False, watch: bool = False) -> int:
    while True:
        doc = fetch_status(cfg)
        out = orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() if as_json else render(doc)
        if watch:
            sys.stdout.write("\x1b[H\x1b[2J")
        print(out, flush=True)
        if not watch:
            return EXIT_OK
        time.sleep(1.0)


# ------------------------------------------------------------------ tail


def _human(r: dict[str, Any]) -> str:
    ts = datetime.fromtimestamp(r["ts"]).strftime("%H:%M:%S.%f")[:-3]
    if r["out"] == "chunk":
        return f"{ts} {r['job']} chunk {r['ck']} final: {r['rows']} rows"
    extra = f" {r['err']}" if r.get("err") else ""
    return (f"{ts} {r['job']}:{r['off']} {r['out']:9} status {r['st']} attempts {r['att']}"
            f" user {r['uid']}{extra}")


def tail(cfg: Config, follow: bool = False, lines: int = 20, as_json: bool = False) -> int:
    wal_dir = cfg.state_dir / "wal"
    fmt = (lambda r: orjson.dumps(r).decode()) if as_json else _human
    merged = heapq.merge(*(wal.records(p) for p in wal.segments(wal_dir)),
                         key=lambda r: r["ts"])
    recent: list[dict[str, Any]] = []
    for r in merged:
        recent.append(r)
        if lines and len(recent) > lines * 2:
            recent = recent[-lines:]
    for r in recent[-lines:] if lines else recent:
        print(fmt(r))
    if not follow:
        return EXIT_OK
    offsets = {p: p.stat().st_size for p in wal.segments(wal_dir) if p.exists()}
    try:
        while True:
            time.sleep(0.2)
            batch = []
            for p in wal.segments(wal_dir):
                batch.extend(_read_new(p, offsets))
            for r in sorted(batch, key=lambda r: r["ts"]):
                print(fmt(r), flush=True)
    except KeyboardInterrupt:
        return EXIT_OK


def _read_new(path: Path, offsets: dict[Path, int]) -> Iterator[dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            pos = offsets.get(path, 0)
            if size < pos:  # a new file took this name (rotation)
                pos = 0
            f.seek(pos)
            data = f.read(size - pos)
    except FileNotFoundError:
        return
    end = data.rfind(b"\n") + 1  # a torn last line waits for the next round
    offsets[path] = pos + end
    for line in data[:end].splitlines():
        r = wal.decode(line)
        if r is not None:
            yield r


# ------------------------------------------------------------------ verify


def _find_job(cfg: Config, job: str) -> tuple[Path, dict[str, Any]]:
    sd = cfg.state_dir
    for d in (sd / "done", sd / "spool"):
        mpath = d / (f"{job}.manifest.json" if d.name == "done" else f"{job}.json")
        if mpath.exists():
            doc = orjson.loads(mpath.read_bytes())
            for name in (d / f"{job}--{doc['name']}", sd / "done" / f"{job}--{doc['name']}"):
                if name.exists():
                    return name, doc
    raise AlertdError(f"verify: no job {job} with a source file in {sd}/done or {sd}/spool")


def verify(cfg: Config, job: str) -> int:
    """Every row offset of the source has exactly one final outcome in the WALs."""
    path, doc = _find_job(cfg, job)
    outcomes: Counter[int] = Counter()
    for seg in wal.segments(cfg.state_dir / "wal"):
        for r in wal.records(seg):
            if r["job"] == job and r["out"] in FINAL:
                outcomes[r["off"]] += 1
    rows = missing = dupes = 0
    examples: list[str] = []
    size = path.stat().st_size
    if size > doc["data_start"]:
        mm, base = chunker.map_span(str(path), 0, size)
        try:
            for off, _line in chunker.rows(mm, base, doc["data_start"], size):
                rows += 1
                n = outcomes.pop(off, 0)
                if n != 1:
                    if n == 0:
                        missing += 1
                    else:
                        dupes += 1
                    if len(examples) < 10:
                        examples.append(f"  offset {off}: {n} final outcomes")
        finally:
            mm.close()
    stray = len(outcomes)  # outcomes for offsets that are not rows
    ok = missing == 0 and dupes == 0 and stray == 0
    print(f"verify {job}: {rows} rows, {rows - missing - dupes} with exactly one final outcome, "
          f"{missing} without, {dupes} with more than one, {stray} outcomes at non-row offsets: "
          f"{'OK' if ok else 'FAILED'}")
    for e in examples:
        print(e)
    return EXIT_OK if ok else EXIT_FAILURE


def dlq_list(cfg: Config, job: str | None = None) -> int:
    d = cfg.state_dir / "dlq"
    files = sorted(d.glob(f"{job}.jsonl" if job else "*.jsonl")) if d.exists() else []
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            n = sum(1 for _ in fh)
        total += n
        print(f"{f.stem}: {n} dead letters ({f})")
    print(f"total: {total}")
    return EXIT_OK
