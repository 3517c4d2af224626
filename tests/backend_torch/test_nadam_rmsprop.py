"""cautious.torch.NAdam and RMSprop: bitwise torch.optim with caution off, the spec with caution on."""

import copy

import numpy as np
import pytest
import torch

import cautious.torch as ct
from cautious import Caution, spec

NADAM_CASES = [
    {},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "decoupled_weight_decay": True},
    {"maximize": True, "momentum_decay": 0.1, "betas": (0.8, 0.99)},
]
RMSPROP_CASES = [
    {},
    {"momentum": 0.9},
    {"centered": True},
    {"momentum": 0.5, "centered": True, "weight_decay": 0.1, "maximize": True, "alpha": 0.9},
]
PAIRS = [(ct.NAdam, torch.optim.NAdam, kw) for kw in NADAM_CASES] + [
    (ct.RMSprop, torch.optim.RMSprop, kw) for kw in RMSPROP_CASES
]


def _run_pair(ours, theirs, kw, dtype, steps=5):
    torch.manual_seed(0)
    shapes = [(5, 3), (4,), (2, 2, 2)]
    ps = [torch.randn(s, dtype=dtype) for s in shapes]
    a = [torch.nn.Parameter(p.clone()) for p in ps]
    b = [torch.nn.Parameter(p.clone()) for p in ps]
    oa, ob = ours(a, **kw), theirs(b, **{k: v for k, v in kw.items() if k != "caution"})
    for _ in range(steps):
        for x, y in zip(a, b):
            g = torch.randn_like(x)
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    return a, b, oa, ob


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("ours", "theirs", "kw"), PAIRS, ids=str)
def test_caution_off_is_torch_optim_bit_for_bit(ours, theirs, kw, dtype, foreach):
    a, b, oa, ob = _run_pair(ours, theirs, dict(kw, foreach=foreach, caution=False), dtype)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sb:
        assert sa[i].keys() == sb[i].keys()
        for k in sb[i]:
            assert sa[i][k].dtype == sb[i][k].dtype and torch.equal(sa[i][k], sb[i][k]), k


@pytest.mark.parametrize(("ours", "theirs", "kw"), PAIRS[:1] + PAIRS[5:6], ids=str)
def test_caution_on_differs_from_torch_optim(ours, theirs, kw):
    a, b, _, _ = _run_pair(ours, theirs, dict(kw, caution=True), torch.float64)
    assert any(not torch.equal(x, y) for x, y in zip(a, b))


def _vs_spec(cls, sopt, kw, foreach, steps=5):
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(9)
    ps, st = [p0], sopt.init([p0])
    tp = torch.nn.Parameter(torch.tensor(p0))
    opt = cls([tp], foreach=foreach, **kw)
    for i in range(steps):
        g = rng.standard_normal(9)
        g[i] = 0.0  # an exact zero: masked
        ps, st = sopt.step(ps, [g], st)
        tp.grad = torch.tensor(g)
        opt.step()
    return ps[0], tp.detach().numpy()


SPEC_CASES = [
    (ct.NAdam, spec.nadam, {}),
    (ct.NAdam, spec.nadam, {"momentum_schedule": "constant", "weight_decay": 0.1}),
    (
        ct.NAdam,
        spec.nadam,
        {
            "weight_decay": 0.1,
            "decoupled_weight_decay": True,
            "cautious_weight_decay": True,
            "caution": Caution("exact"),
        },
    ),
    (ct.RMSprop, spec.rmsprop, {}),
    (ct.RMSprop, spec.rmsprop, {"momentum": 0.9, "centered": True, "caution": Caution("count_plus_one")}),
    (ct.RMSprop, spec.rmsprop, {"momentum": 0.9, "weight_decay": 0.1, "decoupled_weight_decay": True}),
]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(("cls", "factory", "kw"), SPEC_CASES, ids=str)
def test_caution_on_matches_the_spec_in_float64(cls, factory, kw, foreach):
    # float64 default dtype: NAdam's mu_product state is float64 then (float32 otherwise, as torch.optim)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        want, got = _vs_spec(cls, factory(**kw), kw, foreach)
    finally:
        torch.set_default_dtype(old)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_rmsprop_fused_is_refused():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="fused=True is not available for RMSprop"):
        ct.RMSprop([p], fused=True)


@pytest.mark.parametrize("cls", [ct.NAdam, ct.RMSprop])
def test_capturable_is_refused(cls):
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=f"capturable=True is not supported by cautious.torch.{cls.__name__}"):
        cls([p], capturable=True)


@pytest.mark.parametrize("cls", [ct.NAdam, ct.RMSprop])
def test_caution_stats(cls):
    p = torch.nn.Parameter(torch.zeros(4))
    opt = cls([p], caution_stats=True, **({"momentum": 0.9} if cls is ct.RMSprop else {}))
    p.grad = torch.tensor([1.0, -1.0, 0.0, 2.0])
    opt.step()
    (s,) = opt.caution_stats()
    assert int(s.count) == 3 and s.n == 4 and float(s.scale) == pytest.approx(4 / 3)


def test_rmsprop_without_momentum_caution_only_rescales():
    g = torch.tensor([1.0, -2.0, 0.5, 0.0])
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    oa, ob = ct.RMSprop([a], caution=Caution("exact")), torch.optim.RMSprop([b])
    a.grad, b.grad = g.clone(), g.clone()
    oa.step()
    ob.step()
    torch.testing.assert_close(a.detach(), b.detach() * 4 / 3, rtol=1e-6, atol=0)


def test_nadam_torch_checkpoint_loads_and_continues_bitwise():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(6))
    b.data.copy_(a.data)
    oa, ob = torch.optim.NAdam([a]), ct.NAdam([b], caution=False)
    a.grad = torch.randn(6)
    oa.step()
    b.data.copy_(a.data)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))  # (load_state_dict shares tensors)
    g = torch.randn(6)
    a.grad, b.grad = g.clone(), g.clone()
    oa.step()
    ob.step()
    assert torch.equal(a, b)


# -- conformance (the shipped suite), and the fused adapter's reason ----------------------------------------


@pytest.mark.parametrize("impl", ["single", "foreach"])
def test_conformance(impl):
    from cautious.conformance import run_conformance
    from cautious.conformance.adapters.torch import TorchAdapter

    result = run_conformance(TorchAdapter(impl), rules=("nadam", "rmsprop"), max_examples=120)
    assert {rule for rule, _ in result.examples} == {"nadam", "rmsprop"}


def test_fused_adapters_decline_with_a_reason():
    from cautious.conformance import Case
    from cautious.conformance.adapters.fused import FusedAdapter
    from cautious.conformance.adapters.torch import TorchAdapter

    assert "no fused kernel" in TorchAdapter("fused").supports(Case("rmsprop", {}))
    assert "no fused kernel" in FusedAdapter().supports(Case("rmsprop", {}))
    assert TorchAdapter("fused").supports(Case("nadam", {})) is None
    assert FusedAdapter().supports(Case("nadam", {})) is None
