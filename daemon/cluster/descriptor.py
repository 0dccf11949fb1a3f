"""Chunk descriptors as Redis stream fields (strings only), and back.

A descriptor names a byte range of a spool file by its path relative to the shared
state dir, so nodes may mount the storage at different places.
"""
from __future__ import annotations

from pathlib import Path

import orjson

from ..protocol import Chunk, CsvLayout


def to_fields(chunk: Chunk, state_dir: Path) -> dict[str, str]:
    """A chunk as stream fields. Its path is relative to the shared state dir (each
    node may mount it elsewhere); done/prior are not sent: the taker recomputes them
    from the WALs on the shared storage."""
    lay = chunk.layout
    layout = {"delimiter": lay.delimiter.decode(), "ncols": lay.ncols, "id_index": lay.id_index,
              "msg_index": lay.msg_index, "max_id_length": lay.max_id_length,
              "max_line_bytes": lay.max_line_bytes,
              "data_columns": [list(c) for c in lay.data_columns], "data_rest": lay.data_rest,
              "letters": lay.letters}
    return {"v": "1", "job": chunk.job, "path": str(Path(chunk.path).relative_to(state_dir)),
            "name": chunk.name, "seq": str(chunk.seq), "start": str(chunk.start),
            "end": str(chunk.end), "layout": orjson.dumps(layout).decode(),
            "started_at": repr(chunk.started_at)}


def from_fields(fields: dict[str, str], state_dir: Path) -> Chunk:
    lay = orjson.loads(fields["layout"])
    layout = CsvLayout(lay["delimiter"].encode(), lay["ncols"], lay["id_index"], lay["msg_index"],
                       lay["max_id_length"], lay["max_line_bytes"],
                       tuple((n, i) for n, i in lay["data_columns"]), lay["data_rest"],
                       lay.get("letters", False))
    return Chunk(fields["job"], str(state_dir / fields["path"]), fields["name"],
                 int(fields["seq"]), int(fields["start"]), int(fields["end"]), layout,
                 float(fields["started_at"]))
