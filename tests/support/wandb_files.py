"""Read wandb's offline run files (run-<id>.wandb) back, for the tests.

The file is LevelDB's log format: a 7-byte header (":W&B", magic 0xBEE1, version 0), then 32 KiB
blocks of records, each with a 7-byte header (crc32c, length, type: 1 full, 2 first, 3 middle,
4 last); each reassembled record is a protobuf `Record` from wandb's own definitions."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb data file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # the block's tail is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:
            pos += room
            continue
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        pending += payload
        if kind in (1, 4):  # full, or last piece
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            pending = b""
            yield rec


def history(path: Path) -> list[dict]:
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows


def run_id(path: Path) -> str:
    return next(rec.run.run_id for rec in records(path) if rec.WhichOneof("record_type") == "run")


def config(path: Path) -> dict:
    """The run's config: given at init (in the run record) or updated later (config records)."""
    out = {}
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        updates = rec.run.config.update if kind == "run" else rec.config.update if kind == "config" else []
        out.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in updates})
    return out
