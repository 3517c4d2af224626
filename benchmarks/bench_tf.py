"""Benchmark: one ``apply_gradients`` of cautious AdamW vs ``keras.optimizers.AdamW`` (TensorFlow).

Both run under ``tf.function(jit_compile=True)`` on the same transformer-shaped list of
float32 variables (~29M parameters), alternating A and B in one process; the script
prints per-optimizer medians and the ratio. Never asserts on time.

Run:  .venv/bin/python benchmarks/bench_tf.py [--reps 30] [--layers 8] [--d-model 512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import cautious.tensorflow as ctf  # noqa: E402


def transformer_shapes(layers: int, d: int, vocab: int) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]  # norm, qkv, out
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # norm, mlp
    shapes += [(d,), (d,)]
    return shapes


def make(opt: keras.optimizers.Optimizer, shapes, seed: int):
    rng = np.random.default_rng(seed)
    variables = [tf.Variable(rng.standard_normal(s, dtype=np.float32) * 0.02) for s in shapes]
    grads = [tf.constant(rng.standard_normal(s, dtype=np.float32) * 1e-3) for s in shapes]
    opt.build(variables)

    @tf.function(jit_compile=True)
    def step(gs):
        opt.apply_gradients(zip(gs, variables))

    return step, grads, variables


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args()
    shapes = transformer_shapes(args.layers, args.d_model, args.vocab)
    n = sum(int(np.prod(s)) for s in shapes)
    runs = {
        "keras.AdamW": make(keras.optimizers.AdamW(learning_rate=1e-3), shapes, 0),
        "cautious.AdamW": make(ctf.AdamW(learning_rate=1e-3), shapes, 0),
        "cautious.AdamW(caution=False)": make(ctf.AdamW(learning_rate=1e-3, caution=False), shapes, 0),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for step, grads, variables in runs.values():  # compile + warm up
        for _ in range(3):
            step(grads)
        _ = variables[0].numpy()
    for _ in range(args.reps):
        for name, (step, grads, variables) in runs.items():
            t0 = time.perf_counter()
            step(grads)
            _ = variables[-1].numpy()  # wait for the step
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["keras.AdamW"])
    print(
        f"tensorflow {tf.__version__}, keras {keras.__version__}, {len(shapes)} tensors, {n / 1e6:.1f}M params,"
        f" {args.reps} alternating reps, jit_compile=True"
    )
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:32s} median {med * 1e3:8.2f} ms   ratio vs keras.AdamW {med / base:5.2f}x")


if __name__ == "__main__":
    main()
