"""cautious.tensorflow optimizers against Keras (caution=False) and against cautious.spec."""

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
from cautious.backends.tensorflow import _ops  # noqa: E402
from cautious.spec.errors import invalid_examples  # noqa: E402

SHAPES = [(6, 5), (7,), ()]

KERAS_PAIRS = {
    "adamw": (keras.optimizers.AdamW, ctf.AdamW, dict(learning_rate=0.01, weight_decay=0.1)),
    "adam": (keras.optimizers.Adam, ctf.Adam, dict(learning_rate=0.01, amsgrad=True, weight_decay=0.01)),
    "lion": (keras.optimizers.Lion, ctf.Lion, dict(learning_rate=0.003, weight_decay=0.1)),
    "sgd": (keras.optimizers.SGD, ctf.SGD, dict(learning_rate=0.05, momentum=0.9, weight_decay=0.01)),
    "sgd_nesterov": (keras.optimizers.SGD, ctf.SGD, dict(learning_rate=0.05, momentum=0.9, nesterov=True)),
    "sgd_plain": (keras.optimizers.SGD, ctf.SGD, dict(learning_rate=0.05)),
}


def _run(opt, params, grad_seq, mode="eager", dtype=None):
    variables = [tf.Variable(p) for p in params]
    opt.build(variables)

    def apply(gs):
        opt.apply_gradients(zip(gs, variables))

    if mode != "eager":
        apply = tf.function(apply, jit_compile=(mode == "xla"))
    for gs in grad_seq:
        apply([tf.constant(g) for g in gs])
    return [v.numpy() for v in variables], opt


def _data(dtype, steps=6, seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(steps)]
    return params, grads


@pytest.mark.parametrize("name", list(KERAS_PAIRS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_caution_off_equals_keras(name, dtype):
    kcls, ccls, kw = KERAS_PAIRS[name]
    params, grads = _data(dtype)
    want, _ = _run(kcls(**kw), params, grads)
    got, _ = _run(ccls(caution=False, **kw), params, grads)
    start = np.concatenate([p.ravel() for p in params])
    w = np.concatenate([x.ravel() for x in want])
    g = np.concatenate([x.ravel() for x in got])
    moved = np.max(np.abs(w - start))
    # float32: rounding; float64: Keras's float32 bias-correction powers (about 1e-7 relative)
    # and its float32 learning-rate variable.
    # (Keras's float32 powers move a float64 Adam step by ~1e-5 relative; SGD and Lion have none.)
    atol = 1e-5 * moved if dtype == "float32" or not name.startswith("adam") else 1e-4 * moved
    assert moved > 0.01
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=atol)


def _spec_for(name, caution, **extra):
    if name == "adamw":
        return spec.adamw(lr=0.01, eps=1e-7, weight_decay=0.1, caution=caution, eps_placement="uncorrected", **extra)
    if name == "adam":
        return spec.adam(
            lr=0.01,
            eps=1e-7,
            amsgrad=True,
            weight_decay=0.01,
            decoupled_weight_decay=True,
            caution=caution,
            eps_placement="uncorrected",
            **extra,
        )
    if name == "lion":
        return spec.lion(lr=0.003, weight_decay=0.1, caution=caution, **extra)
    # SGD: Keras's velocity form, with Keras's float32 momentum and weight decay constants
    keras_sgd = dict(lr=0.05, caution=caution, momentum_form="keras", **extra)
    mu, wd = float(np.float32(0.9)), float(np.float32(0.01))
    if name == "sgd":
        return spec.sgd(momentum=mu, weight_decay=wd, decoupled_weight_decay=True, **keras_sgd)
    if name == "sgd_nesterov":
        return spec.sgd(momentum=mu, nesterov=True, **keras_sgd)
    return spec.sgd(**keras_sgd)


def _spec_run(opt, params, grads):
    state = opt.init(params)
    for gs in grads:
        params, state = opt.step(params, gs, state)
    return params, state


def _build(name, dtype, **kw):
    _, ccls, base = KERAS_PAIRS[name]
    previous = keras.config.floatx()
    keras.config.set_floatx(dtype)  # float64: an exact float64 learning-rate variable
    try:
        return ccls(**base, **kw)
    finally:
        keras.config.set_floatx(previous)


@pytest.mark.parametrize("name", list(KERAS_PAIRS))
@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
@pytest.mark.parametrize("normalize", ["mean_clamp", "count_plus_one", "exact", "none"])
def test_matches_spec_over_steps(name, mode, normalize):
    caution = Caution(normalize, floor=0.3 if normalize == "mean_clamp" else 1e-3)
    for dtype, tol in (("float32", 2e-6), ("float64", 1e-14)):
        params, grads = _data(dtype, steps=4, seed=1)
        got, _ = _run(_build(name, dtype, caution=caution), params, grads, mode)
        want, _ = _spec_run(_spec_for(name, caution), params, grads)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["adamw", "lion", "sgd"])
def test_cautious_weight_decay_and_maximize_match_spec(name):
    for dtype, tol in (("float32", 2e-6), ("float64", 1e-14)):
        params, grads = _data(dtype, steps=3, seed=2)
        got, _ = _run(_build(name, dtype, cautious_weight_decay=True, maximize=True), params, grads, "function")
        want, _ = _spec_run(_spec_for(name, Caution(), cautious_weight_decay=True, maximize=True), params, grads)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_large_tensor_count_is_exact(mode):
    # n >= 4096 takes the two-level (column-block) count, with a tail when n % 8 != 0.
    for n in (4096, 8 * 1000 + 5, 70001):
        rng = np.random.default_rng(n)
        u = rng.standard_normal(n).astype(np.float32)
        g = rng.standard_normal(n).astype(np.float32)
        g[::7] = 0.0
        u[::11] = np.nan
        u = u.reshape(-1, 1) if n % 2 else u

        def count(u, g, n=n):
            return _ops.kept_count(_ops.cautious_mask(u, tf.reshape(g, tf.shape(u))), n)

        fn = tf.function(count, jit_compile=True) if mode == "xla" else count
        got = int(fn(tf.constant(u), tf.constant(g)))
        assert got == spec.kept_count(spec.cautious_mask(u.ravel(), g))


def test_large_tensor_step_matches_spec():
    params, grads = _data("float32", steps=3, seed=3, shapes=[(129, 65)])
    got, _ = _run(_build("adamw", "float32", caution=Caution("count_plus_one")), params, grads, "xla")
    want, _ = _spec_run(_spec_for("adamw", Caution("count_plus_one")), params, grads)
    np.testing.assert_allclose(got[0], want[0], rtol=2e-6, atol=2e-6)


def test_mask_edge_cases_nan_kept_zeros_masked():
    u = tf.constant([1.0, -2.0, 3.0, 0.0, -0.0, np.nan, 1.0, 1e-30, -1e-30])
    g = tf.constant([0.5, 1.0, -0.0, 1.0, -1.0, 1.0, np.nan, 1e-30, -1e-30])
    want = spec.cautious_mask(u.numpy(), g.numpy())
    np.testing.assert_array_equal(_ops.cautious_mask(u, g).numpy(), want)
    assert want.tolist() == [True, False, False, False, False, True, True, True, True]


def test_nan_gradient_reaches_params():
    opt = ctf.AdamW(learning_rate=0.1)
    var = tf.Variable([1.0, 2.0, 3.0])
    opt.apply_gradients([(tf.constant([np.nan, 1.0, -1.0]), var)])
    p = var.numpy()
    assert np.isnan(p[0]) and np.all(np.isfinite(p[1:]))


def test_zero_size_and_scalar_variables():
    opt = ctf.AdamW(learning_rate=0.1, caution=Caution("exact"))
    empty = tf.Variable(np.zeros((0, 3), np.float32))
    scalar = tf.Variable(2.0)
    for _ in range(2):
        opt.apply_gradients([(tf.zeros((0, 3)), empty), (tf.constant(-1.0), scalar)])
    assert empty.shape == (0, 3)
    want, _ = _spec_run(
        spec.adamw(lr=0.1, eps=1e-7, weight_decay=0.004, caution=Caution("exact"), eps_placement="uncorrected"),
        [np.float32(2.0)],
        [[np.float32(-1.0)]] * 2,
    )
    np.testing.assert_allclose(scalar.numpy(), want[0], rtol=1e-6)


@pytest.mark.parametrize("name", ["adam", "lion", "sgd"])
def test_caution_never_changes_state(name):
    params, grads = _data("float32", steps=3, seed=4)
    _, on = _run(_build(name, "float32", caution=True), params, grads)
    _, off = _run(_build(name, "float32", caution=False), params, grads)
    on_state = [v.numpy() for v in on.variables[2:]]
    off_state = [v.numpy() for v in off.variables[2:]]
    assert on_state and len(on_state) == len(off_state)
    for a, b in zip(on_state, off_state):
        np.testing.assert_array_equal(a, b)


def test_sgd_torch_form_mask_follows_direction():
    # With g > 0 and momentum, u > 0: every entry agrees and must be kept (scale = n/n = 1).
    var = tf.Variable([1.0, 1.0])
    opt = ctf.SGD(learning_rate=0.1, momentum=0.9, caution=Caution("exact"), momentum_form="torch")
    opt.apply_gradients([(tf.constant([1.0, 2.0]), var)])
    np.testing.assert_allclose(var.numpy(), [0.9, 0.8], rtol=1e-6)
    # A disagreeing entry is masked and the kept one rescaled by n/k = 2.
    var2 = tf.Variable([1.0, 1.0])
    opt2 = ctf.SGD(learning_rate=0.1, momentum=0.9, caution=Caution("exact"), momentum_form="torch")
    opt2.build([var2])
    opt2.momentums[0].assign([-10.0, 1.0])
    opt2.iterations.assign(1)
    opt2.apply_gradients([(tf.constant([1.0, 1.0]), var2)])  # m' = [-8, 1.9]; u[0] < 0 < g[0]
    np.testing.assert_allclose(var2.numpy(), [1.0, 1.0 - 0.1 * 2 * 1.9], rtol=1e-6)


def test_weight_decay_unmasked_and_excluded():
    # g disagrees with u everywhere on the first step? No: Adam's first u has g's sign. Use a
    # prepared momentum so every entry is masked: only decay moves the parameter.
    wd, lr = 0.5, 0.1
    a, b = tf.Variable([2.0, -2.0], name="kernel"), tf.Variable([2.0, -2.0], name="bias")
    opt = ctf.AdamW(learning_rate=lr, weight_decay=wd, beta_1=0.9)
    opt.exclude_from_weight_decay(var_names=["bias"])
    opt.build([a, b])
    for m in opt._momentums:
        m.assign([-100.0, 100.0])
    g = tf.constant([1.0, -1.0])
    opt.apply_gradients([(g, a), (g, b)])
    np.testing.assert_allclose(a.numpy(), [2.0 * (1 - lr * wd), -2.0 * (1 - lr * wd)], rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), [2.0, -2.0])


def test_cautious_weight_decay_skips_opposite_signs():
    lr, wd = 0.1, 0.5
    p0 = np.array([2.0, -2.0, 2.0, 3.0], np.float32)
    g = np.array([1.0, 1.0, -1.0, 0.0], np.float32)
    var = tf.Variable(p0)
    ctf.AdamW(learning_rate=lr, weight_decay=wd, cautious_weight_decay=True).apply_gradients([(tf.constant(g), var)])
    want, _ = _spec_run(
        spec.adamw(lr=lr, eps=1e-7, weight_decay=wd, cautious_weight_decay=True, eps_placement="uncorrected"),
        [p0],
        [[g]],
    )
    np.testing.assert_allclose(var.numpy(), want[0], rtol=1e-6)
    # entry 1: u > 0, p < 0 -> no decay; entry 3: u = 0 (masked) -> decayed.
    assert abs(var.numpy()[3] - 3.0 * (1 - lr * wd)) < 1e-6


def test_float64_bias_correction_is_float64():
    # Keras's float32 betas give 0.49998085 here; the float64 formula gives 0.49998419.
    keras.config.set_floatx("float64")
    try:
        opt = ctf.Adam(learning_rate=0.5, beta_2=0.999, epsilon=0.0, caution=False)
    finally:
        keras.config.set_floatx("float32")
    var = tf.Variable(np.array([0.0]), dtype=tf.float64)
    for _ in range(3):
        opt.apply_gradients([(tf.constant([0.1], tf.float64), var)])
    want, _ = _spec_run(
        spec.adam(lr=0.5, eps=0.0, caution=False, eps_placement="uncorrected"), [np.zeros(1)], [[np.full(1, 0.1)]] * 3
    )
    np.testing.assert_allclose(var.numpy(), want[0], rtol=1e-15)


_ACCEPTED = {
    "AdamW": {
        "lr",
        "beta1",
        "beta2",
        "eps",
        "weight_decay",
        "eps_placement",
        "amsgrad",
        "maximize",
        "cautious_weight_decay",
    },
    "Lion": {"lr", "beta1", "beta2", "weight_decay", "maximize", "cautious_weight_decay"},
    "SGD": {"lr", "momentum", "weight_decay", "nesterov", "maximize", "cautious_weight_decay"},
    "Nadam": {"lr", "beta1", "beta2", "eps", "weight_decay", "momentum_decay", "momentum_schedule", "maximize"},
    "RMSprop": {"lr", "momentum", "eps", "weight_decay", "centered", "maximize", "cautious_weight_decay"},
}
_INVALID = [
    (cls, *ex)
    for cls, keys in _ACCEPTED.items()
    for ex in invalid_examples()
    if ex[0] in keys and not (ex[0] == "weight_decay" and ex[1] is None and cls != "AdamW")  # Keras's "no decay"
]


@pytest.mark.parametrize("cls,key,value,exc,msg", _INVALID)
def test_invalid_hyperparameters_use_spec_messages(cls, key, value, exc, msg):
    kw_name = {"lr": "learning_rate", "beta1": "beta_1", "beta2": "beta_2", "eps": "epsilon"}.get(key, key)
    expected = msg.replace(key, kw_name, 1) if msg.startswith(key) else msg
    with pytest.raises(exc) as info:
        getattr(ctf, cls)(**{kw_name: value})
    assert str(info.value) == expected


def test_nesterov_and_caution_errors():
    with pytest.raises(ValueError, match="nesterov=True requires momentum > 0"):
        ctf.SGD(nesterov=True)
    with pytest.raises(TypeError, match="caution must be a bool"):
        ctf.AdamW(caution="yes")
    with pytest.raises(ValueError, match="floor"):
        ctf.AdamW(caution=Caution("mean_clamp", floor=0.0))


def test_config_round_trip():
    opt = ctf.AdamW(
        learning_rate=keras.optimizers.schedules.ExponentialDecay(0.01, 10, 0.5),
        caution=Caution("count_plus_one"),
        eps_placement="corrected",
        cautious_weight_decay=True,
        clipnorm=1.0,
    )
    config = opt.get_config()
    assert config["caution"] == {"normalize": "count_plus_one", "floor": 1e-3}
    assert config["eps_placement"] == "corrected" and config["cautious_weight_decay"] is True
    clone = ctf.AdamW.from_config(config)
    assert clone.caution == Caution("count_plus_one") and clone.eps_placement == "corrected"
    assert clone.get_config() == config
    off = ctf.Lion.from_config(ctf.Lion(caution=False).get_config())
    assert off.caution is None
    serialized = keras.optimizers.serialize(ctf.SGD(momentum=0.5, caution=Caution("exact")))
    again = keras.optimizers.deserialize(serialized)
    assert isinstance(again, ctf.SGD) and again.caution == Caution("exact") and again.momentum == 0.5


@pytest.mark.parametrize(
    "extra",
    [
        dict(clipnorm=0.5),
        dict(clipvalue=0.1),
        dict(global_clipnorm=0.5),
        dict(use_ema=True, ema_momentum=0.9),
        dict(loss_scale_factor=8.0),
        dict(gradient_accumulation_steps=2),
    ],
    ids=lambda d: next(iter(d)),
)
def test_keras_options_match_keras_when_caution_off(extra):
    params, grads = _data("float32", steps=4, seed=5)
    want, kopt = _run(keras.optimizers.AdamW(learning_rate=0.01, **extra), params, grads, "function")
    got, copt = _run(ctf.AdamW(learning_rate=0.01, caution=False, **extra), params, grads, "function")
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert int(copt.iterations.numpy()) == int(kopt.iterations.numpy())
    if extra.get("use_ema"):
        for a, b in zip(copt._model_variables_moving_average, kopt._model_variables_moving_average):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)


def test_learning_rate_schedule_and_callable():
    sched = keras.optimizers.schedules.PiecewiseConstantDecay([2], [0.1, 0.01])
    params, grads = _data("float32", steps=4, seed=6)
    want, _ = _run(keras.optimizers.SGD(learning_rate=sched), params, grads)
    got, _ = _run(ctf.SGD(learning_rate=sched, caution=False), params, grads)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    got2, _ = _run(ctf.SGD(learning_rate=lambda: 0.05, caution=False), params, grads[:1])
    np.testing.assert_allclose(got2[0], params[0] - 0.05 * grads[0][0], rtol=1e-6)


def test_gradient_tape_loop_in_tf_function():
    rng = np.random.default_rng(7)
    x = tf.constant(rng.standard_normal((64, 4)).astype(np.float32))
    y = x @ tf.constant([[1.0], [-2.0], [0.5], [3.0]])
    w = tf.Variable(tf.zeros((4, 1)))
    opt = ctf.Adam(learning_rate=0.05)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((x @ w - y) ** 2)
        opt.apply_gradients([(tape.gradient(loss, w), w)])
        return loss

    losses = [float(train_step()) for _ in range(200)]
    assert losses[-1] < 0.01 * losses[0]
