"""The TOML configuration: frozen dataclasses and `load(path) -> Config`.

Leaf module. It raises ConfigError naming the offending key and never exits:
the CLI maps errors to exit codes. Relative paths are resolved against the
directory of the config file, so a unit file and a demo behave the same.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/alertd/alertd.toml"


@dataclass(frozen=True)
class PathsConfig:
    state_dir: Path = Path("/var/lib/alertd")
    inbox: Path | None = None  # None: <state_dir>/inbox

    @property
    def inbox_dir(self) -> Path:
        return self.inbox if self.inbox is not None else self.state_dir / "inbox"


@dataclass(frozen=True)
class WebhookConfig:
    url: str = ""
    timeout: float = 10.0
    secrets: tuple[str, ...] = field(default=(), repr=False)  # never in a log line
    secrets_file: Path | None = None
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # may hold tokens


@dataclass(frozen=True)
class RateConfig:
    limit: float = 0.0  # alerts per second over all workers; 0 = unlimited
    burst: float = 0.0  # 0 = automatic: 1/20 s worth of `limit`, at least 1
    adaptive: bool = False

    @property
    def effective_burst(self) -> float:
        if self.burst > 0:
            return self.burst
        return max(1.0, self.limit / 20.0)


@dataclass(frozen=True)
class WorkersConfig:
    count: int = 2
    concurrency: int = 64  # requests in flight per worker
    chunk_bytes: int = 256 << 10  # planned chunk size; kept per job in its manifest


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_age: float = 86400.0
    budget: float = 0.2  # share of sends retries may take while first attempts are waiting


@dataclass(frozen=True)
class CsvConfig:
    header: bool = True
    id_column: str = "user_id"
    message_column: str = ""  # "" = use [alert] message
    delimiter: str = ","
    max_id_length: int = 256  # bytes
    max_line_bytes: int = 65536  # longer lines are rejected, skipped without being held


@dataclass(frozen=True)
class AlertConfig:
    message: str = "You have a new alert."


@dataclass(frozen=True)
class WalConfig:
    fsync: str = "interval"  # "interval" (group commit) or "always"
    fsync_interval: float = 0.05
    segment_bytes: int = 64 << 20
    retention: float = 86400.0  # rotated segments of finished jobs are kept this long


@dataclass(frozen=True)
class StatusConfig:
    listen: str = "alertd.sock"  # unix socket (relative to state_dir) or 127.0.0.1:PORT
    token: str = field(default="", repr=False)  # bearer token, required for a TCP listener


@dataclass(frozen=True)
class ShutdownConfig:
    grace: float = 30.0


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
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    source: Path | None = None  # the file this was loaded from

    @property
    def state_dir(self) -> Path:
        return self.paths.state_dir

    def status_address(self) -> tuple[str, Any]:
        """('unix', Path) or ('tcp', (host, port))."""
        return parse_listen(self.status.listen, self.paths.state_dir)


# ---------------------------------------------------------------- validation


def _fail(section: str, key: str, msg: str) -> ConfigError:
    return ConfigError(f"config: [{section}] {key} {msg}")


def _num(section: str, key: str, value: Any, *, minimum: float | None = None,
         positive: bool = False, integer: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise _fail(section, key, f"must be {kind}, got {value!r}")
    if positive and value <= 0:
        raise _fail(section, key, f"must be > 0, got {value!r}")
    if minimum is not None and value < minimum:
        raise _fail(section, key, f"must be >= {minimum:g}, got {value!r}")
    return value if integer else float(value)


def _str(section: str, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(section, key, f"must be a string, got {value!r}")
    return value


def _bool(section: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(section, key, f"must be true or false, got {value!r}")
    return value


def _path(section: str, key: str, value: Any, base: Path) -> Path:
    p = Path(_str(section, key, value))
    if not str(p):
        raise _fail(section, key, "must not be empty")
    return p if p.is_absolute() else (base / p)


def check_secret(secret: str, where: str) -> str:
    """A Standard Webhooks secret: `whsec_` + base64 of at least 16 bytes."""
    if not secret.startswith("whsec_"):
        raise ConfigError(f"config: {where}: a secret must start with 'whsec_'")
    try:
        raw = base64.b64decode(secret[6:], validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"config: {where}: a secret is not valid base64 after 'whsec_'") from None
    if len(raw) < 16:
        raise ConfigError(f"config: {where}: a secret must hold at least 16 bytes")
    return secret


def read_secrets_file(path: Path) -> tuple[str, ...]:
    """One secret per line; '#' comments. Refused when others may read it."""
    where = "[webhook] secrets_file"
    try:
        st = path.stat()
    except OSError as e:
        raise ConfigError(f"config: {where} {path}: {e.strerror}") from None
    if st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ConfigError(f"config: {where} {path} is readable by others (mode "
                          f"{stat.S_IMODE(st.st_mode):o}); chmod 600 it")
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config: {where} {path}: {e}") from None
    lines = [ln.strip() for ln in text.splitlines()]
    return tuple(check_secret(ln, where) for ln in lines if ln and not ln.startswith("#"))


def parse_listen(listen: str, state_dir: Path) -> tuple[str, Any]:
    host, sep, port = listen.rpartition(":")
    if sep and port.isdigit() and "/" not in listen:
        if host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
            raise ConfigError(f"config: [status] listen must be a unix socket path or a "
                              f"loopback address, got {listen!r}")
        return "tcp", (host.strip("[]"), int(port))
    p = Path(listen)
    return "unix", p if p.is_absolute() else state_dir / p


_SECTIONS: dict[str, type] = {
    "paths": PathsConfig, "webhook": WebhookConfig, "rate": RateConfig, "workers": WorkersConfig,
    "retry": RetryConfig, "csv": CsvConfig, "alert": AlertConfig, "wal": WalConfig,
    "status": StatusConfig, "shutdown": ShutdownConfig}


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    sec = raw.get(name, {})
    if not isinstance(sec, dict):
        raise ConfigError(f"config: [{name}] must be a table")
    known = {f.name for f in dataclasses.fields(_SECTIONS[name])}
    for key in sec:
        if key not in known:
            raise ConfigError(f"config: [{name}] unknown key {key!r} "
                              f"(known: {', '.join(sorted(known))})")
    return sec


def from_dict(raw: dict[str, Any], base: Path) -> Config:
    """Build a validated Config from parsed TOML; `base` resolves relative paths."""
    for name in raw:
        if name not in _SECTIONS:
            raise ConfigError(f"config: unknown section [{name}] "
                              f"(known: {', '.join(sorted(_SECTIONS))})")

    s = _section(raw, "paths")
    state_dir = _path("paths", "state_dir", s["state_dir"], base) if "state_dir" in s \
        else PathsConfig.state_dir
    inbox = _path("paths", "inbox", s["inbox"], base) if "inbox" in s else None
    paths = PathsConfig(state_dir=state_dir, inbox=inbox)

    s = _section(raw, "webhook")
    url = _str("webhook", "url", s.get("url", ""))
    if not url:
        raise _fail("webhook", "url", "is required (e.g. url = \"http://127.0.0.1:9000/hook\")")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _fail("webhook", "url", f"must be an http:// or https:// URL, got {url!r}")
    try:
        _ = parts.port  # urlsplit checks the port lazily
    except ValueError:
        raise _fail("webhook", "url", f"has a bad port: {url!r}") from None
    timeout = _num("webhook", "timeout", s.get("timeout", 10.0), positive=True)
    secrets_raw = s.get("secrets", [])
    if isinstance(secrets_raw, str):
        secrets_raw = [secrets_raw]
    if not isinstance(secrets_raw, list):
        raise _fail("webhook", "secrets", "must be a list of 'whsec_...' strings")
    secrets = [check_secret(_str("webhook", "secrets", x), "[webhook] secrets") for x in secrets_raw]
    secrets_file = None
    if "secrets_file" in s:
        secrets_file = _path("webhook", "secrets_file", s["secrets_file"], base)
        secrets += read_secrets_file(secrets_file)
    headers_raw = s.get("headers", {})
    if not isinstance(headers_raw, dict):
        raise _fail("webhook", "headers", "must be a table of name = \"value\"")
    headers = []
    for k, v in headers_raw.items():
        v = _str("webhook", f"headers.{k}", v)
        if not k or any(c in k for c in " :\r\n\t") or any(c in v for c in "\r\n"):
            raise _fail("webhook", f"headers.{k}", "is not a valid HTTP header")
        headers.append((k, v))
    webhook = WebhookConfig(url=url, timeout=timeout, secrets=tuple(secrets),
                            secrets_file=secrets_file, headers=tuple(headers))

    s = _section(raw, "rate")
    rate = RateConfig(limit=_num("rate", "limit", s.get("limit", 0.0), minimum=0),
                      burst=_num("rate", "burst", s.get("burst", 0.0), minimum=0),
                      adaptive=_bool("rate", "adaptive", s.get("adaptive", False)))

    s = _section(raw, "workers")
    workers = WorkersConfig(
        count=_num("workers", "count", s.get("count", 2), minimum=1, integer=True),
        concurrency=_num("workers", "concurrency", s.get("concurrency", 64), minimum=1, integer=True),
        chunk_bytes=_num("workers", "chunk_bytes", s.get("chunk_bytes", 256 << 10), minimum=1,
                         integer=True))
    if workers.count > 64:
        raise _fail("workers", "count", f"must be <= 64, got {workers.count}")
    if workers.concurrency > 4096:
        raise _fail("workers", "concurrency", f"must be <= 4096, got {workers.concurrency}")

    s = _section(raw, "retry")
    retry = RetryConfig(
        max_attempts=_num("retry", "max_attempts", s.get("max_attempts", 5), minimum=1, integer=True),
        base_delay=_num("retry", "base_delay", s.get("base_delay", 0.5), positive=True),
        max_delay=_num("retry", "max_delay", s.get("max_delay", 30.0), positive=True),
        max_age=_num("retry", "max_age", s.get("max_age", 86400.0), positive=True),
        budget=_num("retry", "budget", s.get("budget", 0.2), minimum=0))
    if retry.budget > 1:
        raise _fail("retry", "budget", f"must be a share between 0 and 1, got {retry.budget:g}")
    if retry.max_delay < retry.base_delay:
        raise _fail("retry", "max_delay", f"must be >= base_delay ({retry.base_delay:g}), "
                    f"got {retry.max_delay:g}")

    s = _section(raw, "csv")
    delimiter = _str("csv", "delimiter", s.get("delimiter", ","))
    if len(delimiter) != 1 or delimiter in "\"\r\n" or ord(delimiter) > 127:
        raise _fail("csv", "delimiter", f"must be one ASCII character other than a quote or "
                    f"newline, got {delimiter!r}")
    csvc = CsvConfig(header=_bool("csv", "header", s.get("header", True)),
                     id_column=_str("csv", "id_column", s.get("id_column", "user_id")),
                     message_column=_str("csv", "message_column", s.get("message_column", "")),
                     delimiter=delimiter,
                     max_id_length=_num("csv", "max_id_length", s.get("max_id_length", 256),
                                        minimum=1, integer=True),
                     max_line_bytes=_num("csv", "max_line_bytes", s.get("max_line_bytes", 65536),
                                         minimum=1, integer=True))
    if not csvc.id_column:
        raise _fail("csv", "id_column", "must not be empty")
    if not csvc.header:
        for key in ("id_column", "message_column"):
            v = getattr(csvc, key)
            if v and not v.isdigit() and not (key == "id_column" and v == "user_id"):
                raise _fail("csv", key, f"must be a column number (0 = first) when header = "
                            f"false, got {v!r}")

    s = _section(raw, "alert")
    alert = AlertConfig(message=_str("alert", "message", s.get("message", AlertConfig.message)))

    s = _section(raw, "wal")
    fsync = _str("wal", "fsync", s.get("fsync", "interval"))
    if fsync not in ("interval", "always"):
        raise _fail("wal", "fsync", f"must be \"interval\" or \"always\", got {fsync!r}")
    wal = WalConfig(fsync=fsync,
                    fsync_interval=_num("wal", "fsync_interval", s.get("fsync_interval", 0.05),
                                        positive=True),
                    segment_bytes=_num("wal", "segment_bytes", s.get("segment_bytes", 64 << 20),
                                       minimum=4096, integer=True),
                    retention=_num("wal", "retention", s.get("retention", 86400.0), minimum=0))

    s = _section(raw, "status")
    status = StatusConfig(listen=_str("status", "listen", s.get("listen", "alertd.sock")),
                          token=_str("status", "token", s.get("token", "")))
    kind, _ = parse_listen(status.listen, state_dir)
    if kind == "tcp" and not status.token:
        raise _fail("status", "token", "is required when [status] listen is a TCP address")

    s = _section(raw, "shutdown")
    shutdown = ShutdownConfig(grace=_num("shutdown", "grace", s.get("grace", 30.0), minimum=0))

    return Config(paths=paths, webhook=webhook, rate=rate, workers=workers, retry=retry,
                  csv=csvc, alert=alert, wal=wal, status=status, shutdown=shutdown)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def to_toml(sections: dict[str, dict[str, Any]],
            overrides: dict[str, dict[str, Any]] | None = None) -> str:
    """Render {section: {key: value}}, with `overrides` merged key by key, as a config
    file (for tests, benchmarks, demos)."""
    sections = {name: dict(keys) for name, keys in sections.items()}
    for name, keys in (overrides or {}).items():
        sections.setdefault(name, {}).update(keys)
    return "".join(f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in keys.items())
                   + "\n" for name, keys in sections.items())


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
    return dataclasses.replace(cfg, source=p.resolve())
