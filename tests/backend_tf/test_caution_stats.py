"""Keras telemetry (`caution_stats=True`, `opt.caution_stats()`) and the sparse denominator, against the reference."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import cautious.spec as spec
import cautious.tensorflow as ctf
from cautious import Caution

CAUTIONS = [Caution(), Caution("count_plus_one", denominator="nonzero"), Caution("exact"), Caution("none")]
RULES = {
    "AdamW": (ctf.AdamW, spec.adamw, dict(weight_decay=0.01, eps_placement="corrected")),
    "Lion": (ctf.Lion, spec.lion, dict(weight_decay=0.1)),
}


@pytest.fixture(autouse=True)
def _float64():
    old = keras.config.floatx()
    keras.config.set_floatx("float64")
    yield
    keras.config.set_floatx(old)


@pytest.mark.parametrize("caution", CAUTIONS, ids=repr)
@pytest.mark.parametrize("rule", list(RULES))
def test_stats_and_steps_match_the_reference(rule, caution):
    cls, ref_factory, kw = RULES[rule]
    rng = np.random.default_rng(0)
    p0 = [rng.standard_normal((6, 5)), rng.standard_normal(7)]
    variables = [keras.Variable(p, dtype="float64") for p in p0]
    opt = cls(learning_rate=0.01, caution=caution, caution_stats=True, **kw)
    opt.build(variables)
    ref = ref_factory(lr=0.01, caution=caution, **kw)
    state, params = ref.init(p0), p0
    for _ in range(3):
        grads = [rng.standard_normal(p.shape) * (rng.random(p.shape) < 0.6) for p in p0]  # exact zeros too
        want = ref.stats(params, grads, state)
        params, state = ref.step(params, grads, state)
        opt.apply_gradients(zip([tf.constant(g) for g in grads], variables))
        got = [(int(s.count.numpy()), s.n, float(s.scale.numpy())) for s in opt.caution_stats()]
        assert got == [tuple(s) for s in want]
    for v, p in zip(variables, params):
        np.testing.assert_allclose(v.numpy(), p, rtol=0, atol=1e-6)


def test_stats_are_off_by_default_and_keep_the_optimizer_variables():
    v = [keras.Variable(np.ones(3))]
    plain, with_stats = ctf.AdamW(learning_rate=0.1), ctf.AdamW(learning_rate=0.1, caution_stats=True)
    plain.build(v)
    with_stats.build(v)
    assert len(with_stats.variables) == len(plain.variables) + 2
    with pytest.raises(ValueError, match="caution_stats=True"):
        plain.caution_stats()
    assert ctf.AdamW(learning_rate=0.1, caution_stats=True).get_config()["caution_stats"] is True
    with pytest.raises(ValueError, match="caution_stats=True needs caution on"):
        ctf.AdamW(learning_rate=0.1, caution=False, caution_stats=True)
    with pytest.raises(TypeError, match="caution_stats must be a bool"):
        ctf.Lion(learning_rate=0.1, caution_stats=1)


def test_nonzero_denominator_does_not_inflate_a_sparse_embedding_step():
    """The issue's case: 10 rows of Embedding(1000, 8) per batch; mean_clamp scales them by 100, nonzero by 1."""
    rng = np.random.default_rng(0)
    g = np.zeros((1000, 8))
    g[rng.choice(1000, 10, replace=False)] = rng.standard_normal((10, 8))
    scales = {}
    for den in ("size", "nonzero"):
        v = keras.Variable(np.zeros((1000, 8)))
        opt = ctf.AdamW(learning_rate=1e-3, weight_decay=0.0, caution=Caution(denominator=den), caution_stats=True)
        opt.apply_gradients([(tf.constant(g), v)])
        (s,) = opt.caution_stats()
        scales[den] = (int(s.count.numpy()), float(s.scale.numpy()), float(np.abs(v.numpy()).max()))
    assert scales["size"] == (80, 100.0, pytest.approx(0.1, rel=1e-4))
    assert scales["nonzero"] == (80, 1.0, pytest.approx(1e-3, rel=1e-4))
