"""cautious.tensorflow.Adopt / LaProp (Keras has neither) against cautious.spec, eager and XLA."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import cautious.spec as spec  # noqa: E402
import cautious.tensorflow as ctf  # noqa: E402
from cautious import Caution  # noqa: E402
from cautious.spec.errors import message  # noqa: E402

SHAPES = [(6, 5), (7,), ()]
LR = 0.125  # exact in the float32 learning-rate variable


def _run(opt, params, grads, mode):
    variables = [tf.Variable(p) for p in params]
    opt.build(variables)

    def apply(gs):
        opt.apply_gradients(zip(gs, variables))

    if mode != "eager":
        apply = tf.function(apply, jit_compile=(mode == "xla"))
    for gs in grads:
        apply([tf.constant(g) for g in gs])
    return [v.numpy() for v in variables], opt


def _compare(opt, ref, dtype="float64", mode="eager", steps=6, seed=0, rtol=1e-12):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(steps)]
    a, _ = _run(opt, params, grads, mode)
    q = [p.copy() for p in params]
    st = ref.init(q)
    for gs in grads:
        q, st = ref.step(q, gs, st)
    for x, y in zip(a, q):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol)


CAUTIONS = [False, Caution(), Caution("exact")]


@pytest.mark.parametrize("mode", ["eager", "xla"])
@pytest.mark.parametrize("caution", CAUTIONS, ids=repr)
@pytest.mark.parametrize(
    ("kw", "skw"),
    [
        ({}, {}),
        (
            {"clip_exp": None, "nesterov": True, "maximize": True},
            {"clip_exp": None, "nesterov": True, "maximize": True},
        ),
        (
            {"weight_decay": 0.25, "cautious_weight_decay": True, "beta_1": 0.5, "epsilon": 1e-3},
            {
                "weight_decay": 0.25,
                "decoupled_weight_decay": True,
                "cautious_weight_decay": True,
                "betas": (0.5, 0.9999),
                "eps": 1e-3,
            },
        ),
    ],
)
def test_adopt_matches_spec(kw, skw, caution, mode):
    _compare(ctf.Adopt(LR, caution=caution, **kw), spec.adopt(lr=LR, caution=caution, **skw), mode=mode)


@pytest.mark.parametrize("mode", ["eager", "xla"])
@pytest.mark.parametrize("caution", CAUTIONS, ids=repr)
@pytest.mark.parametrize(
    ("kw", "skw"),
    [
        ({}, {}),
        ({"maximize": True, "beta_1": 0.5, "epsilon": 1e-3}, {"maximize": True, "betas": (0.5, 0.999), "eps": 1e-3}),
        ({"weight_decay": 0.25}, {"weight_decay": 0.25}),
        ({"weight_decay": 0.25, "decay_order": "pre_update"}, {"weight_decay": 0.25, "decay_order": "pre_update"}),
        ({"weight_decay": 0.25, "cautious_weight_decay": True}, {"weight_decay": 0.25, "cautious_weight_decay": True}),
    ],
)
def test_laprop_matches_spec(kw, skw, caution, mode):
    _compare(ctf.LaProp(LR, caution=caution, **kw), spec.laprop(lr=LR, caution=caution, **skw), mode=mode)


@pytest.mark.parametrize("cls", [ctf.Adopt, ctf.LaProp])
def test_float32_within_float32_rounding(cls):
    ref = spec.adopt if cls is ctf.Adopt else spec.laprop
    kw = {"decoupled_weight_decay": True} if cls is ctf.Adopt else {}
    _compare(cls(LR, weight_decay=0.25), ref(lr=LR, weight_decay=0.25, **kw), dtype="float32", rtol=2e-5)


def test_adopt_first_step_moves_nothing():
    v = tf.Variable([1.0, 1.0, 1.0, 1.0])
    opt = ctf.Adopt(0.1, weight_decay=0.5, caution_stats=True)
    opt.apply_gradients([(tf.constant([1.0, -2.0, 3.0, 0.0]), v)])
    np.testing.assert_array_equal(v.numpy(), np.ones(4))
    (st,) = opt.caution_stats()
    assert (int(st.count.numpy()), st.n, float(st.scale.numpy())) == (0, 4, 1000.0)
    opt.apply_gradients([(tf.constant([1.0, -2.0, 3.0, 0.0]), v)])
    assert not np.array_equal(v.numpy(), np.ones(4))


@pytest.mark.parametrize(
    ("cls", "kw", "exc", "msg"),
    [
        (ctf.Adopt, {"clip_exp": -1.0}, ValueError, message("clip_exp", -1.0)),
        (ctf.Adopt, {"beta_2": 1.0}, ValueError, message("beta2", 1.0, "beta_2")),
        (ctf.LaProp, {"decay_order": "after"}, ValueError, message("decay_order", "after")),
        (ctf.LaProp, {"epsilon": -1.0}, ValueError, message("eps", -1.0, "epsilon")),
    ],
)
def test_errors_are_the_spec_table(cls, kw, exc, msg):
    with pytest.raises(exc) as info:
        cls(**kw)
    assert str(info.value) == msg


@pytest.mark.parametrize("cls", [ctf.Adopt, ctf.LaProp])
def test_config_round_trip(cls):
    opt = cls(0.01, caution=Caution("exact"))
    again = cls.from_config(opt.get_config())
    assert again.get_config() == opt.get_config()
