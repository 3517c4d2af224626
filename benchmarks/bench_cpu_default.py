"""CPU: what each AdamW path costs per step, ours (every path and the default) against torch and peers.

Reproduces issue 17's table: 29.4M float32 parameters in transformer shapes (``_shapes.transformer``),
then 10,000 tensors of 8 floats (per-tensor overhead). Every contender is an optimizer over its
own copy of the parameters with fixed gradients (lr 1e-3, weight decay 0.01); the contenders run
one step each per round, alternating, in one process; the table gives the median over rounds
(after warm-up rounds, which also build our native kernel) and its ratio to torch's default
``torch.optim.AdamW`` (the single-tensor loop on CPU). Peers run when installed: timm's
``AdamWLegacy(caution=True)`` (loop and foreach; imported without ``timm/__init__``, which needs
torchvision) and heavyball's ``AdamW(caution=True)`` (eager: ``heavyball.utils.compile_mode = None``).
Never asserts on time.

    .venv/bin/python benchmarks/bench_cpu_default.py [--rounds 9] [--warmup 2] [--small 10000]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import statistics
import sys
import time
import types

os.environ.pop("TRITON_INTERPRET", None)  # the CPU fast path, not the Triton interpreter

import torch  # noqa: E402
from _shapes import transformer  # noqa: E402

import cautious.torch as ct  # noqa: E402
from cautious.backends.torch import _functional  # noqa: E402

KW = {"lr": 1e-3, "weight_decay": 0.01}


def _timm_adamw():
    """timm's AdamWLegacy without running timm/__init__ (it imports torchvision)."""
    if "timm.optim.adamw" in sys.modules:
        return sys.modules["timm.optim.adamw"].AdamWLegacy
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = list(spec.submodule_search_locations)[0]
    for name, path in (("timm", root), ("timm.optim", os.path.join(root, "optim"))):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [path]
            sys.modules[name] = pkg
    try:
        return importlib.import_module("timm.optim.adamw").AdamWLegacy
    except Exception:
        return None


def _heavyball_adamw():
    try:
        import heavyball
        import heavyball.utils
    except Exception:
        return None
    heavyball.utils.compile_mode = None  # eager: no torch.compile on this CPU
    return heavyball.AdamW


def contenders() -> dict:
    out = {
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, fused=True, **KW),
        "torch AdamW default (loop on CPU)": lambda ps: torch.optim.AdamW(ps, **KW),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, foreach=True, **KW),
        "ours cautious AdamW fused=True": lambda ps: ct.AdamW(ps, fused=True, **KW),
        "ours cautious AdamW foreach=False": lambda ps: ct.AdamW(ps, foreach=False, **KW),
        "ours cautious AdamW foreach=True": lambda ps: ct.AdamW(ps, foreach=True, **KW),
        "ours cautious AdamW default": lambda ps: ct.AdamW(ps, **KW),
    }
    timm = _timm_adamw()
    if timm is not None:
        out["timm cautious AdamW loop"] = lambda ps: timm(ps, caution=True, foreach=False, **KW)
        out["timm cautious AdamW foreach"] = lambda ps: timm(ps, caution=True, foreach=True, **KW)
    heavy = _heavyball_adamw()
    if heavy is not None:
        out["heavyball cautious AdamW (eager)"] = lambda ps: heavy(
            ps, betas=(0.9, 0.999), caution=True, warmup_steps=0, **KW
        )
    return out


def measure(shapes: list[tuple[int, ...]], rounds: int, warmup: int, skip: tuple[str, ...] = ()) -> dict:
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    steps = {}
    for name, make in contenders().items():
        if name in skip:
            continue
        ps = [p.clone().requires_grad_() for p in base]
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.clone()
        steps[name] = (make(ps).step, ps, grads)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(warmup + rounds):
        for name, (step, ps, gs) in steps.items():
            if ps[0].grad is None:  # heavyball clears the gradients after a step: restore them, untimed
                for p, g in zip(ps, gs, strict=True):
                    p.grad = g.clone()
            t = time.perf_counter()
            step()
            dt = time.perf_counter() - t
            if r >= warmup:
                times[name].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def report(title: str, med: dict, ref_name: str) -> None:
    ref = med[ref_name]
    print(f"\n{title}\n")
    print(f"| contender | ms/step | vs {ref_name} |")
    print("|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v * 1e3:.1f} | {v / ref:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--small", type=int, default=10000, help="number of 8-float tensors in the second case (0: skip)")
    args = ap.parse_args()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs ({cpu}), "
        f"load average {os.getloadavg()[0]:.1f} at start"
    )
    probe = [torch.zeros(1, requires_grad=True)]
    print(f"our default path on this CPU (caution on): {_functional._resolve(probe, None, None, 1e-3, ct.Caution())}")
    shapes = transformer()
    n = sum(torch.Size(s).numel() for s in shapes)
    med = measure(shapes, args.rounds, args.warmup)
    report(
        f"{n / 1e6:.1f}M float32 parameters in {len(shapes)} tensors, medians of {args.rounds} alternating rounds",
        med,
        "torch AdamW default (loop on CPU)",
    )
    if args.small:
        # heavyball pays ~0.6 ms per tensor per step here (seconds at 10,000 tensors): left out
        med = measure([(8,)] * args.small, args.rounds, args.warmup, skip=("heavyball cautious AdamW (eager)",))
        report(
            f"{args.small} tensors of 8 float32, medians of {args.rounds} alternating rounds",
            med,
            "torch AdamW fused",
        )
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
