"""Readers of what the experiment trackers wrote, each store read with its own tool: TensorBoard's
`EventAccumulator`, MLflow's `MlflowClient`, and W&B's own protobuf messages for its offline run file.

W&B writes a run as a LevelDB-style log of `wandb_internal_pb2.Record` messages after a 7-byte ":W&B" header, in
32 KiB blocks whose records carry a 7-byte header each (checksum, length, kind); W&B ships no reader of its own.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

Series = list[tuple[int, float]]


def tensorboard_scalars(directory: Path) -> dict[str, Series]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data, records, offset, block = path.read_bytes(), [], 7, 32768
    assert data[:4] == b":W&B"
    pending = b""
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        pending += data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_config(run_dir: Path) -> dict:
    """The config one offline run directory's attempt set (its last value of each key)."""
    (path,) = run_dir.glob("run-*.wandb")
    return {item.key: json.loads(item.value_json) for record in wandb_records(path)
            if record.WhichOneof("record_type") == "config" for item in record.config.update}


def wandb_history(run_dir: Path) -> tuple[str, dict[str, Series]]:
    """(run id, {name: [(step, value)]}) of one offline run directory."""
    (path,) = run_dir.glob("run-*.wandb")
    history: dict[str, Series] = {}
    run_id = ""
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "run":
            run_id = record.run.run_id
        elif record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for name, value in items.items():
                if name.startswith("pretrain_"):
                    history.setdefault(name, []).append((items["_step"], value))
    return run_id, history


def mlflow_history(client, run_id: str, name: str) -> Series:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
