"""cautious.tensorflow.Adafactor: caution=False is keras.optimizers.Adafactor bit for bit; the spec; errors."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import cautious.spec as spec  # noqa: E402
import cautious.tensorflow as ctf  # noqa: E402
from cautious import Caution  # noqa: E402
from cautious.spec.errors import message  # noqa: E402

SHAPES = [(6, 5), (7,), (), (3, 2, 4)]
CONFIGS = {
    "default": dict(),
    "lr": dict(learning_rate=0.05, clip_threshold=0.5),
    "decay": dict(learning_rate=0.3, weight_decay=0.05, beta_2_decay=-0.5, epsilon_1=1e-10),
}


def _data(dtype, steps=4, seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(steps)]
    for gs in grads:
        gs[0][0, 0] = 0.0  # an exact zero: where caution acts without momentum
    return params, grads


def _run(opt, params, grads, mode="eager"):
    variables = [tf.Variable(p) for p in params]
    opt.build(variables)

    def apply(gs):
        opt.apply_gradients(zip(gs, variables))

    if mode != "eager":
        apply = tf.function(apply)
    for gs in grads:
        apply([tf.constant(g) for g in gs])
    return [v.numpy() for v in variables], opt


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_caution_off_is_keras_bit_for_bit(name, dtype, mode):
    params, grads = _data(dtype)
    ours, o1 = _run(ctf.Adafactor(caution=False, **CONFIGS[name]), params, grads, mode)
    theirs, o2 = _run(keras.optimizers.Adafactor(**CONFIGS[name]), params, grads, mode)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b)
    assert [v.shape for v in o1.variables] == [v.shape for v in o2.variables]
    for a, b in zip(o1.variables, o2.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def _spec(kw, caution):
    return spec.adafactor(
        lr=kw.get("learning_rate", 0.001),
        beta2_decay=kw.get("beta_2_decay", -0.8),
        eps=(kw.get("epsilon_1", 1e-30), 1e-3),
        d=kw.get("clip_threshold", 1.0),
        weight_decay=kw.get("weight_decay", 0.0),
        beta1=kw.get("beta_1", 0.0),
        eps_form="add",
        weight_decay_form="lr_before_scale",
        caution=caution,
    )


# Keras casts Python-float constants (weight_decay, epsilon_2) through float32 even for float64 variables:
# the values here are exact in float32, so float64 variables match the spec to float64 rounding
SPEC_CONFIGS = [
    dict(learning_rate=0.25, weight_decay=0.0625, beta_2_decay=-0.5, epsilon_1=1e-10),
    dict(learning_rate=0.125, beta_1=0.875),
]


@pytest.mark.parametrize("caution", [False, True, Caution("exact")], ids=str)
@pytest.mark.parametrize("kw", SPEC_CONFIGS, ids=str)
def test_float64_matches_the_spec(kw, caution):
    keras.config.set_floatx("float64")  # the learning-rate variable in float64
    try:
        params, grads = _data("float64")
        ours, _ = _run(ctf.Adafactor(caution=caution, **kw), params, grads)
    finally:
        keras.config.set_floatx("float32")
    ref = _spec(kw, caution)
    ps, st = params, ref.init(params)
    for gs in grads:
        ps, st = ref.step(ps, gs, st)
    for a, r in zip(ours, ps, strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-12, atol=1e-14)


def test_caution_without_momentum_only_rescales():
    params, grads = _data("float64", steps=1)
    plain, _ = _run(ctf.Adafactor(caution=False, learning_rate=0.1), params, grads)
    caut, _ = _run(ctf.Adafactor(caution=Caution("exact"), learning_rate=0.1), params, grads)
    np.testing.assert_allclose(caut[0] - params[0], (30 / 29) * (plain[0] - params[0]), rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(caut[1], plain[1])


@pytest.mark.parametrize(
    ("kw", "exc", "msg"),
    [
        ({"beta_2_decay": 0.5}, ValueError, message("beta2_decay", 0.5)),
        ({"clip_threshold": 0.0}, ValueError, message("clip_threshold", 0.0)),
        ({"epsilon_1": -1.0}, ValueError, message("eps", -1.0, "epsilon_1")),
        ({"epsilon_2": -1.0}, ValueError, message("eps", -1.0, "epsilon_2")),
        ({"learning_rate": -1.0}, ValueError, message("lr", -1.0, "learning_rate")),
        ({"beta_1": 1.0}, ValueError, message("beta1", 1.0, "beta_1")),
        ({"relative_step": 1}, TypeError, "relative_step must be a bool (True or False), got 1"),
    ],
)
def test_errors(kw, exc, msg):
    with pytest.raises(exc) as info:
        ctf.Adafactor(**kw)
    assert str(info.value) == msg


def test_config_round_trip():
    opt = ctf.Adafactor(learning_rate=0.02, beta_1=0.5, caution=Caution("exact"))
    back = ctf.Adafactor.from_config(opt.get_config())
    assert back.beta_1 == 0.5 and back.caution == Caution("exact") and back.learning_rate.numpy() == np.float32(0.02)


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_conformance(mode):
    from cautious.conformance import run_conformance
    from cautious.conformance.adapters.tensorflow import TFAdapter

    result = run_conformance(TFAdapter(mode), rules=("adafactor",), max_examples=30)
    assert result.examples[("adafactor", "float32")] > 0 and result.examples[("adafactor", "float64")] > 0


def test_caution_stats_count_the_nonzero_gradient_entries():
    params, grads = _data("float32", steps=1)
    _, opt = _run(ctf.Adafactor(learning_rate=0.1, caution_stats=True), params, grads)
    stats = opt.caution_stats()
    # without momentum u has the sign of g: every nonzero gradient entry is kept (one exact zero in the first)
    assert [int(s.count.numpy()) for s in stats] == [int(np.count_nonzero(g)) for g in grads[0]]
