"""The operator commands besides `run`: status, reload, tail, verify, dlq list, jobs and
job control (pause, resume, cancel, priority).

They read the state directory and the status API; a job changes only through the
daemon's API (reload only signals the daemon). Each returns an exit code (errors.py).
"""
from __future__ import annotations

import http.client
import os
import signal
import socket
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson

from . import chunker, wal
from . import tail as tail_mod
from .config import Config
from .errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, AlertdError


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


def api(cfg: Config, method: str, path: str, body: Any = None,
        timeout: float = 5.0) -> tuple[int, Any]:
    """One request to the daemon's status API (unix socket, or TCP with the token);
    (status, decoded JSON). Unavailable when nobody answers."""
    kind, addr = cfg.status_address()
    headers = {}
    if kind == "unix":
        conn: http.client.HTTPConnection = _UnixHTTPConnection(str(addr), timeout)
    else:
        conn = http.client.HTTPConnection(addr[0], addr[1], timeout=timeout)
        headers["Authorization"] = f"Bearer {cfg.status.token}"
    data = None
    if body is not None:
        data = orjson.dumps(body)
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except OSError as e:
        raise Unavailable(f"cannot reach alertd at {addr}: {e.strerror or e}") from None
    finally:
        conn.close()
    if resp.status == 401:
        raise Unavailable(f"status API at {addr} answered 401 (check [status] token)")
    try:
        return resp.status, orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise Unavailable(f"status API at {addr} answered {resp.status} without JSON") from None


def fetch_status(cfg: Config, timeout: float = 5.0) -> dict[str, Any]:
    code, doc = api(cfg, "GET", "/v1/status", timeout=timeout)
    if code != 200:
        raise Unavailable(f"status API answered {code}")
    return doc


def ready(cfg: Config) -> bool:
    """The daemon answers and every one of its workers is up (False while starting)."""
    try:
        st = fetch_status(cfg, timeout=2)
    except Unavailable:
        return False
    ws = st["workers"]
    return len(ws) == cfg.workers.count and all(w["ready"] for w in ws)


def _dur(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}M"


WIDTH = 80  # `alertd status` and `alertd jobs` fit a standard terminal


def _wrap(parts: list[str]) -> list[str]:
    """Join `parts` with two spaces into as few lines of at most WIDTH as they allow."""
    lines = [""]
    for part in (p[:WIDTH] for p in parts):
        if lines[-1] and len(lines[-1]) + 2 + len(part) > WIDTH:
            lines.append(part)
        else:
            lines[-1] = f"{lines[-1]}  {part}" if lines[-1] else part
    return lines


def _n(v: int, width: int) -> str:
    """A count in `width` columns: 1234567 -> 1.2M when it would not fit."""
    s = str(v)
    if len(s) <= width:
        return s
    for div, unit in ((1e3, "k"), (1e6, "M"), (1e9, "G")):
        if v / div < 1000 or unit == "G":
            s = f"{v / div:.1f}{unit}"
            return s if len(s) <= width else f"{v / div:.0f}{unit}"
    return s


def render(doc: dict[str, Any]) -> str:
    """The `alertd status` table: one line per job, then the workers, within WIDTH columns."""
    rate = doc["rate"]
    limit = f"{rate['limit']:g}/s" if rate["limit"] > 0 else "unlimited"
    parts = [f"alertd {doc.get('version', '')} pid {doc['pid']}",
             f"up {_dur(doc.get('now', time.time()) - doc['started_at'])}"]
    if doc["draining"]:
        parts.append("DRAINING")
    parts += [f"delivering {doc.get('delivery_rate', 0):.0f}/s", f"limit {limit}"]
    if rate["paused_for"] > 0:
        parts.append(f"(paused {rate['paused_for']:.1f}s: 429)")
    br = doc.get("breaker", {})
    breaker = br.get("state", "closed")
    parts.append(f"breaker {breaker.upper() if breaker != 'closed' else breaker}"
                 + (f" ({br['reason']})" if breaker != "closed" and br.get("reason") else ""))
    lines = _wrap(parts)
    rl = doc["reload"]
    if rl["ok"] is not None:
        at = datetime.fromtimestamp(rl["at"]).strftime("%H:%M:%S")
        lines.append(f"last reload {'ok' if rl['ok'] else 'FAILED'} at {at}"
                     f"  ({rl.get('succeeded', 0)} ok, {rl.get('failed', 0)} failed)")
        if rl["error"]:
            lines.append(f"  {rl['error']}"[:WIDTH])
    cl = doc.get("cluster")
    if cl is not None:
        lines += _cluster_lines(cl)
    lines.append(f"{'JOB':8} {'FILE':13} {'STATE':8} {'DONE':>4} {'ROWS':>8} {'DELIVER':>8} "
                 f"{'REJECT':>6} {'DEAD':>5} {'RATE/s':>6} {'ETA':>5}")
    unacked = 0  # rows final in the workers but not yet durable (chunk not acknowledged)
    for j in doc["jobs"]:
        frac = j.get("progress", j["bytes_done"] / j["bytes"] if j["bytes"] else 1.0)
        est = j.get("rows_estimate")
        rows = _n(j["rows"], 8) if j.get("planned_all") and not j["chunks_in_flight"] \
            else ("~" + _n(est, 7) if est else "?")
        state = "failed" if j["failed"] else j.get("state", "running")
        live = j.get("live", j)
        unacked += max(0, live["rows"] - j["rows"])
        lines.append(f"{j['job']:8} {j['file'][:13]:13} {state[:8]:8} {frac:>4.0%} {rows:>8} "
                     f"{_n(live['delivered'], 8):>8} {_n(live['rejected'], 6):>6} "
                     f"{_n(live['dead'], 5):>5} {_n(round(j.get('rate', 0)), 6):>6} "
                     f"{_dur(j.get('eta_s'))[:5]:>5}")
        if j["failed"]:
            lines.append(f"         failed: {j['failed']}"[:WIDTH])
    remote = [j for j in (cl or {}).get("jobs", []) if j["state"] not in
              ("complete", "cancelled", "failed")]
    for j in remote if not doc["jobs"] else []:  # the planner's jobs, seen from another node
        lines.append(f"{j['job']:8} {j['file'][:13]:13} {j['state'][:8]:8} "
                     f"{j['progress']:>4.0%} {_n(j['rows'], 7) + '+':>8} "
                     f"{_n(j['delivered'], 8):>8} {_n(j['rejected'], 6):>6} "
                     f"{_n(j['dead'], 5):>5} {'':>6} {'':>5}".rstrip())
    if not doc["jobs"] and not remote:
        lines.append("(no job in progress)")
    lines.append(f"(counts are live: {unacked:,} rows final, not yet durable: chunk unacked)"[:WIDTH]
                 if unacked else "(counts are live, and all durable: every chunk acked)")
    lines.append(f"{'WORKER':6} {'PID':>7} {'RSS':>6} {'CPU':>5} {'IN FLIGHT':>9} "
                 f"{'PENDING':>7} {'SENT':>8}")
    for w in doc["workers"]:
        cpu = "-" if w.get("cpu_percent") is None else f"{w['cpu_percent']:.0f}%"
        flags = ",".join(f for f, on in (("retiring", w["retiring"]), ("starting", not w["ready"]),
                                         ("WAL-ERROR", w["wal_error"])) if on)
        lines.append((f"{w['index']:<6} {w['pid']:>7} {_mib(w.get('rss_bytes')):>6} {cpu:>5} "
                      f"{_n(w['in_flight'], 9):>9} {_n(w['pending'], 7):>7} "
                      f"{_n(w['sent'], 8):>8} {flags}").rstrip()[:WIDTH])
    return "\n".join(lines)


def _cluster_lines(cl: dict[str, Any]) -> list[str]:
    """This node's place in the cluster, and every node Redis knows."""
    redis = "redis up" if cl["redis"] == "up" else f"REDIS UNREACHABLE: {cl.get('error')}"
    lines = [f"cluster node {cl['node']} ({'planner' if cl.get('planner') else 'worker node'})"
             f", {redis}"[:WIDTH],
             f"{'NODE':16} {'PID':>7} {'HEARTBEAT':>9} {'RATE/s':>7} {'WORKERS':>7}"]
    for n in cl.get("nodes", []):
        late = "  LAPSED" if n["age"] > cl.get("lease", 15.0) else ""
        lines.append(f"{n['name'][:16]:16} {n['pid']:>7} {n['age']:>8.1f}s "
                     f"{_n(round(n['rate']), 7):>7} {n['workers']:>7}{late}")
    return lines


def status(cfg: Config, as_json: bool = False, watch: bool = False,
           interval: float = 1.0) -> int:
    """Print the status once, or redraw it every `interval` seconds until Ctrl-C."""
    while True:
        try:
            doc = fetch_status(cfg)
            out = orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() if as_json \
                else render(doc)
        except Unavailable as e:
            if not watch:
                raise
            out = f"alertd: {e} (retrying)"  # a restart should not end the watch
        if watch and not as_json and sys.stdout.isatty():
            sys.stdout.write("\x1b[H\x1b[2J")
        print(out, flush=True)
        if not watch:
            return EXIT_OK
        time.sleep(interval)


# ------------------------------------------------------------------ reload


def _reloads(doc: dict[str, Any]) -> int:
    r = doc["reload"]
    return r["succeeded"] + r["failed"]


def reload(cfg: Config, timeout: float = 30.0) -> int:
    """HUP the daemon that serves `cfg`'s status API; wait for the result of a reload
    that started after the signal.

    `cfg` was loaded by the caller with the daemon's own loader, so a file that fails
    here never reaches the daemon. The pid is the one the status document reports: the
    process that answers on this config's [status] listen is the one that re-reads it.
    A reload counts as ours once the daemon's reload count passes the one read before
    the signal (reloads run one at a time, each reading the file as it is then).
    """
    doc = fetch_status(cfg)
    pid = doc["pid"]
    if cfg.source is not None and doc.get("config") and Path(doc["config"]) != cfg.source:
        print(f"alertd: the daemon at {cfg.status.listen} (pid {pid}) runs {doc['config']}, "
              f"not {cfg.source}: a reload re-reads the daemon's own file", file=sys.stderr)
        return EXIT_CONFIG
    main_pid = os.environ.get("MAINPID")  # set by systemd for ExecReload=
    if main_pid and main_pid != str(pid):
        raise AlertdError(f"reload: the status API is served by pid {pid}, but systemd's "
                          f"main process is {main_pid}; not signalling either")
    before = _reloads(doc)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise Unavailable(f"alertd (pid {pid}) is gone") from None
    except PermissionError:
        raise Unavailable(f"cannot signal alertd (pid {pid}): permission denied; run as "
                          f"its user or root") from None
    deadline = time.monotonic() + timeout
    while True:
        try:
            doc = fetch_status(cfg, timeout=max(0.1, min(5.0, deadline - time.monotonic())))
        except Unavailable:
            if time.monotonic() >= deadline:
                raise
            doc = None
        if doc is not None and doc["pid"] != pid:
            raise AlertdError(f"reload: alertd restarted (pid {pid} -> {doc['pid']}) before "
                              f"reporting the reload; it now runs whatever the file says")
        if doc is not None and _reloads(doc) > before:
            r = doc["reload"]
            if r["ok"]:
                print(f"alertd: reloaded {doc.get('config') or cfg.source} (pid {pid})")
                return EXIT_OK
            print(f"alertd: reload failed, the daemon keeps its running config: {r['error']}",
                  file=sys.stderr)
            return EXIT_FAILURE
        if time.monotonic() >= deadline:
            raise AlertdError(f"reload: no result from alertd (pid {pid}) within {timeout:g} s")
        time.sleep(0.05)


# ------------------------------------------------------------------ tail


def tail(cfg: Config, follow: bool = False, lines: int = 20, as_json: bool = False,
         job: str | None = None, outcome: str | None = None) -> int:
    """Print the last `lines` outcomes of all WALs merged by time (0 = all), then follow."""
    try:
        tail_mod.run(cfg.state_dir / "wal", lines, follow, as_json, job, outcome)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


# ------------------------------------------------------------------ verify


def _failed_reason(sd: Path, job: str) -> str | None:
    """Why `job` failed, if it did: its summary's reason, or failed/<job>--*.reason for a
    file that failed at claim (it never had a summary)."""
    try:
        doc = orjson.loads((sd / "done" / f"{job}.summary.json").read_bytes())
        if isinstance(doc, dict) and doc.get("status") == "failed":
            return str(doc.get("reason") or "unknown reason")
    except (OSError, orjson.JSONDecodeError):
        pass
    for p in sorted((sd / "failed").glob(f"{job}--*.reason")):
        try:
            return p.read_text(errors="replace").partition("\n")[0] or "unknown reason"
        except OSError:
            continue
    return None


def _find_job(cfg: Config, job: str) -> tuple[Path, dict[str, Any]]:
    sd = cfg.state_dir
    reason = _failed_reason(sd, job)
    if reason is not None:
        raise AlertdError(f"verify: {job} failed: {reason}; its file is in {sd}/failed, and "
                          f"rows without an outcome were never sent (fix the file and drop it "
                          f"again as a new job)")
    for d in (sd / "done", sd / "spool"):
        mpath = d / (f"{job}.manifest.json" if d.name == "done" else f"{job}.json")
        if mpath.exists():
            doc = orjson.loads(mpath.read_bytes())
            # The spool name (kept in done/ too) is shortened or escaped; the manifest has it.
            base = Path(doc["spool"]).name if "spool" in doc else f"{job}--{doc['name']}"
            for name in (d / base, sd / "done" / base):
                if name.exists():
                    return name, doc
            if (sd / "done" / f"{job}.summary.json").exists():
                raise AlertdError(f"verify: {job}: its source file is gone (removed after the job "
                                  f"finished, by [retention] done_files); the summary stays in "
                                  f"{sd}/done/{job}.summary.json")
    raise AlertdError(f"verify: no job {job} with a source file in {sd}/done or {sd}/spool")


def verify(cfg: Config, job: str) -> int:
    """Every row offset of the source has exactly one final outcome in the WALs.

    Memory is two bits per byte of the source file (256 MB for a 1 GB file), never a
    map of every row, and the file is read span by span, never whole.
    """
    path, doc = _find_job(cfg, job)
    size = path.stat().st_size
    once, twice = bytearray(size // 8 + 1), bytearray(size // 8 + 1)
    stray = 0  # outcomes at offsets that are no row of the file
    cancelled: list[tuple[int, int]] = []  # a cancel: rows here without an outcome are final
    for seg in wal.segments(cfg.state_dir / "wal"):
        for r in wal.records(seg):
            if r["job"] != job or r["out"] not in wal.FINAL:
                continue
            if "off" not in r:
                cancelled.append((r["start"], r["end"]))
                continue
            off = r["off"]
            if not 0 <= off < size:
                stray += 1
                continue
            i, bit = off >> 3, 1 << (off & 7)
            if once[i] & bit:
                twice[i] |= bit
            else:
                once[i] |= bit
    rows = missing = dupes = ranged = 0
    examples: list[str] = []
    if size > doc["data_start"]:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            # A line longer than max_line_bytes is one row, skipped in blocks (never held).
            max_line = doc["layout"].get("max_line_bytes", 0)
            for start, end in chunker.plan(chunker.FileView(fd, size), doc["data_start"], 1 << 20,
                                           max_line):
                for off, _line in chunker.read_rows(fd, start, end, max_line):
                    rows += 1
                    i, bit = off >> 3, 1 << (off & 7)
                    if not once[i] & bit and any(a <= off < b for a, b in cancelled):
                        ranged += 1  # cancelled: its one final outcome is the range's
                        problem = ""
                    elif not once[i] & bit:
                        missing += 1
                        problem = "no final outcome"
                    elif twice[i] & bit:
                        dupes += 1
                        problem = "more than one final outcome"
                    else:
                        problem = ""
                    once[i] &= ~bit & 0xFF  # what stays set afterwards is no row
                    if problem and len(examples) < 10:
                        examples.append(f"  offset {off}: {problem}")
        finally:
            os.close(fd)
    stray += int.from_bytes(once, "little").bit_count()
    ok = missing == 0 and dupes == 0 and stray == 0
    print(f"verify {job}: {rows} rows, {rows - missing - dupes} with exactly one final outcome"
          + (f" ({ranged} of them cancelled)" if cancelled else "")
          + f", {missing} without, {dupes} with more than one, {stray} outcomes at non-row "
          f"offsets: {'OK' if ok else 'FAILED'}")
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


# ------------------------------------------------------------------ jobs


def render_jobs(jobs: list[dict[str, Any]]) -> str:
    """The `alertd jobs` table: one line per job, active ones first, within WIDTH columns."""
    lines = [f"{'JOB':8} {'FILE':11} {'STATE':9} {'PRIO':6} {'ROWS':>8} {'DELIVER':>8} "
             f"{'REJECT':>6} {'DEAD':>5} {'CANCEL':>6} {'DONE':>4}"]
    for j in jobs:
        rows = _n(j["rows"], 8) if j["rows_final"] else _n(j["rows"], 7) + "+"
        lines.append(f"{j['job']:8} {j['file'][:11]:11} {j['state']:9} {j['priority']:6} "
                     f"{rows:>8} {_n(j['delivered'], 8):>8} {_n(j['rejected'], 6):>6} "
                     f"{_n(j['dead'], 5):>5} {_n(j['cancelled'], 6):>6} {j['progress']:>4.0%}")
        if j.get("reason"):
            lines.append(f"         {j['reason']}"[:WIDTH])
    if not jobs:
        lines.append("(no jobs)")
    return "\n".join(lines)


def jobs(cfg: Config, as_json: bool = False) -> int:
    code, doc = api(cfg, "GET", "/v1/jobs")
    if code != 200:
        raise AlertdError(f"jobs: the daemon answered {code}: {doc.get('error', doc)}")
    print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() if as_json
          else render_jobs(doc["jobs"]))
    return EXIT_OK


def job_action(cfg: Config, job: str, action: str, priority: str | None = None) -> int:
    """pause/resume/cancel JOB, or set its priority: 0 done, 1 no such job or not in this
    state (the daemon's reason on one line)."""
    body = {"priority": priority} if action == "priority" else None
    code, doc = api(cfg, "POST", f"/v1/jobs/{quote(job, safe='')}/{action}", body)
    if code == 200:
        what = f"priority {doc['priority']}" if action == "priority" else doc["state"]
        print(f"alertd: {doc['job']} {what}")
        return EXIT_OK
    reason = doc.get("error") if isinstance(doc, dict) else None
    print(f"alertd: {action} {job}: {reason or f'the daemon answered {code}'}", file=sys.stderr)
    return EXIT_CONFIG if code == 400 else EXIT_FAILURE
