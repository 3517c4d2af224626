"""cautious.jax.cautious(form="update"), caution for any optax optimizer, against the spec's wrapper."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cautious.jax as cj
from cautious import Caution, spec


def sign_decay(learning_rate=0.01, momentum=0.9, decay=0.1) -> optax.GradientTransformation:
    """An optimizer no library ships: sign of a momentum, with a decay that can flip the update's sign."""

    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(g, buf, params):
        buf = jax.tree.map(lambda b, x: momentum * b + x, buf, g)
        upd = jax.tree.map(lambda b, p: -learning_rate * (jnp.sign(b) + decay * p), buf, params)
        return upd, buf

    return optax.GradientTransformation(init, update)


INNERS = {
    "adafactor": lambda: optax.adafactor(1e-2, weight_decay_rate=0.05),
    "sign_decay": sign_decay,
}
CAUTIONS = [Caution(), Caution("count_plus_one", denominator="nonzero"), Caution("exact"), Caution("none")]


def _tree(seed, dtype, zeros=0.2):
    rng = np.random.default_rng(seed)
    shapes = [("w", (6, 5)), ("b", (7,))]
    return {k: jnp.asarray(rng.standard_normal(s) * (rng.random(s) >= zeros), dtype) for k, s in shapes}


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("caution", CAUTIONS, ids=repr)
@pytest.mark.parametrize("inner", list(INNERS))
def test_the_wrapper_is_the_spec_wrapper_of_the_inner_step(inner, caution, dtype):
    bare, wrapped = INNERS[inner](), cj.cautious(INNERS[inner](), caution, form="update")
    params = _tree(0, dtype, zeros=0.0)
    state = wrapped.init(params)
    full = 0
    for i in range(3):
        g = _tree(10 + i, dtype)
        o, _ = jax.jit(bare.update)(g, state, params)
        o_c, state = jax.jit(wrapped.update)(g, state, params)
        nexts = optax.apply_updates(params, o)
        new = optax.apply_updates(params, o_c)
        for k in params:
            p0, gk = np.asarray(params[k], np.float64), np.asarray(g[k], np.float64)
            # optax hands over the update itself: the spec's whole-update form of it
            want, mask, _, scale = spec.whole_update(np.asarray(o[k], np.float64), gk, caution)
            eps = 2.0**-53 if dtype == jnp.float64 else 2.0**-24
            np.testing.assert_array_equal(np.asarray(o_c[k]) != 0, mask & (want != 0))
            # the scale: n / k on the device, 1 / max(k / n, floor) in Caution.scale: a few roundings apart
            assert np.all(np.abs(np.asarray(o_c[k], np.float64) - want) <= 4 * eps * np.abs(want))
            # and the spec wrapper of the step p -> p + o, wherever that step moved p (else p + o rounded to p)
            q = np.asarray(nexts[k], np.float64)
            p_c, mask_s, _, _ = spec.whole_step(p0, q, gk, caution)
            moved = q != p0
            np.testing.assert_array_equal(mask_s[moved], mask[moved])
            if np.all(moved):
                # the spec measures delta from the rounded p + o: half an ulp of q, amplified by the scale
                bound = scale * eps * (3 * np.abs(q - p0) + np.abs(q)) + 2 * eps * np.abs(p_c)
                assert np.all(np.abs(np.asarray(new[k], np.float64) - p_c) <= bound)
                full += 1
        params = new
    assert full > 0


@pytest.mark.parametrize("inner", list(INNERS))
def test_caution_false_is_the_bare_optimizer(inner):
    bare, wrapped = INNERS[inner](), cj.cautious(INNERS[inner](), False, form="update")
    params = _tree(0, jnp.float32)
    s_b, s_w = bare.init(params), wrapped.init(params)
    for i in range(3):
        g = _tree(10 + i, jnp.float32)
        o_b, s_b = bare.update(g, s_b, params)
        o_w, s_w = wrapped.update(g, s_w, params)
        for a, b in zip(jax.tree.leaves(o_b), jax.tree.leaves(o_w)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        params = optax.apply_updates(params, o_b)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_wrapper_conformance_around_every_spec_rule(jit):
    from cautious.conformance.adapters.jax import JaxWrapperAdapter
    from cautious.conformance.wrapper import run_wrapper_conformance

    res = run_wrapper_conformance(JaxWrapperAdapter(jit), max_examples=24 if jit else 12)
    assert {rule for rule, _ in res.examples} == set(spec.RULES)
    assert res.worst <= 1.0


def test_an_infinite_update_where_g_is_zero_is_dropped_as_the_spec_says():
    inf_where_zero = optax.GradientTransformation(
        lambda params: optax.EmptyState(), lambda g, s, p=None: (jnp.where(g == 0, jnp.inf, -g), s)
    )
    g = jnp.array([1.0, 0.0, -1.0, jnp.nan])
    wrapped = cj.cautious(inf_where_zero, Caution("exact"), form="update")
    o_c, _ = wrapped.update(g, wrapped.init(jnp.ones(4)), jnp.ones(4))
    want, mask, count, _ = spec.whole_update(np.array([-1.0, np.inf, 1.0, np.nan]), np.asarray(g), Caution("exact"))
    assert mask.tolist() == [True, False, True, True] and count == 3
    np.testing.assert_array_equal(np.asarray(o_c, np.float64), want)
