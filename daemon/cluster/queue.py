"""The cluster's chunk queue: one Redis stream, one consumer group, one consumer per node.

A chunk descriptor is published once (by the planner, the holder of the planner lock),
taken by one node (XREADGROUP), renewed while it works, acknowledged only once its
outcomes are fsynced (XACK + XDEL), and claimed by another node (XPENDING IDLE + XCLAIM)
when its node's heartbeat lapsed and it stopped renewing. The fencing
token of a claim is Redis's own delivery count: every claim increments it, so `(node,
epoch)` names one claim, and a node whose claim lapsed finds out before it writes.
It never reads a spool file and never decides what a chunk's rows mean.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .store import Refused, Script, Store

GROUP = "nodes"
MAX_BLOCK_MS = 500  # below the store's socket timeout: a blocking read never times out

# The owner check shared by the fenced scripts: ARGV[1] group, ARGV[2] consumer.
_OWNS = """
local function owns(id, epoch)
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  return #p == 1 and p[1][2] == ARGV[2] and tonumber(p[1][4]) == tonumber(epoch)
end
"""
# ARGV[3..]: id, epoch pairs -> 1/0 each.
_STILL_OWNER = Script(_OWNS + """
local out = {}
for i = 3, #ARGV, 2 do out[#out + 1] = owns(ARGV[i], ARGV[i + 1]) and 1 or 0 end
return out
""")
# Owned entries get their idle time reset (XCLAIM JUSTID leaves the delivery count, the
# epoch, as it is), so a live node's long chunk is never reclaimed however long it takes.
_RENEW = Script(_OWNS + """
local out = {}
for i = 3, #ARGV, 2 do
  if owns(ARGV[i], ARGV[i + 1]) then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
""")
# KEYS: stream, acks stream. ARGV[3] id, ARGV[4] epoch, ARGV[5..] the ack record. Only
# the current owner acks (an old owner's XACK would drop the new owner's claim from the
# group's pending list); the record for the planner goes out in the same step.
_ACK = Script(_OWNS + """
if not owns(ARGV[3], ARGV[4]) then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
if #ARGV > 4 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV_MAXLEN, '*', unpack(ARGV, 5))
end
return 1
""".replace("ARGV_MAXLEN", "100000"))
# ARGV[2] claimer, ARGV[3] min idle ms, ARGV[4] count, ARGV[5..] consumers whose node
# lapsed -> {{id, fields, epoch}}: only their entries, never a live node's late renewal.
_RECLAIM_FROM = Script("""
local out = {}
for i = 5, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], '-', '+', ARGV[4], ARGV[i])
  for _, e in ipairs(p) do
    local c = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], e[1])
    if c[1] and c[1][2] then out[#out + 1] = {c[1][1], c[1][2], e[4] + 1} end
  end
end
return out
""")
# ARGV[2] consumer, ARGV[3] count: this node's own pending entries (a restart of the
# node), claimed again so their epochs move on and the old process is fenced out.
_ADOPT = Script("""
local skip = {}
for i = 4, #ARGV do skip[ARGV[i]] = true end
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', ARGV[3], ARGV[2])
local out = {}
for _, e in ipairs(p) do
  if not skip[e[1]] then
    local c = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, e[1])
    if c[1] and c[1][2] then out[#out + 1] = {c[1][1], c[1][2], e[4] + 1} end
  end
end
return out
""")
# KEYS: the lock. ARGV: holder, ttl ms. Takes or renews it; 1 if it is the holder's.
_LOCK = Script("""
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
""")


@dataclass(frozen=True, slots=True)
class Taken:
    """One claim of a chunk entry: `epoch` is the entry's delivery count at this claim."""

    id: str
    fields: dict[str, str]
    epoch: int


class ChunkQueue:
    def __init__(self, store: Store, node: str, name: str = "chunks") -> None:
        self.store = store
        self.node = node
        self.key = store.key(name)
        self.acks_key = store.key(name, "acks")

    async def ensure_group(self) -> None:
        """The group exists (created with its stream). From id 0: after a lost group,
        entries still in the stream are delivered again, never skipped."""
        try:
            await self.store.call("XGROUP", "CREATE", self.key, GROUP, "0", "MKSTREAM")
        except Refused as e:
            if not e.reply.startswith("BUSYGROUP"):
                raise

    async def _again(self, fn: Any, *args: Any) -> Any:
        """Run fn; on NOGROUP (Redis came back without the stream) recreate the group and
        run it once more: never a loop on the error."""
        try:
            return await fn(*args)
        except Refused as e:
            if "NOGROUP" not in e.reply:
                raise
        await self.ensure_group()
        return await fn(*args)

    # ------------------------------------------------------------ publishing

    async def publish(self, fields: dict[str, str]) -> str:
        """Add a chunk descriptor (the planner, which holds the planner lock, does)."""
        return await self.store.call("XADD", self.key, "*", *_flat(fields))

    async def claim_lock(self, name: str, holder: str, ttl_ms: int) -> bool:
        """Take (or renew) the lock `name` for `holder` for `ttl_ms`; False if another
        holder has it (the planner role is one such lock)."""
        return await self.store.script(_LOCK, [self._lock(name)], [holder, ttl_ms]) == 1

    async def release_lock(self, name: str, holder: str) -> None:
        await self.store.script(_RELEASE, [self._lock(name)], [holder])

    def _lock(self, name: str) -> str:
        return self.store.key("planner", name)

    # ------------------------------------------------------------ consuming

    async def take(self, count: int, block_ms: int = 0) -> list[Taken]:
        """Up to `count` new entries for this node; waits up to `block_ms` (<= 500) for one."""
        block = max(0, min(block_ms, MAX_BLOCK_MS))
        wait = ["BLOCK", block] if block else []  # BLOCK 0 would wait forever
        r = await self._again(self.store.call, "XREADGROUP", "GROUP", GROUP, self.node,
                              "COUNT", count, *wait, "STREAMS", self.key, ">")
        out = []
        for _stream, entries in r or []:
            for entry_id, fields in entries:
                out.append(Taken(entry_id, _fields(fields), 1))  # first delivery: count 1
        return out

    async def ack(self, taken: Taken, record: dict[str, str] | None = None) -> bool:
        """The chunk's outcomes are fsynced: done; `record` (job, seq, counts) goes to the
        acks stream the planner reads, in the same step. False if this claim had lapsed
        (another node owns the entry now; nothing was changed, nothing recorded)."""
        r = await self._again(self.store.script, _ACK, [self.key, self.acks_key],
                              [GROUP, self.node, taken.id, taken.epoch, *_flat(record or {})])
        return r == 1

    async def acks_tail(self) -> str:
        """The id of the newest ack record ("0-0": none): a new planner reads acks after
        it once the WALs told it what was final before."""
        r = await self.store.call("XREVRANGE", self.acks_key, "+", "-", "COUNT", 1)
        return r[0][0] if r else "0-0"

    async def read_acks(self, after: str, count: int, block_ms: int = 0) -> list[tuple[str, dict]]:
        """Ack records after id `after`, oldest first (the planner's Dispatcher.ack feed)."""
        block = max(0, min(block_ms, MAX_BLOCK_MS))
        wait = ["BLOCK", block] if block else []
        r = await self.store.call("XREAD", "COUNT", count, *wait, "STREAMS", self.acks_key, after)
        return [(i, _fields(f)) for _stream, entries in r or [] for i, f in entries]

    async def still_owner(self, entry_id: str, node: str, epoch: int) -> bool:
        r = await self._again(self.store.script, _STILL_OWNER, [self.key],
                              [GROUP, node, entry_id, epoch])
        return r == [1]

    async def renew(self, held: list[Taken]) -> list[bool]:
        """Reset the idle time of the entries this node still owns (call every lease/6);
        False for each one it lost."""
        if not held:
            return []
        args: list[Any] = [GROUP, self.node]
        for t in held:
            args += [t.id, t.epoch]
        r = await self._again(self.store.script, _RENEW, [self.key], args)
        return [x == 1 for x in r]

    async def reclaim_from(self, nodes: list[str], min_idle_ms: int, count: int) -> list[Taken]:
        """Claim up to `count` entries per node of `nodes` (their heartbeat lapsed) that
        they have not renewed for `min_idle_ms`."""
        if not nodes:
            return []
        r = await self._again(self.store.script, _RECLAIM_FROM, [self.key],
                              [GROUP, self.node, min_idle_ms, count, *nodes])
        return [Taken(i, _fields(f), int(epoch)) for i, f, epoch in r]

    async def consumers(self) -> dict[str, int]:
        """Every consumer of the group with its count of pending entries: a node that
        left, or whose heartbeat expired long ago, still holds entries here."""
        r = await self._again(self.store.call, "XINFO", "CONSUMERS", self.key, GROUP)
        out = {}
        for c in r or []:
            d = c if isinstance(c, dict) else dict(zip(c[::2], c[1::2]))
            out[str(d["name"])] = int(d["pending"])
        return out

    async def adopt_own(self, count: int = 1000, keep: Iterable[str] = ()) -> list[Taken]:
        """After a restart, or after this node fenced its chunks: claim again what is
        still this node's in Redis (a new claim, fencing the old one out), but for the
        entries in `keep` (claims it still works on)."""
        r = await self._again(self.store.script, _ADOPT, [self.key],
                              [GROUP, self.node, count, *keep])
        return [Taken(i, _fields(f), int(epoch)) for i, f, epoch in r]

    async def backlog(self) -> int:
        """Entries not yet acked (waiting or held): what a planner keeps bounded."""
        return int(await self.store.call("XLEN", self.key))


_RELEASE = Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
""")


def _flat(fields: dict[str, str]) -> list[str]:
    return [x for kv in fields.items() for x in kv]


def _fields(raw: Any) -> dict[str, str]:
    if isinstance(raw, dict):
        return raw
    return dict(zip(raw[::2], raw[1::2]))
