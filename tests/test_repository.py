"""The repository stands alone: no tracked file reads or names anything beside the checkout."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Built from parts, so this file does not name them itself.
OUTSIDE = (b"../" + b"shared", b"PRETRAIN_" + b"SHARED")


def tracked_files() -> list[Path]:
    """`git ls-files` of the checkout; skips where the repo is not one (an unpacked sdist or tarball)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    top = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != REPO:
        pytest.skip(f"{REPO} is not a git checkout")
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True).stdout
    return [REPO / name.decode() for name in listed.split(b"\0") if name]


def test_no_tracked_file_refers_outside_the_repository():
    files = [path for path in tracked_files() if path.is_file()]
    assert len(files) > 10, "git ls-files listed the checkout"
    found = []
    for path in files:
        data = path.read_bytes()
        found += [f"{path.relative_to(REPO)}: {needle.decode()}" for needle in OUTSIDE if needle in data]
    assert not found, "tracked files refer outside the repository (copy what they need into it):\n" + "\n".join(found)
