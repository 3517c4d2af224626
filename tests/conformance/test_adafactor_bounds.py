"""The Adafactor case of the conformance suite: the reference passes its own bounds, and mistakes fail them."""

import dataclasses

import numpy as np
import pytest

from cautious.conformance import run_conformance
from cautious.conformance.case import NumpyAdapter
from cautious.conformance.runner import ConformanceError


def test_reference_rounded_to_each_dtype_is_within_the_bounds():
    result = run_conformance(NumpyAdapter(), rules=("adafactor",), dtypes=("float32", "float64"), max_examples=80)
    assert result.examples[("adafactor", "float32")] > 0 and result.examples[("adafactor", "float64")] > 0
    assert result.worst <= 1


class _Mutant(NumpyAdapter):
    """The reference with one hyperparameter changed: a port that gets one piece of Adafactor wrong."""

    def __init__(self, name, **change):
        self.name, self.change = name, change

    def step(self, case, params, grads, state):
        hp = {**case.hparams, **self.change}
        return super().step(dataclasses.replace(case, hparams=hp), params, grads, state)


@pytest.mark.parametrize(
    "mutant",
    [
        _Mutant("no-clipping", d=float("inf")),
        _Mutant("no-parameter-scale", multiply_by_parameter_scale=False),
        _Mutant("decay-exponent", beta2_decay=-0.7),
        _Mutant("eps-added", eps_form="add", eps=(1e-3, 1e-3)),
    ],
    ids=lambda m: m.name,
)
def test_mutants_are_caught(mutant):
    pin = {"d": 1.0, "multiply_by_parameter_scale": True, "eps_form": "clamp", "eps": (1e-3, 1e-3), "beta2_decay": -0.8}

    class Pinned(type(mutant)):
        def fixed_hparams(self, rule):
            return dict(pin)

    m = Pinned(mutant.name, **mutant.change)
    with pytest.raises(ConformanceError, match="disagrees with the reference"):
        np.seterr(all="ignore")
        run_conformance(m, rules=("adafactor",), dtypes=("float64",), max_examples=60, shrink=False, allow_nan=False)
