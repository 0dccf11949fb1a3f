"""`alertd dlq replay`: resend dead letters of finished jobs with their original ids.

Runs in the CLI process with the configured webhook, rate, retries and secrets.
Each replayed alert gets a `replayed` or `replay-failed` WAL record (never a
second final outcome, so `verify` still holds); delivered lines leave the DLQ.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from . import policy, ratelimit, wal
from .config import Config
from .errors import AlertdError
from .payload import Payloads
from .policy import Action
from .shm import Shared
from .transport import Pool, TransportError, webhook_tls

REPLAY_WAL = 999  # the WAL index of replays: wal/worker-999.wal


@dataclass
class Result:
    job: str
    delivered: int = 0
    failed: int = 0


def _dlq_jobs(cfg: Config, job: str | None) -> list[str]:
    dlq = cfg.state_dir / "dlq"
    jobs = [job] if job else sorted(p.stem for p in dlq.glob("*.jsonl"))
    for j in jobs:
        if not (dlq / f"{j}.jsonl").exists():
            raise AlertdError(f"dlq replay: no dead letters for {j} in {dlq}")
        if not (cfg.state_dir / "done" / f"{j}.summary.json").exists():
            raise AlertdError(f"dlq replay: {j} is still running; replay it once it is final")
    return jobs


def replay(cfg: Config, job: str | None = None) -> list[Result]:
    """Replay the DLQ of `job`, or of every finished job; returns per-job results."""
    jobs = _dlq_jobs(cfg, job)
    wal_dir = cfg.state_dir / "wal"
    wal_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    return asyncio.run(_replay(cfg, jobs))


async def _replay(cfg: Config, jobs: list[str]) -> list[Result]:
    shared = Shared.create(multiprocessing.get_context("spawn"))
    ratelimit.configure(shared, cfg.rate.limit, cfg.rate.effective_burst)
    sender = _Sender(cfg, ratelimit.TokenBudget(shared), shared)
    writer = wal.WalWriter(cfg.state_dir / "wal", REPLAY_WAL, fsync=cfg.wal.fsync,
                           interval=cfg.wal.fsync_interval, segment_bytes=cfg.wal.segment_bytes)
    try:
        writer.open(wait=0)
    except BlockingIOError:
        raise AlertdError("dlq replay: another replay is running") from None
    committer = asyncio.get_running_loop().create_task(writer.run())
    results = []
    try:
        for job in jobs:
            results.append(await _replay_job(cfg, job, sender, writer))
    finally:
        await writer.close()
        await committer
        await sender.pool.close()
    return results


async def _replay_job(cfg: Config, job: str, sender: _Sender, writer: wal.WalWriter) -> Result:
    path = cfg.state_dir / "dlq" / f"{job}.jsonl"
    entries = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    outcomes = await asyncio.gather(*(sender.send(e) for e in entries))
    res = Result(job)
    remaining = []
    now = time.time()
    for e, (ok, status, attempts, err) in zip(entries, outcomes):
        ck = -1  # a replay belongs to no chunk
        writer.append(wal.encode_row(job, ck, e["offset"], "replayed" if ok else "replay-failed",
                                     status, attempts, True, e["user_id"], now, err))
        if ok:
            res.delivered += 1
        else:
            res.failed += 1
            remaining.append({**e, "attempts": e.get("attempts", 0) + attempts,
                              "status": status, "error": err, "replayed_at": now})
    await writer.sync()  # outcomes are durable before the DLQ forgets them
    _rewrite(path, remaining)
    return res


def _rewrite(path: Path, entries: list[dict[str, Any]]) -> None:
    """Replace the DLQ atomically, keeping its mode (0640 at most: it holds user IDs,
    whatever the umask of the shell running the replay) and, where allowed, its owner."""
    st = os.stat(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with open(fd, "wb") as f:
        os.fchmod(fd, stat.S_IMODE(st.st_mode) & 0o640)
        try:
            os.fchown(fd, st.st_uid, st.st_gid)  # root replaying the service's files
        except PermissionError:
            pass
        for e in entries:
            f.write(orjson.dumps(e) + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


class _Sender:
    """Resends with the workers' policy (policy.decide): a 429 spends no attempt and
    pauses every send for its Retry-After; retry.max_age, from the replay's start,
    bounds an alert that is never accepted."""

    def __init__(self, cfg: Config, budget: ratelimit.TokenBudget, shared: Shared) -> None:
        self.cfg = cfg
        self.budget = budget
        self.shared = shared
        self.payloads = Payloads(cfg.webhook.secrets)
        self.pool = Pool(cfg.webhook.url, size=cfg.workers.concurrency,
                         timeout=cfg.webhook.timeout, headers=cfg.webhook.headers,
                         ssl_context=webhook_tls(cfg.webhook))
        self.sem = asyncio.Semaphore(cfg.workers.concurrency)
        self.started = time.monotonic()
        self.gone = False

    async def send(self, e: dict[str, Any]) -> tuple[bool, int, int, str | None]:
        """(delivered?, last status, attempts, last error) for one dead letter."""
        retry = self.cfg.retry
        status, err, attempts = 0, None, 0
        async with self.sem:
            while not self.gone:
                await self.budget.acquire()
                hdr, body = self.payloads.build(e["id"], e["user_id"], e["message"], e["file"],
                                                e["offset"], time.time(), e.get("fields"))
                attempts += 1
                try:
                    r = await self.pool.post(hdr, body)
                except TransportError as ex:
                    status = 0
                    d = policy.decide(0, attempts, retry, None, str(ex))
                else:
                    status = r.status
                    d = policy.decide(status, attempts, retry, r.retry_after)
                if d.action is Action.DELIVERED:
                    return True, status, attempts, None
                err = d.error
                if not d.spend:
                    attempts -= 1
                if d.gone:
                    self.gone = True  # the endpoint says it is not there: stop sending
                if d.pause:
                    ratelimit.pause(self.shared, d.pause)
                if d.action is Action.DEAD or \
                        time.monotonic() - self.started + d.delay > retry.max_age:
                    break
                await asyncio.sleep(d.delay)
            else:
                err = err or "not sent: the endpoint answered 410 Gone"
        return False, status, attempts, err
