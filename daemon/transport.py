"""A lean HTTP/1.1 keep-alive connection pool for webhook POSTs (asyncio Protocols + httptools).

Owns the sockets to the endpoint and the bytes on the wire. It never judges a
status code (delivery rules live in the worker), never resends a request the
receiver may have seen, and never spends a Task or a wait_for on a request.
"""
from __future__ import annotations

import asyncio
import base64
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import httptools

USER_AGENT = "alertd/0.1"
_SLOT = object()  # handed to a waiter instead of a connection: "a slot is yours, connect"
_Endpoint = tuple[str, int, bool]  # (host, port, tls): connections outlive a reload only if equal


class TransportError(Exception):
    """A request failed below HTTP. `sent` is True when the whole request had been
    handed to the socket, so the receiver may have processed it (outcome unknown)."""

    def __init__(self, kind: str, sent: bool, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind  # "connect", "timeout", "closed" or "protocol"
        self.sent = sent


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    retry_after: bytes | None = None  # raw Retry-After value; the worker parses it


# Frozen, so the common answers can be shared rather than built per request.
_PLAIN = {code: Response(code) for code in range(100, 600)}


def _parse(url: str, headers: Sequence[tuple[str, str]]) -> tuple[_Endpoint, bytes]:
    """The endpoint, and the request head up to and including "Content-Length: "."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"transport: not an http(s) URL: {url!r}")
    tls = parts.scheme == "https"
    host, port = parts.hostname, parts.port or (443 if tls else 80)
    authority = f"[{host}]" if ":" in host else host
    if port != (443 if tls else 80):
        authority += f":{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"POST {target} HTTP/1.1", f"Host: {authority}", "Content-Type: application/json",
             f"User-Agent: {USER_AGENT}"]
    if parts.username is not None:  # credentials in the URL, sent the way curl sends them
        cred = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        lines.append("Authorization: Basic " + base64.b64encode(cred).decode())
    for name, value in headers:
        if not name or any(c in name for c in " :\r\n\t") or "\r" in value or "\n" in value:
            raise ValueError(f"transport: invalid header {name!r}")
        lines.append(f"{name}: {value}")
    return (host, port, tls), ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")


class _Conn(asyncio.Protocol):
    """One keep-alive connection: at most one request at a time, no pipelining."""

    __slots__ = ("pool", "endpoint", "loop", "transport", "parser", "fut", "deadline", "timer",
                 "timer_at", "connect_deadline", "code", "retry_after", "framed", "keep",
                 "complete", "lost", "lost_waiter")

    def __init__(self, pool: Pool, endpoint: _Endpoint, loop: asyncio.AbstractEventLoop) -> None:
        self.pool, self.endpoint, self.loop = pool, endpoint, loop
        self.transport: Any = None
        self.parser = httptools.HttpResponseParser(self)
        self.fut: asyncio.Future[Response] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = self.timer_at = 0.0
        self.connect_deadline = 0.0  # a new connection's first request shares its connect deadline
        self.code = 0
        self.retry_after: bytes | None = None
        # framed: Content-Length or Transfer-Encoding seen, so EOF is not the end of the body
        self.framed = self.keep = self.complete = self.lost = False
        self.lost_waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.pool._adopt(self)

    def data_received(self, data: bytes) -> None:
        if self.fut is None:  # bytes nobody asked for: the stream can't be trusted
            return self.drop(abort=True)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            return self.fail(TransportError("protocol", True, f"bad response: {e}"))
        if self.complete:
            self._finish(self.keep)

    def eof_received(self) -> bool:
        if self.fut is None:  # the server closed an idle connection: never hand it out again
            self.lost = True
            self.pool._forget(self)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.fut is not None:
            if self.code >= 200 and not self.framed and not self.complete:
                self._finish(False)  # a body delimited by EOF: this close is its end
            else:
                why = f"peer closed the connection ({exc})" if exc else "peer closed the connection"
                self.fail(TransportError("closed", True, why))
        self.pool._forget(self)
        if self.lost_waiter is not None and not self.lost_waiter.done():
            self.lost_waiter.set_result(None)

    # httptools callbacks; on_body is left out on purpose so bodies are skipped in C.
    def on_header(self, name: bytes, value: bytes) -> None:
        n = len(name)  # a length test first keeps most headers to one integer comparison
        if n == 11:
            if name.lower() == b"retry-after":
                self.retry_after = value
        elif (n == 14 and name.lower() == b"content-length") or (
                n == 17 and name.lower() == b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.code = self.parser.get_status_code()
        self.keep = self.parser.should_keep_alive()  # Connection: close, HTTP/1.0, EOF bodies

    def on_message_complete(self) -> None:
        if self.code < 200:  # an interim 1xx: the real response follows
            self.code, self.retry_after, self.framed = 0, None, False
        else:
            self.complete = True

    def usable(self) -> bool:
        return not self.lost and not self.transport.is_closing()

    def send(self, data: bytes, deadline: float) -> asyncio.Future[Response]:
        self.fut = fut = self.loop.create_future()
        self.deadline = deadline
        # One timer per connection, moved lazily: a request only stores its deadline and
        # the timer re-arms itself when it fires early. A new one is needed only when none
        # is pending or it would fire too late (a reload shortened the timeout).
        timer = self.timer
        if timer is None or deadline < self.timer_at:
            if timer is not None:
                timer.cancel()
            self.timer, self.timer_at = self.loop.call_at(deadline, self._on_timer), deadline
        self.pool._queue_write(self, data)
        return fut

    def _on_timer(self) -> None:
        self.timer = None
        if self.fut is None:
            return
        if self.loop.time() + 0.001 >= self.deadline:  # timers may fire a hair early
            self.fail(TransportError("timeout", True, "no response in time"))
        else:
            self.timer, self.timer_at = self.loop.call_at(self.deadline, self._on_timer), self.deadline

    def _finish(self, keep: bool) -> None:
        fut, self.fut = self.fut, None
        if fut is not None and not fut.done():
            ra = self.retry_after
            fut.set_result((ra is None and _PLAIN.get(self.code)) or Response(self.code, ra))
        self.code, self.retry_after, self.framed, self.complete = 0, None, False, False
        self.pool._release(self, keep)

    def fail(self, exc: TransportError) -> None:
        fut, self.fut = self.fut, None
        if fut is not None and not fut.done():
            fut.set_exception(exc)
        self.drop(abort=True)

    def drop(self, abort: bool = False) -> None:
        """Never use this connection again; abort when its stream is in an unknown state."""
        self.lost = True
        self.pool._forget(self)
        if self.transport is not None:
            self.transport.abort() if abort else self.transport.close()


class Pool:
    """At most `size` keep-alive connections to one endpoint; FIFO waiters beyond that."""

    def __init__(self, url: str, *, size: int, timeout: float,
                 headers: Sequence[tuple[str, str]] = (),
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ssl = ssl_context
        self._idle: list[_Conn] = []  # LIFO: the freshest connection is least likely timed out
        self._conns: set[_Conn] = set()  # adopted and not yet forgotten
        self._waiters: deque[asyncio.Future[Any]] = deque()  # each gets a _Conn or _SLOT
        self._open = 0  # connections open or being opened; above _size only after a shrink
        self._opened = self._in_flight = 0
        self._closed = False
        self._writes: list[tuple[_Conn, bytes]] = []  # requests to write at the loop's turn
        self._endpoint: _Endpoint | None = None
        self.reconfigure(url, size=size, timeout=timeout, headers=headers)

    @property
    def connections_opened(self) -> int:
        return self._opened

    @property
    def in_flight(self) -> int:
        """Requests inside post(), including those waiting for a connection."""
        return self._in_flight

    def reconfigure(self, url: str, *, size: int, timeout: float,
                    headers: Sequence[tuple[str, str]]) -> None:
        """Apply a reloaded webhook config to new requests; idle connections to an old
        endpoint, and idle ones above a smaller size, are closed at once."""
        if size < 1 or timeout <= 0:
            raise ValueError(f"transport: size must be >= 1 and timeout > 0, got {size}, {timeout}")
        endpoint, self._head = _parse(url, headers)
        if endpoint[2] and self._ssl is None:
            self._ssl = ssl.create_default_context()
        self._timeout, self._size = timeout, size
        if endpoint != self._endpoint:
            self._endpoint = endpoint
            while self._idle:
                self._idle.pop().drop()  # busy ones to the old endpoint close on release
        while self._open > size and self._idle:
            self._idle.pop(0).drop()
        self._grant_slots()

    async def post(self, header_lines: bytes, body: bytes) -> Response:
        """POST one request; header_lines are complete "Name: value\\r\\n" lines.

        Raises TransportError; the timeout spans the connect (if any) and the exchange.
        """
        if self._closed:
            raise TransportError("closed", False, "pool is closed")
        loop = self._loop or self._bind()
        self._in_flight += 1
        try:
            conn = None
            idle, endpoint = self._idle, self._endpoint
            while idle:  # a stale idle connection was never written to: skipping it is safe
                conn = idle.pop()
                if conn.endpoint is endpoint and conn.usable():
                    break
                conn.drop()
                conn = None
            if conn is None:
                conn = await self._acquire(loop)
            deadline = conn.connect_deadline or loop.time() + self._timeout
            conn.connect_deadline = 0.0
            fut = conn.send(b"".join((self._head, str(len(body)).encode(), b"\r\n", header_lines,
                                      b"\r\n", body)), deadline)
            try:
                return await fut
            except asyncio.CancelledError:
                if conn.fut is fut:  # its response would arrive for nobody
                    conn.drop(abort=True)
                raise
        finally:
            self._in_flight -= 1

    def _bind(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        return self._loop

    async def _acquire(self, loop: asyncio.AbstractEventLoop) -> _Conn:
        """A live connection: a released one handed over in FIFO order, or a new one."""
        while True:
            if self._open < self._size and not self._waiters:
                self._open += 1
                got: Any = _SLOT
            else:
                fut = loop.create_future()
                self._waiters.append(fut)
                try:
                    got = await fut
                except asyncio.CancelledError:
                    if not fut.done():
                        self._waiters.remove(fut)
                    elif not fut.cancelled():  # woken, then cancelled: pass the gift on
                        self._give_back(fut.result())
                    raise
            if got is _SLOT:
                return await self._connect(loop)
            if got.endpoint is self._endpoint and got.usable():
                return got
            got.drop()

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Conn:
        """Open a connection in a slot already counted in _open; the slot is freed on failure."""
        assert self._endpoint is not None
        host, port, tls = endpoint = self._endpoint
        conn = _Conn(self, endpoint, loop)
        conn.connect_deadline = deadline = loop.time() + self._timeout
        try:  # one timeout context per connect (not per request) is cheap enough
            async with asyncio.timeout_at(deadline):
                await loop.create_connection(lambda: conn, host, port, ssl=self._ssl if tls else None,
                                             server_hostname=host if tls else None)
        except BaseException as e:
            if conn.transport is not None:
                conn.drop(abort=True)  # frees the slot through _forget
            else:
                self._give_back(_SLOT)
            if isinstance(e, TimeoutError):
                raise TransportError("timeout", False, f"connect to {host}:{port}") from None
            if isinstance(e, OSError):  # refused, unreachable, DNS, TLS handshake
                raise TransportError("connect", False, f"{host}:{port}: {e}") from None
            raise
        if self._closed or not conn.usable():  # closed before we said anything
            conn.drop()
            raise TransportError("closed", False, f"{host}:{port} closed at once")
        return conn

    def _queue_write(self, conn: _Conn, data: bytes) -> None:
        # Writes wait for the end of this loop iteration and then go out back to back:
        # the receiver is woken once per batch instead of once per request. Each
        # wake-up of an idle peer costs a cross-CPU interrupt, which dominated the
        # per-request cost on loopback (about 20 us of a ~55 us delivery).
        if not self._writes:
            self._loop.call_soon(self._flush_writes)
        self._writes.append((conn, data))

    def _flush_writes(self) -> None:
        writes, self._writes = self._writes, []
        for conn, data in writes:
            if conn.fut is None:
                continue  # failed or cancelled meanwhile
            if conn.lost or conn.transport.is_closing():
                conn.fail(TransportError("closed", False, "connection lost before the "
                                                          "request was written"))
            else:
                conn.transport.write(data)

    # Bookkeeping called by connections. A slot is held from _acquire until _forget.
    def _adopt(self, conn: _Conn) -> None:
        self._conns.add(conn)
        self._opened += 1

    def _release(self, conn: _Conn, keep: bool) -> None:
        if not keep or self._closed or conn.endpoint is not self._endpoint or self._open > self._size:
            return conn.drop()
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                return w.set_result(conn)
        self._idle.append(conn)

    def _give_back(self, got: Any) -> None:
        if got is _SLOT:
            self._open -= 1
            self._grant_slots()
        else:
            self._release(got, True)

    def _forget(self, conn: _Conn) -> None:
        if conn in self._conns:
            self._conns.discard(conn)
            if conn in self._idle:
                self._idle.remove(conn)
            self._give_back(_SLOT)

    def _grant_slots(self) -> None:
        while self._waiters and self._open < self._size:
            w = self._waiters.popleft()
            if not w.done():
                self._open += 1
                w.set_result(_SLOT)

    async def close(self) -> None:
        """Fail waiters and in-flight requests, close every connection, wait briefly for them."""
        self._closed = True
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_exception(TransportError("closed", False, "pool is closed"))
        waits = []
        for c in list(self._conns):  # still adopted, so connection_lost has not run yet
            c.lost_waiter = c.loop.create_future()
            waits.append(c.lost_waiter)
            if c.fut is not None:
                c.fail(TransportError("closed", True, "pool is closed"))
            else:
                c.drop()
        if waits:
            await asyncio.wait(waits, timeout=1.0)
