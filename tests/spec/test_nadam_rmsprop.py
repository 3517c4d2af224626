"""NAdam/NAdamW and RMSprop in the spec: hand-computed steps, the named options, caution, errors."""

import math

import numpy as np
import pytest

from cautious import Caution, spec
from cautious.spec.errors import NESTEROV_MESSAGE, message, type_message


def _steps(opt, p, grads):
    params, state = [np.asarray(p, np.float64)], opt.init([np.asarray(p, np.float64)])
    for g in grads:
        params, state = opt.step(params, [np.asarray(g, np.float64)], state)
    return params[0], state


def _mu(t, b1=0.9, psi=4e-3):
    return b1 * (1 - 0.5 * 0.96 ** (t * psi))


def test_nadam_first_step_by_hand():
    # m' = 0.1 g, v' = 0.001 g^2, d = |g| + eps: u = (1 - mu1)/(1 - mu1) g/d + mu2/(1 - mu1 mu2) * 0.1 g/d
    g = np.array([1.0, -2.0, 0.5])
    p, state = _steps(spec.nadam(lr=0.1, eps=1e-8, caution=False), np.zeros(3), [g])
    d = np.abs(g) + 1e-8
    mu1, mu2 = _mu(1), _mu(2)
    u = g / d + mu2 / (1 - mu1 * mu2) * 0.1 * g / d
    np.testing.assert_allclose(p, -0.1 * u, rtol=1e-14)
    assert float(state.leaves[0].mu_product) == pytest.approx(mu1, rel=1e-15)


def test_nadam_second_step_by_hand_and_the_mu_product():
    g1, g2 = np.array([1.0, -1.0]), np.array([0.5, 3.0])
    p, state = _steps(spec.nadam(lr=1.0, eps=0.0, caution=False), np.zeros(2), [g1, g2])
    mu1, mu2, mu3 = _mu(1), _mu(2), _mu(3)
    m1, v1 = 0.1 * g1, 0.001 * g1**2
    u1 = (1 - mu1) / (1 - mu1) * g1 / np.sqrt(v1 / 0.001) + mu2 / (1 - mu1 * mu2) * m1 / np.sqrt(v1 / 0.001)
    m2, v2 = 0.9 * m1 + 0.1 * g2, 0.999 * v1 + 0.001 * g2**2
    d2 = np.sqrt(v2 / (1 - 0.999**2))
    prod = mu1 * mu2
    u2 = (1 - mu2) / (1 - prod) * g2 / d2 + mu3 / (1 - prod * mu3) * m2 / d2
    np.testing.assert_allclose(p, -u1 - u2, rtol=1e-13)
    assert float(state.leaves[0].mu_product) == pytest.approx(prod, rel=1e-15)


def test_nadam_constant_schedule_is_adam_with_a_nesterov_look_ahead():
    # optax.nadam: mu_hat = b1 m' / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t); u = mu_hat / (sqrt(v_hat) + eps)
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(5) for _ in range(4)]
    p, _ = _steps(spec.nadam(lr=0.01, momentum_schedule="constant", caution=False), np.zeros(5), grads)
    m, v, q = np.zeros(5), np.zeros(5), np.zeros(5)
    for t, g in enumerate(grads, 1):
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        mu_hat = 0.9 * m / (1 - 0.9 ** (t + 1)) + 0.1 * g / (1 - 0.9**t)
        q -= 0.01 * mu_hat / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    np.testing.assert_allclose(p, q, rtol=1e-12)


def test_nadam_dozat_schedule_differs_from_the_constant_one():
    g = [np.array([1.0, -1.0])] * 3
    a, _ = _steps(spec.nadam(caution=False), np.zeros(2), g)
    b, _ = _steps(spec.nadam(momentum_schedule="constant", caution=False), np.zeros(2), g)
    assert not np.allclose(a, b, rtol=1e-6)


def test_nadam_caution_masks_a_direction_that_opposes_the_gradient():
    # after g1 = +1 the momentum dominates a small opposite g2: u > 0 while g < 0 -> masked
    g1, g2 = np.array([1.0, 1.0]), np.array([-0.01, 1.0])
    p_off, _ = _steps(spec.nadam(lr=1.0, caution=False), np.zeros(2), [g1])
    _, state = _steps(spec.nadam(lr=1.0, caution=False), np.zeros(2), [g1])
    u, _ = spec.nadam_direction(g2, state.leaves[0], 2, beta1=0.9, beta2=0.999, eps=1e-8)
    assert u[0] > 0 and g2[0] < 0
    opt = spec.nadam(lr=1.0, caution=Caution("exact"))
    p_on, st_on = _steps(opt, np.zeros(2), [g1, g2])
    # second step: entry 0 masked (stays where step 1 left it), entry 1 kept and scaled by n / count = 2
    assert p_on[0] == p_off[0]
    assert p_on[1] == pytest.approx(p_off[1] - 2 * u[1], rel=1e-14)
    # caution leaves the state alone
    _, st_plain = _steps(spec.nadam(lr=1.0, caution=False), np.zeros(2), [g1, g2])
    np.testing.assert_array_equal(st_on.leaves[0].m, st_plain.leaves[0].m)


def test_nadamw_is_nadam_with_decoupled_decay():
    g = [np.array([1.0, -2.0]), np.array([0.5, 0.5])]
    a, _ = _steps(spec.nadamw(weight_decay=0.1, caution=False), np.ones(2), g)
    b, _ = _steps(spec.nadam(weight_decay=0.1, decoupled_weight_decay=True, caution=False), np.ones(2), g)
    c, _ = _steps(spec.nadam(weight_decay=0.1, caution=False), np.ones(2), g)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_rmsprop_first_step_by_hand():
    # alpha = 0.5, eps = 0: v' = g^2 / 2, u = g / |g| * sqrt(2)
    g = np.array([2.0, -1.0])
    p, _ = _steps(spec.rmsprop(lr=0.1, alpha=0.5, eps=0.0, caution=False), np.zeros(2), [g])
    np.testing.assert_allclose(p, -0.1 * math.sqrt(2) * np.sign(g), rtol=1e-15)


def test_rmsprop_centered_first_step_by_hand():
    # g_avg' = g / 2, q = g^2/2 - g^2/4 = g^2/4: u = 2 sign(g)
    g = np.array([2.0, -1.0])
    p, state = _steps(spec.rmsprop(lr=0.1, alpha=0.5, eps=0.0, centered=True, caution=False), np.zeros(2), [g])
    np.testing.assert_allclose(p, -0.2 * np.sign(g), rtol=1e-15)
    np.testing.assert_array_equal(state.leaves[0].g_avg, g / 2)


def test_rmsprop_momentum_two_steps_by_hand():
    g1, g2 = np.array([1.0]), np.array([-3.0])
    opt = spec.rmsprop(lr=1.0, alpha=0.5, eps=0.0, momentum=0.5, caution=False)
    p, state = _steps(opt, np.zeros(1), [g1, g2])
    r1 = 1.0 / math.sqrt(0.5)
    v2 = 0.5 * 0.5 + 0.5 * 9.0
    r2 = -3.0 / math.sqrt(v2)
    m2 = 0.5 * r1 + r2
    np.testing.assert_allclose(p, [-r1 - m2], rtol=1e-15)
    np.testing.assert_allclose(state.leaves[0].m, [m2], rtol=1e-15)


@pytest.mark.parametrize("eps_in_sqrt", [False, True])
def test_rmsprop_eps_placement(eps_in_sqrt):
    g = np.array([0.01])
    p, _ = _steps(spec.rmsprop(lr=1.0, alpha=0.0, eps=1e-4, eps_in_sqrt=eps_in_sqrt, caution=False), [0.0], [g])
    d = math.sqrt(1e-4 + 1e-4) if eps_in_sqrt else 0.01 + 1e-4
    np.testing.assert_allclose(p, [-0.01 / d], rtol=1e-15)


def test_rmsprop_nesterov_and_initial_scale():
    g = np.array([1.0])
    p, _ = _steps(
        spec.rmsprop(lr=1.0, alpha=0.5, eps=0.0, momentum=0.5, nesterov=True, initial_scale=1.0, caution=False),
        [0.0],
        [g],
    )
    r = 1.0 / math.sqrt(0.5 * 1.0 + 0.5)  # v starts at initial_scale = 1
    np.testing.assert_allclose(p, [-(r + 0.5 * r)], rtol=1e-15)


def test_rmsprop_keras_form_equals_the_torch_form_at_a_constant_lr():
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal(6) for _ in range(4)]
    kw = dict(lr=0.05, alpha=0.9, eps=1e-7, momentum=0.8, centered=True, eps_in_sqrt=True)
    a, sa = _steps(spec.rmsprop(momentum_form="keras", **kw), np.zeros(6), grads)
    b, sb = _steps(spec.rmsprop(**kw), np.zeros(6), grads)
    np.testing.assert_allclose(a, b, rtol=1e-13)
    np.testing.assert_allclose(sa.leaves[0].m, 0.05 * sb.leaves[0].m, rtol=1e-13)


def test_rmsprop_without_momentum_caution_changes_only_the_scale():
    # u = g / d has the sign of g: nothing but exact zeros is masked
    g = np.array([1.0, -2.0, 0.5, -0.25])
    off, _ = _steps(spec.rmsprop(caution=False), np.zeros(4), [g])
    on, _ = _steps(spec.rmsprop(), np.zeros(4), [g])
    np.testing.assert_array_equal(on, off)
    g0 = np.array([1.0, -2.0, 0.0, 0.0])
    off0, _ = _steps(spec.rmsprop(caution=False), np.zeros(4), [g0])
    on0, _ = _steps(spec.rmsprop(caution=Caution("exact")), np.zeros(4), [g0])
    np.testing.assert_allclose(on0, 2 * off0, rtol=1e-15)  # n / count = 4 / 2


def test_rmsprop_with_momentum_caution_masks():
    g1, g2 = np.array([1.0, 1.0]), np.array([-0.1, 1.0])
    on, _ = _steps(spec.rmsprop(lr=1.0, momentum=0.9, caution=Caution("none")), np.zeros(2), [g1, g2])
    off1, _ = _steps(spec.rmsprop(lr=1.0, momentum=0.9, caution=False), np.zeros(2), [g1])
    off2, _ = _steps(spec.rmsprop(lr=1.0, momentum=0.9, caution=False), np.zeros(2), [g1, g2])
    assert on[0] == off1[0] and off2[0] != off1[0]  # entry 0: m' > 0 against g < 0, masked
    assert on[1] == off2[1]


def test_rmsprop_centered_negative_variance_is_nan_as_torch():
    s = spec.RMSpropState(np.array([1.0]), np.array([2.0]), None)  # v < g_avg^2: q < 0
    u, _ = spec.rmsprop_direction(np.array([2.0]), s, 2, alpha=1.0, eps=1e-8, centered=True)
    assert np.isnan(u).all()


@pytest.mark.parametrize(
    ("factory", "key", "value", "exc", "msg"),
    [
        (spec.nadam, "momentum_decay", -1.0, ValueError, message("momentum_decay", -1.0)),
        (spec.nadam, "momentum_schedule", "torch", ValueError, message("momentum_schedule", "torch")),
        (spec.nadam, "momentum_schedule", None, TypeError, type_message("momentum_schedule", None)),
        (spec.rmsprop, "alpha", 1.5, ValueError, message("alpha", 1.5)),
        (spec.rmsprop, "initial_scale", -1.0, ValueError, message("initial_scale", -1.0)),
        (spec.rmsprop, "centered", "yes", TypeError, type_message("centered", "yes")),
        (spec.rmsprop, "eps_in_sqrt", 1, TypeError, type_message("eps_in_sqrt", 1)),
        (spec.rmsprop, "momentum_form", "tf", ValueError, message("momentum_form", "tf")),
    ],
)
def test_errors(factory, key, value, exc, msg):
    with pytest.raises(exc) as info:
        factory(**{key: value})
    assert str(info.value) == msg


def test_rmsprop_nesterov_needs_momentum():
    with pytest.raises(ValueError, match=NESTEROV_MESSAGE):
        spec.rmsprop(nesterov=True)
