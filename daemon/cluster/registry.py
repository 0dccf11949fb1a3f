"""Cluster-wide job ids, the job registry and its control state, and node heartbeats.

Job ids come from one Redis counter, never below the floor a node's state dir already
holds. Control (pause, resume, cancel, priority) is written here by whichever node got
the command and bumps one counter, so every node polls a single cheap GET. Heartbeat
ages are computed from Redis TIME. It never touches the state directory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..protocol import Counts
from .store import Script, Store

FINAL = ("complete", "failed", "cancelled")
PRIORITIES = ("high", "normal", "low")

_NEXT_ID = Script("""
local floor = tonumber(ARGV[1])
if (tonumber(redis.call('GET', KEYS[1])) or 0) < floor then redis.call('SET', KEYS[1], floor) end
return redis.call('INCR', KEYS[1])
""")
# KEYS: job hash, control hash, version. ARGV: job, action, priority.
# -> {version, state}; version -1: no such job, -2: not allowed in `state`.
_CONTROL = Script("""
local state, prio = unpack(redis.call('HMGET', KEYS[1], 'state', 'priority'))
if not state then return {-1, ''} end
local a = ARGV[2]
local final = state == 'complete' or state == 'failed' or state == 'cancelled'
if final or (a == 'pause' and state == 'paused') or (a == 'resume' and state ~= 'paused') then
  return {-2, state}
end
if a == 'pause' then state = 'paused'
elseif a == 'resume' then state = 'running'
elseif a == 'cancel' then state = 'cancelled'
else prio = ARGV[3] end
redis.call('HSET', KEYS[1], 'state', state, 'priority', prio)
redis.call('HSET', KEYS[2], ARGV[1], state .. ':' .. prio)
return {redis.call('INCR', KEYS[3]), state}
""")
# KEYS: node hash, node set. ARGV: name, pid, rate, workers, ttl ms, epoch.
_HEARTBEAT = Script("""
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'name', ARGV[1], 'pid', ARGV[2], 'rate', ARGV[3],
           'workers', ARGV[4], 'epoch', ARGV[6], 'hb', t[1] .. '.' .. string.format('%06d', t[2]))
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
""")
# KEYS[1] node set; ARGV[1] key prefix of node hashes -> {now, {fields...}, ...}
_NODES = Script("""
local t = redis.call('TIME')
local out = {t[1] .. '.' .. string.format('%06d', t[2])}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local h = redis.call('HGETALL', ARGV[1] .. name)
  if #h == 0 then redis.call('SREM', KEYS[1], name) else out[#out + 1] = h end
end
return out
""")


class UnknownJob(Exception):
    """No job with this id in the cluster's registry."""


class ControlRefused(Exception):
    """The job cannot take this action in its state; the message says why."""


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    pid: int
    epoch: int
    age: float  # seconds since its last heartbeat, by Redis's clock
    rate: float  # deliveries/s it reported
    workers: int


class Registry:
    def __init__(self, store: Store) -> None:
        self.store = store

    # ------------------------------------------------------------ job ids

    async def next_job_id(self, floor: int = 0) -> str:
        """A new id, unique in the cluster and above `floor` (the largest id this node's
        state dir already holds, so ids from before cluster mode are never reused)."""
        n = await self.store.script(_NEXT_ID, [self.store.key("jobseq")], [floor])
        return f"j{int(n):06d}"

    # ------------------------------------------------------------ registry

    def _job(self, job_id: str) -> str:
        return self.store.key("job", job_id)

    async def register(self, job_id: str, file: str, owner: str, priority: str = "normal",
                       state: str = "queued", **extra: Any) -> None:
        """A claimed job joins the registry (and the control map every node polls)."""
        fields = {"job": job_id, "file": file, "owner": owner, "priority": priority,
                  "state": state, **{k: str(v) for k, v in extra.items()}}
        await self.store.pipeline([
            ("HSET", self._job(job_id), *[x for kv in fields.items() for x in kv]),
            ("ZADD", self.store.key("jobs"), int(job_id[1:]), job_id),
            ("HSET", self.store.key("control"), job_id, f"{state}:{priority}"),
            ("INCR", self.store.key("control_version"))])

    async def update(self, job_id: str, counts: Counts | None = None, **fields: Any) -> None:
        """Counts summary or other fields (rows known, planner...) of a job."""
        flat = {k: str(v) for k, v in fields.items()}
        if counts is not None:
            flat.update({k: str(v) for k, v in counts.as_dict().items()})
        if flat:
            await self.store.call("HSET", self._job(job_id), *[x for kv in flat.items() for x in kv])

    async def finish(self, job_id: str, state: str, counts: Counts) -> None:
        """The job is final: its state and counts stay listed; it leaves the control map."""
        await self.update(job_id, counts, state=state)
        await self.store.call("HDEL", self.store.key("control"), job_id)

    async def job(self, job_id: str) -> dict[str, str] | None:
        h = await self.store.call("HGETALL", self._job(job_id))
        return h or None

    async def jobs(self, last: int = 100) -> list[dict[str, str]]:
        """The `last` newest jobs, oldest first."""
        ids = await self.store.call("ZRANGE", self.store.key("jobs"), -last, -1)
        if not ids:
            return []
        return [h for h in await self.store.pipeline([("HGETALL", self._job(i)) for i in ids]) if h]

    # ------------------------------------------------------------ control

    async def control(self, job_id: str, action: str, priority: str | None = None) -> int:
        """Apply pause/resume/cancel/priority cluster-wide; returns the new control version.
        Raises UnknownJob or ControlRefused (the reason, as `alertd` prints it)."""
        if action not in ("pause", "resume", "cancel", "priority"):
            raise ValueError(f"unknown action {action!r}")
        if action == "priority" and priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}")
        version, state = await self.store.script(
            _CONTROL, [self._job(job_id), self.store.key("control"),
                       self.store.key("control_version")], [job_id, action, priority or ""])
        if version == -1:
            raise UnknownJob(f"no such job: {job_id}")
        if version == -2:
            if state in FINAL:
                raise ControlRefused(f"{job_id} is {state}: a finished job cannot be changed")
            raise ControlRefused(f"{job_id} is {state}: cannot {action} it")
        return int(version)

    async def control_version(self) -> int:
        """One GET: nodes poll it about twice a second and fetch controls() when it moved."""
        return int(await self.store.call("GET", self.store.key("control_version")) or 0)

    async def controls(self) -> dict[str, tuple[str, str]]:
        """job -> (state, priority) of every job not yet final."""
        h = await self.store.call("HGETALL", self.store.key("control"))
        return {j: tuple(v.split(":", 1)) for j, v in h.items()}  # type: ignore[misc]

    # ------------------------------------------------------------ nodes

    async def boot(self, node: str) -> int:
        """This node's run number: a restarted node is a new epoch of the same name."""
        return int(await self.store.call("INCR", self.store.key("node_epoch", node)))

    async def heartbeat(self, node: str, pid: int, epoch: int, rate: float, workers: int,
                        lease: float) -> None:
        """Every lease/3 seconds; the entry outlives three leases so a lapsed node stays
        listed (as lapsed) for a while."""
        await self.store.script(
            _HEARTBEAT, [self.store.key("node", node), self.store.key("nodes")],
            [node, pid, round(rate, 1), workers, int(lease * 3000), epoch])

    async def nodes(self) -> list[NodeInfo]:
        r = await self.store.script(_NODES, [self.store.key("nodes")], [self.store.key("node", "")])
        now = float(r[0])
        out = []
        for flat in r[1:]:
            h = dict(zip(flat[::2], flat[1::2]))
            out.append(NodeInfo(h["name"], int(h["pid"]), int(h.get("epoch", 0)),
                                max(0.0, now - float(h["hb"])), float(h["rate"]),
                                int(h["workers"])))
        return sorted(out, key=lambda n: n.name)

    async def lapsed(self, lease: float) -> list[NodeInfo]:
        """Nodes whose last heartbeat is older than `lease`: their chunks may be reclaimed."""
        return [n for n in await self.nodes() if n.age > lease]

    async def leave(self, node: str) -> None:
        """A node that stops cleanly drops out of the listing at once."""
        await self.store.pipeline([("DEL", self.store.key("node", node)),
                                   ("SREM", self.store.key("nodes"), node)])
