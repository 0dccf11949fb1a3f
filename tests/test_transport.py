"""transport.py against real sockets on 127.0.0.1: a scripted asyncio server and aiohttp.web.

Every test runs under both the default loop and uvloop.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httptools
import pytest
import uvloop
from aiohttp import web
from alertd.transport import Pool, Response, TransportError

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=sorted(LOOPS))
def run(request: Any) -> Callable[[Awaitable[Any]], Any]:
    def _run(coro: Awaitable[Any]) -> Any:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            return runner.run(asyncio.wait_for(coro, 10))
    return _run


# ------------------------------------------------------------------ a scripted server

BIG = b"x" * (1 << 20)
REPLIES: dict[str, bytes] = {
    "/ok": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "/close": b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    "/chunked": b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    "/retry": b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: 0\r\n\r\n",
    "/204": b"HTTP/1.1 204 No Content\r\nServer: t\r\n\r\n",
    "/304": b"HTTP/1.1 304 Not Modified\r\nETag: \"1\"\r\n\r\n",
    "/big": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BIG), BIG),
    "/http10": b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    "/eof": b"HTTP/1.1 201 Created\r\n\r\nbody until the socket closes",
    "/continue": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    "/midclose": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part",
    "/garbage": b"SPDY/9 banana\r\n\r\n",
    "/799": b"HTTP/1.1 799 Odd\r\nContent-Length: 0\r\n\r\n",
    "/500then200": b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n"
                   b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    "/101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    "/manyheaders": b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101))
                    + b"Content-Length: 0\r\n\r\n",
    "/100headers": b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(99))
                   + b"Content-Length: 0\r\n\r\n",
    "/bighead": b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (64 << 10) + b"\r\nContent-Length: 0\r\n\r\n",
    "/bighead-trickle": b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (64 << 10) + b"\r\n\r\n",
    "/100s": b"HTTP/1.1 100 Continue\r\nX-Pad: " + b"b" * 40000 + b"\r\n\r\n"
             b"HTTP/1.1 100 Continue\r\nX-Pad: " + b"b" * 40000 + b"\r\n\r\n"
             b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
}
CLOSE_AFTER = {"/close", "/http10", "/eof", "/midclose", "/garbage"}
TRICKLE = {"/bighead-trickle", "/100s"}  # written in small pieces, as a slow receiver would


class Scripted(asyncio.Protocol):
    """Replies by path; /hang never answers; records each request's headers and body."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body = b""
        self.hung = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.server.connections += 1
        self.server.live.append(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body += body

    async def _trickle(self, data: bytes) -> None:
        for i in range(0, len(data), 4000):
            if self.transport.is_closing():  # the client hung up on it
                return
            self.transport.write(data[i:i + 4000])
            await asyncio.sleep(0.001)

    def on_message_complete(self) -> None:
        path = self.url.decode()
        self.server.requests.append((path, self.headers, self.body))
        self.url, self.headers, self.body = b"", {}, b""
        if path == "/hang" or self.hung:
            self.hung = True  # nor anything pipelined behind it: answers go in order
            return
        reply = REPLIES[path.split("?")[0]]
        if path.split("?")[0] in TRICKLE:
            self.server.tasks.add(asyncio.ensure_future(self._trickle(reply)))
            return
        self.transport.write(reply)
        if path.split("?")[0] in CLOSE_AFTER:
            self.transport.close()


class Server:
    def __init__(self) -> None:
        self.connections = 0
        self.live: list[Scripted] = []
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.tasks: set[asyncio.Future[None]] = set()

    async def __aenter__(self) -> Server:
        self.srv = await asyncio.get_running_loop().create_server(
            lambda: Scripted(self), "127.0.0.1", 0)
        self.port = self.srv.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.srv.close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


async def _post(pool: Pool, n: int = 0) -> Response:
    return await pool.post(b"webhook-id: a:%d\r\n" % n, b'{"n":%d}' % n)


async def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


# ------------------------------------------------------------------ tests

def test_request_head_and_body_on_the_wire(run: Any) -> None:
    async def main() -> None:
        async with Server() as srv:
            pool = Pool(srv.url("/ok?k=v"), size=2, timeout=5, headers=[("Authorization", "Bearer t")])
            r = await pool.post(b"webhook-id: j1:0\r\nwebhook-timestamp: 1\r\n", b'{"a":1}')
            assert r == Response(200, None)
            path, headers, body = srv.requests[0]
            assert path == "/ok?k=v" and body == b'{"a":1}'
            assert headers == {"host": f"127.0.0.1:{srv.port}", "content-type": "application/json",
                               "user-agent": "alertd/0.1", "authorization": "Bearer t",
                               "content-length": "7", "webhook-id": "j1:0",
                               "webhook-timestamp": "1"}
            await pool.close()
    run(main())


def test_keep_alive_reuse_sequential_and_concurrent(run: Any) -> None:
    async def main() -> None:
        async def handler(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(text="ok")
        app = web.Application()
        app.router.add_post("/hook", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        pool = Pool(f"http://127.0.0.1:{port}/hook", size=8, timeout=5)
        try:
            for i in range(1000):
                assert (await _post(pool, i)).status == 200
            assert pool.connections_opened == 1
            results = await asyncio.gather(*(_post(pool, i) for i in range(1000)))
            assert all(r.status == 200 for r in results)
            assert pool.connections_opened <= 8
            assert pool.in_flight == 0
        finally:
            await pool.close()
            await runner.cleanup()
    run(main())


def test_connection_close_opens_a_new_connection_each_time(run: Any) -> None:
    async def main() -> None:
        async with Server() as srv:
            for path in ("/close", "/http10"):
                pool = Pool(srv.url(path), size=4, timeout=5)
                results = [await _post(pool) for _ in range(5)]
                results += await asyncio.gather(*(_post(pool) for _ in range(20)))
                assert all(r.status == 200 for r in results)
                assert pool.connections_opened == 25
                await pool.close()
    run(main())


@pytest.mark.parametrize("path,status,retry_after", [
    ("/chunked", 202, None), ("/retry", 429, b"7"), ("/204", 204, None), ("/304", 304, None),
    ("/big", 200, None), ("/eof", 201, None), ("/continue", 200, None), ("/799", 799, None)])
def test_response_shapes(run: Any, path: str, status: int, retry_after: bytes | None) -> None:
    async def main() -> None:
        async with Server() as srv:
            pool = Pool(srv.url(path), size=1, timeout=5)
            for _ in range(3):
                assert await _post(pool) == Response(status, retry_after)
            # a body read until EOF cannot leave the connection reusable
            assert pool.connections_opened == (3 if path == "/eof" else 1)
            await pool.close()
    run(main())


def test_timeout_after_send_is_sent(run: Any) -> None:
    async def main() -> None:
        async with Server() as srv:
            pool = Pool(srv.url("/hang"), size=2, timeout=0.3)
            t0 = time.monotonic()
            with pytest.raises(TransportError) as ei:
                await _post(pool)
            assert ei.value.kind == "timeout" and ei.value.sent
            assert 0.25 < time.monotonic() - t0 < 1.5
            # the timed-out connection is dropped, not reused for the next request
            pool.reconfigure(srv.url("/ok"), size=2, timeout=5, headers=())
            assert (await _post(pool)).status == 200
            assert pool.connections_opened == 2
            await pool.close()
    run(main())


def test_timer_follows_the_request_on_a_reused_connection(run: Any) -> None:
    async def main() -> None:
        async with Server() as srv:
            pool = Pool(srv.url("/ok"), size=1, timeout=0.4)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 0.6:  # past the first request's deadline
                assert (await _post(pool)).status == 200
            pool.reconfigure(srv.url("/hang"), size=1, timeout=0.2, headers=())
            t1 = time.monotonic()
            with pytest.raises(TransportError) as ei:
                await _post(pool)
            assert ei.value.kind == "timeout" and 0.15 < time.monotonic() - t1 < 1.0
            await pool.close()
    run(main())


def test_connection_refused(run: Any) -> None:
    async def main() -> None:
        srv = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        srv.close()
        await srv.wait_closed()
        pool = Pool(f"http://127.0.0.1:{port}/", size=2, timeout=2)
        for _ in range(3):  # the slot is freed each time
            with pytest.raises(TransportError) as ei:
                await _post(pool)
            assert ei.value.kind == "connect" and not ei.value.sent
        assert pool.connections_opened == 0 and pool.in_flight == 0
        await pool.close()
    run(main())


def test_peer_closes_mid_response(run: Any) -> None:
    async def main() -> None:
        async with Server() as srv:
            pool = Pool(srv.url("/midclose"), size=1, timeout=5)
            with pytest.raises(TransportError) as ei:
                await _post(pool)
            assert ei.value.kind == "closed" and ei.value.sent
            await pool.close()
    run(main())


def test_bad_response_is_a_protocol_error(run: Any) -> None:
    async def main() -> None:
        async with Server() as srv:
            pool = Pool(srv.url("/garbage"), size=1, timeout=5)
            with pytest.raises(TransportError) as ei:
                await _post(pool)
            assert ei.value.kind == "protocol" and ei.value.sent
            await pool.close()
    run(main())


def test_idle_connection_closed_by_peer_is_replaced_transparently(run: Any) -> None:
    async def main() -> None:
        async with Server() as srv:
            pool = Pool(srv.url("/ok"), size=1, timeout=5)
            assert (await _post(pool)).status == 200
            for proto in srv.live:  # the server's keep-alive timeout, say
                proto.transport.close()
            await _until(lambda: not pool._idle)
            assert (await _post(pool)).status == 200
            assert pool.connections_opened == 2 and len(srv.requests) == 2
            await pool.close()
    run(main())


def test_size_bounds_connections_and_waiters_are_fifo(run: Any) -> None:
    async def main() -> None:
        async with Server() as srv:
            pool = Pool(srv.url("/hang"), size=2, timeout=0.5)
            order: list[int] = []

            async def one(i: int) -> None:
                try:
                    await _post(pool, i)
                except TransportError:
                    order.append(i)
            await asyncio.gather(*(one(i) for i in range(6)))
            assert pool.connections_opened == 6 and srv.connections == 6
            # FIFO by generation of the pool's size: 0-1 first, then waiters 2-3, then 4-5.
            # Within a generation the two connects race and their timers (1 ms resolution
            # under uvloop) may fire in either order.
            assert [sorted(order[i:i + 2]) for i in (0, 2, 4)] == [[0, 1], [2, 3], [4, 5]]
            await pool.close()
    run(main())


def test_reconfigure_moves_to_a_new_origin_and_resizes(run: Any) -> None:
    async def main() -> None:
        async with Server() as a, Server() as b:
            pool = Pool(a.url("/ok"), size=4, timeout=5)
            await asyncio.gather(*(_post(pool) for _ in range(4)))
            assert pool.connections_opened == 4 and len(pool._idle) == 4
            pool.reconfigure(a.url("/ok"), size=2, timeout=5, headers=[("X-A", "1")])
            assert len(pool._idle) == 2  # excess idle connections closed at once
            await _post(pool)
            assert a.requests[-1][1]["x-a"] == "1" and pool.connections_opened == 4
            pool.reconfigure(b.url("/ok"), size=2, timeout=5, headers=())
            assert not pool._idle  # idle connections to the old origin closed
            await asyncio.gather(*(_post(pool) for _ in range(10)))
            assert len(b.requests) == 10 and pool.connections_opened == 6
            await pool.close()
    run(main())


def test_cancelled_request_drops_its_connection(run: Any) -> None:
    async def main() -> None:
        async with Server() as srv:
            pool = Pool(srv.url("/hang"), size=1, timeout=5)
            task = asyncio.ensure_future(_post(pool))
            waiter = asyncio.ensure_future(_post(pool))
            await _until(lambda: len(srv.requests) == 1)
            task.cancel()
            await _until(lambda: len(srv.requests) == 2)  # the waiter got a fresh connection
            assert pool.connections_opened == 2
            await pool.close()
            with pytest.raises(TransportError) as ei:
                await waiter
            assert ei.value.kind == "closed" and ei.value.sent
            assert pool.in_flight == 0
    run(main())


@pytest.fixture(scope="module")
def cert(tmp_path_factory: Any) -> tuple[str, str]:
    import shutil
    import subprocess
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True)
    return str(d / "cert.pem"), str(d / "key.pem")


def test_https_with_a_trusted_and_an_untrusted_certificate(run: Any, cert: tuple[str, str]) -> None:
    import ssl

    async def main() -> None:
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(*cert)
        srv = Server()
        srv.srv = await asyncio.get_running_loop().create_server(
            lambda: Scripted(srv), "127.0.0.1", 0, ssl=server_ctx)
        port = srv.srv.sockets[0].getsockname()[1]
        try:
            trusted = ssl.create_default_context(cafile=cert[0])
            pool = Pool(f"https://127.0.0.1:{port}/chunked", size=2, timeout=5, ssl_context=trusted)
            for _ in range(3):
                assert await _post(pool) == Response(202, None)
            assert pool.connections_opened == 1
            assert srv.requests[0][1]["host"] == f"127.0.0.1:{port}"
            await pool.close()
            pool = Pool(f"https://127.0.0.1:{port}/ok", size=1, timeout=5)  # system CAs only
            with pytest.raises(TransportError) as ei:
                await _post(pool)
            assert ei.value.kind == "connect" and not ei.value.sent
            await pool.close()
        finally:
            srv.srv.close()
    run(main())


# ------------------------------------------------------------------ what a receiver cannot do


@pytest.mark.parametrize("path,why", [
    ("/bighead", "response head over 64 KiB"),
    ("/bighead-trickle", "response head over 64 KiB"),
    ("/100s", "response head over 64 KiB"),  # interim heads share the budget
    ("/manyheaders", "more than 100 response headers"),
    ("/500then200", "bytes after the response: a second response to one request"),
    ("/101", "unexpected 101 Switching Protocols")])
def test_a_response_that_breaks_the_rules_is_a_protocol_error(
        run: Any, caplog: Any, path: str, why: str) -> None:
    async def main() -> None:
        async with Server() as srv:
            pool = Pool(srv.url(path), size=1, timeout=5)
            for i in range(2):
                with pytest.raises(TransportError) as ei:
                    await _post(pool)
                # Possibly processed: retried with the same id, counted as a possible duplicate.
                assert (ei.value.kind, ei.value.sent, str(ei.value)) == ("protocol", True,
                                                                        f"protocol: {why}")
                assert pool.connections_opened == i + 1  # the stream is never reused
            pool.reconfigure(srv.url("/ok"), size=1, timeout=5, headers=())
            assert (await _post(pool)).status == 200  # the next request is not fed the extra
            await pool.close()
    run(main())
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text


def test_a_head_just_under_the_limits_is_fine(run: Any) -> None:
    async def main() -> None:
        async with Server() as srv:
            pool = Pool(srv.url("/100headers"), size=1, timeout=5)
            assert (await _post(pool)).status == 200
            assert (await _post(pool)).status == 200
            assert pool.connections_opened == 1
            await pool.close()
    run(main())


def test_transport_errors_say_what_happened_once(run: Any) -> None:
    async def main() -> None:
        async with Server() as srv:
            pool = Pool(srv.url("/hang"), size=1, timeout=0.3)
            with pytest.raises(TransportError) as ei:
                await _post(pool)
            assert str(ei.value) == f"timeout: no response from 127.0.0.1:{srv.port} within 0.3 s"
            await pool.close()
        srv2 = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
        port = srv2.sockets[0].getsockname()[1]
        srv2.close()
        await srv2.wait_closed()
        pool = Pool(f"http://127.0.0.1:{port}/", size=1, timeout=2)
        with pytest.raises(TransportError) as ei:
            await _post(pool)
        assert str(ei.value) == f"connect: 127.0.0.1:{port}: connection refused"
        await pool.close()
    run(main())


def test_a_configured_user_agent_replaces_ours(run: Any) -> None:
    async def main() -> None:
        async with Server() as srv:
            pool = Pool(srv.url("/ok"), size=1, timeout=5, headers=[("User-Agent", "acme/2")])
            await _post(pool)
            raw_names = [k for k in srv.requests[0][1]]
            assert srv.requests[0][1]["user-agent"] == "acme/2" and raw_names.count("user-agent") == 1
            await pool.close()
    run(main())


# ------------------------------------------------------------------ [webhook] headers (config.py)

def _webhook(headers: dict[str, str], url: str = "http://127.0.0.1:9/hook") -> Any:
    from alertd import config
    return config.from_dict({"webhook": {"url": url, "headers": headers}}, Path("/"))


@pytest.mark.parametrize("name,value,message", [
    ("Content-Length", "0", "headers.Content-Length controls how the request is framed"),
    ("transfer-encoding", "chunked", "headers.transfer-encoding controls how the request is framed"),
    ("Host", "evil.example", "headers.Host controls how the request is framed"),
    ("Connection", "close", "headers.Connection controls how the request is framed"),
    ("Upgrade", "h2c", "headers.Upgrade controls how the request is framed"),
    ("webhook-id", "x", "headers.webhook-id is set by alertd itself"),
    ("Webhook-Signature", "v1,x", "headers.Webhook-Signature is set by alertd itself"),
    ("webhook-timestamp", "1", "headers.webhook-timestamp is set by alertd itself"),
    ("Content-Type", "text/plain", "headers.Content-Type is set by alertd itself"),
    ("X Team", "a", "headers.'X Team' is not a valid header name"),
    ("X:Team", "a", "headers.'X:Team' is not a valid header name"),
    ("Xé", "a", "headers.'Xé' is not a valid header name"),
    ("", "a", "headers.'' is not a valid header name"),
    ("X-A", "a\r\nContent-Length: 5", "headers.X-A value has a control character (U+000D at "
                                       "position 1)"),
    ("X-A", "a\x00", "headers.X-A value has a control character (U+0000 at position 1)"),
    ("X-A", "a\x7f", "headers.X-A value has a control character (U+007F at position 1)"),
    ("X-A", "\u20ac", "headers.X-A value has a character outside Latin-1 (U+20AC at position 0)"),
])
def test_headers_that_would_reframe_or_break_the_request_are_refused(
        name: str, value: str, message: str) -> None:
    from alertd.errors import ConfigError
    with pytest.raises(ConfigError) as ei:
        _webhook({name: value})
    assert str(ei.value).startswith(f"config: [webhook] {message}")
    assert value not in str(ei.value) or len(value) < 2  # a value may be a token: never echoed


def test_header_names_are_unique_ignoring_case_and_authorization_does_not_fight_the_url() -> None:
    from alertd.errors import ConfigError
    with pytest.raises(ConfigError, match="headers.x-team is given twice"):
        _webhook({"X-Team": "a", "x-team": "b"})
    with pytest.raises(ConfigError, match="conflicts with the credentials in"):
        _webhook({"Authorization": "Bearer t"}, url="http://u:p@127.0.0.1:9/hook")
    ok = _webhook({"Authorization": "Bearer t", "X-Tab": "a\tb", "X-Latin": "caf\u00e9"})
    assert ok.webhook.headers == (("Authorization", "Bearer t"), ("X-Tab", "a\tb"),
                                  ("X-Latin", "caf\u00e9"))


def test_validated_headers_reach_the_wire_unchanged(run: Any) -> None:
    cfg = _webhook({"X-Latin": "caf\u00e9", "X-Tab": "a\tb"})

    async def main() -> None:
        async with Server() as srv:
            pool = Pool(srv.url("/ok"), size=1, timeout=5, headers=cfg.webhook.headers)
            assert (await _post(pool)).status == 200
            headers = srv.requests[0][1]
            assert (headers["x-latin"], headers["x-tab"]) == ("caf\u00e9", "a\tb")
            await pool.close()
    run(main())


# ------------------------------------------------------------------ pipelining

def _raw(srv: Server, path: str, n: int) -> bytes:
    body = b'{"n":%d}' % n
    return (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: %d\r\n\r\n%s"
            % (path.encode(), srv.port, len(body), body))


async def _pipelined(pool: Pool, requests: list[bytes]) -> list[Response | TransportError]:
    """One run of `requests` on one connection; the results in order."""
    got: list[Response | TransportError] = []
    rest = iter(requests[1:])
    await pool.exchange(requests[0], got.append, lambda: next(rest, None))
    return got


class Counting(Scripted):
    """Scripted, and counts the requests that arrive in one read before any is answered."""

    def data_received(self, data: bytes) -> None:
        before = len(self.server.requests)
        super().data_received(data)
        self.server.batches.append(len(self.server.requests) - before)


def test_pipelined_requests_share_one_connection_and_are_answered_in_order(run: Any) -> None:
    async def main() -> None:
        srv = Server()
        srv.batches = []  # type: ignore[attr-defined]
        srv.srv = await asyncio.get_running_loop().create_server(
            lambda: Counting(srv), "127.0.0.1", 0)
        srv.port = srv.srv.sockets[0].getsockname()[1]
        try:
            pool = Pool(srv.url("/ok"), size=1, timeout=5, pipeline=4)
            paths = ["/ok", "/retry", "/ok", "/204"] * 5
            got = await _pipelined(pool, [_raw(srv, p, i) for i, p in enumerate(paths)])
            assert [r.status for r in got] == [200, 429, 200, 204] * 5  # type: ignore[union-attr]
            assert got[1].retry_after == b"7"  # type: ignore[union-attr]
            assert srv.connections == 1 and pool.connections_opened == 1
            assert [json_n(b) for _, _, b in srv.requests] == list(range(20))
            assert max(srv.batches) > 1  # type: ignore[attr-defined] (several were in flight)
            assert pool.in_flight == 0
            await pool.close()
        finally:
            srv.srv.close()
    run(main())


def json_n(body: bytes) -> int:
    return int(body.split(b":")[1].rstrip(b"}"))


@pytest.mark.parametrize("path,kind", [("/midclose", "closed"), ("/close", "closed"),
                                       ("/hang", "timeout"), ("/garbage", "protocol")])
def test_a_connection_broken_mid_pipeline_marks_every_unanswered_request_possibly_sent(
        run: Any, path: str, kind: str) -> None:
    async def main() -> None:
        async with Server() as srv:
            pool = Pool(srv.url("/ok"), size=1, timeout=0.5, pipeline=4)
            got = await _pipelined(pool, [_raw(srv, p, i) for i, p in
                                          enumerate(["/ok", path, "/ok", "/ok"])])
            # Answers first, then only errors: the request that broke the stream (its own
            # answer is whole for /close) and everything pipelined behind it. A garbled read
            # also fails the answers it carried.
            answered = [r for r in got if isinstance(r, Response)]
            rest = got[len(answered):]
            assert len(got) == 4 and len(rest) >= (2 if path == "/close" else 3), got
            assert all(isinstance(e, TransportError) and e.sent for e in rest), got
            assert {e.kind for e in rest} <= {kind, "closed"}  # type: ignore[union-attr]
            assert rest[0].kind == kind  # type: ignore[union-attr]
            assert pool.in_flight == 0
            # The pool goes on with a new connection.
            assert (await _post(pool)).status == 200
            await pool.close()
    run(main())


def test_an_exception_in_more_ends_the_run_and_is_raised(run: Any) -> None:
    async def main() -> None:
        async with Server() as srv:
            pool = Pool(srv.url("/ok"), size=1, timeout=5, pipeline=2)
            got: list[Any] = []

            def more() -> bytes:
                raise RuntimeError("bug in more")
            with pytest.raises(RuntimeError, match="bug in more"):
                await pool.exchange(_raw(srv, "/ok", 0), got.append, more)
            assert (await _post(pool)).status == 200  # the pool is still usable
            await pool.close()
    run(main())
