"""Step time of caution for any optimizer (the wrappers) against the bare optimizer they wrap.

Pairs, each timed alternating in one process (every round runs both, in a rotated order),
reported as medians and the wrapper's ratio to the bare step:

* torch: ``torch.optim.AdamW`` and ``torch.optim.Adafactor`` vs ``cautious.torch.Cautious`` around each;
* keras: ``keras.optimizers.AdamW`` vs ``cautious.tensorflow.Cautious`` around it (a ``tf.function`` step);
* jax: ``optax.adamw`` vs ``cautious.jax.cautious(optax.adamw(...), form="update")`` (a jitted step).

Each framework runs in its own subprocess (TensorFlow never shares a process with torch). The
parameters are one transformer (``benchmarks/_shapes.py``); never asserts on time::

    .venv/bin/python benchmarks/bench_wrapper.py                        # every installed framework
    .venv/bin/python benchmarks/bench_wrapper.py --framework torch --d-model 128 --layers 1 --iters 5
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shapes import transformer  # noqa: E402

FRAMEWORKS = {"torch": "torch", "keras": "tensorflow", "jax": "optax"}


def _timed(steps: dict[str, Callable[[], None]], warmup: int, iters: int) -> dict[str, float]:
    """Median seconds per step of each variant, run alternating in a rotated order."""
    names = list(steps)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(warmup + iters):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            steps[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _report(framework: str, pairs: list[tuple[str, str]], med: dict[str, float]) -> None:
    print(f"{'framework':9s} {'bare':34s} {'bare ms':>9s} {'wrapped ms':>11s} {'ratio':>7s}")
    for bare, wrapped in pairs:
        b, w = med[bare] * 1e3, med[wrapped] * 1e3
        print(f"{framework:9s} {bare:34s} {b:9.2f} {w:11.2f} {w / b:6.2f}x")


def run_torch(shapes, args) -> None:
    import torch

    import cautious.torch as ct

    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    makes = {
        "torch.optim.AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        "torch.optim.Adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-3),
    }
    steps, pairs = {}, []
    for name, make in makes.items():
        for wrapped in (False, True):
            ps = [torch.nn.Parameter(b.clone()) for b in base]
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
            opt = ct.Cautious(make(ps)) if wrapped else make(ps)
            opt.step()  # allocate the state (and the wrapper's snapshots)
            steps[f"Cautious({name})" if wrapped else name] = opt.step
        pairs.append((name, f"Cautious({name})"))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    _report("torch", pairs, _timed(steps, args.warmup, args.iters))


def run_keras(shapes, args) -> None:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import numpy as np
    import tensorflow as tf

    import cautious.tensorflow as ctf

    rng = np.random.default_rng(0)
    base = [(rng.standard_normal(s) * 0.02).astype(np.float32) for s in shapes]
    grads = [tf.constant((rng.standard_normal(s) * 1e-3).astype(np.float32)) for s in shapes]
    steps = {}
    for wrapped in (False, True):
        vs = [keras.Variable(b) for b in base]
        inner = keras.optimizers.AdamW(learning_rate=1e-3)
        opt = ctf.Cautious(inner) if wrapped else inner
        opt.build(vs)
        step = tf.function(_keras_step(opt, vs), jit_compile=args.jit)
        step(grads)
        steps["Cautious(keras AdamW)" if wrapped else "keras AdamW"] = _call(step, grads)
    print(f"tensorflow {tf.__version__}, keras {keras.__version__}, jit_compile={args.jit}")
    _report("keras", [("keras AdamW", "Cautious(keras AdamW)")], _timed(steps, args.warmup, args.iters))


def _keras_step(opt, vs):
    def step(grads):
        opt.apply(grads, vs)

    return step


def _call(fn, *a):
    def run():
        out = fn(*a)
        if hasattr(out, "numpy"):
            out.numpy()

    return run


def run_jax(shapes, args) -> None:
    import jax
    import numpy as np
    import optax

    import cautious.jax as cj

    rng = np.random.default_rng(0)
    params = [jax.numpy.asarray((rng.standard_normal(s) * 0.02).astype(np.float32)) for s in shapes]
    grads = [jax.numpy.asarray((rng.standard_normal(s) * 1e-3).astype(np.float32)) for s in shapes]
    steps = {}
    for wrapped in (False, True):
        opt = cj.cautious(optax.adamw(1e-3), form="update") if wrapped else optax.adamw(1e-3)
        state = opt.init(params)

        @jax.jit
        def step(p, s, g, opt=opt):
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s

        jax.block_until_ready(step(params, state, grads))
        steps["Cautious(optax adamw)" if wrapped else "optax adamw"] = _jax_call(step, params, state, grads)
    print(f"jax {jax.__version__}, optax {optax.__version__}, {jax.devices()[0].platform}")
    _report("jax", [("optax adamw", "Cautious(optax adamw)")], _timed(steps, args.warmup, args.iters))


def _jax_call(step, params, state, grads):
    import jax

    def run():
        jax.block_until_ready(step(params, state, grads))

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--framework", choices=[*FRAMEWORKS, "all"], default="all")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--iters", type=int, default=20, help="timed rounds (each runs every variant once)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--jit", action="store_true", help="Keras: jit_compile=True (XLA) for the step")
    args = ap.parse_args()
    if args.framework == "all":
        for fw, module in FRAMEWORKS.items():
            if importlib.util.find_spec(module) is None:
                print(f"{fw}: not installed, skipped")
                continue
            argv = [a for a in sys.argv[1:] if not a.startswith("--framework")]
            subprocess.run([sys.executable, os.path.abspath(__file__), "--framework", fw, *argv], check=True)
        return
    shapes = transformer(args.d_model, args.layers, args.vocab)
    n = sum(math.prod(s) for s in shapes)
    print(f"{len(shapes)} tensors, {n / 1e6:.1f}M float32 parameters; {args.iters} rounds, medians")
    {"torch": run_torch, "keras": run_keras, "jax": run_jax}[args.framework](shapes, args)


if __name__ == "__main__":
    main()
