"""`parse_size`: decimal and binary units both understood, the caller's unit for a bare number, readable errors."""

from __future__ import annotations

import pytest

from orchestrator.errors import UserError
from orchestrator.sizes import parse_size


@pytest.mark.parametrize(("text", "size"), [("5GB", 5 * 10**9), ("5 gib", 5 * 2**30), ("500MB", 500 * 10**6),
                                            ("500MiB", 500 * 2**20), ("1.5KB", 1500), ("2k", 2048), ("1T", 2**40),
                                            ("3TB", 3 * 10**12), ("1000000", 1000000), ("7B", 7)])
def test_decimal_and_binary_units(text, size):
    assert parse_size(text, "--size") == size


def test_a_bare_number_counts_the_callers_unit():
    assert parse_size("24", "--gpu-mem", bare=2**30) == 24 * 2**30
    assert parse_size("24MB", "--gpu-mem", bare=2**30) == 24 * 10**6


@pytest.mark.parametrize("text", ["lots", "0", "-5GB", "5 parsecs", "", "GB"])
def test_a_bad_size_names_the_flag_and_the_allowed_forms(text):
    with pytest.raises(UserError, match=rf"^--max-shard-size: {text!r} is not a size; use e.g. 5GB, 500MB"):
        parse_size(text, "--max-shard-size", examples="5GB, 500MB or 1000000")
