"""optax telemetry (opt-in `caution_stats=True`, `cautious.jax.caution_stats(state)`) and the sparse denominator."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cautious.jax as cj
import cautious.spec as spec
from cautious import Caution

CAUTIONS = [Caution(), Caution("count_plus_one", denominator="nonzero"), Caution("exact"), Caution("none")]
RULES = {
    "adamw": (lambda c, s: cj.adamw(0.01, b1=0.9, b2=0.999, weight_decay=0.01, caution=c, caution_stats=s),
              lambda c: spec.adamw(lr=0.01, weight_decay=0.01, caution=c)),
    "lion": (lambda c, s: cj.lion(0.01, b1=0.9, b2=0.99, weight_decay=0.1, caution=c, caution_stats=s),
             lambda c: spec.lion(lr=0.01, weight_decay=0.1, caution=c)),
}  # fmt: skip


@pytest.mark.parametrize("caution", CAUTIONS, ids=repr)
@pytest.mark.parametrize("rule", list(RULES))
def test_stats_and_steps_match_the_reference(rule, caution):
    make, ref_make = RULES[rule]
    rng = np.random.default_rng(0)
    p0 = [rng.standard_normal((6, 5)), rng.standard_normal(7)]
    opt, ref = make(caution, True), ref_make(caution)
    params, state = [jnp.asarray(p) for p in p0], None
    state = opt.init(params)
    rparams, rstate = p0, ref.init(p0)

    @jax.jit
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(3):
        grads = [rng.standard_normal(p.shape) * (rng.random(p.shape) < 0.6) for p in p0]  # exact zeros too
        want = ref.stats(rparams, grads, rstate)
        rparams, rstate = ref.step(rparams, grads, rstate)
        params, state = step(params, state, [jnp.asarray(g) for g in grads])
        got = [(int(s.count), int(s.n), float(s.scale)) for s in cj.caution_stats(state)]
        assert got == [tuple(s) for s in want]
    for p, r in zip(params, rparams):
        np.testing.assert_allclose(np.asarray(p), r, rtol=0, atol=1e-12)


def test_stats_are_opt_in_and_the_default_state_is_unchanged():
    params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
    plain, with_stats = cj.adamw(0.1), cj.adamw(0.1, caution_stats=True)
    assert jax.tree.structure(plain.init(params)) == jax.tree.structure(cj.adamw(0.1, caution_stats=False).init(params))
    assert jax.tree.structure(plain.init(params)) != jax.tree.structure(with_stats.init(params))
    with pytest.raises(ValueError, match="caution_stats=True"):
        cj.caution_stats(plain.init(params))
    assert [int(s.n) for s in cj.caution_stats(with_stats.init(params))] == [2, 3]  # jax.tree.leaves order
    with pytest.raises(ValueError, match="caution_stats=True needs caution on"):
        cj.lion(0.1, caution=False, caution_stats=True)
    with pytest.raises(TypeError, match="caution_stats must be a bool"):
        cj.sgd(0.1, caution_stats=1)


def test_nonzero_denominator_does_not_inflate_a_sparse_embedding_step():
    """The issue's case: 10 rows of Embedding(1000, 8) per batch; mean_clamp scales them by 100, nonzero by 1."""
    rng = np.random.default_rng(0)
    g = np.zeros((1000, 8))
    g[rng.choice(1000, 10, replace=False)] = rng.standard_normal((10, 8))
    out = {}
    for den in ("size", "nonzero"):
        opt = cj.adamw(1e-3, weight_decay=0.0, caution=Caution(denominator=den), caution_stats=True)
        w = jnp.zeros((1000, 8))
        updates, state = opt.update(jnp.asarray(g), opt.init(w), w)
        (s,) = cj.caution_stats(state)
        out[den] = (int(s.count), float(s.scale), float(jnp.abs(updates).max()))
    assert out["size"] == (80, 100.0, pytest.approx(0.1))
    assert out["nonzero"] == (80, 1.0, pytest.approx(1e-3))
