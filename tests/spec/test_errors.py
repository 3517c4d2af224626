"""The invalid-hyperparameter table: exact types and messages from the reference factories."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cautious
from cautious import spec
from cautious.conformance.strategies import invalid_hparams
from cautious.spec.errors import ERROR_TABLE, FLAGS, invalid_examples, message, validate

FACTORY_KEYS = {
    "lr": ("adamw", "lr"),
    "eps": ("adamw", "eps"),
    "weight_decay": ("adamw", "weight_decay"),
    "momentum": ("sgd", "momentum"),
    "dampening": ("sgd", "dampening"),
    "eps_placement": ("adamw", "eps_placement"),
    "momentum_form": ("sgd", "momentum_form"),
    "momentum_decay": ("nadam", "momentum_decay"),
    "momentum_schedule": ("nadam", "momentum_schedule"),
    "alpha": ("rmsprop", "alpha"),
    "initial_scale": ("rmsprop", "initial_scale"),
    "beta2_decay": ("adafactor", "beta2_decay"),
    "decay_offset": ("adafactor", "decay_offset"),
    "min_dim_size_to_factor": ("adafactor", "min_dim_size_to_factor"),
    "eps_form": ("adafactor", "eps_form"),
    "factor_dims": ("adafactor", "factor_dims"),
    "weight_decay_form": ("adafactor", "weight_decay_form"),
}
FLAG_FACTORY = {
    "amsgrad": "adamw",
    "nesterov": "sgd",
    "decoupled_weight_decay": "sgd",
    "centered": "rmsprop",
    "eps_in_sqrt": "rmsprop",
    "relative_step": "adafactor",
    "multiply_by_parameter_scale": "adafactor",
}


@pytest.mark.parametrize(("key", "value", "exc", "msg"), invalid_examples(), ids=repr)
def test_validate_table(key, value, exc, msg):
    with pytest.raises(exc) as info:
        validate({key: value})
    assert str(info.value) == msg


@pytest.mark.parametrize("check", ERROR_TABLE, ids=lambda c: c.key)
def test_every_row_names_parameter_and_range(check):
    value = check.invalid[0]
    text = message(check.key, value, "NAME")
    assert text.startswith("NAME must be ") and check.valid in text and repr(value) in text


@pytest.mark.parametrize(("key", "value", "exc", "msg"), invalid_examples(), ids=repr)
def test_factories_raise_table_errors(key, value, exc, msg):
    if key in FACTORY_KEYS:
        rule, arg = FACTORY_KEYS[key]
        with pytest.raises(exc) as info:
            getattr(spec, rule)(**{arg: value})
        assert str(info.value) == msg
    elif key in ("beta1", "beta2"):
        betas = [0.9, 0.999]
        betas[0 if key == "beta1" else 1] = value
        for rule in ("adamw", "adam", "lion"):
            with pytest.raises(exc) as info:
                getattr(spec, rule)(betas=tuple(betas))
            name = "betas[0]" if key == "beta1" else "betas[1]"
            assert str(info.value) == msg.replace(key, name, 1)
    elif key in ("floor", "normalize", "denominator"):
        with pytest.raises(exc) as info:
            cautious.Caution(**{key: value})
        assert str(info.value) == msg
    elif key in FLAGS:
        rule = FLAG_FACTORY.get(key, "adamw")
        with pytest.raises(exc) as info:
            getattr(spec, rule)(**{key: value})
        assert str(info.value) == msg


def test_valid_values_pass_and_are_finite_checked():
    validate({"lr": np.float32(0.1), "beta1": 0.0, "beta2": 0.999, "eps": 0.0, "floor": 1.0})
    with pytest.raises(ValueError, match=r"^lr must be a finite number >= 0, got nan$"):
        validate({"lr": np.array(math.nan)})
    with pytest.raises(TypeError, match=r"^lr must be a real number \(a finite number >= 0\), got True$"):
        validate({"lr": True})


def test_unknown_key_rejected():
    with pytest.raises(TypeError, match="unknown hyperparameter 'lrr'"):
        validate({"lrr": 1.0})


def test_names_are_substituted():
    with pytest.raises(ValueError, match=r"^beta_1 must be a finite number in \[0, 1\), got 1\.0$"):
        validate({"beta1": 1.0}, {"beta1": "beta_1"})


def test_structural_errors():
    with pytest.raises(ValueError, match="^nesterov=True requires momentum > 0 and dampening == 0$"):
        spec.sgd(momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="^cautious_weight_decay=True requires decoupled weight decay$"):
        spec.adam(weight_decay=0.1, cautious_weight_decay=True)
    with pytest.raises(TypeError, match="^caution must be a bool or a cautious.Caution, got 'yes'$"):
        spec.adamw(caution="yes")
    with pytest.raises(TypeError, match="^betas must be a pair of numbers, got 0.9$"):
        spec.adamw(betas=0.9)


@given(st.sampled_from(spec.RULES).flatmap(lambda rule: st.tuples(st.just(rule), invalid_hparams(rule))))
def test_drawn_invalid_hyperparameters_raise_the_table_message(drawn):
    rule, (hp, exc, msg) = drawn
    with pytest.raises(exc) as info:
        getattr(spec, rule)(**hp)
    assert str(info.value) == msg


def test_floor_only_with_mean_clamp():
    with pytest.raises(
        ValueError, match=r"^floor is used only by normalize='mean_clamp', got floor=0.5 with normalize='exact'$"
    ):
        cautious.Caution("exact", floor=0.5)
    assert cautious.Caution("exact").floor == 1e-3


# -- None, non-bool flags, caution=None, integer parameters (issue 12) ---------------------------------

_NOT_A_BOOL = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.text(max_size=3))
_NOT_A_NUMBER = st.one_of(st.none(), st.text(max_size=3), st.lists(st.floats(), max_size=2), st.booleans())


@given(key=st.sampled_from(FLAGS), value=_NOT_A_BOOL)
def test_drawn_non_bool_flags_raise_type_error(key, value):
    with pytest.raises(TypeError) as info:
        getattr(spec, FLAG_FACTORY.get(key, "adamw"))(**{key: value})
    assert str(info.value) == f"{key} must be a bool (True or False), got {value!r}"


@given(key=st.sampled_from(["lr", "eps", "weight_decay", "momentum", "dampening"]), value=_NOT_A_NUMBER)
def test_drawn_non_numbers_raise_type_error(key, value):
    rule, arg = FACTORY_KEYS[key]
    with pytest.raises(TypeError) as info:
        getattr(spec, rule)(**{arg: value})
    valid = next(c.valid for c in ERROR_TABLE if c.key == key)
    assert str(info.value) == f"{key} must be a real number ({valid}), got {value!r}"


@pytest.mark.parametrize("rule", spec.RULES)
def test_none_is_never_off(rule):
    with pytest.raises(TypeError, match=r"^caution must be a bool or a cautious.Caution, got None$"):
        getattr(spec, rule)(caution=None)
    with pytest.raises(TypeError, match=r"^lr must be a real number \(a finite number >= 0\), got None$"):
        getattr(spec, rule)(lr=None)


def test_eps_placement_and_caution_options_reject_none():
    with pytest.raises(
        TypeError, match=r"^eps_placement must be a str \(one of 'corrected', 'uncorrected'\), got None$"
    ):
        spec.adamw(eps_placement=None)
    with pytest.raises(TypeError, match=r"^normalize must be a str \(one of 'mean_clamp', .*\), got None$"):
        cautious.Caution(normalize=None)
    with pytest.raises(TypeError, match=r"^floor must be a real number \(a finite number in \(0, 1\]\), got None$"):
        cautious.Caution(floor=None)


@given(
    rule=st.sampled_from(spec.RULES),
    dtype=st.sampled_from(["int8", "int16", "int32", "int64", "uint8", "bool", "complex64"]),
    values=st.lists(st.integers(-9, 9), min_size=1, max_size=4),
)
def test_integer_parameters_are_refused_not_truncated(rule, dtype, values):
    opt = getattr(spec, rule)(lr=0.5)
    p = np.array(values).astype(dtype)
    if rule == "muon":  # Muon takes matrices only
        p = p.reshape(1, -1)
    msg = f"parameter 0 must have a floating-point dtype (float64, float32, bfloat16 or float16), got {dtype}"
    with pytest.raises(ValueError) as info:
        opt.init([p])
    assert str(info.value) == msg
    state = opt.init([np.zeros(p.shape)])
    with pytest.raises(ValueError) as info:
        opt.step([p], [np.ones(p.shape)], state)
    assert str(info.value) == msg


def test_keras_momentum_form_has_no_dampening():
    with pytest.raises(ValueError, match=r"^momentum_form='keras' requires dampening == 0$"):
        spec.sgd(momentum=0.9, dampening=0.1, momentum_form="keras")
