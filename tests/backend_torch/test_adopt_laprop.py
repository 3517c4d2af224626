"""cautious.torch.Adopt / LaProp: caution=False is timm's class bit for bit; caution on follows the spec."""

import numpy as np
import pytest
import torch

import cautious
import cautious.torch as ct
from cautious import spec
from cautious.conformance.known import timm_optim
from cautious.spec.errors import message, type_message

timm_optim()
from timm.optim.adopt import Adopt as TimmAdopt  # noqa: E402
from timm.optim.laprop import LaProp as TimmLaProp  # noqa: E402

SHAPES = [(3, 5), (7,), (2, 2, 3)]


def _run(cls, kw, dtype, steps=6, seed=0, lrs=None):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_(True) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES] for _ in range(steps)]
    for gs in grads:  # a few exact zeros, and a tensor with no gradient on one step
        gs[0].view(-1)[0] = 0.0
    opt = cls(params, **kw)
    for t, gs in enumerate(grads):
        for i, (p, g) in enumerate(zip(params, gs)):
            p.grad = None if (i == 2 and t == 1) else g.clone()
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[t]
        opt.step()
    return [p.detach() for p in params], opt


ADOPT_CASES = [
    {},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "decoupled": True},
    {"clip_exp": None, "maximize": True},
    {"clip_exp": 0.25, "betas": (0.5, 0.9), "eps": 1e-3, "lr": 0.05},
]
LAPROP_CASES = [{}, {"weight_decay": 0.1, "lr": 1e-2}, {"betas": (0.5, 0.9), "eps": 1e-3, "lr": 0.05}]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(
    ("ours", "theirs", "kw"),
    [(ct.Adopt, TimmAdopt, kw) for kw in ADOPT_CASES] + [(ct.LaProp, TimmLaProp, kw) for kw in LAPROP_CASES],
    ids=lambda x: getattr(x, "__name__", repr(x)),
)
def test_caution_off_is_timm_bit_for_bit(ours, theirs, kw, dtype, foreach):
    a, opt_a = _run(ours, {**kw, "caution": False, "foreach": foreach}, dtype)
    b, opt_b = _run(theirs, {**kw, "caution": False, "foreach": foreach}, dtype)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for name in sa[k]:
            va, vb = sa[k][name], sb[k][name]
            assert torch.equal(torch.as_tensor(va), torch.as_tensor(vb)), name


def test_laprop_schedule_is_timm_bit_for_bit():
    lrs = [0.1, 0.05, 0.2, 0.0, 0.1, 0.3]
    for foreach in (False, True):
        a, _ = _run(ct.LaProp, {"caution": False, "foreach": foreach, "weight_decay": 0.1}, torch.float32, lrs=lrs)
        b, _ = _run(TimmLaProp, {"caution": False, "foreach": foreach, "weight_decay": 0.1}, torch.float32, lrs=lrs)
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def _spec_run(opt, cls, kw, steps=5, seed=1):
    """Our class and the spec over the same gradients (float64, every tensor stepped every step)."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_(True) for s in SHAPES]
    q = [p.detach().numpy().copy() for p in params]
    state = opt.init(q)
    ours = cls(params, **kw)
    for _ in range(steps):
        gs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
        for p, g in zip(params, gs):
            p.grad = g.clone()
        ours.step()
        q, state = opt.step(q, [g.numpy() for g in gs], state)
    return [p.detach().numpy() for p in params], q


CAUTIONS = [cautious.Caution(), cautious.Caution("exact"), cautious.Caution("count_plus_one")]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("caution", CAUTIONS, ids=lambda c: c.normalize)
@pytest.mark.parametrize(
    "kw", [{}, {"weight_decay": 0.3, "decoupled": True, "cautious_weight_decay": True}, {"weight_decay": 0.2}]
)
def test_adopt_follows_the_spec(kw, caution, foreach):
    skw = {k: v for k, v in kw.items() if k != "decoupled"}
    skw["decoupled_weight_decay"] = kw.get("decoupled", False)
    a, b = _spec_run(
        spec.adopt(lr=0.1, caution=caution, **skw), ct.Adopt, {"lr": 0.1, "caution": caution, "foreach": foreach, **kw}
    )
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("caution", CAUTIONS, ids=lambda c: c.normalize)
@pytest.mark.parametrize(
    "kw",
    [{}, {"weight_decay": 0.3, "cautious_weight_decay": True}, {"weight_decay": 0.3, "decay_order": "pre_update"}],
)
def test_laprop_follows_the_spec(kw, caution, foreach):
    torch.set_default_dtype(torch.float64)  # bc2 in float64, as the spec
    try:
        a, b = _spec_run(
            spec.laprop(lr=0.1, caution=caution, **kw),
            ct.LaProp,
            {"lr": 0.1, "caution": caution, "foreach": foreach, **kw},
        )
    finally:
        torch.set_default_dtype(torch.float32)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(("ours", "theirs"), [(ct.Adopt, TimmAdopt), (ct.LaProp, TimmLaProp)])
def test_timms_caution_matches_ours_in_float64(ours, theirs, foreach):
    """timm's caution=True is mean_clamp(floor=1e-3) with the product mask: equal to ours up to rounding."""
    a, _ = _run(ours, {"caution": True, "foreach": foreach, "lr": 0.05}, torch.float64)
    b, _ = _run(theirs, {"caution": True, "foreach": foreach, "lr": 0.05}, torch.float64)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("foreach", [False, True])
def test_adopt_first_step_moves_nothing_and_reports_count_zero(foreach):
    p = torch.ones(4, requires_grad=True)
    opt = ct.Adopt([p], lr=0.1, weight_decay=0.5, decoupled=True, foreach=foreach, caution_stats=True)
    p.grad = torch.tensor([1.0, -2.0, 3.0, 0.0])
    opt.step()
    assert torch.equal(p.detach(), torch.ones(4))
    assert torch.equal(opt.state[p]["exp_avg_sq"], torch.tensor([1.0, 4.0, 9.0, 0.0]))
    (st,) = opt.caution_stats()
    assert (int(st.count), st.n, float(st.scale)) == (0, 4, 1000.0)
    opt.step()  # step 2 moves and decays
    assert not torch.equal(p.detach(), torch.ones(4))
    (st,) = opt.caution_stats()
    assert int(st.count) == 3  # m' = 0.1 n has g's sign where g != 0


@pytest.mark.parametrize("path", [{"foreach": False}, {"foreach": True}, {"fused": True}], ids=str)
def test_adopt_first_step_counts_a_nan_gradient_as_kept(path):
    """Step 1's u is 0, not NaN, but the mask keeps NaN in g: the count is the spec's (found by `cautious verify`,
    whose random clause drew all-NaN gradients on the first step; single and foreach reported 0)."""
    from cautious import Caution, spec

    caution = Caution("mean_clamp")
    g = np.array([float("nan"), 1.0, float("inf"), 0.0, float("nan")])
    want = spec.adopt(lr=1e-4, caution=caution).stats([np.zeros(5)], [g], spec.adopt().init([np.zeros(5)]))
    p = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = ct.Adopt([p], lr=1e-4, caution=caution, caution_stats=True, **path)
    p.grad = torch.tensor(g)
    opt.step()
    (st,) = opt.caution_stats()
    assert (int(st.count), st.n, float(st.scale)) == tuple(want[0]) == (2, 5, 2.5)
    assert torch.equal(p.detach(), torch.zeros(5, dtype=torch.float64))  # step 1 moves nothing, NaN or not


@pytest.mark.parametrize("cls", [ct.Adopt, ct.LaProp])
def test_fused_and_foreach_together_are_refused(cls):
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together."):
        cls([p], fused=True, foreach=True)


@pytest.mark.parametrize(
    ("cls", "kw", "exc", "msg"),
    [
        (ct.Adopt, {"clip_exp": -1.0}, ValueError, message("clip_exp", -1.0)),
        (ct.Adopt, {"betas": (0.9, 1.0)}, ValueError, message("beta2", 1.0, "betas[1]")),
        (ct.Adopt, {"decoupled": "yes"}, TypeError, type_message("decoupled_weight_decay", "yes", "decoupled")),
        (
            ct.Adopt,
            {"cautious_weight_decay": True},
            ValueError,
            "cautious_weight_decay=True requires decoupled weight decay",
        ),
        (ct.Adopt, {"lr": float("nan")}, ValueError, message("lr", float("nan"))),
        (ct.LaProp, {"decay_order": "after"}, ValueError, message("decay_order", "after")),
        (ct.LaProp, {"eps": -1.0}, ValueError, message("eps", -1.0)),
        (ct.LaProp, {"caution": None}, TypeError, "caution must be a bool or a cautious.Caution, got None"),
    ],
)
def test_errors_are_the_spec_table(cls, kw, exc, msg):
    with pytest.raises(exc) as info:
        cls([torch.zeros(2, requires_grad=True)], **kw)
    assert str(info.value) == msg
