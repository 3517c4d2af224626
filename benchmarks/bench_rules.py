"""Step time of every base rule: ours (caution on and off) against the framework's native optimizer.

One row per rule and path: PyTorch single-tensor and foreach (and fused where the rule has a
fused kernel: against the native fused optimizer where there is one, else its single-tensor loop, the CPU
default), jitted optax, and Keras 3 with ``jit_compile=True``. Every contender owns a copy
of the same parameters (transformer shapes, ~5M float32 by default; Muon gets the 2-d tensors
only, as every framework's Muon orthogonalizes matrices) and fixed gradients; within a rule the
contenders run one step each per round, alternating, in one process, and the table gives the
median step time and its ratio to the native optimizer on the same path (or, for a rule the
framework lacks, to ours with ``caution=False``). Native references where a framework has none:
timm's ``Adopt`` and ``LaProp`` (torch), ``optax.contrib`` (JAX). Never asserts on time.

Each framework runs in its own process (TensorFlow must not share one with torch._inductor):

    .venv/bin/python benchmarks/bench_rules.py --framework torch [--rounds 9] [--d 256]
    .venv/bin/python benchmarks/bench_rules.py --framework jax
    .venv/bin/python benchmarks/bench_rules.py --framework tensorflow
    .venv/bin/python benchmarks/bench_rules.py            # all three, one subprocess each
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import os
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import numpy as np

os.environ.pop("TRITON_INTERPRET", None)

LR = 1e-3


def shapes(d: int, layers: int, vocab: int) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [(vocab, d), (d,)]
    for _ in range(layers):
        out += [(d, 3 * d), (3 * d,), (d, d), (d, 4 * d), (4 * d,), (4 * d, d), (d,), (d,)]
    return out


def data(shape_list: list[tuple[int, ...]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    params = [(0.02 * rng.standard_normal(s)).astype(np.float32) for s in shape_list]
    grads = [(1e-3 * rng.standard_normal(s)).astype(np.float32) for s in shape_list]
    return params, grads


def alternate(steps: dict[str, Callable[[], Any]], rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per step of each contender, timed one step each per round, alternating."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(warmup + rounds):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            dt = time.perf_counter() - t
            if r >= warmup:
                times[name].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def report(rule: str, med: dict[str, float], ref: str) -> None:
    for name, t in med.items():
        print(f"| {rule} | {name} | {t * 1e3:.1f} | {t / med[ref]:.2f}x |")


# ----------------------------------------------------------------------------------------------- torch


def _timm(module: str, cls: str):
    """A class of timm.optim without running timm/__init__ (it imports torchvision); None if absent."""
    if "timm" in sys.modules:
        root = list(sys.modules["timm"].__path__)[0]
    else:
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
        return getattr(importlib.import_module(f"timm.optim.{module}"), cls)
    except Exception:
        return None


#: rules with a fused kernel here (cautious.torch) and, of them, those whose native optimizer has one too;
#: a rule without a native fused kernel runs our fused path against the native single-tensor loop
OURS_FUSED = ("AdamW", "NAdam", "Adopt", "LaProp")
TORCH_FUSED = ("AdamW",)


def torch_rules() -> list[tuple[str, str, Any, dict, bool]]:
    """(rule, our class name, native class or None, keywords, matrices only)."""
    import torch

    return [
        ("AdamW", "AdamW", torch.optim.AdamW, {"weight_decay": 0.01}, False),
        ("NAdam", "NAdam", torch.optim.NAdam, {}, False),
        ("RMSprop (momentum 0.9)", "RMSprop", torch.optim.RMSprop, {"momentum": 0.9}, False),
        ("Adafactor", "Adafactor", getattr(torch.optim, "Adafactor", None), {}, False),
        ("Muon", "Muon", getattr(torch.optim, "Muon", None), {}, True),
        ("Adopt", "Adopt", _timm("adopt", "Adopt"), {}, False),
        ("LaProp", "LaProp", _timm("laprop", "LaProp"), {}, False),
    ]


def bench_torch(args: argparse.Namespace) -> None:
    """Each rule of :func:`torch_rules` (or only ``args.rules``) on every path it has."""
    import torch

    import cautious.torch as ct

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    all_shapes = shapes(args.d, args.layers, args.vocab)
    print("| rule | contender | ms/step | vs native, same path |")
    print("|---|---|---|---|")
    for rule, ours_name, native, kw, matrices in torch_rules():
        if args.rules and ours_name not in args.rules:
            continue
        ours = getattr(ct, ours_name, None)
        if ours is None:
            print(f"| {rule} | (not in cautious.torch) | | |")
            continue
        params, grads = data([s for s in all_shapes if len(s) == 2] if matrices else all_shapes)
        paths = [("single", {"foreach": False}), ("foreach", {"foreach": True})]
        if ours_name in OURS_FUSED:
            paths.append(("fused", {"fused": True}))
        for path, flag in paths:
            # torch.optim.Muon has no foreach/fused option: its one path runs against each of ours
            native_flag, native_path = ({}, path) if rule == "Muon" else (flag, path)
            if path == "fused" and rule not in TORCH_FUSED:
                native_flag, native_path = {"foreach": False}, "single"  # no native fused kernel
            makers = {
                f"native {native_path}": None
                if native is None
                else functools.partial(native, lr=LR, **native_flag, **kw),
                f"ours caution=False {path}": functools.partial(ours, lr=LR, caution=False, **flag, **kw),
                f"ours cautious {path}": functools.partial(ours, lr=LR, **flag, **kw),
            }
            steps = {}
            for name, make in makers.items():
                if make is None:
                    continue
                ps = [torch.tensor(p, requires_grad=True) for p in params]
                for p, g in zip(ps, grads, strict=True):
                    p.grad = torch.tensor(g)
                try:
                    steps[name] = make(ps).step
                except (TypeError, ValueError) as e:  # a path the class does not have
                    print(f"| {rule} | {name}: {type(e).__name__}: {e} | | |")
            if not steps:
                continue
            med = alternate(steps, args.rounds, args.warmup)
            native_name = f"native {native_path}"
            report(rule, med, native_name if native_name in med else f"ours caution=False {path}")


# ----------------------------------------------------------------------------------------------- JAX


def jax_rules() -> list[tuple[str, str, Any, dict, bool]]:
    import optax
    import optax.contrib

    return [
        ("adamw", "adamw", optax.adamw, {"weight_decay": 0.01}, False),
        ("nadamw", "nadamw", optax.nadamw, {}, False),
        ("rmsprop (momentum 0.9)", "rmsprop", optax.rmsprop, {"momentum": 0.9}, False),
        ("adafactor", "adafactor", optax.adafactor, {}, False),
        ("muon", "muon", optax.contrib.muon, {}, True),
        ("adopt", "adopt", optax.contrib.adopt, {}, False),
        ("laprop", "laprop", None, {}, False),
    ]


def bench_jax(args: argparse.Namespace) -> None:
    import jax
    import optax

    import cautious.jax as cj

    print(f"jax {jax.__version__}, optax {optax.__version__}, load average {os.getloadavg()[0]:.1f}")
    all_shapes = shapes(args.d, args.layers, args.vocab)
    print("| rule | contender | ms/step | vs native |")
    print("|---|---|---|---|")
    for rule, ours_name, native, kw, matrices in jax_rules():
        if args.rules and ours_name not in args.rules:
            continue
        ours = getattr(cj, ours_name, None)
        if ours is None:
            print(f"| {rule} | (not in cautious.jax) | | |")
            continue
        params, grads = data([s for s in all_shapes if len(s) == 2] if matrices else all_shapes)
        grads = [jax.numpy.asarray(g) for g in grads]
        makers = {
            "native (optax)": None if native is None else native(LR, **kw),
            "ours caution=False": ours(LR, caution=False, **kw),
            "ours cautious": ours(LR, **kw),
        }
        steps = {}
        for name, tx in makers.items():
            if tx is None:
                continue

            @jax.jit
            def step(p, s, g, tx=tx):
                u, s = tx.update(g, s, p)
                return optax.apply_updates(p, u), s

            box = {"p": [jax.numpy.asarray(p) for p in params]}
            box["s"] = tx.init(box["p"])

            def run(box=box, step=step, grads=grads):
                box["p"], box["s"] = step(box["p"], box["s"], grads)
                jax.block_until_ready(box["p"])

            steps[name] = run
        med = alternate(steps, args.rounds, args.warmup)
        report(rule, med, "native (optax)" if "native (optax)" in med else "ours caution=False")


# ----------------------------------------------------------------------------------------------- Keras


def _keras_step(opt: Any, variables: list, grads: list) -> Callable[[], Any]:
    """One jit-compiled ``opt.apply`` over ``variables`` (closed over, not traced as inputs)."""
    import tensorflow as tf

    @tf.function(jit_compile=True)
    def step():
        opt.apply(grads, variables)

    return step


def keras_rules() -> list[tuple[str, str, str | None, dict, bool]]:
    return [
        ("AdamW", "AdamW", "AdamW", {"weight_decay": 0.01}, False),
        ("Nadam", "Nadam", "Nadam", {}, False),
        ("RMSprop (momentum 0.9)", "RMSprop", "RMSprop", {"momentum": 0.9}, False),
        ("Adafactor", "Adafactor", "Adafactor", {}, False),
        ("Muon", "Muon", "Muon", {}, True),
        ("Adopt", "Adopt", None, {}, False),
        ("LaProp", "LaProp", None, {}, False),
    ]


def bench_tensorflow(args: argparse.Namespace) -> None:
    import keras
    import tensorflow as tf

    import cautious.tensorflow as ctf

    print(f"tensorflow {tf.__version__}, keras {keras.__version__}, load average {os.getloadavg()[0]:.1f}")
    all_shapes = shapes(args.d, args.layers, args.vocab)
    print("| rule | contender | ms/step | vs native |")
    print("|---|---|---|---|")
    for rule, ours_name, native_name, kw, matrices in keras_rules():
        if args.rules and ours_name not in args.rules:
            continue
        ours = getattr(ctf, ours_name, None)
        native = getattr(keras.optimizers, native_name, None) if native_name else None
        if ours is None:
            print(f"| {rule} | (not in cautious.tensorflow) | | |")
            continue
        params, grads = data([s for s in all_shapes if len(s) == 2] if matrices else all_shapes)
        grads_t = [tf.constant(g) for g in grads]
        makers = {
            "native (keras)": None if native is None else functools.partial(native, learning_rate=LR, **kw),
            "ours caution=False": functools.partial(ours, learning_rate=LR, caution=False, **kw),
            "ours cautious": functools.partial(ours, learning_rate=LR, **kw),
        }
        steps = {}
        for name, make in makers.items():
            if make is None:
                continue
            opt = make()
            vs = [keras.Variable(p, name=f"p{i}") for i, p in enumerate(params)]  # Keras's Muon routes by path
            opt.build(vs)

            steps[name] = _keras_step(opt, vs, grads_t)
        med = alternate(steps, args.rounds, args.warmup)
        report(rule, med, "native (keras)" if "native (keras)" in med else "ours caution=False")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--framework", choices=("torch", "jax", "tensorflow"))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--rules", nargs="*", help="only these (our class or function names, e.g. Muon adafactor)")
    args = ap.parse_args()
    if args.framework is None:
        for fw in ("torch", "jax", "tensorflow"):
            print(f"\n## {fw}\n", flush=True)
            subprocess.run([sys.executable, __file__, "--framework", fw, *sys.argv[1:]], check=False)
        return
    {"torch": bench_torch, "jax": bench_jax, "tensorflow": bench_tensorflow}[args.framework](args)


if __name__ == "__main__":
    main()
