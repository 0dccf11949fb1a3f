"""The status API of a real `alertd run`: /v1/status against docs/openapi.yaml, /metrics
through prometheus_client's parser, bearer auth on TCP, and no secret anywhere."""
from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.gen_csv import generate
from tests.helpers import start_mock, stop_process
from tests.procs import ROOT, SECRET, Alertd, poll, write_config

TOKEN = "tok-7f3a9c1e5b2d4068a1b3c5d7e9f01234"
HEADER_SECRET = "Bearer hdr-secret-5e8d1c7b9a2f4e6d"
OPENAPI = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, token: str | None = None) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type", ""), r.read().decode()
    finally:
        conn.close()


def post(port: int, path: str, body: bytes, token: str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        h = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request("POST", path, body=body, headers={**h, **(headers or {})})
        r = conn.getresponse()
        return r.status, r.headers, r.read()
    finally:
        conn.close()


def _json_schema_node(node: Any) -> Any:
    """An OpenAPI 3.0 schema object as plain JSON Schema.

    OpenAPI 3.0 schema objects are JSON Schema plus `nullable`; that is the only
    3.0-only keyword the file uses, so translating it is all a standard
    validator needs (asserted below, so a new keyword cannot slip past)."""
    if isinstance(node, list):
        return [_json_schema_node(x) for x in node]
    if not isinstance(node, dict):
        return node
    assert not {"discriminator", "xml", "externalDocs", "example"} & node.keys()
    out = {k: _json_schema_node(v) for k, v in node.items() if k not in ("nullable", "description")}
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if "$ref" in out:
        out["$ref"] = out["$ref"].replace("#/components/schemas/", "#/$defs/")
    return out


def json_schema(name: str) -> dict[str, Any]:
    """docs/openapi.yaml's schema `name` as plain JSON Schema."""
    defs = {k: _json_schema_node(v) for k, v in OPENAPI["components"]["schemas"].items()}
    return {"$ref": f"#/$defs/{name}", "$defs": defs}


def validate_response(path: str, method: str, status: int, headers: Any, body: bytes) -> Any:
    """A live response checked against what docs/openapi.yaml says `method path` answers
    with `status`: documented at all, its JSON body, its documented headers. The body."""
    responses = OPENAPI["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method} {path}: {status} is not documented"
    resp = responses[str(status)]
    if "$ref" in resp:
        resp = OPENAPI["components"]["responses"][resp["$ref"].rsplit("/", 1)[1]]
    for h in resp.get("headers", {}):
        assert headers.get(h) is not None, f"{method} {path} {status}: no {h} header"
        if resp["headers"][h]["schema"]["type"] == "integer":
            assert int(headers.get(h)) >= resp["headers"][h]["schema"].get("minimum", 0)
    assert headers.get("Content-Type", "").startswith("application/json")
    doc = json.loads(body)
    defs = {k: _json_schema_node(v) for k, v in OPENAPI["components"]["schemas"].items()}
    schema = {**_json_schema_node(resp["content"]["application/json"]["schema"]), "$defs": defs}
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(doc)
    return doc


def validate(doc: Any, name: str) -> None:
    jsonschema.Draft202012Validator(
        json_schema(name), format_checker=jsonschema.FormatChecker()).validate(doc)


@pytest.fixture
def running(tmp_path):
    """alertd on a TCP status listener with a token, a signing secret and a secret header,
    in the middle of a rate-limited job."""
    mock, mport = start_mock("--secret", SECRET)
    sport = free_port()
    cfg = write_config(tmp_path / "alertd.toml", mport, rate={"limit": 4000},
                       webhook={"secrets": [SECRET]},
                       status={"listen": f"127.0.0.1:{sport}", "token": TOKEN},
                       **{"webhook.headers": {"Authorization": HEADER_SECRET}})
    a = Alertd(cfg)
    try:
        a.start()
        yield a, sport, mport
    finally:
        if a.proc is not None and a.proc.poll() is None:
            a.stop()
        stop_process(mock)


def test_status_metrics_health_and_auth(running):
    a, port, _ = running
    generate(str(a.cfg.paths.inbox_dir / "s.csv"), 30_000, seed=4)

    def acked() -> dict | None:
        st = a.status()
        return st if st["jobs"] and st["jobs"][0]["bytes_done"] > 0 else None
    poll(acked, 30, "a chunk of the job to be acknowledged")
    code, ctype, body = get(port, "/v1/status", TOKEN)
    assert code == 200 and ctype.startswith("application/json")
    st = json.loads(body)
    validate(st, "Status")
    [job] = st["jobs"]
    assert job["file"] == "s.csv" and 0 < job["progress"] < 1
    assert job["rows_estimate"] is not None and abs(job["rows_estimate"] - 30_000) < 3_000
    assert job["eta_s"] is None or job["eta_s"] >= 0
    assert all(w["rss_bytes"] > 10_000_000 for w in st["workers"])
    assert st["rate"]["limit"] == 4000 and st["breaker"]["state"] == "closed"

    # Prometheus: parses with the reference parser; the numbers agree with the status.
    code, ctype, body = get(port, "/metrics", TOKEN)
    assert code == 200 and ctype.startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(body)}
    for name, kind in [("alertd_rows", "counter"), ("alertd_requests_sent", "counter"),
                       ("alertd_in_flight_requests", "gauge"), ("alertd_pending_rows", "gauge"),
                       ("alertd_rate_limit", "gauge"), ("alertd_workers", "gauge"),
                       ("alertd_breaker_state", "gauge"), ("alertd_reloads", "counter")]:
        assert fams[name].type == kind, name
    val = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in fams.values() for s in f.samples}
    assert val[("alertd_rate_limit", ())] == 4000
    assert val[("alertd_workers", ())] == 2
    assert val[("alertd_breaker_state", ())] == 0
    assert val[("alertd_requests_sent_total", ())] > 0
    assert val[("alertd_reloads_total", (("result", "failure"),))] == 0

    # TCP without (or with a wrong) token: refused; /healthz stays open.
    for path in ("/v1/status", "/metrics"):
        for tok in (None, "wrong", TOKEN + "x"):
            code, _, body = get(port, path, tok)
            assert code == 401 and json.loads(body) == {"error": "unauthorized"}, (path, tok)
    code, _, body = get(port, "/healthz")
    assert code == 200
    validate(json.loads(body), "Health")
    assert json.loads(body)["ok"] is True

    # The job completes; its summary shows in `finished`, and the counters add up.
    [s] = a.wait_summaries(1, timeout=60)
    st = poll(lambda: (d := a.status())["finished"] and d, 10, "finished in status")
    validate(st, "Status")
    assert st["totals"]["delivered"] == 30_000 == s["delivered"]
    fams = {f.name: f for f in text_string_to_metric_families(get(port, "/metrics", TOKEN)[2])}
    delivered = [x for x in fams["alertd_rows"].samples if x.labels == {"outcome": "delivered"}]
    assert delivered[0].value == 30_000

    # No secret in the status document, the metrics or the log.
    everything = json.dumps(st) + get(port, "/metrics", TOKEN)[2]
    a.stop()
    everything += a.log()
    for secret in (SECRET, SECRET[6:], TOKEN, HEADER_SECRET, HEADER_SECRET.split()[1]):
        assert secret not in everything


def test_intake_responses_match_openapi(running):
    """POST /v1/files on the TCP listener: each answer is one docs/openapi.yaml documents,
    with its schema and headers; the token is required, also before a 100-continue."""
    a, port, _ = running
    csv = b"user_id,message\n" + b"".join(b"u%d,hi\n" % i for i in range(50))
    code, headers, body = post(port, "/v1/files?name=up.csv&priority=high", csv, TOKEN)
    doc = validate_response("/v1/files", "post", code, headers, body)
    assert code == 201 and doc["name"] == "up.csv" and doc["bytes"] == len(csv)
    [s] = a.wait_summaries(1, timeout=30)
    assert s["job"] == doc["job"] and s["delivered"] == 50 and s["file"] == "up.csv"
    cases = [("/v1/files?name=../x", csv, None, 400),
             ("/v1/files?name=x.csv&priority=urgent", csv, None, 400),
             ("/v1/files?name=bin.csv", b"\0\1\2\3" * 1000, None, 422),
             ("/v1/files?name=x.csv", csv, {"Authorization": "Bearer wrong"}, 401)]
    for path, data, extra, want in cases:
        code, headers, body = post(port, path, data, None if extra else TOKEN, extra)
        assert code == want, (path, code, body)
        validate_response("/v1/files", "post", code, headers, body)
    # A declared 5 GiB body is refused from its head (default [intake] max_bytes 4 GiB), and
    # an unauthenticated one before aiohttp's 100 Continue would invite the body.
    for auth, want in ((f"Authorization: Bearer {TOKEN}\r\n", 413), ("", 401)):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(f"POST /v1/files?name=big.csv HTTP/1.1\r\nHost: x\r\n{auth}"
                      f"Content-Length: {5 << 30}\r\nExpect: 100-continue\r\n\r\n".encode())
            r = http.client.HTTPResponse(c)
            r.begin()
            assert r.status == want
            validate_response("/v1/files", "post", r.status, r.headers, r.read())
    assert len(a.summaries()) == 1 and not a.status()["jobs"]


def test_secrets_never_in_config_errors(tmp_path):
    """A config that fails to load names the key, never the value of a secret."""
    bad_secret = "whsec_!!not-base64-" + TOKEN
    cases = {
        "secret": ('[webhook]\nurl = "http://127.0.0.1:1/"\nsecrets = ["%s"]\n' % bad_secret,
                   "[webhook] secrets", bad_secret),
        "short secret": ('[webhook]\nurl = "http://127.0.0.1:1/"\nsecrets = ["whsec_c2hvcnQ="]\n',
                         "16 bytes", "c2hvcnQ="),
        "header": ('[webhook]\nurl = "http://127.0.0.1:1/"\n[webhook.headers]\n'
                   '"Authorization" = "Bearer %s\\n"\n' % TOKEN, "headers.Authorization", TOKEN),
        "token but bad listen": ('[webhook]\nurl = "http://127.0.0.1:1/"\n[status]\n'
                                 'listen = "10.0.0.1:80"\ntoken = "%s"\n' % TOKEN,
                                 "[status] listen", TOKEN),
        "toml": ('[webhook]\nurl = "http://127.0.0.1:1/"\nsecrets = ["%s" oops\n' % SECRET,
                 "invalid TOML", SECRET),
    }
    for what, (text, names, secret) in cases.items():
        cfg = tmp_path / f"{what.replace(' ', '_')}.toml"
        cfg.write_text(text)
        p = subprocess.run([sys.executable, "-m", "alertd", "run", "--config", str(cfg)],
                           cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert p.returncode == 2, (what, p.stderr)
        assert names in p.stderr, (what, p.stderr)
        assert secret not in p.stderr + p.stdout, what


def test_secrets_file_readable_by_others_is_refused(tmp_path):
    sf = tmp_path / "secrets"
    sf.write_text(SECRET + "\n")
    sf.chmod(0o644)
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[webhook]\nurl = "http://127.0.0.1:1/"\nsecrets_file = "{sf}"\n')
    p = subprocess.run([sys.executable, "-m", "alertd", "run", "--config", str(cfg)],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "readable by others" in p.stderr
    assert SECRET not in p.stderr


def test_openapi_file_is_consistent() -> None:
    """Every $ref resolves and each documented path is one the server routes."""
    assert OPENAPI["openapi"].startswith("3.0")
    actions = ("pause", "resume", "cancel", "priority")
    assert set(OPENAPI["paths"]) == {"/v1/status", "/metrics", "/healthz", "/v1/files", "/v1/jobs",
                                     "/v1/jobs/{job}", *(f"/v1/jobs/{{job}}/{a}" for a in actions),
                                     "/v1/dlq/replay"}
    for name in OPENAPI["components"]["schemas"]:
        jsonschema.Draft202012Validator.check_schema(json_schema(name))
    src = Path(ROOT / "daemon" / "status.py").read_text()
    assert src.count("add_get(") == 3
    assert src.count('add_post("/v1/files"') == 1
    jobs_routes = Path(ROOT / "daemon" / "jobsapi.py").read_text()
    assert jobs_routes.count("add_get(") == 2 and jobs_routes.count("add_post(") == 2
    assert 'add_post("/v1/dlq/replay"' in jobs_routes
    assert "{action:" + "|".join(actions) + "}" in jobs_routes


def test_failed_reload_never_shows_a_url_password_or_a_token(running):
    """A HUP whose new config fails to load: the error names the key in the log and in
    /v1/status, with URL credentials hidden and no secret-bearing value echoed."""
    a, port, mport = running
    good = a.cfg_path.read_text()
    password, number = "pw-4c1e9b7d2a", "918273645012"
    cases = [(f'url = "http://alice:{password}@127.0.0.1:99999/hook"',
              "[webhook] url has a bad port: 'http://***@127.0.0.1:99999/hook'"),
             (f'url = "ftp://alice:{password}@127.0.0.1/hook"',
              "[webhook] url must be an http:// or https:// URL, got 'ftp://***@127.0.0.1/hook'")]
    for n, (line, shown) in enumerate(cases, 1):
        a.cfg_path.write_text(re.sub(r'(?m)^url = .*$', line, good))
        a.proc.send_signal(signal.SIGHUP)
        st = poll(lambda n=n: (d := json.loads(get(port, "/v1/status", TOKEN)[2]))["reload"]
                  ["failed"] == n and d, 10, "the reload to fail")
        assert shown in st["reload"]["error"]
    a.cfg_path.write_text(good.replace(f'token = "{TOKEN}"', f"token = {number}"))
    a.proc.send_signal(signal.SIGHUP)
    st = poll(lambda: (d := json.loads(get(port, "/v1/status", TOKEN)[2]))["reload"]
              ["failed"] == 3 and d, 10, "the reload to fail")
    assert "[status] token must be a string, got an integer" in st["reload"]["error"]
    everything = json.dumps(st) + get(port, "/metrics", TOKEN)[2]
    a.cfg_path.write_text(good)
    a.stop()
    everything += a.log()
    assert "***@127.0.0.1:99999" in everything
    for secret in (password, number, TOKEN, SECRET[6:], HEADER_SECRET.split()[1]):
        assert secret not in everything, secret


def test_metrics_library_is_a_runtime_dependency() -> None:
    """/metrics is written by prometheus_client, so a production install (which drops the
    test part of requirements.txt) must get it."""
    import tomllib

    runtime = (ROOT / "requirements.txt").read_text().split("\n# tests")[0].splitlines()
    assert any(ln.startswith("prometheus_client==") for ln in runtime)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("prometheus_client") for d in deps)
    assert "from prometheus_client" in (ROOT / "daemon" / "metrics.py").read_text()
