"""Shared helpers for tests/backend_fused: inputs without mask-boundary ties, and spec comparisons."""

from __future__ import annotations

import inspect
import os
import sys

import numpy as np
import pytest
import torch

import cautious.spec as spec
from cautious.backends.torch import fused

U32 = 2.0**-24


def triton_ok() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and fused.triton_importable()


BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not triton_ok(), reason="needs TRITON_INTERPRET=1 before import")),
    "cpu",
    "eager",
]

TORCH = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def robust_inputs(rule, shapes, hp, rng, *, step=3, zeros=True, dtype=np.float64):
    """Params, grads and state whose mask decisions are far from sign ties.

    Entries where the direction nearly cancels (|u| < 1e-2 of its ingredients), or where coupled
    decay nearly cancels the gradient, have their state / parameter entry set to 0, which makes
    the decision exact. Some exact +-0 gradients (with zero state) are included.
    """
    params, grads, leaves = [], [], []
    b1, b2 = hp.get("betas", (0.9, 0.999))
    wd = hp.get("weight_decay", 0.0)
    coupled = rule in ("adam", "sgd") and not hp.get("decoupled_weight_decay", False) and wd != 0
    mu, damp = hp.get("momentum", 0.0), hp.get("dampening", 0.0)
    for s in shapes:
        p = rng.standard_normal(s)
        g = rng.standard_normal(s) * rng.choice([1e-3, 1.0, 10.0], size=s)
        m = rng.standard_normal(s) * 0.5
        v = np.abs(rng.standard_normal(s)) + 0.1
        if zeros and p.size > 4:
            k = rng.integers(0, p.size, size=max(1, p.size // 20))
            g.reshape(-1)[k] = rng.choice([0.0, -0.0], size=k.size)
            m.reshape(-1)[k] = 0.0
        if hp.get("maximize"):
            gg = -g
        else:
            gg = g
        if coupled:
            bad = np.abs(gg + wd * p) < 1e-2 * (np.abs(gg) + np.abs(wd * p))
            p = np.where(bad & (gg != 0), 0.0, p)
            gg = gg + wd * p
        if rule in ("adam", "adamw", "lion"):
            d = b1 * m + (1 - b1) * gg
            m = np.where(np.abs(d) < 1e-2 * (np.abs(b1 * m) + np.abs((1 - b1) * gg)), 0.0, m)
        elif mu != 0:
            b = mu * m + (1 - damp) * gg
            m = np.where(np.abs(b) < 1e-2 * (np.abs(mu * m) + np.abs((1 - damp) * gg)), 0.0, m)
            if hp.get("nesterov"):
                u = gg + mu * (mu * m + (1 - damp) * gg)
                m = np.where(np.abs(u) < 1e-2 * (np.abs(gg) + np.abs(mu * mu * m) + np.abs(mu * gg)), 0.0, m)
        params.append(p.astype(dtype))
        grads.append(g.astype(dtype))
        if rule in ("adam", "adamw"):
            leaves.append(
                spec.AdamState(m.astype(dtype), v.astype(dtype), (v * 1.5).astype(dtype) if hp.get("amsgrad") else None)
            )
        elif rule == "lion":
            leaves.append(spec.LionState(m.astype(dtype)))
        else:
            leaves.append(spec.SGDState(m.astype(dtype) if mu != 0 else None))
    return params, grads, spec.State(step if (rule != "sgd" or mu != 0) else step, tuple(leaves))


def spec_step(rule, hp, params, grads, state):
    """The reference step in float64 (no rounding to storage)."""
    opt = getattr(spec, rule)(**hp)
    f64 = lambda x: None if x is None else np.asarray(x, dtype=np.float64)  # noqa: E731
    st = spec.State(state.step, tuple(type(s)(*(f64(x) for x in s)) for s in state.leaves))
    return opt.step([f64(p) for p in params], [f64(g) for g in grads], st)


def full_hparams(rule, hp):
    """``hp`` with the spec factory's defaults filled in."""
    sig = inspect.signature(getattr(spec, rule))
    bound = sig.bind_partial(**hp)
    bound.apply_defaults()
    return dict(bound.arguments)


def fused_step(
    rule,
    hp,
    params,
    grads,
    state,
    backend,
    *,
    pdtype=torch.float32,
    sdtype=None,
    lr_tensor=False,
    noncontiguous=False,
):
    """Run one fused step on torch copies; return (params, leaves) as float64 numpy."""
    sdtype = sdtype or pdtype
    hp = full_hparams(rule, hp)
    mk = lambda x, dt: None if x is None else torch.tensor(np.array(x, dtype=np.float64)).to(dt)  # noqa: E731
    ps = [mk(p, pdtype) for p in params]
    gs = [mk(g, pdtype) for g in grads]
    if noncontiguous:
        ps = [p.t().contiguous().t() if p.dim() == 2 else p for p in ps]
    caution = spec.as_caution(hp.get("caution", True))
    lr = torch.tensor(hp.get("lr", 1e-3), dtype=torch.float64) if lr_tensor else hp.get("lr", 1e-3)
    common = dict(
        lr=lr,
        weight_decay=hp.get("weight_decay", 0.0),
        maximize=hp.get("maximize", False),
        caution=caution,
        cautious_weight_decay=hp.get("cautious_weight_decay", False),
        _backend=backend,
    )
    out_state = []
    if rule in ("adam", "adamw"):
        b1, b2 = hp.get("betas", (0.9, 0.999))
        ms = [mk(s.m, sdtype) for s in state.leaves]
        vs = [mk(s.v, sdtype) for s in state.leaves]
        ams = hp.get("amsgrad", False)
        vm = [mk(s.v_max, sdtype) for s in state.leaves] if ams else None
        fused.fused_adam_(
            ps,
            gs,
            ms,
            vs,
            vm,
            step=state.step + 1,
            beta1=b1,
            beta2=b2,
            eps=hp.get("eps", 1e-8),
            decoupled=rule == "adamw" or hp.get("decoupled_weight_decay", False),
            amsgrad=ams,
            eps_placement=hp.get("eps_placement", "corrected"),
            **common,
        )
        out_state = [(m, v, x) for m, v, x in zip(ms, vs, vm or [None] * len(ms), strict=False)]
    elif rule == "lion":
        b1, b2 = hp.get("betas", (0.9, 0.99))
        ms = [mk(s.m, sdtype) for s in state.leaves]
        fused.fused_lion_(ps, gs, ms, beta1=b1, beta2=b2, **common)
        out_state = [(m,) for m in ms]
    else:
        mu = hp.get("momentum", 0.0)
        bufs = [mk(s.m, sdtype) for s in state.leaves] if mu != 0 else None
        fused.fused_sgd_(
            ps,
            gs,
            bufs,
            first_step=state.step == 0,
            momentum=mu,
            dampening=hp.get("dampening", 0.0),
            nesterov=hp.get("nesterov", False),
            decoupled=hp.get("decoupled_weight_decay", False),
            **common,
        )
        out_state = [(b,) for b in (bufs or [None] * len(ps))]
    np64 = lambda t: None if t is None else t.detach().to(torch.float64).numpy()  # noqa: E731
    return [np64(p) for p in ps], [tuple(np64(x) for x in s) for s in out_state]


def assert_close(name, got, ref, old, extra=0.0, ulps=64.0, unit=U32):
    """|got - ref| <= ulps * unit * (|old| + |ref| + |ref - old| + extra) elementwise; NaN where ref is."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, name
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"{name}: NaN positions differ")
    tol = ulps * unit * (np.abs(old) + np.abs(ref) + np.abs(ref - old) + extra) + 1e-300
    err = np.where(nan, 0.0, np.abs(got - ref))
    bad = err > tol
    if err.size == 0:
        return
    worst = int(np.argmax(err - tol))
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} of {bad.size} entries differ; worst err {err.max():.3g} "
        f"at {np.unravel_index(worst, err.shape)} (tol there {tol.reshape(-1)[worst]:.3g})"
    )


def compare(rule, hp, params, grads, state, got_p, got_s, unit=U32, ulps=64.0):
    ref_p, ref_state = spec_step(rule, hp, params, grads, state)
    for i, (p0, rp, gp) in enumerate(zip(params, ref_p, got_p, strict=False)):
        assert_close(f"params[{i}]", gp, rp, p0, unit=unit, ulps=ulps)
    for i, (leaf0, rleaf, gleaf) in enumerate(zip(state.leaves, ref_state.leaves, got_s, strict=False)):
        g = np.abs(np.asarray(grads[i], dtype=np.float64))
        for j, (s0, rs, gs) in enumerate(zip(leaf0, rleaf, gleaf, strict=False)):
            if rs is None:
                continue
            extra = g * g + g if rule in ("adam", "adamw") else g
            assert_close(f"state[{i}][{j}]", gs, rs, s0, extra=extra, unit=unit, ulps=ulps)


sys.modules.setdefault("fused_testlib", sys.modules[__name__])
