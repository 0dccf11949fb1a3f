"""Process-level tests of the mock webhook: modes, counters, signatures, control, record, signals.

Every test runs the real `python -m mock_webhook` on 127.0.0.1, once per engine
(fast, the default, and aiohttp): both must behave the same.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import signal
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook

from mock_webhook import Settings, make_app
from mock_webhook.server import fails_by_hash

from .helpers import (
    get_stats,
    post_alert,
    post_alerts,
    post_json,
    start_mock,
    stop_process,
    wait_until,
)


@pytest.fixture(params=["fast", "aiohttp"])
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def mock(mock, engine: str):
    """conftest's mock starter, with this test's --engine."""
    return lambda *args, **kw: mock(*args, "--engine", engine, **kw)


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def signed(secret: str, msg_id: str, body: str) -> dict[str, str]:
    now = datetime.now(timezone.utc)
    return {"webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": Webhook(secret).sign(msg_id, now, body)}


def test_ok_counts_unique_and_duplicates(mock) -> None:
    port = mock()
    before = get_stats(port)
    assert before["received"] == 0 and before["first_at"] is None and before["mode"] == "ok"
    statuses = [s for s, _ in post_alerts(port, [(i, b"{}", {}) for i in ["a", "b", "a", "c", "a"]])]
    assert statuses == [200] * 5
    st = get_stats(port)
    assert (st["received"], st["unique"], st["duplicates"]) == (5, 3, 2)
    assert st["by_status"] == {"200": 5}
    assert st["bad_signatures"] == 0
    assert st["first_at"] <= st["last_at"]
    # Any path counts as an alert delivery.
    assert post_alert(port, "d", headers={}) == 200
    assert post_alerts(port, [("e", b"{}", {})], path="/some/other/path")[0][0] == 200
    assert get_stats(port)["unique"] == 5


def test_ratelimit_answers_429_with_retry_after(mock) -> None:
    port = mock("--mode", "ratelimit", "--rate", "5")  # burst max(1, 2.5) = 2.5
    answers = post_alerts(port, [(f"r{i}", b"{}", {}) for i in range(10)])
    assert answers[0][0] == 200  # the bucket starts full
    limited = [h for s, h in answers if s == 429]
    assert limited, "10 requests at 5/s with burst 2.5 must be limited"
    assert all(h.get("retry-after") == "1" for h in limited)
    st = get_stats(port)
    assert st["rate_429"] == len(limited) == st["by_status"]["429"]
    # A 429 is not an acceptance, so unique counts only the 200s.
    assert st["unique"] == sum(1 for s, _ in answers if s == 200)
    # Tokens come back at the configured rate.
    wait_until(lambda: post_alert(port, "later") == 200, timeout=3, interval=0.1,
               what="a token to refill")


def test_fail_mode_fails_a_deterministic_share(mock) -> None:
    port = mock("--mode", "fail", "--fail-ratio", "0.1")
    ids = [f"id-{i}" for i in range(2000)]
    first = post_alerts(port, [(i, b"{}", {}) for i in ids])
    failed = {i for i, (s, _) in zip(ids, first) if s == 500}
    assert {s for s, _ in first} == {200, 500}
    assert 140 <= len(failed) <= 260
    assert failed == {i for i in ids if fails_by_hash(i, 0.1)}
    # The same ids fail again; others keep passing.
    again = post_alerts(port, [(i, b"{}", {}) for i in ids[:300]])
    assert {i for i, (s, _) in zip(ids[:300], again) if s == 500} == failed & set(ids[:300])
    st = get_stats(port)
    assert st["unique"] == 2000 - len(failed)
    assert st["by_status"]["500"] == len(failed) + len(failed & set(ids[:300]))


def test_flaky_fails_about_the_given_share(mock) -> None:
    port = mock("--mode", "flaky")  # default probability 0.5
    statuses = [s for s, _ in post_alerts(port, [("same", b"{}", {})] * 400)]
    assert 120 <= statuses.count(500) <= 280
    assert statuses.count(500) + statuses.count(200) == 400


def test_gone_answers_410(mock) -> None:
    port = mock("--mode", "gone")
    assert post_alert(port, "g1") == 410
    st = get_stats(port)
    assert st["by_status"] == {"410": 1} and st["unique"] == 0


def test_latency_delays_answers(mock) -> None:
    port = mock("--latency-ms", "150")
    t0 = time.monotonic()
    assert post_alert(port, "s1") == 200
    assert time.monotonic() - t0 >= 0.15


def test_signatures_from_standardwebhooks_are_verified(mock) -> None:
    s1, s2, other = new_secret(), new_secret(), new_secret()
    port = mock("--secret", s1, "--secret", s2)
    body = '{"user_id":"u1","message":"hi"}'
    good = signed(s2, "m1", body)
    assert post_alert(port, "m1", body.encode(), good) == 200
    # Any matching entry in a space-separated list is enough (secret rotation).
    both = signed(s1, "m2", body)
    both["webhook-signature"] = " ".join([signed(other, "m2", body)["webhook-signature"],
                                          both["webhook-signature"]])
    assert post_alert(port, "m2", body.encode(), both) == 200
    assert post_alert(port, "m3", body.encode(), signed(other, "m3", body)) == 401
    assert post_alert(port, "m4", body.encode(), {"webhook-timestamp": good["webhook-timestamp"]}) == 401
    # A signature for a different body or id does not verify.
    assert post_alert(port, "m1", b'{"tampered":1}', good) == 401
    assert post_alert(port, "m9", body.encode(), good) == 401
    st = get_stats(port)
    assert st["bad_signatures"] == 4
    assert (st["unique"], st["by_status"]) == (2, {"200": 2, "401": 4})


def test_control_switches_mode_and_reset_clears(mock) -> None:
    port = mock()
    assert post_alert(port, "c1") == 200
    status, settings = post_json(port, "/control", {"mode": "fail"})
    assert status == 200 and settings["mode"] == "fail" and settings["fail_ratio"] == 1.0
    # fail_ratio defaults to 1.0 in fail mode: every id fails.
    assert {s for s, _ in post_alerts(port, [(f"c{i}", b"{}", {}) for i in range(2, 30)])} == {500}
    assert post_json(port, "/control", {"mode": "nope"})[0] == 400
    assert post_json(port, "/control", {"fail_ratio": 2})[0] == 400
    assert get_stats(port)["mode"] == "fail"  # a rejected change leaves settings alone
    status, settings = post_json(port, "/control", {"mode": "ok", "latency_ms": 0})
    assert status == 200 and settings["mode"] == "ok"
    assert post_alert(port, "c2") == 200
    st = get_stats(port)
    assert (st["received"], st["unique"], st["by_status"]) == (30, 2, {"200": 2, "500": 28})
    assert post_json(port, "/reset", {})[0] == 200
    st = get_stats(port)
    assert (st["received"], st["unique"], st["duplicates"], st["by_status"]) == (0, 0, 0, {})
    assert st["first_at"] is None


def test_record_writes_one_line_per_request_and_sigterm_exits_0(tmp_path: Path, engine: str) -> None:
    record = tmp_path / "rec.jsonl"
    p, port = start_mock("--mode", "fail", "--fail-ratio", "0.5", "--engine", engine, record=record)
    try:
        ids = [f"rec-{i}" for i in range(20)]
        answers = post_alerts(port, [(i, f'{{"n":"{i}"}}'.encode(), {"webhook-timestamp": "123"})
                                     for i in ids])

        def lines() -> list[dict]:
            text = record.read_text() if record.exists() else ""
            return [json.loads(x) for x in text.splitlines()]

        # Flushed by the timer, without needing the process to exit.
        got = wait_until(lambda: len(lines()) == 20 and lines(), timeout=3, what="20 record lines")
        assert [r["id"] for r in got] == ids
        assert [r["status"] for r in got] == [s for s, _ in answers]
        assert got[0]["body"] == '{"n":"rec-0"}'
        assert got[0]["timestamp"] == "123" and got[0]["signature"] is None
        assert set(got[0]) == {"id", "timestamp", "signature", "status", "body"}
        post_alert(port, "last")
    finally:
        rc = stop_process(p, timeout=5)
    assert rc == 0
    assert len(lines()) == 21  # flushed at exit


def test_sigint_exits_0_promptly_with_open_connection(engine: str) -> None:
    p, port = start_mock("--engine", engine)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/x", body=b"{}", headers={"webhook-id": "k"})
        conn.getresponse().read()  # leaves an idle keep-alive connection open
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=5) == 0
        assert time.monotonic() - t0 < 3
        conn.close()
    finally:
        stop_process(p)


def test_make_app_in_process() -> None:
    from aiohttp.test_utils import TestClient, TestServer

    async def run() -> None:
        async with TestClient(TestServer(make_app(Settings(mode="gone")))) as client:
            resp = await client.post("/hook", data=b"{}", headers={"webhook-id": "a"})
            assert resp.status == 410
            stats = await (await client.get("/stats")).json()
            assert stats["by_status"] == {"410": 1}

    asyncio.run(run())


def _raw(port: int, data: bytes, expect: int, timeout: float = 5.0) -> list[tuple[int, bytes]]:
    """Send raw bytes on one connection; read until `expect` answers arrived. (status, head) each."""
    import socket

    out: list[tuple[int, bytes]] = []
    buf = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        deadline = time.monotonic() + timeout
        while len(out) < expect:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                head = buf[:end]
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if len(buf) >= end + 4 + length:
                    out.append((int(head.split(b" ")[1]), head))
                    buf = buf[end + 4 + length:]
                    continue
            assert time.monotonic() < deadline, f"only {len(out)} of {expect} answers: {buf!r}"
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return out


def _req(msg_id: str, body: bytes = b"{}", path: str = "/hook", extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nwebhook-id: {msg_id}\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_pipelined_requests_are_answered_in_order(mock) -> None:
    port = mock("--mode", "fail", "--fail-ratio", "0.5")
    ids = [f"p{i}" for i in range(50)]
    # All 50 requests in one write, with /stats in the middle: one answer each, in order.
    data = b"".join(_req(i) for i in ids[:25]) + b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n"
    data += b"".join(_req(i) for i in ids[25:])
    answers = _raw(port, data, 51)
    statuses = [s for s, _ in answers]
    expected = [500 if fails_by_hash(i, 0.5) else 200 for i in ids]
    assert statuses == expected[:25] + [200] + expected[25:]
    assert get_stats(port)["received"] == 50


def test_pipelining_keeps_order_behind_a_delayed_answer(mock) -> None:
    """Only alerts wait for the latency: the instant answers behind one must wait for it too."""
    port = mock("--latency-ms", "300")
    t0 = time.monotonic()
    data = (_req("slow-1") + b"GET /missing HTTP/1.1\r\nHost: x\r\n\r\n"
            + b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n" + _req("slow-2"))
    answers = _raw(port, data, 4)
    assert [s for s, _ in answers] == [200, 404, 200, 200]
    assert b"application/json" in answers[2][1].lower()
    assert time.monotonic() - t0 >= 0.3
    assert get_stats(port)["unique"] == 2


def test_chunked_body_and_expect_continue_are_verified(mock, engine: str) -> None:
    secret = new_secret()
    port = mock("--secret", secret)
    body = '{"user_id":"u1","message":"chunked"}'
    h = signed(secret, "ch1", body)
    head = (f"POST /hook HTTP/1.1\r\nHost: x\r\nwebhook-id: ch1\r\n"
            f"webhook-timestamp: {h['webhook-timestamp']}\r\nwebhook-signature: {h['webhook-signature']}\r\n")
    raw = body.encode()
    chunked = (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"".join(
        b"%x\r\n%s\r\n" % (len(part), part) for part in (raw[:10], raw[10:])) + b"0\r\n\r\n"
    assert [s for s, _ in _raw(port, chunked, 1)] == [200]
    # curl's Expect: 100-continue: the interim answer, then the real one.
    expect = (head.replace("ch1", "ch2") + f"Expect: 100-continue\r\nContent-Length: {len(raw)}\r\n\r\n")
    h2 = signed(secret, "ch2", body)
    expect = expect.replace(h["webhook-signature"], h2["webhook-signature"]).replace(
        h["webhook-timestamp"], h2["webhook-timestamp"])
    # aiohttp's low-level server (no Application) sends no interim answer.
    interim = [100] if engine == "fast" else []
    answers = _raw(port, expect.encode() + raw, 1 + len(interim))
    assert [s for s, _ in answers] == interim + [200]
    st = get_stats(port)
    assert (st["unique"], st["bad_signatures"]) == (2, 0)


def test_connection_close_bad_requests_and_other_routes(mock, engine: str) -> None:
    port = mock()
    # aiohttp's parser answers 400 to bytes pipelined behind a Connection: close.
    after = _req("never") if engine == "fast" else b""
    answers = _raw(port, _req("cc1", extra="Connection: close\r\n") + after, 2)
    assert [s for s, _ in answers] == [200]  # the server closed after the first answer
    assert get_stats(port)["received"] == 1
    assert [s for s, _ in _raw(port, b"NOT HTTP AT ALL\r\n\r\n", 1)] == [400]
    assert [s for s, _ in _raw(port, b"GET /hook HTTP/1.1\r\nHost: x\r\n\r\n", 1)] == [404]
    assert [s for s, _ in _raw(port, _req("s", path="/stats"), 1)] == [405]
    head = _raw(port, b"HEAD /stats HTTP/1.1\r\nHost: x\r\n\r\nGET /stats?x=1 HTTP/1.1\r\nHost: x\r\n\r\n", 1)
    assert head[0][0] == 200 and b"application/json" in head[0][1].lower()
    st = get_stats(port)
    assert (st["received"], st["unique"]) == (1, 1)
