"""A lean HTTP/1.1 keep-alive connection pool for webhook POSTs (asyncio Protocols + httptools).

Owns the sockets to the endpoint and the bytes on the wire. It never judges a
status code (delivery rules live in policy.py), never resends a request the
receiver may have seen, and never spends a Task, a Future or a wait_for on a request: a
caller's run of requests on one connection is driven from the protocol's callbacks. A
receiver can make a request fail, never make it grow memory or outlive its
deadline: response heads are capped and bytes nobody asked for drop the stream.
"""
from __future__ import annotations

import asyncio
import base64
import socket
import ssl
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from .httpconn import (
    MAX_HEAD,
    MAX_HEADERS,
    Connection,
    Endpoint,
    NextRequest,
    OnResult,
    Response,
    Run,
    TransportError,
    tls_reason,
)

if TYPE_CHECKING:
    from .config import WebhookConfig

__all__ = ["MAX_HEAD", "MAX_HEADERS", "USER_AGENT", "NextRequest", "OnResult", "Pool",
           "Response", "TransportError", "request_head", "tls_context", "webhook_tls"]

USER_AGENT = "alertd/0.1"
_SLOT = object()  # handed to a waiter instead of a connection: "a slot is yours, connect"


def tls_context(ca_file: str | None = None, client_cert: str | None = None,
                client_key: str | None = None) -> ssl.SSLContext:
    """Certificates and host names always verified; `ca_file` replaces the system CAs,
    `client_cert` + `client_key` answer a server that asks for a client certificate."""
    ctx = ssl.create_default_context(cafile=ca_file)
    if client_cert:
        ctx.load_cert_chain(client_cert, client_key, password=lambda: b"")  # never prompt
    return ctx


def webhook_tls(w: WebhookConfig) -> ssl.SSLContext | None:
    """The TLS context for an https:// webhook (None for http://)."""
    if urlsplit(w.url).scheme != "https":
        return None
    return tls_context(str(w.ca_file) if w.ca_file else None,
                       str(w.client_cert) if w.client_cert else None,
                       str(w.client_key) if w.client_key else None)


def _parse(url: str, headers: Sequence[tuple[str, str]]) -> tuple[str, int, bool, bytes]:
    """(host, port, tls, the request head up to and including "Content-Length: ").

    Header names and values were validated once, by config.py; a configured
    User-Agent replaces ours.
    """
    parts = urlsplit(url)  # checked by config: http(s), a host, a port
    tls = parts.scheme == "https"
    host, port = parts.hostname, parts.port or (443 if tls else 80)
    authority = f"[{host}]" if ":" in host else host
    if port != (443 if tls else 80):
        authority += f":{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"POST {target} HTTP/1.1", f"Host: {authority}", "Content-Type: application/json"]
    if not any(name.lower() == "user-agent" for name, _ in headers):
        lines.append(f"User-Agent: {USER_AGENT}")
    if parts.username is not None:  # credentials in the URL, sent the way curl sends them
        cred = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        lines.append("Authorization: Basic " + base64.b64encode(cred).decode())
    lines += [f"{name}: {value}" for name, value in headers]
    return host, port, tls, ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")


def request_head(url: str, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """The request line and fixed headers up to "Content-Length: ", exactly as a Pool for
    this URL and these headers writes them (the row path prebuilds requests with it)."""
    return _parse(url, headers)[3]


def _connect_error(host: str, port: int, e: OSError) -> str:
    if isinstance(e, ssl.SSLError):
        return f"TLS handshake with {host}:{port} failed: {tls_reason(e)}"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve {host}: {e.strerror}"
    if isinstance(e, ConnectionRefusedError):
        return f"{host}:{port}: connection refused"
    return f"{host}:{port}: {e.strerror or e}"


class Pool:
    """At most `size` keep-alive connections to one endpoint; FIFO waiters beyond that."""

    def __init__(self, url: str, *, size: int, timeout: float,
                 headers: Sequence[tuple[str, str]] = (),
                 ssl_context: ssl.SSLContext | None = None, pipeline: int = 1) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ssl = ssl_context
        self._idle: list[Connection] = []  # LIFO: the freshest connection is least likely timed out
        self._conns: set[Connection] = set()  # adopted and not yet forgotten
        self._waiters: deque[asyncio.Future[Any]] = deque()  # each gets a Connection or _SLOT
        self._open = 0  # connections open or being opened; above _size only after a shrink
        self._opened = self._acquiring = 0
        self._sent = 0  # requests queued or written and not yet answered, all connections
        self._closed = False
        self._writes: list[Connection] = []  # connections with requests to write at the loop's turn
        self._endpoint: Endpoint | None = None
        self.reconfigure(url, size=size, timeout=timeout, headers=headers, pipeline=pipeline)

    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def connections_opened(self) -> int:
        return self._opened

    @property
    def head(self) -> bytes:
        """The request head of the current config (see request_head); a reconfigure
        replaces it, and requests built on the old one must not be sent."""
        return self._head

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered, and runs waiting for a connection."""
        return self._sent + self._acquiring

    def reconfigure(self, url: str, *, size: int, timeout: float,
                    headers: Sequence[tuple[str, str]],
                    ssl_context: ssl.SSLContext | None = None, pipeline: int = 1) -> None:
        """Apply a reloaded webhook config to new requests; idle connections to an old
        endpoint (or under an old TLS context), and idle ones above a smaller size, are
        closed at once. ssl_context None keeps the current one (or the default).
        `pipeline`: requests a connection may carry unanswered (1: no pipelining)."""
        if size < 1 or timeout <= 0 or pipeline < 1:
            raise ValueError(f"transport: size and pipeline must be >= 1 and timeout > 0, got "
                             f"{size}, {pipeline}, {timeout}")
        self._pipeline = pipeline
        host, port, tls, self._head = _parse(url, headers)
        if ssl_context is not None:
            self._ssl = ssl_context
        elif tls and self._ssl is None:
            self._ssl = tls_context()
        endpoint = (host, port, self._ssl if tls else None)
        self._timeout, self._size = timeout, size
        if endpoint != self._endpoint:
            self._endpoint = endpoint
            while self._idle:
                self._idle.pop().drop()  # busy ones to the old endpoint close on release
        while self._open > size and self._idle:
            self._idle.pop(0).drop()
        self._grant_slots()

    def frame(self, header_lines: bytes, body: bytes) -> bytes:
        """A whole request on the current `head`: header_lines are complete
        "Name: value\\r\\n" lines."""
        return b"".join((self._head, str(len(body)).encode(), b"\r\n", header_lines, b"\r\n",
                         body))

    async def post(self, header_lines: bytes, body: bytes) -> Response:
        """POST one request (see frame). Raises TransportError; the timeout spans the
        connect (if any) and the exchange."""
        return await self.post_request(self.frame(header_lines, body))

    async def post_request(self, request: bytes) -> Response:
        """Send one whole request (built on `head`, its Content-Length and body included),
        as post() does."""
        got: list[Response | TransportError] = []
        await self.exchange(request, got.append)
        if isinstance(got[0], TransportError):
            raise got[0]
        return got[0]

    async def exchange(self, request: bytes, on_result: OnResult,
                       more: NextRequest | None = None) -> None:
        """Send `request`, then each request more() gives, on the same connection, until
        nothing is unanswered and more() has none: one await for the whole run.

        more() is asked, from the connection's callbacks, whenever the connection is free
        for another request (keep-alive, same endpoint, pool neither shrunk nor closed,
        fewer than `pipeline` requests unanswered). on_result is called once per request,
        in the order sent, with its Response or the TransportError that ended it (a failed
        connect too: this never raises TransportError). Each request's timeout spans its
        connect (if any) and its exchange. What on_result or more raises ends the run and
        is raised here."""
        if self._closed:
            on_result(TransportError("closed", False, "pool is closed"))
            return
        loop = self._loop or self._bind()
        conn = None
        self._acquiring += 1
        try:
            idle, endpoint = self._idle, self._endpoint
            while idle:  # a stale idle connection was never written to: skipping it is safe
                conn = idle.pop()
                if conn.endpoint is endpoint and conn.usable():
                    break
                conn.drop()
                conn = None
            if conn is None:
                try:
                    conn = await self._acquire(loop)
                except TransportError as e:
                    on_result(e)
                    return
        finally:
            self._acquiring -= 1
        deadline = conn.connect_deadline or loop.time() + self._timeout
        conn.connect_deadline = 0.0
        conn.run = run = Run(on_result, more, loop.create_future())
        conn.send(request, deadline)
        if self._pipeline > 1 and more is not None:
            conn._fill(run)
        try:
            await run.end
        except asyncio.CancelledError:
            if conn.run is run:  # its responses would arrive for nobody
                conn.run = None
                self._sent -= len(conn.out)
                conn.out.clear()
                conn.queued = 0
                conn.drop(abort=True)
            raise

    def _bind(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        return self._loop

    async def _acquire(self, loop: asyncio.AbstractEventLoop) -> Connection:
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

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> Connection:
        """Open a connection in a slot already counted in _open; the slot is freed on failure."""
        assert self._endpoint is not None
        host, port, ctx = endpoint = self._endpoint
        conn = Connection(self, endpoint, loop)
        conn.connect_deadline = deadline = loop.time() + self._timeout
        try:  # one timeout context per connect (not per request) is cheap enough
            async with asyncio.timeout_at(deadline):
                await loop.create_connection(lambda: conn, host, port, ssl=ctx,
                                             server_hostname=host if ctx else None)
        except BaseException as e:
            if conn.transport is not None:
                conn.drop(abort=True)  # frees the slot through _forget
            else:
                self._give_back(_SLOT)
            if isinstance(e, TimeoutError):
                raise TransportError("timeout", False, f"no connection to {host}:{port} within "
                                                       f"{self._timeout:g} s") from None
            if isinstance(e, OSError):  # refused, unreachable, DNS, TLS handshake
                raise TransportError("connect", False, _connect_error(host, port, e)) from None
            raise
        if self._closed or not conn.usable():  # closed before we said anything
            conn.drop()
            raise TransportError("closed", False, f"{host}:{port} closed at once")
        return conn

    def _queue_write(self, conn: Connection, data: bytes) -> None:
        # Writes wait for the end of this loop iteration and then go out back to back:
        # the receiver is woken once per batch instead of once per request. Each
        # wake-up of an idle peer costs a cross-CPU interrupt, which dominated the
        # per-request cost on loopback (about 20 us of a ~55 us delivery).
        # Pipelined requests of one connection go out in one write.
        buf = conn.wbuf
        if buf is not None:
            buf.append(data)
            return
        conn.wbuf = [data]
        if not self._writes:
            self._loop.call_soon(self._flush_writes)
        self._writes.append(conn)

    def _flush_writes(self) -> None:
        writes, self._writes = self._writes, []
        for conn in writes:
            buf, conn.wbuf = conn.wbuf, None
            if not conn.queued or buf is None:
                continue  # failed or cancelled meanwhile: its run was told
            if conn.lost or conn.transport.is_closing():
                conn.fail(TransportError("closed", True, "peer closed the connection"))
            else:
                conn.transport.write(buf[0] if len(buf) == 1 else b"".join(buf))
                conn.queued -= len(buf)

    # Bookkeeping called by connections. A slot is held from _acquire until _forget.
    def _adopt(self, conn: Connection) -> None:
        self._conns.add(conn)
        self._opened += 1

    def _reusable(self, conn: Connection) -> bool:
        """Whether a connection that finished a request may carry another (not after a
        close, a reload to another endpoint, or a shrink below the connections open)."""
        return not self._closed and conn.endpoint is self._endpoint and self._open <= self._size

    def _release(self, conn: Connection, keep: bool) -> None:
        if not keep or not self._reusable(conn):
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

    def _forget(self, conn: Connection) -> None:
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
            if c.out:
                c.fail(TransportError("closed", True, "pool is closed"))
            else:
                c.drop()
        if waits:
            await asyncio.wait(waits, timeout=1.0)
