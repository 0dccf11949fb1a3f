"""The TOML configuration: frozen dataclasses and `load(path) -> Config`.

Leaf module. Each key's default and its simple rule (type, bounds, choices) are written
once, on its dataclass field; rules that tie keys together live in one check per section.
It raises ConfigError naming the offending key and never exits: the CLI maps errors to
exit codes. Relative paths are resolved against the directory of the config file, so a
unit file and a demo behave the same.
"""
from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import credentials
from .credentials import fail as _fail
from .credentials import redact, redact_url  # noqa: F401  (re-exported: config.redact_url)
from .errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/alertd/alertd.toml"


def key(default: Any = dataclasses.MISSING, *, ge: float | None = None,
        gt: float | None = None, le: float | None = None, choices: tuple[str, ...] = (),
        secret: bool = False, parse: Callable[[Any], Any] | None = None) -> Any:
    """A config key: its default and the rule its value must follow. `secret`: the value
    is never shown (not in errors, not in repr); `parse` turns a TOML value of another
    shape (a list, a table) into the field's value."""
    rule = {"ge": ge, "gt": gt, "le": le, "choices": choices, "secret": secret, "parse": parse}
    return field(default=default, repr=not secret, metadata={"rule": rule})


def _secret_list(value: Any) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list):
        raise _fail("webhook", "secrets", "must be a list of 'whsec_...' strings")
    for v in values:
        if not isinstance(v, str):
            raise _fail("webhook", "secrets", f"must be a string, got {_kind(v)}")
    return tuple(credentials.check_secret(v, "[webhook] secrets") for v in values)


def _data_columns(value: Any) -> tuple[str | int, ...]:
    """[csv] data_columns: names, column numbers (without a header, checked with the
    section) or ["*"]; each at most once."""
    if not isinstance(value, list):
        shown = repr(value) if isinstance(value, str) else _kind(value)
        raise _fail("csv", "data_columns", f"must be an array of column names, column numbers "
                    f"or [\"*\"], got {shown}")
    seen: set[str | int] = set()
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise _fail("csv", "data_columns", f"must hold column names (strings) or column "
                        f"numbers, got {_kind(v)}")
        if v == "" or (isinstance(v, int) and v < 0):
            raise _fail("csv", "data_columns", f"must not hold {v!r}: name a column, or number "
                        f"it from 0")
        if v in seen:
            raise _fail("csv", "data_columns", f"names {v!r} twice")
        seen.add(v)
    if "*" in seen and len(value) > 1:
        raise _fail("csv", "data_columns", '"*" (every other column) must be the only entry')
    return tuple(value)


@dataclass(frozen=True)
class PathsConfig:
    state_dir: Path = key(Path("/var/lib/alertd"))
    inbox: Path | None = key(None)  # None: <state_dir>/inbox

    @property
    def inbox_dir(self) -> Path:
        return self.inbox if self.inbox is not None else self.state_dir / "inbox"


@dataclass(frozen=True)
class WebhookConfig:
    url: str = key("")  # required; checked with the section
    timeout: float = key(10.0, gt=0)
    secrets: tuple[str, ...] = key((), secret=True, parse=_secret_list)  # never in a log line
    secrets_file: Path | None = key(None)  # its secrets are added to `secrets`
    headers: tuple[tuple[str, str], ...] = key((), secret=True, parse=credentials.check_headers)
    ca_file: Path | None = key(None)  # CA bundle that replaces the system CAs (private CAs)
    client_cert: Path | None = key(None)  # mTLS: PEM certificate (chain), with client_key
    client_key: Path | None = key(None)


@dataclass(frozen=True)
class RateConfig:
    limit: float = key(0.0, ge=0)  # alerts per second over all workers; 0 = unlimited
    burst: float = key(0.0, ge=0)  # 0 = automatic: 1/20 s worth of `limit`, at least 1
    adaptive: bool = key(False)

    @property
    def effective_burst(self) -> float:
        if self.burst > 0:
            return self.burst
        return max(1.0, self.limit / 20.0)


@dataclass(frozen=True)
class WorkersConfig:
    count: int = key(2, ge=1, le=64)  # 64: the worker slots in shared memory
    concurrency: int = key(64, ge=1, le=4096)  # requests in flight per worker
    # HTTP/1.1 pipelining: requests in flight per connection (1 = off), for receivers known
    # to answer pipelined requests in order; concurrency / pipeline connections per worker.
    pipeline: int = key(1, ge=1, le=64)
    chunk_bytes: int = key(256 << 10, ge=1)  # planned chunk size; kept per job in its manifest


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = key(5, ge=1)
    base_delay: float = key(0.5, gt=0)
    max_delay: float = key(30.0, gt=0)  # also caps every Retry-After
    max_age: float = key(86400.0, gt=0)
    budget: float = key(0.2, ge=0, le=1)  # share of sends retries may take while first attempts wait


@dataclass(frozen=True)
class CsvConfig:
    header: bool = key(True)
    id_column: str = key("user_id")
    message_column: str = key("")  # "" = use [alert] message
    delimiter: str = key(",")
    max_id_length: int = key(256, ge=1)  # bytes
    max_line_bytes: int = key(65536, ge=1)  # longer lines are rejected, skipped without being held
    # Columns sent as data.fields: names; column numbers as strings when header = false
    # (the section check turns integers into them); ("*",) = all but id and message.
    data_columns: tuple[str, ...] = key((), parse=_data_columns)


@dataclass(frozen=True)
class AlertConfig:
    message: str = key("You have a new alert.")


@dataclass(frozen=True)
class WalConfig:
    fsync: str = key("interval", choices=("interval", "always"))  # group commit, or per record
    fsync_interval: float = key(0.05, gt=0)
    segment_bytes: int = key(64 << 20, ge=4096)
    retention: float = key(86400.0, ge=0)  # rotated segments of finished jobs are kept this long


@dataclass(frozen=True)
class RetentionConfig:
    done_files: float = key(86400.0, ge=0)  # a finished job's source leaves done/; 0 = at once


@dataclass(frozen=True)
class StatusConfig:
    listen: str = key("alertd.sock")  # unix socket (relative to state_dir) or 127.0.0.1:PORT
    token: str = key("", secret=True)  # bearer token, required for a TCP listener


@dataclass(frozen=True)
class IntakeConfig:
    max_bytes: int = key(4 << 30, ge=1)  # largest upload body (POST /v1/files); past it 413
    max_jobs: int = key(1000, ge=1)  # unfinished jobs (queued, running, paused); past it 429
    min_free_bytes: int = key(1 << 30, ge=0)  # free space an upload must leave; else 507


@dataclass(frozen=True)
class ShutdownConfig:
    grace: float = key(30.0, ge=0)


@dataclass(frozen=True)
class ClusterConfig:
    # "" = single host; redis://, rediss:// or unix:// (checked with the section); may hold
    # a password, so never shown
    redis: str = key("", secret=True)
    node: str = key("")  # "" = the host name (resolved with the section); unique per node
    lease: float = key(15.0, gt=0)  # seconds without a heartbeat before a node's work is reclaimed


@dataclass(frozen=True)
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    webhook: WebhookConfig = field(default_factory=WebhookConfig)
    rate: RateConfig = field(default_factory=RateConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    csv: CsvConfig = field(default_factory=CsvConfig)
    alert: AlertConfig = field(default_factory=AlertConfig)
    wal: WalConfig = field(default_factory=WalConfig)
    status: StatusConfig = field(default_factory=StatusConfig)
    intake: IntakeConfig = field(default_factory=IntakeConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    source: Path | None = None  # the file this was loaded from
    # One line each, for the operator (e.g. secrets inline in a file others can read);
    # not part of the value, so a reload that only changes a warning changes nothing.
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def state_dir(self) -> Path:
        return self.paths.state_dir

    @property
    def node_dir(self) -> Path:
        """What only this daemon writes: the state dir itself on one host; in a cluster
        (shared state dir) state_dir/nodes/<node>/."""
        if not self.cluster.redis:
            return self.paths.state_dir
        return self.paths.state_dir / "nodes" / self.cluster.node

    @property
    def wal_dir(self) -> Path:
        """This daemon's WALs (readers look in every node's: wal.segments)."""
        return self.node_dir / "wal"

    def status_address(self) -> tuple[str, Any]:
        """('unix', Path) or ('tcp', (host, port)); a relative socket path is in node_dir."""
        return parse_listen(self.status.listen, self.node_dir)


_SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)
                              if f.default_factory is not dataclasses.MISSING}


# ---------------------------------------------------------------- one key, by its rule


def _kind(value: Any) -> str:
    kinds = {bool: "true/false", int: "an integer", float: "a number", list: "an array",
             dict: "a table"}
    return kinds.get(type(value), type(value).__name__)


def _value(section: str, f: dataclasses.Field, hint: Any, value: Any, base: Path) -> Any:
    rule = f.metadata["rule"]
    shown = _kind(value) if rule["secret"] else repr(value)
    if rule["parse"] is not None:
        return rule["parse"](value)
    if hint is bool:
        if not isinstance(value, bool):
            raise _fail(section, f.name, f"must be true or false, got {shown}")
    elif hint is int or hint is float:
        if isinstance(value, bool) or not isinstance(value, int if hint is int else (int, float)):
            raise _fail(section, f.name, f"must be {'an integer' if hint is int else 'a number'}, "
                        f"got {shown}")
        value = hint(value)
    elif hint is str:
        if not isinstance(value, str):
            raise _fail(section, f.name, f"must be a string, got {shown}")
    else:  # Path, Path | None
        if not isinstance(value, str):
            raise _fail(section, f.name, f"must be a string, got {shown}")
        if not value:
            raise _fail(section, f.name, "must not be empty")
        p = Path(value)
        return p if p.is_absolute() else base / p
    if rule["gt"] is not None and value <= rule["gt"]:
        raise _fail(section, f.name, f"must be > {rule['gt']:g}, got {shown}")
    if rule["ge"] is not None and value < rule["ge"]:
        raise _fail(section, f.name, f"must be >= {rule['ge']:g}, got {shown}")
    if rule["le"] is not None and value > rule["le"]:
        raise _fail(section, f.name, f"must be <= {rule['le']:g}, got {shown}")
    if rule["choices"] and value not in rule["choices"]:
        raise _fail(section, f.name, "must be " + " or ".join(f'"{c}"' for c in rule["choices"])
                    + f", got {shown}")
    return value


def _section(raw: dict[str, Any], name: str, base: Path) -> Any:
    """The section's dataclass from its table: given keys checked by their rules, the
    others left to the field defaults."""
    cls = _SECTIONS[name]
    sec = raw.get(name, {})
    if not isinstance(sec, dict):
        raise ConfigError(f"config: [{name}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in sec:
        if k not in fields:
            raise ConfigError(f"config: [{name}] unknown key {k!r} "
                              f"(known: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _value(name, fields[k], hints[k], v, base) for k, v in sec.items()})


# ---------------------------------------------------------------- rules across keys


def parse_listen(listen: str, state_dir: Path) -> tuple[str, Any]:
    host, sep, port = listen.rpartition(":")
    if sep and port.isdigit() and "/" not in listen:
        if host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
            raise ConfigError(f"config: [status] listen must be a unix socket path or a "
                              f"loopback address, got {listen!r}")
        return "tcp", (host.strip("[]"), int(port))
    p = Path(listen)
    return "unix", p if p.is_absolute() else state_dir / p


def _check_webhook(w: WebhookConfig) -> WebhookConfig:
    if not w.url:
        raise _fail("webhook", "url", "is required (e.g. url = \"http://127.0.0.1:9000/hook\")")
    parts = urlsplit(w.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _fail("webhook", "url", f"must be an http:// or https:// URL, got "
                    f"{redact_url(w.url)!r}")
    try:
        _ = parts.port  # urlsplit checks the port lazily
    except ValueError:
        raise _fail("webhook", "url", f"has a bad port: {redact_url(w.url)!r}") from None
    if parts.username is not None and any(k.lower() == "authorization" for k, _ in w.headers):
        raise _fail("webhook", "headers.Authorization",
                    "conflicts with the credentials in [webhook] url")
    credentials.check_tls_files({k: getattr(w, k) for k in ("ca_file", "client_cert", "client_key")
                                 if getattr(w, k) is not None}, https=parts.scheme == "https")
    if w.secrets_file is not None:
        w = dataclasses.replace(w, secrets=w.secrets + credentials.read_secrets_file(w.secrets_file))
    return w


def _check_retry(r: RetryConfig) -> None:
    if r.max_delay < r.base_delay:
        raise _fail("retry", "max_delay", f"must be >= base_delay ({r.base_delay:g}), "
                    f"got {r.max_delay:g}")


def _check_csv(c: CsvConfig) -> CsvConfig:
    d = c.delimiter
    if len(d) != 1 or d in "\"\r\n" or ord(d) > 127:
        raise _fail("csv", "delimiter", f"must be one ASCII character other than a quote or "
                    f"newline, got {d!r}")
    if not c.id_column:
        raise _fail("csv", "id_column", "must not be empty")
    if not c.header:
        for k in ("id_column", "message_column"):
            v = getattr(c, k)
            if v and not v.isdigit() and not (k == "id_column" and v == "user_id"):
                raise _fail("csv", k, f"must be a column number (0 = first) when header = "
                            f"false, got {v!r}")
    cols: list[str] = []
    for v in c.data_columns:
        if c.header and isinstance(v, int):
            raise _fail("csv", "data_columns", f"must name columns of the header (strings) when "
                        f"header = true, got the number {v}")
        if not c.header and v != "*":
            if isinstance(v, str) and not (v.isascii() and v.isdigit()):
                raise _fail("csv", "data_columns", f"must be column numbers (0 = first) when "
                            f"header = false, got {v!r}")
            v = str(int(v))  # 3, "3" and "03" are one column, named "3" in data.fields
            if v in cols:
                raise _fail("csv", "data_columns", f"names column {v} twice")
        cols.append(v)
    return dataclasses.replace(c, data_columns=tuple(cols))


def _check_cluster(c: ClusterConfig) -> ClusterConfig:
    if c.redis:
        parts = urlsplit(c.redis)
        if parts.scheme not in ("redis", "rediss", "unix") or \
                (parts.scheme != "unix" and not parts.hostname) or \
                (parts.scheme == "unix" and not parts.path):
            raise _fail("cluster", "redis", f"must be a redis://, rediss:// or unix:// URL, got "
                        f"{redact_url(c.redis)!r}")
        try:
            _ = parts.port
        except ValueError:
            raise _fail("cluster", "redis", f"has a bad port: {redact_url(c.redis)!r}") from None
    node = c.node or socket.gethostname()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", node):
        raise _fail("cluster", "node", f"must be 1-63 letters, digits, '.', '_' or '-' (it names "
                    f"keys in Redis and state_dir/nodes/<node>), got {node!r}")
    return dataclasses.replace(c, node=node)


def from_dict(raw: dict[str, Any], base: Path) -> Config:
    """Build a validated Config from parsed TOML; `base` resolves relative paths."""
    for name in raw:
        if name not in _SECTIONS:
            raise ConfigError(f"config: unknown section [{name}] "
                              f"(known: {', '.join(sorted(_SECTIONS))})")
    s = {name: _section(raw, name, base) for name in _SECTIONS}
    s["webhook"] = _check_webhook(s["webhook"])
    _check_retry(s["retry"])
    s["csv"] = _check_csv(s["csv"])
    s["cluster"] = _check_cluster(s["cluster"])
    kind, _ = parse_listen(s["status"].listen, s["paths"].state_dir)
    if kind == "tcp" and not s["status"].token:
        raise _fail("status", "token", "is required when [status] listen is a TCP address")
    return Config(**s)


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config: {p}: no such file") from None
    except OSError as e:
        raise ConfigError(f"config: {p}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {p}: invalid TOML: {e}") from None
    cfg = from_dict(raw, p.resolve().parent)
    inline = credentials.inline_secrets(bool(raw.get("webhook", {}).get("secrets")),
                                        cfg.webhook.url, cfg.webhook.headers, cfg.status.token)
    return dataclasses.replace(cfg, source=p.resolve(),
                               warnings=credentials.exposed_secrets(p, inline))
