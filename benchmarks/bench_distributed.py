"""CPU benchmark: the cost of the count all-reduce against the optimizer step, at 2 and 4 processes.

Every process holds its Shard(0) part of a transformer-shaped list of float32 DTensor
parameters (default d=256, 4 layers, vocab 8000: 5.6M parameters in 52 tensors), as FSDP2
leaves them, and times, alternating A, B, C, D... in the same processes:

* the cautious AdamW step (foreach, and fused CPU), which includes the count all-reduce;
* the same step with ``caution=False`` (no count, no communication);
* the all-reduce alone: one int64 tensor with one count per parameter tensor, SUM over gloo.

Medians over ranks' maxima (a step is as slow as its slowest rank). Never asserts on time.
Spawns its own processes (``torch.multiprocessing``, gloo on 127.0.0.1)::

    python benchmarks/bench_distributed.py [--worlds 2 4] [--steps 20] [--d 256 --layers 4 --vocab 8000]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shapes import transformer_block  # noqa: E402


def shapes(d: int, layers: int, vocab: int) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [(vocab, d), (1024, d)]
    for _ in range(layers):
        out += transformer_block(d)
    return out + [(d,), (d,)]


def slowest(seconds: float) -> float:
    """The maximum over ranks of one timing."""
    t = torch.tensor(seconds, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, results: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import cautious.torch as ct

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    sh = shapes(args.d, args.layers, args.vocab)

    def make(**kw):
        params = [
            torch.nn.Parameter(distribute_tensor(torch.randn(s) * 0.02, mesh, [Shard(0)], src_data_rank=None))
            for s in sh
        ]
        for p in params:
            p.grad = distribute_tensor(torch.randn(p.shape) * 1e-3, mesh, [Shard(0)], src_data_rank=None)
        return ct.AdamW(params, lr=1e-3, **kw).step

    counts = torch.zeros(len(sh), dtype=torch.int64)
    contenders = {
        "cautious AdamW foreach": make(foreach=True),
        "AdamW caution=False foreach": make(foreach=True, caution=False),
        "cautious AdamW fused": make(fused=True),
        "AdamW caution=False fused": make(fused=True, caution=False),
        "count all-reduce alone": lambda: dist.all_reduce(counts),
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for i in range(args.steps + 3):
        for name, fn in contenders.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            t = slowest(time.perf_counter() - t0)
            if i >= 3:
                times[name].append(t)
    if rank == 0:
        results[world] = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per contender (after 3 warm-up)")
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = ap.parse_args()
    sh = shapes(args.d, args.layers, args.vocab)
    n = sum(torch.Size(s).numel() for s in sh)
    print(f"torch {torch.__version__}, gloo on CPU, {args.threads} thread(s) per process, {os.cpu_count()} CPUs")
    print(f"{n / 1e6:.1f}M float32 parameters in {len(sh)} tensors, Shard(0) over every process")
    results = mp.Manager().dict()
    for world in args.worlds:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(rank_main, args=(world, port, args, results), nprocs=world)
        r = results[world]
        print(f"\n{world} processes (median ms, slowest rank)")
        for name, ms in r.items():
            print(f"  {name:<30} {ms:9.3f}")
        for path in ("foreach", "fused"):
            step = r[f"cautious AdamW {path}"]
            print(
                f"  all-reduce / cautious {path} step: {r['count all-reduce alone'] / step:.1%}; "
                f"cautious / caution=False: {step / r[f'AdamW caution=False {path}']:.2f}x"
            )


if __name__ == "__main__":
    main()
