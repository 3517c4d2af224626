"""cautious.tensorflow inside Keras: fit, save and reload, jit_compile, mixed precision."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import cautious.tensorflow as ctf  # noqa: E402
from cautious import Caution  # noqa: E402

OPTIMIZERS = {
    "AdamW": lambda c: ctf.AdamW(learning_rate=0.01, caution=c),
    "Adam": lambda c: ctf.Adam(learning_rate=0.01, amsgrad=True, caution=c),
    "Lion": lambda c: ctf.Lion(learning_rate=0.003, weight_decay=0.01, caution=c),
    "SGD": lambda c: ctf.SGD(learning_rate=0.05, momentum=0.9, nesterov=True, caution=c),
}


def _data(seed=0, n=256):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    w = rng.standard_normal((8, 1)).astype(np.float32)
    y = np.tanh(x @ w) + 0.01 * rng.standard_normal((n, 1)).astype(np.float32)
    return x, y


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)])


@pytest.mark.parametrize("caution", [True, False], ids=["cautious", "plain"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fit_save_reload_continue_identically(tmp_path, name, caution):
    x, y = _data()
    model = _model()
    model.compile(optimizer=OPTIMIZERS[name](caution), loss="mse")
    hist = model.fit(x, y, batch_size=32, epochs=4, shuffle=False, verbose=0).history["loss"]
    assert hist[-1] < 0.7 * hist[0], hist
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is type(model.optimizer)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert int(loaded.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy())
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for i in range(5):
        xb, yb = x[32 * i : 32 * (i + 1)], y[32 * i : 32 * (i + 1)]
        model.train_on_batch(xb, yb)
        loaded.train_on_batch(xb, yb)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(model.get_weights()[0], _model().get_weights()[0])


@pytest.mark.parametrize("jit", [True, False])
def test_jit_compile_fit_matches_eager_function(jit):
    x, y = _data(1)
    weights = []
    for run_eagerly, jit_compile in ((False, jit), (True, False)):
        model = _model(1)
        model.compile(
            optimizer=ctf.AdamW(learning_rate=0.01, caution=Caution("count_plus_one")),
            loss="mse",
            jit_compile=jit_compile,
            run_eagerly=run_eagerly,
        )
        model.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0)
        weights.append(model.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    x, y = _data(2)
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = _model(2)
        model.compile(optimizer=ctf.AdamW(learning_rate=0.01), loss="mse", jit_compile=False)
        if policy == "mixed_float16":
            assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
            assert isinstance(model.optimizer.inner_optimizer, ctf.AdamW)
        hist = model.fit(x, y, batch_size=32, epochs=4, shuffle=False, verbose=0).history["loss"]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert np.all(np.isfinite(hist)) and hist[-1] < 0.7 * hist[0], hist


def test_bfloat16_variables_compute_in_float32():
    import tensorflow as tf

    import cautious.spec as spec

    p0 = np.array([1.0, -0.5, 0.25, 2.0], np.float32)
    g = np.array([0.3, -0.2, -0.1, 0.0], np.float32)
    var = tf.Variable(tf.cast(p0, tf.bfloat16))
    ctf.Lion(learning_rate=2.0**-6, weight_decay=0.5).apply_gradients([(tf.cast(g, tf.bfloat16), var)])
    want, _ = spec.lion(lr=2.0**-6, weight_decay=0.5).step([p0], [g], spec.lion().init([p0]))
    want_bf16 = spec.round_to(want[0].astype(np.float64), "bfloat16")
    np.testing.assert_array_equal(var.numpy().astype(np.float32), want_bf16)
