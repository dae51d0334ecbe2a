"""The deterministic value formula the PyTorch fixture scripts and the Rust tests share.

tests/common/mod.rs mirrors these functions bit-exactly (splitmix64, uniform_pm1).
"""

import numpy as np


def splitmix64(x):
    """splitmix64 finaliser on a numpy uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniform_pm1(stream, n):
    """n float64 values in (-1, 1): top 24 bits of splitmix64(stream*2^40 + i)."""
    i = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = np.uint64(stream) * np.uint64(2**40) + i
    u = splitmix64(x) >> np.uint64(40)
    return (u.astype(np.float64) + 0.5) / 2.0**24 * 2.0 - 1.0


def formula_values(stream, n, scale):
    """uniform_pm1 * scale rounded to float32 (as the Rust tests' formula_values), as float64."""
    return (uniform_pm1(stream, n) * scale).astype(np.float32).astype(np.float64)
