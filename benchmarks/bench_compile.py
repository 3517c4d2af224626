"""Compiled vs eager step time of AdamW: cautious.torch.AdamW and torch.optim.AdamW, foreach.

Each variant owns a copy of the same parameters and gradients. ``compiled`` variants run
``torch.compile(opt.step)`` (inductor unless ``--backend``); the first calls compile and are
not timed. Then each round runs every variant once, in a rotated order (alternating A/B in
one process), and the report gives the median step time, its ratio to eager
``torch.optim.AdamW(foreach=True)`` and the compiled speed-up over the same optimizer eager.
Never asserts on time.

    .venv/bin/python benchmarks/bench_compile.py
    .venv/bin/python benchmarks/bench_compile.py --d-model 512 --layers 4 --iters 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import cautious.torch as ct


def transformer_shapes(vocab: int, d: int, layers: int) -> list[tuple[int, ...]]:
    """Embedding, per layer (norms, qkv, out projection, MLP up/down with biases), final norm."""
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


OPTIMIZERS = {
    "torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    "cautious AdamW": lambda ps: ct.AdamW(ps, lr=1e-3, foreach=True),
    "cautious AdamW caution=False": lambda ps: ct.AdamW(ps, lr=1e-3, foreach=True, caution=False),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--iters", type=int, default=30, help="timed rounds (each runs every variant once)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed compiled calls (the first compiles)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    shapes = transformer_shapes(args.vocab, args.d_model, args.layers)
    n = sum(torch.Size(s).numel() for s in shapes)
    print(f"torch {torch.__version__}, cpu, threads {torch.get_num_threads()}, backend {args.backend}")
    print(f"{len(shapes)} tensors, {n / 1e6:.1f}M fp32 parameters; {args.iters} rounds")
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]

    steps = {}
    for name, make in OPTIMIZERS.items():
        for mode in ("eager", "compiled"):
            ps = [torch.nn.Parameter(b.clone()) for b in base]
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
            opt = make(ps)
            step = torch.compile(opt.step, backend=args.backend) if mode == "compiled" else opt.step
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                step()
            print(f"  {name} {mode}: first {args.warmup} calls {time.perf_counter() - t0:.1f} s")
            steps[f"{name} {mode}"] = step

    names = list(steps)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.iters):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["torch AdamW eager"])
    print(f"{'variant':38s} {'median ms':>10s} {'vs torch eager':>15s} {'compiled speed-up':>18s}")
    for name in names:
        med = statistics.median(times[name])
        speedup = ""
        if name.endswith(" compiled"):
            speedup = f"{statistics.median(times[name[: -len('compiled')] + 'eager']) / med:17.2f}x"
        print(f"{name:38s} {med * 1e3:10.2f} {med / ref:14.2f}x {speedup:>18s}")


if __name__ == "__main__":
    main()
