"""The conformance suite on the JAX backend: eager and jit lanes, float32 and float64 (x64 is on).

The fast count path is used only for tensors of at least ``FAST_COUNT_MIN_SIZE`` entries; the
suite's tensors are small, so one lane forces it on for every tensor.
"""

import subprocess
import sys

import jax
import pytest

import cautious.backends.jax._core as core
from cautious import spec
from cautious.conformance import Case, run_conformance
from cautious.conformance.adapters.jax import JaxAdapter, build_optimizer


def test_x64_is_on():
    assert jax.config.jax_enable_x64


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_conformance(jit):
    result = run_conformance(JaxAdapter(jit=jit), dtypes=("float32", "float64"), max_examples=75)
    assert {rule for rule, _ in result.examples} == set(spec.RULES)


def test_conformance_fast_count_path(monkeypatch):
    monkeypatch.setattr(core, "FAST_COUNT_MIN_SIZE", 0)
    run_conformance(JaxAdapter(jit=True), dtypes=("float32", "float64"), max_examples=50)


def test_conformance_low_precision():
    # optax.adafactor's float32 schedule: the adapter declines Adafactor in other dtypes (its reason says why)
    rules = tuple(r for r in spec.RULES if r != "adafactor")
    run_conformance(JaxAdapter(jit=True), rules=rules, dtypes=("bfloat16", "float16"), max_examples=40)


def test_conformance_float32_without_x64():
    """Without x64: int32 counts and float32 bias corrections."""
    code = (
        "import jax\n"
        "assert not jax.config.jax_enable_x64\n"
        "from cautious.conformance.adapters.jax import JaxAdapter\n"
        "from cautious.conformance import run_conformance\n"
        "import cautious.backends.jax._core as core\n"
        "core.FAST_COUNT_MIN_SIZE = 0\n"
        "run_conformance(JaxAdapter(jit=True), dtypes=('float32',), max_examples=40)\n"
        "print('OK')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().endswith("OK"), out.stdout[-3000:] + out.stderr[-3000:]


def test_supports_declines_with_reasons():
    a = JaxAdapter(jit=False)
    assert "dampening" in a.supports(Case("sgd", {"momentum": 0.9, "dampening": 0.1}))
    assert a.supports(Case("sgd", {"momentum": 0.9, "dampening": 0.0})) is None
    assert a.supports(Case("adam", {"amsgrad": True, "maximize": True}, "float64")) is None


def test_adapter_uses_spec_defaults_not_optax_defaults():
    """spec.adamw's default weight_decay is 1e-2 (optax: 1e-4); lion's is 0 (optax: 1e-3)."""
    import jax.numpy as jnp

    p = {"w": jnp.ones(2)}
    g = {"w": jnp.zeros(2)}
    for rule, wd in (("adamw", 1e-2), ("lion", 0.0)):
        opt = build_optimizer(Case(rule, {"lr": 1.0, "caution": False}))
        u, _ = opt.update(g, opt.init(p), p)
        assert float(u["w"][0]) == pytest.approx(-wd)
