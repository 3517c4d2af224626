"""The PyTorch processes of test_torch_distributed.py: ``python torch_workers.py --world N --out FILE [--only RE]``.

Starts ``N`` processes with :func:`torch.multiprocessing.spawn` (gloo on 127.0.0.1, CPU, float64).
Every process runs every scenario of :mod:`scenarios` in the same order; rank 0 appends one
JSON record per scenario to ``FILE`` (``ok``, an error message, and what was measured). The
harness itself gathers tensors freely (to check them); only ``optimizer.step()`` is under test.

* ``layout-rule-normalize-path``: 20 steps of a tiny transformer whose parameters are DTensors
  (``distribute_tensor`` or FSDP2 ``fully_shard``). After every step the parameters are
  compared with the same cautious.torch optimizer on unsharded tensors fed the same gradients;
  the steps of ``SPEC_CHECKED_STEPS`` are also checked against the spec within the conformance
  bounds (:func:`cautious.conformance.check.check_step`, on the gathered tensors); the
  collectives of the first ``step()`` are counted.
* ``count-layout-rule-path``: data built so that every shard's own count gives a different
  scale than the global count; the sharded step must pass the spec check, and the same step
  taken per shard (each rank's optimizer on its plain local shard) must fail it.
* ``ddp-rule-path`` / ``zero-rule-path``: DDP, and ZeroRedundancyOptimizer with a cautious
  ``optimizer_class``, against one process on the whole batch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenarios as S  # noqa: E402

import cautious.torch as ct  # noqa: E402
from cautious import Caution, spec  # noqa: E402
from cautious.conformance.case import Case, spec_optimizer  # noqa: E402
from cautious.conformance.check import check_step  # noqa: E402

VOCAB, D, HEADS, FF, SEQ, BATCH = 7, 6, 2, 10, 5, 8
CLASSES = {
    "adam": ct.Adam,
    "adamw": ct.AdamW,
    "lion": ct.Lion,
    "sgd": ct.SGD,
    "nadam": ct.NAdam,
    "adopt": ct.Adopt,
    "laprop": ct.LaProp,
}


class TinyTransformer(nn.Module):
    """Embedding, one pre-built encoder layer (attention + MLP, no dropout), LayerNorm, head.

    Row counts 7, 18, 10 and column counts 6, 10 split unevenly over 2 and 4 ranks (6 columns
    over 4 ranks leave one rank an empty shard).
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.block = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.block(self.embed(tokens))))


def make_model() -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` (next-token prediction on random tokens), the same on every rank."""
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1000 + step))
    return tokens[:, :-1], tokens[:, 1:]


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))


def local_rows(x: torch.Tensor) -> torch.Tensor:
    """This rank's equal slice of a global batch (data parallelism)."""
    n = x.shape[0] // dist.get_world_size()
    return x[dist.get_rank() * n : (dist.get_rank() + 1) * n]


def caution_of(normalize: str) -> Caution:
    return Caution(normalize)


def make_opt(rule: str, caution: Caution, path: str, params, cls=None, **extra):
    kw = {"fused": True} if path == "fused" else {"foreach": path == "foreach"}
    hp = dict(S.HPARAMS[rule])
    if rule == "adopt":  # timm's keyword
        hp["decoupled"] = hp.pop("decoupled_weight_decay", False)
    return (cls or CLASSES[rule])(params, **hp, caution=caution, **kw, **extra)


def case_of(rule: str, caution: Caution) -> Case:
    return Case(rule, {**S.HPARAMS[rule], "caution": caution}, dtype="float64")


# -- gathering, for the checks only ------------------------------------------------------------------------


def gather(tensors: list) -> list[np.ndarray]:
    """Full float64 NumPy copies of ``tensors`` on every rank, in one collective for all of them.

    A DTensor sharded on ``dim`` is its ranks' local shards concatenated in rank order along
    ``dim`` (torch.chunk layout, uneven and empty shards included); a replicated one is rank 0's.
    """
    from torch.distributed.tensor import DTensor, Shard

    def host(t: torch.Tensor) -> np.ndarray:
        return t.detach().numpy().astype(np.float64, copy=True)

    local = [host(t.to_local()) if isinstance(t, DTensor) else None for t in tensors]
    pieces: list = [local] * dist.get_world_size()
    if any(x is not None for x in local):
        dist.all_gather_object(pieces, local)
    out = []
    for i, t in enumerate(tensors):
        if not isinstance(t, DTensor):
            out.append(host(t))
            continue
        (pl,) = t.placements
        out.append(np.concatenate([r[i] for r in pieces], axis=pl.dim) if isinstance(pl, Shard) else pieces[0][i])
    return out


STATE_FIELDS = {
    "adam": ("exp_avg", "exp_avg_sq"),
    "adamw": ("exp_avg", "exp_avg_sq"),
    "lion": ("exp_avg",),
    "nadam": ("exp_avg", "exp_avg_sq"),
    "adopt": ("exp_avg", "exp_avg_sq"),
    "laprop": ("exp_avg", "exp_avg_sq"),
}
#: per-parameter scalars outside the tensors (the same on every rank): NAdam's product of the momentum
#: schedule, LaProp's average of the learning rates
SCALAR_FIELDS = {"nadam": "mu_product", "laprop": "exp_avg_lr_1"}


def state_tensors(rule: str, opt: torch.optim.Optimizer, params: list) -> list:
    """The state tensors of ``params`` in a fixed order (see :func:`spec_state`)."""
    fields = STATE_FIELDS.get(rule, ("momentum_buffer",))
    return [opt.state[p][f] for p in params for f in fields]


def scalar_state(rule: str, opt: torch.optim.Optimizer, params: list) -> list[np.ndarray]:
    """The per-parameter scalars of :data:`SCALAR_FIELDS` (float64), in ``params`` order."""
    field = SCALAR_FIELDS.get(rule)
    return [] if field is None else [np.asarray(float(opt.state[p][field]), dtype=np.float64) for p in params]


def spec_state(
    case: Case, step: int, flat: list[np.ndarray], init: list[np.ndarray], scalars: list | None = None
) -> spec.State:
    """Gathered state tensors (:func:`state_tensors`, plus :func:`scalar_state`) as the spec's state
    (at step 0: its initial state)."""
    if step == 0:
        return spec_optimizer(case).init(init)
    if case.rule == "nadam":
        leaves = [spec.NAdamState(m, v, x) for m, v, x in zip(flat[::2], flat[1::2], scalars)]
    elif case.rule == "adopt":
        leaves = [spec.AdoptState(m, v) for m, v in zip(flat[::2], flat[1::2])]
    elif case.rule == "laprop":
        leaves = [spec.LaPropState(m, v, x) for m, v, x in zip(flat[::2], flat[1::2], scalars)]
    elif case.rule in ("adam", "adamw"):
        leaves = [spec.AdamState(m, v, None) for m, v in zip(flat[::2], flat[1::2])]
    elif case.rule == "lion":
        leaves = [spec.LionState(m) for m in flat]
    else:
        leaves = [spec.SGDState(m) for m in flat]
    return spec.State(step, tuple(leaves))


def comm_counts(fn) -> dict[str, int]:
    """The collectives ``fn()`` issues, by op name (c10d and functional collectives)."""
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as cm:
        fn()
    return {str(k): v for k, v in cm.get_comm_counts().items()}


def placement(layout: str, p: torch.Tensor):
    from torch.distributed.tensor import Replicate, Shard

    if layout == "replicate":
        return Replicate()
    return Shard(min(1 if layout == "shard1" else 0, p.dim() - 1))


def distribute(mesh, x: torch.Tensor, placements) -> torch.Tensor:
    """``x`` (the same full tensor on every rank) as a DTensor, by slicing locally (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(x.detach().clone(), mesh, placements, src_data_rank=None)


# -- scenarios ---------------------------------------------------------------------------------------------


def trajectory(mesh, layout: str, rule: str, normalize: str, path: str) -> dict:
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    caution = caution_of(normalize)
    case = case_of(rule, caution)
    model = make_model()
    ref = [nn.Parameter(p.detach().clone()) for p in model.parameters()]  # unsharded, fed the same gradients
    opt_ref = make_opt(rule, caution, path, ref)
    if layout == "fsdp2":
        fully_shard(model.block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        params = list(model.parameters())
    else:
        params = [nn.Parameter(distribute(mesh, p, [placement(layout, p)])) for p in model.parameters()]
    opt = make_opt(rule, caution, path, params)
    worst, diff, comm, checked, failure = 0.0, 0.0, {}, [], None
    before = gather(params)
    state = spec_state(case, 0, [], before)
    n = len(params)
    for step in range(S.STEPS):
        x, y = batch(step)
        if layout == "fsdp2":  # data parallel: FSDP2 reduce-scatters the mean gradient
            loss_fn(model, local_rows(x), local_rows(y)).backward()
        else:  # gradients of the whole model at the sharded parameters, then sharded like them
            with torch.no_grad():
                for d, p in zip(model.parameters(), before):
                    d.copy_(torch.from_numpy(p))
            model.zero_grad()
            loss_fn(model, x, y).backward()
            for p, d in zip(params, model.parameters()):
                p.grad = distribute(mesh, d.grad, p.placements)
        grad_list = [p.grad for p in params]
        if step == 0:
            comm = comm_counts(opt.step)
        else:
            opt.step()
        flat = gather(grad_list + params + state_tensors(rule, opt, params))
        opt.zero_grad()
        grads, after = flat[:n], flat[n : 2 * n]
        for r, g in zip(ref, grads):
            r.grad = torch.from_numpy(g)
        opt_ref.step()
        diff = max([diff] + [float(np.max(np.abs(a - r.detach().numpy()), initial=0.0)) for a, r in zip(after, ref)])
        new_state = spec_state(case, step + 1, flat[2 * n :], after, scalar_state(rule, opt, params))
        if step + 1 in S.SPEC_CHECKED_STEPS and len(checked) % world == rank:  # the ranks share the checks
            report = check_step(case, before, grads, state, after, new_state)
            if not report.ok and failure is None:  # raised after the loop: every rank runs every collective
                failure = f"step {step + 1}: {report.mismatches[0]}"
            worst = max(worst, report.worst)
        if step + 1 in S.SPEC_CHECKED_STEPS:
            checked.append(step + 1)
        before, state = after, new_state
    worst = reduce_max(worst)
    if failure is not None:
        raise AssertionError(failure)
    sharded = layout != "replicate" and normalize != "none"
    return {
        "worst": worst,
        "checked_steps": checked,
        "max_diff": diff,
        "comm": comm,
        "expect_all_reduce": int(sharded),
    }


def reduce_max(x: float) -> float:
    t = torch.tensor(x)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def global_count(mesh, layout: str, rule: str, path: str) -> dict:
    """Two steps on a (7, 6) tensor: ``g = 1``, then ``g = -0.05`` at index >= 2 along the shard dimension.

    The second step's direction still points along the first gradient, so exactly the entries at
    index < 2 are kept: all of them on rank 0's shard, none on the others. Per-shard counts then
    give rank 0 a scale near 1 and the global count a scale of about 3 (``exact``: 42 / 14).
    """
    from torch.distributed.tensor import Shard

    caution = Caution("exact")
    case = case_of(rule, caution)
    dim = 0 if layout == "shard0" else 1
    idx = torch.arange(6 if dim else 7).reshape((1, 6) if dim else (7, 1)).expand(7, 6)
    g2 = torch.where(idx >= 2, -0.05, 1.0)
    p0 = torch.linspace(-1.0, 1.0, 42).reshape(7, 6)
    sharded = nn.Parameter(distribute(mesh, p0, [Shard(dim)]))
    local = nn.Parameter(sharded.to_local().detach().clone())  # the same step taken per shard
    opts = [make_opt(rule, caution, path, [sharded]), make_opt(rule, caution, path, [local])]
    state = spec_state(case, 0, [], [p0.numpy()])
    results = {}
    for step, g in enumerate((torch.ones(7, 6), g2)):
        (before,) = gather([sharded])
        sharded.grad = distribute(mesh, g, [Shard(dim)])
        local.grad = sharded.grad.to_local().clone()
        for o in opts:
            o.step()
        (after,) = gather([sharded])
        new_state = spec_state(case, step + 1, gather(state_tensors(rule, opts[0], [sharded])), [after])
        pieces = [None] * dist.get_world_size()
        dist.all_gather_object(pieces, local.detach().numpy().copy())
        per_shard = np.concatenate(pieces, axis=dim)
        if dist.get_rank() == 0:
            results[step] = (
                check_step(case, [before], [g.numpy()], state, [after], new_state),
                check_step(case, [before], [g.numpy()], state, [per_shard], None),
            )
        with torch.no_grad():  # the per-shard run continues from the sharded run's state
            local.copy_(sharded.to_local())
        state = new_state
    out: dict = {}
    if dist.get_rank() == 0:
        good, bad = results[1]
        assert results[0][0].ok, f"step 1: {results[0][0].mismatches[0]}"
        assert good.ok, f"step 2: {good.mismatches[0]}"
        out["per_shard_detected"] = not bad.ok
        out["per_shard_mismatch"] = str(bad.mismatches[0]) if bad.mismatches else ""
    return out


def wrapped(mesh, kind: str, rule: str, path: str) -> dict:
    """DDP (or DDP + ZeroRedundancyOptimizer), each rank on its slice of the batch, vs one process.

    The one-process optimizer takes the same (all-reduced) gradients, so the two must agree
    step for step; every rank must hold the same parameters.
    """
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    caution = Caution()
    model = DDP(make_model())
    ref = [nn.Parameter(p.detach().clone()) for p in model.parameters()]
    opt_ref = make_opt(rule, caution, path, ref)
    if kind == "zero":
        kw = {"fused": True} if path == "fused" else {"foreach": path == "foreach"}
        opt = ZeroRedundancyOptimizer(
            model.parameters(), optimizer_class=CLASSES[rule], **S.RULES[rule], caution=caution, **kw
        )
        owned = sum(p.numel() for g in opt.optim.param_groups for p in g["params"])
    else:
        opt = make_opt(rule, caution, path, model.parameters())
        owned = sum(p.numel() for p in model.parameters())
    diff, losses = 0.0, []
    for step in range(S.STEPS):
        x, y = batch(step)
        loss = loss_fn(model, local_rows(x), local_rows(y))
        loss.backward()
        losses.append(float(loss))
        for r, p in zip(ref, model.parameters()):
            r.grad = p.grad.detach().clone()
        opt.step()
        opt.zero_grad()
        opt_ref.step()
        diff = max([diff] + [float((p - r).abs().max()) for p, r in zip(model.parameters(), ref)])
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    lo, hi = got.clone(), got.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    total = sum(p.numel() for p in model.parameters())
    return {
        "max_diff": diff,
        "rank_spread": float((hi - lo).abs().max()),
        "owned_fraction": owned / total,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def refuse_2d_mesh(path: str) -> dict:
    """A 2-d mesh (HSDP's layout): the step refuses with a message naming the limit, changing nothing."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    mesh = init_device_mesh("cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("replicate", "shard"))
    p = nn.Parameter(distribute(mesh, torch.ones(4, 3), [Replicate(), Shard(0)]))
    p.grad = distribute(mesh, torch.ones(4, 3), [Replicate(), Shard(0)])
    before = p.to_local().clone()
    try:
        make_opt("adamw", Caution(), path, [p]).step()
    except NotImplementedError as e:
        assert "1-d device mesh" in str(e) and "2-d mesh" in str(e), str(e)
        assert torch.equal(p.to_local(), before)
        return {"message": str(e)}
    raise AssertionError("a 2-d mesh was not refused")


def nonzero_denominator(mesh, rule: str, path: str) -> dict:
    """``Caution(denominator="nonzero")`` with telemetry, two steps on a (7, 6) tensor sharded on rows.

    Rank 0 holds rows 0-3, whose gradient is zero but for row 0; the other rows are dense. The
    scale's ``n`` is then far from each shard's own: summing only the counts, or not summing the
    denominators, changes the step. The sharded optimizer must equal the same optimizer on the
    whole tensor, report the reference's ``Optimizer.stats`` (count, n = 42, scale) and issue one
    all-reduce per step (the counts and the denominators together).
    """
    from torch.distributed.tensor import Shard

    caution = Caution(denominator="nonzero")
    rows = torch.arange(7.0).reshape(7, 1).expand(7, 6)
    cols = torch.arange(6.0).reshape(1, 6).expand(7, 6)
    g1 = torch.where(rows == 0, 1.0, torch.where(rows >= 4, 0.5 - cols / 4, 0.0))
    g2 = torch.where(rows == 0, -0.3 + cols / 10, torch.where(rows >= 4, 1.0 - rows / 5, 0.0))
    p0 = torch.linspace(-1.0, 1.0, 42).reshape(7, 6)
    sharded = nn.Parameter(distribute(mesh, p0, [Shard(0)]))
    whole = nn.Parameter(p0.clone())
    opt = make_opt(rule, caution, path, [sharded], caution_stats=True)
    opt_whole = make_opt(rule, caution, path, [whole], caution_stats=True)
    ref = spec_optimizer(case_of(rule, caution))
    rparams = [p0.numpy().copy()]
    rstate = ref.init(rparams)
    comm, diff, spec_diff, got, want = {}, 0.0, 0.0, [], []
    for step, g in enumerate((g1, g2)):
        sharded.grad = distribute(mesh, g, [Shard(0)])
        whole.grad = g.clone()
        want.append([list(s) for s in ref.stats(rparams, [g.numpy()], rstate)])
        rparams, rstate = ref.step(rparams, [g.numpy()], rstate)
        if step == 0:
            comm = comm_counts(opt.step)
        else:
            opt.step()
        opt_whole.step()
        (after,) = gather([sharded])
        diff = max(diff, float(np.max(np.abs(after - whole.detach().numpy()))))
        spec_diff = max(spec_diff, float(np.max(np.abs(after - rparams[0]))))
        stats = [opt.caution_stats()[0], opt_whole.caution_stats()[0]]
        got.append([None if s is None else [int(s.count), int(s.n), float(s.scale)] for s in stats])
    return {"comm": comm, "max_diff": diff, "spec_diff": spec_diff, "stats": got, "want": want}


def fused_backend() -> str:
    """The implementation ``fused=True`` runs on the CPU here: ``"cpu"`` (native or eager) or ``"triton"``."""
    from cautious.backends.torch import fused

    return fused.backend_for(torch.device("cpu"))


def run_one(mesh, sid: str) -> dict:
    kind, *rest = sid.split("-")
    if kind == "refuse":
        return refuse_2d_mesh("foreach")
    if kind == "count":
        return global_count(mesh, *rest)
    if kind in ("ddp", "zero"):
        return wrapped(mesh, kind, *rest)
    if kind == "nonzero":
        return nonzero_denominator(mesh, *rest)
    return trajectory(mesh, kind, *rest)


def all_ids(world: int) -> list[str]:
    """Scenario order: the fused paths last (a crash in native code then loses the fewest records)."""
    ids = S.refusal_ids(world) + S.wrapper_ids(world) + S.global_count_ids(world) + S.trajectory_ids(world)
    ids += S.nonzero_ids(world) + S.more_rule_ids(world)
    return sorted(ids, key=lambda s: s.endswith("-fused"))


def rank_main(rank: int, world: int, port: int, out: str, only: str | None, triton: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (world,))
    for sid in S.triton_ids() if triton else all_ids(world):
        if only and not re.search(only, sid):
            continue
        start = time.perf_counter()
        try:
            rec = {"id": sid, "ok": True, **run_one(mesh, sid), "fused_backend": fused_backend()}
        except Exception as e:
            rec = {"id": sid, "ok": False, "error": f"rank {rank}: {type(e).__name__}: {e}"[:1500]}
            rec["traceback"] = traceback.format_exc()[-3000:]
        rec["seconds"] = round(time.perf_counter() - start, 3)
        recs: list = [None] * world
        dist.all_gather_object(recs, rec)
        if rank == 0:
            failed = [r for r in recs if not r["ok"]]
            with open(out, "a") as f:
                f.write(json.dumps(failed[0] if failed else rec) + "\n")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default=None, help="run only the scenarios whose id matches this regex")
    ap.add_argument(
        "--triton",
        action="store_true",
        help="the Triton scenarios (fused=True runs the Triton kernels: TRITON_INTERPRET=1)",
    )
    args = ap.parse_args()
    Path(args.out).unlink(missing_ok=True)
    (port,) = S.free_ports(1)
    if args.triton:  # before any process imports triton: the fused path on the CPU then runs the Triton kernels
        os.environ["TRITON_INTERPRET"] = "1"
    mp.spawn(rank_main, args=(args.world, port, args.out, args.only, args.triton), nprocs=args.world)


if __name__ == "__main__":
    main()
