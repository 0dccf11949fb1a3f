"""Engine-neutral state of the mock receiver: settings, counters, verdicts, signatures, record.

Both HTTP engines (fast.py on raw protocols, server.py on aiohttp) feed every
alert request through Core.alert(), so modes, counters and /stats mean the
same thing whichever engine serves them. No I/O here except the record file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import random
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import orjson

MODES = ("ok", "ratelimit", "fail", "flaky", "slow", "gone")
SECRET_PREFIX = "whsec_"
RECORD_FLUSH_INTERVAL = 0.1  # the contract asks for at most 0.2 s of buffered records

_a2b = binascii.a2b_base64
_compare = hmac.compare_digest
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


@dataclass
class Settings:
    """Runtime behaviour; mutable because /control switches it without a restart."""

    mode: str = "ok"
    rate: float = 100.0
    # None means "the mode's default": 1.0 for fail, 0.5 for flaky.
    fail_ratio: float | None = None
    # None means "the mode's default": 200 ms for slow, 0 otherwise.
    latency_ms: float | None = None
    secrets: list[str] = field(default_factory=list)
    record: str | None = None

    def effective_fail_ratio(self) -> float:
        if self.fail_ratio is not None:
            return self.fail_ratio
        return 0.5 if self.mode == "flaky" else 1.0

    def effective_latency(self) -> float:
        """Delay in seconds applied before answering."""
        if self.latency_ms is not None:
            return self.latency_ms / 1000.0
        return 0.2 if self.mode == "slow" else 0.0

    def public(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "rate": self.rate,
            "fail_ratio": self.effective_fail_ratio(),
            "latency_ms": self.effective_latency() * 1000.0,
            "secrets": len(self.secrets),
        }


def decode_secret(secret: str) -> bytes:
    """Key bytes of a Standard Webhooks secret (`whsec_` + base64)."""
    if secret.startswith(SECRET_PREFIX):
        secret = secret[len(SECRET_PREFIX):]
    # Tolerate unpadded base64, as the reference implementation does.
    return base64.b64decode(secret + "==")


def fails_by_hash(msg_id: str, ratio: float) -> bool:
    """Stable per-id verdict, so a retried alert fails again in `fail` mode."""
    h = int.from_bytes(hashlib.sha1(msg_id.encode()).digest()[:8], "big")
    return h / 2**64 < ratio


def hmac_pads(key: bytes) -> tuple[Any, Any]:
    """SHA-256 states already fed with key^ipad and key^opad (RFC 2104).

    Finishing copies of them costs a third of hmac.digest() on OpenSSL 3,
    which sets the key up again on every call: the mock's costliest step.
    """
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    key = key.ljust(64, b"\0")
    return hashlib.sha256(key.translate(_IPAD)), hashlib.sha256(key.translate(_OPAD))


def apply_control(settings: Settings, change: dict[str, Any]) -> None:
    """Validate the whole change first, so a bad field leaves settings untouched."""
    unknown = set(change) - {"mode", "fail_ratio", "rate", "latency_ms"}
    if unknown:
        raise ValueError(f"unknown keys: {sorted(unknown)}")
    new = {}
    if "mode" in change:
        if change["mode"] not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {change['mode']!r}")
        new["mode"] = change["mode"]
    for key in ("fail_ratio", "rate", "latency_ms"):
        if key not in change:
            continue
        value = change[key]
        if value is None and key != "rate":
            new[key] = None  # back to the mode's default
        elif (isinstance(value, (int, float)) and not isinstance(value, bool)
              and 0 <= value <= (1 if key == "fail_ratio" else float("inf"))):
            new[key] = float(value)
        else:
            limit = "in [0, 1]" if key == "fail_ratio" else ">= 0"
            raise ValueError(f"{key} must be a number {limit}, got {value!r}")
    for key, value in new.items():
        setattr(settings, key, value)


class Recorder:
    """Buffered JSON-lines log of every alert request; the engine flushes it on a timer and at exit."""

    def __init__(self, path: str) -> None:
        self._fh: BinaryIO = open(path, "ab")
        self._buf: list[bytes] = []

    def add(self, entry: dict[str, Any]) -> None:
        self._buf.append(orjson.dumps(entry) + b"\n")

    def flush(self) -> None:
        if self._buf:
            data = b"".join(self._buf)
            self._buf.clear()
            self._fh.write(data)
            self._fh.flush()

    def close(self) -> None:
        self.flush()
        self._fh.close()


def _text(b: bytes | None) -> str | None:
    return None if b is None else b.decode("utf-8", "replace")


class Core:
    """Counters and verdicts of one receiver process.

    Header values arrive as bytes (None when absent) and ids are kept as bytes:
    the set of accepted ids is the one structure that grows with the run.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.key_bytes = [decode_secret(s) for s in settings.secrets]
        self._keys = [hmac_pads(k) for k in self.key_bytes]
        self.recorder = Recorder(settings.record) if settings.record else None
        self.reset()

    def reset(self) -> None:
        self.received = 0
        self.duplicates = 0
        self.bad_signatures = 0
        self.rate_429 = 0
        self.by_status: dict[int, int] = {}
        self.ids: set[bytes] = set()
        self.first_at: float | None = None
        self.last_at: float | None = None
        self._refill_bucket()

    def _refill_bucket(self) -> None:
        # Half a second of burst, like most rate-limited APIs: a receiver that
        # is itself descheduled for a moment would otherwise 429 its backlog.
        self._burst = max(1.0, self.settings.rate / 2.0)
        self._tokens = self._burst
        self._bucket_at = time.monotonic()

    def _take_token(self) -> bool:
        now = time.monotonic()
        tokens = self._tokens + (now - self._bucket_at) * self.settings.rate
        self._bucket_at = now
        if tokens > self._burst:
            tokens = self._burst
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return True
        self._tokens = tokens
        return False

    def arrived(self) -> None:
        """Count a request at its arrival (before any configured latency)."""
        now = time.time()
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        self.received += 1

    def signature_ok(self, msg_id: bytes, ts: bytes, header: bytes | None, body: bytes) -> bool:
        if not header:
            return False
        msg = b"%s.%s.%s" % (msg_id, ts, body)
        expected = []
        for ipad, opad in self._keys:
            inner = ipad.copy()
            inner.update(msg)
            outer = opad.copy()
            outer.update(inner.digest())
            expected.append(outer.digest())
        for item in header.split(b" "):
            if item[:3] != b"v1,":
                continue
            try:
                got = _a2b(item[3:], strict_mode=True)
            except binascii.Error:
                continue
            for exp in expected:
                if _compare(exp, got):
                    return True
        return False

    def _decide(self, msg_id: bytes) -> int:
        mode = self.settings.mode
        if mode == "ok" or mode == "slow":
            return 200
        if mode == "ratelimit":
            return 200 if self._take_token() else 429
        if mode == "fail":
            return 500 if fails_by_hash(msg_id.decode("utf-8", "replace"),
                                        self.settings.effective_fail_ratio()) else 200
        if mode == "flaky":
            return 500 if random.random() < self.settings.effective_fail_ratio() else 200
        return 410  # gone

    def answer(self, msg_id: bytes | None, ts: bytes | None, sig: bytes | None, body: bytes) -> int:
        """Verdict, counters and record line of an alert that arrived (see arrived()); its status."""
        mid = msg_id or b""
        if self._keys and not self.signature_ok(mid, ts or b"", sig, body):
            self.bad_signatures += 1
            status = 401
        else:
            status = self._decide(mid)
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if self.recorder is not None:
            self.recorder.add({"id": mid.decode("utf-8", "replace"), "timestamp": _text(ts),
                               "signature": _text(sig), "status": status,
                               "body": body.decode("utf-8", "replace")})
        if status < 300:
            ids = self.ids
            if mid in ids:
                self.duplicates += 1
            else:
                ids.add(mid)
        elif status == 429:
            self.rate_429 += 1
        return status

    def stats(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "unique": len(self.ids),
            "duplicates": self.duplicates,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "bad_signatures": self.bad_signatures,
            "rate_429": self.rate_429,
            "mode": self.settings.mode,
            "first_at": self.first_at,
            "last_at": self.last_at,
            "settings": self.settings.public(),
        }

    def control(self, raw: bytes) -> tuple[int, bytes]:
        """POST /control: (status, JSON body); a bad change answers 400 and changes nothing."""
        try:
            change = orjson.loads(raw or b"{}")
            if not isinstance(change, dict):
                raise ValueError("body must be a JSON object")
            apply_control(self.settings, change)
        except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
            return 400, orjson.dumps({"error": str(exc)})
        if "rate" in change:
            self._refill_bucket()
        return 200, orjson.dumps(self.settings.public())

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
