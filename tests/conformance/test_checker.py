"""Tests of the suite itself: it passes the reference, flags deviations, and tolerates only rounding."""

import dataclasses

import numpy as np
import pytest

import cautious
from cautious import spec
from cautious.conformance import (
    Case,
    ConformanceError,
    NumpyAdapter,
    check_step,
    run_conformance,
    spec_optimizer,
)
from cautious.conformance.bounds import tensor_terms
from cautious.conformance.check import repro_snippet


def test_reference_passes_its_own_suite_all_dtypes():
    result = run_conformance(NumpyAdapter(), dtypes=("float32", "float64", "bfloat16", "float16"))
    assert {r for r, _ in result.examples} == set(spec.RULES)
    assert result.worst <= 1.0


def _case(rule="adamw", dtype="float32", **hp):
    return Case(rule, {"lr": 0.1, **hp}, dtype)


def _ref(case, params, grads, state):
    return NumpyAdapter().step(case, params, grads, state)


def test_one_ulp_of_compute_passes_but_one_percent_fails():
    case = _case()
    params, grads = [np.ones(8, np.float32)], [np.linspace(-1, 1, 8).astype(np.float32)]
    state = spec_optimizer(case).init(params)
    new, st = _ref(case, params, grads, state)
    nudged = [np.nextafter(new[0], np.float32(np.inf))]
    assert check_step(case, params, grads, state, nudged, st).ok
    off = [new[0] * np.float32(1.01)]
    report = check_step(case, params, grads, state, off, st)
    assert not report.ok and "params[0]" in str(report.mismatches[0])


def test_state_and_step_are_compared():
    case = _case()
    params, grads = [np.ones(4, np.float32)], [np.array([1, -1, 2, -2], np.float32)]
    state = spec_optimizer(case).init(params)
    new, st = _ref(case, params, grads, state)
    bad_m = spec.State(1, (st.leaves[0]._replace(m=st.leaves[0].m * 2),))
    assert "state.leaves[0].m" in str(check_step(case, params, grads, state, new, bad_m).mismatches[0])
    bad_step = spec.State(2, st.leaves)
    assert "state.step" in str(check_step(case, params, grads, state, new, bad_step).mismatches[0])
    hidden = check_step(case, params, grads, state, new, None)
    assert hidden.ok and any("parameters compared only" in n for n in hidden.notes)


def test_undecided_entry_either_way_but_scale_must_follow():
    # m' = b1*m + (1-b1)*g lands within float32 rounding of zero for entry 0 (b1 = 0.9 is not a
    # power of two, so the evaluation order changes the rounding): either decision is admitted.
    b1 = float(np.float32(0.9))
    case = _case(rule="adamw", betas=(b1, 0.999), weight_decay=0.0, caution=cautious.Caution("exact"))
    g = np.array([3e-7, 1.0, 1.0, -1.0], np.float32)
    m = np.array([np.float32(-3e-7 * (1 - b1) / b1), 1.0, -1.0, -1.0], np.float32)
    state = spec.State(3, (spec.AdamState(m, np.ones(4, np.float32)),))
    params = [np.ones(4, np.float32)]
    ref, st = _ref(case, params, [g], state)
    terms = tensor_terms(case, params[0], g, tuple(state.leaves[0]), 4)
    assert terms.undecided[0] and not terms.undecided[1:].any()
    terms_u = terms.u
    k_ref = int(spec.cautious_mask(terms_u, g.astype(np.float64)).sum())
    other = 3 if k_ref == 2 else 2  # the other admissible decision for entry 0
    alt = ref[0].copy()
    alt[0] = np.float32(1 - 0.1 * (4 / other) * terms_u[0]) if other == 3 else np.float32(1.0)
    for i in (1, 3):
        alt[i] = np.float32(1 - 0.1 * (4 / other) * terms_u[i])
    assert check_step(case, params, [g], state, [alt], st).ok
    # ... while a scale that no admissible count explains (k = 4/3 of 4) fails:
    wrong_scale = ref[0].copy()
    wrong_scale[1] = np.float32(1 - 0.1 * 3 * terms_u[1])
    assert not check_step(case, params, [g], state, [wrong_scale], st).ok


def test_exact_zero_by_cancellation_is_decided():
    # b1 = 0.5 and m = -g: every evaluation order computes m' = 0 exactly, so entry 0 is masked
    # (k = 2, scale 2) and an implementation that keeps it (u * g >= 0: k = 3, scale 4/3) is caught.
    case = _case(rule="adamw", betas=(0.5, 0.999), weight_decay=0.0, caution=cautious.Caution("exact"))
    g = np.array([3e-7, 1.0, 1.0, -1.0], np.float32)
    m = np.array([-3e-7, 1.0, -1.0, -1.0], np.float32)
    state = spec.State(3, (spec.AdamState(m, np.ones(4, np.float32)),))
    params = [np.ones(4, np.float32)]
    ref, st = _ref(case, params, [g], state)
    terms = tensor_terms(case, params[0], g, tuple(state.leaves[0]), 4)
    assert terms.u[0] == 0 and not terms.undecided.any()
    assert check_step(case, params, [g], state, ref, st).ok
    kept3 = ref[0].copy()
    for i in (1, 3):
        kept3[i] = np.float32(1 - 0.1 * (4 / 3) * terms.u[i])
    assert not check_step(case, params, [g], state, [kept3], st).ok


def test_decay_at_an_infinite_parameter():
    # multiplicative decay keeps +inf; the additive form's NaN is admitted; a finite value is not.
    case = _case(rule="adamw", dtype="float64", lr=0.1, weight_decay=0.1, caution=False)
    params = [np.array([np.inf, 1.0])]
    grads = [np.array([1.0, 1.0])]
    state = spec_optimizer(case).init(params)
    ref, st = _ref(case, params, grads, state)
    assert ref[0][0] == np.inf
    assert check_step(case, params, grads, state, ref, st).ok
    nan = ref[0].copy()
    nan[0] = np.nan
    assert check_step(case, params, grads, state, [nan], st).ok
    finite = ref[0].copy()
    finite[0] = 1e300
    assert not check_step(case, params, grads, state, [finite], st).ok


def test_nan_must_propagate():
    case = _case()
    params, grads = [np.ones(3, np.float32)], [np.array([np.nan, 1, -1], np.float32)]
    state = spec_optimizer(case).init(params)
    new, st = _ref(case, params, grads, state)
    assert np.isnan(new[0][0])
    frozen = [new[0].copy()]
    frozen[0][0] = 1.0  # the NaN entry silently masked
    assert not check_step(case, params, grads, state, frozen, st).ok


def test_repro_snippet_runs_and_recomputes_the_reference():
    case = Case("lion", {"lr": 0.1, "betas": (0.5, 0.25), "caution": cautious.Caution("exact")}, "bfloat16", "float32")
    params = [np.array([[1.0, -2.0]], np.float32), np.zeros(0, np.float32)]
    grads = [np.array([[0.5, 0.5]], np.float32), np.zeros(0, np.float32)]
    state = spec.State(2, (spec.LionState(np.array([[1.0, 1.0]], np.float32)), spec.LionState(np.zeros(0, np.float32))))
    ns: dict = {}
    exec(repro_snippet(case, params, grads, state), ns)
    expected, _ = spec_optimizer(case).step(params, grads, state)
    assert all(np.array_equal(a, b) for a, b in zip(ns["new_params"], expected))


class _Broken(NumpyAdapter):
    name = "broken"
    last_stats = None  # no telemetry offered: this test is about the step's repro (test_telemetry.py has its own)

    def step(self, case, params, grads, state):
        new, st = super().step(case, params, grads, state)
        if case.caution is not None and case.caution.normalize == "exact":
            c = dataclasses.replace(case, hparams={**case.hparams, "caution": cautious.Caution("count_plus_one")})
            new, st = super().step(c, params, grads, state)
        return new, st


def test_runner_shrinks_failure_to_repro():
    with pytest.raises(ConformanceError) as info:
        run_conformance(_Broken(), rules=("sgd",), max_examples=200, allow_nan=False)
    text = str(info.value)
    assert "broken disagrees with the reference" in text
    assert "normalize='exact'" in text and "opt = spec.sgd(" in text


def test_runner_refuses_when_nothing_ran():
    class Nothing(NumpyAdapter):
        name = "nothing"

        def supports(self, case):
            return "implements nothing"

    with pytest.raises(ConformanceError, match="no example ran"):
        run_conformance(Nothing(), rules=("lion",), max_examples=5)
