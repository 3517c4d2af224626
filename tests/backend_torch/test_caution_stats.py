"""torch telemetry (`caution_stats=True`, `opt.caution_stats()`) and the sparse denominator, against the reference."""

import numpy as np
import pytest
import torch

import cautious.spec as spec
import cautious.torch as ct
from cautious import Caution

CAUTIONS = [Caution(), Caution("count_plus_one", denominator="nonzero"), Caution("exact"), Caution("none")]
RULES = {
    "AdamW": (lambda ps, c, kw: ct.AdamW(ps, lr=0.01, weight_decay=0.01, caution=c, caution_stats=True, **kw),
              lambda c: spec.adamw(lr=0.01, weight_decay=0.01, caution=c)),
    "Lion": (lambda ps, c, kw: ct.Lion(ps, lr=0.01, weight_decay=0.1, caution=c, caution_stats=True, **kw),
             lambda c: spec.lion(lr=0.01, weight_decay=0.1, caution=c)),
    "SGD": (lambda ps, c, kw: ct.SGD(ps, lr=0.01, momentum=0.9, caution=c, caution_stats=True, **kw),
            lambda c: spec.sgd(lr=0.01, momentum=0.9, caution=c)),
}  # fmt: skip


#: every path; fused=True is the native CPU kernel (or its eager fallback without a compiler)
PATHS = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("caution", CAUTIONS, ids=repr)
@pytest.mark.parametrize("rule", list(RULES))
def test_stats_and_steps_match_the_reference(rule, caution, path):
    make, ref_make = RULES[rule]
    rng = np.random.default_rng(0)
    p0 = [rng.standard_normal((6, 5)), rng.standard_normal(7)]
    params = [torch.tensor(p, requires_grad=True) for p in p0]
    opt, ref = make(params, caution, PATHS[path]), ref_make(caution)
    rparams, rstate = p0, ref.init(p0)
    for _ in range(3):
        grads = [rng.standard_normal(p.shape) * (rng.random(p.shape) < 0.6) for p in p0]  # exact zeros too
        want = ref.stats(rparams, grads, rstate)
        rparams, rstate = ref.step(rparams, grads, rstate)
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g)
        opt.step()
        got = [(int(s.count), s.n, float(s.scale)) for s in opt.caution_stats()]
        assert got == [tuple(s) for s in want]
    for p, r in zip(params, rparams):
        np.testing.assert_allclose(p.detach().numpy(), r, rtol=0, atol=1e-12)


def test_stats_are_opt_in_and_never_in_the_state_dict():
    p = torch.nn.Parameter(torch.ones(3))
    plain, with_stats = ct.AdamW([p], lr=0.1), ct.AdamW([p], lr=0.1, caution_stats=True)
    p.grad = torch.tensor([1.0, -1.0, 0.0])
    plain.step()
    with_stats.step()
    assert plain.state_dict()["param_groups"][0].keys() == with_stats.state_dict()["param_groups"][0].keys()
    with pytest.raises(ValueError, match="caution_stats=True"):
        plain.caution_stats()
    (s,) = with_stats.caution_stats()
    assert isinstance(s.count, torch.Tensor) and s.count.dtype == torch.int64 and int(s.count) == 2 and s.n == 3
    with pytest.raises(ValueError, match="caution_stats=True needs caution on"):
        ct.Lion([p], caution=False, caution_stats=True)
    with pytest.raises(TypeError, match="caution_stats must be a bool"):
        ct.SGD([p], lr=0.1, caution_stats=1)


def test_nonzero_denominator_does_not_inflate_a_sparse_embedding_step():
    """The issue's case: torch.nn.Embedding(1000, 8), 10 rows per batch, lr 1e-3, 3 steps."""
    moved = {}
    for name, caution in (("plain", False), ("size", Caution()), ("nonzero", Caution(denominator="nonzero"))):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(1000, 8)
        w0 = emb.weight.detach().clone()
        opt = ct.AdamW(emb.parameters(), lr=1e-3, weight_decay=0.0, caution=caution)
        for _ in range(3):
            opt.zero_grad()
            emb(torch.randperm(1000)[:10]).pow(2).sum().backward()
            opt.step()
        moved[name] = float((emb.weight.detach() - w0).abs().max())
    assert moved["size"] == pytest.approx(0.1, rel=1e-3) and moved["plain"] < 0.0035
    assert moved["nonzero"] == pytest.approx(1e-3, rel=1e-3)


def test_fused_path_runs_the_nonzero_denominator():
    """fused=True with denominator='nonzero' (formerly refused): n counts g's nonzero entries."""
    p = torch.nn.Parameter(torch.ones(4))
    opt = ct.SGD([p], lr=0.5, caution=Caution(denominator="nonzero"), caution_stats=True, fused=True)
    p.grad = torch.tensor([1.0, -1.0, 0.0, 0.0])
    opt.step()  # u = g: kept 2 of 4, n = 2 nonzero: scale 1 (with denominator="size" it would be 2)
    (s,) = opt.caution_stats()
    assert (int(s.count), s.n, float(s.scale)) == (2, 4, 1.0)
    assert p.detach().tolist() == [0.5, 1.5, 1.0, 1.0]
