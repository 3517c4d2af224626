"""The mask, the integer count and the scale, against :mod:`cautious.spec.mask`, on both count paths."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import cautious.backends.jax._core as core
from cautious import Caution
from cautious.spec import mask as smask

EDGE = [0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1e-40, -1e-40, 3e38, -3e38, 5.0, -5.0, np.inf, -np.inf, np.nan]


@pytest.fixture(params=["exact", "fast"])
def path(request, monkeypatch):
    """Run a test with the plain integer count, and with the arithmetic count forced on every tensor."""
    if request.param == "fast":
        monkeypatch.setattr(core, "FAST_COUNT_MIN_SIZE", 0)
    return request.param


def _flush(x, dtype):
    """CPU XLA treats subnormals as zero; the spec allows it. Flush the reference input the same way."""
    x = np.array(x, dtype)
    tiny = np.finfo(dtype).tiny
    x[np.abs(x) < tiny] = 0.0
    return x


def test_mask_matches_spec_on_edge_values():
    u, g = np.meshgrid(np.array(EDGE, np.float64), np.array(EDGE, np.float64))
    got = np.asarray(core.cautious_mask(jnp.asarray(u), jnp.asarray(g)))
    np.testing.assert_array_equal(got, smask.cautious_mask(u, g))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("jit", [False, True])
def test_count_on_edge_values(path, dtype, jit):
    u, g = np.meshgrid(np.array(EDGE, dtype), np.array(EDGE, dtype))
    f = jax.jit(core.kept_count) if jit else core.kept_count
    k = f(jnp.asarray(u), jnp.asarray(g))
    assert jnp.issubdtype(k.dtype, jnp.integer)
    assert int(k) == smask.kept_count(smask.cautious_mask(_flush(u, dtype), _flush(g, dtype)))


@settings(deadline=None, max_examples=40)
@given(
    a=hnp.arrays(np.float32, st.integers(0, 300), elements=st.sampled_from(EDGE[:12]) | st.floats(-10, 10, width=32)),
    seed=st.integers(0, 2**16),
)
def test_count_matches_mask_random(a, seed):
    """Fast and exact paths agree with each other and with the spec (finite values, subnormals flushed)."""
    g = np.random.default_rng(seed).permutation(a)
    want = smask.kept_count(smask.cautious_mask(_flush(a, np.float32), _flush(g, np.float32)))
    assert int(core._exact_count(jnp.asarray(a), jnp.asarray(g))) == want
    total = float(core._indicator_sum(jnp.asarray(a), jnp.asarray(g)))
    assert np.isnan(total) or total == want  # NaN (0 * inf) hands over to the exact count
    old, core.FAST_COUNT_MIN_SIZE = core.FAST_COUNT_MIN_SIZE, 0
    try:
        assert int(core.kept_count(jnp.asarray(a), jnp.asarray(g))) == want
    finally:
        core.FAST_COUNT_MIN_SIZE = old


def test_fast_count_falls_back_on_nan(monkeypatch):
    monkeypatch.setattr(core, "FAST_COUNT_MIN_SIZE", 0)
    u = jnp.array([1.0, np.nan, -1.0, 2.0], jnp.float32)
    g = jnp.array([1.0, 1.0, 1.0, np.nan], jnp.float32)
    assert np.isnan(float(core._indicator_sum(u, g)))
    assert int(jax.jit(core.kept_count)(u, g)) == 3


def test_fast_count_zero_times_overflow_falls_back(monkeypatch):
    """``a == 0`` with ``|g| >= 4`` makes 0*inf = NaN in the indicator: the exact count takes over."""
    monkeypatch.setattr(core, "FAST_COUNT_MIN_SIZE", 0)
    u = jnp.array([0.0, 1.0, 1.0], jnp.float32)
    g = jnp.array([8.0, 8.0, -8.0], jnp.float32)
    assert int(jax.jit(core.kept_count)(u, g)) == 1


@pytest.mark.parametrize("shape", [(7, 5, 3), (40,), (3, 50)])
def test_partial_sums_when_tensor_exceeds_exact_float_limit(monkeypatch, shape):
    """Above 2**24 entries (float32) the indicator is summed over trailing axes first; force it small."""
    monkeypatch.setattr(core, "FAST_COUNT_MIN_SIZE", 0)
    monkeypatch.setitem(core.EXACT_SUM_LIMIT, "float32", 16)
    rng = np.random.default_rng(0)
    u = rng.standard_normal(shape).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    want = smask.kept_count(smask.cautious_mask(u, g))
    assert int(jax.jit(core.kept_count)(jnp.asarray(u), jnp.asarray(g))) == want
    u[(0,) * len(shape)] = np.nan
    want = smask.kept_count(smask.cautious_mask(u, g))
    assert int(jax.jit(core.kept_count)(jnp.asarray(u), jnp.asarray(g))) == want


def test_count_dtype_is_integer_and_wide_under_x64():
    k = core.kept_count(jnp.ones(3, jnp.float32), jnp.ones(3, jnp.float32))
    assert k.dtype == (jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)


CAUTIONS = [
    Caution(),
    Caution("mean_clamp", 0.1),
    Caution("mean_clamp", 1.0),
    Caution("count_plus_one"),
    Caution("exact"),
    Caution("none"),
]


@pytest.mark.parametrize("caution", CAUTIONS, ids=repr)
@pytest.mark.parametrize("n", [1, 3, 10, 999, 1000, 1001, 4097])
def test_scale_matches_caution_scale(caution, n):
    ks = sorted(
        {
            0,
            1,
            2,
            n // 3,
            n // 2,
            n - 1,
            n,
            max(0, round(caution.floor * n)),
            max(0, round(caution.floor * n) - 1),
            round(caution.floor * n) + 1,
        }
        & set(range(n + 1))
    )
    got = jax.vmap(lambda k: core.caution_scale(k, n, caution, jnp.float64))(jnp.asarray(ks))
    want = [caution.scale(k, n) for k in ks]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_apply_caution_matches_spec(path, dtype):
    rng = np.random.default_rng(1)
    u = rng.standard_normal((6, 7)).astype(dtype)
    g = rng.standard_normal((6, 7)).astype(dtype)
    u[0, :3] = [0.0, -0.0, np.nan]
    g[1, :2] = [np.nan, 0.0]
    for caution in CAUTIONS:
        want, _, _, _ = smask.apply_caution(u.astype(np.float64), g.astype(np.float64), caution)
        got = jax.jit(lambda a, b, c=caution: core.apply_caution(a, b, c))(jnp.asarray(u), jnp.asarray(g))
        assert got.dtype == dtype
        np.testing.assert_allclose(np.asarray(got), want, rtol=4 * np.finfo(dtype).eps, equal_nan=True)


def test_apply_caution_zero_size_and_scalar(path):
    e = jnp.zeros((0, 3), jnp.float32)
    assert core.apply_caution(e, e, Caution()).shape == (0, 3)
    s = core.apply_caution(jnp.float32(2.0), jnp.float32(-1.0), Caution())
    assert s.shape == () and float(s) == 0.0
    s = core.apply_caution(jnp.float32(2.0), jnp.float32(1.0), Caution("exact"))
    assert float(s) == 2.0


def test_bfloat16_direction_scales_in_float32():
    u = jnp.array([1.0, -1.0, 1.0078125], jnp.bfloat16)
    g = jnp.array([1.0, 1.0, 1.0], jnp.bfloat16)
    out = core.apply_caution(u, g, Caution("exact"))
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), [1.5, 0.0, 1.51171875])
    # the public wrapper rounds once, back to the direction's dtype: 1.51171875 -> 1.515625
    fixed = optax.GradientTransformation(optax.init_empty_state, lambda g, s, p=None: (u, s))
    wrapped = core.cautious(fixed, Caution("exact"), form="direction")
    out, _ = wrapped.update(g, wrapped.init(u))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), [1.5, 0.0, 1.515625])
