"""Prometheus text exposition (format 0.0.4, written by prometheus_client) of an enriched
status document.

Pure function of the document status.py builds: no state, no I/O. Labels are
bounded (outcome, result, worker index, active job); never a secret or a URL.
"""
from __future__ import annotations

import math
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes
OUTCOMES = ("delivered", "rejected", "dead", "cancelled", "possible_duplicates")
JOB_STATES = ("queued", "running", "paused", "complete", "cancelled", "failed")
BREAKER = {"closed": 0, "open": 1}  # while open, probes go out: no separate half-open state

Samples = list[tuple[dict[str, object], "float | int | None"]]


class _Out:
    """The families of one document, as prometheus_client's collector interface wants them:
    escaping, number formatting and the text format are the library's, not ours."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def family(self, name: str, kind: str, help_: str, samples: Samples) -> None:
        cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        names = sorted({k for labels, _ in samples for k in labels})
        fam = cls(name, help_, labels=names)
        for labels, value in samples:
            fam.add_metric([str(labels[k]) for k in names],
                           math.nan if value is None else float(value))
        self.families.append(fam)

    def collect(self) -> list[Metric]:
        return self.families


def render(doc: dict[str, Any]) -> str:
    """The /metrics body for one enriched /v1/status document."""
    o = _Out()
    t = doc["totals"]
    o.family("alertd_rows_total", "counter",
             "Rows with a final outcome in jobs handled since start (active jobs: as of "
             "their last acknowledged chunk).",
             [({"outcome": k}, t[k]) for k in ("delivered", "rejected", "dead", "cancelled")])
    o.family("alertd_rows_replayed_total", "counter",
             "Dead letters delivered by replay jobs (also counted in "
             "alertd_rows_total{outcome=\"delivered\"}, and under dead when they first failed).",
             [({}, t.get("replayed", 0))])
    o.family("alertd_possible_duplicates_total", "counter",
             "Delivered rows whose request may have reached the endpoint more than once.",
             [({}, t["possible_duplicates"])])
    o.family("alertd_requests_sent_total", "counter",
             "HTTP requests sent to the webhook (attempts, retries included).",
             [({}, t["requests_sent"])])
    o.family("alertd_deliveries_total", "counter",
             "Rows delivered, counted by the workers as responses arrive (ahead of acks).",
             [({}, t["delivered_live"])])
    o.family("alertd_delivery_rate", "gauge",
             "Rows delivered per second over the last few seconds.",
             [({}, doc["delivery_rate"])])
    workers = doc["workers"]
    o.family("alertd_in_flight_requests", "gauge", "Requests awaiting a response now.",
             [({}, sum(w["in_flight"] for w in workers))])
    o.family("alertd_pending_rows", "gauge",
             "Rows read by workers but not final yet (in flight or awaiting a retry).",
             [({}, sum(w["pending"] for w in workers))])
    o.family("alertd_workers", "gauge", "Worker processes running (retiring ones included).",
             [({}, len(workers))])
    o.family("alertd_worker_rss_bytes", "gauge", "Resident memory per process.",
             [({"process": f"worker-{w['index']}"}, w["rss_bytes"]) for w in workers]
             + [({"process": "supervisor"}, doc["supervisor"]["rss_bytes"])])
    o.family("alertd_worker_cpu_percent", "gauge",
             "CPU use per process since the previous status sample (100 = one core).",
             [({"process": f"worker-{w['index']}"}, w["cpu_percent"]) for w in workers]
             + [({"process": "supervisor"}, doc["supervisor"]["cpu_percent"])])
    rate = doc["rate"]
    o.family("alertd_rate_limit", "gauge", "Configured requests per second; 0 = unlimited.",
             [({}, rate["limit"])])
    o.family("alertd_rate_paused_seconds", "gauge",
             "Seconds until sending resumes after a 429 Retry-After; 0 = not paused.",
             [({}, rate["paused_for"])])
    br = doc["breaker"]
    o.family("alertd_breaker_state", "gauge",
             "Circuit breaker shared by the workers: 0 closed, 1 open (only probes go out).",
             [({}, BREAKER.get(br["state"], -1))])
    if "opens" in br:
        o.family("alertd_breaker_opens_total", "counter", "Times the circuit breaker opened.",
                 [({}, br["opens"])])
    rl = doc["reload"]
    o.family("alertd_reloads_total", "counter", "Config reloads (SIGHUP) by result.",
             [({"result": "success"}, rl["succeeded"]), ({"result": "failure"}, rl["failed"])])
    o.family("alertd_last_reload_success", "gauge",
             "1 if the last reload applied, 0 if it failed; NaN before any reload.",
             [({}, None if rl["ok"] is None else int(rl["ok"]))])
    jobs = doc["jobs"]
    o.family("alertd_jobs_active", "gauge", "Jobs claimed and not final.", [({}, len(jobs))])
    states = dict.fromkeys(JOB_STATES, 0)
    for j in jobs:
        states[j.get("state", "running")] = states.get(j.get("state", "running"), 0) + 1
    for s in doc.get("finished", []):
        states[s.get("status", "complete")] = states.get(s.get("status", "complete"), 0) + 1
    o.family("alertd_jobs", "gauge",
             "Jobs by state: the active ones, and those finished since start that status "
             "still lists.", [({"state": k}, v) for k, v in states.items()])
    o.family("alertd_job_progress_ratio", "gauge", "Share of an active job's bytes done.",
             [({"job": j["job"]}, j["progress"]) for j in jobs])
    o.family("alertd_draining", "gauge", "1 while stopping.", [({}, int(doc["draining"]))])
    cl = doc.get("cluster")
    if cl is not None:
        o.family("alertd_cluster_nodes", "gauge",
                 "Nodes with a heartbeat in Redis (lapsed ones included until they expire).",
                 [({}, len(cl["nodes"]))])
        o.family("alertd_redis_up", "gauge", "1 if this node's last Redis command succeeded.",
                 [({}, int(cl["redis"] == "up"))])
        o.family("alertd_redis_commands_total", "counter",
                 "Redis commands this node sent (round trips; a script counts once).",
                 [({}, cl["commands"])])
        o.family("alertd_cluster_planner", "gauge", "1 if this node plans the cluster's jobs.",
                 [({}, int(cl.get("planner", False)))])
    o.family("alertd_start_time_seconds", "gauge", "Unix time the daemon started.",
             [({}, float(doc["started_at"]))])
    return generate_latest(o).decode()
