"""[csv] data_columns end to end: columns of the file arrive in data.fields, signed, and
the layout that picks them is kept with the job (manifest, restart, dead letters, check)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import orjson
from alertd.config import CsvConfig
from alertd.jobs import JobStore
from standardwebhooks.webhooks import Webhook

from mock_webhook.server import fails_by_hash
from tests.helpers import get_stats, post_json
from tests.procs import ROOT, SECRET, poll, write_config

HEADER = b'user_id,city,"plan",message,note\n'
ROWS = [  # (line, expected data.fields or None when the row is rejected)
    (b"u1,Paris,pro,hello,first\n", {"city": "Paris", "note": "first"}),
    (b'u2,"Z\xc3\xbcrich, CH",free,"hi, there","say ""yes"""\n',
     {"city": "Zürich, CH", "note": 'say "yes"'}),
    (b"  u3  , spaced ,x,m,\n", {"city": " spaced ", "note": ""}),  # values are not stripped
    (b"u4,Rome,pro,too,many,columns\n", None),
    (b"u5,Oslo\n", None),
    (b",Lima,pro,m,no id\n", None),
    (b'u7,"Kyiv,free,m,unbalanced\n', None),
    (b"u8,Nice,pro,m,last", {"city": "Nice", "note": "last"}),  # no newline at EOF
]


def _fields_file() -> tuple[bytes, dict[int, dict[str, str]]]:
    """The CSV and the data.fields expected at each good row's offset."""
    data, want = bytearray(HEADER), {}
    for line, fields in ROWS:
        if fields is not None:
            want[len(data)] = fields
        data += line
    return bytes(data), want


def _received(record: Path, n: int) -> list[dict]:
    """The bodies the mock recorded, each checked with the reference verifier first."""
    poll(lambda: sum(1 for _ in open(record)) >= n if record.exists() else False, 10,
         f"{n} recorded requests")
    wh, out = Webhook(SECRET), []
    for line in open(record):
        r = json.loads(line)
        out.append(wh.verify(r["body"], {"webhook-id": r["id"], "webhook-timestamp":
                                         r["timestamp"], "webhook-signature": r["signature"]}))
    return out


def test_extra_columns_arrive_signed_in_data_fields(tmp_path, mock, alertd):
    record = tmp_path / "received.jsonl"
    port = mock("--secret", SECRET, record=str(record))
    a = alertd(write_config(tmp_path / "a.toml", port, webhook={"secrets": [SECRET]},
                            csv={"message_column": "message", "data_columns": ["city", "note"]}))
    data, want = _fields_file()
    a.drop("fields.csv", data)
    [s] = a.wait_summaries(1, timeout=30)
    assert (s["rows"], s["delivered"], s["rejected"], s["dead"]) == (8, 4, 4, 0)
    bodies = _received(record, 4)
    assert len(bodies) == 4 and get_stats(port)["bad_signatures"] == 0
    got = {b["data"]["offset"]: b["data"] for b in bodies}
    assert {o: d["fields"] for o, d in got.items()} == want
    for d in got.values():
        assert list(d["fields"]) == ["city", "note"]  # config order; "plan" is not asked for
        assert set(d) == {"user_id", "message", "file", "offset", "fields"}
    assert got[min(want)]["user_id"] == "u1" and got[min(want)]["message"] == "hello"
    rejects = [json.loads(x) for x in (a.state / "rejects" / f"{s['job']}.jsonl").open()]
    assert sorted(r["reason"] for r in rejects) == [
        "expected 5 columns, got 2", "expected 5 columns, got 6", "missing user id",
        "unbalanced quotes"]
    assert a.cli("verify", s["job"]).returncode == 0
    # A file without a named column fails like one without the id column; the daemon goes on.
    a.drop("nonote.csv", b"user_id,city,message\nu1,Paris,m\n")
    [failed] = poll(lambda: list((a.state / "failed").glob("*nonote.csv.reason")), 15,
                    "the file without 'note' to fail")
    reason = failed.read_text().splitlines()[0]
    assert reason == ("no 'note' column for [csv] data_columns in header "
                      "(columns: user_id, city, message)")
    a.drop("again.csv", data)
    assert len(a.wait_summaries(2, timeout=30)) == 2


def test_no_data_columns_sends_no_fields_key(tmp_path, mock, alertd):
    record = tmp_path / "received.jsonl"
    port = mock("--secret", SECRET, record=str(record))
    a = alertd(write_config(tmp_path / "a.toml", port, webhook={"secrets": [SECRET]},
                            csv={"message_column": "message"}))
    data, want = _fields_file()
    a.drop("plain.csv", data)
    [s] = a.wait_summaries(1, timeout=30)
    assert s["delivered"] == len(want)
    for b in _received(record, len(want)):
        assert set(b["data"]) == {"user_id", "message", "file", "offset"}


def _numbered(n: int) -> tuple[bytes, dict[int, dict[str, str]]]:
    data, want = bytearray(b"user_id,tier,region\n"), {}
    for i in range(n):
        want[len(data)] = {"tier": f"t{i % 7}", "region": f"r,{i}"}
        data += b'u%d,t%d,"r,%d"\n' % (i, i % 7, i)
    return bytes(data), want


def test_a_job_keeps_its_columns_across_a_crash_and_a_config_without_them(tmp_path, mock,
                                                                         alertd):
    record = tmp_path / "received.jsonl"
    port = mock("--secret", SECRET, record=str(record))
    cfg = write_config(tmp_path / "a.toml", port, webhook={"secrets": [SECRET]},
                       rate={"limit": 1500}, csv={"data_columns": ["*"]})
    a = alertd(cfg)
    data, want = _numbered(4000)
    a.drop("n.csv", data)
    poll(lambda: a.delivered_now() > 800, 30, "part of the job to be delivered")
    a.kill9()
    assert not a.summaries()
    # The rest of the job is sent by a daemon whose config has no data_columns: the
    # columns were fixed when the file was claimed, and the manifest kept them.
    write_config(cfg, port, webhook={"secrets": [SECRET]}, rate={"limit": 1500})
    b = alertd(cfg)
    [s] = b.wait_summaries(1, timeout=60)
    assert (s["rows"], s["delivered"]) == (4000, 4000)
    stats = get_stats(port)
    assert stats["unique"] == 4000 and stats["bad_signatures"] == 0
    bodies = _received(record, stats["received"])
    assert {b["data"]["offset"]: b["data"]["fields"] for b in bodies} == want
    # A job claimed under the new config has no fields.
    b.drop("later.csv", b"user_id,tier\nz1,gold\n")
    b.wait_summaries(2, timeout=30)
    last = _received(record, stats["received"] + 1)[-1]["data"]
    assert last["user_id"] == "z1" and "fields" not in last


def test_dead_letters_keep_their_fields_and_a_replay_sends_them(tmp_path, mock, alertd):
    record = tmp_path / "received.jsonl"
    port = mock("--mode", "fail", "--fail-ratio", "0.1", "--secret", SECRET,
                record=str(record))
    a = alertd(write_config(tmp_path / "a.toml", port, webhook={"secrets": [SECRET]},
                            retry={"max_attempts": 2, "base_delay": 0.01, "max_delay": 0.05},
                            csv={"data_columns": ["region", "tier"]}))
    data, want = _numbered(1000)
    a.drop("d.csv", data)
    [s] = a.wait_summaries(1, timeout=60)
    job = s["job"]
    failing = {o for o in want if fails_by_hash(f"{job}:{o}", 0.1)}
    assert s["dead"] == len(failing) > 50
    dead = [json.loads(x) for x in (a.state / "dlq" / f"{job}.jsonl").open()]
    assert {d["offset"]: d["fields"] for d in dead} == {o: want[o] for o in failing}
    before = len(_received(record, get_stats(port)["received"]))  # every attempt so far
    post_json(port, "/reset", {})
    post_json(port, "/control", {"mode": "ok"})
    r = a.cli("dlq", "replay", job)
    assert r.returncode == 0, r.stdout + r.stderr
    replayed = _received(record, before + len(failing))[before:]
    assert {b["data"]["offset"]: b["data"]["fields"] for b in replayed} == \
        {o: want[o] for o in failing}


def test_a_manifest_keeps_the_columns_and_an_old_one_loads_without(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "m.csv").write_bytes(b"user_id,a,b\nu1,x,y\n")
    store = JobStore(tmp_path / "state")
    job = store.claim(inbox / "m.csv", CsvConfig(data_columns=("b",)), 1024)
    assert job is not None and job.layout.data_columns == (("b", 2),)
    job.park()
    # Recovered under a config that asks for other columns: the claim's choice stands.
    [back] = JobStore(tmp_path / "state").load_unfinished(CsvConfig(), 1024)
    assert back.layout == job.layout and back.layout.has_fields
    back.park()
    manifest = tmp_path / "state" / "spool" / f"{job.id}.json"
    doc = orjson.loads(manifest.read_bytes())
    for k in ("data_columns", "data_rest"):  # as written before data_columns existed
        del doc["layout"][k]
    manifest.write_bytes(orjson.dumps(doc))
    [old] = JobStore(tmp_path / "state").load_unfinished(CsvConfig(data_columns=("a",)), 1024)
    assert old.layout.data_columns == () and not old.layout.has_fields
    assert old.layout == job.layout.__class__(ncols=3, id_index=0)
    old.park()


def _check(cfg: Path, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alertd", "check", str(path), "--config",
                           str(cfg)], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_check_shows_the_fields_of_the_sample_and_fails_a_missing_column(tmp_path):
    csv = tmp_path / "h.csv"
    csv.write_bytes(b'm1,u1,"a, b",c\nm2,u2\n')
    cfg = write_config(tmp_path / "a.toml", 9, webhook={"secrets": [SECRET]},
                       csv={"header": False, "id_column": "1", "message_column": "0",
                            "data_columns": ["*"]})
    r = _check(cfg, csv)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 rows, 2 would be sent, 0 rejected" in r.stdout
    body = json.loads(r.stdout.strip().splitlines()[-1])
    assert body["data"]["fields"] == {"2": "a, b", "3": "c"}
    cfg = write_config(tmp_path / "b.toml", 9, csv={"data_columns": ["city"]})
    csv.write_bytes(b"user_id,town\nu1,x\n")
    r = _check(cfg, csv)
    assert r.returncode == 1
    assert "the job would fail: no 'city' column for [csv] data_columns in header " \
           "(columns: user_id, town)" in r.stdout
