"""Keras SGD fidelity (issue 12): caution=False is keras.optimizers.SGD bit for bit, and its state keeps its meaning."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import cautious.spec as spec  # noqa: E402
import cautious.tensorflow as ctf  # noqa: E402
from cautious import Caution  # noqa: E402
from cautious.conformance.adapters.tensorflow import TFAdapter  # noqa: E402
from cautious.conformance.case import Case, spec_optimizer  # noqa: E402

SHAPES = [(6, 5), (7,), ()]
CONFIGS = {
    "momentum": dict(momentum=0.9),
    "nesterov": dict(momentum=0.9, nesterov=True),
    "decay": dict(momentum=0.8, weight_decay=0.05),
    "plain": dict(),
}


def _schedule():
    return keras.optimizers.schedules.PiecewiseConstantDecay([2, 4], [0.1, 0.03, 0.01])


def _data(dtype, steps=6, seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(steps)]
    return params, grads


def _run(opt, params, grads, mode):
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
def test_caution_off_is_keras_sgd_bit_for_bit_with_a_schedule(name, dtype, mode):
    params, grads = _data(dtype)
    want, kopt = _run(keras.optimizers.SGD(learning_rate=_schedule(), **CONFIGS[name]), params, grads, mode)
    got, copt = _run(ctf.SGD(learning_rate=_schedule(), caution=False, **CONFIGS[name]), params, grads, mode)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(copt.momentums, kopt.momentums):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_model_fit_is_keras_sgd_bit_for_bit():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 4)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)).astype(np.float32)

    def fit(opt):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
        return [w.numpy() for w in model.weights]

    sched = lambda: keras.optimizers.schedules.ExponentialDecay(0.05, 3, 0.5)  # noqa: E731
    want = fit(keras.optimizers.SGD(sched(), momentum=0.9, nesterov=True))
    got = fit(ctf.SGD(sched(), momentum=0.9, nesterov=True, caution=False))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("caution", [False, True])
def test_keras_sgd_state_loads_with_its_meaning(caution):
    """A Keras SGD state (iterations + velocity), loaded into cautious SGD, continues the same run."""
    params, grads = _data("float32", steps=5, seed=1)
    kw = dict(learning_rate=_schedule(), momentum=0.9)
    k_vars = [tf.Variable(p) for p in params]
    kopt = keras.optimizers.SGD(**kw)
    for gs in grads[:3]:
        kopt.apply_gradients(zip([tf.constant(g) for g in gs], k_vars))
    ref_vars = [v.numpy() for v in k_vars]
    store: dict = {}
    kopt.save_own_variables(store)

    variables = [tf.Variable(p) for p in ref_vars]
    copt = ctf.SGD(**kw, caution=caution)
    copt.build(variables)
    copt.load_own_variables(store)
    assert int(copt.iterations.numpy()) == 3
    for gs in grads[3:]:
        kopt.apply_gradients(zip([tf.constant(g) for g in gs], k_vars))
        copt.apply_gradients(zip([tf.constant(g) for g in gs], variables))
    if not caution:
        for a, b in zip(variables, k_vars):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    # with caution, the continuation is the spec's Keras form from the loaded state
    want = _spec_continue([np.asarray(p, np.float64) for p in ref_vars], store, grads[3:], caution, start=3)
    for a, b in zip(variables, want):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-5, atol=1e-6)


def _spec_continue(params, store, grads, caution, start):
    lrs = [0.1, 0.1, 0.1, 0.03, 0.03, 0.01]  # PiecewiseConstantDecay: lr at iterations 0..5
    leaves = tuple(spec.SGDState(np.asarray(store[str(1 + i)], np.float64)) for i in range(len(params)))
    state = spec.State(start, leaves)
    for i, gs in enumerate(grads):
        opt = spec.sgd(lr=lrs[start + i], momentum=0.9, momentum_form="keras", caution=caution)
        params, state = opt.step(params, [np.asarray(g, np.float64) for g in gs], state)
    return params


@pytest.mark.parametrize("caution", [Caution(), Caution("count_plus_one"), Caution("exact"), Caution("none")], ids=repr)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_caution_on_is_the_spec_keras_form(name, caution):
    params, grads = _data("float64", steps=4, seed=2)
    kw = CONFIGS[name]
    got, _ = _run(ctf.SGD(learning_rate=_schedule(), caution=caution, **kw), params, grads, "eager")
    lrs = [0.1, 0.1, 0.1, 0.03]
    ps = [p.copy() for p in params]
    extra = dict(weight_decay=kw.get("weight_decay", 0.0), decoupled_weight_decay=True)
    state = spec.sgd(momentum=kw.get("momentum", 0.0)).init(ps)
    for lr, gs in zip(lrs, grads):
        opt = spec.sgd(
            lr=lr,
            momentum=kw.get("momentum", 0.0),
            nesterov=kw.get("nesterov", False),
            momentum_form="keras",
            caution=caution,
            **extra,
        )
        ps, state = opt.step(ps, gs, state)
    for a, b in zip(got, ps):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # Keras's float32 learning-rate variable


def test_the_mask_compares_the_velocity_with_minus_g():
    var = tf.Variable([1.0, 1.0])
    opt = ctf.SGD(learning_rate=0.1, momentum=0.9, caution=Caution("exact"))
    opt.build([var])
    opt.momentums[0].assign([1.0, -0.5])  # a velocity (carries -lr): entry 0 moves up, against g > 0
    opt.iterations.assign(1)
    opt.apply_gradients([(tf.constant([1.0, 1.0]), var)])  # m' = [0.8, -0.55]: only entry 1 descends
    np.testing.assert_allclose(var.numpy(), [1.0, 1.0 - 0.55 * 2], rtol=1e-6)
    np.testing.assert_allclose(opt.momentums[0].numpy(), [0.8, -0.55], rtol=1e-6)


def test_torch_form_is_still_available():
    params, grads = _data("float64", steps=3, seed=4)
    got, opt = _run(
        ctf.SGD(learning_rate=0.1, momentum=0.9, momentum_form="torch", caution=Caution()), params, grads, "eager"
    )
    want_opt = spec.sgd(lr=0.1, momentum=0.9, caution=Caution())
    ps, state = [p.copy() for p in params], want_opt.init(params)
    for gs in grads:
        ps, state = want_opt.step(ps, gs, state)
    for a, b in zip(got, ps):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(opt.momentums[0].numpy(), state.leaves[0].m, rtol=1e-6)
    assert keras.optimizers.deserialize(keras.optimizers.serialize(opt)).momentum_form == "torch"


# -- the Keras form through the conformance adapter (one step from a drawn state) -----------------------

_f = st.floats(-3, 3, width=32, allow_subnormal=False)  # no flush-to-zero ambiguity in the mask


@settings(max_examples=40)
@given(
    p=hnp.arrays(np.float32, 5, elements=_f),
    g=hnp.arrays(np.float32, 5, elements=_f),
    m=hnp.arrays(np.float32, 5, elements=_f),
    nesterov=st.booleans(),
    caution=st.sampled_from([False, Caution(), Caution("exact"), Caution("count_plus_one")]),
    wd=st.sampled_from([0.0, 0.1]),
    cwd=st.booleans(),
    step=st.integers(0, 5),
)
def test_adapter_keras_form_matches_the_spec(p, g, m, nesterov, caution, wd, cwd, step):
    hp = dict(
        lr=0.05,
        momentum=0.9,
        nesterov=nesterov,
        weight_decay=wd,
        decoupled_weight_decay=True,
        cautious_weight_decay=cwd and caution is not False,
        caution=caution,
        momentum_form="keras",
    )
    case = Case("sgd", hp, "float32")
    state = spec.State(step, (spec.SGDState(m),))
    got_p, got_s = TFAdapter("eager").step(case, [p], [g], state)
    want_p, want_s = spec_optimizer(case).step([p.astype(np.float64)], [g.astype(np.float64)], state)
    np.testing.assert_allclose(got_s.leaves[0].m, want_s.leaves[0].m, rtol=1e-6, atol=1e-6)
    # a mask decision within rounding of zero may go either way: compare where it is clear-cut
    np.testing.assert_allclose(got_p[0], want_p[0], rtol=1e-5, atol=1e-5 * (1 + np.abs(m).max()) * 5)


@pytest.mark.parametrize("lr", [1e-4, 0.0])
def test_sgd_without_momentum_decides_from_g_not_the_underflowing_update(lr):
    """The same class in Keras's SGD: delta = -lr g is a float32 subnormal for the first entry."""
    g = np.array([np.finfo(np.float32).tiny, -1.0, np.nan, 0.0], np.float32)
    v = keras.Variable(np.zeros(4, np.float32))
    opt = ctf.SGD(learning_rate=lr, caution_stats=True)
    opt.apply_gradients([(tf.constant(g), v)])
    (stats,) = opt.caution_stats()
    ref = spec.sgd(lr=lr, momentum_form="keras")
    (want,) = ref.stats([np.zeros(4, np.float32)], [g], ref.init([np.zeros(4, np.float32)]))
    assert int(stats.count.numpy()) == want.count == (3 if lr else 1)
