"""Node heartbeats: every node's name, pid, run number, rate and workers, with ages
computed from Redis TIME (the one clock all nodes agree on). Job control across nodes
is relay.py's. It never touches the state directory.
"""
from __future__ import annotations

from dataclasses import dataclass

from .store import Script, Store

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
