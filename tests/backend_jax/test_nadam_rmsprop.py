"""cautious.jax nadam / nadamw / rmsprop: optax's with caution off, the spec with caution on (x64 is on)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cautious.jax as cj
from cautious import Caution, spec
from cautious.spec.errors import NESTEROV_MESSAGE, message


def _data(dtype, seed=0, n=8, steps=5):
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(n).astype(dtype)
    gs = [rng.standard_normal(n).astype(dtype) for _ in range(steps)]
    for i, g in enumerate(gs):
        g[i % n] = 0  # an exact zero: masked
    return p0, gs


def _run(tx, p0, gs):
    p = jnp.asarray(p0)
    state = tx.init(p)
    for g in gs:
        u, state = jax.jit(tx.update)(jnp.asarray(g), state, p)
        p = optax.apply_updates(p, u)
    return np.asarray(p), state


def _spec_run(opt, p0, gs):
    ps, state = [np.asarray(p0)], opt.init([np.asarray(p0)])
    for g in gs:
        ps, state = opt.step(ps, [np.asarray(g)], state)
    return ps[0]


RMS_CASES = [
    {},
    {"momentum": 0.9},
    {"centered": True, "momentum": 0.5, "nesterov": True},
    {"eps_in_sqrt": False, "initial_scale": 0.1, "decay": 0.5},
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", RMS_CASES, ids=str)
def test_rmsprop_caution_off_is_optax_bit_for_bit(kw, dtype):
    # same operations as optax.scale_by_rms/scale_by_stddev (g * rsqrt(v + eps)), trace and the learning rate
    p0, gs = _data(dtype)
    a, sa = _run(cj.rmsprop(0.01, caution=False, **kw), p0, gs)
    b, sb = _run(optax.rmsprop(0.01, **kw), p0, gs)
    np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(sa) == jax.tree.structure(sb)
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda: cj.nadam(0.01, caution=False), lambda: optax.nadam(0.01)),
        (lambda: cj.nadamw(0.01, weight_decay=0.1, caution=False), lambda: optax.nadamw(0.01, weight_decay=0.1)),
    ],
    ids=["nadam", "nadamw"],
)
def test_nadam_caution_off_is_optax(ours, theirs, dtype):
    # not bitwise: the bias corrections are -expm1(t log b) (the spec's float64), optax's 1 - b**t in the
    # compute dtype; that moves the result by a few ulps, nothing more
    p0, gs = _data(dtype)
    a, sa = _run(ours(), p0, gs)
    b, sb = _run(theirs(), p0, gs)
    ulp = np.finfo(dtype).eps
    np.testing.assert_allclose(a, b, rtol=8 * ulp, atol=8 * ulp * 0.01)
    assert jax.tree.structure(sa) == jax.tree.structure(sb)


@pytest.mark.parametrize(
    ("ours", "ref"),
    [
        (lambda: cj.nadam(0.01), lambda: spec.nadam(0.01, momentum_schedule="constant")),
        (
            lambda: cj.nadam(0.01, momentum_schedule="dozat", caution=Caution("exact")),
            lambda: spec.nadam(0.01, caution=Caution("exact")),
        ),
        (
            lambda: cj.nadamw(0.01, weight_decay=0.1, momentum_schedule="dozat", momentum_decay=0.5),
            lambda: spec.nadamw(0.01, weight_decay=0.1, momentum_decay=0.5),
        ),
        (
            lambda: cj.rmsprop(0.01, momentum=0.9, centered=True),
            lambda: spec.rmsprop(0.01, alpha=0.9, momentum=0.9, centered=True, eps_in_sqrt=True, momentum_form="keras"),
        ),
        (
            lambda: cj.rmsprop(0.01, caution=Caution("count_plus_one"), weight_decay=0.1),
            lambda: spec.rmsprop(
                0.01, alpha=0.9, weight_decay=0.1, eps_in_sqrt=True, caution=Caution("count_plus_one")
            ),
        ),
    ],
    ids=["nadam", "nadam-dozat", "nadamw-dozat", "rmsprop-centered-momentum", "rmsprop-l2"],
)
def test_caution_on_matches_the_spec_in_float64(ours, ref):
    p0, gs = _data(np.float64, seed=3)
    got, _ = _run(ours(), p0, gs)
    np.testing.assert_allclose(got, _spec_run(ref(), p0, gs), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("rule", ["nadam", "rmsprop"])
def test_caution_bites(rule):
    kw = {"momentum_schedule": "dozat"} if rule == "nadam" else {"momentum": 0.9}
    p0, gs = _data(np.float64, seed=3)
    on, _ = _run(getattr(cj, rule)(0.01, **kw), p0, gs)
    off, _ = _run(getattr(cj, rule)(0.01, caution=False, **kw), p0, gs)
    assert not np.allclose(on, off, rtol=1e-6)


def test_dozat_state_has_the_mu_product():
    tx = cj.nadam(0.01, momentum_schedule="dozat")
    p0, gs = _data(np.float64)
    _, state = _run(tx, p0, gs[:2])
    (inner, _) = state
    assert isinstance(inner, cj.ScaleByNadamState)
    mu = [0.9 * (1 - 0.5 * 0.96 ** (t * 4e-3)) for t in (1, 2)]
    assert float(inner.mu_product) == pytest.approx(mu[0] * mu[1], rel=1e-15)


def test_rmsprop_without_momentum_caution_only_rescales():
    g = jnp.array([1.0, -2.0, 0.5, 0.0])
    p = jnp.zeros(4)
    on = cj.rmsprop(0.1, caution=Caution("exact"))
    off = cj.rmsprop(0.1, caution=False)
    u_on, _ = on.update(g, on.init(p), p)
    u_off, _ = off.update(g, off.init(p), p)
    np.testing.assert_allclose(np.asarray(u_on), np.asarray(u_off) * 4 / 3, rtol=1e-12)


def test_rmsprop_caution_stats():
    tx = cj.rmsprop(0.1, momentum=0.9, caution_stats=True)
    p = jnp.zeros(4)
    state = tx.init(p)
    _, state = tx.update(jnp.array([1.0, -1.0, 0.0, 2.0]), state, p)
    (stats,) = cj.caution_stats(state)
    assert int(stats.count) == 3 and int(stats.n) == 4


@pytest.mark.parametrize("centered", [False, True])
def test_rmsprop_decides_before_the_learning_rate(centered):
    """Without momentum the mask reads u = g / d, not lr * u: here lr * u is a float32 subnormal (flushed to
    zero by XLA on CPU), yet the entry is kept and counted, as the spec's (found by `cautious verify`)."""
    g = jnp.array([np.float32(np.finfo(np.float32).tiny), 1.0, np.nan], jnp.float32)
    tx = cj.rmsprop(1e-4, decay=0.5, eps=1e-3, eps_in_sqrt=False, centered=centered, caution_stats=True)
    p = jnp.zeros(3, jnp.float32)
    _, state = tx.update(g, tx.init(p), p)
    (stats,) = cj.caution_stats(state)
    opt = spec.rmsprop(lr=1e-4, alpha=0.5, eps=1e-3, centered=centered)
    (want,) = opt.stats([np.zeros(3, np.float32)], [np.asarray(g)], opt.init([np.zeros(3, np.float32)]))
    assert int(stats.count) == want.count == 3


def test_errors():
    with pytest.raises(ValueError) as info:
        cj.rmsprop(0.1, decay=1.5)
    assert str(info.value) == message("alpha", 1.5, "decay")
    with pytest.raises(ValueError) as info:
        cj.nadam(0.1, momentum_schedule="torch")
    assert str(info.value) == message("momentum_schedule", "torch")
    with pytest.raises(ValueError) as info:
        cj.nadamw(0.1, momentum_decay=-1.0, momentum_schedule="dozat")
    assert str(info.value) == message("momentum_decay", -1.0)
    with pytest.raises(ValueError, match="bias_correction=True is not supported"):
        cj.rmsprop(0.1, bias_correction=True)
    with pytest.raises(ValueError, match="requires nesterov=True"):
        cj.nadam(0.1, momentum_schedule="dozat", nesterov=False)
    with pytest.raises(ValueError, match=NESTEROV_MESSAGE):
        cj.rmsprop(0.1, nesterov=True)
    with pytest.raises(TypeError, match="centered must be a bool"):
        cj.rmsprop(0.1, centered=1)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_conformance(jit):
    from cautious.conformance import run_conformance
    from cautious.conformance.adapters.jax import JaxAdapter

    result = run_conformance(
        JaxAdapter(jit=jit), rules=("nadam", "rmsprop"), dtypes=("float32", "float64", "bfloat16"), max_examples=60
    )
    assert {rule for rule, _ in result.examples} == {"nadam", "rmsprop"}


def test_adapter_declines_what_optax_cannot_express():
    from cautious.conformance import Case
    from cautious.conformance.adapters.jax import JaxAdapter

    a = JaxAdapter(jit=False)
    assert "update form" in a.supports(Case("rmsprop", {"momentum": 0.9}))
    assert "coupled" in a.supports(Case("rmsprop", {"weight_decay": 0.1, "decoupled_weight_decay": True}))
    assert "NaN" in a.supports(Case("nadam", {"eps": 0.0, "momentum_schedule": "constant"}))
    assert a.supports(Case("nadam", {"eps": 0.0, "momentum_schedule": "dozat"})) is None
