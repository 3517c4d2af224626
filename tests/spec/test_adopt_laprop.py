"""ADOPT and LaProp in the spec: hand-computed steps, the first-step rule, the named options, errors.

Common inputs: p = [1, 1, 1, 1], g = [1, -1, 1, -1], lr = 0.1, betas = (0.5, 0.75), eps = 0.
Every expected number below is derived by hand in the comments.
"""

import numpy as np
import pytest

import cautious
from cautious import spec
from cautious.spec.errors import message, type_message

P = [np.ones(4)]
G = [np.array([1.0, -1.0, 1.0, -1.0])]
M = np.array([2.0, 7.0, -4.0, -5.0])


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-14, atol=0)


def _adopt(**kw):
    kw = {"lr": 0.1, "betas": (0.5, 0.75), "eps": 0.0, "clip_exp": None, **kw}
    return spec.adopt(**kw)


# ADOPT at t = 2 (injected step 1), m = M, v = [4, 4, 1, 1]:
#   n = g / sqrt(v) = [0.5, -0.5, 1, -1];  m' = 0.5 m + 0.5 n = [1.25, 3.25, -1.5, -3]
#   v' = 0.75 v + 0.25 g^2 = [3.25, 3.25, 1, 1];  u = m';  mask(u, g) = [T, F, F, T]: k = 2 of 4
ADOPT_STATE = spec.State(1, (spec.AdoptState(M, np.array([4.0, 4.0, 1.0, 1.0])),))
ADOPT_EXPECTED = {
    "mean_clamp": [0.75, 1.0, 1.0, 1.6],  # scale 2: u_c = [2.5, 0, 0, -6]
    "count_plus_one": [1 - 0.5 / 3, 1.0, 1.0, 1 + 1.2 / 3],  # scale 4/3
    "exact": [0.75, 1.0, 1.0, 1.6],  # scale 4/2
    "none": [0.875, 1.0, 1.0, 1.3],  # scale 1
}


@pytest.mark.parametrize("normalize", list(ADOPT_EXPECTED))
def test_adopt_second_step(normalize):
    (p,), st = _adopt(caution=cautious.Caution(normalize)).step(P, G, ADOPT_STATE)
    _close(p, ADOPT_EXPECTED[normalize])
    _close(st.leaves[0].m, [1.25, 3.25, -1.5, -3.0])
    _close(st.leaves[0].v, [3.25, 3.25, 1.0, 1.0])
    assert st.step == 2


def test_adopt_caution_off_and_nesterov():
    _close(_adopt(caution=False).step(P, G, ADOPT_STATE)[0][0], [0.875, 0.675, 1.15, 1.3])
    # nesterov (optax): u = 0.5 m' + 0.5 n = [0.875, 1.375, -0.25, -2]; the state is the same m'
    (p,), st = _adopt(caution=False, nesterov=True).step(P, G, ADOPT_STATE)
    _close(p, [0.9125, 0.8625, 1.025, 1.2])
    _close(st.leaves[0].m, [1.25, 3.25, -1.5, -3.0])


def test_adopt_clipping_at_t_minus_one_to_the_clip_exp():
    # t = 5, clip_exp = 0.5: c = (5 - 1)^0.5 = 2; v = 1, m = 0, g = [3, -0.5, -8, 1]
    # n = clip(g, -2, 2) = [2, -0.5, -2, 1];  m' = 0.5 n = [1, -0.25, -1, 0.5]
    state = spec.State(4, (spec.AdoptState(np.zeros(4), np.ones(4)),))
    g = [np.array([3.0, -0.5, -8.0, 1.0])]
    (p,), _ = _adopt(clip_exp=0.5, caution=False).step(P, g, state)
    _close(p, [0.9, 1.025, 1.1, 0.95])
    (p,), _ = _adopt(caution=False).step(P, g, state)  # clip_exp=None: m' = 0.5 g
    _close(p, [0.85, 1.025, 1.4, 0.95])


@pytest.mark.parametrize("decoupled", [False, True])
def test_adopt_first_step_only_initializes_v(decoupled):
    # t = 1: v' = g^2 (coupled decay: g + wd p), m' = m = 0, and the parameters do not move,
    # decoupled decay included (it starts at t = 2)
    opt = _adopt(weight_decay=0.5, decoupled_weight_decay=decoupled)
    state = opt.init(P)
    g = [2.0 * G[0]]
    (p,), st = opt.step(P, g, state)
    _close(p, [1.0] * 4)
    _close(st.leaves[0].m, [0.0] * 4)
    g_used = g[0] if decoupled else g[0] + 0.5
    _close(st.leaves[0].v, g_used**2)
    # caution on step 1: u = 0 keeps nothing: count 0, scale = Caution.scale(0, n) (1/floor for mean_clamp)
    (stats,) = opt.stats(P, g, state)
    assert (stats.count, stats.n, stats.scale) == (0, 4, 1000.0)


def test_adopt_decoupled_decay_from_step_two():
    # t = 2 as ADOPT_STATE, caution off, decoupled wd 0.5: p = 0.95 - 0.1 u
    opt = _adopt(caution=False, weight_decay=0.5, decoupled_weight_decay=True)
    _close(opt.step(P, G, ADOPT_STATE)[0][0], [0.825, 0.625, 1.1, 1.25])


def _laprop(**kw):
    return spec.laprop(**{"lr": 0.1, "betas": (0.5, 0.75), "eps": 0.0, **kw})


def test_laprop_first_step_is_minus_lr_sign_g():
    # t = 1: v' = 0.25 g^2, bc2 = 0.25: n = g / |g| = sign(g); m' = 0.5 * 0.1 * n = 0.05 n
    # lr_avg' = 0.05, step size 0.1 / 0.05 = 2: delta = -0.1 n
    opt = _laprop(caution=False)
    g = [np.array([1.0, -3.0, 2.0, -0.5])]
    (p,), st = opt.step(P, g, opt.init(P))
    _close(p, [0.9, 1.1, 0.9, 1.1])
    _close(st.leaves[0].m, [0.05, -0.05, 0.05, -0.05])
    _close(st.leaves[0].lr_avg, 0.05)


# LaProp at t = 2 (injected step 1), m = [0.2, 0.7, -0.4, -0.5] (it carries lr), v = 0.25, lr_avg = 0.05:
#   v' = 0.75 * 0.25 + 0.25 = 0.4375 = bc2: n = g;  m' = 0.5 m + 0.05 n = [0.15, 0.3, -0.15, -0.3]
#   lr_avg' = 0.025 + 0.05 = 0.075, step size 0.1 / 0.075 = 4/3: delta = [-0.2, -0.4, 0.2, 0.4]
#   mask(delta, -g) = [T, F, F, T]: k = 2 of 4
LAPROP_STATE = spec.State(1, (spec.LaPropState(np.array([0.2, 0.7, -0.4, -0.5]), np.full(4, 0.25), np.asarray(0.05)),))


@pytest.mark.parametrize(
    ("caution", "expected"),
    [
        (False, [0.8, 0.6, 1.2, 1.4]),
        (cautious.Caution(), [0.6, 1.0, 1.0, 1.8]),  # scale 2
        (cautious.Caution("count_plus_one"), [1 - 0.8 / 3, 1.0, 1.0, 1 + 1.6 / 3]),  # scale 4/3
    ],
)
def test_laprop_second_step(caution, expected):
    (p,), st = _laprop(caution=caution).step(P, G, LAPROP_STATE)
    _close(p, expected)
    _close(st.leaves[0].m, [0.15, 0.3, -0.15, -0.3])
    _close(st.leaves[0].v, [0.4375] * 4)
    _close(st.leaves[0].lr_avg, 0.075)


def test_laprop_decay_order():
    # post_update (default, reference code and timm): (p + delta) * 0.95; pre_update: 0.95 p + delta
    (p,), _ = _laprop(caution=False, weight_decay=0.5).step(P, G, LAPROP_STATE)
    _close(p, [0.76, 0.57, 1.14, 1.33])
    (p,), _ = _laprop(caution=False, weight_decay=0.5, decay_order="pre_update").step(P, G, LAPROP_STATE)
    _close(p, [0.75, 0.55, 1.15, 1.35])
    # cautious weight decay (decided from u = -delta and the old p): entries 2, 3 have u p < 0, no decay
    (p,), _ = _laprop(caution=False, weight_decay=0.5, cautious_weight_decay=True).step(P, G, LAPROP_STATE)
    _close(p, [0.76, 0.57, 1.2, 1.4])


def test_laprop_schedule_weights_each_step_by_its_own_learning_rate():
    # two steps with lr 0.1 then 0.3 from zeros, g = 1 both times, betas (0.5, 0.75), eps 0:
    #   t1: n = 1, m = 0.05, lr_avg = 0.05;  t2: v' = 0.75*0.25 + 0.25 = bc2: n = 1,
    #   m' = 0.025 + 0.15 = 0.175, lr_avg' = 0.025 + 0.15 = 0.175: delta = -(0.3/0.175) 0.175 = -0.3
    g = [np.ones(1)]
    s = spec.laprop_rule(beta1=0.5, beta2=0.75, eps=0.0)
    st = s.init(g[0])
    d1, st = s.update(g[0], st, 1, 0.1)
    d2, st = s.update(g[0], st, 2, 0.3)
    _close(d1, [-0.1])
    _close(d2, [-0.3])
    _close(st.m, [0.175])
    # with a sign change the momentum weighs the 0.3-step three times the 0.1-step (Adam's does not)
    st = s.init(g[0])
    _, st = s.update(np.ones(1), st, 1, 0.1)
    d2, _ = s.update(-np.ones(1), st, 2, 0.3)
    _close(d2, [(0.3 / 0.175) * (0.15 - 0.025)])


def test_laprop_zero_learning_rate_does_not_move():
    opt = _laprop(lr=0.0, weight_decay=0.5)
    (p,), st = opt.step(P, G, opt.init(P))
    _close(p, [1.0] * 4)
    assert float(st.leaves[0].lr_avg) == 0.0


@pytest.mark.parametrize(
    ("factory", "kw", "exc", "msg"),
    [
        ("adopt", {"clip_exp": -0.25}, ValueError, message("clip_exp", -0.25)),
        ("adopt", {"clip_exp": float("nan")}, ValueError, message("clip_exp", float("nan"))),
        ("adopt", {"clip_exp": "big"}, TypeError, type_message("clip_exp", "big")),
        ("adopt", {"betas": (1.0, 0.9)}, ValueError, message("beta1", 1.0, "betas[0]")),
        ("adopt", {"eps": -1.0}, ValueError, message("eps", -1.0)),
        ("adopt", {"decoupled_weight_decay": 1}, TypeError, type_message("decoupled_weight_decay", 1)),
        ("adopt", {"nesterov": None}, TypeError, type_message("nesterov", None)),
        (
            "adopt",
            {"cautious_weight_decay": True},
            ValueError,
            "cautious_weight_decay=True requires decoupled weight decay",
        ),
        ("laprop", {"decay_order": "after"}, ValueError, message("decay_order", "after")),
        ("laprop", {"decay_order": None}, TypeError, type_message("decay_order", None)),
        ("laprop", {"betas": (0.9, 1.0)}, ValueError, message("beta2", 1.0, "betas[1]")),
        ("laprop", {"lr": -1.0}, ValueError, message("lr", -1.0)),
        ("laprop", {"caution": None}, TypeError, "caution must be a bool or a cautious.Caution, got None"),
    ],
)
def test_errors(factory, kw, exc, msg):
    with pytest.raises(exc) as info:
        getattr(spec, factory)(**kw)
    assert str(info.value) == msg


def test_defaults_are_timms():
    a = spec.adopt().hparams
    assert (a["lr"], a["beta1"], a["beta2"], a["eps"], a["clip_exp"], a["decoupled"]) == (
        1e-3,
        0.9,
        0.9999,
        1e-6,
        0.333,
        False,
    )
    lp = spec.laprop().hparams
    assert (lp["lr"], lp["beta1"], lp["beta2"], lp["eps"], lp["decay_order"]) == (
        4e-4,
        0.9,
        0.999,
        1e-15,
        "post_update",
    )
