"""TensorFlow: ``MultiWorkerMirroredStrategy`` with 2 local workers equals one process.

One launch of ``tf_workers.py`` (see its docstring); the tests read its records.
"""

from __future__ import annotations

import importlib.util

import pytest
import scenarios as S
import tf_workers as W

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="needs tensorflow")

WORLD = 2


def start() -> S.Launch:
    """The processes of this module (started by conftest.py at collection, to run in the background)."""
    return S.launch("tf", "tf_workers.py", ["--world", str(WORLD)], timeout=400)


def record(sid: str) -> dict:
    records, tail = start().records()
    if sid not in records:
        pytest.fail(f"no record for {sid}: the workers stopped early\n{tail}")
    rec = records[sid]
    if not rec["ok"]:
        pytest.fail(f"{sid}: {rec['error']}\n{rec.get('traceback', '')}")
    return rec


@pytest.mark.parametrize("sid", W.ids())
def test_multi_worker_equals_one_process(sid):
    """8 steps on 2 workers (each on half of every batch) agree with one process, and the workers agree."""
    rec = record(sid)
    assert rec["moved"] > 1e-3, "the optimizer did not move the weights: the comparison would be vacuous"
    assert rec["max_diff"] <= 1e-5
    checksums = rec["worker_checksums"]
    assert len(checksums) == WORLD and len(set(checksums)) == 1, checksums
