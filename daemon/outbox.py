"""A worker's messages to the supervisor (Ready, acks, progress), sent in order by one thread.

The pipe is blocking: a send into a full pipe must wait, not raise half-way through a
message. It must not wait on the event loop, though: the loop is what reads the
supervisor's messages, and the supervisor's own blocking send of a large chunk descriptor
(a re-queued chunk carries its settled offsets) to this worker would wait for that read
while this worker's send waited for the supervisor's read: the two would wait on each
other for good. Pickled on the loop, so a message is what it was when sent.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler


class Outbox:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")

    def send(self, msg: object) -> None:
        """Queue `msg` (conn.recv() on the other end reads it); never blocks."""
        self._thread.submit(self._write, bytes(ForkingPickler.dumps(msg)))

    def _write(self, data: bytes) -> None:
        try:
            self._conn.send_bytes(data)
        except OSError:
            pass  # the supervisor is gone: the worker sees EOF on its read side and stops

    def close(self) -> None:
        """Wait until everything queued is written (blocking: run it in a thread)."""
        self._thread.shutdown(wait=True)
