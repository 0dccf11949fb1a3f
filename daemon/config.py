"""The TOML configuration: frozen dataclasses and `load(path) -> Config`.

Leaf module. It raises ConfigError naming the offending key and never exits:
the CLI maps errors to exit codes. Relative paths are resolved against the
directory of the config file, so a unit file and a demo behave the same.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import re
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
    ca_file: Path | None = None  # CA bundle that replaces the system CAs (private CAs)
    client_cert: Path | None = None  # mTLS: PEM certificate (chain), with client_key
    client_key: Path | None = None


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
    # One line each, for the operator (e.g. secrets inline in a file others can read);
    # not part of the value, so a reload that only changes a warning changes nothing.
    warnings: tuple[str, ...] = field(default=(), compare=False)

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


def _secret_str(section: str, key: str, value: Any) -> str:
    """Like _str for a value that may be a secret: the error names its type, never the value."""
    if not isinstance(value, str):
        raise _fail(section, key, f"must be a string, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    kinds = {bool: "true/false", int: "an integer", float: "a number", list: "an array",
             dict: "a table"}
    return kinds.get(type(value), type(value).__name__)


def redact_url(url: str) -> str:
    """`url` with its user:password part shown as '***', for every log line, status field
    and error that shows a URL. It works on strings urlsplit would refuse (a bad port) and
    errs on the safe side: everything up to the last '@' after the scheme is hidden."""
    start = url.find("://")
    start = start + 3 if start >= 0 else 0
    at = url.rfind("@", start)
    return url if at < 0 else url[:start] + "***" + url[at:]


_URL_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^\s'\"]*@")


def redact(text: str) -> str:
    """Every URL in free text with its credentials hidden (see redact_url)."""
    return _URL_CREDENTIALS.sub(r"\1***@", text)


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
    """One secret per line; '#' comments. Refused when others may read it, when anyone but
    its owner (and root) may write it, or when it is a symlink (whoever can change the link
    chooses the keys)."""
    where = "[webhook] secrets_file"
    try:
        st = path.lstat()
    except OSError as e:
        raise ConfigError(f"config: {where} {path}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"config: {where} {path} is a symlink; point at the file itself")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"config: {where} {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IROTH:
        raise ConfigError(f"config: {where} {path} is readable by others (mode {mode:o}); "
                          "chmod 600 it, or 640 root:alertd")
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"config: {where} {path} is writable by group or others (mode "
                          f"{mode:o}); only its owner may change the keys: chmod 600 it")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"config: {where} {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config: {where} {path}: not UTF-8 text") from None
    lines = [ln.strip() for ln in text.splitlines()]
    return tuple(check_secret(ln, where) for ln in lines if ln and not ln.startswith("#"))


# Headers alertd writes itself, or that change how the request is framed or routed: a
# second Content-Length or Host is a request-smuggling shape behind a proxy.
_OWN_HEADERS = frozenset({"content-type", "webhook-id", "webhook-timestamp", "webhook-signature"})
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "host", "connection",
                              "keep-alive", "proxy-connection", "te", "trailer", "upgrade",
                              "expect"})
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def check_headers(raw: Any, has_credentials: bool = False) -> tuple[tuple[str, str], ...]:
    """[webhook] headers: the one place their names and values are validated. Errors
    name the header, never its value (it may be a token)."""
    if not isinstance(raw, dict):
        raise _fail("webhook", "headers", "must be a table of name = \"value\"")
    seen: set[str] = set()
    out = []
    for name, value in raw.items():
        token = bool(name) and set(name) <= _TOKEN
        where = f"headers.{name}" if token else f"headers.{name!r}"
        if not token:
            raise _fail("webhook", where, "is not a valid header name (letters, digits and "
                        "!#$%&'*+-.^_`|~ only)")
        low = name.lower()
        if low in _OWN_HEADERS:
            raise _fail("webhook", where, "is set by alertd itself and cannot be configured")
        if low in _FRAMING_HEADERS:
            raise _fail("webhook", where, "controls how the request is framed or routed and "
                        "cannot be configured")
        if low == "authorization" and has_credentials:
            raise _fail("webhook", where, "conflicts with the credentials in [webhook] url")
        if low in seen:
            raise _fail("webhook", where, "is given twice (header names ignore case)")
        seen.add(low)
        if not isinstance(value, str):
            raise _fail("webhook", where, "must be a string")
        for i, c in enumerate(value):
            o = ord(c)
            if o > 0xFF:
                raise _fail("webhook", where, f"value has a character outside Latin-1 "
                            f"(U+{o:04X} at position {i})")
            if (o < 0x20 and c != "\t") or o == 0x7F:
                raise _fail("webhook", where, f"value has a control character "
                            f"(U+{o:04X} at position {i})")
        out.append((name, value))
    return tuple(out)


def _no_password() -> bytes:
    return b""  # an encrypted key fails at load instead of prompting on a terminal


def _tls_files(s: dict[str, Any], base: Path, https: bool
               ) -> tuple[Path | None, Path | None, Path | None]:
    """[webhook] ca_file, client_cert, client_key: readable PEM files, checked now so a
    bad file is a config error, not a worker that fails every connection."""
    import ssl  # only here: the rest of config stays free of it

    files = {k: _path("webhook", k, s[k], base) for k in ("ca_file", "client_cert", "client_key")
             if k in s}
    if not files:
        return None, None, None
    if not https:
        raise _fail("webhook", sorted(files)[0], "is set but [webhook] url is not https://")
    if ("client_cert" in files) != ("client_key" in files):
        raise ConfigError("config: [webhook] client_cert and client_key go together (mTLS)")
    for key, path in files.items():
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise _fail("webhook", key, f"{path}: {e.strerror}") from None
    ca, cert, key = files.get("ca_file"), files.get("client_cert"), files.get("client_key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=ca)
        except (ssl.SSLError, ValueError) as e:
            raise _fail("webhook", "ca_file", f"{ca}: no PEM certificate in it ({e})") from None
    if cert is not None:
        try:
            ctx.load_cert_chain(cert, key, password=_no_password)
        except (ssl.SSLError, ValueError) as e:
            raise ConfigError(f"config: [webhook] client_cert {cert} / client_key {key}: not a "
                              f"PEM certificate and its matching unencrypted key ({e})") from None
    return ca, cert, key



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
        raise _fail("webhook", "url", f"must be an http:// or https:// URL, got "
                    f"{redact_url(url)!r}")
    try:
        _ = parts.port  # urlsplit checks the port lazily
    except ValueError:
        raise _fail("webhook", "url", f"has a bad port: {redact_url(url)!r}") from None
    timeout = _num("webhook", "timeout", s.get("timeout", 10.0), positive=True)
    secrets_raw = s.get("secrets", [])
    if isinstance(secrets_raw, str):
        secrets_raw = [secrets_raw]
    if not isinstance(secrets_raw, list):
        raise _fail("webhook", "secrets", "must be a list of 'whsec_...' strings")
    secrets = [check_secret(_secret_str("webhook", "secrets", x), "[webhook] secrets")
               for x in secrets_raw]
    secrets_file = None
    if "secrets_file" in s:
        secrets_file = _path("webhook", "secrets_file", s["secrets_file"], base)
        secrets += read_secrets_file(secrets_file)
    headers = check_headers(s.get("headers", {}), has_credentials=parts.username is not None)
    ca_file, client_cert, client_key = _tls_files(s, base, https=parts.scheme == "https")
    webhook = WebhookConfig(url=url, timeout=timeout, secrets=tuple(secrets),
                            secrets_file=secrets_file, headers=headers, ca_file=ca_file,
                            client_cert=client_cert, client_key=client_key)

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
                          token=_secret_str("status", "token", s.get("token", "")))
    kind, _ = parse_listen(status.listen, state_dir)
    if kind == "tcp" and not status.token:
        raise _fail("status", "token", "is required when [status] listen is a TCP address")

    s = _section(raw, "shutdown")
    shutdown = ShutdownConfig(grace=_num("shutdown", "grace", s.get("grace", 30.0), minimum=0))

    return Config(paths=paths, webhook=webhook, rate=rate, workers=workers, retry=retry,
                  csv=csvc, alert=alert, wal=wal, status=status, shutdown=shutdown)




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
    return dataclasses.replace(cfg, source=p.resolve(), warnings=_exposed_secrets(p, raw, cfg))


_SECRET_HEADER = ("auth", "token", "key", "secret", "cookie", "session", "password")


def _inline_secrets(raw: dict[str, Any], cfg: Config) -> list[str]:
    """Where the file itself (not secrets_file) holds a secret, as `[section] key` names."""
    where = []
    if raw.get("webhook", {}).get("secrets"):
        where.append("[webhook] secrets")
    if urlsplit(cfg.webhook.url).username is not None:
        where.append("[webhook] url (credentials)")
    where += [f"[webhook.headers] {k}" for k, _ in cfg.webhook.headers
              if any(w in k.lower() for w in _SECRET_HEADER)]
    if cfg.status.token:
        where.append("[status] token")
    return where


def _exposed_secrets(path: Path, raw: dict[str, Any], cfg: Config) -> tuple[str, ...]:
    """A warning when a file others can read holds secrets inline. Not refused (a demo on
    a laptop may not care), but said once, at start and at each reload."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return ()
    where = _inline_secrets(raw, cfg) if mode & stat.S_IROTH else []
    if not where:
        return ()
    return (f"config: warning: {path} is readable by others (mode {mode:o}) and holds "
            f"secrets inline ({', '.join(where)}): chmod 640 it, or move them out "
            f"(signing secrets to [webhook] secrets_file)",)
