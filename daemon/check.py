"""`alertd check FILE`: a dry run. Reads a file exactly as a job would and sends nothing.

Reports rows, rejected rows by reason (the first few with offsets), the estimated duration
at the configured rate and one rendered sample alert. Needs no daemon; memory is bounded
by one chunk, as for a job.
"""
from __future__ import annotations

import collections
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from . import chunker, jobs, names
from .config import Config
from .credentials import redact_url
from .errors import EXIT_FAILURE, EXIT_OK, InputError
from .payload import Payloads

EXAMPLES = 5  # rejected rows shown with their offsets


@dataclass
class Report:
    rows: int = 0
    valid: int = 0
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: list[tuple[int, str]] = field(default_factory=list)
    sample: tuple[int, str, str, dict[str, str] | None] | None = None  # offset, id, message, fields


def scan(cfg: Config, fd: int) -> Report:
    """Every row of the open file, read as a job reads it: the same planner, the same row
    reader (long lines skipped in blocks), the same parser."""
    layout, start = jobs.inspect(fd, cfg.csv)
    rep = Report()
    view = chunker.FileView(fd, os.fstat(fd).st_size)
    for s, e in chunker.plan(view, start, cfg.workers.chunk_bytes, layout.max_line_bytes):
        for off, line in chunker.read_rows(fd, s, e, layout.max_line_bytes):
            rep.rows += 1
            fields = None
            try:
                if layout.has_fields:  # what the worker does: fields too, and their rules
                    uid, msg, fields = chunker.parse_fields(line, layout)
                else:
                    uid, msg = chunker.parse(line, layout)
            except chunker.BadRow as err:
                rep.rejected[err.reason] += 1
                if len(rep.examples) < EXAMPLES:
                    rep.examples.append((off, err.reason))
                continue
            rep.valid += 1
            if rep.sample is None:
                rep.sample = (off, uid, msg if msg is not None else cfg.alert.message, fields)
    return rep


def _duration(rows: int, limit: float) -> str:
    if not limit:
        return "no rate limit: as fast as the receiver answers"
    s = rows / limit
    return f"{s:.1f} s at {limit:g}/s" if s < 120 else f"{s / 60:.1f} min at {limit:g}/s"


def render_sample(cfg: Config, name: str,
                  sample: tuple[int, str, str, dict[str, str] | None]) -> str:
    off, uid, msg, fields = sample
    hdr, body = Payloads(cfg.webhook.secrets).build(f"j000000:{off}", uid, msg, name, off,
                                                     time.time(), fields)
    lines = [f"POST {redact_url(cfg.webhook.url)}", "content-type: application/json",
             *(f"{k}: <set in config>" for k, _ in cfg.webhook.headers),
             *hdr.decode().strip().split("\r\n"), "", body.decode()]
    return "\n".join("  " + ln for ln in lines)


def check(cfg: Config, path: Path, out: TextIO = sys.stdout) -> int:
    """Print the dry run's report; EXIT_FAILURE when the file would fail as a job."""
    name = names.escape(os.fsencode(path.name))
    try:
        fd = jobs.open_regular(path)
        try:
            rep = scan(cfg, fd)
        finally:
            os.close(fd)
    except InputError as e:
        print(f"check {name}: the job would fail: {e}", file=out)
        return EXIT_FAILURE
    except OSError as e:
        print(f"check {name}: the job would fail: cannot read: {e}", file=out)
        return EXIT_FAILURE
    bad = sum(rep.rejected.values())
    print(f"check {name}: {rep.rows} rows, {rep.valid} would be sent, {bad} rejected", file=out)
    for reason, n in rep.rejected.most_common():
        print(f"  rejected {n:>8}  {reason}", file=out)
    for off, reason in rep.examples:
        print(f"  e.g. offset {off}: {reason}", file=out)
    print(f"estimated duration: {_duration(rep.valid, cfg.rate.limit)}", file=out)
    if rep.sample is not None:
        print("sample alert (nothing was sent):", file=out)
        print(render_sample(cfg, name, rep.sample), file=out)
    return EXIT_OK
