"""cautious.torch against the reference (cautious.spec), through the shipped conformance runner."""

import pytest

pytest.importorskip("torch")

from cautious import spec  # noqa: E402
from cautious.conformance import Case, run_conformance  # noqa: E402
from cautious.conformance.adapters.torch import TorchAdapter  # noqa: E402


@pytest.mark.parametrize("impl", ["single", "foreach"])
def test_conformance(impl):
    result = run_conformance(TorchAdapter(impl), max_examples=330)
    # every rule and both dtypes were actually exercised
    seen = {rule for rule, _ in result.examples}
    assert seen == set(spec.RULES)


def test_conformance_fused():
    try:
        from cautious.backends.torch import fused  # noqa: F401
    except ImportError as e:
        pytest.skip(f"cautious.backends.torch.fused cannot be imported: {e}")
    adapter = TorchAdapter("fused")
    if adapter.supports(Case("adamw", {"caution": True})) is not None:
        pytest.skip(adapter.supports(Case("adamw", {"caution": True})))
    from cautious.conformance.adapters.fused import FUSED_RULES

    for rule in ("rmsprop", "adafactor", "muon"):
        assert "no fused kernel" in adapter.supports(Case(rule, {})), rule
    result = run_conformance(adapter, rules=FUSED_RULES, max_examples=100)
    assert {rule for rule, _ in result.examples} == set(FUSED_RULES)


def test_adapter_declines_low_precision_single_and_mixed_state():
    a = TorchAdapter("single")
    assert a.supports(Case("adamw", {}, "bfloat16", "float32")) is not None
    assert a.supports(Case("adamw", {}, "bfloat16")) is not None
    assert a.supports(Case("adamw", {}, "float32")) is None
    with pytest.raises(ValueError, match="impl"):
        TorchAdapter("cuda-graph")
