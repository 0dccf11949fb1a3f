"""The fast engine of the mock receiver (the default): asyncio Protocols + httptools on uvloop.

One process, one core, no framework. In mode "ok" without latency or record, the
plain alert POSTs of a read are served by the compiled _hot.Hot (parse, HMAC,
counts in C; see its docstring for what "plain" means); every other request, from
its first byte, goes to httptools, whose callbacks collect it for core.Core. Every
answer of one read is written with one send. Keep-alive, pipelining-safe (answers
leave in request order even when latency delays some), Content-Length and chunked
bodies. Without the compiled module (or with MOCK_WEBHOOK_PURE=1) all goes to httptools.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections import deque
from http import HTTPStatus
from typing import Any

import httptools
import orjson

from .core import RECORD_FLUSH_INTERVAL, Core, Settings

try:
    from ._hot import Hot
except ImportError:  # not built: every request takes the httptools path
    Hot = None

# aiohttp's default limit, so both engines refuse the same bodies.
MAX_BODY = 1024 * 1024
SHUTDOWN_TIMEOUT = 1.0  # in-flight delayed answers get this long after SIGTERM


def _head(status: int, extra: bytes = b"", keep: bool = True) -> bytes:
    return (b"HTTP/1.1 %d %s\r\n%s%sContent-Length: " % (
        status, HTTPStatus(status).phrase.encode(), extra,
        b"" if keep else b"Connection: close\r\n"))


def _empty(status: int, keep: bool = True) -> bytes:
    extra = b"Retry-After: 1\r\n" if status == 429 else b""
    return _head(status, extra, keep) + b"0\r\n\r\n"


# Every empty answer, built once: (status, keep-alive) -> bytes.
_EMPTY = {(s, k): _empty(s, k) for s in (200, 400, 401, 404, 405, 410, 413, 429, 500)
          for k in (True, False)}
_JSON_TYPE = b"Content-Type: application/json\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _json(status: int, body: bytes, keep: bool, head_only: bool = False) -> bytes:
    out = _head(status, _JSON_TYPE, keep) + b"%d\r\n\r\n" % len(body)
    return out if head_only else out + body


class _Slot:
    """An answer that must wait (latency, or behind one that waits): filled later, sent in order."""

    __slots__ = ("data", "keep")

    def __init__(self, data: bytes | None, keep: bool) -> None:
        self.data = data
        self.keep = keep


class _Conn(asyncio.Protocol):
    """One client connection: parser callbacks collect a request, on_message_complete answers it."""

    __slots__ = ("srv", "core", "hot", "loop", "parser", "transport", "out", "queue", "closing",
                 "pending", "in_msg", "url", "mid", "ts", "sig", "body", "size")

    def __init__(self, srv: FastServer) -> None:
        self.srv = srv
        self.core = srv.core
        self.hot = srv.hot
        self.loop = srv.loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None
        self.out: list[bytes] = []       # answers of the current read, sent together
        self.queue: deque[_Slot] = deque()  # answers waiting for a delayed one ahead of them
        self.closing = False
        self.on_message_begin()
        self.pending = b""  # the start of a request Hot took but that is not all here yet
        self.in_msg = False  # httptools holds part of a request: it must get the rest

    # asyncio.Protocol

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.srv.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.srv.conns.discard(self)
        self.transport = None
        self.closing = True

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.pending:
            data = self.pending + data
            self.pending = b""
        hot = self.hot
        core = self.core
        s = core.settings
        if (hot is not None and not self.in_msg and not self.queue and s.mode == "ok"
                and not s.latency_ms and core.recorder is None):
            pos = hot.feed(data, core, self.out)
            if pos < len(data):
                if hot.incomplete:
                    self.pending = data[pos:] if pos else data
                else:
                    self._parse(data[pos:] if pos else data)
        else:
            self._parse(data)
        out = self.out
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if self.closing and not self.queue and self.transport is not None:
            self.transport.close()

    def _parse(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            # llhttp also refuses bytes after a Connection: close request: those get no answer.
            if not self.closing:
                self._emit(_EMPTY[400, False], False)

    def pause_writing(self) -> None:
        # A client that pipelines without reading answers is not read from either.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.in_msg = True
        self.url = b""
        self.mid = self.ts = self.sig = self.body = None
        self.size = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        n = len(name)  # a length test first: most headers cost one integer comparison
        if n == 10:
            if self.mid is None and name.lower() == b"webhook-id":
                self.mid = value
        elif n == 17:
            name = name.lower()
            if name == b"webhook-signature":
                if self.sig is None:
                    self.sig = value
            elif name == b"webhook-timestamp" and self.ts is None:
                self.ts = value
        elif n == 6 and name.lower() == b"expect" and value.lower() == b"100-continue":
            # Sent when feed_data returns, i.e. once the headers are in: curl then sends the body.
            self._emit(_CONTINUE, True)

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > MAX_BODY:
            self.body = b""  # keep nothing more; answered 413 at the end
        elif self.body is None:
            self.body = body
        else:
            self.body += body

    def on_message_complete(self) -> None:
        self.in_msg = False
        if self.closing:
            return  # pipelined behind a Connection: close, or the client is gone
        self._dispatch()

    def _dispatch(self) -> None:
        parser = self.parser
        keep = parser.should_keep_alive()
        method = parser.get_method()
        path = self.url
        q = path.find(b"?")
        if q >= 0:
            path = path[:q]
        body = self.body or b""
        if self.size > MAX_BODY:
            self._emit(_EMPTY[413, False], False)
            return
        core = self.core
        if method == b"POST":
            if path == b"/control":
                status, answer = core.control(body)
                self._emit(_json(status, answer, keep), keep)
                return
            if path == b"/reset":
                core.reset()
                self._emit(_json(200, orjson.dumps(core.stats()), keep), keep)
                return
            if path != b"/stats":
                core.arrived()
                delay = core.settings.effective_latency()
                if delay:
                    slot = _Slot(None, keep)
                    self.queue.append(slot)
                    self.srv.delayed += 1
                    self.loop.call_later(delay, self._answer_later, slot, self.mid, self.ts,
                                         self.sig, body)
                    if not keep:
                        self.closing = True  # nothing after this request is read
                    return
                status = core.answer(self.mid, self.ts, self.sig, body)
                self._emit(_EMPTY[status, keep], keep)
                return
        if path == b"/stats" and method in (b"GET", b"HEAD"):
            self._emit(_json(200, orjson.dumps(core.stats()), keep, method == b"HEAD"), keep)
            return
        self._emit(_EMPTY[405 if path == b"/stats" else 404, keep], keep)

    # answers

    def _emit(self, data: bytes, keep: bool) -> None:
        if self.queue:
            self.queue.append(_Slot(data, keep))
        else:
            self.out.append(data)
        if not keep:
            self.closing = True

    def _answer_later(self, slot: _Slot, mid: bytes | None, ts: bytes | None, sig: bytes | None,
                      body: bytes) -> None:
        # Counted even when the client has gone meanwhile, like the aiohttp engine.
        self.srv.delayed -= 1
        slot.data = _EMPTY[self.core.answer(mid, ts, sig, body), slot.keep]
        queue = self.queue
        ready = []
        close = False
        while queue and queue[0].data is not None:
            s = queue.popleft()
            ready.append(s.data)
            if not s.keep:
                close = True
                queue.clear()
                break
        transport = self.transport
        if ready and transport is not None:
            transport.write(b"".join(ready))
            if close:
                transport.close()


class FastServer:
    """The listening socket, its connections and the record flush timer."""

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self.core = Core(settings)
        keys = self.core.key_bytes
        # Hot takes up to 16 secrets; more (never seen) take the httptools path.
        self.hot = (Hot(keys, MAX_BODY, _EMPTY[200, True], _EMPTY[401, True])
                    if Hot is not None and len(keys) <= 16 and not os.environ.get("MOCK_WEBHOOK_PURE")
                    else None)
        self.loop = loop
        self.conns: set[_Conn] = set()
        self.delayed = 0
        self.server: asyncio.AbstractServer | None = None
        self._flush_handle: asyncio.TimerHandle | None = None

    async def start(self, host: str, port: int) -> int:
        self.server = await self.loop.create_server(lambda: _Conn(self), host, port,
                                                    backlog=4096, reuse_address=True)
        if self.core.recorder is not None:
            self._flush()
        return self.server.sockets[0].getsockname()[1]

    def _flush(self) -> None:
        assert self.core.recorder is not None
        self.core.recorder.flush()
        self._flush_handle = self.loop.call_later(RECORD_FLUSH_INTERVAL, self._flush)

    async def stop(self) -> None:
        """Stop listening, give delayed answers up to SHUTDOWN_TIMEOUT, close, flush the record."""
        if self.server is not None:
            self.server.close()
        deadline = self.loop.time() + SHUTDOWN_TIMEOUT
        while self.delayed and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.close()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self.core.close()


async def serve(settings: Settings, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    srv = FastServer(settings, loop)
    try:
        bound = await srv.start(host, port)
        sys.stdout.write(f"mock_webhook: listening on http://{host}:{bound}/ mode={settings.mode}"
                         " engine=fast\n")
        sys.stdout.flush()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await srv.stop()
