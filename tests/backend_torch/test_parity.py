"""single-tensor vs foreach: identical results, and caution=False == torch.optim."""

import copy

import pytest
import torch

import cautious.torch as ct
from cautious import Caution

CAUTIONS = [
    False,
    True,
    Caution("count_plus_one"),
    Caution("exact"),
    Caution("none"),
    Caution("mean_clamp", 0.5),
]


def _tensors(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (13,), (), (0,), (3, 1, 4)]
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def _grads(params, step, nan=False):
    gen = torch.Generator().manual_seed(100 + step)
    out = []
    for p in params:
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        if g.numel() > 3:
            g.view(-1)[0] = 0.0
            g.view(-1)[1] = -0.0
            if nan:
                g.view(-1)[2] = float("nan")
        out.append(g)
    return out


def _run(make, dtype, foreach, steps=4, nan=False):
    params = [p.clone().requires_grad_(True) for p in _tensors(dtype)]
    opt = make(params, foreach)
    for s in range(steps):
        for p, g in zip(params, _grads(params, s, nan), strict=False):
            p.grad = g
        opt.step()
    return params, opt


def _assert_same(a, b, exact=True):
    for x, y in zip(a, b, strict=False):
        if exact:
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
        else:
            torch.testing.assert_close(x, y, equal_nan=True)


RULES = {
    "adamw": lambda c, **kw: lambda ps, fe: ct.AdamW(ps, lr=0.05, caution=c, foreach=fe, **kw),
    "adam": lambda c, **kw: lambda ps, fe: ct.Adam(ps, lr=0.05, weight_decay=0.1, caution=c, foreach=fe, **kw),
    "lion": lambda c, **kw: lambda ps, fe: ct.Lion(ps, lr=0.05, weight_decay=0.1, caution=c, foreach=fe, **kw),
    "sgd": lambda c, **kw: lambda ps, fe: ct.SGD(ps, lr=0.05, momentum=0.9, caution=c, foreach=fe, **kw),
}
EXTRA = {
    "adamw": [
        {},
        {"amsgrad": True},
        {"eps_placement": "uncorrected"},
        {"cautious_weight_decay": True},
        {"maximize": True},
    ],
    "adam": [{}, {"decoupled_weight_decay": True, "cautious_weight_decay": True}, {"amsgrad": True}],
    "lion": [{}, {"cautious_weight_decay": True}, {"maximize": True}],
    "sgd": [
        {},
        {"nesterov": True},
        {"dampening": 0.3, "weight_decay": 0.1},
        {"decoupled_weight_decay": True, "weight_decay": 0.1, "cautious_weight_decay": True},
    ],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("caution", CAUTIONS, ids=repr)
@pytest.mark.parametrize("rule", list(RULES))
def test_single_equals_foreach(rule, caution, dtype):
    for kw in EXTRA[rule]:
        make = RULES[rule](caution, **kw)
        a, opt_a = _run(make, dtype, foreach=False, nan=True)
        b, opt_b = _run(make, dtype, foreach=True, nan=True)
        _assert_same(a, b)
        for pa, pb in zip(a, b, strict=False):
            for k, v in opt_a.state[pa].items():
                torch.testing.assert_close(v, opt_b.state[pb][k], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_low_and_high_precision_paths_agree(dtype):
    make = RULES["adamw"](True)
    a, _ = _run(make, dtype, foreach=False)
    b, _ = _run(make, dtype, foreach=True)
    _assert_same(a, b)


TORCH_CASES = [
    (ct.AdamW, torch.optim.AdamW, {"lr": 0.05}),
    (ct.AdamW, torch.optim.AdamW, {"lr": 0.05, "amsgrad": True, "weight_decay": 0.3, "maximize": True}),
    (ct.Adam, torch.optim.Adam, {"lr": 0.05}),
    (ct.Adam, torch.optim.Adam, {"lr": 0.05, "weight_decay": 0.1, "amsgrad": True}),
    (ct.Adam, torch.optim.Adam, {"lr": 0.05, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    (ct.SGD, torch.optim.SGD, {"lr": 0.05}),
    (ct.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    (ct.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "dampening": 0.2, "maximize": True}),
]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("ours,theirs,kw", TORCH_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_caution_false_is_torch_optim(ours, theirs, kw, foreach, dtype):
    a, opt_a = _run(lambda ps, fe: ours(ps, caution=False, foreach=fe, **kw), dtype, foreach)
    b, opt_b = _run(lambda ps, fe: theirs(ps, foreach=fe, **kw), dtype, foreach)
    _assert_same(a, b, exact=False)
    for pa, pb in zip(a, b, strict=False):
        assert set(opt_a.state[pa]) == set(opt_b.state[pb])
        for k, v in opt_a.state[pa].items():
            torch.testing.assert_close(v, opt_b.state[pb][k])


def test_caution_changes_the_update():
    a, _ = _run(RULES["adamw"](False), torch.float64, True)
    b, _ = _run(RULES["adamw"](True), torch.float64, True)
    assert any(not torch.equal(x, y) for x, y in zip(a, b, strict=False))


def test_caution_never_changes_state():
    """m, v and momentum buffers are the base rule's: caution on and off leave the same state."""
    for rule in RULES:
        a, oa = _run(RULES[rule](False), torch.float64, True, steps=1)
        b, ob = _run(RULES[rule](True), torch.float64, True, steps=1)
        for pa, pb in zip(a, b, strict=False):
            for k in oa.state[pa]:
                torch.testing.assert_close(oa.state[pa][k], ob.state[pb][k], rtol=0, atol=0)


def test_mask_is_exact_in_a_hand_example():
    """u = sign-agreement mask * n/k scale ("exact"), with +0/-0 masked and NaN kept (spec.mask)."""
    p = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = ct.SGD([p], lr=1.0, caution=Caution("exact"))
    p.grad = torch.tensor([1.0, -2.0, 0.0, -0.0, 3.0, float("nan")], dtype=torch.float64)
    opt.step()
    # u = g; kept: 1, -2, 3, nan -> k=4, n=6, scale 1.5
    expected = torch.tensor([-1.5, 3.0, 0.0, 0.0, -4.5, float("nan")], dtype=torch.float64)
    torch.testing.assert_close(p.detach(), expected, equal_nan=True)


def test_deepcopy_of_optimizer_continues_identically():
    params = [p.clone().requires_grad_(True) for p in _tensors(torch.float32)]
    opt = ct.AdamW(params, lr=0.1)
    for p, g in zip(params, _grads(params, 0), strict=False):
        p.grad = g
    opt.step()
    clone = copy.deepcopy({"p": params, "o": opt})
    for ps, o in ((params, opt), (clone["p"], clone["o"])):
        for p, g in zip(ps, _grads(ps, 1), strict=False):
            p.grad = g
        o.step()
    _assert_same(params, clone["p"])


def test_default_path_per_device(monkeypatch):
    """The defaults table of docs/backends/torch.md; an explicit foreach/fused always wins."""
    import types

    from cautious.backends.torch import _functional as functional
    from cautious.backends.torch import fused
    from cautious.backends.torch.fused import cpu

    on = Caution()
    cuda_like = [types.SimpleNamespace(device=torch.device("cuda", 0), is_complex=lambda: False)]
    monkeypatch.setattr(fused, "is_available", lambda device: True)
    assert functional._resolve(cuda_like, None, None, 1e-3, on) == "fused"
    assert functional._resolve(cuda_like, True, None, 1e-3, on) == "foreach"  # an explicit choice wins
    assert functional._resolve(cuda_like, None, None, 1e-3, None) != "fused"  # caution off: torch.optim's
    monkeypatch.setattr(fused, "is_available", lambda device: False)
    assert functional._resolve(cuda_like, None, False, 1e-3, on) == "single"  # as torch.optim: fused=False alone
    cpu_params = [torch.zeros(2), torch.zeros(3, dtype=torch.float64)]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(cpu, "native_available", lambda dtype, state_dtype=None: True)
    assert functional._resolve(cpu_params, None, None, 1e-3, on) == "fused"  # the native loop
    assert functional._resolve(cpu_params, None, None, 1e-3, None) == "single"  # caution off: torch.optim's
    assert functional._resolve(cpu_params, True, None, 1e-3, on) == "foreach"
    assert functional._resolve(cpu_params, None, False, 1e-3, on) == "single"
    monkeypatch.setattr(cpu, "native_available", lambda dtype, state_dtype=None: dtype == torch.float32)
    assert functional._resolve(cpu_params, None, None, 1e-3, on) == "single"  # no native float64: the loop
    assert functional._resolve(cpu_params[:1], None, None, 1e-3, on) == "fused"
    # the nonzero denominator and telemetry run fused too (native CPU and Triton)
    sparse = Caution(denominator="nonzero")
    assert functional._resolve(cpu_params[:1], None, None, 1e-3, sparse) == "fused"
    assert functional._resolve(cpu_params[:1], None, None, 1e-3, on) == "fused"
    # what the fused path refuses keeps the single-tensor default
    assert functional._resolve(cpu_params[:1], None, None, 1e-3, on, capturable=True) == "single"
    assert functional._resolve([torch.zeros(2, dtype=torch.complex64)], None, None, 1e-3, on) == "single"
    monkeypatch.setattr(fused, "is_available", lambda device: True)
    assert functional._resolve(cuda_like, None, None, 1e-3, sparse) == "fused"
    assert functional._resolve(cuda_like, None, None, 1e-3, on) == "fused"

    class Sub(torch.Tensor):  # a tensor subclass (DTensor is one) never defaults to the native kernel
        pass

    assert functional._resolve([torch.zeros(2).as_subclass(Sub)], None, None, 1e-3, on) == "single"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if fused.triton_importable():
        assert functional._resolve(cpu_params[:1], None, None, 1e-3, on) == "single"  # never the interpreter


@pytest.mark.parametrize("ours,theirs,kw", TORCH_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_caution_false_default_is_torch_optim_default_bit_for_bit(ours, theirs, kw, dtype):
    """caution=False keeps torch.optim's own path selection (the loop on CPU): identical bits."""
    a, opt_a = _run(lambda ps, fe: ours(ps, caution=False, **kw), dtype, None)
    b, opt_b = _run(lambda ps, fe: theirs(ps, **kw), dtype, None)
    _assert_same(a, b)
    for pa, pb in zip(a, b, strict=False):
        for k, v in opt_a.state[pa].items():
            torch.testing.assert_close(v, opt_b.state[pb][k], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("rule", list(RULES))
def test_cpu_default_with_caution_is_the_fused_path_when_native(rule, monkeypatch):
    """With a native kernel, the CPU default (caution on) gives exactly what fused=True gives."""
    from cautious.backends.torch.fused import cpu

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not cpu.native_available(torch.float32):
        pytest.skip("no C++ compiler: the CPU default is the single-tensor loop")

    def make(fused):
        return lambda ps, fe: {
            "adamw": ct.AdamW,
            "adam": ct.Adam,
            "lion": ct.Lion,
            "sgd": lambda p, **kw: ct.SGD(p, momentum=0.9, **kw),
        }[rule](ps, lr=0.05, caution=True, fused=fused)

    a, _ = _run(make(None), torch.float32, None)
    b, _ = _run(make(True), torch.float32, None)
    c, _ = _run(make(False), torch.float32, None)  # fused=False: the single-tensor loop
    _assert_same(a, b)
    _assert_same(a, c, exact=False)
