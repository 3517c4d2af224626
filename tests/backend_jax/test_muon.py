"""cautious.jax.muon: caution=False is optax.contrib.muon bit for bit (updates and state); caution as the spec."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cautious
from cautious import spec
from cautious.jax import caution_stats, muon

CONFIGS = [
    {},
    dict(nesterov=False),
    dict(weight_decay=0.1, consistent_rms=0.2),
    dict(adam_weight_decay=0.01, adam_learning_rate=0.03, beta=0.5),
]


def _params(dtype):
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.standard_normal((4, 6)), dtype),
        "t": jnp.asarray(rng.standard_normal((7, 3)), dtype),
        "b": jnp.asarray(rng.standard_normal(6), dtype),
    }


def _grads(params, rng):
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("kw", CONFIGS, ids=repr)
def test_caution_off_is_optax_contrib_muon_bitwise(dtype, kw):
    params = _params(dtype)
    native, ours = optax.contrib.muon(0.02, **kw), muon(0.02, caution=False, **kw)
    sn, so = native.init(params), ours.init(params)
    assert jax.tree.structure(sn) == jax.tree.structure(so)
    pn = po = params
    rng = np.random.default_rng(1)
    for _ in range(3):
        g = _grads(params, rng)
        un, sn = native.update(g, sn, pn)
        uo, so = ours.update(g, so, po)
        pn, po = optax.apply_updates(pn, un), optax.apply_updates(po, uo)
    for a, b in zip(jax.tree.leaves((pn, sn)), jax.tree.leaves((po, so)), strict=True):
        assert jnp.array_equal(a, b)


def _spec_step(opt, p, g, state):
    (p_new,), state = opt.step([np.asarray(p)], [np.asarray(g)], state)
    return p_new, state


@pytest.mark.parametrize("position", ["after", "before"])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("kw", [dict(weight_decay=0.1), dict(consistent_rms=0.2)], ids=repr)
def test_matrices_match_the_spec_float64(position, nesterov, kw):
    caution = cautious.Caution("exact")
    params = _params(jnp.float64)
    ours = muon(0.02, nesterov=nesterov, caution=caution, mask_position=position, **kw)
    shape = dict(shape_scale="rms", rms_rate=0.2) if "consistent_rms" in kw else dict(shape_scale="cols_over_rows")
    ref = spec.muon(
        lr=0.02,
        weight_decay=kw.get("weight_decay", 0.0),
        momentum=0.95,
        nesterov=nesterov,
        eps=1e-8,
        caution=caution,
        mask_position=position,
        muon_momentum="debiased",
        ns_eps="add",
        **shape,
    )
    state = ours.init(params)
    refs = {k: ref.init([np.asarray(params[k])]) for k in ("w", "t")}
    p_ref = {k: np.asarray(params[k]) for k in ("w", "t")}
    rng = np.random.default_rng(2)
    for _ in range(4):
        g = _grads(params, rng)
        u, state = ours.update(g, state, params)
        params = optax.apply_updates(params, u)
        for k in ("w", "t"):
            p_ref[k], refs[k] = _spec_step(ref, p_ref[k], g[k], refs[k])
            # float64 on both sides; the only differences are rounding in the matrix products (a few ulps)
            np.testing.assert_allclose(np.asarray(params[k]), p_ref[k], rtol=1e-12, atol=1e-14)


def test_caution_masks_and_adam_leaves_are_cautious():
    params = _params(jnp.float64)
    opt = muon(0.02, caution_stats=True)
    state = opt.init(params)
    g = _grads(params, np.random.default_rng(3))
    for _ in range(3):
        _, state = opt.update(g, state, params)
        g = jax.tree.map(lambda x: -x * 0.5 + 0.1, g)
    stats = [s for s in caution_stats(state) if s is not None]
    assert stats and any(0 < int(s.count) < s.n for s in stats)
    # the 1-d leaf: optax's Adam branch, with caution on it is cautious.jax.adamw (nesterov as muon's)
    native_b = optax.contrib.muon(0.02).init(params)
    assert jax.tree.structure(native_b) == jax.tree.structure(muon(0.02).init(params))


def test_errors():
    with pytest.raises(ValueError, match=r"^learning_rate must be a finite number >= 0, got -1.0$"):
        muon(-1.0)
    with pytest.raises(ValueError, match=r"^mask_position must be one of 'after', 'before', got 'post'$"):
        muon(0.1, mask_position="post")
    with pytest.raises(ValueError, match=r"^ns_steps must be an integer in \[0, 100\), got 100$"):
        muon(0.1, ns_steps=100)
    with pytest.raises(ValueError, match=r"^beta must be a finite number in \[0, 1\], got 1.5$"):
        muon(0.1, beta=1.5)
    with pytest.raises(ValueError, match=r"^consistent_rms must be a finite number >= 0, got -0.2$"):
        muon(0.1, consistent_rms=-0.2)
    with pytest.raises(ValueError, match="adaptive=True is not supported with mask_position='before'"):
        muon(0.1, adaptive=True, mask_position="before")
