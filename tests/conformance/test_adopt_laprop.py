"""The suite on ADOPT and LaProp: it passes the reference and flags each named option done the other way."""

import dataclasses

import numpy as np
import pytest

from cautious import spec
from cautious.conformance import Case, ConformanceError, NumpyAdapter, check_step, run_conformance, spec_optimizer


def test_reference_passes_all_dtypes():
    result = run_conformance(
        NumpyAdapter(),
        rules=("adopt", "laprop"),
        dtypes=("float32", "float64", "bfloat16", "float16"),
        max_examples=80,
        seed=0,
    )
    assert {r for r, _ in result.examples} == {"adopt", "laprop"}
    assert result.worst <= 1.0


class _Mutant(NumpyAdapter):
    """The reference with one hyperparameter replaced: what an implementation of the other form computes."""

    def __init__(self, **change):
        self.change = change
        self.name = f"mutant{change}"

    def step(self, case, params, grads, state):
        return super().step(dataclasses.replace(case, hparams={**case.hparams, **self.change}), params, grads, state)


@pytest.mark.parametrize(
    ("rule", "pin", "change"),
    [
        ("laprop", {"decay_order": "post_update", "weight_decay": 0.1, "lr": 1.0}, {"decay_order": "pre_update"}),
        ("adopt", {"clip_exp": 0.25, "eps": 1e-3}, {"clip_exp": 0.5}),
        ("adopt", {"nesterov": False}, {"nesterov": True}),
        ("laprop", {"eps": 0.0}, {"eps": 1e-3}),
    ],
)
def test_the_other_form_is_flagged(rule, pin, change):
    with pytest.raises(ConformanceError):
        run_conformance(
            _Mutant(**change), rules=(rule,), dtypes=("float64",), pin=pin, max_examples=60, seed=0, shrink=False
        )


def test_adopt_decaying_on_its_first_step_is_flagged():
    case = Case("adopt", {"lr": 0.5, "weight_decay": 0.5, "decoupled_weight_decay": True, "caution": False}, "float64")
    params, grads = [np.ones(3)], [np.array([1.0, -1.0, 2.0])]
    state = spec_optimizer(case).init(params)
    good, good_state = NumpyAdapter().step(case, params, grads, state)
    assert check_step(case, params, grads, state, good, good_state).ok
    decayed = [p * (1 - 0.25) for p in good]  # what p (1 - lr wd) on step 1 would give
    assert not check_step(case, params, grads, state, decayed, good_state).ok
    # step 2 does decay: the reference moves, and the undecayed result is flagged
    p2, s2 = NumpyAdapter().step(case, good, grads, good_state)
    assert check_step(case, good, grads, good_state, p2, s2).ok
    undecayed, _ = NumpyAdapter().step(
        dataclasses.replace(case, hparams={**case.hparams, "weight_decay": 0.0}), good, grads, good_state
    )
    assert not check_step(case, good, grads, good_state, undecayed, s2).ok


def test_laprop_lr_avg_is_compared():
    case = Case("laprop", {"lr": 0.1, "caution": False}, "float64")
    params, grads = [np.ones(3)], [np.array([1.0, -1.0, 2.0])]
    state = spec_optimizer(case).init(params)
    p, s = NumpyAdapter().step(case, params, grads, state)
    wrong = spec.State(s.step, (s.leaves[0]._replace(lr_avg=np.asarray(0.1)),))  # the lr, not its average
    assert not check_step(case, params, grads, state, p, wrong).ok
