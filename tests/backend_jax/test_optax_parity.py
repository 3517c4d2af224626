"""``caution=False`` reproduces optax; the wrapper composes with optax's own directions; state shape."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cautious.jax as cj
from cautious import spec


def _tree(seed, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 3)
    return {
        "w": jax.random.normal(k[0], (5, 4), dtype),
        "b": jax.random.normal(k[1], (4,), dtype),
        "s": jax.random.normal(k[2], (), dtype),
    }


def _run(opt, steps=4, seed=0):
    params = _tree(seed)
    state = opt.init(params)
    update = jax.jit(opt.update)
    for i in range(steps):
        g = _tree(100 + i)
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
    return params


PAIRS = [
    ("adamw", dict(learning_rate=1e-2), dict()),
    ("adamw", dict(learning_rate=1e-2, b1=0.5, b2=0.9, eps=1e-3, weight_decay=0.1), dict()),
    ("adamw", dict(learning_rate=1e-2, mu_dtype=jnp.float32, nesterov=True), dict()),
    ("adam", dict(learning_rate=1e-2), dict()),
    ("adam", dict(learning_rate=1e-2, eps_root=1e-8), dict()),
    ("lion", dict(learning_rate=1e-3), dict()),
    ("lion", dict(learning_rate=1e-3, b1=0.5, weight_decay=0.1), dict()),
    ("sgd", dict(learning_rate=1e-1), dict()),
    ("sgd", dict(learning_rate=1e-1, momentum=0.9), dict()),
    ("sgd", dict(learning_rate=1e-1, momentum=0.9, nesterov=True), dict()),
]


@pytest.mark.parametrize("name,kw,_", PAIRS, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(PAIRS)])
def test_caution_false_equals_optax(name, kw, _):
    ours = _run(getattr(cj, name)(**kw, caution=False))
    theirs = _run(getattr(optax, name)(**kw))
    # Adam: optax computes 1 - b**t in float32 (1.3e-5 relative error at b2 = 0.999); ours is accurate.
    rtol = 2e-5 if name.startswith("adam") else 1e-6
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=1e-7)


def test_caution_false_state_matches_optax_structure():
    p = _tree(0)
    for name in ("adamw", "lion"):
        ours = getattr(cj, name)(1e-3, caution=False).init(p)
        theirs = getattr(optax, name)(1e-3).init(p)
        assert jax.tree.structure(ours) == jax.tree.structure(theirs)
        assert [type(s) for s in ours] == [type(s) for s in theirs]


def test_cautious_state_is_the_inner_state():
    p = _tree(0)
    opt = cj.adamw(1e-3)
    state = opt.init(p)
    assert isinstance(state[0], optax.ScaleByAdamState)
    _, state = opt.update(_tree(1), state, p)
    mu = optax.tree.get(state, "mu")
    assert jax.tree.structure(mu) == jax.tree.structure(p)
    assert int(optax.tree.get(state, "count")) == 1


def _spec_run(spec_opt, steps=3):
    keys = ["b", "s", "w"]  # jax.tree.leaves order of a dict: sorted keys
    params = [np.asarray(_tree(0)[k], np.float64) for k in keys]
    state = spec_opt.init(params)
    for i in range(steps):
        g = _tree(100 + i)
        params, state = spec_opt.step(params, [np.asarray(g[k], np.float64) for k in keys], state)
    return params


@pytest.mark.parametrize(
    "inner,spec_opt",
    [
        (lambda: optax.scale_by_adam(), lambda: spec.adam(lr=1e-2)),
        (lambda: optax.scale_by_lion(), lambda: spec.lion(lr=1e-2)),
        (lambda: optax.trace(0.9), lambda: spec.sgd(lr=1e-2, momentum=0.9)),
        (lambda: cj.scale_by_adam(), lambda: spec.adam(lr=1e-2)),
    ],
    ids=["optax-adam", "optax-lion", "optax-trace", "ours-adam"],
)
def test_wrapper_on_optax_directions_matches_spec(inner, spec_opt):
    opt = optax.chain(cj.cautious(inner(), form="direction"), optax.scale_by_learning_rate(1e-2))
    ours = _run(opt, steps=3)
    want = _spec_run(spec_opt(), steps=3)
    for a, b in zip(jax.tree.leaves(ours), want):
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=1e-5, atol=1e-6)


def test_alias_equals_manual_chain():
    manual = optax.chain(
        cj.cautious(cj.scale_by_adam(), form="direction"),
        optax.add_decayed_weights(1e-4),
        optax.scale_by_learning_rate(1e-2),
    )
    a = _run(cj.adamw(1e-2))
    b = _run(manual)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)


def test_caution_changes_the_update():
    a = _run(cj.adamw(1e-2))
    b = _run(cj.adamw(1e-2, caution=False))
    assert any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_wrapper_caution_false_is_pass_through():
    p, g = _tree(0), _tree(1)
    inner = optax.scale_by_adam()
    u1, _ = cj.cautious(inner, caution=False, form="direction").update(
        g, cj.cautious(inner, False, form="direction").init(p), p
    )
    u2, _ = inner.update(g, inner.init(p), p)
    for x, y in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
