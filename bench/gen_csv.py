"""Fast, deterministic CSV generator for alertd benchmarks and end-to-end tests.

Owns the input file format only (header, unique ids, optional message). It
never writes the final name until the file is complete: the rename is the
"file arrived" event for a watched inbox.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

# Rows per block. Lines have a fixed width, so line i of every block starts at
# i * width; a block differs from the previous one only in the digits of its
# block number, which a strided slice assignment rewrites in place (a C loop
# over one byte per line). Generating is then far cheaper than writing.
BLOCK_ROWS = 100_000
LINE_DIGITS = 5  # enough for BLOCK_ROWS - 1
BLOCK_DIGITS = 6  # 10**6 blocks * 10**5 rows: far beyond any file we write
TAG_LEN = 8


def _seed_tag(seed: int) -> bytes:
    # Hashing the seed makes neighbouring seeds produce visibly different ids.
    return hashlib.sha256(b"gen_csv:%d" % seed).hexdigest()[:TAG_LEN].encode()


def _line(tag: bytes, block: int, i: int, message: bool) -> bytes:
    """One row; always the same width for a given `message` flag."""
    uid = b"u%s%0*d%0*d" % (tag, BLOCK_DIGITS, block, LINE_DIGITS, i)
    if message:
        return b"%s,disk usage %02d pct on host-%03d\n" % (uid, i % 100, i % 997)
    return uid + b"\n"


def generate(path: str, rows: int, seed: int = 0, message: bool = False) -> int:
    """Write `rows` data rows to `path` (via `path`.tmp + rename); return bytes written."""
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    tag = _seed_tag(seed)
    header = b"user_id,message\n" if message else b"user_id\n"
    per_block = min(rows, BLOCK_ROWS)
    buf = bytearray(b"".join(_line(tag, 0, i, message) for i in range(per_block)))
    width = len(_line(tag, 0, 0, message))
    view = memoryview(buf)
    # One column of identical digit bytes per value, reused for every rewrite.
    fills = {d: bytes([d]) * per_block for d in b"0123456789"}
    first_digit = 1 + TAG_LEN  # after the leading "u"
    tmp = path + ".tmp"
    written = 0
    with open(tmp, "wb") as fh:
        fh.write(header)
        written += len(header)
        digits = b"%0*d" % (BLOCK_DIGITS, 0)
        block = 0
        left = rows
        while left > 0:
            new = b"%0*d" % (BLOCK_DIGITS, block)
            for j in range(BLOCK_DIGITS):
                if new[j] != digits[j]:
                    buf[first_digit + j::width] = fills[new[j]]
            digits = new
            n = min(left, per_block)
            written += fh.write(view[: n * width])
            left -= n
            block += 1
    os.replace(tmp, path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gen_csv", description=__doc__)
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--message", action="store_true", help="add a message column")
    args = ap.parse_args(argv)
    if args.rows < 0:
        ap.error(f"--rows must be >= 0, got {args.rows}")
    t0 = time.perf_counter()
    size = generate(args.out, args.rows, seed=args.seed, message=args.message)
    dt = max(time.perf_counter() - t0, 1e-9)
    mb = size / 1e6
    print(f"gen_csv: {args.rows} rows, {mb:.1f} MB in {dt:.2f} s ({mb / dt:.0f} MB/s)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
