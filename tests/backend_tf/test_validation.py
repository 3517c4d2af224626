"""Validation through the spec's one table (issue 12): None, non-bool flags, caution=None, integer variables."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import cautious.tensorflow as ctf  # noqa: E402
from cautious import Caution  # noqa: E402
from cautious.spec.errors import ERROR_TABLE, message, type_message  # noqa: E402

NAMES = {"lr": "learning_rate", "beta1": "beta_1", "beta2": "beta_2", "eps": "epsilon", "alpha": "rho"}
NUMBERS = {
    "AdamW": ("lr", "beta1", "beta2", "eps", "weight_decay"),
    "Adam": ("lr", "beta1", "beta2", "eps"),
    "Lion": ("lr", "beta1", "beta2"),
    "SGD": ("lr", "momentum"),
    "Nadam": ("lr", "beta1", "beta2", "eps", "momentum_decay"),
    "RMSprop": ("lr", "alpha", "momentum", "eps"),
}
CHOICES = {
    "AdamW": ("eps_placement",),
    "Adam": ("eps_placement",),
    "SGD": ("momentum_form",),
    "Nadam": ("momentum_schedule",),
}
FLAGS = {
    "AdamW": ("amsgrad", "maximize", "cautious_weight_decay"),
    "Adam": ("amsgrad", "maximize", "cautious_weight_decay"),
    "Lion": ("maximize", "cautious_weight_decay"),
    "SGD": ("nesterov", "maximize", "cautious_weight_decay"),
    "Nadam": ("maximize", "cautious_weight_decay"),
    "RMSprop": ("centered", "maximize", "cautious_weight_decay"),
}
_BY_KEY = {c.key: c for c in ERROR_TABLE}


@st.composite
def _invalid(draw):
    cls = draw(st.sampled_from(sorted(NUMBERS)))
    kind = draw(st.sampled_from(["number", "choice", "flag"] if cls in CHOICES else ["number", "flag"]))
    if kind == "number":
        key = draw(st.sampled_from(NUMBERS[cls]))
        value = draw(st.one_of(st.none(), st.text(max_size=3), st.sampled_from(_BY_KEY[key].invalid)))
    elif kind == "choice":
        key = draw(st.sampled_from(CHOICES[cls]))
        value = draw(st.one_of(st.none(), st.integers(), st.sampled_from(_BY_KEY[key].invalid)))
    else:
        key = draw(st.sampled_from(FLAGS[cls]))
        value = draw(st.one_of(st.none(), st.integers(-2, 2), st.text(max_size=3), st.floats(0, 1)))
    return cls, key, value


@settings(max_examples=80)
@given(_invalid())
def test_drawn_invalid_values_raise_the_table_message(drawn):
    cls, key, value = drawn
    name = NAMES.get(key, key)
    with pytest.raises((TypeError, ValueError)) as info:
        getattr(ctf, cls)(**{name: value})
    check = _BY_KEY.get(key)
    wrong_type = check is None or value is None or isinstance(value, str) != bool(check.choices)
    if wrong_type:
        assert info.type is TypeError
        assert str(info.value) == type_message(key, value, name)
    else:
        assert info.type is ValueError
        assert str(info.value) == message(key, value, name)


@pytest.mark.parametrize("cls", ["AdamW", "Adam", "Lion", "SGD"])
def test_caution_none_and_normalize_none_are_errors(cls):
    with pytest.raises(TypeError, match=r"^caution must be a bool or a cautious.Caution, got None$"):
        getattr(ctf, cls)(caution=None)
    with pytest.raises(TypeError, match=r"^normalize must be a str \(one of "):
        getattr(ctf, cls)(caution=Caution(normalize=None))


def test_keras_no_decay_stays_valid():
    for cls in ("Adam", "Lion", "SGD"):
        assert getattr(ctf, cls)(weight_decay=None).weight_decay is None
    with pytest.raises(TypeError, match=r"^weight_decay must be a real number \(a finite number >= 0\), got None$"):
        ctf.AdamW(weight_decay=None)


@pytest.mark.parametrize("dtype", [tf.int32, tf.int64, tf.int8])
@pytest.mark.parametrize("cls", ["AdamW", "Lion", "SGD"])
def test_integer_variables_are_refused_not_truncated(cls, dtype):
    var = tf.Variable(tf.constant([5, -3, 7], dtype), name="counts")
    opt = getattr(ctf, cls)(learning_rate=0.5)
    with pytest.raises(ValueError) as info:
        opt.apply_gradients([(tf.constant([1, 1, 1], dtype), var)])
    assert str(info.value).endswith(
        f"must have a floating-point dtype (float64, float32, bfloat16 or float16), got {dtype.name}"
    )
    assert str(info.value).startswith("variable ")
    np.testing.assert_array_equal(var.numpy(), [5, -3, 7])  # untouched
