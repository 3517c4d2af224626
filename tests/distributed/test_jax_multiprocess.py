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


def start() -> S.Launch:
    """The processes of this module (started by conftest.py at collection, to run in the background)."""
    return S.launch("jax", "jax_workers.py", ["--world", str(WORLD)], timeout=400)


def record(sid: str) -> dict:
    records, tail = start().records()
    if sid not in records:
        pytest.fail(f"no record for {sid}: the processes stopped early\n{tail}")
    rec = records[sid]
    if not rec["ok"]:
        pytest.fail(f"{sid}: {rec['error']}\n{rec.get('traceback', '')}")
    return rec


@pytest.mark.parametrize("sid", [i for i in W.ids() if i.startswith("steps-")])
def test_sharded_over_processes_equals_unsharded(sid):
    """Every normalization, rows / columns / replicated, exact and fast counts: 5 steps agree (float32)."""
    rec = record(sid)
    assert set(rec["max_diff"]) == set(S.NORMALIZATIONS)


@pytest.mark.parametrize("sid", [i for i in W.ids() if i.startswith("count-")])
def test_count_is_global_over_processes(sid):
    """All kept entries on one device of process 0: the scale is n / k over the whole tensor."""
    rec = record(sid)
    assert rec["scale"] == pytest.approx(rec["global_scale"], rel=1e-6)
