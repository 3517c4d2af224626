"""The fused kernels of NAdam(W), ADOPT and LaProp, through the optimizer classes.

The conformance suite (test_fused_conformance.py) checks the kernels against the spec with
computed bounds; these tests pin what the classes add (the scalars they keep: NAdam's
``mu_product``, LaProp's ``lr / lr_avg`` and ``1 - beta2^t``, ADOPT's first step) and the
edge cases of each rule, on the native CPU loop, the eager fallback and the Triton interpreter.
"""

from __future__ import annotations

import pytest
import torch
from fused_testlib import triton_ok

import cautious.torch as ct
from cautious import Caution
from cautious.backends.torch import fused
from cautious.backends.torch.fused import cpu

PATHS = [
    pytest.param("triton", marks=pytest.mark.skipif(not triton_ok(), reason="needs TRITON_INTERPRET=1 before import")),
    "cpu",
    "eager",
]

CASES = [
    (ct.NAdam, dict(lr=1e-2)),
    (ct.NAdam, dict(lr=1e-2, weight_decay=0.1)),
    (ct.NAdam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, cautious_weight_decay=True)),
    (ct.NAdam, dict(lr=1e-2, momentum_schedule="constant", maximize=True, caution=Caution("exact"))),
    (ct.Adopt, dict(lr=1e-2)),
    (ct.Adopt, dict(lr=1e-2, weight_decay=0.1)),
    (ct.Adopt, dict(lr=1e-2, clip_exp=None, weight_decay=0.1, decoupled=True, cautious_weight_decay=True)),
    (ct.LaProp, dict(lr=1e-2)),
    (ct.LaProp, dict(lr=1e-2, weight_decay=0.1, cautious_weight_decay=True)),
    (ct.LaProp, dict(lr=1e-2, weight_decay=0.1, decay_order="pre_update", caution=Caution("count_plus_one"))),
    (ct.LaProp, dict(lr=1e-2, caution=Caution(denominator="nonzero"))),
]


def _ids(cases):
    return [f"{cls.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for cls, kw in cases]


@pytest.fixture
def path(request, monkeypatch):
    """Select the fused implementation the classes' ``fused=True`` runs on the CPU."""
    name = request.param
    if name == "eager":
        monkeypatch.setenv("CAUTIOUS_FUSED_CPU", "eager")
    if name != "triton":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return name


def _trajectory(cls, kw, impl, *, steps=4, dtype=torch.float64, grads=None):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(300, dtype=dtype)), torch.nn.Parameter(torch.randn(7, 5, dtype=dtype))]
    stats = kw.get("caution", True) is not False
    opt = cls(ps, **kw, caution_stats=stats, **({"fused": True} if impl == "fused" else {"foreach": False}))
    counts = []
    for t in range(steps):
        for i, p in enumerate(ps):
            p.grad = grads[t][i].clone() if grads else torch.randn_like(p) * (torch.rand_like(p) < 0.8)
        opt.step()
        if stats:
            counts.append([(int(s.count), s.n) for s in opt.caution_stats()])
    return [p.detach().clone() for p in ps], [dict(opt.state[p]) for p in ps], counts


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("cls,kw", CASES, ids=_ids(CASES))
def test_fused_class_matches_the_single_tensor_path(path, cls, kw):
    """float64: the fused step and the single-tensor loop agree to rounding, counts exactly, state too."""
    want_p, want_s, want_c = _trajectory(cls, kw, "single")
    got_p, got_s, got_c = _trajectory(cls, kw, "fused")
    assert got_c == want_c
    for a, b in zip(got_p, want_p, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    for sa, sb in zip(got_s, want_s, strict=True):
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                torch.testing.assert_close(sa[k], sb[k], rtol=1e-11, atol=1e-13, msg=k)
            else:
                assert sa[k] == sb[k], k


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_adopt_first_step_sets_v_and_moves_nothing(path):
    """Step 1: v = g^2, m untouched, p bitwise unchanged even with decay and an infinite gradient;
    only a NaN gradient entry counts as kept (u = 0 elsewhere)."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5, -0.25]))
    before = p.detach().clone()
    opt = ct.Adopt([p], lr=0.1, weight_decay=0.5, decoupled=True, fused=True, caution_stats=True)
    p.grad = torch.tensor([2.0, float("inf"), float("nan"), -3.0, 0.0])
    opt.step()
    assert torch.equal(p.detach(), before)
    state = opt.state[p]
    assert torch.equal(state["exp_avg"], torch.zeros(5))
    torch.testing.assert_close(state["exp_avg_sq"], p.grad * p.grad, equal_nan=True, rtol=0, atol=0)
    (s,) = opt.caution_stats()
    assert (int(s.count), s.n) == (1, 5)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("decay_order", ["post_update", "pre_update"])
def test_laprop_at_zero_rate_keeps_nothing_and_decays_as_the_loop(path, decay_order):
    """lr = 0 on the first step: lr_avg = 0, the rate lr / lr_avg is 0, delta = 0: nothing is kept."""
    kw = dict(lr=0.0, weight_decay=0.1, decay_order=decay_order)
    grads = [[torch.randn(300, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)] for _ in range(2)]
    want_p, _, want_c = _trajectory(ct.LaProp, kw, "single", steps=2, grads=grads)
    got_p, _, got_c = _trajectory(ct.LaProp, kw, "fused", steps=2, grads=grads)
    assert got_c == want_c and all(c == 0 for step in got_c for c, _ in step)
    for a, b in zip(got_p, want_p, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [ct.NAdam, ct.Adopt, ct.LaProp])
def test_cpu_default_with_caution_is_the_native_fused_loop(cls, monkeypatch):
    """As for Adam: caution on -> the native loop (when built); caution off -> torch's or timm's own loop."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not cpu.native_available(torch.float32):
        pytest.skip("no C++ compiler: the native loop cannot be built")
    calls = []
    real = fused.run
    monkeypatch.setattr(fused, "run", lambda *a, **k: (calls.append(a[0].rule), real(*a, **k)))
    p = torch.nn.Parameter(torch.randn(10))
    for caution, n_calls in ((True, 1), (False, 0)):
        calls.clear()
        opt = cls([p], caution=caution)
        p.grad = torch.randn(10)
        opt.step()
        assert len(calls) == n_calls, caution
