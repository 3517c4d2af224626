r"""Storage dtypes and the "compute in float32, round once" rule.

The reference computes every step in float64 and rounds each result once to its
storage dtype. For low-precision storage the contract that fast paths target is:

* ``float64`` storage: compute in float64.
* ``float32``, ``bfloat16`` and ``float16`` storage: compute in float32 (or
  better), then round **once** to the storage dtype, round-to-nearest-even
  (stochastic rounding is an opt-in alternative that backends document).

NumPy has no bfloat16, so the reference carries bfloat16 values in float32
arrays whose values are exactly representable in bfloat16;
:func:`round_to` performs the round-to-nearest-even with integer bit operations
(the same operations a Triton kernel uses, since the interpreter truncates).

Subnormals: XLA and TensorFlow on CPU flush subnormal inputs and results to
zero. The spec allows an implementation to treat any value whose magnitude is
below the smallest normal of its compute dtype as zero (of either sign); the
conformance bounds include one ``tiny`` of the compute dtype per operation, and a
mask decision that a flush could change is treated as undecided.
"""

from __future__ import annotations

import numpy as np

__all__ = ["STORAGE_DTYPES", "round_to", "compute_dtype", "unit_roundoff", "tiny", "numpy_dtype"]

STORAGE_DTYPES = ("float64", "float32", "bfloat16", "float16")

_EPS = {"float64": 2.0**-53, "float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}
_TINY = {
    "float64": float(np.finfo(np.float64).tiny),
    "float32": float(np.finfo(np.float32).tiny),
    "bfloat16": float(np.finfo(np.float32).tiny),
    "float16": float(np.finfo(np.float16).tiny),
}


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype that carries values of storage dtype ``name`` (bfloat16 -> float32)."""
    return np.dtype("float32" if name == "bfloat16" else name)


def compute_dtype(name: str) -> str:
    """The dtype a fast path computes in for storage dtype ``name``."""
    return "float64" if name == "float64" else "float32"


def unit_roundoff(name: str) -> float:
    """Half an ulp of 1.0: the relative error of one correctly rounded operation."""
    return _EPS[name]


def tiny(name: str) -> float:
    """The smallest positive normal number of ``name``."""
    return _TINY[name]


def _round_bf16(x: np.ndarray) -> np.ndarray:
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    bits = x32.view(np.uint32).astype(np.uint64)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) >> 16) << 16
    out = rounded.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x32), x32, out).reshape(np.shape(x))


def round_to(x: np.ndarray, name: str) -> np.ndarray:
    """Round ``x`` once, to nearest-even, to storage dtype ``name``; returns ``numpy_dtype(name)``.

    >>> import numpy as np
    >>> float(round_to(np.float64(1.0 + 2.0**-8), "bfloat16"))  # a tie: to even
    1.0
    >>> float(round_to(np.float64(1.0 + 3 * 2.0**-9), "bfloat16"))
    1.0078125
    """
    x = np.asarray(x)
    with np.errstate(over="ignore", invalid="ignore"):
        return _round_to(x, name)


def _round_to(x: np.ndarray, name: str) -> np.ndarray:
    if name == "bfloat16":
        # float64 -> float32 -> bfloat16 is a double rounding; it is exact unless
        # the float32 step lands on a bfloat16 tie, which we resolve from float64.
        x32 = x.astype(np.float32)
        r = _round_bf16(x32)
        if x.dtype == np.float64:
            tie = (x32.view(np.uint32) & 0xFFFF) == 0x8000
            if np.any(tie):
                up = _round_bf16(np.nextafter(x32, np.float32(np.inf)))
                down = _round_bf16(np.nextafter(x32, np.float32(-np.inf)))
                exact = x.astype(np.float64) == x32.astype(np.float64)
                r = np.where(tie & ~exact, np.where(x > x32, up, down), r)
        return r
    return x.astype(numpy_dtype(name))
