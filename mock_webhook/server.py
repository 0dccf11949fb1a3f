"""The mock webhook receiver: behaviour modes, signature checks, counters, recording.

Owns everything the end-to-end tests observe about deliveries. It must stay
lean on the alert path (it has to keep up with ~10k req/s) and never block.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import random
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, BinaryIO

import orjson
from aiohttp import web

MODES = ("ok", "ratelimit", "fail", "flaky", "slow", "gone")
SECRET_PREFIX = "whsec_"
RECORD_FLUSH_INTERVAL = 0.1  # the contract asks for at most 0.2 s of buffered records


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


class Recorder:
    """Buffered JSON-lines log of every alert request; flushed by a timer and at exit."""

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


class Receiver:
    """Per-app state and the request handlers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._keys = [decode_secret(s) for s in settings.secrets]
        self.recorder = Recorder(settings.record) if settings.record else None
        self._flusher: asyncio.Task[None] | None = None
        self.reset()

    async def start(self) -> None:
        if self.recorder is not None:
            self._flusher = asyncio.create_task(_flush_loop(self.recorder))

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        if self.recorder is not None:
            self.recorder.close()

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        """The only entry point: one branch instead of a router keeps the alert path cheap."""
        path = request.path
        if request.method == "POST":
            if path == "/control":
                return await self.handle_control(request)
            if path == "/reset":
                return await self.handle_reset(request)
            if path != "/stats":
                return await self.handle_alert(request)
        if path == "/stats" and request.method in ("GET", "HEAD"):
            return await self.handle_stats(request)
        return web.Response(status=405 if path == "/stats" else 404)

    def reset(self) -> None:
        self.received = 0
        self.duplicates = 0
        self.bad_signatures = 0
        self.rate_429 = 0
        self.by_status: dict[int, int] = {}
        self.ids: set[str] = set()
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

    def _signature_ok(self, headers: Any, body: bytes) -> bool:
        header = headers.get("webhook-signature")
        if not header:
            return False
        msg = b"%s.%s.%s" % (
            headers.get("webhook-id", "").encode(),
            headers.get("webhook-timestamp", "").encode(),
            body,
        )
        expected = [hmac.new(k, msg, hashlib.sha256).digest() for k in self._keys]
        for item in header.split(" "):
            version, _, sig = item.partition(",")
            if version != "v1":
                continue
            try:
                got = base64.b64decode(sig, validate=True)
            except ValueError:
                continue
            for exp in expected:
                if hmac.compare_digest(exp, got):
                    return True
        return False

    def _decide(self, msg_id: str) -> int:
        mode = self.settings.mode
        if mode == "ok" or mode == "slow":
            return 200
        if mode == "ratelimit":
            return 200 if self._take_token() else 429
        if mode == "fail":
            return 500 if fails_by_hash(msg_id, self.settings.effective_fail_ratio()) else 200
        if mode == "flaky":
            return 500 if random.random() < self.settings.effective_fail_ratio() else 200
        return 410  # gone

    async def handle_alert(self, request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        self.received += 1
        delay = self.settings.effective_latency()
        if delay:
            await asyncio.sleep(delay)
        headers = request.headers
        msg_id = headers.get("webhook-id", "")
        if self._keys and not self._signature_ok(headers, body):
            self.bad_signatures += 1
            status = 401
        else:
            status = self._decide(msg_id)
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if self.recorder is not None:
            self.recorder.add({
                "id": msg_id,
                "timestamp": headers.get("webhook-timestamp"),
                "signature": headers.get("webhook-signature"),
                "status": status,
                "body": body.decode("utf-8", "replace"),
            })
        if status < 300:
            if msg_id in self.ids:
                self.duplicates += 1
            else:
                self.ids.add(msg_id)
            return web.Response(status=status)
        if status == 429:
            self.rate_429 += 1
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response(status=status)

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

    async def handle_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats()), content_type="application/json")

    async def handle_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.Response(body=orjson.dumps(self.stats()), content_type="application/json")

    async def handle_control(self, request: web.Request) -> web.Response:
        try:
            change = orjson.loads(await request.read() or b"{}")
            if not isinstance(change, dict):
                raise ValueError("body must be a JSON object")
            apply_control(self.settings, change)
        except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
            return web.json_response({"error": str(exc)}, status=400)
        if "rate" in change:
            self._refill_bucket()
        return web.Response(body=orjson.dumps(self.settings.public()),
                            content_type="application/json")


RECEIVER: web.AppKey[Receiver] = web.AppKey("receiver", Receiver)


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


async def _flush_loop(recorder: Recorder) -> None:
    while True:
        await asyncio.sleep(RECORD_FLUSH_INTERVAL)
        recorder.flush()


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    receiver = app[RECEIVER]
    await receiver.start()
    yield
    await receiver.close()


def make_app(settings: Settings) -> web.Application:
    """An aiohttp application around a Receiver, for in-process use (tests, embedding)."""
    receiver = Receiver(settings)
    app = web.Application()
    app[RECEIVER] = receiver
    app.router.add_route("*", "/{tail:.*}", receiver.dispatch)
    app.cleanup_ctx.append(_lifecycle)
    return app
