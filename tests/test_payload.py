"""payload.py: the documented body, and signatures that a Standard Webhooks receiver accepts."""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from datetime import datetime, timezone

import orjson
import pytest
from alertd.payload import Payloads
from standardwebhooks.webhooks import Webhook, WebhookVerificationError


def _secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def _headers(lines: bytes) -> dict[str, str]:
    assert lines.endswith(b"\r\n")
    out = {}
    for line in lines[:-2].split(b"\r\n"):
        name, _, value = line.decode("ascii").partition(": ")
        assert name and value and name not in out
        out[name] = value
    return out


def test_body_is_the_documented_json() -> None:
    now = 1795500000.123456  # 2026-11-24T06:00:00.123Z
    lines, body = Payloads([]).build("j000042:1234", "u-1", "Héllo \"x\"\n", "users.csv", 1234, now)
    assert orjson.loads(body) == {
        "type": "alert", "timestamp": "2026-11-24T06:00:00.123Z",
        "data": {"user_id": "u-1", "message": "Héllo \"x\"\n", "file": "users.csv", "offset": 1234}}
    assert _headers(lines) == {"webhook-id": "j000042:1234", "webhook-timestamp": "1795500000"}
    iso = orjson.loads(body)["timestamp"]
    parsed = datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    assert abs(parsed.timestamp() - now) < 0.001


def test_timestamp_cache_follows_the_clock() -> None:
    p = Payloads([])
    seen = []
    for now in (1795500000.999, 1795500001.0, 1795500001.5, 1795586400.25, 0.0):
        lines, body = p.build("a", "u", "m", "f", 0, now)
        seen.append((orjson.loads(body)["timestamp"], _headers(lines)["webhook-timestamp"]))
    assert seen == [("2026-11-24T06:00:00.999Z", "1795500000"),
                    ("2026-11-24T06:00:01.000Z", "1795500001"),
                    ("2026-11-24T06:00:01.500Z", "1795500001"),
                    ("2026-11-25T06:00:00.250Z", "1795586400"),
                    ("1970-01-01T00:00:00.000Z", "0")]


def test_signature_verifies_with_standardwebhooks() -> None:
    secret = _secret()
    lines, body = Payloads([secret]).build("j000001:0", "user-9", "msg", "f.csv", 0, time.time())
    headers = _headers(lines)
    assert headers["webhook-signature"].startswith("v1,")
    assert " " not in headers["webhook-signature"]
    assert Webhook(secret).verify(body, headers)["data"]["user_id"] == "user-9"
    with pytest.raises(WebhookVerificationError):
        Webhook(_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace(b"user-9", b"user-8"), headers)


def test_two_secrets_give_two_valid_signatures() -> None:
    s1, s2 = _secret(), _secret()
    lines, body = Payloads([s1, s2]).build("j000001:77", "u", "m", "f", 77, time.time())
    headers = _headers(lines)
    sigs = headers["webhook-signature"].split(" ")
    assert len(sigs) == 2 and all(s.startswith("v1,") for s in sigs)
    for secret, sig in ((s1, sigs[0]), (s2, sigs[1])):
        Webhook(secret).verify(body, headers)
        Webhook(secret).verify(body, {**headers, "webhook-signature": sig})


def test_signature_matches_hmac_for_any_key_length() -> None:
    # 16..100 bytes crosses the 64-byte block size, where RFC 2104 hashes the key first.
    for n in (16, 32, 63, 64, 65, 100):
        key = os.urandom(n)
        lines, body = Payloads(["whsec_" + base64.b64encode(key).decode()]).build(
            "id-1", "u", "m", "f", 1, 1795500000.5)
        want = base64.b64encode(hmac.digest(key, b"id-1.1795500000." + body, hashlib.sha256))
        assert _headers(lines)["webhook-signature"] == "v1," + want.decode()


def test_no_secrets_no_signature_header() -> None:
    lines, _ = Payloads([]).build("j1:5", "u", "m", "f", 5, time.time())
    assert b"webhook-signature" not in lines
    assert set(_headers(lines)) == {"webhook-id", "webhook-timestamp"}


# Today's bytes, pinned: a body without data_columns must stay exactly this.
PINNED_BODY = (b'{"type":"alert","timestamp":"2026-11-24T06:00:00.123Z","data":{"user_id":"u-1",'
               b'"message":"m","file":"users.csv","offset":1234}}')


def test_no_fields_gives_todays_bytes() -> None:
    secret = "whsec_" + base64.b64encode(b"k" * 24).decode()
    p = Payloads([secret])
    now = 1795500000.123456
    lines, body = p.build("j000042:1234", "u-1", "m", "users.csv", 1234, now)
    assert body == PINNED_BODY
    assert p.build("j000042:1234", "u-1", "m", "users.csv", 1234, now, None) == (lines, body)
    want = base64.b64encode(hmac.digest(b"k" * 24, b"j000042:1234.1795500000." + PINNED_BODY,
                                        hashlib.sha256)).decode()
    assert _headers(lines)["webhook-signature"] == "v1," + want


def test_fields_go_into_data_and_are_signed() -> None:
    secret = _secret()
    fields = {"city": " Zürich ", "plan": 'pro, "annual"', "empty": "", "3": "x"}
    lines, body = Payloads([secret]).build("j000001:9", "u", "m", "f.csv", 9, time.time(),
                                           fields)
    headers = _headers(lines)
    data = Webhook(secret).verify(body, headers)["data"]
    assert data == {"user_id": "u", "message": "m", "file": "f.csv", "offset": 9,
                    "fields": fields}
    assert list(orjson.loads(body)["data"]) == ["user_id", "message", "file", "offset", "fields"]
    assert list(data["fields"]) == list(fields)  # the order of [csv] data_columns
    # An empty object (a row with no data column values) is still a `fields` key.
    _, empty = Payloads([]).build("j1:0", "u", "m", "f", 0, 1795500000.5, {})
    assert orjson.loads(empty)["data"]["fields"] == {}
