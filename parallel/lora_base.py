"""The frozen model under a LoRA run's adapters: recorded in each checkpoint, reloaded and checked on resume.

A LoRA checkpoint holds only what trains (the adapters, their optimizer state, the schedule; a few MB for a model of
GBs): the model they adapt is `checkpoint.init_from`'s. So each checkpoint records which one (`lora_base.json`: the
directory and a sha256 over its config.json and weight files), and a resume or an export
(`parallel.restore.load_engine`) loads those weights first, then the adapters on top. Adapters are only meaningful
on the weights they were trained with: a base whose files changed since is refused, naming both digests.

The digest reads every weight file once per process (about as long as loading them, from the page cache when the
weights were just loaded); a run whose base is random (no init_from) records the seed that drew it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any

from orchestrator.config_parser import load_json
from orchestrator.errors import CheckpointError
from orchestrator.spec import JobSpec
from parallel.engine import Engine
from parallel.hf import CONFIG, open_init_weights, weight_files

BASE_FILE = "lora_base.json"
_CHUNK = 1 << 24


def base_identity(spec: JobSpec) -> dict[str, Any]:
    """What the frozen model of `spec`'s run is: init_from's directory and digest, or the seed of random weights."""
    init_from = spec.checkpoint.init_from
    if not init_from:
        return {"init_from": "", "seed": spec.schedule.seed}
    directory = os.path.abspath(init_from)
    files = [os.path.join(directory, CONFIG), *weight_files(directory)]
    stamps = tuple((f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files)
    return {"init_from": directory, "sha256": _digest(stamps)}


@functools.cache
def _digest(stamps: tuple[tuple[str, int, int], ...]) -> str:
    """sha256 over each file's name and content (cached per path, size and modification time)."""
    total = hashlib.sha256()
    for path, _, _ in stamps:
        total.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                total.update(chunk)
    return total.hexdigest()


def record_base(spec: JobSpec, step_dir: str) -> list[str]:
    """Write `lora_base.json` into checkpoint `step_dir` of a LoRA run; the paths written (none otherwise)."""
    if not spec.model.lora.rank:
        return []
    path = os.path.join(step_dir, BASE_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(base_identity(spec), f, indent=2, sort_keys=True)
        f.write("\n")
    return [path]


def check_same_base(step_dir: str, spec: JobSpec) -> None:
    """A LoRA checkpoint's adapters go on the weights they were trained with: refuse any other base."""
    if not spec.model.lora.rank:
        return
    path = os.path.join(step_dir, BASE_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing; a checkpoint of a model.lora run records the model its adapters "
                              "were trained on")
    saved = load_json(path, error=CheckpointError)
    init_from = spec.checkpoint.init_from
    if init_from and not os.path.isdir(init_from):
        raise CheckpointError(f"checkpoint.init_from: {init_from} is gone; the LoRA checkpoint {step_dir} holds only "
                              f"adapters, trained on {saved.get('init_from')!r}: restore that directory")
    current = base_identity(spec)
    same = ("sha256", "seed")  # the content, wherever the directory now is
    if not isinstance(saved, dict) or any(saved.get(k) != current.get(k) for k in same):
        raise CheckpointError(f"{path}: the adapters were trained on {_describe(saved)}, but checkpoint.init_from "
                              f"now gives {_describe(current)}; point checkpoint.init_from at the model they were "
                              "trained on")


def _describe(identity: Any) -> str:
    if not isinstance(identity, dict):
        return repr(identity)
    if identity.get("init_from"):
        return f"{identity['init_from']} (sha256 {identity.get('sha256')})"
    return f"random weights of seed {identity.get('seed')}"


def load_base(spec: JobSpec, engine: Engine) -> None:
    """The frozen weights of a LoRA run from checkpoint.init_from, before its checkpoint's adapters are loaded."""
    if spec.model.lora.rank and spec.checkpoint.init_from:
        engine.load_full_state_dict(open_init_weights(spec.checkpoint.init_from, engine.model_dims))
