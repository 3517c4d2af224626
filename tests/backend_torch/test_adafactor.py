"""cautious.torch.Adafactor: caution=False == torch.optim.Adafactor bit for bit, paths agree, the spec agrees."""

import copy

import numpy as np
import pytest
import torch

import cautious.torch as ct
from cautious import Caution, spec
from cautious.spec.errors import message

SHAPES = [(7, 5), (13,), (), (3, 2, 4), (1, 6)]


def _params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True) for s in SHAPES]


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    out = []
    for p in params:
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        if g.numel() > 3:
            g.view(-1)[0] = 0.0  # exact zeros: the only place caution acts without momentum
        out.append(g)
    return out


def _run(cls, dtype, steps=4, **kw):
    params = _params(dtype)
    opt = cls(params, **kw)
    for s in range(steps):
        for p, g in zip(params, _grads(params, s), strict=True):
            p.grad = g
        opt.step()
    return params, opt


NATIVE_KW = [
    {},
    {"lr": 0.5, "weight_decay": 0.1},
    {"maximize": True, "eps": (1e-3, 1e-2), "d": 2.0, "beta2_decay": -0.5},
    {"lr": torch.tensor(0.02)},
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("kw", NATIVE_KW, ids=str)
def test_caution_false_is_torch_optim_bit_for_bit(dtype, foreach, kw):
    ours, o1 = _run(ct.Adafactor, dtype, caution=False, foreach=foreach, **kw)
    theirs, o2 = _run(torch.optim.Adafactor, dtype, foreach=foreach, **kw)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    s1, s2 = o1.state_dict()["state"], o2.state_dict()["state"]
    assert [sorted(s) for s in s1.values()] == [sorted(s) for s in s2.values()]
    for i in s1:
        for k in s1[i]:
            torch.testing.assert_close(s1[i][k], s2[i][k], rtol=0, atol=0)


@pytest.mark.parametrize("caution", [True, Caution("exact"), Caution("none")], ids=str)
@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_single_and_foreach_agree(caution, beta1):
    a, _ = _run(ct.Adafactor, torch.float64, caution=caution, beta1=beta1, foreach=False)
    b, _ = _run(ct.Adafactor, torch.float64, caution=caution, beta1=beta1, foreach=True)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("caution", [False, True, Caution("count_plus_one")], ids=str)
@pytest.mark.parametrize("beta1", [0.0, 0.8])
@pytest.mark.parametrize("foreach", [False, True])
def test_matches_the_spec_in_float64(caution, beta1, foreach):
    kw = dict(lr=0.3, weight_decay=0.05, beta1=beta1)
    params, _ = _run(ct.Adafactor, torch.float64, caution=caution, foreach=foreach, **kw)
    ref = spec.adafactor(caution=caution, **kw)
    ps = [p.detach().numpy().copy() for p in _params(torch.float64)]
    st = ref.init(ps)
    for s in range(4):
        ps, st = ref.step(ps, [g.numpy() for g in _grads(_params(torch.float64), s)], st)
    for p, r in zip(params, ps, strict=True):
        np.testing.assert_allclose(p.detach().numpy(), r, rtol=1e-12, atol=1e-14)


def test_caution_without_momentum_only_rescales():
    plain, _ = _run(ct.Adafactor, torch.float64, steps=1, caution=False)
    caut, _ = _run(ct.Adafactor, torch.float64, steps=1, caution=Caution("exact"))
    start = _params(torch.float64)
    for p0, a, b in zip(start, plain, caut, strict=True):
        n = p0.numel()
        k = n - 1 if n > 3 else n  # one exact zero in each gradient with more than 3 entries
        torch.testing.assert_close(b - p0, (n / k) * (a - p0), rtol=1e-12, atol=1e-15)


def test_momentum_state_and_telemetry():
    params, opt = _run(ct.Adafactor, torch.float32, beta1=0.9, caution_stats=True)
    assert all("exp_avg" in opt.state[p] for p in params)
    stats = opt.caution_stats()
    assert all(s is not None and 0 <= int(s.count) <= s.n for s in stats)
    assert any(int(s.count) < s.n for s in stats)  # momentum disagrees with g somewhere: the mask acts


@pytest.mark.parametrize(
    ("kw", "exc", "msg"),
    [
        ({"beta2_decay": 0.5}, ValueError, message("beta2_decay", 0.5)),
        ({"d": 0.0}, ValueError, message("clip_threshold", 0.0, "d")),
        ({"eps": (-1.0, 1e-3)}, ValueError, message("eps", -1.0, "eps[0]")),
        ({"eps": (None, -1.0)}, ValueError, message("eps", -1.0, "eps[1]")),
        ({"lr": -1.0}, ValueError, message("lr", -1.0)),
        ({"beta1": 1.0}, ValueError, message("beta1", 1.0)),
        (
            {"fused": True},
            ValueError,
            "fused=True is not available for Adafactor (no fused kernel); use foreach=True or foreach=False",
        ),
        ({"caution": None}, TypeError, None),
    ],
    ids=str,
)
def test_errors(kw, exc, msg):
    with pytest.raises(exc) as info:
        ct.Adafactor([torch.nn.Parameter(torch.zeros(2, 2))], **kw)
    if msg is not None:
        assert str(info.value) == msg


def test_dtensor_is_refused_before_any_change(monkeypatch):
    from cautious.backends.torch import _distributed

    class FakeDTensor(torch.Tensor):
        pass

    monkeypatch.setattr(_distributed, "_dtensor_type", lambda: FakeDTensor)
    p = torch.nn.Parameter(torch.ones(2, 2))
    opt = ct.Adafactor([p])
    p.grad = torch.ones(2, 2)
    fake = torch.ones(2, 2).as_subclass(FakeDTensor)
    opt.param_groups[0]["params"].append(fake)
    with pytest.raises(NotImplementedError, match="does not support DTensor parameters"):
        opt.step()
    assert len(opt.state) == 0 and torch.equal(p.detach(), torch.ones(2, 2))


@pytest.mark.parametrize("impl", ["single", "foreach"])
def test_conformance(impl):
    from cautious.conformance import run_conformance
    from cautious.conformance.adapters.torch import TorchAdapter

    result = run_conformance(TorchAdapter(impl), rules=("adafactor",), max_examples=80)
    assert result.examples[("adafactor", "float32")] > 0 and result.examples[("adafactor", "float64")] > 0


def test_empty_parameters_step_without_error():
    # torch.optim.Adafactor divides by the size of an empty parameter; ours skips it and counts its step
    p, q = torch.nn.Parameter(torch.zeros(0, 3)), torch.nn.Parameter(torch.ones(2, 2))
    opt = ct.Adafactor([p, q])
    p.grad, q.grad = torch.zeros(0, 3), torch.ones(2, 2)
    opt.step()
    assert int(opt.state[p]["step"]) == 1 and not torch.equal(q.detach(), torch.ones(2, 2))


def test_a_torch_optim_checkpoint_continues_bit_for_bit():
    theirs, o2 = _run(torch.optim.Adafactor, torch.float32, steps=2)
    params = [p.detach().clone().requires_grad_(True) for p in theirs]
    ours = ct.Adafactor(params, caution=False)
    ours.load_state_dict(copy.deepcopy(o2.state_dict()))  # (a state dict shares its step tensors)
    for s in range(2, 4):
        for p, q, g in zip(params, theirs, _grads(params, s), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        o2.step()
    for a, b in zip(params, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
