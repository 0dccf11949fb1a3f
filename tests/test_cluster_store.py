"""The Redis store against a real redis-server taken down and brought back; the config
fingerprint; the [cluster] config section."""
from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest
from alertd import config
from alertd.cluster.fingerprint import (
    ConfigMismatch,
    check_fingerprint,
    cluster_config_fingerprint,
)
from alertd.cluster.store import RedisDown, Refused, Store
from alertd.errors import ConfigError

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_redis_down_fails_fast_and_comes_back_by_itself(redis):
    async def run() -> None:
        s = Store(redis.url, timeout=1.0)
        assert await s.call("SET", s.key("x"), "1") is True and s.up
        redis.kill9()
        for _ in range(20):  # every call fails within the timeout, never hangs
            t = time.monotonic()
            with pytest.raises(RedisDown) as err:
                await s.call("GET", s.key("x"))
            assert time.monotonic() - t < 1.5
        assert str(err.value).startswith(f"redis unreachable at {redis.url}: ")
        assert "\n" not in str(err.value) and not s.up and s.error == str(err.value)
        assert await s.ping() is False  # for status and /healthz: never raises
        sent = s.commands
        with pytest.raises(RedisDown):
            await s.call("GET", s.key("x"))
        assert s.commands == sent  # inside the backoff: not even sent
        redis.start()
        deadline = time.monotonic() + 5
        while not await s.ping():
            assert time.monotonic() < deadline, "the store did not come back"
            await asyncio.sleep(0.05)
        assert s.up and s.error is None
        assert await s.call("GET", s.key("x")) == "1"  # AOF: the write survived kill -9
        await s.close()
    asyncio.run(run())


def test_a_stopped_redis_answers_within_the_timeout(redis):
    async def run() -> None:
        redis.proc.send_signal(19)  # SIGSTOP: connected, but nothing answers
        try:
            s = Store(redis.url, timeout=0.5)
            t = time.monotonic()
            with pytest.raises(RedisDown, match="no answer within 0.5 s"):
                await s.call("PING")
            assert time.monotonic() - t < 1.0
        finally:
            redis.proc.send_signal(18)  # SIGCONT
        await s.close()
    asyncio.run(run())


def test_a_refused_command_is_one_exception_without_backoff(redis):
    async def run() -> None:
        s = Store(redis.url)
        await s.call("SET", s.key("str"), "x")
        with pytest.raises(Refused, match="WRONGTYPE"):
            await s.call("HGET", s.key("str"), "f")
        assert s.up and await s.call("GET", s.key("str")) == "x"
        assert s.key("a", "b") == "alertd:{main}:a:b"
        assert Store(redis.url, cluster="eu").key("jobseq") == "alertd:{eu}:jobseq"
        await s.close()
    asyncio.run(run())


def test_the_url_password_never_shows(redis):
    s = Store(f"redis://:hunter2@127.0.0.1:{redis.port}/0")
    assert "hunter2" not in s.shown
    with pytest.raises(ValueError, match="not a redis://"):
        Store("http://127.0.0.1:1/")


# ---------------------------------------------------------------- fingerprint


def _cfg(tmp_path: Path, **sections) -> config.Config:
    raw = {"paths": {"state_dir": str(tmp_path)},
           "webhook": {"url": "http://127.0.0.1:9000/hook", "secrets": [SECRET],
                       "headers": {"Authorization": "Bearer abc"}},
           "rate": {"limit": 6000}}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return config.from_dict(raw, tmp_path)


def test_fingerprint_same_config_joins_a_different_rate_is_named(redis, tmp_path):
    async def run() -> None:
        s = Store(redis.url)
        a = _cfg(tmp_path, cluster={"node": "host-a"})
        fp = cluster_config_fingerprint(a)
        assert SECRET not in fp and "abc" not in fp and "6000" not in fp
        await check_fingerprint(s, fp, "host-a")
        # Another node: other name, other status socket: the same cluster config.
        b = _cfg(tmp_path, cluster={"node": "host-b"}, status={"listen": "b.sock"})
        await check_fingerprint(s, cluster_config_fingerprint(b), "host-b")
        c = _cfg(tmp_path, rate={"limit": 5000})
        with pytest.raises(ConfigMismatch, match=r"config: \[rate\] differs from the cluster's "
                           r"\(as node host-a first ran it\)") as err:
            await check_fingerprint(s, cluster_config_fingerprint(c), "host-c")
        assert isinstance(err.value, ConfigError)  # the CLI's exit 2
        d = _cfg(tmp_path, rate={"limit": 5000}, webhook={"secrets": []})
        with pytest.raises(ConfigMismatch, match=r"\[rate\] and \[webhook\] differ"):
            await check_fingerprint(s, cluster_config_fingerprint(d), "host-d")
        stored = redis.client().hgetall(s.key("fingerprint"))
        assert stored == {"fp": fp, "node": "host-a"}  # digests only
        await s.close()
    asyncio.run(run())


def test_fingerprint_reads_tls_files_by_content_not_path(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    base = _cfg(tmp_path)
    fps = []
    for d in ("a", "b"):
        ca = tmp_path / d / "ca.pem"
        ca.write_text("same bytes")
        fps.append(cluster_config_fingerprint(dataclasses.replace(
            base, webhook=dataclasses.replace(base.webhook, ca_file=ca))))
    assert fps[0] == fps[1]
    (tmp_path / "b" / "ca.pem").write_text("other bytes")
    changed = cluster_config_fingerprint(dataclasses.replace(
        base, webhook=dataclasses.replace(base.webhook, ca_file=tmp_path / "b" / "ca.pem")))
    assert changed.split(";")[0] == fps[0].split(";")[0] and changed != fps[0]


# ---------------------------------------------------------------- [cluster] config


def test_cluster_section_defaults_and_errors(tmp_path):
    c = _cfg(tmp_path)
    assert c.cluster.redis == "" and c.cluster.lease == 15.0 and c.cluster.node
    c = _cfg(tmp_path, cluster={"redis": "redis://:pw@10.0.0.5:6379/0", "node": "host-a",
                                "lease": 30})
    assert (c.cluster.node, c.cluster.lease) == ("host-a", 30.0) and "pw" not in repr(c)
    assert _cfg(tmp_path, cluster={"redis": "unix:///run/redis/redis.sock"}).cluster.redis
    assert _cfg(tmp_path, cluster={"redis": "rediss://cache.internal:6380"}).cluster.redis
    for raw, msg in [({"redis": "http://10.0.0.5"}, r"\[cluster\] redis must be a redis://"),
                     ({"redis": "redis://:pw@h:99999"}, r"\[cluster\] redis has a bad port"),
                     ({"redis": "10.0.0.5:6379"}, r"\[cluster\] redis must be"),
                     ({"lease": 0}, r"\[cluster\] lease must be > 0"),
                     ({"node": "host a"}, r"\[cluster\] node must be"),
                     ({"nodes": 3}, r"\[cluster\] unknown key 'nodes'")]:
        with pytest.raises(ConfigError, match=msg) as err:
            _cfg(tmp_path, cluster=raw)
        assert "pw" not in str(err.value)
