"""Config loading: defaults that work, and errors that name the key."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from alertd import config
from alertd.errors import ConfigError

from tests.procs import to_toml

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def load(tmp_path: Path, text: str) -> config.Config:
    p = tmp_path / "a.toml"
    p.write_text(text)
    return config.load(p)


def test_minimal_config_has_working_defaults(tmp_path):
    c = load(tmp_path, '[webhook]\nurl = "http://127.0.0.1:9/hook"\n[paths]\nstate_dir = "s"\n')
    assert c.paths.state_dir == tmp_path / "s"
    assert c.paths.inbox_dir == tmp_path / "s" / "inbox"
    assert c.workers.count >= 1 and c.workers.concurrency >= 1
    assert c.rate.limit == 0 and c.rate.effective_burst >= 1
    assert c.csv.header and c.csv.id_column == "user_id"
    assert c.wal.fsync == "interval" and c.wal.fsync_interval == 0.05
    assert c.status_address() == ("unix", tmp_path / "s" / "alertd.sock")


@pytest.mark.parametrize("text, message", [
    ('[webhook]\nurl = "http://x/"\n[rate]\nlimit = -5\n', "config: [rate] limit must be >= 0, got -5"),
    ('[webhook]\nurl = "http://x/"\n[rate]\nlimt = 5\n', "config: [rate] unknown key 'limt'"),
    ('[webhook]\nurl = "http://x/"\n[ratez]\n', "config: unknown section [ratez]"),
    ('[webhook]\nurl = "ftp://x/"\n', "config: [webhook] url must be an http"),
    ('[rate]\nlimit = 1\n', "config: [webhook] url is required"),
    ('[webhook]\nurl = "http://x/"\n[workers]\ncount = 0\n', "config: [workers] count must be >= 1"),
    ('[webhook]\nurl = "http://x/"\n[workers]\ncount = "2"\n', "config: [workers] count must be an integer"),
    ('[webhook]\nurl = "http://x/"\n[wal]\nfsync = "sometimes"\n', "config: [wal] fsync must be"),
    ('[webhook]\nurl = "http://x/"\nsecrets = ["nope"]\n', "a secret must start with 'whsec_'"),
    ('[webhook]\nurl = "http://x/"\n[csv]\ndelimiter = ",,"\n', "config: [csv] delimiter"),
    ('[webhook]\nurl = "http://x/"\n[status]\nlisten = "127.0.0.1:8080"\n',
     "config: [status] token is required"),
    ('[webhook]\nurl = "http://x/"\n[status]\nlisten = "0.0.0.0:8080"\ntoken = "t"\n', "loopback"),
    ('[webhook\n', "invalid TOML"),
])
def test_bad_values_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    assert message in str(e.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "nope.toml")


def test_secrets_file_must_not_be_readable_by_others(tmp_path):
    sf = tmp_path / "secrets"
    sf.write_text(f"# rotated weekly\n{SECRET}\n")
    os.chmod(sf, 0o644)
    text = '[webhook]\nurl = "http://x/"\nsecrets_file = "secrets"\n'
    with pytest.raises(ConfigError, match="readable by others"):
        load(tmp_path, text)
    os.chmod(sf, 0o600)
    c = load(tmp_path, text)
    assert c.webhook.secrets == (SECRET,)
    assert SECRET not in repr(ConfigError("x"))


def test_headers_and_secrets_are_kept(tmp_path):
    c = load(tmp_path, f'[webhook]\nurl = "https://h.example:8443/p?q=1"\nsecrets = ["{SECRET}"]\n'
             '[webhook.headers]\nAuthorization = "Bearer abc"\n')
    assert c.webhook.headers == (("Authorization", "Bearer abc"),)
    assert c.webhook.secrets == (SECRET,)


def test_to_toml_round_trips_through_load(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(to_toml({
        "paths": {"state_dir": "s"},
        "webhook": {"url": "http://127.0.0.1:9/h", "secrets": [SECRET],
                    "headers": {"Authorization": "Bearer \"x\""}},
        "rate": {"limit": 2000, "adaptive": True}}))
    c = config.load(p)
    assert c.webhook.secrets == (SECRET,)
    assert c.webhook.headers == (("Authorization", 'Bearer "x"'),)
    assert (c.rate.limit, c.rate.adaptive) == (2000.0, True)


@pytest.mark.parametrize("url, shown", [
    ("http://alice:pw-9f3@h.example/hook", "http://***@h.example/hook"),
    ("https://tok-only@h.example:8443/p?q=1", "https://***@h.example:8443/p?q=1"),
    ("http://u:p@ss/w#rd@h:99999/x", "http://***@h:99999/x"),  # unencoded: still hidden
    ("http://h.example/hook", "http://h.example/hook"),
])
def test_redact_url_hides_credentials(url, shown):
    assert config.redact_url(url) == shown
    assert config.redact(f"reload failed: got {url!r} there") == f"reload failed: got {shown!r} there"


@pytest.mark.parametrize("text, names, secret", [
    ('[webhook]\nurl = "http://alice:pw-9f3a@127.0.0.1:99999/"\n', "[webhook] url has a bad port",
     "pw-9f3a"),
    ('[webhook]\nurl = "ftp://alice:pw-9f3a@127.0.0.1/"\n', "[webhook] url must be", "pw-9f3a"),
    ('[webhook]\nurl = "http://x/"\n[status]\ntoken = 918273645\n',
     "[status] token must be a string, got an integer", "918273645"),
    ('[webhook]\nurl = "http://x/"\nsecrets = [918273645]\n', "[webhook] secrets must be a string",
     "918273645"),
    ('[webhook]\nurl = "http://x/"\n[webhook.headers]\nAuthorization = 918273645\n',
     "[webhook] headers.Authorization must be a string", "918273645"),
])
def test_errors_never_echo_a_secret_bearing_value(tmp_path, text, names, secret):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    assert names in str(e.value) and secret not in str(e.value)


def test_secrets_file_must_not_be_a_symlink_or_writable_by_others(tmp_path):
    real = tmp_path / "real-secrets"
    real.write_text(SECRET + "\n")
    real.chmod(0o600)
    link = tmp_path / "secrets"
    link.symlink_to(real)
    text = f'[webhook]\nurl = "http://x/"\nsecrets_file = "{link}"\n'
    with pytest.raises(ConfigError, match=f"secrets_file {link} is a symlink"):
        load(tmp_path, text)
    link.unlink()
    real.rename(link)
    for mode in (0o620, 0o602):
        link.chmod(mode)
        with pytest.raises(ConfigError, match=f"secrets_file {link} is writable by group or others"):
            load(tmp_path, text)
    link.chmod(0o640)
    assert load(tmp_path, text).webhook.secrets == (SECRET,)


def test_inline_secrets_in_a_world_readable_config_warn(tmp_path):
    p = tmp_path / "a.toml"
    p.write_text(f'[webhook]\nurl = "http://x/"\nsecrets = ["{SECRET}"]\n'
                 '[webhook.headers]\nAuthorization = "Bearer abc"\nX-Trace = "1"\n'
                 '[status]\ntoken = "t0k"\n')
    p.chmod(0o644)
    [w] = config.load(p).warnings
    assert f"{p} is readable by others (mode 644)" in w and "chmod 640" in w
    for where in ("[webhook] secrets", "[webhook.headers] Authorization", "[status] token"):
        assert where in w
    assert "X-Trace" not in w and SECRET not in w and "abc" not in w and "t0k" not in w
    # URL credentials (an Authorization header beside them is refused, so on their own).
    p.write_text('[webhook]\nurl = "http://u:pw@x/"\n')
    [w] = config.load(p).warnings
    assert "[webhook] url" in w and "pw" not in w
    p.chmod(0o640)
    assert config.load(p).warnings == ()
    p.write_text('[webhook]\nurl = "http://x/"\n')
    p.chmod(0o644)
    assert config.load(p).warnings == ()  # nothing secret in it: nothing to say


CSV = '[webhook]\nurl = "http://x/"\n[csv]\n'


def test_data_columns_default_is_empty(tmp_path):
    assert load(tmp_path, CSV).csv.data_columns == ()


@pytest.mark.parametrize("text, want", [
    ('data_columns = ["city", "plan"]', ("city", "plan")),
    ('data_columns = ["*"]', ("*",)),
    ('data_columns = []', ()),
    ('data_columns = ["3"]', ("3",)),  # a header may name a column "3"
    ('header = false\ndata_columns = [3, "1", "007"]', ("3", "1", "7")),
    ('header = false\ndata_columns = ["*"]', ("*",)),
])
def test_data_columns_accepted(tmp_path, text, want):
    assert load(tmp_path, CSV + text + "\n").csv.data_columns == want


@pytest.mark.parametrize("text, message", [
    ('data_columns = "city"', "[csv] data_columns must be an array of column names, column "
                              "numbers or [\"*\"], got 'city'"),
    ('data_columns = {a = 1}', "[csv] data_columns must be an array"),
    ('data_columns = [true]', "[csv] data_columns must hold column names (strings) or column "
                              "numbers, got true/false"),
    ('data_columns = [1.5]', "[csv] data_columns must hold column names"),
    ('data_columns = [["a"]]', "[csv] data_columns must hold column names"),
    ('data_columns = [""]', "[csv] data_columns must not hold ''"),
    ('header = false\ndata_columns = [-1]', "[csv] data_columns must not hold -1"),
    ('data_columns = ["a", "b", "a"]', "[csv] data_columns names 'a' twice"),
    ('data_columns = ["*", "a"]', '[csv] data_columns "*" (every other column) must be the '
                                  'only entry'),
    ('data_columns = [2]', "[csv] data_columns must name columns of the header (strings) when "
                           "header = true, got the number 2"),
    ('header = false\ndata_columns = ["city"]', "[csv] data_columns must be column numbers "
                                                "(0 = first) when header = false, got 'city'"),
    ('header = false\ndata_columns = ["²"]', "must be column numbers"),
    ('header = false\ndata_columns = [3, "3"]', "[csv] data_columns names column 3 twice"),
    ('header = false\ndata_columns = ["03", "3"]', "[csv] data_columns names column 3 twice"),
])
def test_bad_data_columns_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, CSV + text + "\n")
    assert str(e.value).startswith("config: [csv] data_columns ")
    assert message in str(e.value)
