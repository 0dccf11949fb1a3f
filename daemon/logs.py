"""Logging to stderr the way the reader wants it.

Under systemd (JOURNAL_STREAM set) lines carry `<N>` priority prefixes and no
timestamp, so journald keeps levels; `--log-format json` suits log shippers.
"""
from __future__ import annotations

import logging
import os
import sys
import time

import orjson

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        # journald splits on newlines: prefix every line of a traceback, not only the first
        return "\n".join(f"<{prio}>{ln}" for ln in super().format(record).splitlines())


class _JsonFormatter(logging.Formatter):
    def __init__(self, process_name: str) -> None:
        super().__init__()
        self._proc = process_name

    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": time.time(), "level": record.levelname.lower(), "process": self._proc,
               "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


def journal_stream(fd: int = 2) -> bool:
    """True if `fd` is the stream systemd connected to the journal.

    JOURNAL_STREAM is "<dev>:<inode>" of that stream; a child whose stderr was
    redirected elsewhere inherits the variable, so the identity is compared
    (as sd_journal_stream_fd(3) recommends) instead of trusting the name.
    """
    want = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = want.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def setup(level: int = logging.INFO, process_name: str = "supervisor",
          fmt: str | None = None) -> None:
    fmt = fmt or os.environ.get("ALERTD_LOG_FORMAT", "text")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter(process_name))
    elif journal_stream(handler.stream.fileno()):
        handler.setFormatter(_JournalFormatter(f"{process_name}: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s {process_name}: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
