"""cautious.tensorflow Nadam and RMSprop: Keras's with caution off, the spec with caution on."""

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


def _data(dtype, seed=0, n=8, steps=5):
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(n).astype(dtype)
    gs = [rng.standard_normal(n).astype(dtype) for _ in range(steps)]
    for i, g in enumerate(gs):
        g[i % n] = 0  # an exact zero: masked
    return p0, gs


def _run(opt, p0, gs):
    v = keras.Variable(p0)
    for g in gs:
        opt.apply_gradients([(tf.constant(g), v)])
    return v.numpy()


def _spec_run(opt, p0, gs):
    ps, state = [np.asarray(p0)], opt.init([np.asarray(p0)])
    for g in gs:
        ps, state = opt.step(ps, [np.asarray(g)], state)
    return ps[0]


RMS_CASES = [{}, {"momentum": 0.9}, {"centered": True, "momentum": 0.5, "weight_decay": 0.1}, {"rho": 0.5}]


@pytest.mark.parametrize("kw", RMS_CASES, ids=str)
def test_rmsprop_caution_off_is_keras_bit_for_bit_in_float32(kw):
    p0, gs = _data("float32")
    ours, theirs = ctf.RMSprop(0.01, caution=False, **kw), keras.optimizers.RMSprop(0.01, **kw)
    np.testing.assert_array_equal(_run(ours, p0, gs), _run(theirs, p0, gs))

    def kinds(opt):  # the slot kinds, without the optimizer's and the variables' names
        return [v.path.split("/")[-1].rsplit("_", 1)[-1] for v in opt.variables]

    assert kinds(ours) == kinds(theirs)


@pytest.mark.parametrize("kw", [{}, {"weight_decay": 0.1}, {"beta_1": 0.8}], ids=str)
def test_nadam_caution_off_is_keras_within_float32_rounding(kw):
    # not bitwise: the schedule, Pi_t and 1 - beta_2**t are float64 here, float32 in Keras
    p0, gs = _data("float32")
    a = _run(ctf.Nadam(0.01, caution=False, **kw), p0, gs)
    b = _run(keras.optimizers.Nadam(0.01, **kw), p0, gs)
    np.testing.assert_allclose(a, b, rtol=4e-6, atol=1e-7)


@pytest.fixture
def floatx64():
    old = keras.config.floatx()
    keras.config.set_floatx("float64")  # the learning-rate variable in float64 (see the module docs)
    yield
    keras.config.set_floatx(old)


@pytest.mark.parametrize(
    ("ours", "ref"),
    [
        (lambda: ctf.Nadam(0.01), lambda: spec.nadam(0.01, eps=1e-7, momentum_decay=1.0)),
        (
            lambda: ctf.Nadam(0.01, weight_decay=0.1, momentum_schedule="constant", caution=Caution("exact")),
            lambda: spec.nadamw(
                0.01, eps=1e-7, weight_decay=0.1, momentum_schedule="constant", caution=Caution("exact")
            ),
        ),
        (
            lambda: ctf.RMSprop(0.01, momentum=0.9, centered=True),
            lambda: spec.rmsprop(
                0.01, alpha=0.9, eps=1e-7, momentum=0.9, centered=True, eps_in_sqrt=True, momentum_form="keras"
            ),
        ),
        (
            lambda: ctf.RMSprop(0.01, weight_decay=0.1, cautious_weight_decay=True),
            lambda: spec.rmsprop(
                0.01,
                alpha=0.9,
                eps=1e-7,
                weight_decay=0.1,
                decoupled_weight_decay=True,
                cautious_weight_decay=True,
                eps_in_sqrt=True,
                momentum_form="keras",
            ),
        ),
    ],
    ids=["nadam", "nadamw-constant", "rmsprop-centered-momentum", "rmsprop-cwd"],
)
def test_caution_on_matches_the_spec_in_float64(ours, ref, floatx64):
    p0, gs = _data("float64", seed=3)
    np.testing.assert_allclose(_run(ours(), p0, gs), _spec_run(ref(), p0, gs), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("cls,kw", [(ctf.Nadam, {}), (ctf.RMSprop, {"momentum": 0.9})], ids=["nadam", "rmsprop"])
def test_caution_bites(cls, kw):
    p0, gs = _data("float32", seed=3)
    assert not np.allclose(_run(cls(0.01, **kw), p0, gs), _run(cls(0.01, caution=False, **kw), p0, gs), rtol=1e-5)


def test_rmsprop_without_momentum_caution_only_rescales():
    g = np.array([1.0, -2.0, 0.5, 0.0], "float32")
    a = _run(ctf.RMSprop(0.1, caution=Caution("exact")), np.zeros(4, "float32"), [g])
    b = _run(keras.optimizers.RMSprop(0.1), np.zeros(4, "float32"), [g])
    np.testing.assert_allclose(a, b * 4 / 3, rtol=1e-6)


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("lr", [1e-4, 0.0])
def test_rmsprop_decides_from_the_direction_not_the_underflowing_update(centered, lr):
    """Without momentum lr * g is a float32 subnormal here (flushed to zero on CPU), yet the entry is kept
    and counted, as the spec's (found in JAX by `cautious verify`; Keras had the same). At lr = 0 the update
    is 0: nothing but the NaN is kept, as the spec's update form."""
    g = np.array([np.finfo(np.float32).tiny, 1.0, np.nan], np.float32)
    v = keras.Variable(np.zeros(3, np.float32))
    opt = ctf.RMSprop(learning_rate=lr, rho=0.5, epsilon=1e-3, centered=centered, caution_stats=True)
    opt.apply_gradients([(tf.constant(g), v)])
    (stats,) = opt.caution_stats()
    ref = spec.rmsprop(lr=lr, alpha=0.5, eps=1e-3, centered=centered, eps_in_sqrt=True, momentum_form="keras")
    (want,) = ref.stats([np.zeros(3, np.float32)], [g], ref.init([np.zeros(3, np.float32)]))
    assert int(stats.count.numpy()) == want.count == (3 if lr else 1)


@pytest.mark.parametrize("caution", [False, True])
def test_rmsprop_cautious_decay_decides_from_the_direction_in_float64(caution):
    """float64: lr * g is a subnormal (flushed to zero on CPU), g / sqrt(v) is not: cautious weight decay
    sees u < 0 < p and skips the decay, as the spec (found by `cautious verify --seed 1`)."""
    p0, g = np.array([1.4142135266470554e-04]), np.array([-7.121917873523875e-305])
    hp = dict(lr=1e-4, alpha=0.5, eps=0.0, weight_decay=1e-4, decoupled_weight_decay=True, cautious_weight_decay=True)
    ref = spec.rmsprop(**hp, eps_in_sqrt=True, momentum_form="keras", caution=caution)
    want, _ = ref.step([p0], [g], spec.State(1, (spec.RMSpropState(np.array([0.5]), None, None),)))
    v = keras.Variable(p0.copy(), dtype="float64")
    opt = ctf.RMSprop(learning_rate=1e-4, rho=0.5, epsilon=0.0, weight_decay=1e-4, cautious_weight_decay=True,
                      caution=caution)  # fmt: skip
    opt.build([v])
    opt._velocities[0].assign(np.array([0.5]))
    opt.apply_gradients([(tf.constant(g), v)])
    np.testing.assert_array_equal(v.numpy(), want[0])
    assert v.numpy()[0] == p0[0]  # no decay, and the update itself underflows


def test_config_round_trip():
    for opt in (ctf.Nadam(0.01, momentum_decay=0.004), ctf.RMSprop(0.01, rho=0.8, momentum=0.5, centered=True)):
        again = type(opt).from_config(opt.get_config())
        assert again.get_config() == opt.get_config()


def test_errors():
    with pytest.raises(ValueError) as info:
        ctf.RMSprop(rho=1.5)
    assert str(info.value) == message("alpha", 1.5, "rho")
    with pytest.raises(ValueError) as info:
        ctf.Nadam(momentum_schedule="torch")
    assert str(info.value) == message("momentum_schedule", "torch")


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_conformance(mode):
    from cautious.conformance import run_conformance
    from cautious.conformance.adapters.tensorflow import TFAdapter

    result = run_conformance(TFAdapter(mode), rules=("nadam", "rmsprop"), max_examples=40, seed=0)
    assert {rule for rule, _ in result.examples} == {"nadam", "rmsprop"}


def test_adapter_pins_keras_rmsprop_forms():
    from cautious.conformance import Case
    from cautious.conformance.adapters.tensorflow import TFAdapter

    a = TFAdapter("eager")
    assert a.fixed_hparams("rmsprop")["eps_in_sqrt"] is True
    assert a.supports(Case("rmsprop", {"momentum": 0.9, "eps_in_sqrt": True})) is not None
    assert a.supports(Case("rmsprop", {"eps_in_sqrt": False})) is not None
    assert a.supports(Case("rmsprop", {"eps_in_sqrt": True})) is None
