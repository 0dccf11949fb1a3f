"""The printed result: markdown tables (paste-ready for the README) and the targets.

Reads only the results dict that run.py also writes as JSON; never measures.
"""
from __future__ import annotations

from typing import Any

# The performance targets (the "check | target" table in the README's Performance section),
# checked here so every run says where it stands.
TARGET_WRK_RATIO = 0.6
TARGET_BASELINE_RATIO = 6.0
TARGET_CPU_X_WRK = 2.0  # alertd's CPU per delivery over wrk's own per request, same run
TARGET_RSS_MB = 250.0
TARGET_FIRST_MS = 100.0
TARGET_RATE_TOLERANCE = 0.01
TARGET_MOCK_RATIO = 0.8  # alertd against the mock vs against nginx, same run
TARGET_SMALL_FILES = 500.0  # 10-row files/s, first rename to last summary


def _n(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def throughput_table(r: dict[str, Any]) -> list[str]:
    wrk = r.get("wrk", {}).get("requests_per_s")
    base = r.get("baseline", {}).get("deliveries_per_s")
    out = [_row(["run", "deliveries/s", "× wrk", "× baseline", "CPU µs/delivery",
                 "peak RSS MB", "rows", "seconds"]),
           _row(["---"] + ["---:"] * 7)]
    if wrk is not None:
        w = r["wrk"]
        out.append(_row([f"wrk → nginx (ceiling, {w['threads']} threads, {w['connections']} conns)",
                         f"{_n(wrk)} req/s", "1.00", _n(_ratio(wrk, base), 1),
                         f"{_n(w.get('cpu_us_per_request'), 1)} (wrk's own, per request)", "–",
                         "–", _n(w["seconds"], 0)]))
    if base is not None:
        b = r["baseline"]
        out.append(_row(["naive baseline (aiohttp, 64 in flight)", _n(base),
                         _n(_ratio(base, wrk), 2), "1.0", _n(b.get("cpu_us_per_delivery"), 1),
                         _n(b.get("peak_rss_mb"), 0), _n(b["rows"]), _n(b["seconds"], 1)]))
    for a in r.get("alertd", []):
        name = run_name(a)
        if not a.get("complete", True):
            name += " (incomplete: timed out)"
        rows = a.get("summary", {}).get("delivered", a.get("delivered"))
        out.append(_row([name, _n(a["deliveries_per_s"]), _n(_ratio(a["deliveries_per_s"], wrk), 2),
                         _n(_ratio(a["deliveries_per_s"], base), 1),
                         _n(a.get("cpu_us_per_delivery"), 1), _n(a.get("peak_rss_mb"), 0),
                         _n(rows), _n(a.get("duration_s"), 1)]))
    m = r.get("alertd_mock")
    if m:
        mk = m.get("mock", {})
        name = f"alertd, {m['workers']} workers → mock ({mk.get('engine')} engine"
        name += f", {_n(mk.get('cpu_us_per_request'), 1)} µs CPU/request)"
        if not m.get("complete", True):
            name += " (incomplete: timed out)"
        if not m.get("counts_ok"):
            name += " (COUNTS WRONG)"
        rows = m.get("summary", {}).get("delivered", m.get("delivered"))
        out.append(_row([name, _n(m["deliveries_per_s"]), _n(_ratio(m["deliveries_per_s"], wrk), 2),
                         _n(_ratio(m["deliveries_per_s"], base), 1),
                         _n(m.get("cpu_us_per_delivery"), 1), _n(m.get("peak_rss_mb"), 0),
                         _n(rows), _n(m.get("duration_s"), 1)]))
    return out


def run_name(a: dict[str, Any]) -> str:
    name = f"alertd, {a['workers']} worker{'s' if a['workers'] > 1 else ''}"
    return name + (f", pipeline {a['pipeline']}" if a.get("pipeline", 1) > 1 else "")


def mock_ratio(r: dict[str, Any]) -> float | None:
    """alertd (2 workers) against the mock over alertd against nginx, in the same run."""
    m = r.get("alertd_mock")
    two = next((a for a in r.get("alertd", []) if a["workers"] == 2), None)
    return _ratio(m["deliveries_per_s"], two["deliveries_per_s"]) if m and two else None


def cpu_table(r: dict[str, Any]) -> list[str]:
    """µs of CPU per delivery by process role and user/kernel: where the time goes."""
    runs = [a for a in r.get("alertd", []) if a.get("cpu_split_s")]
    if not runs:
        return []
    keys = ["workers_user", "workers_sys", "supervisor_user", "supervisor_sys"]
    out = [_row(["CPU µs/delivery", *[k.replace("_", " ") for k in keys], "total"]),
           _row(["---"] + ["---:"] * (len(keys) + 1))]
    for a in runs:
        n = a.get("summary", {}).get("delivered", a.get("delivered")) or 1
        cells = [a["cpu_split_s"][k] / n * 1e6 for k in keys]
        out.append(_row([run_name(a), *[_n(c, 1) for c in cells], _n(sum(cells), 1)]))
    return out


def first_request_table(r: dict[str, Any]) -> list[str]:
    runs = r.get("first_request", [])
    if not runs:
        return []
    out = [_row(["file", "first request ms", "peak RSS MB", "deliveries in run", "seconds"]),
           _row(["---", "---:", "---:", "---:", "---:"])]
    for f in runs:
        out.append(_row([f"{f['file_bytes'] / 1e6:,.0f} MB", _n(f["first_request_ms"], 1),
                         _n(f["peak_rss_mb"], 0), _n(f["delivered"]), _n(f["seconds"], 1)]))
    return out


def rate_table(r: dict[str, Any]) -> list[str]:
    q = r.get("rate")
    if not q:
        return []
    return [_row(["configured/s", "achieved/s", "achieved/configured", "window s", "429s"]),
            _row(["---:"] * 5),
            _row([_n(q["configured"]), _n(q["achieved_per_s"], 1), f"{q['ratio']:.4f}",
                  _n(q["window_s"], 1), _n(q["http_429"])])]


def micro_table(r: dict[str, Any]) -> list[str]:
    ms = r.get("micro", [])
    if not ms:
        return []
    out = [_row(["micro-benchmark", "mean µs", "median µs", "µs per row"]),
           _row(["---", "---:", "---:", "---:"])]
    for m in ms:
        per = m["mean_us"] / m["rows_per_call"] if m.get("rows_per_call") else None
        out.append(_row([m["name"], _n(m["mean_us"], 2), _n(m["median_us"], 2), _n(per, 3)]))
    return out


def targets(r: dict[str, Any]) -> list[str]:
    """One line per performance target (the TARGET_* constants): met or not, with the figure."""
    wrk = r.get("wrk", {}).get("requests_per_s")
    wrk_cpu = r.get("wrk", {}).get("cpu_us_per_request")
    base = r.get("baseline", {}).get("deliveries_per_s")
    two = next((a for a in r.get("alertd", []) if a["workers"] == 2), None)
    piped = next((a for a in r.get("alertd", []) if a.get("pipeline", 1) > 1), None)
    lines = []

    def mark(ok: bool | None) -> str:
        return "n/a " if ok is None else ("met " if ok else "MISS")

    if two:
        d = two["deliveries_per_s"]
        rw, rb = _ratio(d, wrk), _ratio(d, base)
        lines.append(f"{mark(rw is not None and rw >= TARGET_WRK_RATIO)} 2 workers ≥ "
                     f"{TARGET_WRK_RATIO} × wrk: {_n(rw, 2)} × wrk ({_n(d)} vs {_n(wrk)}/s)")
    if piped:
        rp = _ratio(piped["deliveries_per_s"], wrk)
        lines.append(f"{mark(rp is not None and rp >= TARGET_WRK_RATIO)} 2 workers, pipeline "
                     f"{piped['pipeline']}, ≥ {TARGET_WRK_RATIO} × wrk: {_n(rp, 2)} × wrk")
    if two:
        lines.append(f"{mark(rb is not None and rb >= TARGET_BASELINE_RATIO)} 2 workers ≥ 6 × "
                     f"baseline: {_n(rb, 1)} ×")
    runs = [a for a in r.get("alertd", []) if "cpu_us_per_delivery" in a]
    for a in runs:
        x = _ratio(a["cpu_us_per_delivery"], wrk_cpu)
        lines.append(f"{mark(None if x is None else x <= TARGET_CPU_X_WRK)} CPU per delivery ≤ "
                     f"{TARGET_CPU_X_WRK:g} × wrk's per request, {run_name(a)}: "
                     f"{_n(a['cpu_us_per_delivery'], 1)} µs vs wrk {_n(wrk_cpu, 1)} µs = {_n(x, 2)} ×")
    firsts = r.get("first_request", [])
    if firsts:
        big = max(firsts, key=lambda f: f["file_bytes"])
        small = min(firsts, key=lambda f: f["file_bytes"])
        rss_ok = big["peak_rss_mb"] <= TARGET_RSS_MB
        lines.append(f"{mark(rss_ok)} peak RSS ≤ 250 MB ({big['file_bytes'] / 1e6:,.0f} MB file): "
                     f"{_n(big['peak_rss_mb'])} MB vs {_n(small['peak_rss_mb'])} MB for "
                     f"{small['file_bytes'] / 1e6:,.0f} MB")
        ms = big["first_request_ms"]
        lines.append(f"{mark(None if ms is None else ms <= TARGET_FIRST_MS)} first request ≤ "
                     f"100 ms: {_n(ms, 1)} ms")
    m = r.get("alertd_mock")
    if m:
        x = mock_ratio(r)
        mk = m.get("mock", {})
        lines.append(f"{mark(None if x is None else x >= TARGET_MOCK_RATIO and m.get('counts_ok'))} "
                     f"alertd vs the mock ≥ 0.8 × alertd vs nginx: {_n(x, 2)} × "
                     f"({_n(m['deliveries_per_s'])} vs {_n(two['deliveries_per_s']) if two else '–'}/s; "
                     f"mock saw {_n(mk.get('unique'))} unique, {_n(mk.get('duplicates'))} duplicates, "
                     f"{_n(mk.get('bad_signatures'))} bad signatures)")
    q = r.get("rate")
    if q:
        ok = abs(q["ratio"] - 1) <= TARGET_RATE_TOLERANCE and q["http_429"] == 0
        lines.append(f"{mark(ok)} rate within ±1 %, zero 429s: {q['ratio']:.4f}, "
                     f"{q['http_429']} × 429")
    f = r.get("small_files")
    if f:
        ok = (f["complete"] and f["rows_delivered"] == f["rows_expected"]
              and f["files_per_s"] >= TARGET_SMALL_FILES)
        lines.append(f"{mark(ok)} small files ≥ 500 files/s ({f['rows_per_file']} rows each): "
                     f"{_n(f['files_per_s'], 1)} files/s, {_n(f['jobs_finished'])} of "
                     f"{_n(f['files'])} jobs, {_n(f['rows_delivered'])} of "
                     f"{_n(f['rows_expected'])} rows in {_n(f['duration_s'], 1)} s")
    return lines


def render(r: dict[str, Any]) -> str:
    host = r.get("host", {})
    parts = [f"### alertd benchmark, {r.get('started_at', '')}"
             + (" (--quick)" if r.get("quick") else ""), "",
             f"{host.get('cpus')} CPUs, {host.get('python')}, {host.get('nginx')}, "
             f"load average {host.get('load_before')} before, {host.get('load_after')} after", ""]
    for table in (throughput_table(r), cpu_table(r), first_request_table(r), rate_table(r), micro_table(r)):
        if table:
            parts += table + [""]
    t = targets(r)
    if t:
        parts += ["Targets:", ""] + [f"- {x}" for x in t] + [""]
    timings = r.get("timings", {})
    if timings:
        parts.append("Time per phase (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    return "\n".join(parts)
