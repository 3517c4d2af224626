"""cautious.torch.Muon: caution=False is torch.optim.Muon bit for bit; the mask and scale as the spec; errors."""

import numpy as np
import pytest
import torch

import cautious
import cautious.torch as ct
from cautious import spec
from cautious.backends.torch import _functional as functional

SHAPES = [(5, 3), (4, 7), (6, 6)]
CONFIGS = [
    {},
    dict(nesterov=False),
    dict(adjust_lr_fn="match_rms_adamw", weight_decay=0.0),
    dict(adjust_lr_fn="original", weight_decay=0.3, lr=0.05, momentum=0.5),
    dict(ns_steps=2, eps=1e-3, ns_coefficients=(2.0, -1.5, 0.5)),
]


def _pair(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    return [torch.nn.Parameter(p.clone()) for p in ps], [torch.nn.Parameter(p.clone()) for p in ps]


def _grads(params, gen):
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw", CONFIGS, ids=repr)
@pytest.mark.parametrize("foreach", [None, False, True])
def test_caution_off_is_torch_optim_muon_bitwise(dtype, kw, foreach):
    a, b = _pair(dtype)
    native = torch.optim.Muon(a, **kw)
    ours = ct.Muon(b, caution=False, foreach=foreach, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for x, y, g in zip(a, b, _grads(a, gen), strict=True):
            x.grad, y.grad = g.clone(), g.clone()
        native.step()
        ours.step()
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    sn, so = native.state_dict()["state"], ours.state_dict()["state"]
    assert sn.keys() == so.keys()
    for i in sn:
        assert sn[i].keys() == so[i].keys() == {"momentum_buffer"}
        assert torch.equal(sn[i]["momentum_buffer"], so[i]["momentum_buffer"])


def _reference_step(p, g, m, *, lr, wd, mu, nesterov, caution, position):
    """The step by hand: torch's bfloat16 Newton-Schulz, the mask and scale from cautious.spec (float64)."""
    m = m.lerp(g, 1 - mu)
    v = g.lerp(m, mu) if nesterov else m
    if position == "before":
        v_c, *_ = spec.apply_caution(v.double().numpy(), g.double().numpy(), caution)
        v = torch.from_numpy(v_c).to(v.dtype)
    o = functional._newton_schulz(v, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.bfloat16).to(torch.float64).numpy()
    if position == "after":
        o, *_ = spec.apply_caution(o, g.double().numpy(), caution)
    ratio = max(1.0, p.shape[0] / p.shape[1]) ** 0.5
    return p.double().numpy() * (1 - lr * wd) - lr * ratio * o, m


@pytest.mark.parametrize("position", ["after", "before"])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("normalize", ["mean_clamp", "exact"])
def test_mask_and_scale_as_the_spec(position, nesterov, normalize):
    caution = cautious.Caution(normalize)
    _, params = _pair(torch.float64, seed=3)
    opt = ct.Muon(params, lr=0.02, weight_decay=0.1, nesterov=nesterov, caution=caution, mask_position=position)
    ms = [torch.zeros_like(p) for p in params]
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        gs = _grads(params, gen)
        expected = []
        for i, (p, g) in enumerate(zip(params, gs, strict=True)):
            want, ms[i] = _reference_step(
                p.detach(), g, ms[i], lr=0.02, wd=0.1, mu=0.95, nesterov=nesterov, caution=caution, position=position
            )
            expected.append(want)
            p.grad = g
        opt.step()
        for p, want in zip(params, expected, strict=True):
            # the only difference is where the float64 scale is rounded: a few ulps of p
            np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-13, atol=1e-15)


def test_caution_masks_something_and_positions_differ():
    outs = {}
    for position in ("after", "before"):
        _, params = _pair(torch.float64, seed=5)
        opt = ct.Muon(params, lr=0.02, caution_stats=True, mask_position=position)
        gen = torch.Generator().manual_seed(6)
        for _ in range(4):
            for p, g in zip(params, _grads(params, gen), strict=True):
                p.grad = g
            opt.step()
        stats = opt.caution_stats()
        assert all(0 < int(s.count) < s.n for s in stats)  # the mask is not trivial after a few steps
        outs[position] = [p.detach().clone() for p in params]
    assert not torch.equal(outs["after"][0], outs["before"][0])


@pytest.mark.parametrize(
    ("kw", "exc", "msg"),
    [
        (dict(lr=-1.0), ValueError, "lr must be a finite number >= 0, got -1.0"),
        (dict(momentum=1.5), ValueError, "momentum must be a finite number in [0, 1], got 1.5"),
        (dict(ns_steps=100), ValueError, "ns_steps must be an integer in [0, 100), got 100"),
        (dict(mask_position="post"), ValueError, "mask_position must be one of 'after', 'before', got 'post'"),
        (dict(adjust_lr_fn="rms"), ValueError, "adjust_lr_fn must be one of 'original', 'match_rms_adamw', got 'rms'"),
        (dict(nesterov=None), TypeError, "nesterov must be a bool (True or False), got None"),
        (
            dict(ns_coefficients=(1.0, 2.0)),
            TypeError,
            "ns_coefficients must be three numbers (a, b, c), got (1.0, 2.0)",
        ),
    ],
)
def test_errors_are_the_spec_messages(kw, exc, msg):
    with pytest.raises(exc) as info:
        ct.Muon([torch.nn.Parameter(torch.zeros(2, 2))], **kw)
    assert str(info.value) == msg
    spec_kw = {k: v for k, v in kw.items() if k != "adjust_lr_fn"}
    if spec_kw:
        with pytest.raises(exc) as info:
            spec.muon(**spec_kw)
        assert str(info.value) == msg


def test_refuses_non_matrices_fused_and_dtensor():
    with pytest.raises(ValueError, match=r"^Muon only orthogonalizes 2-d parameters, got parameter "):
        ct.Muon([torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="fused=True is not available for Muon \\(no fused kernel\\)"):
        ct.Muon([torch.nn.Parameter(torch.zeros(2, 2))], fused=True)
    opt = ct.Muon([torch.nn.Parameter(torch.zeros(2, 2))])
    with pytest.raises(ValueError, match="2-d parameters"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, 2, 2))]})
    assert len(opt.param_groups) == 1


def test_refuses_dtensor():
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        p = torch.nn.Parameter(distribute_tensor(torch.zeros(4, 4), mesh, [Shard(0)]))
        with pytest.raises(ValueError, match="cautious.torch.Muon does not support DTensor parameters"):
            ct.Muon([p])
    finally:
        dist.destroy_process_group()


def test_load_state_dict_keeps_caution_options():
    _, params = _pair(torch.float32)
    native = torch.optim.Muon(params)
    ours = ct.Muon(params, mask_position="before")
    ours.load_state_dict(native.state_dict())
    assert ours.param_groups[0]["mask_position"] == "before"
    assert ours.param_groups[0]["caution"] is not None
