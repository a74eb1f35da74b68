"""Sizes as people write them on the command line: '80GiB', '141 GB', '500MB', '1000000' → bytes.

KB, MB, GB and TB are decimal and KiB, MiB, GiB and TiB binary, as storage and memory makers write them; a bare
K, M, G or T is binary; case and a space before the unit do not matter. What a bare number counts is the caller's
choice (bytes for a file size, GiB for a GPU's memory), and so are the flag and examples its message names.
"""

from __future__ import annotations

import re

from orchestrator.errors import UserError

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40
UNITS = {"b": 1, "k": KiB, "kib": KiB, "kb": 10**3, "m": MiB, "mib": MiB, "mb": 10**6, "g": GiB, "gib": GiB,
         "gb": 10**9, "t": TiB, "tib": TiB, "tb": 10**12}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def parse_size(text: str, flag: str, *, bare: int = 1, what: str = "a size",
               examples: str = "5GB, 500MiB or 1000000") -> int:
    """Bytes of `text`; a number without a unit counts `bare` bytes. A `UserError` names `flag` otherwise."""
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or (unit and unit not in UNITS) or float(match.group(1)) <= 0:
        raise UserError(f"{flag}: {text!r} is not {what}; use e.g. {examples}")
    return int(float(match.group(1)) * UNITS.get(unit, bare))
