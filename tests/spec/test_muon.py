"""Muon in the reference: hand-computed momentum forms, Newton-Schulz, shape scales, both mask positions, errors."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cautious
from cautious import spec
from cautious.spec.errors import ERROR_TABLE, invalid_examples

A, B, C = spec.optim.MUON_NS_COEFFICIENTS

# m = [[2, -2]] after one step (t = 2), g = [[3, 4]], momentum 0.5 (derivations in the comments):
#   ema:      m' = 0.5 m + 0.5 g = [2.5, 1];  nesterov v = 0.5 g + 0.5 m' = [2.75, 2.5]
#   debiased: m' = [2.5, 1];  v = 0.5 m' / (1 - 0.5^3) + 0.5 g / (1 - 0.5^2); plain v = m' / 0.75
#   sum:      m' = 0.5 m + g = [4, 3];    nesterov v = g + 0.5 m' = [5, 5.5]
M0, G0 = np.array([[2.0, -2.0]]), np.array([[3.0, 4.0]])
MOMENTUM_CASES = [
    ("ema", True, [2.5, 1.0], [2.75, 2.5]),
    ("ema", False, [2.5, 1.0], [2.5, 1.0]),
    ("debiased", True, [2.5, 1.0], [2.5 * 0.5 / 0.875 + 1.5 / 0.75, 0.5 / 0.875 + 2.0 / 0.75]),
    ("debiased", False, [2.5, 1.0], [2.5 / 0.75, 1.0 / 0.75]),
    ("sum", True, [4.0, 3.0], [5.0, 5.5]),
    ("sum", False, [4.0, 3.0], [4.0, 3.0]),
]


@pytest.mark.parametrize(("form", "nesterov", "m_expected", "v_expected"), MOMENTUM_CASES)
def test_momentum_forms(form, nesterov, m_expected, v_expected):
    v, s = spec.muon_momentum_direction(G0, spec.MuonState(M0), 2, momentum=0.5, nesterov=nesterov, muon_momentum=form)
    np.testing.assert_allclose(s.m, [m_expected], rtol=1e-15)
    np.testing.assert_allclose(v, [v_expected], rtol=1e-15)


def test_newton_schulz_one_step_by_hand():
    # [[3, 4]]: norm 5, X0 = [0.6, 0.8]; X0 X0^T = 1, so X1 = (a + b + c) X0
    x = spec.newton_schulz(np.array([[3.0, 4.0]]), ns_coefficients=(A, B, C), ns_steps=1, eps=0.0)
    np.testing.assert_allclose(x, [[0.6 * (A + B + C), 0.8 * (A + B + C)]], rtol=1e-14)
    # a tall matrix is orthogonalized as its transpose
    xt = spec.newton_schulz(np.array([[3.0], [4.0]]), ns_coefficients=(A, B, C), ns_steps=1, eps=0.0)
    np.testing.assert_allclose(xt, x.T, rtol=1e-15)
    # zero steps: the normalized matrix; eps placement: max(norm, eps) vs norm + eps
    x0 = spec.newton_schulz(np.array([[3.0, 4.0]]), ns_coefficients=(A, B, C), ns_steps=0, eps=10.0)
    np.testing.assert_allclose(x0, [[0.3, 0.4]], rtol=1e-15)
    x0 = spec.newton_schulz(np.array([[3.0, 4.0]]), ns_coefficients=(A, B, C), ns_steps=0, eps=5.0, ns_eps="add")
    np.testing.assert_allclose(x0, [[0.3, 0.4]], rtol=1e-15)


def test_newton_schulz_keeps_singular_vectors():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 8))
    o = spec.newton_schulz(x, ns_coefficients=(A, B, C), ns_steps=5, eps=1e-7)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    d = u.T @ o @ vt.T  # U^T NS(X) V = p(S): diagonal, singular values pushed into ~(0.6, 1.25)
    np.testing.assert_allclose(d - np.diag(np.diag(d)), 0, atol=1e-12)
    assert np.all((np.diag(d) > 0.6) & (np.diag(d) < 1.25))


@pytest.mark.parametrize(
    ("shape", "kind", "expected"),
    [
        ((8, 2), "rows_over_cols", 2.0),
        ((2, 8), "rows_over_cols", 1.0),
        ((2, 8), "cols_over_rows", 2.0),
        ((8, 2), "cols_over_rows", 1.0),
        ((2, 8), "rms", 0.2 * math.sqrt(8)),
        ((2, 8), "none", 1.0),
    ],
)
def test_shape_scale(shape, kind, expected):
    assert spec.muon_shape_scale(shape, shape_scale=kind, rms_rate=0.2) == pytest.approx(expected, rel=1e-15)


# Both mask positions by hand. momentum 0.5, no nesterov (ema), one NS step, eps = 0, lr = 0.1, no decay.
# m = [[3, 5], [3, -5]], g = [[1, -1], [1, 1]]: v = m' = 0.5 m + 0.5 g = [[2, 2], [2, -2]].
# after: v v^T = 8 I, |v|_F = 4, X0 = v/4, X0 X0^T = I/2, u0 = (a + b/2 + c/4) v/4 (signs of v);
#        mask against g keeps (0,0) and (1,0): count 2 of 4, scale 2.
# before: v masked against g: 2 [[2, 0], [2, 0]] = [[4, 0], [4, 0]]; X0 = [[1, 0], [1, 0]]/sqrt 2,
#        A = X0 X0^T = J/2 (J all ones), A X0 = X0, A^2 = A: u = (a + b + c) X0.
M1, G1 = np.array([[3.0, 5.0], [3.0, -5.0]]), np.array([[1.0, -1.0], [1.0, 1.0]])
STATE1 = spec.State(1, (spec.MuonState(M1),))
K_AFTER = (A + B / 2 + C / 4) / 4


@pytest.mark.parametrize(
    ("position", "u_expected"),
    [
        ("after", [[2 * 2 * K_AFTER, 0.0], [2 * 2 * K_AFTER, 0.0]]),
        ("before", [[(A + B + C) / math.sqrt(2), 0.0], [(A + B + C) / math.sqrt(2), 0.0]]),
    ],
)
def test_mask_positions(position, u_expected):
    kw = dict(lr=0.1, weight_decay=0.0, momentum=0.5, nesterov=False, eps=0.0, ns_steps=1)
    opt = spec.muon(**kw, mask_position=position, caution=cautious.Caution("mean_clamp"))
    (p,), st = opt.step([np.zeros((2, 2))], [G1], STATE1)
    np.testing.assert_allclose(p, -0.1 * np.array(u_expected), rtol=1e-14, atol=1e-300)
    np.testing.assert_allclose(st.leaves[0].m, [[2.0, 2.0], [2.0, -2.0]], rtol=1e-15)
    assert opt.stats([np.zeros((2, 2))], [G1], STATE1)[0].count == 2
    off = spec.muon(**kw, mask_position=position, caution=False)
    (p,), _ = off.step([np.zeros((2, 2))], [G1], STATE1)
    np.testing.assert_allclose(p, -0.1 * K_AFTER * np.array([[2.0, 2.0], [2.0, -2.0]]), rtol=1e-14)


def test_decoupled_decay_uses_the_unadjusted_lr():
    # shape (1, 2) has rows_over_cols scale 1; one NS step; p (1 - lr wd) - lr u
    opt = spec.muon(lr=0.1, weight_decay=0.5, momentum=0.0, nesterov=False, eps=0.0, ns_steps=1, caution=False)
    p0 = np.array([[1.0, 2.0]])
    (p,), _ = opt.step([p0], [np.array([[3.0, 4.0]])], opt.init([p0]))
    np.testing.assert_allclose(p, p0 * 0.95 - 0.1 * (A + B + C) * np.array([[0.6, 0.8]]), rtol=1e-14)


def test_only_matrices():
    opt = spec.muon()
    msg = r"^Muon only orthogonalizes 2-d parameters, got parameter 1 with shape \(3,\)$"
    with pytest.raises(ValueError, match=msg):
        opt.init([np.zeros((2, 2)), np.zeros(3)])


MUON_KEYS = ("ns_steps", "rms_rate", "mask_position", "muon_momentum", "ns_eps", "shape_scale")


@pytest.mark.parametrize(("key", "value", "exc", "msg"), [e for e in invalid_examples() if e[0] in MUON_KEYS], ids=repr)
def test_muon_table_errors(key, value, exc, msg):
    with pytest.raises(exc) as info:
        spec.muon(**{key: value})
    assert str(info.value) == msg


def test_every_muon_key_has_a_row():
    assert set(MUON_KEYS) <= {c.key for c in ERROR_TABLE}


@pytest.mark.parametrize("bad", [(1.0, 2.0), "abc", (1.0, None, 2.0)])
def test_ns_coefficients_must_be_a_triple(bad):
    with pytest.raises(TypeError, match=r"^ns_coefficients must be three numbers \(a, b, c\), got "):
        spec.muon(ns_coefficients=bad)
    with pytest.raises(ValueError, match=r"^ns_coefficients must be finite numbers"):
        spec.muon(ns_coefficients=(1.0, float("nan"), 2.0))


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_properties_caution_keeps_state_and_masked_entries_do_not_move(data):
    from cautious.conformance import Case, spec_optimizer
    from cautious.conformance.strategies import cases, step_inputs

    case = data.draw(cases(("muon",), dtypes=("float64",)))
    hp = {**case.hparams, "weight_decay": 0.0, "mask_position": "after", "caution": cautious.Caution("exact")}
    case = Case("muon", hp, "float64")
    params, grad_seq, state = data.draw(step_inputs(case, max_steps=1, allow_nan=False))
    new, s_on = spec_optimizer(case).step(params, grad_seq[0], state)
    _, s_off = spec_optimizer(Case("muon", {**hp, "caution": False}, "float64")).step(params, grad_seq[0], state)
    for a, b in zip(s_on.leaves, s_off.leaves, strict=True):
        assert np.array_equal(a.m, b.m)
    rule = spec.muon_rule(
        momentum=hp["momentum"],
        nesterov=hp["nesterov"],
        ns_coefficients=(A, B, C),
        ns_steps=hp["ns_steps"],
        eps=hp["eps"],
        muon_momentum=hp["muon_momentum"],
        ns_eps=hp["ns_eps"],
        shape_scale=hp["shape_scale"],
    )
    for p, g, s, pn in zip(params, grad_seq[0], state.leaves, new, strict=True):
        with np.errstate(all="ignore"):
            u, _ = rule.direction(np.asarray(g, np.float64), s, state.step + 1)
        mask = spec.cautious_mask(u, g)
        assert np.array_equal(pn[~mask], p[~mask])  # masked entries do not move


def test_empty_matrices_step():
    opt = spec.muon(lr=0.1)
    params = [np.zeros((0, 3), np.float32), np.full((1, 1), 2.0, np.float32)]
    new, st1 = opt.step(params, [np.zeros((0, 3), np.float32), np.ones((1, 1), np.float32)], opt.init(params))
    assert new[0].shape == (0, 3) and new[1][0, 0] < 2.0 and new[1].dtype == np.float32
    assert st1.step == 1
