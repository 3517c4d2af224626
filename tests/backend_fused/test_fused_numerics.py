"""Rounding, NaN, stochastic rounding, validation, tables: the fused paths' numerical contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fused_testlib import BACKENDS, U32, assert_close, compare, fused_step, robust_inputs, spec_step

import cautious.spec as spec
from cautious import Caution
from cautious.backends.torch import fused


def _plain_sgd(p, g, backend, **kw):
    fused.fused_sgd_(
        [p],
        [g],
        None,
        first_step=True,
        lr=1.0,
        momentum=0.0,
        dampening=0.0,
        nesterov=False,
        weight_decay=0.0,
        decoupled=False,
        maximize=False,
        caution=None,
        cautious_weight_decay=False,
        _backend=backend,
        **kw,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_rounds_to_nearest_even_once(backend):
    """p - 1*g is exact in float32, so the only rounding is the final one: ties go to even."""
    ties_p = [1.0, 1.0 + 2**-7, -1.0, 256.0, 3.0e38, 1.0]
    ties_g = [-(2**-8), -(2**-8), 2**-8, -1.0, -3.0e38, float("nan")]
    rng = np.random.default_rng(0)
    rand_p = torch.tensor(rng.standard_normal(3000), dtype=torch.bfloat16)
    rand_g = torch.tensor(rng.standard_normal(3000) * 2.0 ** rng.integers(-12, 2, 3000), dtype=torch.bfloat16)
    p = torch.cat([torch.tensor(ties_p).to(torch.bfloat16), rand_p])
    g = torch.cat([torch.tensor(ties_g).to(torch.bfloat16), rand_g])
    expect = (p.float() - g.float()).to(torch.bfloat16)  # torch's CPU cast rounds to nearest even
    _plain_sgd(p, g, backend)
    torch.testing.assert_close(p, expect, rtol=0, atol=0, equal_nan=True)
    assert p[0].item() == 1.0 and p[1].item() == 1.0 + 2**-6 and p[2].item() == -1.0  # the ties
    assert math.isinf(p[4].item()) and math.isnan(p[5].item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("storage", ["bfloat16", "float16"])
@pytest.mark.parametrize("rule,extra", [("adamw", {}), ("lion", dict(weight_decay=0.1)), ("sgd", dict(momentum=0.9))])
def test_mixed_precision_params_with_float32_state(backend, storage, rule, extra):
    """Low-precision params and grads, float32 state: compute in float32, round once."""
    hp = dict(lr=0.05, **extra)
    rng = np.random.default_rng(1)
    pdt = {"bfloat16": torch.bfloat16, "float16": torch.float16}[storage]
    params, grads, state = robust_inputs(rule, [(40, 30), (0,), (513,)], hp, rng, step=3, dtype=np.float32)
    # make the inputs representable in the storage dtype
    params = [
        spec.round_to(p, storage).astype(np.float32)
        if storage == "bfloat16"
        else p.astype(np.float16).astype(np.float32)
        for p in params
    ]
    grads = [
        spec.round_to(g, storage).astype(np.float32)
        if storage == "bfloat16"
        else g.astype(np.float16).astype(np.float32)
        for g in grads
    ]
    got_p, got_s = fused_step(rule, hp, params, grads, state, backend, pdtype=pdt, sdtype=torch.float32)
    ref_p, ref_s = spec_step(rule, hp, params, grads, state)
    for gp, rp, p0 in zip(got_p, ref_p, params, strict=False):
        want = spec.round_to(rp, storage).astype(np.float64)
        same = (gp == want) | (np.isnan(gp) & np.isnan(want))
        # float32 compute may sit on the other side of a rounding boundary: then one ulp away
        assert same.mean() >= 0.98 if same.size else True
        assert_close("params", gp, rp, p0, unit=2.0 ** (-8 if storage == "bfloat16" else -11), ulps=2.0)
    for (s0, *_), (rs, *_), (gs, *_) in zip(state.leaves, ref_s.leaves, got_s, strict=False):
        assert_close("state", gs, rs, s0, extra=np.abs(np.asarray(grads[0]).mean()) + 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_rounding_is_unbiased_and_seeded(backend):
    n = 8192
    g = torch.full((n,), -(2.0**-10), dtype=torch.bfloat16)  # 1 + 2**-10: 1/8 of the way to the next bfloat16
    outs = []
    for seed in (1, 1, 2):
        p = torch.ones(n, dtype=torch.bfloat16)
        _plain_sgd(p, g, backend, stochastic_rounding=True, seed=seed)
        outs.append(p.float())
    vals = set(outs[0].unique().tolist())
    assert vals <= {1.0, 1.0 + 2**-7} and len(vals) == 2
    frac_up = (outs[0] > 1.0).double().mean().item()
    assert abs(frac_up - 0.125) < 0.02, frac_up  # 5 sigma for n = 8192
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])
    p = torch.ones(n, dtype=torch.bfloat16)
    _plain_sgd(p, g, backend)  # round to nearest: always down
    assert (p == 1.0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "rule,extra",
    [
        ("adamw", dict(caution=Caution("exact"))),
        ("lion", {}),
        ("sgd", dict(momentum=0.9)),
        ("adam", dict(amsgrad=True)),
    ],
)
def test_nan_is_kept_and_counted(backend, rule, extra):
    hp = dict(lr=0.05, **extra)
    rng = np.random.default_rng(2)
    params, grads, state = robust_inputs(rule, [(50,), (0,), (9, 9)], hp, rng, step=3, dtype=np.float32)
    grads[0][[3, 17, 40]] = np.nan
    grads[2][0, 0] = np.nan
    got_p, got_s = fused_step(rule, hp, params, grads, state, backend)
    assert np.isnan(got_p[0][[3, 17, 40]]).all()  # NaN reaches the parameters, as in the base optimizer
    compare(rule, hp, params, grads, state, got_p, got_s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_eps_zero_nan_from_zero_over_zero(backend):
    """eps=0, m=v=g=0: u = 0/0 = NaN is kept (the spec); the count pass must see it too."""
    hp = dict(lr=0.05, eps=0.0, weight_decay=0.0, caution=Caution("exact"))
    rng = np.random.default_rng(4)
    params, grads, state = robust_inputs("adamw", [(64,)], hp, rng, step=3, dtype=np.float32, zeros=False)
    grads[0][:5] = 0.0
    state.leaves[0].m[:5] = 0.0
    state.leaves[0].v[:5] = 0.0
    got_p, got_s = fused_step("adamw", hp, params, grads, state, backend)
    assert np.isnan(got_p[0][:5]).all()
    compare("adamw", hp, params, grads, state, got_p, got_s)


def _single_tensor_adamw(p, g, m, v, *, step, lr, b1, b2, eps, wd):
    """A straightforward per-tensor torch cautious AdamW (mean_clamp), float64."""
    p, g, m, v = (x.double() for x in (p, g, m, v))
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    u = (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps)
    mask = ((u > 0) & (g > 0)) | ((u < 0) & (g < 0)) | u.isnan() | g.isnan()
    scale = 1.0 / max(mask.sum().item() / max(mask.numel(), 1), 1e-3)
    return p - lr * wd * p - lr * torch.where(mask, u * scale, torch.zeros(())), m, v


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_a_single_tensor_torch_reference(backend):
    rng = np.random.default_rng(9)
    hp = dict(lr=0.01, weight_decay=0.1)
    params, grads, state = robust_inputs("adamw", [(17, 3), (0,), (2500,)], hp, rng, step=6, dtype=np.float32)
    got_p, got_s = fused_step("adamw", hp, params, grads, state, backend)
    for i in range(3):
        t = lambda x: torch.tensor(x)  # noqa: E731
        rp, rm, rv = _single_tensor_adamw(
            t(params[i]),
            t(grads[i]),
            t(state.leaves[i].m),
            t(state.leaves[i].v),
            step=7,
            lr=0.01,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            wd=0.1,
        )
        assert_close("p", got_p[i], rp.numpy(), params[i])
        assert_close("m", got_s[i][0], rm.numpy(), state.leaves[i].m, extra=np.abs(grads[i]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_and_many_tensors_in_one_call(backend):
    """The driver groups by dtype internally; 40 tensors, empties first and last."""
    rng = np.random.default_rng(6)
    hp = dict(lr=0.03, weight_decay=0.1)
    shapes = [(0,)] + [(int(k),) for k in rng.integers(1, 200, 38)] + [(0,)]
    params, grads, state = robust_inputs("adamw", shapes, hp, rng, step=2, dtype=np.float64)
    dts = [torch.float32 if i % 3 else torch.float64 for i in range(len(shapes))]
    ps = [torch.tensor(p).to(d) for p, d in zip(params, dts, strict=False)]
    gs = [torch.tensor(g).to(d) for g, d in zip(grads, dts, strict=False)]
    ms = [torch.tensor(s.m).to(d) for s, d in zip(state.leaves, dts, strict=False)]
    vs = [torch.tensor(s.v).to(d) for s, d in zip(state.leaves, dts, strict=False)]
    fused.fused_adam_(
        ps,
        gs,
        ms,
        vs,
        None,
        step=3,
        lr=0.03,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.1,
        decoupled=True,
        amsgrad=False,
        maximize=False,
        caution=Caution(),
        eps_placement="corrected",
        cautious_weight_decay=False,
        _backend=backend,
    )
    stored = [torch.tensor(x).to(d) for x, d in zip(params, dts, strict=False)]
    inputs_rounded = [p.to(torch.float64).numpy() for p in stored]
    ref_p, _ = spec_step("adamw", hp, inputs_rounded, [g.double().numpy() for g in gs], state)
    for p, rp, p0 in zip(ps, ref_p, inputs_rounded, strict=False):
        assert_close("p", p.double().numpy(), rp, p0, extra=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_input_raises_before_anything_changes(backend):
    p, g = torch.randn(10), torch.randn(10)
    m, v = torch.zeros(10), torch.zeros(10)
    before = [x.clone() for x in (p, m, v)]
    kw = dict(
        step=1,
        lr=1e-3,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        decoupled=True,
        amsgrad=False,
        maximize=False,
        caution=Caution(),
        eps_placement="corrected",
        cautious_weight_decay=False,
        _backend=backend,
    )
    with pytest.raises(ValueError, match=r"betas\[0\] must be a finite number in \[0, 1\), got 1.5"):
        fused.fused_adam_([p], [g], [m], [v], None, **{**kw, "beta1": 1.5})
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        fused.fused_adam_([p], [g], [m], [v], None, **{**kw, "lr": -1.0})
    with pytest.raises(ValueError, match="eps_placement must be one of"):
        fused.fused_adam_([p], [g], [m], [v], None, **{**kw, "eps_placement": "keras"})
    with pytest.raises(ValueError, match="requires decoupled weight decay"):
        fused.fused_adam_([p], [g], [m], [v], None, **{**kw, "decoupled": False, "cautious_weight_decay": True})
    with pytest.raises(ValueError, match="shape"):
        fused.fused_adam_([p, p], [g, torch.randn(3)], [m, m], [v, v], None, **kw)
    with pytest.raises(ValueError, match="exp_avg_sqs has 1 tensors but params has 2"):
        fused.fused_adam_([p, p], [g, g], [m, m], [v], None, **kw)
    with pytest.raises(ValueError, match="nesterov=True requires momentum > 0 and dampening == 0"):
        fused.fused_sgd_(
            [p],
            [g],
            None,
            first_step=True,
            lr=0.1,
            momentum=0.0,
            dampening=0.0,
            nesterov=True,
            weight_decay=0.0,
            decoupled=False,
            maximize=False,
            caution=None,
            cautious_weight_decay=False,
            _backend=backend,
        )
    with pytest.raises(TypeError, match="maximize must be a bool"):
        fused.fused_lion_(
            [p],
            [g],
            [m],
            lr=0.1,
            beta1=0.9,
            beta2=0.99,
            weight_decay=0.0,
            maximize="yes",
            caution=None,
            cautious_weight_decay=False,
            _backend=backend,
        )
    for x, y in zip((p, m, v), before, strict=False):
        assert torch.equal(x, y)


def test_empty_lists_and_all_empty_tensors_are_noops():
    fused.fused_lion_(
        [],
        [],
        [],
        lr=0.1,
        beta1=0.9,
        beta2=0.99,
        weight_decay=0.0,
        maximize=False,
        caution=None,
        cautious_weight_decay=False,
    )
    e = torch.empty(0)
    fused.fused_lion_(
        [e, e],
        [e, e],
        [e, e],
        lr=0.1,
        beta1=0.9,
        beta2=0.99,
        weight_decay=0.0,
        maximize=False,
        caution=Caution(),
        cautious_weight_decay=False,
    )


def test_chunk_table_uses_int64_offsets_past_2_31():
    from cautious.backends.torch.fused import triton_kernels as ft

    chunk = 1 << 20
    numels = [3, 0, 2**31 + 5, 0, 7]
    t = ft.chunk_table(numels, chunk)
    assert t.dtype == np.int64
    assert t.shape[0] == 1 + (2**31 + 5 + chunk - 1) // chunk + 1
    big = t[t[:, 0] == 2]
    assert big[0, 1] == 0 and big[-1, 1] == 2**31 and np.all(np.diff(big[:, 1]) == chunk)
    assert not (t[:, 0] == 1).any() and not (t[:, 0] == 3).any()  # empties: no rows
    assert t[-1].tolist() == [4, 0]


def test_is_available():
    assert fused.is_available("cpu")
    assert not fused.is_available("meta")
    assert fused.is_available("cuda") == (torch.cuda.is_available() and fused.triton_importable())


def test_u32_tolerance_helper_can_fail():
    with pytest.raises(AssertionError):
        assert_close("x", np.array([1.0 + 1e-4]), np.array([1.0]), np.array([1.0]))
    assert U32 == 2.0**-24
