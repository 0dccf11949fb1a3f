"""The status API (aiohttp): /v1/status, /healthz, on a unix socket or loopback TCP.

It only reads a snapshot the supervisor builds; it never changes state. A TCP
listener demands the configured bearer token for everything but /healthz.
"""
from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .config import Config

log = logging.getLogger("alertd.status")


class StatusServer:
    def __init__(self, cfg: Config, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._cfg = cfg
        self._snapshot = snapshot
        self._runner: web.AppRunner | None = None
        kind, addr = cfg.status_address()
        self._kind, self._addr = kind, addr

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth] if self._kind == "tcp" else [])
        app.router.add_get("/v1/status", self._status)
        app.router.add_get("/healthz", self._health)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        if request.path != "/healthz":
            want = f"Bearer {self._cfg.status.token}"
            got = request.headers.get("Authorization", "")
            if not hmac.compare_digest(got.encode(), want.encode()):
                return web.json_response({"error": "unauthorized"}, status=401)
        return await handler(request)

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self._snapshot(), dumps=_dumps)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def start(self) -> None:
        self._runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        if self._kind == "unix":
            path = str(self._addr)
            try:
                os.unlink(path)  # a stale socket from a crashed run
            except FileNotFoundError:
                pass
            site: web.BaseSite = web.UnixSite(self._runner, path)
        else:
            host, port = self._addr
            site = web.TCPSite(self._runner, host, port)
        await site.start()
        if self._kind == "unix":
            os.chmod(str(self._addr), 0o660)
        log.info("status API on %s", self._addr)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._kind == "unix":
            try:
                os.unlink(str(self._addr))
            except FileNotFoundError:
                pass


def _dumps(obj: Any) -> str:
    import orjson

    return orjson.dumps(obj).decode()
