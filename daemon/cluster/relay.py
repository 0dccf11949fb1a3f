"""Jobs across the cluster: what the planner shows and decides, heard by every node.

The planner node holds the jobs (its Dispatcher), so the others ask it: a job-control
command given to any node is queued in Redis and answered by the planner, which applies
it as on one host (checked, persisted, applied) and announces pause, resume and cancel,
which every node passes on to its own workers within a second. The planner also
publishes its job listing once a second, which any node's `alertd jobs` and `alertd
status` show.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from .store import RedisDown, Store

log = logging.getLogger("alertd.cluster")

ASK_TIMEOUT = 5.0  # seconds a node waits for the planner's answer to a control request
BLOCK = 0.4  # a blocking pop waits less than the store's socket timeout (1 s)
MAX_LISTED = 500  # jobs in the published listing (active ones first)

Handler = Callable[[str, str, str | None], Awaitable[tuple[int, dict[str, Any]]]]


class Relay:
    def __init__(self, store: Store, lease: float) -> None:
        self.store = store
        self.lease = lease
        self._requests = store.key("control", "requests")
        self._announced = store.key("control", "announced")
        self._version = store.key("control", "version")
        self._listing = store.key("jobs", "listing")
        self._seen_version = -1
        self._seen: dict[str, str] = {}
        self.listing: list[dict[str, Any]] = []  # the planner's, as last fetched

    # ------------------------------------------------------------ any node

    async def ask(self, job: str, action: str, priority: str | None) -> tuple[int, dict]:
        """Have the planner apply a job-control action: (HTTP status, view or error)."""
        rid = uuid.uuid4().hex
        reply = self.store.key("control", "reply", rid)
        await self.store.call("RPUSH", self._requests, orjson.dumps(
            {"id": rid, "job": job, "action": action, "priority": priority}).decode())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ASK_TIMEOUT
        while loop.time() < deadline:
            got = await self.store.call("BLPOP", reply, BLOCK)
            if got:
                doc = orjson.loads(got[1])
                return int(doc["code"]), doc["body"]
        return 503, {"error": f"the planner node did not answer within {ASK_TIMEOUT:g} s"}

    async def fetch_listing(self) -> None:
        raw = await self.store.call("GET", self._listing)
        self.listing = orjson.loads(raw) if raw else []

    async def changes(self) -> list[tuple[str, str]]:
        """(job, action) announced since the last call: pause, resume or cancel."""
        version = int(await self.store.call("GET", self._version) or 0)
        if version == self._seen_version:
            return []
        first = self._seen_version < 0
        self._seen_version = version
        now = await self.store.call("HGETALL", self._announced)
        out = [] if first else [(job, v.split(":", 1)[0]) for job, v in now.items()
                                if self._seen.get(job) != v]
        self._seen = dict(now)
        return out

    # ------------------------------------------------------------ the planner

    async def serve(self, handle: Handler, stop: asyncio.Event) -> None:
        """Answer control requests from every node until `stop`."""
        while not stop.is_set():
            try:
                got = await self.store.call("BLPOP", self._requests, BLOCK)
            except RedisDown:
                await asyncio.sleep(0.2)
                continue
            if not got:
                continue
            try:
                req = orjson.loads(got[1])
                code, body = await handle(req["job"], req["action"], req.get("priority"))
            except (KeyError, TypeError, orjson.JSONDecodeError):
                continue  # not a request alertd wrote
            reply = self.store.key("control", "reply", req["id"])
            try:
                await self.store.pipeline([
                    ("RPUSH", reply, orjson.dumps({"code": code, "body": body}).decode()),
                    ("EXPIRE", reply, int(ASK_TIMEOUT) + 1)])
            except RedisDown:
                log.warning("cluster: could not answer a %s request for %s", req["action"],
                            req["job"])

    async def announce(self, job: str, action: str) -> None:
        """Every node passes this on to its workers (they hold rows of the job)."""
        version = await self.store.call("INCR", self._version)
        await self.store.pipeline([("HSET", self._announced, job, f"{action}:{version}"),
                                   ("PEXPIRE", self._announced, int(86400 * 1000))])

    async def publish_listing(self, jobs: list[dict[str, Any]]) -> None:
        await self.store.call("SET", self._listing, orjson.dumps(jobs[:MAX_LISTED]).decode(),
                              "PX", int(self.lease * 3000))
