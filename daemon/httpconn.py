"""One HTTP/1.1 keep-alive connection of the transport's pool (an asyncio Protocol + httptools).

A connection carries one caller's run of requests at a time (see transport.Pool.exchange),
up to the pool's `pipeline` of them unanswered, and hands each answer to the run from its
protocol callbacks. The pool's bookkeeping (slots, idle list, write batching) stays in
transport.py: a connection calls it through the pool's underscore methods. A receiver can
make a request fail, never make it grow memory or outlive its deadline: response heads
are capped and bytes nobody asked for drop the stream.
"""
from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httptools

if TYPE_CHECKING:
    from .transport import Pool

MAX_HEAD = 64 << 10  # bytes of response head(s) per request, interim 1xx heads included
MAX_HEADERS = 100  # header lines per response
# (host, port, TLS context or None): connections outlive a reload only if equal
Endpoint = tuple[str, int, "ssl.SSLContext | None"]


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


def _why(e: BaseException) -> str:
    """The text of a protocol error: our own rule if a parser callback raised it."""
    if isinstance(e, _Reject):
        return str(e)
    if isinstance(e, httptools.HttpParserUpgrade):
        return "unexpected protocol upgrade"
    if isinstance(e.__context__, _Reject):
        return str(e.__context__)
    return f"bad response: {e}"


def tls_reason(e: ssl.SSLError) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {e.verify_message}"
    return (e.reason or str(e)).lower().replace("_", " ")


# What a run of requests is told of each one, in the order they were sent: its response or
# the TransportError that ended it.
OnResult = Callable[["Response | TransportError"], None]
# Asked, while the run's connection is free for another request (keep-alive, same
# endpoint, fewer than `pipeline` unanswered), for the next one: None when there is none.
NextRequest = Callable[[], "bytes | None"]


class Run:
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


class Connection(asyncio.Protocol):
    """One keep-alive connection: one run at a time, up to the pool's `pipeline` requests
    of it unanswered (HTTP/1.1 pipelining above 1), answered in order."""

    __slots__ = ("pool", "endpoint", "loop", "transport", "parser", "run", "out", "queued",
                 "timer", "timer_at", "connect_deadline", "code", "retry_after", "framed",
                 "keep", "closing", "answers", "ready", "lost", "lost_waiter", "head_room", "headers",
                 "used", "wbuf")

    def __init__(self, pool: Pool, endpoint: Endpoint, loop: asyncio.AbstractEventLoop) -> None:
        self.pool, self.endpoint, self.loop = pool, endpoint, loop
        self.transport: Any = None
        self.parser = httptools.HttpResponseParser(self)
        self.run: Run | None = None  # the run whose requests are on this connection
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
                why = tls_reason(exc) if isinstance(exc, ssl.SSLError) else \
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

    def _fill(self, run: Run) -> None:
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
