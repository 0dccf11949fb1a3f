"""File names from producers: one printable, reversible escaping, and bounded state-dir names.

A Linux name is bytes (up to 255, anything but "/" and NUL). Everywhere alertd shows
or records a name (manifest, summary, payload `file`, rejects, DLQ, logs) it uses
`escape()`; the state directory's own names use `state_name()`. Leaf module: no I/O.
"""
from __future__ import annotations

import os
import re

# Escaped bytes of a file name kept in spool/, done/ and failed/ names: with the job id,
# ".reason" and write_atomic's ".<name>.tmp" this stays well inside NAME_MAX (255).
MAX_STATE_NAME = 180
_PLAIN = re.compile(r"[ -\[\]-~]*")  # printable ASCII except the backslash
_ESCAPE = re.compile(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|\\)")


def escape(raw: bytes | str) -> str:
    """The printable, valid-UTF-8 form of a file name; `unescape` gives the bytes back.

    UTF-8 text stays as it is; each byte that is not UTF-8 and each ASCII control
    character becomes `\\xNN`, other unprintable characters (line separators, C1
    controls) `\\uNNNN`, and a backslash `\\\\`. A str is taken as os.fsdecode gives it.
    """
    if isinstance(raw, str):
        raw = os.fsencode(raw)
    text = raw.decode("utf-8", "surrogateescape")
    if _PLAIN.fullmatch(text):
        return text
    out = []
    for ch in text:
        o = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= o <= 0xDCFF:  # a byte that is not UTF-8 (surrogateescape)
            out.append(f"\\x{o - 0xDC00:02x}")
        elif ch.isprintable():
            out.append(ch)
        elif o < 0x80:
            out.append(f"\\x{o:02x}")
        elif o <= 0xFFFF:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    return "".join(out)


def unescape(name: str) -> bytes:
    """The original bytes of an escaped name (for operators and tests)."""
    def one(m: re.Match[str]) -> str:
        e = m.group(1)
        if e == "\\":
            return "\\"
        o = int(e[1:], 16)
        return chr(0xDC00 + o) if e[0] == "x" and o >= 0x80 else chr(o)
    return _ESCAPE.sub(one, name).encode("utf-8", "surrogateescape")


def state_name(job_id: str, escaped: str) -> str:
    """`<job>--<escaped name>`, shortened to MAX_STATE_NAME bytes of name when needed.

    A shortened name keeps its start, a "~" and its extension; the manifest keeps the
    whole name, so nothing is lost.
    """
    b = escaped.encode()
    if len(b) <= MAX_STATE_NAME:
        return f"{job_id}--{escaped}"
    _, dot, ext = escaped.rpartition(".")
    tail = ("~." + ext) if dot and len(ext.encode()) <= 16 else "~"
    room = MAX_STATE_NAME - len(tail.encode())
    head = b[:room].decode("utf-8", "ignore")  # never split a character
    return f"{job_id}--{head}{tail}"
