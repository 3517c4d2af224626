"""Step time of cautious.torch.AdamW against torch.optim.AdamW on a transformer-shaped parameter list.

Every variant owns a copy of the same parameters and gradients; each round runs
every variant once, in a rotated order, and the report gives the median step time
and its ratio to ``torch.optim.AdamW(foreach=True)``. Never asserts on time.

    .venv/bin/python benchmarks/bench_torch.py                 # ~27M fp32 parameters, CPU
    .venv/bin/python benchmarks/bench_torch.py --d-model 256 --layers 2 --vocab 4000 --iters 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import cautious.torch as ct


def transformer_shapes(vocab: int, d: int, layers: int, mlp: int) -> list[tuple[int, ...]]:
    """Embedding, per layer (norms, qkv, out proj, MLP up/down with biases), final norm."""
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,)]
        shapes += [(mlp * d, d), (mlp * d,), (d, mlp * d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def make_variants(shapes, device: str, with_fused: bool):
    variants = {
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "cautious AdamW caution=False foreach": lambda ps: ct.AdamW(ps, lr=1e-3, caution=False, foreach=True),
        "cautious AdamW caution=True foreach": lambda ps: ct.AdamW(ps, lr=1e-3, caution=True, foreach=True),
    }
    if with_fused:
        variants["cautious AdamW caution=True fused"] = lambda ps: ct.AdamW(ps, lr=1e-3, fused=True)
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    out = {}
    for name, make in variants.items():
        ps = [torch.nn.Parameter(b.clone().to(device)) for b in base]
        for p, g in zip(ps, grads, strict=False):
            p.grad = g.to(device)
        try:
            opt = make(ps)
            opt.step()  # allocate state
        except Exception as e:  # a fused path that is not ready must not hide the others
            print(f"skipping {name}: {type(e).__name__}: {e}")
            continue
        out[name] = opt
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--mlp", type=int, default=4)
    ap.add_argument("--iters", type=int, default=25, help="timed rounds (each runs every variant once)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--no-fused", action="store_true", help="skip cautious fused=True even if available")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with_fused = False
    if not args.no_fused:
        try:
            from cautious.backends.torch import fused

            with_fused = bool(fused.is_available(torch.device(args.device)))
        except ImportError:
            with_fused = False

    shapes = transformer_shapes(args.vocab, args.d_model, args.layers, args.mlp)
    n = sum(torch.Size(s).numel() for s in shapes)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    print(f"{len(shapes)} tensors, {n / 1e6:.1f}M fp32 parameters; {args.iters} rounds")
    opts = make_variants(shapes, args.device, with_fused)
    names = list(opts)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.warmup + args.iters):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            sync()
            t0 = time.perf_counter()
            opts[name].step()
            sync()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["torch AdamW foreach"])
    print(f"{'variant':42s} {'median ms':>10s} {'vs torch foreach':>17s}")
    for name in names:
        med = statistics.median(times[name])
        print(f"{name:42s} {med * 1e3:10.2f} {med / ref:16.2f}x")


if __name__ == "__main__":
    main()
