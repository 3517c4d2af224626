"""Caution for any optimizer: spec.whole_step and spec.cautious_optimizer."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cautious import Caution, spec

CAUTIONS = [Caution(), Caution("count_plus_one"), Caution("exact"), Caution("none"), Caution(denominator="nonzero")]
_vals = st.one_of(st.floats(-4, 4, width=32), st.sampled_from([0.0, -0.0]))


@given(
    arrays=st.integers(1, 6).flatmap(lambda n: st.tuples(*[hnp.arrays(np.float64, n, elements=_vals)] * 3)),
    caution=st.sampled_from(CAUTIONS),
    maximize=st.booleans(),
)
def test_whole_step_is_whole_update_of_the_difference(arrays, caution, maximize):
    p, q, g = arrays
    p_c, mask, count, scale = spec.whole_step(p, q, g, caution, maximize=maximize)
    d_c, mask_d, count_d, scale_d = spec.whole_update(q - p, -g if maximize else g, caution)
    assert (count, scale) == (count_d, scale_d)
    np.testing.assert_array_equal(mask, mask_d)
    np.testing.assert_array_equal(p_c, p + d_c)
    np.testing.assert_array_equal(p_c[~mask], p[~mask])  # a dropped entry keeps p exactly


def test_whole_step_rounds_once_to_the_parameter_dtype():
    p = np.array([1.0, 1.0], np.float32)
    q = np.array([1.0 - 2.0**-23, 1.0 + 2.0**-23], np.float32)
    p_c, _, count, scale = spec.whole_step(p, q, np.array([1.0, 1.0], np.float32), Caution("exact"))
    assert p_c.dtype == np.float32 and count == 1 and scale == 2.0
    assert p_c.tolist() == [np.float32(1.0 - 2.0**-22), 1.0]


def test_maximize_keeps_the_update_that_follows_the_gradient():
    p, q, g = np.zeros(2), np.array([0.1, -0.1]), np.array([1.0, 1.0])
    up, *_ = spec.whole_step(p, q, g, Caution("none"), maximize=True)
    down, *_ = spec.whole_step(p, q, g, Caution("none"), maximize=False)
    assert up.tolist() == [0.1, 0.0] and down.tolist() == [0.0, -0.1]


def _run(opt, params, grads, steps=3):
    state = opt.init(params)
    for _ in range(steps):
        params, state = opt.step(params, grads, state)
    return params, state


def test_without_decay_the_wrapper_is_the_native_direction_form():
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(7), rng.standard_normal((3, 4))]
    grads = [rng.standard_normal(7), rng.standard_normal((3, 4))]
    for bare, native in [
        (spec.adam(lr=0.01, caution=False), spec.adam(lr=0.01)),
        (spec.lion(lr=0.01, caution=False), spec.lion(lr=0.01)),
        (spec.sgd(lr=0.01, momentum=0.9, caution=False), spec.sgd(lr=0.01, momentum=0.9)),
    ]:
        p_w, s_w = _run(spec.cautious_optimizer(bare), params, grads)
        p_n, s_n = _run(native, params, grads)
        for a, b in zip(p_w, p_n):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
        assert s_w.step == s_n.step


def test_decay_is_masked_too():
    # AdamW, first step: u = sign(g) = 1; update = -lr*1 - lr*wd*p. With p = -200, lr = 0.1, wd = 0.01:
    # update = -0.1 + 0.2 = +0.1 against g = 1: the whole update (decay included) is dropped.
    p, g = [np.array([-200.0, 1.0])], [np.array([1.0, 1.0])]
    bare = spec.adamw(lr=0.1, weight_decay=0.01, caution=False)
    (p_w,), _ = _run(spec.cautious_optimizer(bare, Caution("exact")), p, g, steps=1)
    (p_n,), _ = _run(spec.adamw(lr=0.1, weight_decay=0.01, caution=Caution("exact")), p, g, steps=1)
    assert p_w[0] == -200.0  # whole update masked: no step, no decay
    assert p_n[0] == pytest.approx(-200.0 * (1 - 0.001) - 0.1)  # native: direction kept, decay applied
    assert p_w[1] == pytest.approx(1.0 + 2 * (-0.1 - 0.001))  # kept entry rescaled by n/count = 2


def test_state_is_the_inner_state_and_caution_false_is_the_bare_optimizer():
    rng = np.random.default_rng(1)
    params, grads = [rng.standard_normal(5)], [rng.standard_normal(5)]
    bare = spec.adamw(lr=0.01, caution=False)
    _, s_w = _run(spec.cautious_optimizer(bare), params, grads)
    p_b, s_b = _run(bare, params, grads)
    np.testing.assert_array_equal(s_w.leaves[0].m, s_b.leaves[0].m)
    np.testing.assert_array_equal(s_w.leaves[0].v, s_b.leaves[0].v)
    p_off, _ = _run(spec.cautious_optimizer(bare, False), params, grads)
    np.testing.assert_array_equal(p_off[0], p_b[0])


def test_stats_count_the_kept_entries():
    opt = spec.cautious_optimizer(spec.sgd(lr=0.1, caution=False), Caution("exact"))
    params, grads = [np.ones(4)], [np.array([1.0, -1.0, 0.0, 2.0])]
    (st0,) = opt.stats(params, grads, opt.init(params))
    assert (st0.count, st0.n, st0.scale) == (3, 4, 4 / 3)
    off = spec.cautious_optimizer(spec.sgd(lr=0.1, caution=False), False)
    assert off.stats(params, grads, off.init(params)) == (None,)


def test_refuses_an_inner_optimizer_with_caution_on():
    with pytest.raises(ValueError, match="caution=False"):
        spec.cautious_optimizer(spec.adamw())
    with pytest.raises(ValueError, match="caution=False"):
        spec.cautious_optimizer(spec.cautious_optimizer(spec.adamw(caution=False)))
