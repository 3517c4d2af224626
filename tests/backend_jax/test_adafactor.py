"""cautious.jax.adafactor: caution=False == optax.adafactor (bitwise, same state), the spec, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cautious.jax as cj
from cautious import Caution, spec
from cautious.spec.errors import message

SHAPES = {"w": (5, 4), "t": (3, 2, 6), "b": (4,), "s": (), "z": (3, 4)}


def _tree(seed, dtype):
    keys = jax.random.split(jax.random.key(seed), len(SHAPES))
    out = {k: jax.random.normal(key, s, dtype) for key, (k, s) in zip(keys, SHAPES.items(), strict=True)}
    out["z"] = out["z"].at[0, 0].set(0.0)  # an exact zero in a gradient
    return out


def _run(opt, dtype, steps=4):
    params = _tree(0, dtype)
    state = opt.init(params)
    update = jax.jit(opt.update)
    for i in range(steps):
        u, state = update(_tree(100 + i, dtype), state, params)
        params = optax.apply_updates(params, u)
    return params, state


CONFIGS = [
    dict(),
    dict(learning_rate=0.05, min_dim_size_to_factor=3),
    dict(learning_rate=0.05, min_dim_size_to_factor=2, momentum=0.9, weight_decay_rate=1e-3),
    dict(learning_rate=0.1, min_dim_size_to_factor=4, clipping_threshold=None, multiply_by_parameter_scale=False),
    dict(learning_rate=optax.linear_schedule(0.1, 0.01, 4), decay_offset=1, eps=1e-20, decay_rate=0.5),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("kw", CONFIGS, ids=str)
def test_caution_false_is_optax_bitwise(dtype, kw):
    ours, s1 = _run(cj.adafactor(caution=False, **kw), dtype)
    theirs, s2 = _run(optax.adafactor(**kw), dtype)
    assert jax.tree.structure(s1) == jax.tree.structure(s2)
    for a, b in zip(jax.tree.leaves((ours, s1)), jax.tree.leaves((theirs, s2)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kw", CONFIGS[1:3], ids=str)
def test_caution_keeps_the_state_of_optax(kw):
    _, s1 = _run(cj.adafactor(**kw), jnp.float32)
    _, s2 = _run(optax.adafactor(**kw), jnp.float32)
    assert jax.tree.structure(s1) == jax.tree.structure(s2)
    if "momentum" not in kw:  # without momentum the state never sees the mask: equal exactly
        for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _spec_kw(kw):
    return dict(
        lr=kw.get("learning_rate", 1.0),
        beta2_decay=-kw.get("decay_rate", 0.8),
        eps=(kw.get("eps", 1e-30), 1e-3),
        d=kw.get("clipping_threshold", 1.0),
        weight_decay=kw.get("weight_decay_rate", 0.0),
        beta1=kw.get("momentum", 0.0),
        eps_form="add",
        factor_dims="largest_two",
        min_dim_size_to_factor=kw.get("min_dim_size_to_factor", 128),
        relative_step=False,
        weight_decay_form="rate",
    )


@pytest.mark.parametrize("caution", [False, True, Caution("exact")], ids=str)
@pytest.mark.parametrize("kw", CONFIGS[:3], ids=str)
def test_matches_the_spec_in_float64(caution, kw):
    params, _ = _run(cj.adafactor(caution=caution, **kw), jnp.float64)
    ref = spec.adafactor(caution=caution, **_spec_kw(kw))
    ps = [np.asarray(x) for x in jax.tree.leaves(_tree(0, jnp.float64))]
    st = ref.init(ps)
    for i in range(4):
        ps, st = ref.step(ps, [np.asarray(x) for x in jax.tree.leaves(_tree(100 + i, jnp.float64))], st)
    p0 = [np.asarray(x) for x in jax.tree.leaves(_tree(0, jnp.float64))]
    for a, r, q in zip(jax.tree.leaves(params), ps, p0, strict=True):
        # optax computes its decay schedule 1 - t^-0.8 in float32 (_decay_rate_pow, ~6e-8 relative, a few
        # ulps through the power); the second moments and the steps inherit it: compare the total change
        # p - p0 to 1e-5 of its largest entry
        np.testing.assert_allclose(np.asarray(a) - q, r - q, rtol=0, atol=1e-5 * np.max(np.abs(r - q)))


def test_caution_without_momentum_only_rescales():
    kw = dict(learning_rate=0.05, min_dim_size_to_factor=3)
    p0 = _tree(0, jnp.float64)
    plain, _ = _run(cj.adafactor(caution=False, **kw), jnp.float64, steps=1)
    caut, _ = _run(cj.adafactor(caution=Caution("exact"), **kw), jnp.float64, steps=1)
    np.testing.assert_allclose(caut["z"] - p0["z"], (12 / 11) * (plain["z"] - p0["z"]), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(caut["w"], plain["w"], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"learning_rate": -1.0}, message("lr", -1.0, "learning_rate")),
        ({"decay_rate": -0.5}, message("beta2_decay", 0.5, "decay_rate (negated)")),
        ({"clipping_threshold": 0.0}, message("clip_threshold", 0.0, "clipping_threshold")),
        ({"momentum": 1.0}, message("beta1", 1.0, "momentum")),
        ({"eps": -1.0}, message("eps", -1.0)),
        ({"min_dim_size_to_factor": -1}, message("min_dim_size_to_factor", -1)),
    ],
)
def test_errors(kw, msg):
    with pytest.raises(ValueError) as info:
        cj.adafactor(**kw)
    assert str(info.value) == msg


def test_conformance():
    from cautious.conformance import run_conformance
    from cautious.conformance.adapters.jax import JaxAdapter

    result = run_conformance(JaxAdapter(jit=True), rules=("adafactor",), dtypes=("float32",), max_examples=40)
    assert result.examples[("adafactor", "float32")] > 0
