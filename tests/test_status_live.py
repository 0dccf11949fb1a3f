"""Live job counts, rate and ETA in /v1/status of a real `alertd run`, measured against
what a real mock webhook received during a rate-limited 200,000-row job: sampled over its
first WATCH seconds (the rest would only repeat them), then cancelled."""
from __future__ import annotations

import time

from bench.gen_csv import generate
from tests.helpers import TIMING, get_stats
from tests.procs import poll, write_config

ROWS = 200_000
LIMIT = 3_000
WATCH = 28.0  # seconds sampled: 10 s of start-up, then the steady rate and a falling ETA


@TIMING
def test_live_counts_rate_and_eta_follow_the_receiver(tmp_path, mock, alertd):
    port = mock()
    a = alertd(write_config(tmp_path / "alertd.toml", port, rate={"limit": LIMIT}))
    generate(str(a.cfg.paths.inbox_dir / "big.csv"), ROWS, seed=7)
    poll(lambda: a.status()["jobs"] and get_stats(port)["unique"] > 0, 30, "the job to start")
    t0 = time.monotonic()
    samples = []  # (t, receiver's unique, live delivered, durable delivered, rate, eta_s)
    deadline = t0 + WATCH
    next_at = t0
    while time.monotonic() < deadline:
        next_at += 1.0
        time.sleep(max(0.0, next_at - time.monotonic()))  # sampling period, not a sync
        unique = get_stats(port)["unique"]
        st = a.status()
        if not st["jobs"]:
            break
        [j] = st["jobs"]
        samples.append((time.monotonic() - t0, unique, j["live"]["delivered"], j["delivered"],
                        j["rate"], j["eta_s"]))
    assert a.cli("cancel", j["job"]).returncode == 0
    a.wait_summaries(1)
    print("\n   t  receiver      live   durable    rate    eta")
    for t, unique, live, durable, rate, eta in samples:
        print(f"{t:4.0f} {unique:9,} {live:9,} {durable:9,} {rate:7.0f} {eta!s:>6}")
    assert len(samples) >= WATCH - 3, "the job takes about 67 s at 3,000/s"

    # Live counts: within 2 s worth of the receiver at every sample, and ahead of durable.
    gaps = [unique - live for _, unique, live, *_ in samples]
    assert max(abs(g) for g in gaps) <= 2 * LIMIT, gaps
    assert any(live > durable for _, _, live, durable, *_ in samples)

    # Steady part: after the first 10 s.
    steady = [s for s in samples if s[0] >= 10]
    assert len(steady) >= WATCH - 13, len(steady)
    rates = [s[4] for s in steady]
    assert all(abs(r - LIMIT) <= 0.15 * LIMIT for r in rates), rates
    etas = [(s[0], s[5]) for s in steady]
    assert all(e is not None for _, e in etas), etas
    for (t1, e1), (t2, e2) in zip(etas, etas[1:]):
        assert e2 <= e1 + 1.0, f"ETA rose from {e1} to {e2} at {t2:.0f} s"
        expect = e1 - (t2 - t1)
        assert abs(e2 - expect) <= 0.2 * e1 + 1.0, f"ETA jumped from {e1} to {e2} at {t2:.0f} s"
    # The ETA is what is left at the rate the job gets: the rows pending over the limit.
    t, _, live, _, _, eta = steady[-1]
    assert abs(eta - (ROWS - live) / LIMIT) <= 0.1 * eta + 2, (t, live, eta)
