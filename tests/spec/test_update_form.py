"""The whole-update form (spec.whole_update) and Keras's SGD velocity form (momentum_form="keras")."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cautious import Caution, spec

CAUTIONS = [Caution(), Caution("count_plus_one"), Caution("exact"), Caution("none")]
_vals = st.one_of(st.floats(-4, 4, width=32), st.sampled_from([0.0, -0.0, np.nan]))


@given(
    arrays=st.integers(1, 6).flatmap(lambda n: st.tuples(*[hnp.arrays(np.float64, n, elements=_vals)] * 2)),
    lr=st.floats(1e-4, 1.0),
    caution=st.sampled_from(CAUTIONS),
)
def test_whole_update_of_minus_lr_u_is_minus_lr_times_the_direction_form(arrays, lr, caution):
    u, g = arrays
    o_c, mask_o, count_o, scale_o = spec.whole_update(-lr * u, g, caution)
    u_c, mask_u, count_u, scale_u = spec.apply_caution(u, g, caution)
    assert count_o == count_u and scale_o == scale_u
    np.testing.assert_array_equal(mask_o, mask_u)
    np.testing.assert_allclose(o_c, -lr * u_c, rtol=1e-15, atol=0)


def test_whole_update_masks_decay_against_the_gradient():
    # update = -lr * (u + wd * p): the decay term can flip the sign; the whole update is masked
    o = np.array([-0.1, 0.05, 0.2, np.nan, 0.0])
    g = np.array([1.0, 1.0, -1.0, 1.0, 1.0])
    o_c, mask, count, scale = spec.whole_update(o, g, Caution("exact"))
    assert mask.tolist() == [True, False, True, True, False]
    assert count == 3 and scale == 5 / 3
    np.testing.assert_allclose(o_c[[0, 1, 2, 4]], [-0.1 * 5 / 3, 0.0, 0.2 * 5 / 3, 0.0])
    assert np.isnan(o_c[3])


def _run(opt, params, grads, lrs=None):
    state = opt.init(params)
    for g in grads:
        params, state = opt.step(params, [np.asarray(g)], state)
    return params, state


@pytest.mark.parametrize("caution", [False, *CAUTIONS], ids=repr)
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_keras_form_equals_torch_form_for_a_constant_learning_rate(caution, nesterov, wd):
    rng = np.random.default_rng(0)
    p0 = [rng.standard_normal(7)]
    grads = [rng.standard_normal(7) for _ in range(5)]
    kw = dict(lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=wd, decoupled_weight_decay=True, caution=caution)
    p_t, s_t = _run(spec.sgd(**kw), p0, grads)
    p_k, s_k = _run(spec.sgd(**kw, momentum_form="keras"), p0, grads)
    np.testing.assert_allclose(p_k[0], p_t[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(s_k.leaves[0].m, -0.05 * s_t.leaves[0].m, rtol=1e-12, atol=1e-15)


def test_keras_form_with_a_schedule_puts_each_learning_rate_into_the_buffer():
    p0, g1, g2 = np.array([1.0, -2.0]), np.array([0.5, 1.0]), np.array([1.0, 0.25])
    state = spec.sgd(lr=0.1, momentum=0.9, momentum_form="keras", caution=False).init([p0])
    (p1,), state = spec.sgd(lr=0.1, momentum=0.9, momentum_form="keras", caution=False).step([p0], [g1], state)
    (p2,), state = spec.sgd(lr=0.01, momentum=0.9, momentum_form="keras", caution=False).step([p1], [g2], state)
    v1 = -0.1 * g1
    v2 = 0.9 * v1 - 0.01 * g2
    np.testing.assert_allclose(state.leaves[0].m, v2, rtol=1e-15)
    np.testing.assert_allclose(p2, p0 + v1 + v2, rtol=1e-15)
    # torch's form multiplies the whole buffer by the current learning rate: a different step
    t_state = spec.sgd(lr=0.1, momentum=0.9, caution=False).init([p0])
    (q1,), t_state = spec.sgd(lr=0.1, momentum=0.9, caution=False).step([p0], [g1], t_state)
    (q2,), _ = spec.sgd(lr=0.01, momentum=0.9, caution=False).step([q1], [g2], t_state)
    assert not np.allclose(q2, p2)


def test_keras_form_caution_masks_against_the_gradient_and_keeps_the_state():
    # velocity against the gradient on entry 1: masked; state is the unmasked velocity
    p0 = np.zeros(3)
    state = spec.SGDState(np.array([0.0, 1.0, 0.0]))
    opt = spec.sgd(lr=0.1, momentum=0.9, momentum_form="keras", caution=Caution("exact"))
    (p1,), new = opt.step([p0], [np.array([1.0, 0.5, -1.0])], spec.State(1, (state,)))
    v = 0.9 * np.array([0.0, 1.0, 0.0]) - 0.1 * np.array([1.0, 0.5, -1.0])
    np.testing.assert_allclose(new.leaves[0].m, v)
    np.testing.assert_allclose(p1, [v[0] * 1.5, 0.0, v[2] * 1.5])


def test_momentum_form_is_validated():
    with pytest.raises(ValueError, match=r"^momentum_form must be one of 'torch', 'keras', got 'tf'$"):
        spec.sgd(momentum_form="tf")
    with pytest.raises(TypeError, match=r"^momentum_form must be a str \(one of 'torch', 'keras'\), got None$"):
        spec.sgd(momentum_form=None)
