"""CPU benchmark: fused cautious AdamW against torch.optim.AdamW(fused=True) (and foreach).

A transformer-shaped list of float32 tensors (default d=512, 4 layers, vocab 32000, 1024
positions: 29.5M parameters in 52 tensors). Every contender updates its own copy; runs
alternate A, B, A, B... in one process and the script reports medians and the ratio of
medians. The floor for an exact cautious AdamW is 36/28 = 1.29x a plain fused AdamW (the
count pass re-reads g and m). Never asserts on time.

    python benchmarks/bench_fused_cpu.py [--steps 30] [--d 512 --layers 4 --vocab 32000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # the CPU fast path, not the Triton interpreter

import torch  # noqa: E402
from _shapes import transformer  # noqa: E402

from cautious import Caution  # noqa: E402
from cautious.backends.torch import fused  # noqa: E402
from cautious.backends.torch.fused import cpu as fused_cpu  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per contender (after 3 warm-up)")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--positions", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sh = transformer(args.d, args.layers, args.vocab, args.positions)
    n = sum(torch.Size(s).numel() for s in sh)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {n / 1e6:.1f}M float32 parameters "
        f"in {len(sh)} tensors; native kernel: {fused_cpu.native_available()}"
    )
    base_p = [torch.randn(s) * 0.02 for s in sh]
    grads = [torch.randn(s) * 1e-3 for s in sh]

    def torch_opt(**kw):
        ps = [p.clone().requires_grad_() for p in base_p]
        for p, g in zip(ps, grads, strict=False):
            p.grad = g.clone()
        opt = torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, **kw)
        return opt.step

    def ours(caution):
        ps = [p.clone() for p in base_p]
        ms = [torch.zeros_like(p) for p in ps]
        vs = [torch.zeros_like(p) for p in ps]
        state = {"t": 0}

        def step():
            state["t"] += 1
            fused.fused_adam_(
                ps,
                grads,
                ms,
                vs,
                None,
                step=state["t"],
                lr=1e-3,
                beta1=0.9,
                beta2=0.999,
                eps=1e-8,
                weight_decay=0.01,
                decoupled=True,
                amsgrad=False,
                maximize=False,
                caution=caution,
                eps_placement="corrected",
                cautious_weight_decay=False,
            )

        return step

    src = torch.randn(n)
    dst = torch.empty_like(src)
    contenders = {
        "torch AdamW fused": torch_opt(fused=True),
        "torch AdamW foreach": torch_opt(foreach=True),
        "ours cautious AdamW": ours(Caution()),
        "ours AdamW caution=None": ours(None),
        "copy (8 B/param)": lambda: dst.copy_(src),
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    t_start = time.perf_counter()
    for i in range(args.steps + 3):
        for name, fn in contenders.items():
            t = time.perf_counter()
            fn()
            dt = time.perf_counter() - t
            if i >= 3:
                times[name].append(dt)
        if time.perf_counter() - t_start > 150:
            print("(stopping early: 150 s budget)")
            break
    med = {k: statistics.median(v) for k, v in times.items() if v}
    ref = med["torch AdamW fused"]
    print(f"{'contender':28s} {'median ms':>10s} {'ratio':>7s} {'GB/s':>8s}")
    basis = {"copy (8 B/param)": 8, "ours cautious AdamW": 36}
    for k, v in med.items():
        gbs = basis.get(k, 28) * n / v / 1e9
        print(f"{k:28s} {v * 1e3:10.2f} {v / ref:7.2f} {gbs:8.1f}")
    print(
        f"ratio cautious fused / torch fused AdamW: {med['ours cautious AdamW'] / ref:.2f}x "
        f"(floor 1.29x; {len(times['ours cautious AdamW'])} alternating samples each)"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
