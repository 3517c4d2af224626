"""cautious.torch.Cautious: caution for any torch.optim.Optimizer, against spec.whole_step."""

import copy
import io

import numpy as np
import pytest
import torch

import cautious.spec as spec
import cautious.torch as ct
from cautious import Caution

CAUTIONS = [Caution(), Caution("count_plus_one", denominator="nonzero"), Caution("exact"), Caution("none")]


class SignDecay(torch.optim.Optimizer):
    """An optimizer no library ships: sign of a momentum, decoupled decay, optional maximize."""

    def __init__(self, params, lr=0.01, momentum=0.9, weight_decay=0.1, maximize=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, maximize=maximize))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad if group["maximize"] else p.grad
                buf = self.state[p].setdefault("buf", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(g)
                p.mul_(1 - group["lr"] * group["weight_decay"]).sub_(group["lr"] * torch.sign(buf))


INNERS = {
    "Adafactor": lambda ps: torch.optim.Adafactor(ps, lr=0.01, weight_decay=0.05),
    "SignDecay": lambda ps: SignDecay(ps),
    "SignDecay-maximize": lambda ps: SignDecay(ps, maximize=True),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    "Adam-maximize": lambda ps: torch.optim.Adam(ps, lr=0.01, maximize=True),
    "cautious.SGD-off": lambda ps: ct.SGD(ps, lr=0.01, momentum=0.9, caution=False),
}


def _params(rng, dtype):
    return [torch.tensor(rng.standard_normal(s), dtype=dtype, requires_grad=True) for s in [(6, 5), (7,), (3, 4, 2)]]


def _grads(rng, params):
    return [torch.tensor(rng.standard_normal(p.shape) * (rng.random(p.shape) < 0.7), dtype=p.dtype) for p in params]


def _bare_step(make, params, state_dict, grads):
    """The inner optimizer's own caution-free step from the wrapped optimizer's current state."""
    ps = [p.detach().clone().requires_grad_(True) for p in params]
    bare = make(ps)
    bare.load_state_dict(copy.deepcopy(state_dict))
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    bare.step()
    return [p.detach() for p in ps]


def _np(t):
    return t.detach().to(torch.float64).numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("caution", CAUTIONS, ids=repr)
@pytest.mark.parametrize("inner", list(INNERS))
def test_the_wrapper_is_the_spec_whole_step_of_the_inner_step(inner, caution, dtype):
    make = INNERS[inner]
    rng = np.random.default_rng(0)
    params = _params(rng, dtype)
    opt = ct.Cautious(make(params), caution, caution_stats=True)
    maximize = bool(opt.param_groups[0].get("maximize", False))
    for _ in range(3):
        grads = _grads(rng, params)
        before = [p.detach().clone() for p in params]
        nexts = _bare_step(make, params, opt.state_dict(), grads)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        stats = opt.caution_stats()
        for p, p0, q, g, st in zip(params, before, nexts, grads, stats):
            want, mask, count, scale = spec.whole_step(_np(p0), _np(q), _np(g), caution, maximize=maximize)
            assert (int(st.count), st.n, float(st.scale)) == (count, p.numel(), scale)
            got = _np(p)
            if dtype == torch.float64:  # the same float64 operations: bit for bit
                np.testing.assert_array_equal(got, want)
                continue
            # float32 delta (one rounding), then one rounding into the storage dtype (docs/conformance.md)
            delta = np.abs(_np(q) - _np(p0))
            u_store = 2.0**-24 if dtype == torch.float32 else 2.0**-8
            bound = 3 * 2.0**-24 * scale * delta + 2 * u_store * np.abs(want) + 1e-30
            assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)
            np.testing.assert_array_equal(got[~mask], _np(p0)[~mask])  # a dropped entry keeps its value


@pytest.mark.parametrize("inner", list(INNERS))
def test_caution_false_is_the_bare_optimizer_bit_for_bit(inner):
    make = INNERS[inner]
    rng = np.random.default_rng(1)
    a = _params(rng, torch.float32)
    b = [p.detach().clone().requires_grad_(True) for p in a]
    bare, wrapped = make(a), ct.Cautious(make(b), caution=False)
    for _ in range(4):
        for pa, pb, g in zip(a, b, _grads(rng, a)):
            pa.grad, pb.grad = g.clone(), g.clone()
        bare.step()
        wrapped.step()
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)


def test_drop_in_scheduler_groups_and_zero_grad():
    w = torch.nn.Parameter(torch.ones(3))
    opt = ct.Cautious(torch.optim.SGD([w], lr=1.0))
    assert opt.param_groups is opt.optimizer.param_groups and opt.state is opt.optimizer.state
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    w.grad = torch.tensor([1.0, -1.0, 0.0])
    opt.step()
    sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == 0.5
    v = torch.nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [v], "lr": 0.1})
    assert len(opt.optimizer.param_groups) == 2
    opt.zero_grad()
    assert w.grad is None
    with pytest.raises(ValueError, match="caution on"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "caution": True})


def test_state_dict_round_trips_between_bare_and_wrapped():
    rng = np.random.default_rng(2)
    a = _params(rng, torch.float32)
    wrapped = ct.Cautious(torch.optim.Adafactor(a, lr=0.01))
    for _ in range(2):
        for p, g in zip(a, _grads(rng, a)):
            p.grad = g
        wrapped.step()
    buf = io.BytesIO()
    torch.save(wrapped.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    b = [p.detach().clone().requires_grad_(True) for p in a]
    again = ct.Cautious(torch.optim.Adafactor(b, lr=0.01))
    again.load_state_dict(sd)
    bare = torch.optim.Adafactor([p.detach().clone().requires_grad_(True) for p in a], lr=0.01)
    bare.load_state_dict(sd)  # a checkpoint of the wrapper is the bare optimizer's
    grads = _grads(rng, a)
    for pa, pb, g in zip(a, b, grads):
        pa.grad, pb.grad = g.clone(), g.clone()
    wrapped.step()
    again.step()
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
    assert again.state_dict()["state"].keys() == bare.state_dict()["state"].keys()


def test_closure_params_without_grad_and_snapshot_reuse():
    w, frozen = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = ct.Cautious(torch.optim.SGD([w, frozen], lr=0.1))

    def closure():
        opt.zero_grad()
        loss = (w * torch.tensor([1.0, -2.0, 3.0])).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss.detach()) == 2.0
    assert torch.equal(frozen, torch.ones(2)) and frozen not in opt._snapshots
    snap = opt._snapshots[w]
    opt.step(closure)
    assert opt._snapshots[w] is snap  # one buffer per parameter, reused


def test_refusals_leave_everything_untouched():
    w = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="caution off"):
        ct.Cautious(ct.AdamW([w]))  # caution on by default: the mask would apply twice
    with pytest.raises(ValueError, match="already wrapped"):
        ct.Cautious(ct.Cautious(torch.optim.SGD([w], lr=0.1)))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        ct.Cautious(object())
    with pytest.raises(ValueError, match="caution_stats"):
        ct.Cautious(torch.optim.SGD([w], lr=0.1), caution=False, caution_stats=True)
    e = torch.nn.Parameter(torch.ones(4, 2))
    opt = ct.Cautious(torch.optim.SGD([w, e], lr=0.1, momentum=0.9))
    w.grad = torch.ones(3)
    e.grad = torch.sparse_coo_tensor([[0]], torch.ones(1, 2), (4, 2))
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(w, torch.ones(3)) and not opt.state
    with pytest.raises(ValueError, match="caution_stats=True"):
        opt.caution_stats()


@pytest.mark.parametrize("impl", ["single", "foreach"])
def test_wrapper_conformance_around_every_spec_rule(impl):
    from cautious.conformance.adapters.torch import TorchWrapperAdapter
    from cautious.conformance.wrapper import run_wrapper_conformance

    res = run_wrapper_conformance(TorchWrapperAdapter(impl), max_examples=40)
    assert {rule for rule, _ in res.examples} == set(spec.RULES)
    assert res.worst <= 1.0


class _InfWhereZero(torch.optim.Optimizer):
    """Steps by -g, and by +inf where g == 0: an infinite step the gradient does not direct."""

    def __init__(self, params):
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(torch.where(p.grad == 0, torch.inf, -p.grad))


def test_an_infinite_step_where_g_is_zero_is_dropped_as_the_spec_says():
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    g = torch.tensor([1.0, 0.0, -1.0, float("nan")], dtype=torch.float64)
    opt = ct.Cautious(_InfWhereZero([w]), Caution("exact"))
    w.grad = g.clone()
    opt.step()
    q = np.array([0.0, np.inf, 2.0, np.nan])
    want, mask, count, _ = spec.whole_step(np.ones(4), q, g.numpy(), Caution("exact"))
    assert mask.tolist() == [True, False, True, True] and count == 3
    np.testing.assert_array_equal(w.detach().numpy(), want)
