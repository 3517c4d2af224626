"""Tests of the fused kernels (:mod:`cautious.backends.torch.fused`).

The Triton kernels run on the CPU through Triton's interpreter, which must be switched on
*before* triton is imported. Run this directory in its own process::

    TRITON_INTERPRET=1 python -m pytest tests/backend_fused -q -p no:cacheprovider

This conftest sets ``TRITON_INTERPRET=1`` itself when triton is not imported yet, so a plain
``pytest tests/backend_fused`` works too; if triton was already imported without it, the
Triton-backend tests are skipped (the native CPU and eager paths are still tested).
"""

import os
import sys

if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
