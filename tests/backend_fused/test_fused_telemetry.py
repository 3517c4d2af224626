"""Telemetry and ``denominator="nonzero"`` on every fused backend, against the reference's ``Optimizer.stats``.

The fused driver (:func:`cautious.backends.torch.fused.run`) with ``stats`` or the nonzero
denominator runs the count pass alone (kept counts and, for ``nonzero``, the consumed
gradient's nonzero entries), computes the scales and runs the update pass with them. Float64
storage and gradients with exact zeros (and a NaN): the counts must equal the reference's.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fused_testlib import BACKENDS, triton_ok

import cautious.spec as spec
import cautious.torch as ct
from cautious import Caution
from cautious.backends.torch import fused

CAUTIONS = [
    Caution(),
    Caution(denominator="nonzero"),
    Caution("count_plus_one", denominator="nonzero"),
    Caution("exact", denominator="nonzero"),
    Caution("none"),
]
SHAPES = [(3, 5), (0,), (300,), (), (6,)]
LR = 0.01

# rule -> (reference optimizer, launch of step t (1-based) and caution, number of state tensors)
RULES = {
    "adamw": (
        lambda c: spec.adamw(lr=LR, weight_decay=0.1, caution=c),
        lambda t, c: fused.adam_launch(
            step=t, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True, amsgrad=False,
            maximize=False, caution=c, eps_placement="corrected", cautious_weight_decay=False,
        ),
        2,
    ),
    "adam-coupled": (  # the nonzero count reads g + wd * p, the gradient the mask compares
        lambda c: spec.adam(lr=LR, weight_decay=0.1, maximize=True, caution=c),
        lambda t, c: fused.adam_launch(
            step=t, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=False, amsgrad=False,
            maximize=True, caution=c, eps_placement="corrected", cautious_weight_decay=False,
        ),
        2,
    ),
    "lion": (
        lambda c: spec.lion(lr=LR, weight_decay=0.1, caution=c),
        lambda t, c: fused.lion_launch(
            beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=False, caution=c, cautious_weight_decay=False
        ),
        1,
    ),
    "sgd": (
        lambda c: spec.sgd(lr=LR, momentum=0.9, caution=c),
        lambda t, c: fused.sgd_launch(
            first_step=t == 1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, decoupled=False,
            maximize=False, caution=c, cautious_weight_decay=False,
        ),
        1,
    ),
    "nadamw": (  # NAdam's mask reads u itself: the count pass computes the whole direction
        lambda c: spec.nadam(lr=LR, weight_decay=0.1, decoupled_weight_decay=True, caution=c),
        lambda t, c: fused.nadam_launch(
            step=t, mu=_mu(t), mu_next=_mu(t + 1), mu_product=math.prod(_mu(k) for k in range(1, t + 1)),
            beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True, maximize=False, caution=c,
            cautious_weight_decay=False,
        ),
        2,
    ),
    "adopt": (  # step 1 keeps nothing (u = 0) but NaN; decoupled decay from step 2
        lambda c: spec.adopt(lr=LR, weight_decay=0.1, decoupled_weight_decay=True, maximize=True, caution=c),
        lambda t, c: fused.adopt_launch(
            step=t, beta1=0.9, beta2=0.9999, eps=1e-6, clip_exp=0.333, weight_decay=0.1, decoupled=True,
            nesterov=False, maximize=True, caution=c, cautious_weight_decay=False,
        ),
        2,
    ),
    "laprop": (  # update form: the rate is lr / lr_avg; decay after the move
        lambda c: spec.laprop(lr=LR, weight_decay=0.1, caution=c),
        lambda t, c: fused.laprop_launch(
            lr=LR, step_lr=LR / _lr_avg(t), bias_correction2=1.0 - 0.999**t, beta1=0.9, beta2=0.999, eps=1e-15,
            weight_decay=0.1, decay_order="post_update", maximize=False, caution=c, cautious_weight_decay=False,
        ),
        2,
    ),
}  # fmt: skip


def _mu(t):
    return spec.nadam_mu(t, beta1=0.9, momentum_decay=4e-3, momentum_schedule="dozat")


def _lr_avg(t):
    avg = 0.0
    for _ in range(t):
        avg = 0.9 * avg + (1 - 0.9) * LR
    return avg


def _grads(rng, nan=False):
    out = []
    for s in SHAPES:
        g = rng.standard_normal(s) * (rng.random(s) < 0.5)  # about half exact zeros
        if nan and np.size(g) > 20:
            g.reshape(-1)[7] = np.nan
        out.append(np.asarray(g, dtype=np.float64))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("caution", CAUTIONS, ids=repr)
@pytest.mark.parametrize("rule", list(RULES))
def test_stats_and_nonzero_match_the_reference(backend, rule, caution):
    ref_make, launch_of, n_state = RULES[rule]
    rng = np.random.default_rng(7)
    p0 = [rng.standard_normal(s) for s in SHAPES]
    ref = ref_make(caution)
    rparams, rstate = p0, ref.init(p0)
    ps = [torch.tensor(p) for p in p0]
    states = [[torch.zeros_like(p) for p in ps] for _ in range(n_state)]
    states += [[None] * len(ps)] * (3 - n_state)
    for t in (1, 2, 3):
        grads = _grads(rng, nan=t == 3)
        want = ref.stats(rparams, grads, rstate)
        rparams, rstate = ref.step(rparams, grads, rstate)
        stats = {}
        fused.run(launch_of(t, caution), [ps, [torch.tensor(g) for g in grads], *states], LR, backend=backend,
                  stats=stats)  # fmt: skip
        got = [stats[p] for p in ps]
        assert all(isinstance(s.count, torch.Tensor) and s.count.dtype == torch.int64 for s in got)
        assert [(int(s.count), s.n, float(s.scale)) for s in got] == [tuple(w) for w in want]
        for p, r in zip(ps, rparams, strict=True):
            np.testing.assert_allclose(p.numpy(), r, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonzero_denominator_without_stats_scales_by_the_nonzero_entries(backend):
    """No telemetry: the nonzero denominator alone takes the two-call form (SGD without momentum, u = g)."""
    p = torch.zeros(8, dtype=torch.float64)
    g = torch.tensor([1.0, 2.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    for denominator, scale in (("size", 1 / 0.375), ("nonzero", 1.0)):
        p.zero_()
        fused.fused_sgd_([p], [g], None, first_step=True, lr=1.0, momentum=0.0, dampening=0.0, nesterov=False,
                         weight_decay=0.0, decoupled=False, maximize=False, caution=Caution(denominator=denominator),
                         cautious_weight_decay=False, _backend=backend)  # fmt: skip
        torch.testing.assert_close(p, -scale * g, rtol=0, atol=0)


@pytest.mark.skipif(not triton_ok(), reason="needs TRITON_INTERPRET=1 before import")
def test_optimizer_fused_default_on_the_interpreter_reports_stats():
    """Under the interpreter fused=True is the Triton path: the optimizer's caution_stats() come from it."""
    p = torch.nn.Parameter(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    opt = ct.SGD([p], lr=0.5, caution=Caution(denominator="nonzero"), caution_stats=True, fused=True)
    p.grad = torch.tensor([1.0, -1.0, 0.0, 0.0])
    opt.step()
    (s,) = opt.caution_stats()
    assert (int(s.count), s.n, float(s.scale)) == (2, 4, 1.0)
    assert p.detach().tolist() == [0.5, 1.5, 1.0, 1.0]
