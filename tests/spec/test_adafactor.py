"""Adafactor in the spec: hand-computed steps, the named options, momentum, and where caution applies."""

import math

import numpy as np
import pytest

import cautious
from cautious import spec
from cautious.spec.errors import message


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-14, atol=0)


# Factored (torch form), step 1, g = [[1, 2], [3, 4]], p = ones:
#   w = 1, q = g^2 = [[1, 4], [9, 16]];  R = row means = [[2.5], [12.5]];  C = column means = [[5, 10]]
#   mean(R) = 7.5;  v_hat = R C / 7.5 = [[5/3, 10/3], [25/3, 50/3]]
#   u_hat = g / sqrt(v_hat): squares [3/5, 6/5, 27/25, 24/25], mean 0.96, rms sqrt(0.96) < 1: no clipping
#   alpha = min(lr, 1/sqrt(1)) * max(1e-3, rms(p) = 1) = lr
G2 = np.array([[1.0, 2.0], [3.0, 4.0]])
U2 = G2 / np.sqrt(np.array([[5 / 3, 10 / 3], [25 / 3, 50 / 3]]))


def test_factored_first_step():
    opt = spec.adafactor(lr=0.01, caution=False)
    st = opt.init([np.ones((2, 2))])
    (p,), st = opt.step([np.ones((2, 2))], [G2], st)
    _close(p, 1 - 0.01 * U2)
    _close(st.leaves[0].v_row, [[2.5], [12.5]])
    _close(st.leaves[0].v_col, [[5.0, 10.0]])
    assert st.leaves[0].v is None and st.leaves[0].m is None


def test_clipping_threshold():
    # rms(u_hat) = sqrt(0.96); with d = 0.5 the update is divided by sqrt(0.96) / 0.5
    opt = spec.adafactor(lr=0.01, caution=False, d=0.5)
    st = opt.init([np.ones((2, 2))])
    (p,), _ = opt.step([np.ones((2, 2))], [G2], st)
    _close(p, 1 - 0.01 * U2 / (math.sqrt(0.96) / 0.5))


def test_unfactored_add_form_second_step():
    # eps_form="add", eps1 = 1, beta2_decay = -1 (w_2 = 1/2), injected v = [2, 2], step 2:
    #   q = g^2 + 1 = [10, 17];  v' = [6, 9.5];  u_hat = [3/sqrt(6), -4/sqrt(9.5)],
    #   rms(u_hat) = sqrt((9/6 + 16/9.5) / 2) > 1: clipped to rms 1
    #   relative_step=False: alpha = lr * max(1e-3, rms(p)) = 0.1 * 2
    opt = spec.adafactor(lr=0.1, beta2_decay=-1.0, eps=(1.0, 1e-3), eps_form="add", relative_step=False, caution=False)
    state = spec.State(1, (spec.AdafactorState(None, None, np.full(2, 2.0)),))
    (p,), st = opt.step([np.full(2, 2.0)], [np.array([3.0, -4.0])], state)
    _close(st.leaves[0].v, [6.0, 9.5])
    rms = math.sqrt((9 / 6 + 16 / 9.5) / 2)
    _close(p, 2 - 0.2 * np.array([3 / math.sqrt(6), -4 / math.sqrt(9.5)]) / rms)


def test_eps1_none_is_the_dtype_epsilon():
    st = spec.adafactor().init([np.ones(3, np.float32), np.ones(3)])
    assert st.leaves[0].eps1 == np.finfo(np.float32).eps and st.leaves[1].eps1 == np.finfo(np.float64).eps
    assert spec.adafactor(eps=(1e-30, 1e-3)).init([np.ones(3)]).leaves[0].eps1 is None


@pytest.mark.parametrize(
    ("shape", "dims", "min_size", "axes"),
    [
        ((3,), "last_two", 0, None),
        ((2, 3), "last_two", 0, (0, 1)),
        ((5, 2, 3), "last_two", 0, (1, 2)),
        ((2, 4, 3), "largest_two", 0, (2, 1)),  # argsort (2, 4, 3) = [0, 2, 1]
        ((2, 4, 3), "largest_two", 4, None),  # the second largest, 3, is below 4
        ((128, 256), "largest_two", 128, (0, 1)),
    ],
)
def test_factored_axes(shape, dims, min_size, axes):
    assert spec.factored_axes(shape, dims, min_size) == axes


def test_momentum_and_caution_whole_update():
    # p = 2 (rms 2), lr = 0.1: alpha = 0.2;  g = [2, -1, 0, 1]; step 1: v = g^2, u = sign(g) (0 at 0),
    # rms(u) = sqrt(3/4) < 1.  beta1 = 0.5, injected m = [-1, 1, 0, 0]:
    #   m' = 0.5 m + 0.5 * 0.2 * u = [-0.4, 0.4, 0, 0.1]; m' g = [-0.8, -0.4, 0, 0.1]: one kept, scale 4/1
    g = np.array([2.0, -1.0, 0.0, 1.0])
    s0 = spec.AdafactorState(None, None, np.zeros(4), np.array([-1.0, 1.0, 0.0, 0.0]))
    state = spec.State(0, (s0,))
    plain = spec.adafactor(lr=0.1, eps=(1e-30, 1e-3), beta1=0.5, caution=False)
    (p,), st = plain.step([np.full(4, 2.0)], [g], state)
    _close(st.leaves[0].m, [-0.4, 0.4, 0.0, 0.1])
    _close(p, 2 - np.array([-0.4, 0.4, 0.0, 0.1]))
    opt = spec.adafactor(lr=0.1, eps=(1e-30, 1e-3), beta1=0.5)
    (p,), st2 = opt.step([np.full(4, 2.0)], [g], state)
    _close(p, [2.0, 2.0, 2.0, 2 - 4 * 0.1])
    _close(st2.leaves[0].m, st.leaves[0].m)  # caution never changes the state
    (stats,) = opt.stats([np.full(4, 2.0)], [g], state)
    assert (stats.count, stats.n, stats.scale) == (1, 4, 4.0)


def test_without_momentum_caution_changes_only_the_scale():
    # u has the sign of g: the mask keeps every coordinate where g != 0; only the scale n/count acts
    rng = np.random.default_rng(0)
    g = rng.standard_normal((3, 4))
    g[0, 1] = g[2, 3] = 0.0
    p = rng.standard_normal((3, 4))
    plain, caut = spec.adafactor(caution=False), spec.adafactor(caution=cautious.Caution("exact"))
    (p_plain,), _ = plain.step([p], [g], plain.init([p]))
    (p_caut,), _ = caut.step([p], [g], caut.init([p]))
    # p' - p loses the low bits of p (|p| ~ 1, |p' - p| ~ 1e-2): compare to a few ulps of p
    np.testing.assert_allclose(p_caut - p, (12 / 10) * (p_plain - p), rtol=0, atol=1e-15)
    assert np.all((p_caut != p) == (g != 0))


def test_weight_decay_forms():
    p, g = np.array([[3.0, 4.0], [0.0, 0.0]]), G2  # rms(p) = 2.5
    for form, decayed, scale_p in [
        ("lr", p * (1 - 0.5 * 0.1), p),
        ("lr_before_scale", p * (1 - 0.5 * 0.1), p * (1 - 0.5 * 0.1)),
        ("rate", p * (1 - 0.1), p),
    ]:
        opt = spec.adafactor(lr=0.5, weight_decay=0.1, weight_decay_form=form, caution=False)
        (p1,), _ = opt.step([p], [g], opt.init([p]))
        alpha = 0.5 * math.sqrt(np.mean(scale_p**2))
        _close(p1, decayed - alpha * U2)


@pytest.mark.parametrize(
    ("kwargs", "exc", "msg"),
    [
        ({"beta2_decay": 0.5}, ValueError, message("beta2_decay", 0.5)),
        ({"d": 0.0}, ValueError, message("clip_threshold", 0.0, "d")),
        ({"eps": (-1.0, 1e-3)}, ValueError, message("eps", -1.0, "eps[0]")),
        ({"eps": (None, math.nan)}, ValueError, message("eps", math.nan, "eps[1]")),
        ({"beta1": 1.0}, ValueError, message("beta1", 1.0)),
        ({"eps_form": "torch"}, ValueError, message("eps_form", "torch")),
        ({"factor_dims": "last"}, ValueError, message("factor_dims", "last")),
        ({"min_dim_size_to_factor": 2.5}, ValueError, message("min_dim_size_to_factor", 2.5)),
        ({"weight_decay_form": "torch"}, ValueError, message("weight_decay_form", "torch")),
        ({"relative_step": 1}, TypeError, "relative_step must be a bool (True or False), got 1"),
        ({"eps": 1e-3}, TypeError, "eps must be a pair (eps1 or None, eps2), got 0.001"),
    ],
)
def test_errors(kwargs, exc, msg):
    with pytest.raises(exc) as info:
        spec.adafactor(**kwargs)
    assert str(info.value) == msg
