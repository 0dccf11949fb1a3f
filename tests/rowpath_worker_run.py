"""One real Worker in this process, with time.time() frozen, on one chunk of a CSV file,
against a raw HTTP receiver in the same loop: used by tests/test_rowpath_worker.py to run
the same input through both row paths (ALERTD_PURE_PYTHON=1 or not) and compare bytes.

python -m tests.rowpath_worker_run OUT_DIR CSV_FILE MODE   (MODE: plain | fields)
Writes OUT_DIR/requests.jsonl (every request as received, in arrival order), the worker's
state dir OUT_DIR/state, and prints {"impl": ..., "counts": ...} as JSON.
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

FROZEN = 1_767_225_600.125  # every clock read of the worker: timestamps and signatures too


async def _receiver(log: list[bytes]) -> tuple[asyncio.AbstractServer, int]:
    """Answers 503 to the first attempt of every 7th row (a retry, rebuilt), 200 else."""
    seen: set[bytes] = set()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                n = int(head.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
                body = await r.readexactly(n)
                log.append(head + body)
                uid = json.loads(body)["data"]["user_id"].encode()
                retry = uid.endswith(b"7") and uid not in seen
                seen.add(uid)
                w.write(b"HTTP/1.1 503 No\r\nContent-Length: 0\r\nRetry-After: 0\r\n\r\n"
                        if retry else b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def main(out: Path, csv: Path, mode: str) -> None:
    time.time = lambda: FROZEN  # before alertd is imported: every module reads it from here
    from alertd import config, rowpath, worker
    from alertd.protocol import Chunk, ChunkAck, CsvLayout, Drain
    from alertd.shm import Shared

    log: list[bytes] = []
    layout = (CsvLayout(ncols=3, id_index=0, msg_index=1, max_line_bytes=200,
                        data_columns=(("region", 2),)) if mode == "fields"
              else CsvLayout(ncols=0, max_line_bytes=200))
    data = csv.read_bytes()
    start = data.index(b"\n") + 1

    async def run() -> Any:
        server, port = await _receiver(log)
        cfg = config.from_dict({
            "paths": {"state_dir": str(out / "state")},
            "webhook": {"url": f"http://127.0.0.1:{port}/hook", "timeout": 5.0,
                        "secrets": ["whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]},
            "alert": {"message": "default message"},
            "workers": {"count": 1, "concurrency": 1},  # one at a time: arrival order is fixed
            "retry": {"max_attempts": 3, "base_delay": 0.01, "max_delay": 0.02}}, out)
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        w = worker.Worker(0, child, cfg, Shared.create(ctx))
        parent.send(Chunk("j000001", str(csv), csv.name, 0, start, len(data), layout, FROZEN))
        task = asyncio.ensure_future(w.run())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            while parent.poll():
                msg = parent.recv()
                if isinstance(msg, ChunkAck):
                    parent.send(Drain())
                    await asyncio.wait_for(task, 10)
                    server.close()
                    return msg
            await asyncio.sleep(0.01)
        raise SystemExit("the chunk never finished")

    ack = asyncio.run(run())
    (out / "requests.jsonl").write_text("".join(json.dumps(r.decode()) + "\n" for r in log))
    print(json.dumps({"impl": rowpath.IMPL, "counts": ack.counts.as_dict()}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
