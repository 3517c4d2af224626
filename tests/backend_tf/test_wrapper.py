"""cautious.tensorflow.Cautious: caution for any Keras optimizer, against spec.whole_step."""

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


@keras.saving.register_keras_serializable(package="cautious_tests")
class SignDecay(keras.optimizers.Optimizer):
    """An optimizer no library ships: sign of a momentum, with a decay that can flip the update's sign."""

    def __init__(self, learning_rate=0.01, momentum=0.9, decay=0.1, **kwargs):
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.momentum, self.decay = momentum, decay

    def build(self, var_list):
        super().build(var_list)
        self.bufs = [self.add_variable_from_reference(v, "buf") for v in var_list]

    def update_step(self, gradient, variable, learning_rate):
        buf = self.bufs[self._get_variable_index(variable)]
        lr = tf.cast(learning_rate, variable.dtype)
        self.assign(buf, self.momentum * buf + gradient)
        self.assign_sub(variable, lr * (tf.sign(buf) + self.decay * variable))

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "decay": self.decay}


INNERS = {
    "Adafactor": lambda: keras.optimizers.Adafactor(learning_rate=0.01),
    "SignDecay": lambda: SignDecay(),
    "AdamW": lambda: keras.optimizers.AdamW(learning_rate=0.01, weight_decay=0.1),
    "cautious.SGD-off": lambda: ctf.SGD(learning_rate=0.05, momentum=0.9, caution=False),
}
CAUTIONS = [Caution(), Caution("count_plus_one", denominator="nonzero"), Caution("exact"), Caution("none")]
SHAPES = [(6, 5), (7,), (3, 4, 2)]


def _bare_step(make, wrapped, values, grads, dtype):
    """The inner optimizer's own caution-free step from the wrapped optimizer's current state."""
    vs = [keras.Variable(v, dtype=dtype) for v in values]
    bare = make()
    bare.build(vs)
    for a, b in zip(bare.variables, wrapped.inner_optimizer.variables, strict=True):
        a.assign(b)
    bare.apply([tf.constant(g, dtype) for g in grads], vs)
    return [v.numpy().astype(np.float64) for v in vs]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("caution", CAUTIONS, ids=repr)
@pytest.mark.parametrize("inner", list(INNERS))
def test_the_wrapper_is_the_spec_whole_step_of_the_inner_step(inner, caution, dtype):
    make = INNERS[inner]
    rng = np.random.default_rng(0)
    vs = [keras.Variable(rng.standard_normal(s), dtype=dtype) for s in SHAPES]
    opt = ctf.Cautious(make(), caution, caution_stats=True)
    opt.build(vs)
    for _ in range(3):
        grads = [rng.standard_normal(s) * (rng.random(s) < 0.7) for s in SHAPES]
        before = [v.numpy().astype(np.float64) for v in vs]
        nexts = _bare_step(make, opt, before, grads, dtype)
        opt.apply([tf.constant(g, dtype) for g in grads], vs)
        for v, p0, q, g, st in zip(vs, before, nexts, grads, opt.caution_stats()):
            want, mask, count, scale = spec.whole_step(p0, q, np.asarray(g, dtype), caution)
            assert (int(st.count.numpy()), st.n, float(st.scale.numpy())) == (count, v.shape.num_elements(), scale)
            got = v.numpy().astype(np.float64)
            if dtype == "float64":  # the same float64 operations: bit for bit
                np.testing.assert_array_equal(got, want)
                continue
            bound = 3 * 2.0**-24 * scale * np.abs(q - p0) + 2 * 2.0**-24 * np.abs(want) + 1e-30
            assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)
            np.testing.assert_array_equal(got[~mask], p0[~mask])


def _data(seed=0, n=128):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    y = np.tanh(x @ rng.standard_normal((8, 1))).astype(np.float32)
    return x, y


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)])


@pytest.mark.parametrize("inner", ["Adafactor", "SignDecay"])
def test_caution_false_is_the_bare_optimizer_bit_for_bit_in_fit(inner):
    x, y = _data()
    weights = []
    for opt in (INNERS[inner](), ctf.Cautious(INNERS[inner](), caution=False)):
        model = _model()
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
        weights.append(model.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


def test_fit_jit_save_reload_continue_identically(tmp_path):
    x, y = _data(1)
    results = []
    for jit in (True, False):
        model = _model(1)
        model.compile(
            optimizer=ctf.Cautious(keras.optimizers.Adafactor(learning_rate=0.05)), loss="mse", jit_compile=jit
        )
        hist = model.fit(x, y, batch_size=32, epochs=4, shuffle=False, verbose=0).history["loss"]
        assert hist[-1] < hist[0], hist
        results.append(model)
    for a, b in zip(results[0].get_weights(), results[1].get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    model = results[1]
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is ctf.Cautious
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert int(loaded.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy()) > 0
    for i in range(3):
        xb, yb = x[32 * i : 32 * (i + 1)], y[32 * i : 32 * (i + 1)]
        model.train_on_batch(xb, yb)
        loaded.train_on_batch(xb, yb)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


def _apply_step(opt, vs):
    def step(gs):
        opt.apply_gradients(zip(gs, vs))

    return step


def test_tf_function_step_equals_eager():
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    out = []
    for compiled in (False, True):
        vs = [keras.Variable(np.ones(s, np.float32)) for s in SHAPES]
        opt = ctf.Cautious(SignDecay(), Caution("exact"))
        opt.build(vs)  # as model.fit does: variables are created outside the traced step

        step = _apply_step(opt, vs)
        if compiled:
            step = tf.function(step, jit_compile=True)
        for _ in range(3):
            step([tf.constant(g) for g in grads])
        out.append([v.numpy() for v in vs])
    for a, b in zip(*out):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not np.array_equal(out[0][0], np.ones(SHAPES[0], np.float32))


def test_refusals_and_shared_learning_rate():
    with pytest.raises(ValueError, match="caution off"):
        ctf.Cautious(ctf.AdamW())
    with pytest.raises(ValueError, match="already wrapped"):
        ctf.Cautious(ctf.Cautious(keras.optimizers.SGD()))
    with pytest.raises(ValueError, match="learning_rate"):
        ctf.Cautious(keras.optimizers.SGD(), learning_rate=0.1)
    with pytest.raises(TypeError, match="keras.optimizers.Optimizer"):
        ctf.Cautious(object())
    with pytest.raises(ValueError, match="caution_stats"):
        ctf.Cautious(keras.optimizers.SGD(), caution=False, caution_stats=True)
    opt = ctf.Cautious(keras.optimizers.SGD(learning_rate=0.1))
    opt.learning_rate = 0.5
    assert float(opt.inner_optimizer.learning_rate.numpy()) == 0.5


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_wrapper_conformance_around_every_spec_rule(mode):
    from cautious.conformance.adapters.tensorflow import TFWrapperAdapter
    from cautious.conformance.wrapper import run_wrapper_conformance

    res = run_wrapper_conformance(TFWrapperAdapter(mode), max_examples=16)
    assert {rule for rule, _ in res.examples} == set(spec.RULES)
    assert res.worst <= 1.0


class _InfWhereZero(keras.optimizers.Optimizer):
    """Steps by -g, and by +inf where g == 0: an infinite step the gradient does not direct."""

    def __init__(self, **kwargs):
        super().__init__(learning_rate=1.0, **kwargs)

    def update_step(self, gradient, variable, learning_rate):
        self.assign_add(variable, tf.where(gradient == 0, tf.constant(np.inf, variable.dtype), -gradient))


def test_an_infinite_step_where_g_is_zero_is_dropped_as_the_spec_says():
    v = keras.Variable(np.ones(4), dtype="float64")
    g = np.array([1.0, 0.0, -1.0, np.nan])
    opt = ctf.Cautious(_InfWhereZero(), Caution("exact"))
    opt.apply([tf.constant(g)], [v])
    want, mask, count, _ = spec.whole_step(np.ones(4), np.array([0.0, np.inf, 2.0, np.nan]), g, Caution("exact"))
    assert mask.tolist() == [True, False, True, True] and count == 3
    np.testing.assert_array_equal(v.numpy(), want)
