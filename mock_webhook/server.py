"""The aiohttp engine of the mock receiver (`--engine aiohttp`, and make_app for embedding).

Slower than fast.py (about 9-10k requests/s on one core) but built on a full
HTTP stack; behaviour lives in core.py and is the same in both engines.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import orjson
from aiohttp import web

from .core import MODES, RECORD_FLUSH_INTERVAL, Core, Recorder, Settings, apply_control, fails_by_hash

__all__ = ["MODES", "Receiver", "Settings", "apply_control", "fails_by_hash", "make_app"]

_JSON = "application/json"


def _b(value: str | None) -> bytes | None:
    return None if value is None else value.encode()


class Receiver(Core):
    """Core plus the aiohttp request handlers and the record flush task."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._flusher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.recorder is not None:
            self._flusher = asyncio.create_task(_flush_loop(self.recorder))

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        self.close()  # flushes the record file

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        """The only entry point: one branch instead of a router keeps the alert path cheap."""
        path = request.path
        if request.method == "POST":
            if path == "/control":
                status, body = self.control(await request.read())
                return web.Response(status=status, body=body, content_type=_JSON)
            if path == "/reset":
                self.reset()
                return web.Response(body=orjson.dumps(self.stats()), content_type=_JSON)
            if path != "/stats":
                return await self.handle_alert(request)
        if path == "/stats" and request.method in ("GET", "HEAD"):
            return web.Response(body=orjson.dumps(self.stats()), content_type=_JSON)
        return web.Response(status=405 if path == "/stats" else 404)

    async def handle_alert(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.arrived()
        delay = self.settings.effective_latency()
        if delay:
            await asyncio.sleep(delay)
        h = request.headers
        status = self.answer(_b(h.get("webhook-id")), _b(h.get("webhook-timestamp")),
                             _b(h.get("webhook-signature")), body)
        if status == 429:
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response(status=status)


async def _flush_loop(recorder: Recorder) -> None:
    while True:
        await asyncio.sleep(RECORD_FLUSH_INTERVAL)
        recorder.flush()


RECEIVER: web.AppKey[Receiver] = web.AppKey("receiver", Receiver)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    receiver = app[RECEIVER]
    await receiver.start()
    yield
    await receiver.stop()


def make_app(settings: Settings) -> web.Application:
    """An aiohttp application around a Receiver, for in-process use (tests, embedding)."""
    receiver = Receiver(settings)
    app = web.Application()
    app[RECEIVER] = receiver
    app.router.add_route("*", "/{tail:.*}", receiver.dispatch)
    app.cleanup_ctx.append(_lifecycle)
    return app
