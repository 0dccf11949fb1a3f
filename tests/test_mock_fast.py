"""The fast engine's compiled hot path (mock_webhook/_hot.pyx) against core.Core.

In process: Hot.feed() must give every request it takes the verdict and counts
Core.answer() gives, and must stop at (or wait for) any request it does not
take. Over a socket: a mix of plain alerts and others, split across reads, is
answered the same with the compiled path and with MOCK_WEBHOOK_PURE=1.
"""

from __future__ import annotations

import base64
import hmac
import os
import socket
import time

import pytest

from mock_webhook.core import Core, Settings

from .helpers import get_stats

_hot = pytest.importorskip("mock_webhook._hot", reason="compiled hot path not built")

MAX_BODY = 1024 * 1024
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
BAD = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"
SECRETS = ["whsec_" + base64.b64encode(os.urandom(24)).decode() for _ in range(2)]


def sign(secret: str, msg_id: str, ts: str, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.digest(key, f"{msg_id}.{ts}.".encode() + body, "sha256")
    return "v1," + base64.b64encode(mac).decode()


def alert(msg_id: str, body: bytes = b'{"a":1}', sig: str | None = "", extra: str = "",
          path: str = "/hook", secret: str = SECRETS[0]) -> bytes:
    ts = "1700000000"
    if sig == "":
        sig = sign(secret, msg_id, ts, body)
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nwebhook-id: {msg_id}\r\nwebhook-timestamp: {ts}\r\n")
    if sig is not None:
        head += f"webhook-signature: {sig}\r\n"
    return (head + extra + "\r\n").encode() + body


def hot_and_core(secrets: list[str] = SECRETS) -> tuple[object, Core]:
    core = Core(Settings(secrets=secrets))
    return _hot.Hot(core.key_bytes, MAX_BODY, OK, BAD), core


def counts(core: Core) -> tuple:
    st = core.stats()
    return st["received"], st["unique"], st["duplicates"], st["bad_signatures"], st["by_status"]


def test_verdicts_and_counts_equal_core_answer() -> None:
    body = b'{"x":"y"}'
    good = sign(SECRETS[0], "a", "1700000000", body)
    cases = [
        alert("a", body), alert("a", body),                    # duplicate
        alert("b", secret=SECRETS[1]),                         # second secret
        alert("c", sig="v1,AAAA " + sign(SECRETS[0], "c", "1700000000", b'{"a":1}')),  # 2nd item
        alert("d", sig=good),                                  # another id's signature
        alert("e", sig=None),                                  # no signature header
        alert("f", sig="v2," + good[3:]),                      # unknown scheme
        alert("g", body=b""),                                  # empty body
        alert("WeIrD:id-1", extra="X-Other: some value\r\n"),
    ]
    hot, core = hot_and_core()
    out: list[bytes] = []
    data = b"".join(cases)
    assert hot.feed(data, core, out) == len(data) and not hot.incomplete
    ref = Core(Settings(secrets=SECRETS))
    expected = []
    for raw in cases:
        head, _, body_ = raw.partition(b"\r\n\r\n")
        h = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
        ref.arrived()
        expected.append(ref.answer(h.get(b"webhook-id"), h.get(b"webhook-timestamp"),
                                   h.get(b"webhook-signature"), body_))
    assert expected == [200, 200, 200, 200, 401, 401, 401, 200, 200]
    assert out == [OK if s == 200 else BAD for s in expected]
    assert counts(core) == counts(ref)
    assert core.ids == ref.ids and core.first_at is not None


def test_no_secret_takes_every_alert_and_a_non_canonical_signature_asks_core() -> None:
    hot, core = hot_and_core([])
    out: list[bytes] = []
    data = alert("n1", sig="garbage") + alert("n2", sig=None)
    assert hot.feed(data, core, out) == len(data) and out == [OK, OK]
    # Base64 with non-zero unused bits decodes to the right digest: Core says yes.
    hot, core = hot_and_core(SECRETS[:1])
    sig = sign(SECRETS[0], "nc", "1700000000", b'{"a":1}')
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    tweaked = sig[:-2] + b64[b64.index(sig[-2]) ^ 1] + "="  # an unused bit flipped
    out = []
    assert hot.feed(alert("nc", sig=tweaked), core, out) > 0
    core_says = core.signature_ok(b"nc", b"1700000000", tweaked.encode(), b'{"a":1}')
    assert out == [OK if core_says else BAD]


@pytest.mark.parametrize("other", [
    alert("o", extra="Connection: close\r\n"),
    alert("o", extra="Expect: 100-continue\r\n"),
    alert("o", extra="Transfer-Encoding: chunked\r\n"),
    alert("o", extra="Upgrade: h2c\r\n"),
    alert("o", extra="Content-Length: 7\r\n"),                 # a second Content-Length
    alert("o", extra="X-Trailing: blank \r\n"),
    alert("o", extra="X-Tab:\tvalue\r\n"),
    alert("o", extra="X-Utf8: caf\u00e9\r\n"),
    alert("o", extra="Bad Name: x\r\n"),
    alert("o", path="/stats"), alert("o", path="/control?x=1"), alert("o", path="/reset"),
    alert("o", path="/a b"),
    alert("o").replace(b"HTTP/1.1", b"HTTP/1.0", 1),
    alert("o").replace(b"POST", b"post", 1),
    alert("o").replace(b"Content-Length: 7", b"Content-Length: +7", 1),
    alert("o").replace(b"\r\n\r\n", b"\n\r\n", 1),
    alert("o", body=b"x" * (MAX_BODY + 1)),
    b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n",
    b"NOT HTTP AT ALL\r\n\r\n",
    b"PO",
])
def test_stops_at_a_request_it_does_not_take(other: bytes) -> None:
    hot, core = hot_and_core()
    first = alert("first")
    out: list[bytes] = []
    pos = hot.feed(first + other, core, out)
    assert pos == len(first) and out == [OK]
    assert hot.incomplete == (other == b"PO")
    assert counts(core)[:2] == (1, 1)


def test_waits_for_a_partial_request_and_never_counts_it_twice() -> None:
    hot, core = hot_and_core()
    raw = alert("part")
    for cut in range(1, len(raw)):
        out: list[bytes] = []
        assert hot.feed(raw[:cut], core, out) == 0 and hot.incomplete and out == []
    assert hot.feed(raw, core, []) == len(raw)
    assert counts(core)[:2] == (1, 1)
    # A head that never ends is handed on, not buffered without bound.
    endless = b"POST /hook HTTP/1.1\r\nX-Long: " + b"a" * 9000
    assert hot.feed(endless, core, []) == 0 and not hot.incomplete


def _exchange(port: int, parts: list[bytes], expect: int) -> list[int]:
    """Send `parts` as separate writes on one connection; the statuses of `expect` answers."""
    statuses: list[int] = []
    buf = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for part in parts:
            s.sendall(part)
        deadline = time.monotonic() + 5
        while len(statuses) < expect:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                head = buf[:end]
                low = head.lower()
                length = (int(low.split(b"content-length: ")[1].split(b"\r\n")[0])
                          if b"content-length: " in low else 0)
                if len(buf) >= end + 4 + length:
                    statuses.append(int(head.split(b" ")[1]))
                    buf = buf[end + 4 + length:]
                    continue
            assert time.monotonic() < deadline, f"{len(statuses)} of {expect} answers: {buf!r}"
            chunk = s.recv(65536)
            assert chunk, "connection closed early"
            buf += chunk
    return statuses


@pytest.mark.parametrize("pure", [False, True])
def test_mixed_stream_split_across_reads(mock, monkeypatch: pytest.MonkeyPatch, pure: bool) -> None:
    if pure:
        monkeypatch.setenv("MOCK_WEBHOOK_PURE", "1")
    port = mock("--secret", SECRETS[0])
    a, b = alert("m1"), alert("m2")
    stream = (a + b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n" + b
              + alert("m3", extra="Expect: 100-continue\r\n") + alert("m1")
              + alert("m4", sig="v1,AAAA") + alert("m5"))
    # Cut inside a request line, a header, a body, and between requests.
    cuts = [5, len(a) - 3, len(a) + 40, len(stream) - 20, len(stream) - 2]
    parts = [stream[i:j] for i, j in zip([0, *cuts], [*cuts, len(stream)])]
    assert _exchange(port, parts, 8) == [200, 200, 200, 100, 200, 200, 401, 200]
    st = get_stats(port)
    assert (st["received"], st["unique"], st["duplicates"], st["bad_signatures"]) == (6, 4, 1, 1)
    assert st["by_status"] == {"200": 5, "401": 1}
