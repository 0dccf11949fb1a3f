"""Delivery under failure, end to end: failing ids, outages, rate limits, replays."""
from __future__ import annotations

import json
import time

from bench.gen_csv import generate
from mock_webhook.server import fails_by_hash
from tests.helpers import TIMING, get_stats, post_json
from tests.procs import poll, write_config


def rows_csv(n: int, prefix: str = "u") -> bytes:
    return b"user_id\n" + b"".join(b"%s%d\n" % (prefix.encode(), i) for i in range(n))


def offsets_of(data: bytes) -> list[int]:
    """Byte offsets of the data rows of a CSV with a header."""
    offs, pos = [], data.index(b"\n") + 1
    while pos < len(data):
        offs.append(pos)
        pos = data.index(b"\n", pos) + 1
    return offs


def test_failing_ids_are_dead_lettered_then_replayed_with_their_ids(tmp_path, mock, alertd):
    port = mock("--mode", "fail", "--fail-ratio", "0.1")
    a = alertd(write_config(tmp_path / "a.toml", port,
                                   retry={"max_attempts": 3, "base_delay": 0.01,
                                          "max_delay": 0.05}))
    data = rows_csv(5000)
    a.drop("f.csv", data)
    [s] = a.wait_summaries(1, timeout=120)
    job = s["job"]
    failing = {f"{job}:{o}" for o in offsets_of(data) if fails_by_hash(f"{job}:{o}", 0.1)}
    assert 350 < len(failing) < 650
    assert (s["delivered"], s["dead"]) == (5000 - len(failing), len(failing))
    dead = [json.loads(x) for x in (a.state / "dlq" / f"{job}.jsonl").open()]
    assert {d["id"] for d in dead} == failing
    assert all(d["attempts"] == 3 and d["status"] == 500 for d in dead)
    assert a.status()["breaker"]["opens"] == 0
    assert a.cli("verify", job).returncode == 0
    # The endpoint is fixed: a replay delivers exactly the dead ones, same ids.
    post_json(port, "/reset", {})
    post_json(port, "/control", {"mode": "ok"})
    r = a.cli("dlq", "replay", job)
    assert r.returncode == 0, r.stdout + r.stderr
    stats = get_stats(port)
    assert stats["unique"] == len(failing) and stats["duplicates"] == 0
    assert not (a.state / "dlq" / f"{job}.jsonl").exists()  # every letter left the DLQ
    # The replay is a job of its own, and what it delivered counts in the original job.
    rj = r.stdout.split(":", 1)[0]  # "j000002: replaying the dead letters of j000001"
    replay = json.loads((a.state / "done" / f"{rj}.summary.json").read_text())
    assert (replay["kind"], replay["replay_of"], replay["rows"], replay["delivered"]) == \
        ("replay", job, len(failing), len(failing))
    after = json.loads((a.state / "done" / f"{job}.summary.json").read_text())
    assert (after["delivered"], after["dead"], after["replayed"]) == (5000, 0, len(failing))
    assert a.cli("verify", job).returncode == 0  # a replay is not a second final outcome
    assert a.cli("verify", rj).returncode == 0  # one final outcome per letter
    again = a.cli("dlq", "replay", job)
    assert again.returncode == 1 and "has no dead letters" in again.stderr


def test_an_outage_opens_the_breaker_instead_of_filling_the_dlq(tmp_path, mock, alertd):
    port = mock("--mode", "fail")  # every id gets 500: the endpoint is down
    a = alertd(write_config(tmp_path / "a.toml", port,
                                   retry={"max_attempts": 3, "base_delay": 0.01}))
    a.drop("o.csv", rows_csv(3000))
    poll(lambda: a.status()["breaker"]["state"] == "open", 30, "the breaker to open")
    before = get_stats(port)["received"]
    t0 = time.monotonic()
    time.sleep(3)  # measuring a rate over a fixed window, not synchronising
    during = get_stats(port)["received"] - before
    rate = during / (time.monotonic() - t0)
    print(f"breaker open: {rate:.1f} requests/s")
    assert rate <= 5, f"{rate:.1f} requests/s while the breaker is open"
    dead_lines = sum(1 for _ in open(a.state / "dlq" / "j000001.jsonl")) \
        if (a.state / "dlq" / "j000001.jsonl").exists() else 0
    assert dead_lines <= 10
    post_json(port, "/control", {"mode": "ok"})
    [s] = a.wait_summaries(1, timeout=60)
    assert s["delivered"] + s["dead"] == 3000 and s["dead"] <= 10
    assert a.status()["breaker"]["state"] == "closed"


def test_an_outage_longer_than_max_age_dead_letters_and_completes(tmp_path, mock, alertd):
    port = mock("--mode", "fail")
    a = alertd(write_config(tmp_path / "a.toml", port,
                                   retry={"max_attempts": 3, "base_delay": 0.01,
                                          "max_age": 3.0}))
    a.drop("o.csv", rows_csv(2000))
    [s] = a.wait_summaries(1, timeout=60)
    assert (s["delivered"], s["dead"]) == (0, 2000)
    dead = [json.loads(x) for x in open(a.state / "dlq" / f"{s['job']}.jsonl")]
    assert len(dead) == 2000
    assert any("max_age" in d["error"] for d in dead)
    assert get_stats(port)["received"] < 600  # no request storm before giving up


def test_endpoint_down_for_20_s_mid_job(tmp_path, mock, alertd):
    port = mock()
    a = alertd(write_config(tmp_path / "a.toml", port, rate={"limit": 2000},
                                   retry={"max_attempts": 3, "base_delay": 0.05}))
    generate(str(a.cfg.paths.inbox_dir / "d.csv"), 40_000, seed=4)
    poll(lambda: a.delivered_now() > 5000, 60, "delivery to start")
    mock.stop(port)
    sent = a.sent_now
    start = sent()
    time.sleep(20)  # the outage itself
    attempts = sent() - start
    mock("--port", str(port))
    [s] = a.wait_summaries(1, timeout=120)
    assert (s["delivered"], s["dead"]) == (40_000, 0)
    # Requests in flight when it went down, their few retries, then ~2 probes/s.
    print(f"outage: {attempts} requests attempted during the 20 s outage")
    assert attempts <= 2 * 64 * 3 + 20 * 3, attempts
    assert a.cli("verify", s["job"]).returncode == 0


@TIMING
def test_adaptive_rate_settles_below_the_receivers_limit(tmp_path, mock, alertd):
    port = mock("--mode", "ratelimit", "--rate", "1000")
    a = alertd(write_config(tmp_path / "a.toml", port,
                                   rate={"limit": 2000, "adaptive": True}))
    generate(str(a.cfg.paths.inbox_dir / "r.csv"), 15_000, seed=8)
    [s] = a.wait_summaries(1, timeout=90)
    assert (s["delivered"], s["dead"]) == (15_000, 0)
    stats = get_stats(port)
    ratio = stats["by_status"].get("429", 0) / stats["received"]
    print(f"adaptive: {stats['by_status'].get('429', 0)} × 429 of {stats['received']} "
          f"requests ({100 * ratio:.2f}%) in {s['duration_s']} s")
    assert ratio < 0.02, stats
