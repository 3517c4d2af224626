"""PyTorch on 2 and 4 CPU processes (gloo): DTensor (``distribute_tensor``, FSDP2), DDP and ZeRO.

Each world size is one launch of ``torch_workers.py``, which runs every scenario in the
same processes and records the result; the tests here read the records (see that file's
docstring for what each scenario does).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import scenarios as S

pytest.importorskip("torch")

LAUNCH_TIMEOUT = 600  # seconds for one world size, every scenario included
MAX_DIFF = 1e-13  # sharded vs unsharded float64 parameters (values of order 1), same gradients


def start(world: int, triton: bool = False) -> S.Launch:
    """The processes of one world size (or of the Triton scenarios), started unless they run already.

    conftest.py starts the 2-process and Triton launches at collection, next to the JAX and
    TensorFlow ones; the 4-process launch starts when its first test asks for it.
    """
    args = ["--world", str(world)] + (["--triton"] if triton else [])
    return S.launch("torch" + "-".join(args), "torch_workers.py", args, LAUNCH_TIMEOUT)


def record(world: int, sid: str, triton: bool = False) -> dict:
    """The record of scenario ``sid`` at ``world`` processes (launching them on first use)."""
    records, tail = start(world, triton).records()
    if sid not in records:
        pytest.fail(f"no record for {sid}: the worker processes stopped early\n{tail}")
    rec = records[sid]
    if not rec["ok"]:
        pytest.fail(f"{sid} at {world} processes: {rec['error']}\n{rec.get('traceback', '')}")
    return rec


def cells(ids) -> list:
    """``(world, scenario)`` parameters; ``ids(world)`` lists the scenarios at ``world`` processes."""
    return [pytest.param(w, sid, id=f"{w}procs-{sid}") for w in S.WORLD_SIZES for sid in ids(w)]


@pytest.mark.parametrize(("world", "sid"), cells(S.trajectory_ids) + cells(S.more_rule_ids))
def test_sharded_trajectory_matches_spec_and_unsharded(world, sid):
    """20 steps equal to the unsharded optimizer's; the checked ones within the conformance bounds of the spec."""
    rec = record(world, sid)
    assert rec["checked_steps"] == list(S.SPEC_CHECKED_STEPS)
    assert rec["worst"] <= 1.0
    assert rec["max_diff"] <= MAX_DIFF, f"sharded and unsharded parameters differ by {rec['max_diff']}"


def _all_reduces(comm: dict[str, int]) -> int:
    return sum(v for k, v in comm.items() if "all_reduce" in k or "allreduce" in k)


@pytest.mark.parametrize(("world", "sid"), cells(S.trajectory_ids))
def test_one_count_all_reduce_per_step(world, sid):
    """``step()`` communicates once (the stacked counts) when a parameter is sharded, else not at all."""
    rec = record(world, sid)
    comm = rec["comm"]
    assert _all_reduces(comm) == rec["expect_all_reduce"], json.dumps(comm)
    assert sum(comm.values()) == _all_reduces(comm), f"a collective other than the count all-reduce: {comm}"


@pytest.mark.parametrize(("world", "sid"), cells(S.global_count_ids))
def test_count_is_global_not_per_shard(world, sid):
    """The sharded step passes the spec check where the same step counted per shard fails it."""
    rec = record(world, sid)
    assert rec["per_shard_detected"], "the crafted data does not tell per-shard counts from global ones"


@pytest.mark.parametrize(("world", "sid"), cells(S.wrapper_ids))
def test_ddp_and_zero_equal_one_process(world, sid):
    """DDP and ZeroRedundancyOptimizer(optimizer_class=cautious.torch.*) step as one process would."""
    rec = record(world, sid)
    assert rec["max_diff"] == 0.0
    assert rec["rank_spread"] == 0.0
    if sid.startswith("zero"):
        assert 0 < rec["owned_fraction"] < 1, "ZeRO did not partition the parameters"


@pytest.mark.parametrize(("world", "sid"), cells(S.refusal_ids))
def test_2d_mesh_is_refused(world, sid):
    """HSDP / 2-D meshes are not supported yet: a clear error, nothing updated (checked in the worker)."""
    assert "not supported yet" in record(world, sid)["message"]


def _check_nonzero(rec: dict) -> None:
    assert rec["stats"] == [[w, w] for (w,) in rec["want"]], "telemetry differs from the reference's stats"
    for step in rec["stats"]:  # the nonzero denominator matters here: not the scale of denominator="size"
        count, n, scale = step[0]
        assert n == 42 and scale != 1.0 / max(count / n, 1e-3), "the crafted gradients are not sparse enough"
    assert rec["max_diff"] <= MAX_DIFF, f"sharded and whole-tensor steps differ by {rec['max_diff']}"
    assert rec["spec_diff"] <= 1e-12, f"the sharded step differs from the reference by {rec['spec_diff']}"
    assert _all_reduces(rec["comm"]) == 1, json.dumps(rec["comm"])  # counts and denominators together


@pytest.mark.parametrize(("world", "sid"), cells(S.nonzero_ids))
def test_nonzero_denominator_is_reduced_with_the_counts(world, sid):
    """denominator="nonzero" on DTensor shards (single, foreach, fused): one all-reduce, the whole tensor's step
    and the reference's telemetry."""
    _check_nonzero(record(world, sid))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("sid", S.triton_ids())
def test_triton_kernels_same_design(sid):
    """fused=True with the Triton kernels (CPU interpreter): the same count pass, all-reduce, update pass."""
    rec = record(2, sid, triton=True)
    assert rec["fused_backend"] == "triton"
    if sid.startswith("nonzero"):
        _check_nonzero(rec)
    else:
        assert rec["per_shard_detected"]
