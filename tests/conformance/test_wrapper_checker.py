"""The wrapper conformance check (caution for any optimizer): the reference passes, planted bugs fail."""

import numpy as np
import pytest

from cautious import Caution, spec
from cautious.conformance.runner import ConformanceError
from cautious.conformance.wrapper import NumpyWrapperAdapter, check_wrapped_step, run_wrapper_conformance


def test_the_reference_wrapper_passes_around_every_rule():
    res = run_wrapper_conformance(NumpyWrapperAdapter(), max_examples=24)
    assert {rule for rule, _ in res.examples} == set(spec.RULES)
    assert res.worst <= 1.0


class _Mutant(NumpyWrapperAdapter):
    def __init__(self, bug):
        super().__init__()
        self.bug = bug
        self.name = f"mutant-{bug}"

    def step(self, case, params, grads, state):
        if self.wrap_caution is not None and self.bug == "ascend":  # masks against +g
            grads_for_mask = [-g for g in grads]
            bare, new_state = super(NumpyWrapperAdapter, self).step(case, params, grads, state)
            out = [spec.whole_step(p, q, g, self.wrap_caution)[0] for p, q, g in zip(params, bare, grads_for_mask)]
            return [np.asarray(x, np.asarray(p).dtype) for x, p in zip(out, params)], new_state
        if self.wrap_caution is not None and self.bug == "global_scale":  # one scale over all tensors
            bare, new_state = super(NumpyWrapperAdapter, self).step(case, params, grads, state)
            masks = [spec.whole_step(p, q, g, Caution("none"))[1] for p, q, g in zip(params, bare, grads)]
            k, n = sum(int(m.sum()) for m in masks), sum(m.size for m in masks)
            s = self.wrap_caution.scale(k, n)
            out = [np.where(m, p + s * (q - p), p) for p, q, m in zip(params, bare, masks)]
            return [np.asarray(x, np.asarray(p).dtype) for x, p in zip(out, params)], new_state
        if self.wrap_caution is not None and self.bug == "state":  # steps the inner optimizer twice
            _, mid = super().step(case, params, grads, state)
            new_params, _ = super().step(case, params, grads, state)
            return new_params, mid._replace(
                leaves=super(NumpyWrapperAdapter, self).step(case, params, grads, mid)[1].leaves
            )
        return super().step(case, params, grads, state)


@pytest.mark.parametrize("bug", ["ascend", "global_scale", "state"])
def test_planted_bugs_fail(bug):
    with pytest.raises(ConformanceError, match="disagrees with spec.whole_step"):
        run_wrapper_conformance(_Mutant(bug), rules=("adamw", "sgd"), max_examples=24, allow_nan=False, shrink=False)


def test_bound_admits_one_rounding_of_delta_and_not_more():
    from cautious.conformance.case import Case

    case = Case("sgd", {"lr": 0.1, "caution": False}, "float32")
    p = [np.array([1.0, 1.0, 1.0], np.float32)]
    q = [np.array([0.9, 1.1, 0.7], np.float32)]
    g = [np.array([1.0, 1.0, 1.0], np.float32)]
    want = spec.whole_step(p[0], q[0], g[0], Caution("exact"))[0].astype(np.float64)
    close = [want.astype(np.float32)]
    close[0][0] = np.nextafter(close[0][0], np.float32(0))  # one ulp off on a kept entry
    assert check_wrapped_step(case, Caution("exact"), p, g, q, close)[0] == []
    far = [(want * (1 + 1e-5)).astype(np.float32)]
    assert check_wrapped_step(case, Caution("exact"), p, g, q, far)[0] != []
    dropped_moved = [np.array([want[0], 1.0 + 1e-6, want[2]], np.float32)]
    assert check_wrapped_step(case, Caution("exact"), p, g, q, dropped_moved)[0] != []
