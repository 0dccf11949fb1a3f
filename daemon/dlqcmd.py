"""`alertd dlq replay [JOB]`: ask the running daemon to replay dead letters as a job of
kind `replay`, then follow it until it ends.

The replay is the daemon's, not this process's: Ctrl-C only stops watching it, and running
the command again attaches to the running replay instead of starting a second one.
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO
from urllib.parse import quote

from .commands import api
from .config import Config
from .errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK

EXIT_DETACHED = 130  # Ctrl-C: the replay goes on in the daemon
FINAL_STATES = ("complete", "cancelled", "failed")


def replay(cfg: Config, job: str | None, interval: float = 1.0,
           out: TextIO = sys.stdout) -> int:
    """0 when every letter was delivered, 1 when some failed again (back in the DLQ), were
    cancelled, or the daemon refused (the reason on one line), 2 on a bad request, 130
    when detached by Ctrl-C; commands.Unavailable (exit 3) without a daemon."""
    code, doc = api(cfg, "POST", "/v1/dlq/replay", {"job": job} if job else {})
    if code not in (200, 201):
        reason = doc.get("error") if isinstance(doc, dict) else None
        print(f"alertd: dlq replay{' ' + job if job else ''}: "
              f"{reason or f'the daemon answered {code}'}", file=sys.stderr)
        return EXIT_CONFIG if code == 400 else EXIT_FAILURE
    jobs = doc["jobs"]
    if not jobs:
        print("alertd: no dead letters to replay", file=out)
        return EXIT_OK
    for j in jobs:
        verb = "replaying" if j.get("started") else "already replaying (attached)"
        print(f"{j['job']}: {verb} the dead letters of {j['replay_of']}", file=out, flush=True)
    try:
        final = _follow(cfg, [j["job"] for j in jobs], interval, out)
    except KeyboardInterrupt:
        ids = ", ".join(j["job"] for j in jobs)
        print(f"\nalertd: detached; the replay ({ids}) goes on in the daemon "
              f"(`alertd jobs` to watch, `alertd cancel JOB` to stop it)", file=sys.stderr)
        return EXIT_DETACHED
    bad = 0
    for j in final:
        again = j["dead"] + j["rejected"] + j["cancelled"]
        bad += again + (j["state"] == "failed")
        print(f"{j['job']} {j['state']}: {j['rows']} dead letters of {j['replay_of']}, "
              f"{j['delivered']} delivered, {j['dead']} failed again, {j['rejected']} "
              f"unreadable, {j['cancelled']} not sent"
              + (f" ({j['reason']})" if j.get("reason") else "")
              + (f"; dlq/{j['replay_of']}.jsonl holds the rest" if again else ""), file=out)
    return EXIT_FAILURE if bad else EXIT_OK


def _follow(cfg: Config, ids: list[str], interval: float, out: TextIO) -> list[dict[str, Any]]:
    """Poll the replay jobs until each is final; a progress line per job when it moved."""
    done: dict[str, dict[str, Any]] = {}
    last: dict[str, tuple[float, int]] = {}
    while len(done) < len(ids):
        for r in ids:
            if r in done:
                continue
            code, j = api(cfg, "GET", f"/v1/jobs/{quote(r, safe='')}")
            if code != 200:  # gone from the recent list: it ended long ago
                done[r] = {"job": r, "state": "complete", "rows": 0, "delivered": 0,
                           "dead": 0, "rejected": 0, "cancelled": 0, "replay_of": "?"}
                continue
            if j["state"] in FINAL_STATES:
                done[r] = j
                continue
            now = time.monotonic()
            t0, d0 = last.get(r, (now, j["delivered"]))
            rate = (j["delivered"] - d0) / (now - t0) if now > t0 else 0.0
            if r not in last or j["delivered"] != d0:
                last[r] = (now, j["delivered"])
                print(f"{r} {j['state']}: {j['progress']:.0%}, {j['delivered']} delivered, "
                      f"{j['dead']} failed again, {rate:.0f}/s", file=out, flush=True)
        if len(done) < len(ids):
            time.sleep(interval)
    return [done[r] for r in ids]
