"""What in a config is secret or reaches the wire: signing secrets, the secrets file,
extra headers, TLS files; redaction of URLs; the warning for secrets in a readable file.

Leaf module (only errors). Every error names the key and never quotes a secret-bearing
value: a config error goes to logs, to `/v1/status` after a failed reload, and to a
terminal someone else may read.
"""
from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError


def fail(section: str, key: str, msg: str) -> ConfigError:
    return ConfigError(f"config: [{section}] {key} {msg}")


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


def check_headers(raw: Any) -> tuple[tuple[str, str], ...]:
    """[webhook] headers: the one place their names and values are validated (with the
    URL's credentials, config checks Authorization). Errors name the header, never its
    value (it may be a token)."""
    if not isinstance(raw, dict):
        raise fail("webhook", "headers", "must be a table of name = \"value\"")
    seen: set[str] = set()
    out = []
    for name, value in raw.items():
        token = bool(name) and set(name) <= _TOKEN
        where = f"headers.{name}" if token else f"headers.{name!r}"
        if not token:
            raise fail("webhook", where, "is not a valid header name (letters, digits and "
                       "!#$%&'*+-.^_`|~ only)")
        low = name.lower()
        if low in _OWN_HEADERS:
            raise fail("webhook", where, "is set by alertd itself and cannot be configured")
        if low in _FRAMING_HEADERS:
            raise fail("webhook", where, "controls how the request is framed or routed and "
                        "cannot be configured")
        if low in seen:
            raise fail("webhook", where, "is given twice (header names ignore case)")
        seen.add(low)
        if not isinstance(value, str):
            raise fail("webhook", where, "must be a string")
        for i, c in enumerate(value):
            o = ord(c)
            if o > 0xFF:
                raise fail("webhook", where, f"value has a character outside Latin-1 "
                            f"(U+{o:04X} at position {i})")
            if (o < 0x20 and c != "\t") or o == 0x7F:
                raise fail("webhook", where, f"value has a control character "
                            f"(U+{o:04X} at position {i})")
        out.append((name, value))
    return tuple(out)


def _no_password() -> bytes:
    return b""  # an encrypted key fails at load instead of prompting on a terminal


def check_tls_files(files: dict[str, Path], https: bool) -> None:
    """[webhook] ca_file, client_cert, client_key (those set): readable PEM files, checked
    now so a bad file is a config error, not a worker that fails every connection."""
    import ssl  # only here: config stays free of it unless TLS files are set

    if not files:
        return
    if not https:
        raise fail("webhook", sorted(files)[0], "is set but [webhook] url is not https://")
    if ("client_cert" in files) != ("client_key" in files):
        raise ConfigError("config: [webhook] client_cert and client_key go together (mTLS)")
    for key, path in files.items():
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise fail("webhook", key, f"{path}: {e.strerror}") from None
    ca, cert, key = files.get("ca_file"), files.get("client_cert"), files.get("client_key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=ca)
        except (ssl.SSLError, ValueError) as e:
            raise fail("webhook", "ca_file", f"{ca}: no PEM certificate in it ({e})") from None
    if cert is not None:
        try:
            ctx.load_cert_chain(cert, key, password=_no_password)
        except (ssl.SSLError, ValueError) as e:
            raise ConfigError(f"config: [webhook] client_cert {cert} / client_key {key}: not a "
                              f"PEM certificate and its matching unencrypted key ({e})") from None


_SECRET_HEADER = ("auth", "token", "key", "secret", "cookie", "session", "password")


def inline_secrets(secrets: bool, url: str, headers: tuple[tuple[str, str], ...],
                   token: str) -> list[str]:
    """Where a config file itself (not secrets_file) holds a secret, as `[section] key`."""
    where = ["[webhook] secrets"] if secrets else []
    if urlsplit(url).username is not None:
        where.append("[webhook] url (credentials)")
    where += [f"[webhook.headers] {k}" for k, _ in headers
              if any(w in k.lower() for w in _SECRET_HEADER)]
    if token:
        where.append("[status] token")
    return where


def exposed_secrets(path: Path, inline: list[str]) -> tuple[str, ...]:
    """A warning when a file others can read holds secrets inline (`inline`, as given by
    inline_secrets). Not refused (a demo on a laptop may not care), but said once, at
    start and at each reload."""
    if not inline:
        return ()
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return ()
    if not mode & stat.S_IROTH:
        return ()
    return (f"config: warning: {path} is readable by others (mode {mode:o}) and holds "
            f"secrets inline ({', '.join(inline)}): chmod 640 it, or move them out "
            f"(signing secrets to [webhook] secrets_file)",)
