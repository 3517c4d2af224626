"""The GPU benchmark script runs end to end (tiny sizes, Triton interpreter on the CPU)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
from fused_testlib import triton_ok

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not triton_ok(), reason="needs TRITON_INTERPRET=1 and triton")
def test_bench_fused_gpu_dry_run():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_fused_gpu.py"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "fused path: triton" in out
    for name in (
        "ours cautious AdamW",
        "ours cautious Lion",
        "ours cautious SGD-momentum",
        "torch AdamW fused",
    ):
        assert out.count(name) >= 2, out  # float32 and mixed-precision cases
