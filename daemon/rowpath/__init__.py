"""The row path: a span's lines -> parsed rows -> signed request bytes, and row outcomes
-> WAL records, a batch per call.

Two implementations with one interface and byte-identical output: `_fast` (compiled with
Cython, built in place by `make install`) and `pure` (today's per-row functions, the
reference). ALERTD_PURE_PYTHON=1 forces the reference; without the compiled module the
reference is used and one warning says so.
"""
from __future__ import annotations

import importlib
import logging
import os

from . import pure
from .span import Batch, Reject, WalRow, read_span, request_head

log = logging.getLogger("alertd.rowpath")

if os.environ.get("ALERTD_PURE_PYTHON") == "1":
    impl = pure
else:
    try:
        impl = importlib.import_module(f"{__name__}._fast")  # names the module if missing
    except ImportError as e:
        log.warning("rowpath: the compiled row path is not built (%s); using pure Python, "
                    "several times slower per row (make install builds it)", e)
        impl = pure

IMPL = "pure" if impl is pure else "compiled"
Requests = impl.Requests
RowBatcher = impl.RowBatcher
encode_wal_rows = impl.encode_wal_rows

__all__ = ["IMPL", "Batch", "Reject", "Requests", "RowBatcher", "WalRow", "encode_wal_rows",
           "read_span", "request_head"]
