"""The conformance runner over the fused functions, driven directly (FusedAdapter)."""

from __future__ import annotations

import pytest
from fused_testlib import BACKENDS

conformance = pytest.importorskip("cautious.conformance")


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_conformance(backend):
    from cautious.conformance.adapters.fused import FUSED_RULES, FusedAdapter

    result = conformance.run_conformance(
        FusedAdapter(backend),
        rules=FUSED_RULES,  # RMSprop, Adafactor and Muon: no fused kernel (declined)
        dtypes=("float32", "float64", "bfloat16", "float16"),
        max_examples=40,
    )
    assert {rule for rule, _ in result.examples} == set(FUSED_RULES)


def test_adapter_declines_stochastic_rounding():
    from cautious.conformance import Case
    from cautious.conformance.adapters.fused import FusedAdapter

    assert FusedAdapter("cpu", stochastic_rounding=True).supports(Case("adamw", {})) is not None
    assert FusedAdapter("cpu").supports(Case("adamw", {})) is None
    assert "no fused kernel for RMSprop" in FusedAdapter("cpu").supports(Case("rmsprop", {}))
    assert "no fused kernel for Adafactor" in FusedAdapter("cpu").supports(Case("adafactor", {}))
    assert "no fused kernel for Muon" in FusedAdapter("cpu").supports(Case("muon", {}))
