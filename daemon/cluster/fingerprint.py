"""Every node must send to the same endpoint under the same budget: a fingerprint of
the config sections that must agree ([rate], [webhook]) is kept in Redis by the first
node, and a node with another one is refused with the section named.

Only digests are stored: each section is hashed with scrypt (slow on purpose, so a
short Authorization header cannot be guessed back from Redis). TLS files count by their
contents, not their paths, and secrets_file not at all (its secrets are in `secrets`):
nodes may keep them in different places.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import orjson

from ..config import Config
from ..errors import ConfigError
from .store import Script, Store

SECTIONS = ("rate", "webhook")
_BY_CONTENT = ("ca_file", "client_cert", "client_key")
_LEFT_OUT = ("secrets_file",)

# KEYS[1] fingerprint hash. ARGV: fp, node. Sets it if absent; returns {fp, node} held.
_CHECK = Script("""
redis.call('HSETNX', KEYS[1], 'fp', ARGV[1])
redis.call('HSETNX', KEYS[1], 'node', ARGV[2])
return redis.call('HMGET', KEYS[1], 'fp', 'node')
""")


class ConfigMismatch(ConfigError):
    """This node's [rate] or [webhook] differs from the cluster's (the CLI exits 2)."""


def _value(name: str, v: Any) -> Any:
    if name in _BY_CONTENT and v is not None:
        try:
            return hashlib.sha256(Path(v).read_bytes()).hexdigest()
        except OSError as e:
            return f"unreadable: {e.strerror}"
    return v


def _digest(section: Any) -> str:
    doc = {f.name: _value(f.name, getattr(section, f.name)) for f in dataclasses.fields(section)
           if f.name not in _LEFT_OUT}
    raw = orjson.dumps(doc, default=str, option=orjson.OPT_SORT_KEYS)
    return hashlib.scrypt(raw, salt=b"alertd cluster fingerprint", n=1 << 14, r=8, p=1,
                          dklen=16).hex()


def cluster_config_fingerprint(cfg: Config) -> str:
    """`rate=<hex>;webhook=<hex>`: equal for configs that may run in one cluster."""
    return ";".join(f"{name}={_digest(getattr(cfg, name))}" for name in SECTIONS)


def _parts(fp: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in fp.split(";") if "=" in p)


async def check_fingerprint(store: Store, fp: str, node: str) -> None:
    """The first node sets the cluster's fingerprint; a later one must match it.
    Raises ConfigMismatch naming the differing sections (RedisDown if unreachable)."""
    held, first = await store.script(_CHECK, [store.key("fingerprint")], [fp, node])
    if held == fp:
        return
    mine, theirs = _parts(fp), _parts(held)
    differ = [s for s in SECTIONS if mine.get(s) != theirs.get(s)] or list(SECTIONS)
    names = " and ".join(f"[{s}]" for s in differ)
    raise ConfigMismatch(
        f"config: {names} {'differs' if len(differ) == 1 else 'differ'} from the cluster's "
        f"(as node {first} first ran it): every node needs the same [rate] and [webhook]; "
        f"only [cluster] node and [status] may differ")
