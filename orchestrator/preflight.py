"""Checks of a run's inputs made on the machine that starts it, before any resource is reserved.

The spec validator reads the shards' manifest when it can, but a spec submitted to a remote cluster is validated
where the data may not be: there a missing directory surfaced only when the ranks, already placed and started,
failed to size the vocabulary. The controller (on the head node) and `pretrain submit` (locally) check here first.
"""

from __future__ import annotations

import os
import socket

from dataprep import filesystem
from orchestrator.errors import UserError
from orchestrator.spec import JobSpec

MANIFEST = "manifest.json"


def check_data(spec: JobSpec) -> None:
    """Raise `UserError` unless `data.path` is a directory (or an object-store prefix) holding a shard manifest."""
    path = spec.data.path
    if not path:
        raise UserError("data.path: not set; point it at a directory written by `pretrain prep`")
    if filesystem.is_remote(path):
        if not filesystem.exists(filesystem.join(path, MANIFEST)):  # a refused credential: a StorageError, a UserError
            raise UserError(f"data.path: {path!r} holds no {MANIFEST}, so it is not the output of `pretrain prep`")
        return
    where = f"on {socket.gethostname()} (where the run starts; every node must see it, e.g. on a shared filesystem)"
    if not os.path.isdir(path):
        raise UserError(f"data.path: the directory {path!r} does not exist {where}")
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        raise UserError(f"data.path: {path!r} holds no {MANIFEST}, so it is not the output of `pretrain prep`; "
                        "run it first or point data.path at its output directory")
