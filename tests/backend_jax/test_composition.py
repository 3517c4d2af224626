"""Composition with optax: schedules, inject_hyperparams, chain, MultiSteps, masked, multi_transform,
None leaves, mu_dtype; jit compiles once; donation; validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cautious.jax as cj
from cautious import Caution
from cautious.spec.errors import message

ALIASES = [
    lambda lr, **k: cj.adamw(lr, **k),
    lambda lr, **k: cj.adam(lr, **k),
    lambda lr, **k: cj.lion(lr, **k),
    lambda lr, **k: cj.sgd(lr, momentum=0.9, **k),
    lambda lr, **k: cj.sgd(lr, **k),
]
IDS = ["adamw", "adam", "lion", "sgd-momentum", "sgd"]


def _params(dtype=jnp.float32):
    return {"w": jnp.arange(12, dtype=dtype).reshape(3, 4) / 7 - 0.5, "b": jnp.linspace(-1, 1, 4, dtype=dtype)}


def _grads(i, dtype=jnp.float32):
    k1, k2 = jax.random.split(jax.random.key(i))
    return {"w": jax.random.normal(k1, (3, 4), dtype), "b": jax.random.normal(k2, (4,), dtype)}


def _steps(opt, n=3, params=None, grads=_grads):
    params = _params() if params is None else params
    state = opt.init(params)
    for i in range(n):
        u, state = opt.update(grads(i), state, params)
        params = optax.apply_updates(params, u)
    return params, state


@pytest.mark.parametrize("make", ALIASES, ids=IDS)
def test_learning_rate_schedule(make):
    sched = optax.linear_schedule(1e-2, 0.0, 3)
    p_sched, _ = _steps(jax.tree_util.Partial(make)(sched), n=1)
    p_const, _ = _steps(make(1e-2), n=1)
    for a, b in zip(jax.tree.leaves(p_sched), jax.tree.leaves(p_const)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "adam", "lion", "sgd"])
def test_inject_hyperparams_under_jit(name):
    factory = getattr(cj, name)
    opt = optax.inject_hyperparams(factory)(learning_rate=1e-2)
    params = _params()
    state = opt.init(params)
    step = jax.jit(opt.update)
    u, state = step(_grads(0), state, params)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(1e-2)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0, jnp.float32)
    u, state = step(_grads(1), state, params)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u))  # lr is live, not baked in
    # equals the plain alias with the same constant
    opt2 = optax.inject_hyperparams(factory)(learning_rate=1e-2)
    p1, _ = _steps(opt2, n=2)
    p2, _ = _steps(factory(1e-2), n=2)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_chain_with_clip_by_global_norm():
    opt = optax.chain(optax.clip_by_global_norm(1e-3), cj.adamw(1e-2))
    p, _ = _steps(opt)
    big = lambda i: jax.tree.map(lambda x: 1e6 * x, _grads(i))  # noqa: E731
    p_big, _ = _steps(opt, grads=big)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_big)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # clipping makes the scale irrelevant to Adam


def test_multisteps_accumulates():
    opt = optax.MultiSteps(cj.adamw(1e-2), every_k_schedule=2)
    params = _params()
    state = opt.init(params)
    u0, state = opt.update(_grads(0), state, params)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u0))
    u1, state = opt.update(_grads(1), state, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, _grads(0), _grads(1))
    ref = cj.adamw(1e-2)
    want, _ = ref.update(mean, ref.init(params), params)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5)


def test_masked_and_multi_transform():
    params = _params()
    masked = optax.masked(cj.adamw(1e-2), {"w": True, "b": False})
    u, _ = masked.update(_grads(0), masked.init(params), params)
    np.testing.assert_array_equal(u["b"], _grads(0)["b"])  # untouched leaf passes through
    full = cj.adamw(1e-2)
    u_full, _ = full.update(_grads(0), full.init(params), params)
    np.testing.assert_allclose(u["w"], u_full["w"], rtol=1e-6)

    mt = optax.multi_transform({"a": cj.adamw(1e-2), "l": cj.lion(1e-3)}, {"w": "a", "b": "l"})
    u, _ = mt.update(_grads(0), mt.init(params), params)
    lion = cj.lion(1e-3)
    u_l, _ = lion.update(_grads(0), lion.init(params), params)
    np.testing.assert_allclose(u["w"], u_full["w"], rtol=1e-6)
    np.testing.assert_allclose(u["b"], u_l["b"], rtol=1e-6)


@pytest.mark.parametrize("make", ALIASES, ids=IDS)
def test_none_leaves(make):
    params = {"w": jnp.ones((2, 3)), "frozen": None}
    opt = make(1e-2, cautious_weight_decay=False)
    state = opt.init(params)
    g = {"w": jnp.full((2, 3), 0.5), "frozen": None}
    u, state = jax.jit(opt.update)(g, state, params)
    assert u["frozen"] is None
    assert u["w"].shape == (2, 3)


def test_mu_dtype_bf16_params_fp32_moments():
    params = _params(jnp.bfloat16)
    opt = cj.adamw(1e-2, mu_dtype=jnp.float32)
    p, state = _steps(opt, params=params, grads=lambda i: _grads(i, jnp.bfloat16))
    mu = optax.tree.get(state, "mu")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(mu))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))


@pytest.mark.parametrize("make", ALIASES, ids=IDS)
def test_jit_compiles_once_and_donates(make):
    opt = make(1e-2)
    traces = []

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, g):
        traces.append(1)
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state

    params = _params()
    state = opt.init(params)
    for i in range(3):
        old = params
        params, state = step(params, state, _grads(i))
    assert len(traces) == 1
    assert all(x.is_deleted() for x in jax.tree.leaves(old))  # donated buffers were consumed


def test_cautious_weight_decay_needs_decoupled_decay():
    with pytest.raises(ValueError, match="cautious_weight_decay=True requires decoupled weight decay"):
        cj.adam(1e-3, weight_decay=0.1, cautious_weight_decay=True)
    with pytest.raises(ValueError, match="cautious_weight_decay=True requires decoupled weight decay"):
        cj.sgd(1e-3, weight_decay=0.1, cautious_weight_decay=True)
    cj.adam(1e-3, weight_decay=0.1, decoupled_weight_decay=True, cautious_weight_decay=True)


@pytest.mark.parametrize(
    "call,key,name,value",
    [
        (lambda: cj.adamw(-1.0), "lr", "learning_rate", -1.0),
        (lambda: cj.adamw(1e-3, b1=1.0), "beta1", "b1", 1.0),
        (lambda: cj.adam(1e-3, b2=float("nan")), "beta2", "b2", float("nan")),
        (lambda: cj.adamw(1e-3, eps=-1e-8), "eps", "eps", -1e-8),
        (lambda: cj.adamw(1e-3, weight_decay=-0.01), "weight_decay", "weight_decay", -0.01),
        (lambda: cj.lion(1e-3, b2=1.5), "beta2", "b2", 1.5),
        (lambda: cj.sgd(1e-3, momentum=1.5), "momentum", "momentum", 1.5),
        (lambda: cj.adamw(1e-3, eps_placement="keras"), "eps_placement", "eps_placement", "keras"),
    ],
)
def test_invalid_hyperparameters_raise_spec_errors(call, key, name, value):
    with pytest.raises(ValueError) as e:
        call()
    assert str(e.value) == message(key, value, name)


def test_invalid_types_and_flags():
    with pytest.raises(TypeError, match="learning_rate must be a real number"):
        cj.adamw("fast")
    with pytest.raises(TypeError, match="maximize must be a bool"):
        cj.adamw(1e-3, maximize="yes")
    with pytest.raises(TypeError, match="caution must be a bool or a cautious.Caution"):
        cj.adamw(1e-3, caution="on")
    with pytest.raises(ValueError, match="nesterov=True requires momentum > 0"):
        cj.sgd(1e-3, nesterov=True)
    with pytest.raises(ValueError, match="floor must be"):
        Caution("mean_clamp", 0.0)


def test_concrete_array_hyperparameters_are_validated_and_traced_are_not():
    with pytest.raises(ValueError, match="b1 must be"):
        cj.adamw(1e-3, b1=jnp.asarray(1.5))

    @jax.jit
    def build_and_step(b1):
        opt = cj.adamw(1e-3, b1=b1)  # traced: not validated, must not raise
        p = _params()
        return opt.update(_grads(0), opt.init(p), p)[0]

    build_and_step(jnp.asarray(0.9))


def test_maximize_flips_the_step():
    p_min, _ = _steps(cj.adamw(1e-2, weight_decay=0.0), n=1)
    neg = lambda i: jax.tree.map(jnp.negative, _grads(i))  # noqa: E731
    p_max, _ = _steps(cj.adamw(1e-2, weight_decay=0.0, maximize=True), n=1, grads=neg)
    for a, b in zip(jax.tree.leaves(p_min), jax.tree.leaves(p_max)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_cautious_weight_decay_skips_opposite_signs():
    params = {"w": jnp.array([1.0, 1.0, -1.0, -1.0])}
    g = {"w": jnp.array([1.0, -1.0, 1.0, -1.0])}
    opt = cj.sgd(
        1.0, caution=Caution("none"), weight_decay=0.5, decoupled_weight_decay=True, cautious_weight_decay=True
    )
    u, _ = opt.update(g, opt.init(params), params)
    # u_c = g (no momentum, scale 1); decay where sign(u_c) != -sign(p): entries 0 and 3
    np.testing.assert_allclose(u["w"], -np.array([1.5, -1.0, 1.0, -1.5]))
