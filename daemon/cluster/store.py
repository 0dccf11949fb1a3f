"""The one connection to the cluster's Redis: key namespace, Lua scripts, health.

Every call either answers or raises RedisDown (one line saying why) within about the
timeout: callers treat it as "no budget, nothing new", never as a crash. After a
connection failure calls fail at once, without touching the network, until a backoff
(0.1 s doubling to 2 s) has passed; the next call then tries again, so the store comes
back by itself. It never retries a command: a command that timed out may have run.
"""
from __future__ import annotations

import asyncio
import hashlib
import random
import time
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..credentials import redact_url
from ..errors import AlertdError

BACKOFF_MIN = 0.1
BACKOFF_MAX = 2.0
# Replies that mean "this Redis cannot serve us now", as a lost connection does.
_UNAVAILABLE = ("LOADING", "BUSY", "READONLY", "MASTERDOWN", "NOAUTH", "WRONGPASS", "OOM",
                "MISCONF", "CLUSTERDOWN", "TRYAGAIN")


class RedisDown(AlertdError):
    """Redis could not answer (unreachable, timed out, loading, refused): the message is
    one line, e.g. `redis unreachable at redis://10.0.0.5:6379/0: connection refused`."""


class Refused(RedisDown):
    """Redis is up but refused the command; `reply` is its error line (e.g. NOGROUP ...),
    for the few callers that repair a known one (queue.py recreates a lost group)."""

    def __init__(self, message: str, reply: str) -> None:
        super().__init__(message)
        self.reply = reply


class Script:
    """A Lua script run by EVALSHA, loaded on NOSCRIPT (a restarted or flushed Redis)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


def namespace_prefix(cluster: str) -> str:
    # The hash tag keeps every key in one slot, so multi-key scripts stay valid on a
    # Redis Cluster too.
    return f"alertd:{{{cluster}}}:"


class Store:
    def __init__(self, url: str, cluster: str = "main", timeout: float = 1.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"not a redis://, rediss:// or unix:// URL: {redact_url(url)!r}")
        self.url = url
        self.shown = redact_url(url)
        self.prefix = namespace_prefix(cluster)
        self.timeout = timeout
        self.up = False  # the last call reached Redis
        self.error: str | None = None  # why the last call failed, one line
        self.commands = 0  # commands sent (alertd_redis_commands_total)
        self._retry_at = 0.0  # monotonic: fail fast before this
        self.failed_at = 0.0  # monotonic: the last time Redis could not be reached
        self._backoff = BACKOFF_MIN
        # No retries inside redis-py: a retried write may run twice, and a retry loop
        # would hold a caller far past the timeout while Redis is down.
        self.client = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0), health_check_interval=0, decode_responses=True)

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def close(self) -> None:
        await self.client.aclose()

    # ------------------------------------------------------------ calls

    async def call(self, *args: Any) -> Any:
        """One command (a blocking read must block for less than the timeout)."""
        self._gate()
        self.commands += 1
        try:
            reply = await self.client.execute_command(*args)
        except BaseException as e:
            raise self._failed(e) from None
        self._ok()
        return reply

    async def script(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        self._gate()
        self.commands += 1
        try:
            try:
                reply = await self.client.execute_command("EVALSHA", script.sha, len(keys),
                                                          *keys, *args)
            except rexc.NoScriptError:
                self.commands += 1
                reply = await self.client.execute_command("EVAL", script.source, len(keys),
                                                          *keys, *args)
        except BaseException as e:
            raise self._failed(e) from None
        self._ok()
        return reply

    async def pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Several commands in one round trip (not a transaction); replies in order.
        An error reply to any of them raises Refused (the others have run)."""
        self._gate()
        self.commands += len(commands)
        try:
            pipe = self.client.pipeline(transaction=False)
            for c in commands:
                pipe.execute_command(*c)
            replies = await pipe.execute(raise_on_error=False)
        except BaseException as e:
            raise self._failed(e) from None
        self._ok()
        for r in replies:
            if isinstance(r, Exception):
                raise Refused(f"redis at {self.shown} refused a command: {_line(r)}", _line(r))
        return replies

    async def time(self) -> float:
        """Redis's clock, in seconds: the one clock every node agrees on."""
        sec, usec = await self.call("TIME")
        return int(sec) + int(usec) / 1e6

    async def ping(self) -> bool:
        """True if Redis answered; never raises (for status and /healthz)."""
        try:
            await self.call("PING")
        except RedisDown:
            return False
        return True

    # ------------------------------------------------------------ health

    def _gate(self) -> None:
        if not self.up and self.error is not None and time.monotonic() < self._retry_at:
            raise RedisDown(self.error)

    def _ok(self) -> None:
        self.up = True
        self.error = None
        self._backoff = BACKOFF_MIN

    def _failed(self, e: BaseException) -> BaseException:
        if isinstance(e, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
            return e  # not ours to turn into RedisDown
        # By the error code (its first word): BUSYGROUP is a refusal, BUSY is a busy Redis.
        if isinstance(e, rexc.ResponseError) and str(e).split(" ", 1)[0] not in _UNAVAILABLE:
            # Redis is up, the command was wrong (a bug or a foreign key in our namespace):
            # still one exception for callers, but no backoff.
            return Refused(f"redis at {self.shown} refused a command: {_line(e)}", _line(e))
        self.up = False
        self.failed_at = time.monotonic()
        self.error = f"redis unreachable at {self.shown}: {_reason(e, self.timeout)}"
        self._retry_at = time.monotonic() + self._backoff * random.uniform(0.8, 1.0)
        self._backoff = min(BACKOFF_MAX, self._backoff * 2)
        return RedisDown(self.error)


def _reason(e: BaseException, timeout: float) -> str:
    if isinstance(e, rexc.TimeoutError | asyncio.TimeoutError | TimeoutError):
        return f"no answer within {timeout:g} s"
    text = _line(e)
    low = text.lower()
    if "refused" in low:
        return "connection refused"
    return text or type(e).__name__


def _line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]
