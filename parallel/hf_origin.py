"""A run started from a Hugging Face model keeps that model's identity: its tokenizer files, chat template,
generation config and config.json (special tokens) travel in every checkpoint, and an export writes them back.

    keep_origin(spec.checkpoint.init_from, "ckpt/step_20.partial", "ckpt")   # at save: step_20/hf_origin/...
    export_settings(spec, "ckpt/step_20", dtype=torch.bfloat16)              # an HFExport that writes them back

Why in each checkpoint rather than read from `checkpoint.init_from` at export: the Hugging Face directory may be
moved or deleted while the run goes on, and a checkpoint copied elsewhere must still export as the model it is.
The files are small (the largest, a tokenizer.json, a few to tens of MB) next to any checkpoint's weights; they are
listed in the manifest with their checksums like every other file. When `init_from` is gone by the time a resumed
run saves, the newest earlier checkpoint's copy is carried on.
"""

from __future__ import annotations

import os
import shutil

from orchestrator.spec import JobSpec
from parallel.checkpoint_layout import step_of
from parallel.hf import CONFIG, IDENTITY_FILES, TOKENIZER, HFExport, shard_tokenizer
from parallel.hf_families import family_for
from parallel.model import ModelDims

ORIGIN_DIR = "hf_origin"


def saved_origin(step_dir: str) -> str | None:
    """The identity kept in checkpoint `step_dir` (a directory of IDENTITY_FILES), or None for a run that was not
    started from a Hugging Face model. Absolute: export hands it to rank processes started in another directory."""
    path = os.path.abspath(os.path.join(step_dir, ORIGIN_DIR))
    return path if os.path.isfile(os.path.join(path, CONFIG)) else None


def _source(init_from: str, checkpoints: str | None) -> str | None:
    if init_from and os.path.isfile(os.path.join(init_from, CONFIG)):
        return init_from
    if not init_from or checkpoints is None or not os.path.isdir(checkpoints):
        return None
    steps = sorted((step, name) for name in os.listdir(checkpoints) if (step := step_of(name)) is not None)
    for _, name in reversed(steps):
        kept = saved_origin(os.path.join(checkpoints, name))
        if kept is not None:
            return kept
    return None


def keep_origin(init_from: str, step_dir: str, checkpoints: str | None) -> list[str]:
    """Copy the identity of the model the run started from into `step_dir`/hf_origin; the paths written.

    `checkpoints` is the local checkpoint directory (None on an object store), where an earlier step's copy is
    found when `init_from` no longer exists."""
    source = _source(init_from, checkpoints)
    if source is None:
        return []
    target = os.path.join(step_dir, ORIGIN_DIR)
    os.makedirs(target, exist_ok=True)
    written = []
    for name in IDENTITY_FILES:
        if os.path.isfile(os.path.join(source, name)):
            written.append(shutil.copyfile(os.path.join(source, name), os.path.join(target, name)))
    return written


def export_settings(spec: JobSpec, step_dir: str, **how) -> HFExport:
    """How checkpoint `step_dir` of `spec`'s run exports: its family, its context (model.max_positions, else
    data.seq_len), and the identity it kept, else the shards' tokenizer. A model no transformers architecture
    expresses is refused here, before any rank starts gathering it."""
    family_for(ModelDims.from_config(spec.model), spec.model.family)
    origin = saved_origin(step_dir)
    own_tokenizer = origin is not None and os.path.isfile(os.path.join(origin, TOKENIZER))
    return HFExport(max_positions=spec.model.max_positions or spec.data.seq_len, family=spec.model.family,
                    origin=origin, tokenizer=None if own_tokenizer else shard_tokenizer(spec.data.path), **how)
