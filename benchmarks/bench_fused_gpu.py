"""GPU benchmark: the fused (Triton) cautious AdamW, Lion and SGD against torch's fused AdamW.

On a CUDA machine, for each size (default 100M and 1B float32 parameters, transformer-shaped
lists) and for mixed precision (bfloat16 params and grads, float32 state), it times

* ours: cautious AdamW, Lion, SGD-momentum (``cautious.backends.torch.fused``, Triton);
* torch.optim.AdamW(fused=True) and (foreach=True); torch.optim.SGD(fused=True);

alternating contenders in one process (CUDA events, medians), and prints ms/step, effective
bandwidth (bytes actually moved per parameter: 36 for cautious AdamW (count pass 8 + update
28), 28 for plain AdamW, 28 for cautious Lion/SGD (8 + 20), 20 for plain SGD-momentum), a
measured device-to-device copy bandwidth, and ratios against torch's fused AdamW. The floor
for exact cautious AdamW is 36/28 = 1.29x. Finishes in well under 5 minutes on an H100/H200.

    python benchmarks/bench_fused_gpu.py                 # 100M and 1B, plus bf16 at 100M
    python benchmarks/bench_fused_gpu.py --sizes 100M 300M
    TRITON_INTERPRET=1 python benchmarks/bench_fused_gpu.py --dry-run   # tiny, on the CPU
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time


def _parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "KMBG" else s) * mult)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["100M", "1B"], help="float32 parameter counts (e.g. 100M 1B)")
    ap.add_argument("--bf16-size", default="100M", help="size of the bfloat16-params / float32-state case ('' skips)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per contender")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget", type=float, default=240.0, help="seconds; later cases are skipped past it")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes; runs on the CPU under TRITON_INTERPRET=1")
    args = ap.parse_args()

    import torch
    from _shapes import transformer_block

    from cautious import Caution
    from cautious.backends.torch import fused

    if args.dry_run:
        sizes, bf16_size, steps, warmup = [4_000], 4_000, 1, 1
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            print("note: --dry-run on the CPU without TRITON_INTERPRET=1 times the native CPU path, not Triton")
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --dry-run (TRITON_INTERPRET=1) to check the script on a CPU")
        sizes = [_parse_size(s) for s in args.sizes]
        bf16_size = _parse_size(args.bf16_size) if args.bf16_size else 0
        steps, warmup = args.steps, args.warmup
        device = torch.device("cuda")
    cuda = device.type == "cuda"
    t_start = time.perf_counter()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timeit(fns: dict, n_steps: int) -> dict[str, float]:
        """Alternate the contenders; median seconds per call."""
        out: dict[str, list[float]] = {k: [] for k in fns}
        for i in range(warmup + n_steps):
            for name, fn in fns.items():
                if cuda:
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    fn()
                    b.record()
                    b.synchronize()
                    dt = a.elapsed_time(b) / 1e3
                else:
                    t = time.perf_counter()
                    fn()
                    dt = time.perf_counter() - t
                if i >= warmup:
                    out[name].append(dt)
        return {k: statistics.median(v) for k, v in out.items()}

    def shapes(total: int) -> list[tuple[int, ...]]:
        d = 2048 if total >= 5 * 10**8 else 1024 if total >= 5 * 10**7 else 64 if total >= 10**5 else 16
        vocab = 32000 if total >= 10**7 else 64
        layers = max(1, round((total - vocab * d) / (12 * d * d)))
        if args.dry_run:
            layers = 1
        out: list[tuple[int, ...]] = [(vocab, d)]
        for _ in range(layers):
            out += transformer_block(d)
        return out + [(d,), (0,)]  # an empty tensor last, on purpose

    def copy_bandwidth(n: int) -> float:
        src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        t = timeit({"copy": lambda: dst.copy_(src)}, max(3, steps // 2))["copy"]
        return 8 * n / t / 1e9

    print(
        f"device: {torch.cuda.get_device_name() if cuda else 'cpu'} | torch {torch.__version__} | "
        f"fused path: {fused.backend_for(device, None)} | steps {steps} (+{warmup} warm-up), "
        "alternating, medians"
    )
    print(f"device-to-device copy bandwidth (read + write): {copy_bandwidth(sizes[0]):.0f} GB/s")

    def run_case(label: str, total: int, pdtype) -> None:
        sh = shapes(total)
        n = sum(torch.Size(s).numel() for s in sh)
        gen = torch.Generator(device=device).manual_seed(0)
        ps = [torch.randn(s, device=device, generator=gen).mul_(0.02).to(pdtype) for s in sh]
        gs = [torch.randn(s, device=device, generator=gen).mul_(1e-3).to(pdtype) for s in sh]
        sd = torch.float32
        ms = [torch.zeros(s, device=device, dtype=sd) for s in sh]
        vs = [torch.zeros(s, device=device, dtype=sd) for s in sh]
        t = {"adam": 0}

        def ours_adamw(caution):
            def f():
                t["adam"] += 1
                fused.fused_adam_(
                    ps,
                    gs,
                    ms,
                    vs,
                    None,
                    step=t["adam"],
                    lr=1e-4,
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

            return f

        def ours_lion():
            fused.fused_lion_(
                ps,
                gs,
                ms,
                lr=1e-5,
                beta1=0.9,
                beta2=0.99,
                weight_decay=0.01,
                maximize=False,
                caution=Caution(),
                cautious_weight_decay=False,
            )

        def ours_sgd():
            fused.fused_sgd_(
                ps,
                gs,
                ms,
                first_step=False,
                lr=1e-4,
                momentum=0.9,
                dampening=0.0,
                nesterov=False,
                weight_decay=0.0,
                decoupled=False,
                maximize=False,
                caution=Caution(),
                cautious_weight_decay=False,
            )

        def torch_opt(cls, **kw):
            tp = [p.detach().clone().requires_grad_() for p in ps]
            for p, g in zip(tp, gs, strict=False):
                p.grad = g.clone()
            return cls(tp, **kw).step, tp

        contenders = {
            "ours cautious AdamW": (ours_adamw(Caution()), 36),
            "ours AdamW (caution=None)": (ours_adamw(None), 28),
            "ours cautious Lion": (ours_lion, 28),
            "ours cautious SGD-momentum": (ours_sgd, 28),
        }
        keep = []
        for name, cls, kw, nbytes in [
            ("torch AdamW fused", torch.optim.AdamW, dict(lr=1e-4, fused=True), 28),
            ("torch AdamW foreach", torch.optim.AdamW, dict(lr=1e-4, foreach=True), 28),
            ("torch SGD-momentum fused", torch.optim.SGD, dict(lr=1e-4, momentum=0.9, fused=True), 20),
        ]:
            try:
                fn, tp = torch_opt(cls, **kw)
                fn()
                contenders[name] = (fn, nbytes)
                keep.append(tp)
            except (RuntimeError, torch.OutOfMemoryError) as e:  # e.g. fused unsupported for a dtype
                print(f"  ({name} skipped: {str(e).splitlines()[0][:100]})")
        med = timeit({k: v[0] for k, v in contenders.items()}, steps)
        ref = med.get("torch AdamW fused")
        print(f"\n== {label}: {n:,} parameters in {len(sh)} tensors, params {pdtype}, state float32")
        print(f"  {'contender':30s} {'ms/step':>9s} {'B/param':>8s} {'GB/s':>8s} {'vs torch fused AdamW':>21s}")
        for k, v in med.items():
            nb = contenders[k][1]
            ratio = f"{v / ref:.2f}x" if ref else "-"
            print(f"  {k:30s} {v * 1e3:9.3f} {nb:8d} {nb * n / v / 1e9:8.0f} {ratio:>21s}")
        if ref:
            c = med["ours cautious AdamW"]
            print(
                f"  cautious AdamW / torch fused AdamW = {c / ref:.2f}x (floor 1.29x); "
                f"36 B/param bandwidth {36 * n / c / 1e9:.0f} GB/s"
            )

    def free() -> None:  # the case's tensors died with run_case's frame
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    for total in sizes:
        if time.perf_counter() - t_start > args.budget:
            print(f"(skipping {total}: past the {args.budget:.0f} s budget)")
            continue
        run_case("float32", total, torch.float32)
        free()
    if bf16_size and time.perf_counter() - t_start <= args.budget:
        run_case("mixed precision", bf16_size, torch.bfloat16)
    print(f"\ntotal {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
