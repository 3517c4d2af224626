"""The TensorFlow adapter through the shared conformance suite, in each execution mode."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402

from cautious import spec  # noqa: E402
from cautious.conformance import Case, run_conformance  # noqa: E402
from cautious.conformance.adapters.tensorflow import TFAdapter  # noqa: E402

EXAMPLES = {"eager": 200, "function": 150, "xla": 100}


@pytest.mark.parametrize("mode", list(EXAMPLES))
def test_run_conformance(mode):
    result = run_conformance(TFAdapter(mode), max_examples=EXAMPLES[mode], seed=0)
    for rule in spec.RULES:
        for dtype in ("float32", "float64"):
            assert result.examples.get((rule, dtype), 0) > 0, (rule, dtype, result.examples)


def test_supports_declines_with_reasons():
    adapter = TFAdapter("eager")
    assert adapter.supports(Case("adamw", {"lr": 0.1})) is None
    assert adapter.supports(Case("adam", {"maximize": True, "amsgrad": True})) is None
    assert "coupled" in adapter.supports(Case("adam", {"weight_decay": 0.1}))
    assert "coupled" in adapter.supports(Case("sgd", {"weight_decay": 0.1}))
    assert adapter.supports(Case("sgd", {"weight_decay": 0.1, "decoupled_weight_decay": True})) is None
    assert "dampening" in adapter.supports(Case("sgd", {"momentum": 0.9, "dampening": 0.5}))
    assert "dtype" in adapter.supports(Case("lion", {}, "bfloat16", "float32"))
    with pytest.raises(ValueError, match="mode"):
        TFAdapter("graph")
