"""torch.optim behaviour users rely on: groups, checkpoints, closures, schedulers, dtypes, compile, pickle."""

import copy
import io
import pickle
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import cautious.torch as ct
from cautious import Caution


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _loss(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=gen)
    y = torch.randn(16, 1, generator=gen)
    return torch.nn.functional.mse_loss(model(x), y)


def _train(model, opt, steps, seed0=1):
    for s in range(steps):
        opt.zero_grad()
        _loss(model, seed0 + s).backward()
        opt.step()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_public_module_exports():
    import cautious.backends.torch as backend

    for name in ("AdamW", "Adam", "Lion", "SGD", "Caution"):
        assert getattr(ct, name) is getattr(backend, name)
    assert ct.Caution is Caution
    assert issubclass(ct.AdamW, torch.optim.Optimizer)


def test_import_error_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "try:\n    import cautious.torch\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "cautious.torch needs PyTorch: pip install 'cautious[torch]'"


def test_param_groups_have_their_own_caution_options():
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = ct.SGD([{"params": [w]}, {"params": [b], "caution": False, "lr": 0.5}], lr=1.0)
    assert opt.param_groups[0]["caution"] == asdict(Caution())
    assert opt.param_groups[1]["caution"] is None  # "off" is spelled None inside
    g = torch.tensor([1.0, -1.0, 2.0, 0.0], dtype=torch.float64)
    w.grad, b.grad = g.clone(), g.clone()
    opt.step()
    # group 1: plain SGD with lr 0.5; group 0: cautious, all nonzero entries kept (k=3, n=4)
    torch.testing.assert_close(b.detach(), -0.5 * g)
    torch.testing.assert_close(w.detach(), -g * (4 / 3))


def test_add_param_group_validates_its_options():
    opt = ct.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="lr must be"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": -1.0})
    with pytest.raises(TypeError, match="caution"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "caution": "yes"})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "caution": Caution("exact")})
    assert opt.param_groups[1]["caution"] == asdict(Caution("exact"))


def test_state_names_are_torchs():
    model = _model()
    for opt, names in (
        (ct.AdamW(model.parameters()), {"step", "exp_avg", "exp_avg_sq"}),
        (ct.Adam(model.parameters(), amsgrad=True), {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
        (ct.SGD(model.parameters(), momentum=0.9), {"momentum_buffer"}),
        (ct.Lion(model.parameters()), {"step", "exp_avg"}),
    ):
        _train(model, opt, 1)
        sd = opt.state_dict()
        assert all(set(s) == names for s in sd["state"].values())


@pytest.mark.parametrize(
    "ours,theirs,kw",
    [
        (ct.AdamW, torch.optim.AdamW, {"lr": 0.01, "amsgrad": True}),
        (ct.Adam, torch.optim.Adam, {"lr": 0.01}),
        (ct.SGD, torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
    ],
)
def test_torch_checkpoint_loads_into_ours_and_back(ours, theirs, kw):
    model = _model()
    torch_opt = theirs(model.parameters(), **kw)
    _train(model, torch_opt, 3)
    sd = copy.deepcopy(torch_opt.state_dict())

    # torch -> ours: same state, and caution stays on (the constructor's setting is authoritative)
    m2 = copy.deepcopy(model)
    our = ours(m2.parameters(), **kw)
    our.load_state_dict(copy.deepcopy(sd))
    assert our.param_groups[0]["caution"] == asdict(Caution())
    for k, v in our.state_dict()["state"].items():
        for name, t in v.items():
            torch.testing.assert_close(t, sd["state"][k][name])

    # with caution=False, continuing from the torch checkpoint matches torch bit for bit
    m3 = copy.deepcopy(model)
    plain = ours(m3.parameters(), caution=False, **kw)
    plain.load_state_dict(copy.deepcopy(sd))
    _train(m3, plain, 2, seed0=10)
    _train(model, torch_opt, 2, seed0=10)
    for a, b in zip(model.parameters(), m3.parameters(), strict=False):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # ours -> torch
    back = theirs(copy.deepcopy(m3).parameters(), **kw)
    back.load_state_dict(copy.deepcopy(plain.state_dict()))
    for k, v in back.state_dict()["state"].items():
        for name, t in v.items():
            torch.testing.assert_close(t, plain.state_dict()["state"][k][name])


def test_loading_a_checkpoint_never_changes_caution():
    model = _model()
    a = ct.AdamW(model.parameters(), caution=False, eps_placement="uncorrected")
    _train(model, a, 1)
    b = ct.AdamW(model.parameters(), caution=Caution("exact"), cautious_weight_decay=True)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    g = b.param_groups[0]
    assert g["caution"] == asdict(Caution("exact"))
    assert g["eps_placement"] == "corrected"
    assert g["cautious_weight_decay"] is True


def test_checkpoint_round_trip_continues_bit_identically(tmp_path):
    for make in (
        lambda ps: ct.AdamW(ps, lr=0.01, amsgrad=True),
        lambda ps: ct.Lion(ps, lr=1e-3, weight_decay=0.1),
        lambda ps: ct.SGD(ps, lr=0.01, momentum=0.9, nesterov=True),
    ):
        model = _model()
        opt = make(model.parameters())
        _train(model, opt, 3)
        path = tmp_path / "ckpt.pt"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
        ck = torch.load(path, weights_only=True)  # a Caution in the groups loads with weights_only
        model2 = _model(seed=5)
        model2.load_state_dict(ck["model"])
        opt2 = make(model2.parameters())
        opt2.load_state_dict(ck["opt"])
        _train(model, opt, 3, seed0=20)
        _train(model2, opt2, 3, seed0=20)
        for a, b in zip(model.parameters(), model2.parameters(), strict=False):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_closure_zero_grad_and_none_grads():
    model = _model()
    frozen = torch.nn.Parameter(torch.ones(3))  # never gets a gradient
    opt = ct.AdamW([*model.parameters(), frozen], lr=0.01)

    def closure():
        opt.zero_grad()
        loss = _loss(model)
        loss.backward()
        return loss

    loss0 = opt.step(closure)
    assert isinstance(loss0, torch.Tensor)
    assert frozen.grad is None and torch.equal(frozen.detach(), torch.ones(3))
    assert frozen not in opt.state
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_maximize_is_descent_on_the_negative():
    m1, m2 = _model(), _model()
    o1 = ct.AdamW(m1.parameters(), lr=0.01, maximize=True)
    o2 = ct.AdamW(m2.parameters(), lr=0.01)
    for s in range(3):
        o1.zero_grad()
        o2.zero_grad()
        (-_loss(m1, s)).backward()
        _loss(m2, s).backward()
        o1.step()
        o2.step()
    for a, b in zip(m1.parameters(), m2.parameters(), strict=False):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("foreach", [None, False, True])
def test_tensor_lr_and_scheduler(foreach):
    m1, m2 = _model(), _model()
    o1 = ct.AdamW(m1.parameters(), lr=torch.tensor(0.01), foreach=foreach)
    o2 = ct.AdamW(m2.parameters(), lr=0.01, foreach=foreach)
    s1 = torch.optim.lr_scheduler.StepLR(o1, step_size=1, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(o2, step_size=1, gamma=0.5)
    for s in range(3):
        for m, o, sch in ((m1, o1, s1), (m2, o2, s2)):
            o.zero_grad()
            _loss(m, s).backward()
            o.step()
            sch.step()
    assert torch.is_tensor(o1.param_groups[0]["lr"])
    assert float(o1.param_groups[0]["lr"]) == pytest.approx(0.01 / 8)
    for a, b in zip(m1.parameters(), m2.parameters(), strict=False):
        torch.testing.assert_close(a, b)


def test_cosine_scheduler_changes_the_step():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = ct.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0 if s >= 1 else 1.0)
    p.grad = torch.ones(3)
    opt.step()
    sched.step()
    before = p.detach().clone()
    opt.step()
    assert torch.equal(before, p.detach())


def test_non_contiguous_params():
    base = torch.randn(6, 4, dtype=torch.float64)
    p_nc = torch.nn.Parameter(base.t().contiguous().t())  # transposed storage: non-contiguous
    assert not p_nc.is_contiguous()
    p_c = torch.nn.Parameter(base.clone())
    g = torch.randn(6, 4, dtype=torch.float64)
    for foreach in (False, True):
        a, b = (
            p_nc.detach().clone().t().contiguous().t().requires_grad_(),
            p_c.detach().clone().requires_grad_(),
        )
        oa, ob = ct.AdamW([a], lr=0.1, foreach=foreach), ct.AdamW([b], lr=0.1, foreach=foreach)
        for _ in range(2):
            a.grad, b.grad = g.clone(), g.clone()
            oa.step()
            ob.step()
        torch.testing.assert_close(a, b)


def test_integer_params_are_rejected():
    with pytest.raises(ValueError, match="floating-point"):
        ct.SGD([torch.zeros(2, dtype=torch.int64)])


def test_sparse_grads_are_rejected_before_anything_changes():
    dense = torch.nn.Parameter(torch.ones(3))
    emb = torch.nn.Parameter(torch.ones(4, 2))
    opt = ct.AdamW([dense, emb], lr=0.1)
    dense.grad = torch.ones(3)
    emb.grad = torch.sparse_coo_tensor([[0]], torch.ones(1, 2), (4, 2))
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(dense.detach(), torch.ones(3))
    assert len(opt.state) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls", [ct.AdamW, ct.Lion, ct.SGD])
def test_low_precision_params_train(dtype, cls):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, dtype=dtype))
    # eps=1e-8 is 0 in float16 (torch.optim.AdamW diverges there too): use a float16-sized eps
    opt = cls([p], lr=1e-2, eps=1e-4) if cls is ct.AdamW else cls([p], lr=1e-2)
    target = torch.randn(64, dtype=dtype)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = ((p.float() - target.float()) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert p.dtype == dtype
        assert all(t.dtype == dtype for t in opt.state[p].values() if t.dim() > 0)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_of_a_training_step(backend):
    torch._dynamo.reset()
    m1, m2 = _model(), _model()
    o1 = ct.AdamW(m1.parameters(), lr=0.01)
    o2 = ct.AdamW(m2.parameters(), lr=0.01)

    def train_step(model, opt, seed):
        opt.zero_grad()
        loss = _loss(model, seed)
        loss.backward()
        opt.step()
        return loss

    compiled = torch.compile(train_step, backend=backend)
    for s in range(3):
        compiled(m1, o1, s)
        train_step(m2, o2, s)
    for a, b in zip(m1.parameters(), m2.parameters(), strict=False):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cls", [ct.AdamW, ct.Adam, ct.Lion, ct.SGD])
def test_pickle_and_deepcopy(cls):
    model = _model()
    opt = cls(model.parameters(), lr=0.01, caution=Caution("count_plus_one"))
    _train(model, opt, 2)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert type(clone) is cls
        assert clone.param_groups[0]["caution"] == asdict(Caution("count_plus_one"))
        assert set(map(str, clone.state_dict()["state"])) == set(map(str, opt.state_dict()["state"]))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["param_groups"][0]["caution"] == asdict(Caution("count_plus_one"))


def test_fused_and_foreach_together_is_an_error():
    with pytest.raises(RuntimeError, match="cannot be `True` together"):
        ct.AdamW([torch.nn.Parameter(torch.zeros(2))], foreach=True, fused=True)


def test_capturable_with_fused_and_differentiable_are_declined():
    with pytest.raises(ValueError, match="capturable=True with fused=True"):
        ct.AdamW([torch.nn.Parameter(torch.zeros(2))], capturable=True, fused=True)
    with pytest.raises(ValueError, match="differentiable"):
        ct.SGD([torch.nn.Parameter(torch.zeros(2))], differentiable=True)


def test_fused_matches_foreach_when_available():
    try:
        from cautious.backends.torch import fused
    except ImportError as e:
        pytest.skip(f"cautious.backends.torch.fused cannot be imported: {e}")
    if not fused.is_available(torch.device("cpu")):
        pytest.skip("_fused says it is not available on cpu")
    for make in (
        lambda ps, **kw: ct.AdamW(ps, lr=0.01, **kw),
        lambda ps, **kw: ct.Lion(ps, lr=1e-3, weight_decay=0.1, **kw),
        lambda ps, **kw: ct.SGD(ps, lr=0.01, momentum=0.9, **kw),
    ):
        m1, m2 = _model(), _model()
        o1, o2 = make(m1.parameters(), fused=True), make(m2.parameters(), foreach=True)
        _train(m1, o1, 3)
        _train(m2, o2, 3)
        for a, b in zip(m1.parameters(), m2.parameters(), strict=False):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
