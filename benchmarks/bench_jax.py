"""Jitted optimizer step of ``cautious.jax.adamw`` against ``optax.adamw`` (buffers donated).

A transformer-shaped pytree (~29M float32 parameters by default: embedding, 8 blocks of
attention and MLP weights, biases and norms). Each variant runs its own jitted, donating step;
the variants are timed alternately, one step each per round, in one process, and the report
gives the median step time of each and the median over rounds of its ratio to optax.adamw.

    .venv/bin/python benchmarks/bench_jax.py [--rounds 30] [--d 512] [--layers 8] [--vocab 8192]

Variants:
  optax.adamw                      the baseline
  cautious.jax.adamw               ours: mask from m', arithmetic count (the shipped default)
  cautious.jax.adamw(caution=False)
  wrapper(optax.scale_by_adam)     cautious.jax.cautious around optax's direction (generic path:
                                   mask from u, which XLA materialises)
  naive                            a straightforward masked AdamW (count = sum(mask) in int32)
  cautious.jax.adamw[ffi count]    (--ffi) the shipped step with the kept count as an XLA FFI custom
                                   call (benchmarks/jax_ffi_count.cc, compiled here with g++; an
                                   experiment, not shipped: float32 only, CPU only)
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import platform
import statistics
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

import cautious.jax as cj
from cautious.backends.jax import _core


def transformer_tree(d: int, layers: int, vocab: int) -> dict:
    shapes: dict = {"embed": (vocab, d), "final_norm": (d,)}
    for i in range(layers):
        shapes[f"block{i}"] = {
            "qkv": (d, 3 * d),
            "qkv_bias": (3 * d,),
            "out": (d, d),
            "up": (d, 4 * d),
            "up_bias": (4 * d,),
            "down": (4 * d, d),
            "norm1": (d,),
            "norm2": (d,),
        }
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(jax.random.key(0), len(leaves))
    return jax.tree.unflatten(treedef, [0.02 * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, leaves)])


def naive_cautious_adamw(lr: float, weight_decay: float = 1e-4) -> optax.GradientTransformation:
    inner = optax.scale_by_adam()

    def update(g, state, params=None):
        u, state = inner.update(g, state, params)

        def leaf(u, g):
            mask = ((u > 0) & (g > 0)) | ((u < 0) & (g < 0)) | jnp.isnan(u) | jnp.isnan(g)
            k = jnp.sum(mask, dtype=jnp.int32)
            scale = 1.0 / jnp.maximum(k / u.size, 1e-3)
            return jnp.where(mask, u * scale, 0.0)

        return jax.tree.map(leaf, u, g), state

    return optax.chain(
        optax.GradientTransformation(inner.init, update),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(lr),
    )


def ffi_kept_count():
    """``kept_count`` as an XLA FFI custom call: builds benchmarks/jax_ffi_count.cc (g++), registers it."""
    out = os.path.join(tempfile.mkdtemp(), "libcautious_ffi_count.so")
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jax_ffi_count.cc")
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}"]
    subprocess.run(["g++", *flags, src, "-o", out], check=True)
    lib = ctypes.cdll.LoadLibrary(out)
    jax.ffi.register_ffi_target("cautious_kept_count", jax.ffi.pycapsule(lib.CautiousKeptCount), platform="cpu")
    call = jax.ffi.ffi_call("cautious_kept_count", jax.ShapeDtypeStruct((), jnp.int32))

    def kept_count(a, g):
        if a.dtype != jnp.float32 or g.dtype != jnp.float32:
            raise TypeError("the FFI experiment counts float32 only")
        return call(a, g).astype(_core.count_dtype())

    return kept_count


def make_step(opt: optax.GradientTransformation):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--only", nargs="*", help="subset of variant names (optax.adamw is always run)")
    ap.add_argument(
        "--count", action="store_true", help="also cautious.jax.adamw with each count indicator (_core.INDICATORS)"
    )
    ap.add_argument("--ffi", action="store_true", help="also the shipped step with the count as an XLA FFI custom call")
    args = ap.parse_args()

    lr = 1e-3
    variants = {
        "optax.adamw": optax.adamw(lr),
        "cautious.jax.adamw": cj.adamw(lr),
        "cautious.jax.adamw(caution=False)": cj.adamw(lr, caution=False),
        "wrapper(optax.scale_by_adam)": optax.chain(
            cj.cautious(optax.scale_by_adam(), form="direction"),
            optax.add_decayed_weights(1e-4),
            optax.scale_by_learning_rate(lr),
        ),
        "naive": naive_cautious_adamw(lr),
    }
    indicators = {}  # variant -> the count indicator it is traced with
    if args.count:
        for name in _core.INDICATORS:
            indicators[f"cautious.jax.adamw[{name}]"] = name
            variants[f"cautious.jax.adamw[{name}]"] = cj.adamw(lr)
    patched = {}  # variant -> the kept_count it is traced with
    if args.ffi:
        patched["cautious.jax.adamw[ffi count]"] = ffi_kept_count()
        variants["cautious.jax.adamw[ffi count]"] = cj.adamw(lr)
    if args.only:
        variants = {k: v for k, v in variants.items() if k == "optax.adamw" or k in args.only}

    base = transformer_tree(args.d, args.layers, args.vocab)
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape, x.dtype), base)
    n = sum(x.size for x in jax.tree.leaves(base))
    print(
        f"jax {jax.__version__}, optax {optax.__version__}, {jax.devices()[0].platform}, "
        f"{platform.processor() or platform.machine()}; {n / 1e6:.1f}M float32 params in "
        f"{len(jax.tree.leaves(base))} tensors"
    )

    runs = {}
    for name, opt in variants.items():
        params = jax.tree.map(jnp.copy, base)
        state = opt.init(params)
        step = make_step(opt)
        shipped, shipped_count = _core.INDICATOR, _core.kept_count
        _core.INDICATOR = indicators.get(name, shipped)  # read while tracing (the first warm-up step)
        _core.kept_count = patched.get(name, shipped_count)
        try:
            for _ in range(args.warmup):
                params, state = step(params, state, grads)
        finally:
            _core.INDICATOR, _core.kept_count = shipped, shipped_count
        jax.block_until_ready(params)
        runs[name] = [step, params, state]

    if "cautious.jax.adamw[ffi count]" in runs and "cautious.jax.adamw" in runs:
        shipped_p, ffi_p = runs["cautious.jax.adamw"][1], runs["cautious.jax.adamw[ffi count]"][1]
        same = all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(shipped_p), jax.tree.leaves(ffi_p)))
        print(f"ffi count: parameters bit-identical to the shipped step after {args.warmup} steps: {same}")
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            step, params, state = run
            t0 = time.perf_counter()
            params, state = step(params, state, grads)
            jax.block_until_ready((params, state))
            times[name].append(time.perf_counter() - t0)
            run[1:] = [params, state]

    ref = times["optax.adamw"]
    print(f"{'variant':36s} {'median ms':>10s} {'ratio (median of per-round ratios)':>36s}")
    for name, ts in times.items():
        ratio = statistics.median(t / r for t, r in zip(ts, ref))
        print(f"{name:36s} {1e3 * statistics.median(ts):10.1f} {ratio:36.2f}")


if __name__ == "__main__":
    main()
