"""splitmix64 (Steele, Lea and Flood 2014): the one 64-bit mixer behind every seeded coin and hash of the project.

MinHash word and shingle hashes, LSH band keys, the n-gram salts of the repetition filter, the train/validation
coin and the loader's Feistel rounds all go through it, so they must all use this definition: changing it changes
every shard that `pretrain prep` writes and every sample order that the loader computes.
"""

from __future__ import annotations

import numpy as np

GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio, the generator's increment
_MUL_A = np.uint64(0xBF58476D1CE4E5B9)
_MUL_B = np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective avalanche, so neighbouring inputs land far apart."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _MUL_A
        x = (x ^ (x >> np.uint64(27))) * _MUL_B
        return x ^ (x >> np.uint64(31))


def splitmix64(x: np.ndarray) -> np.ndarray:
    """One splitmix64 step of state `x`: turns weak polynomial hashes and small integers into well-spread ones."""
    with np.errstate(over="ignore"):
        return mix64(x + GOLDEN_GAMMA)
