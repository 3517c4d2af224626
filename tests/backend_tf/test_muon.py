"""cautious.tensorflow.Muon: caution=False is keras.optimizers.Muon bit for bit; caution as the spec."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import cautious
import cautious.tensorflow as ctf
from cautious import spec

SHAPES = {"w": (4, 6), "b": (6,), "t": (7, 3)}
LR = 2.0**-6  # exact in the float32 learning-rate variable


@pytest.fixture
def floatx64():
    """Keras's Muon multiplies by the learning-rate variable (floatx): float64 variables need floatx float64."""
    old = keras.config.floatx()
    keras.config.set_floatx("float64")
    yield
    keras.config.set_floatx(old)


def _run(opt, dtype="float32", steps=3, seed=1):
    rng = np.random.default_rng(0)
    vs = [keras.Variable(rng.standard_normal(s).astype(dtype), name=k) for k, s in SHAPES.items()]
    r = np.random.default_rng(seed)
    grads = []
    for _ in range(steps):
        gs = [r.standard_normal(v.shape).astype(dtype) for v in vs]
        grads.append(gs)
        opt.apply_gradients(zip([tf.constant(g) for g in gs], vs, strict=True))
    return [v.numpy() for v in vs], [x.numpy() for x in opt.variables], grads


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kw", [{}, dict(nesterov=False), dict(rms_rate=None, weight_decay=0.1)], ids=repr)
def test_caution_off_is_keras_muon_bitwise(dtype, kw, request):
    if dtype == "float64":
        request.getfixturevalue("floatx64")
    native = _run(keras.optimizers.Muon(learning_rate=LR, **kw), dtype)
    ours = _run(ctf.Muon(learning_rate=LR, caution=False, **kw), dtype)
    for a, b in zip(native[0] + native[1], ours[0] + ours[1], strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("position", ["after", "before"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_matrices_match_the_spec_float64(position, nesterov, floatx64):
    caution = cautious.Caution("exact")
    params, _, grads = _run(
        ctf.Muon(learning_rate=LR, nesterov=nesterov, weight_decay=0.25, caution=caution, mask_position=position),
        "float64",
    )
    ref = spec.muon(
        lr=LR,
        weight_decay=0.25,
        momentum=0.95,
        nesterov=nesterov,
        eps=1e-7,
        caution=caution,
        mask_position=position,
        muon_momentum="sum",
        ns_eps="add",
        shape_scale="rms",
        rms_rate=0.2,
    )
    rng = np.random.default_rng(0)
    start = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    for i, k in enumerate(SHAPES):
        if len(SHAPES[k]) != 2:
            continue
        p, state = [start[k]], ref.init([start[k]])
        for gs in grads:
            p, state = ref.step(p, [gs[i]], state)
        # Keras rounds sqrt(max(R, C)) and its Python constants (momentum, weight decay) to float32
        # (keras.ops.cast of a Python float), about 3e-8 relative; everything else is float64.
        np.testing.assert_allclose(params[i], p[0], rtol=1e-6, atol=1e-9)


def test_caution_masks_the_adam_branch_too():
    off = _run(ctf.Muon(learning_rate=LR, caution=False))[0]
    on = _run(ctf.Muon(learning_rate=LR))[0]
    assert not np.array_equal(off[1], on[1])  # the 1-d variable (Keras's AdamW branch) is masked
    assert not np.array_equal(off[0], on[0])


def test_cautious_weight_decay_and_config_round_trip():
    a = _run(ctf.Muon(learning_rate=LR, weight_decay=0.5))[0]
    b = _run(ctf.Muon(learning_rate=LR, weight_decay=0.5, cautious_weight_decay=True))[0]
    assert not np.array_equal(a[0], b[0])
    opt = ctf.Muon(learning_rate=LR, mask_position="before", caution=cautious.Caution("exact"))
    again = ctf.Muon.from_config(opt.get_config())
    assert again.mask_position == "before" and again.caution == cautious.Caution("exact")


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        (dict(learning_rate=-1.0), "learning_rate must be a finite number >= 0, got -1.0"),
        (dict(momentum=1.5), "momentum must be a finite number in [0, 1], got 1.5"),
        (dict(ns_steps=100), "ns_steps must be an integer in [0, 100), got 100"),
        (dict(mask_position="post"), "mask_position must be one of 'after', 'before', got 'post'"),
        (dict(adam_beta_1=1.0), "adam_beta_1 must be a finite number in [0, 1), got 1.0"),
        (dict(rms_rate=-0.2), "rms_rate must be a finite number >= 0, got -0.2"),
    ],
)
def test_errors_are_the_spec_messages(kw, msg):
    with pytest.raises(ValueError) as info:
        ctf.Muon(**kw)
    assert str(info.value) == msg
