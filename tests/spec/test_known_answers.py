"""Hand-computed known answers for each base rule and each normalization.

Common inputs: p = [1, 1, 1, 1], g = [1, -1, 1, -1], injected m = [2, 7, -4, -5],
lr = 0.1. Every expected number below was derived by hand in the comments.
"""

import math

import numpy as np
import pytest

import cautious
from cautious import spec

P = [np.ones(4)]
G = [np.array([1.0, -1.0, 1.0, -1.0])]
M = np.array([2.0, 7.0, -4.0, -5.0])


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-14, atol=0)


# Adam, betas=(0.5, 0.75), eps=0, injected step=1 (so t=2), v=2:
#   m' = 0.5 m + 0.5 g = [1.5, 3, -1.5, -3];  v' = 0.75*2 + 0.25*1 = 1.75
#   bc1 = 1 - 0.25 = 0.75, bc2 = 1 - 0.5625 = 0.4375, sqrt(v'/bc2) = 2
#   u = m'/0.75/2 = [1, 2, -1, -2];  mask = [T, F, F, T]  (k = 2 of n = 4)
ADAM_STATE = spec.State(1, (spec.AdamState(M, np.full(4, 2.0)),))
ADAM_EXPECTED = {
    "mean_clamp": [0.8, 1.0, 1.0, 1.4],  # scale 1/max(2/4, 1e-3) = 2
    "count_plus_one": [1 - 0.4 / 3, 1.0, 1.0, 1 + 0.8 / 3],  # scale 4/3
    "exact": [0.8, 1.0, 1.0, 1.4],  # scale 4/2 = 2
    "none": [0.9, 1.0, 1.0, 1.2],  # scale 1
}


@pytest.mark.parametrize("normalize", list(ADAM_EXPECTED))
def test_adamw(normalize):
    opt = spec.adamw(lr=0.1, betas=(0.5, 0.75), eps=0.0, weight_decay=0.0, caution=cautious.Caution(normalize))
    (p,), st = opt.step(P, G, ADAM_STATE)
    _close(p, ADAM_EXPECTED[normalize])
    _close(st.leaves[0].m, [1.5, 3.0, -1.5, -3.0])
    _close(st.leaves[0].v, [1.75] * 4)
    assert st.step == 2


def test_adamw_caution_off_and_floor():
    opt = spec.adamw(lr=0.1, betas=(0.5, 0.75), eps=0.0, weight_decay=0.0, caution=False)
    _close(opt.step(P, G, ADAM_STATE)[0][0], [0.9, 0.8, 1.1, 1.2])  # p - 0.1 u
    # floor 0.75 > k/n = 0.5: scale = 1/0.75
    opt = spec.adamw(lr=0.1, betas=(0.5, 0.75), eps=0.0, weight_decay=0.0, caution=cautious.Caution(floor=0.75))
    _close(opt.step(P, G, ADAM_STATE)[0][0], [1 - 0.1 / 0.75, 1.0, 1.0, 1 + 0.2 / 0.75])


def test_adamw_decay_unmasked_and_cautious_weight_decay():
    # decoupled decay lr*wd*p = 0.05 everywhere, never masked: mean_clamp result minus 0.05.
    opt = spec.adamw(lr=0.1, betas=(0.5, 0.75), eps=0.0, weight_decay=0.5)
    _close(opt.step(P, G, ADAM_STATE)[0][0], [0.75, 0.95, 0.95, 1.35])
    # cautious weight decay: u_c = [2, 0, 0, -4], p > 0: entry 3 has u_c * p < 0, so no decay there.
    opt = spec.adamw(lr=0.1, betas=(0.5, 0.75), eps=0.0, weight_decay=0.5, cautious_weight_decay=True)
    _close(opt.step(P, G, ADAM_STATE)[0][0], [0.75, 0.95, 0.95, 1.4])


def test_adam_eps_placement():
    # eps = 1. corrected: u = (m'/0.75) / (2 + 1) = m'/2.25 = [2/3, 4/3, -2/3, -4/3]
    # uncorrected: u = sqrt(0.4375)/0.75 * m' / (sqrt(1.75) + 1)
    for placement, u in (
        ("corrected", np.array([2, 4, -2, -4]) / 3),
        ("uncorrected", math.sqrt(0.4375) / 0.75 * np.array([1.5, 3, -1.5, -3]) / (math.sqrt(1.75) + 1)),
    ):
        opt = spec.adam(lr=0.1, betas=(0.5, 0.75), eps=1.0, eps_placement=placement, caution=cautious.Caution("none"))
        _close(opt.step(P, G, ADAM_STATE)[0][0], 1 - 0.1 * u * np.array([1, 0, 0, 1]))


def test_adam_maximize_and_amsgrad():
    # maximize: the rule consumes -g = [-1, 1, -1, 1]: m' = 0.5 m - 0.5 g = [0.5, 4, -2.5, -2]
    # v' = 1.75; u = m'/1.5 = [1/3, 8/3, -5/3, -4/3]; agree with -g at entries 1, 2 (k = 2): scale 2
    opt = spec.adamw(lr=0.1, betas=(0.5, 0.75), eps=0.0, weight_decay=0.0, maximize=True)
    _close(opt.step(P, G, ADAM_STATE)[0][0], [1.0, 1 - 0.2 * 8 / 3, 1 + 0.2 * 5 / 3, 1.0])
    # amsgrad with v_max = 7 > v' = 1.75: sqrt(7/0.4375) = 4, u = m'/0.75/4 = [0.5, 1, -0.5, -1]
    st = spec.State(1, (spec.AdamState(M, np.full(4, 2.0), np.full(4, 7.0)),))
    opt = spec.adamw(lr=0.1, betas=(0.5, 0.75), eps=0.0, weight_decay=0.0, amsgrad=True)
    (p,), st2 = opt.step(P, G, st)
    _close(p, [0.9, 1.0, 1.0, 1.2])
    _close(st2.leaves[0].v_max, [7.0] * 4)


# Lion, betas=(0.5, 0.25): c = 0.5 m + 0.5 g = [1.5, 3, -1.5, -3], u = sign(c) = [1, 1, -1, -1]
#   mask = [T, F, F, T]; m' = 0.25 m + 0.75 g = [1.25, 1, -0.25, -2]
LION_EXPECTED = {
    "mean_clamp": [0.8, 1.0, 1.0, 1.2],
    "count_plus_one": [1 - 0.4 / 3, 1.0, 1.0, 1 + 0.4 / 3],
    "exact": [0.8, 1.0, 1.0, 1.2],
    "none": [0.9, 1.0, 1.0, 1.1],
}


@pytest.mark.parametrize("normalize", list(LION_EXPECTED))
def test_lion(normalize):
    opt = spec.lion(lr=0.1, betas=(0.5, 0.25), caution=cautious.Caution(normalize))
    (p,), st = opt.step(P, G, spec.State(3, (spec.LionState(M),)))
    _close(p, LION_EXPECTED[normalize])
    _close(st.leaves[0].m, [1.25, 1.0, -0.25, -2.0])


# SGD momentum 0.5, injected step 1: buf = 0.5 m + g = [2, 2.5, -1, -3.5] = u; mask [T, F, F, T]
SGD_EXPECTED = {
    "mean_clamp": [0.6, 1.0, 1.0, 1.7],
    "count_plus_one": [1 - 0.8 / 3, 1.0, 1.0, 1 + 1.4 / 3],
    "exact": [0.6, 1.0, 1.0, 1.7],
    "none": [0.8, 1.0, 1.0, 1.35],
}


@pytest.mark.parametrize("normalize", list(SGD_EXPECTED))
def test_sgd(normalize):
    opt = spec.sgd(lr=0.1, momentum=0.5, caution=cautious.Caution(normalize))
    (p,), st = opt.step(P, G, spec.State(1, (spec.SGDState(M),)))
    _close(p, SGD_EXPECTED[normalize])
    _close(st.leaves[0].m, [2.0, 2.5, -1.0, -3.5])


def test_sgd_nesterov_dampening_first_step():
    # nesterov: u = g + 0.5 buf = [2, 0.25, 0.5, -2.75]; mask [T, F, T, T], k = 3, scale 4/3
    opt = spec.sgd(lr=0.1, momentum=0.5, nesterov=True)
    _close(opt.step(P, G, spec.State(1, (spec.SGDState(M),)))[0][0], [1 - 0.8 / 3, 1.0, 1 - 0.2 / 3, 1 + 1.1 / 3])
    # dampening 0.5: buf = 0.5 m + 0.5 g = [1.5, 3, -1.5, -3]; mask [T, F, F, T], scale 2
    opt = spec.sgd(lr=0.1, momentum=0.5, dampening=0.5)
    _close(opt.step(P, G, spec.State(1, (spec.SGDState(M),)))[0][0], [0.7, 1.0, 1.0, 1.6])
    # first step: buf = g (no dampening), every entry agrees, scale 1
    opt = spec.sgd(lr=0.1, momentum=0.5, dampening=0.5)
    (p,), st = opt.step(P, G, opt.init(P))
    _close(p, [0.9, 1.1, 0.9, 1.1])
    _close(st.leaves[0].m, G[0])


def test_sgd_coupled_decay_enters_the_mask():
    # weight_decay=2 (coupled), momentum 0: g' = g + 2p = [3, 1, 3, 1]; u = g' agrees everywhere
    opt = spec.sgd(lr=0.1, weight_decay=2.0)
    _close(opt.step(P, G, opt.init(P))[0][0], [0.7, 0.9, 0.7, 0.9])
    # decoupled instead: u = g (agrees), p' = p - 0.1*2*p - 0.1 g = [0.7, 0.9, 0.7, 0.9]
    opt = spec.sgd(lr=0.1, weight_decay=2.0, decoupled_weight_decay=True)
    _close(opt.step(P, G, opt.init(P))[0][0], [0.7, 0.9, 0.7, 0.9])
