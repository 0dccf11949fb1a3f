"""The naive baseline: what a user would write in an afternoon to do alertd's job.

One process, asyncio + aiohttp ClientSession, the CSV read line by line, 64
requests in flight, Standard Webhooks signing with hmac. Deliberately plain:
no retries, no durability; it is the yardstick, not a competitor.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import hashlib
import hmac
import json
import os
import sys
import time
from datetime import datetime, timezone

import aiohttp


async def deliver(url: str, path: str, secret: str, concurrency: int,
                  max_seconds: float) -> dict[str, float | int]:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    queue: asyncio.Queue = asyncio.Queue(maxsize=concurrency * 4)
    counts = {"delivered": 0, "failed": 0}
    deadline = time.monotonic() + max_seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            offset, user_id = item
            msg_id = f"j000001:{offset}"
            ts = str(int(time.time()))
            body = json.dumps({"type": "alert",
                               "timestamp": datetime.now(timezone.utc).isoformat(),
                               "data": {"user_id": user_id, "message": "You have a new alert.",
                                        "file": os.path.basename(path), "offset": offset}})
            sig = hmac.new(key, f"{msg_id}.{ts}.{body}".encode(), hashlib.sha256).digest()
            headers = {"content-type": "application/json", "webhook-id": msg_id,
                       "webhook-timestamp": ts,
                       "webhook-signature": "v1," + base64.b64encode(sig).decode()}
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    counts["delivered" if resp.status < 300 else "failed"] += 1
            except aiohttp.ClientError:
                counts["failed"] += 1

    t0 = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        tasks = [asyncio.create_task(worker(s)) for _ in range(concurrency)]
        offset = 0
        with open(path, newline="") as f:
            header = f.readline()
            offset += len(header.encode())
            idx = next(csv.reader([header])).index("user_id")
            for line in f:
                if time.monotonic() > deadline:
                    break  # the benchmark's time bound, not part of the naive design
                row = next(csv.reader([line]))
                await queue.put((offset, row[idx]))
                offset += len(line.encode())
        for _ in tasks:
            await queue.put(None)
        await asyncio.gather(*tasks)
    seconds = time.monotonic() - t0
    done = counts["delivered"] + counts["failed"]
    return {**counts, "rows": done, "seconds": round(seconds, 3),
            "deliveries_per_s": round(counts["delivered"] / seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="baseline", description=__doc__)
    ap.add_argument("--url", required=True)
    ap.add_argument("--csv", required=True)
    ap.add_argument("--secret", required=True)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-seconds", type=float, default=60.0)
    args = ap.parse_args(argv)
    r = asyncio.run(deliver(args.url, args.csv, args.secret, args.concurrency, args.max_seconds))
    t = os.times()
    r["cpu_us_per_delivery"] = round((t.user + t.system) / max(r["delivered"], 1) * 1e6, 1)
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
