"""The configurations the distributed tests run, named once (no framework imports: the test modules load it).

Each PyTorch world size is one launch of ``torch_workers.py`` that runs every
scenario below in the same processes (spawning is the slow part), and writes one
JSON record per scenario; the tests read the records.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

WORLD_SIZES = (2, 4)
STEPS = 20
# Steps also checked against the spec within the conformance bounds (every step is compared with the
# unsharded optimizer); the spec check costs most of a scenario's time, so not all 20.
SPEC_CHECKED_STEPS = (1, 2, 5, 10, 15, 20)

# Hyperparameters per rule, spec names (the cautious.torch optimizers take the same keywords). Learning
# rates are large enough that the mask changes along the 20 steps; Adam has coupled L2 decay, AdamW
# cautious decoupled decay, SGD Nesterov momentum: every branch of the step that touches the count.
RULES = {
    "adam": dict(lr=1e-2, weight_decay=1e-2),
    "adamw": dict(lr=1e-2, weight_decay=0.1, cautious_weight_decay=True),
    "lion": dict(lr=1e-3, weight_decay=0.1),
    "sgd": dict(lr=0.05, momentum=0.9, nesterov=True),
}
# The AdamW-family rules added with their fused kernels: NAdamW, ADOPT (step 1 moves nothing) and LaProp
# (decay after the move). Not in the full grid (its time budget): see more_rule_ids.
MORE_RULES = {
    "nadam": dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, cautious_weight_decay=True),
    "adopt": dict(lr=1e-2, weight_decay=1e-2),
    "laprop": dict(lr=1e-2, weight_decay=0.1),
}
HPARAMS = {**RULES, **MORE_RULES}
NORMALIZATIONS = ("mean_clamp", "count_plus_one", "exact", "none")
PATHS = ("single", "foreach", "fused")  # fused: the native CPU kernels
# How the parameters are distributed: distribute_tensor with one placement (Shard(1) puts 1-d tensors on
# Shard(0)), or FSDP2's fully_shard (Shard(0) of every parameter, gradients reduce-scattered).
LAYOUTS = ("shard0", "shard1", "replicate", "fsdp2")


def _full(world: int) -> bool:
    """Whether ``world`` runs the full grid (the smallest world size) or a covering subset.

    At 4 processes each configuration runs once, with the normalizations and paths taking
    turns, so every rule and layout, and every normalization and path, still runs at 4 while
    the group keeps within its time budget on 2 cores.
    """
    return world == min(WORLD_SIZES)


def trajectory_ids(world: int) -> list[str]:
    """``layout-rule-normalize-path``: 20 steps of the tiny transformer, sharded vs unsharded."""
    if _full(world):
        return [f"{lay}-{r}-{n}-{p}" for lay in LAYOUTS for r in RULES for n in NORMALIZATIONS for p in PATHS]
    configs = [(lay, r) for lay in LAYOUTS for r in RULES]
    return [
        f"{lay}-{r}-{NORMALIZATIONS[(i + i // len(RULES)) % len(NORMALIZATIONS)]}-{PATHS[i % len(PATHS)]}"
        for i, (lay, r) in enumerate(configs)
    ]


def more_rule_ids(world: int) -> list[str]:
    """Trajectories (``layout-rule-normalize-path``) of :data:`MORE_RULES`: each on a sharded layout with
    the fused kernels, on FSDP2 and on a replicated one with the loops, at the smallest world size."""
    if world != min(WORLD_SIZES):
        return []
    layouts = (("shard1", "fused"), ("fsdp2", "fused"), ("shard0", "single"), ("replicate", "foreach"))
    return [f"{lay}-{r}-{NORMALIZATIONS[i % 3]}-{p}" for r in MORE_RULES for i, (lay, p) in enumerate(layouts)]


def _with_paths(world: int, configs: list[str]) -> list[str]:
    if _full(world):
        return [f"{c}-{p}" for c in configs for p in PATHS]
    return [f"{c}-{PATHS[i % len(PATHS)]}" for i, c in enumerate(configs)]


def global_count_ids(world: int) -> list[str]:
    """``count-layout-rule-path``: crafted data whose per-shard counts give a different scale."""
    return _with_paths(world, [f"count-{lay}-{r}" for lay in ("shard0", "shard1") for r in RULES])


def wrapper_ids(world: int) -> list[str]:
    """``ddp-rule-path`` and ``zero-rule-path``: DDP and ZeroRedundancyOptimizer around cautious.torch."""
    return _with_paths(world, [f"{w}-{r}" for w in ("ddp", "zero") for r in RULES])


def refusal_ids(world: int) -> list[str]:
    """``refuse-2d``: DTensor parameters on a 2-d mesh (HSDP, 2-D parallelism) get a clear error (needs 4)."""
    return [] if _full(world) else ["refuse-2d-mesh"]


def nonzero_ids(world: int) -> list[str]:
    """``nonzero-<rule>-<path>``: ``Caution(denominator="nonzero")`` with telemetry on a row-sharded tensor whose
    gradient is sparse on one shard only (the counts and nonzero denominators of the shards reduced together)."""
    if world != min(WORLD_SIZES):
        return []
    return ["nonzero-adamw-single", "nonzero-adamw-foreach", "nonzero-adamw-fused", "nonzero-lion-fused"]


def triton_ids() -> list[str]:
    """The fused path's Triton kernels, on the CPU interpreter (slow: a trajectory takes minutes there).

    The crafted-count scenario for every rule, two on each sharded dimension; the nonzero denominator.
    """
    return [
        "count-shard0-adam-fused",
        "count-shard0-lion-fused",
        "count-shard1-adamw-fused",
        "count-shard1-sgd-fused",
        "nonzero-adamw-fused",
    ]


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


class Launch:
    """A worker program of this directory started in the background; :meth:`records` waits for it.

    The launches of the group run concurrently: the PyTorch processes spend much of their time
    waiting for each other in collectives, which leaves the CPU to the JAX and TensorFlow ones.
    """

    def __init__(self, script: str, args: list[str], timeout: float, env: dict[str, str] | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cautious-distributed-"))
        self.out = self.dir / "records.jsonl"
        self.timeout = timeout
        self.start = time.monotonic()
        self.log = open(self.dir / "output.log", "w")  # noqa: SIM115 - closed in records()
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / script), *args, "--out", str(self.out)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,  # its own process group: a timeout ends the workers too
        )
        self._result: tuple[dict[str, dict], str] | None = None

    def records(self) -> tuple[dict[str, dict], str]:
        """``(records by id, a tail of the program's output)``, once it has finished.

        A crash or a timeout leaves the records written so far; the caller reports the missing
        ones with the output tail.
        """
        if self._result is None:
            try:
                code = self.proc.wait(timeout=max(1.0, self.timeout - (time.monotonic() - self.start)))
                status = f"exit code {code}"
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                status = f"timed out after {self.timeout} s"
            self.log.close()
            tail = (self.dir / "output.log").read_text(errors="replace")[-4000:]
            records: dict[str, dict] = {}
            if self.out.exists():
                for line in self.out.read_text().splitlines():
                    rec = json.loads(line)
                    records[rec["id"]] = rec
            self._result = (records, f"{status}\n{tail}")
        return self._result


_LAUNCHES: dict[str, Launch] = {}


def launch(key: str, script: str, args: list[str], timeout: float, env: dict[str, str] | None = None) -> Launch:
    """The launch named ``key``, started now unless it already runs."""
    if key not in _LAUNCHES:
        _LAUNCHES[key] = Launch(script, args, timeout, env)
    return _LAUNCHES[key]
