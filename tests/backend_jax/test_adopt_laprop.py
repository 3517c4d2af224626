"""cautious.jax.adopt / laprop: caution=False is optax.contrib.adopt (same state pytree); both follow the spec."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cautious
import cautious.jax as cj
from cautious import spec
from cautious.spec.errors import message, type_message

SHAPES = [(3, 5), (7,), (2, 2, 3)]


def _data(dtype, steps=6, seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(steps)]
    for gs in grads:
        gs[0].reshape(-1)[0] = 0.0
    return params, grads


def _run(tx, params, grads, jit=False):
    p = [jnp.asarray(x) for x in params]
    state = tx.init(p)
    update = jax.jit(tx.update) if jit else tx.update
    for gs in grads:
        u, state = update([jnp.asarray(g) for g in gs], state, p)
        p = optax.apply_updates(p, u)
    return [np.asarray(x) for x in p], state


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", [{}, {"nesterov": True}, {"use_clipping": False}, {"b1": 0.5, "b2": 0.9, "eps": 1e-3}])
def test_caution_off_is_optax_contrib_adopt(kw, dtype):
    params, grads = _data(dtype)
    a, sa = _run(cj.adopt(0.05, caution=False, **kw), params, grads)
    b, sb = _run(optax.contrib.adopt(0.05, **kw), params, grads)
    assert jax.tree.structure(sa) == jax.tree.structure(sb)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_caution_on_keeps_optaxs_state_pytree():
    params, grads = _data(np.float32)
    _, sa = _run(cj.adopt(0.05), params, grads)
    _, sb = _run(optax.contrib.adopt(0.05), params, grads)
    assert jax.tree.structure(sa) == jax.tree.structure(sb)


def _spec_compare(tx, opt, steps=6, seed=1, rtol=1e-12):
    params, grads = _data(np.float64, steps, seed)
    a, _ = _run(tx, params, grads, jit=True)
    q = [x.copy() for x in params]
    st = opt.init(q)
    for gs in grads:
        q, st = opt.step(q, gs, st)
    for x, y in zip(a, q):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-14)


CAUTIONS = [False, cautious.Caution(), cautious.Caution("exact"), cautious.Caution("count_plus_one")]


@pytest.mark.parametrize("caution", CAUTIONS, ids=repr)
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"nesterov": True, "maximize": True},
        {"weight_decay": 0.2},
        {"weight_decay": 0.3, "decoupled_weight_decay": True, "cautious_weight_decay": True},
        {"weight_decay": 0.3, "decoupled_weight_decay": True},
    ],
)
def test_adopt_follows_the_spec(kw, caution):
    _spec_compare(
        cj.adopt(0.1, caution=caution, clip_value_fn=lambda c: c**0.333, **kw),
        spec.adopt(lr=0.1, caution=caution, clip_exp=0.333, **kw),
    )


@pytest.mark.parametrize("caution", CAUTIONS, ids=repr)
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"maximize": True, "betas": (0.5, 0.9), "eps": 1e-3},
        {"weight_decay": 0.3},
        {"weight_decay": 0.3, "decay_order": "pre_update"},
        {"weight_decay": 0.3, "cautious_weight_decay": True},
    ],
)
def test_laprop_follows_the_spec(kw, caution):
    jkw = dict(kw)
    if "betas" in jkw:
        jkw["b1"], jkw["b2"] = jkw.pop("betas")
    _spec_compare(cj.laprop(0.1, caution=caution, **jkw), spec.laprop(lr=0.1, caution=caution, **kw))


def test_laprop_schedule_follows_the_spec_rule():
    sched = optax.linear_schedule(0.1, 0.01, 4)
    params, grads = _data(np.float64, 5, 2)
    a, _ = _run(cj.laprop(sched, caution=False), params, grads)
    rule = spec.laprop_rule(beta1=0.9, beta2=0.999, eps=1e-15)
    for i, p in enumerate(params):
        s, q = rule.init(p), p.copy()
        for t, gs in enumerate(grads, 1):
            d, s = rule.update(gs[i], s, t, float(sched(jnp.asarray(t - 1, jnp.int32))))  # optax's int32 count
            q = q + d
        np.testing.assert_allclose(a[i], q, rtol=1e-12)


def test_adopt_first_step_keeps_nothing():
    tx = cj.adopt(0.1, caution_stats=True, weight_decay=0.5, decoupled_weight_decay=True)
    p = jnp.ones(4)
    state = tx.init(p)
    u, state = tx.update(jnp.array([1.0, -2.0, 3.0, 0.0]), state, p)
    np.testing.assert_array_equal(np.asarray(u), np.zeros(4))
    (st,) = cj.caution_stats(state)
    assert (int(st.count), int(st.n), float(st.scale)) == (0, 4, 1000.0)


@pytest.mark.parametrize(
    ("fn", "kw", "exc", "msg"),
    [
        (cj.adopt, {"b2": 1.0}, ValueError, message("beta2", 1.0, "b2")),
        (cj.adopt, {"learning_rate": -1.0}, ValueError, message("lr", -1.0, "learning_rate")),
        (
            cj.adopt,
            {"cautious_weight_decay": True},
            ValueError,
            "cautious_weight_decay=True requires decoupled weight decay",
        ),
        (cj.adopt, {"use_clipping": 1}, TypeError, "use_clipping must be a bool (True or False), got 1"),
        (cj.laprop, {"decay_order": "after"}, ValueError, message("decay_order", "after")),
        (cj.laprop, {"eps": None}, TypeError, type_message("eps", None)),
        (cj.laprop, {"caution": None}, TypeError, "caution must be a bool or a cautious.Caution, got None"),
    ],
)
def test_errors_are_the_spec_table(fn, kw, exc, msg):
    kw = {"learning_rate": 0.1, **kw}
    with pytest.raises(exc) as info:
        fn(**kw)
    assert str(info.value) == msg
