"""The configurations the distributed tests run, named once (no framework imports: the test modules load it).

Each PyTorch world size is one launch of ``torch_workers.py`` that runs every
scenario below in the same processes (spawning is the slow part), and writes one
JSON record per scenario; the tests read the records.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

WORLD_SIZES = (2, 4)
STEPS = 20

# Hyperparameters per rule, spec names (the cautious.torch optimizers take the same keywords). Learning
# rates are large enough that the mask changes along the 20 steps; Adam has coupled L2 decay, AdamW
# cautious decoupled decay, SGD Nesterov momentum: every branch of the step that touches the count.
RULES = {
    "adam": dict(lr=1e-2, weight_decay=1e-2),
    "adamw": dict(lr=1e-2, weight_decay=0.1, cautious_weight_decay=True),
    "lion": dict(lr=1e-3, weight_decay=0.1),
    "sgd": dict(lr=0.05, momentum=0.9, nesterov=True),
}
NORMALIZATIONS = ("mean_clamp", "count_plus_one", "exact", "none")
PATHS = ("single", "foreach", "fused")  # fused: the native CPU kernels
# How the parameters are distributed: distribute_tensor with one placement (Shard(1) puts 1-d tensors on
# Shard(0)), or FSDP2's fully_shard (Shard(0) of every parameter, gradients reduce-scattered).
LAYOUTS = ("shard0", "shard1", "replicate", "fsdp2")


def _paths(world: int, n: int) -> list[tuple[str, ...]]:
    """Which paths the ``n``-th configuration runs at ``world`` processes.

    At 2 processes every path; at 4 the paths take turns (each configuration runs on one
    path, each path on a third of the configurations), which keeps the group within its
    time budget on 2 cores while every (layout, rule, normalization) still runs at 4.
    """
    return [PATHS] if world == min(WORLD_SIZES) else [(PATHS[n % len(PATHS)],)]


def trajectory_ids(world: int) -> list[str]:
    """``layout-rule-normalize-path``: 20 steps of the tiny transformer, sharded vs unsharded."""
    configs = [(lay, r, n) for lay in LAYOUTS for r in RULES for n in NORMALIZATIONS]
    return [f"{lay}-{r}-{n}-{p}" for i, (lay, r, n) in enumerate(configs) for p in _paths(world, i)[0]]


def global_count_ids(world: int) -> list[str]:
    """``count-layout-rule-path``: crafted data whose per-shard counts give a different scale."""
    configs = [(lay, r) for lay in ("shard0", "shard1") for r in RULES]
    return [f"count-{lay}-{r}-{p}" for i, (lay, r) in enumerate(configs) for p in _paths(world, i)[0]]


def wrapper_ids(world: int) -> list[str]:
    """``ddp-rule-path`` and ``zero-rule-path``: DDP and ZeroRedundancyOptimizer around cautious.torch."""
    configs = [(w, r) for w in ("ddp", "zero") for r in RULES]
    return [f"{w}-{r}-{p}" for i, (w, r) in enumerate(configs) for p in _paths(world, i)[0]]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run_workers(script: str, args: list[str], out: Path, timeout: float) -> tuple[dict[str, dict], str]:
    """Run ``script`` (a worker program in this directory) and read the JSON records it wrote to ``out``.

    Returns ``(records by id, a tail of the program's output)``. A crash or a timeout leaves the
    records written so far; the caller reports the missing ones with the output tail.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, str(HERE / script), *args, "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        tail = f"exit code {proc.returncode}\n{(proc.stdout + proc.stderr)[-4000:]}"
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"") + (e.stderr or b"")
        text = text.decode(errors="replace") if isinstance(text, bytes) else text
        tail = f"timed out after {timeout} s\n{text[-4000:]}"
    records: dict[str, dict] = {}
    if out.exists():
        for line in out.read_text().splitlines():
            rec = json.loads(line)
            records[rec["id"]] = rec
    return records, tail
