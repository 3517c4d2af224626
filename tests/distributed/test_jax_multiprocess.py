"""JAX on 2 CPU processes (``jax.distributed``, 2 devices each): under ``jit`` the count is global.

One launch of ``jax_workers.py`` runs every scenario (see its docstring); the tests read its records.
"""

from __future__ import annotations

import importlib.util

import jax_workers as W
import pytest
import scenarios as S

pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs jax")

WORLD = 2
_launch: list = []


def record(sid: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not _launch:
        out = tmp_path_factory.mktemp("jax") / "records.jsonl"
        _launch.append(S.run_workers("jax_workers.py", ["--world", str(WORLD)], out, timeout=400))
    records, tail = _launch[0]
    if sid not in records:
        pytest.fail(f"no record for {sid}: the processes stopped early\n{tail}")
    rec = records[sid]
    if not rec["ok"]:
        pytest.fail(f"{sid}: {rec['error']}\n{rec.get('traceback', '')}")
    return rec


@pytest.mark.parametrize("sid", [i for i in W.ids() if i.startswith("steps-")])
def test_sharded_over_processes_equals_unsharded(sid, tmp_path_factory):
    """Every normalization, rows / columns / replicated, exact and fast counts: 5 steps agree (float32)."""
    rec = record(sid, tmp_path_factory)
    assert set(rec["max_diff"]) == set(S.NORMALIZATIONS)


@pytest.mark.parametrize("sid", [i for i in W.ids() if i.startswith("count-")])
def test_count_is_global_over_processes(sid, tmp_path_factory):
    """All kept entries on one device of process 0: the scale is n / k over the whole tensor."""
    rec = record(sid, tmp_path_factory)
    assert rec["scale"] == pytest.approx(rec["global_scale"], rel=1e-6)
