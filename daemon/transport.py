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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import httptools

if TYPE_CHECKING:
    from .config import WebhookConfig

USER_AGENT = "alertd/0.1"
MAX_HEAD = 64 << 10  # bytes of response head(s) per request, interim 1xx heads included
MAX_HEADERS = 100  # header lines per response
_SLOT = object()  # handed to a waiter instead of a connection: "a slot is yours, connect"
# (host, port, TLS context or None): connections outlive a reload only if equal
_Endpoint = tuple[str, int, "ssl.SSLContext | None"]


class _Reject(Exception):
    """Raised inside a parser callback: the response breaks a rule (message says which)."""


class TransportError(Exception):
    """A request failed below HTTP. `sent` is True when the whole request had been
    handed to the socket, so the receiver may have processed it (outcome unknown)."""

    def __init__(self, kind: str, sent: bool, detail: str = "") -> None:
        # str() is the whole text ("timeout: no response within 5 s"): callers add nothing.
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind  # "connect", "timeout", "closed" or "protocol"
        self.sent = sent


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    retry_after: bytes | None = None  # raw Retry-After value; policy.py parses it


# Frozen, so the common answers can be shared rather than built per request.
_PLAIN = {code: Response(code) for code in range(100, 600)}


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


def _why(e: BaseException) -> str:
    """The text of a protocol error: our own rule if a parser callback raised it."""
    if isinstance(e, _Reject):
        return str(e)
    if isinstance(e, httptools.HttpParserUpgrade):
        return "unexpected protocol upgrade"
    if isinstance(e.__context__, _Reject):
        return str(e.__context__)
    return f"bad response: {e}"


def _tls_reason(e: ssl.SSLError) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {e.verify_message}"
    return (e.reason or str(e)).lower().replace("_", " ")


def _connect_error(host: str, port: int, e: OSError) -> str:
    if isinstance(e, ssl.SSLError):
        return f"TLS handshake with {host}:{port} failed: {_tls_reason(e)}"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve {host}: {e.strerror}"
    if isinstance(e, ConnectionRefusedError):
        return f"{host}:{port}: connection refused"
    return f"{host}:{port}: {e.strerror or e}"


# What a run of requests is told of each one, in the order they were sent: its response or
# the TransportError that ended it.
OnResult = Callable[["Response | TransportError"], None]
# Asked, while the run's connection is free for another request (keep-alive, same
# endpoint, fewer than `pipeline` unanswered), for the next one: None when there is none.
NextRequest = Callable[[], "bytes | None"]


class _Run:
    """The requests one caller sends on one connection (see Pool.exchange): each result is
    handed to on_result from the connection's callbacks, each next request comes from
    more(), and only the end of the whole run wakes the caller."""

    __slots__ = ("on_result", "more", "end")

    def __init__(self, on_result: OnResult, more: NextRequest | None,
                 end: asyncio.Future[None]) -> None:
        self.on_result, self.more, self.end = on_result, more, end

    def _raise(self, e: BaseException) -> None:
        # the caller's bug: end the run and raise it there
        self.more = None
        if not self.end.done():
            self.end.set_exception(e)

    def result(self, r: Response | TransportError) -> None:
        try:
            self.on_result(r)
        except BaseException as e:
            self._raise(e)

    def next(self) -> bytes | None:
        more = self.more
        if more is None:
            return None
        try:
            return more()
        except BaseException as e:
            self._raise(e)
            return None

    def finish(self) -> None:
        if not self.end.done():
            self.end.set_result(None)


class _Conn(asyncio.Protocol):
    """One keep-alive connection: one run at a time, up to the pool's `pipeline` requests
    of it unanswered (HTTP/1.1 pipelining above 1), answered in order."""

    __slots__ = ("pool", "endpoint", "loop", "transport", "parser", "run", "out", "queued",
                 "timer", "timer_at", "connect_deadline", "code", "retry_after", "framed",
                 "keep", "closing", "answers", "ready", "lost", "lost_waiter", "head_room", "headers",
                 "used", "wbuf")

    def __init__(self, pool: Pool, endpoint: _Endpoint, loop: asyncio.AbstractEventLoop) -> None:
        self.pool, self.endpoint, self.loop = pool, endpoint, loop
        self.transport: Any = None
        self.parser = httptools.HttpResponseParser(self)
        self.run: _Run | None = None  # the run whose requests are on this connection
        self.out: deque[float] = deque()  # deadlines of the unanswered requests, oldest first
        self.queued = 0  # of those, the newest ones not yet handed to the socket
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.connect_deadline = 0.0  # a new connection's first request shares its connect deadline
        self.code = 0
        self.retry_after: bytes | None = None
        # framed: Content-Length or Transfer-Encoding seen, so EOF is not the end of the body
        self.framed = self.keep = self.closing = self.lost = False
        self.answers = 0  # responses completed on this connection
        self.ready: list[Response] = []  # responses of the read being parsed, not yet handed out
        self.lost_waiter: asyncio.Future[None] | None = None
        self.head_room = MAX_HEAD  # head bytes this request's response may still take
        self.headers = 0  # header lines of the response being parsed
        self.used = False  # a response completed on this connection
        self.wbuf: list[bytes] | None = None  # requests queued for the loop's write turn

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.pool._adopt(self)

    def data_received(self, data: bytes) -> None:
        if not self.out:  # bytes nobody asked for: the stream can't be trusted
            return self.drop(abort=True)
        answers = self.answers
        try:
            if self.code == 0 and len(data) > self.head_room:
                self._feed_head(data)
            else:
                self.parser.feed_data(data)
                if self.code == 0 and self.answers == answers:  # still inside one head
                    self.head_room -= len(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade, _Reject) as e:
            # Responses of this read not yet handed out fail too: the read broke the rules.
            self.ready.clear()
            return self.fail(TransportError("protocol", True, _why(e)))
        if self.ready:
            self._hand_out()

    def _feed_head(self, data: bytes) -> None:
        # Feed only what the head may still take: a receiver streaming one endless
        # header must not grow the parser's buffer (httptools joins header bytes).
        room = max(0, self.head_room)
        answers = self.answers
        self.parser.feed_data(data[:room])
        if self.code == 0 and self.answers == answers:
            raise _Reject(f"response head over {MAX_HEAD >> 10} KiB")
        self.parser.feed_data(data[room:])

    def eof_received(self) -> bool:
        if not self.out:  # the server closed an idle connection: never hand it out again
            self.lost = True
            self.pool._forget(self)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.out and self.code >= 200 and not self.framed:
            self.keep = False
            self.on_message_complete()  # a body delimited by EOF: this close is its end
            self._hand_out()
        if self.out:
            if self.endpoint[2] is not None and not self.used and self.code == 0 and \
                    self.head_room == MAX_HEAD and isinstance(exc, (ssl.SSLError, ConnectionResetError)):
                # A TLS 1.3 server checks our client certificate after our side of the
                # handshake has ended: its refusal (an alert, often lost to the reset that
                # follows) ends the first request. The application never saw it.
                host, port, _ = self.endpoint
                why = _tls_reason(exc) if isinstance(exc, ssl.SSLError) else \
                    "connection reset before any response (client certificate refused?)"
                self.fail(TransportError("connect", False, f"TLS handshake with {host}:{port} "
                                                           f"failed: {why}"))
            else:
                why = f"peer closed the connection ({exc})" if exc else "peer closed the connection"
                self.fail(TransportError("closed", True, why))
        elif self.run is not None:
            self._end_run()
        self.pool._forget(self)
        if self.lost_waiter is not None and not self.lost_waiter.done():
            self.lost_waiter.set_result(None)

    # httptools callbacks; on_body is left out on purpose so bodies are skipped in C.
    def on_message_begin(self) -> None:
        if len(self.ready) >= len(self.out):
            raise _Reject("bytes after the response: a second response to one request"
                          if len(self.out) <= 1 else "more responses than requests")
        if self.closing:
            raise _Reject("bytes after a response that closed the connection")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers += 1
        if self.headers > MAX_HEADERS:
            raise _Reject(f"more than {MAX_HEADERS} response headers")
        n = len(name)  # a length test first keeps most headers to one integer comparison
        if n == 11:
            if name.lower() == b"retry-after":
                self.retry_after = value
        elif (n == 14 and name.lower() == b"content-length") or (
                n == 17 and name.lower() == b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.code = self.parser.get_status_code()
        if self.code == 101:  # we never ask to upgrade: a receiver switching is not HTTP
            raise _Reject("unexpected 101 Switching Protocols")
        self.keep = self.parser.should_keep_alive()  # Connection: close, HTTP/1.0, EOF bodies

    def on_message_complete(self) -> None:
        if self.code < 200:  # an interim 1xx: the real response follows (same head budget)
            self.code, self.retry_after, self.framed, self.headers = 0, None, False, 0
            self.used = True  # the server has seen this request
        else:
            ra = self.retry_after
            self.ready.append((ra is None and _PLAIN.get(self.code)) or Response(self.code, ra))
            self.code, self.retry_after, self.framed = 0, None, False
            self.head_room, self.headers, self.used = MAX_HEAD, 0, True
            self.answers += 1
            if not self.keep:
                self.closing = True  # the connection ends after this response

    def usable(self) -> bool:
        return not self.lost and not self.transport.is_closing()

    def send(self, data: bytes, deadline: float) -> None:
        self.out.append(deadline)
        self.queued += 1
        self.pool._sent += 1
        # One timer per connection, moved lazily: a request only stores its deadline and
        # the timer re-arms itself when it fires early (for the oldest unanswered one). A
        # new one is needed only when none is pending or it would fire too late (a reload
        # shortened the timeout).
        timer = self.timer
        if timer is None or deadline < self.timer_at:
            if timer is not None:
                timer.cancel()
            self.timer, self.timer_at = self.loop.call_at(deadline, self._on_timer), deadline
        self.pool._queue_write(self, data)

    def _on_timer(self) -> None:
        self.timer = None
        if not self.out:
            return
        deadline = self.out[0]
        if self.loop.time() + 0.001 >= deadline:  # timers may fire a hair early
            host, port, _ = self.endpoint
            self.fail(TransportError("timeout", True, f"no response from {host}:{port} within "
                                                      f"{self.pool.timeout:g} s"))
        else:
            self.timer, self.timer_at = self.loop.call_at(deadline, self._on_timer), deadline

    def _hand_out(self) -> None:
        """The responses of a whole read, each to its request, oldest first; then the run
        fills the connection again, in this callback (no wake-up of its caller)."""
        ready, run = self.ready, self.run
        n = len(ready)
        for i in range(n):
            self.out.popleft()
            if run is not None:
                run.result(ready[i])
        ready.clear()
        self.pool._sent -= n
        if self.closing:
            self._closed_after_answer()
        elif run is not None and not self.lost:
            self._fill(run)

    def _fill(self, run: _Run) -> None:
        pool = self.pool
        if pool._reusable(self) and self.usable():
            depth = pool._pipeline
            while len(self.out) < depth:
                nxt = run.next()
                if nxt is None:
                    break
                self.send(nxt, self.loop.time() + pool._timeout)
        if not self.out:
            self._end_run()

    def _end_run(self) -> None:
        run, self.run = self.run, None
        if run is not None:
            run.finish()
        self.pool._release(self, self.keep and not self.closing)

    def _closed_after_answer(self) -> None:
        # A response said the connection ends: requests pipelined behind it are unanswered.
        if self.out:
            self.fail(TransportError("closed", True, "the receiver closed the connection "
                                                     "with requests still unanswered"))
        elif self.run is not None:
            self._end_run()
        else:
            self.drop()

    def fail(self, exc: TransportError) -> None:
        """End every unanswered request with `exc` (those never handed to the socket as not
        sent), and the run with them; the stream is in an unknown state."""
        run, self.run = self.run, None
        n, unwritten = len(self.out), self.queued
        self.out.clear()
        self.queued = 0
        self.pool._sent -= n
        if run is not None:
            for i in range(n):
                if exc.sent and i >= n - unwritten:
                    run.result(TransportError("closed", False, "connection lost before the "
                                                               "request was written"))
                else:
                    run.result(exc)
            run.finish()
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
                 ssl_context: ssl.SSLContext | None = None, pipeline: int = 1) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ssl = ssl_context
        self._idle: list[_Conn] = []  # LIFO: the freshest connection is least likely timed out
        self._conns: set[_Conn] = set()  # adopted and not yet forgotten
        self._waiters: deque[asyncio.Future[Any]] = deque()  # each gets a _Conn or _SLOT
        self._open = 0  # connections open or being opened; above _size only after a shrink
        self._opened = self._acquiring = 0
        self._sent = 0  # requests queued or written and not yet answered, all connections
        self._closed = False
        self._writes: list[_Conn] = []  # connections with requests to write at the loop's turn
        self._endpoint: _Endpoint | None = None
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
        conn.run = run = _Run(on_result, more, loop.create_future())
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
        host, port, ctx = endpoint = self._endpoint
        conn = _Conn(self, endpoint, loop)
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

    def _queue_write(self, conn: _Conn, data: bytes) -> None:
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
    def _adopt(self, conn: _Conn) -> None:
        self._conns.add(conn)
        self._opened += 1

    def _reusable(self, conn: _Conn) -> bool:
        """Whether a connection that finished a request may carry another (not after a
        close, a reload to another endpoint, or a shrink below the connections open)."""
        return not self._closed and conn.endpoint is self._endpoint and self._open <= self._size

    def _release(self, conn: _Conn, keep: bool) -> None:
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
            if c.out:
                c.fail(TransportError("closed", True, "pool is closed"))
            else:
                c.drop()
        if waits:
            await asyncio.wait(waits, timeout=1.0)
