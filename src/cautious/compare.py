r"""``cautious compare``: train the same MLP in every installed framework and compare.

Every framework (NumPy reference, PyTorch, JAX/optax, TensorFlow/Keras 3) trains the same
model from the same initial weights on the same data, with AdamW, cautious AdamW, Lion and
cautious Lion under identical, explicitly passed hyperparameters (``eps_placement="corrected"``
everywhere). Each framework runs in its own subprocess (:mod:`cautious._compare_workers`);
the parent generates the data with NumPy, streams the workers' progress lines and joins the
results into ``compare.md`` (table), ``compare.json`` and ``compare.png`` in ``--out``.

Model and data: ``X`` (``samples x features``, standard normal) and ``y`` a standardised random
tanh "teacher" network of ``X`` plus noise (std 0.1); the student is
``features -> width -> width -> 1`` with tanh, Glorot-uniform weights and zero biases; loss is
the mean squared error. Full batch unless ``--batch-size`` (then a fixed, seeded batch order).

Cross-framework difference, against a rounding bound. With ``u`` the unit roundoff of the
dtype, ``R`` the longest sum in a step (``max(batch rows, features, width)``) and ``K = 16``
(the conformance suite's operations' worth of rounding per quantity), one step may differ by
``K * R * u`` relative (worst-case summation error of a length-``R`` dot product, ``R * u``, per
quantity); assuming no amplification by the training dynamics the differences add up, so
after ``t`` steps

.. math::  \text{bound}(t) = K \cdot R \cdot u \cdot \max(t, 1)

is compared with ``|loss_fw(t) - loss_numpy(t)| / loss_numpy(t)`` at every step and, at the
end, with ``max|p_fw - p_numpy| / max|p_numpy|`` per tensor. This is a first-order estimate for
the whole training system, not a proof: a sign decision (Lion's ``sign(c)``, the cautious mask)
that rounding flips changes an update by a whole ``lr``, and the dynamics can amplify a
perturbation exponentially. In float64 such flips are very unlikely in a few hundred steps; in
float32 they are expected and curves separate ("chaotic" divergence), which the report shows as
the worst/bound ratio exceeding 1 instead of hiding it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

from cautious._worker_process import run_worker
from cautious.spec.dtypes import unit_roundoff

__all__ = ["main", "build_parser", "make_data", "optimizers", "rounding_bound", "analyse", "FRAMEWORKS"]

#: Frameworks in report order; "numpy" is the reference every other one is compared with.
FRAMEWORKS = ("numpy", "torch", "jax", "tensorflow")

#: Operations' worth of rounding per quantity (the same K as cautious.conformance.bounds.K).
K = 16

LABELS = {
    "adamw": "AdamW",
    "adamw+caution": "cautious AdamW",
    "lion": "Lion",
    "lion+caution": "cautious Lion",
}


def optimizers(adamw_lr: float = 3e-3, lion_lr: float = 3e-4) -> dict[str, dict[str, Any]]:
    """The four optimizer configurations, every hyperparameter explicit.

    AdamW: betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2, eps_placement "corrected".
    Lion: betas (0.9, 0.99), weight_decay 0.1 (Lion's usual 10x smaller lr and larger decay).
    Caution: ``cautious.Caution()`` (mean_clamp, floor 1e-3).
    """
    adamw = dict(lr=adamw_lr, betas=[0.9, 0.999], eps=1e-8, weight_decay=1e-2, eps_placement="corrected")
    lion = dict(lr=lion_lr, betas=[0.9, 0.99], weight_decay=0.1)
    caution = {"normalize": "mean_clamp", "floor": 1e-3}
    return {
        "adamw": {"rule": "adamw", "hparams": adamw, "caution": None},
        "adamw+caution": {"rule": "adamw", "hparams": adamw, "caution": caution},
        "lion": {"rule": "lion", "hparams": lion, "caution": None},
        "lion+caution": {"rule": "lion", "hparams": lion, "caution": caution},
    }


def make_data(
    seed: int = 0,
    samples: int = 512,
    features: int = 8,
    width: int = 64,
    steps: int = 300,
    batch_size: int = 0,
) -> dict[str, np.ndarray]:
    """Data, initial weights ``w0..w5`` (W1, b1, W2, b2, W3, b3) and the batch order, from ``seed``."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((samples, features))
    A = rng.standard_normal((features, 32))
    c = 0.5 * rng.standard_normal(32)
    B = rng.standard_normal((32, 1)) / math.sqrt(32)
    t = np.tanh(X @ A + c) @ B
    y = (t - t.mean()) / t.std() + 0.1 * rng.standard_normal((samples, 1))

    def glorot(fan_in: int, fan_out: int) -> np.ndarray:
        lim = math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-lim, lim, (fan_in, fan_out))

    w = [glorot(features, width), np.zeros(width), glorot(width, width), np.zeros(width)]
    w += [glorot(width, 1), np.zeros(1)]
    data = {"X": X, "y": y, **{f"w{i}": a for i, a in enumerate(w)}}
    if batch_size:
        if not 0 < batch_size <= samples:
            raise ValueError(f"batch_size must be in [1, samples={samples}], got {batch_size}")
        order_rng = np.random.default_rng(seed + 1)
        per_epoch = samples // batch_size
        rows: list[np.ndarray] = []
        while len(rows) < steps:
            perm = order_rng.permutation(samples)
            rows += [perm[i * batch_size : (i + 1) * batch_size] for i in range(per_epoch)]
        data["batches"] = np.stack(rows[:steps]).astype(np.int64)
    return data


def rounding_bound(dtype: str, longest_sum: int, t: int) -> float:
    """``K * R * u * max(t, 1)``: the relative difference allowed after ``t`` steps (see module doc)."""
    return K * longest_sum * unit_roundoff(dtype) * max(t, 1)


def steps_to(losses: list[float], target: float) -> int | None:
    """The first step ``t`` with ``losses[t] <= target``, or None."""
    for t, v in enumerate(losses):
        if v <= target:
            return t
    return None


def analyse(
    results: dict[str, dict[str, Any]],
    params: dict[str, dict[str, np.ndarray]],
    dtype: str,
    longest_sum: int,
    target_fraction: float,
) -> list[dict[str, Any]]:
    """One row per (framework, optimizer): curve summary and the difference from the NumPy reference."""
    ref = results.get("numpy")
    rows = []
    for fw, res in results.items():
        for name, r in res["optimizers"].items():
            losses = np.asarray(r["losses"], dtype=np.float64)
            target = target_fraction * losses[0]
            row: dict[str, Any] = {
                "framework": fw,
                "optimizer": name,
                "initial_loss": float(losses[0]),
                "final_loss": float(losses[-1]),
                "target_loss": float(target),
                "steps_to_target": steps_to(list(losses), target),
                "seconds": r["seconds"],
            }
            if ref is not None and fw != "numpy" and name in ref["optimizers"]:
                rl = np.asarray(ref["optimizers"][name]["losses"], dtype=np.float64)
                n = min(len(rl), len(losses))
                steps = np.arange(n)
                bound = np.array([rounding_bound(dtype, longest_sum, int(t)) for t in steps])
                with np.errstate(divide="ignore", invalid="ignore"):
                    rel = np.abs(losses[:n] - rl[:n]) / np.abs(rl[:n])
                rel = np.where(np.isfinite(rel), rel, np.inf)
                ratio = rel / bound
                over = np.nonzero(ratio > 1)[0]
                p_rel = 0.0
                for key in (k for k in params[fw] if k.startswith(name + "/")):
                    a, b = params[fw][key], params["numpy"][key]
                    scale = float(np.max(np.abs(b))) or 1.0
                    p_rel = max(p_rel, float(np.max(np.abs(a - b))) / scale)
                p_bound = rounding_bound(dtype, longest_sum, n - 1)
                worst = max(float(ratio.max()), p_rel / p_bound)
                row.update(
                    loss_diff_rel=float(rel.max()),
                    loss_diff_abs=float(np.max(np.abs(losses[:n] - rl[:n]))),
                    param_diff_rel=p_rel,
                    bound_final=p_bound,
                    worst_over_bound=worst,
                    within_bound=bool(worst <= 1),
                    first_step_over_bound=int(over[0]) if len(over) else None,
                )
            rows.append(row)
    return rows


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The report as Markdown: settings, the bound, one table row per (framework, optimizer)."""
    lines = [
        "# cautious compare",
        "",
        f"- command: `{meta['command']}`",
        f"- frameworks: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        f"- model: MLP {meta['features']} -> {meta['width']} -> {meta['width']} -> 1 (tanh), MSE loss; "
        f"{meta['samples']} samples, seed {meta['seed']}, "
        + ("full batch" if not meta["batch_size"] else f"batches of {meta['batch_size']} (fixed order)"),
        f"- dtype {meta['dtype']}, {meta['steps']} steps; target loss = {meta['target_fraction']} x initial loss",
        f"- AdamW: {_hp(meta['optimizers']['adamw']['hparams'])}; "
        f"Lion: {_hp(meta['optimizers']['lion']['hparams'])}; caution: Caution(mean_clamp, floor=1e-3)",
        f"- bound: K*R*u*max(t,1) with K={K}, R={meta['longest_sum']} (longest sum in a step), "
        f"u={meta['unit_roundoff']:.3g}; after {meta['steps']} steps: {meta['bound_final']:.3g} (relative)",
        "",
        "| framework | optimizer | initial loss | final loss | steps to target | max rel. loss diff vs numpy "
        "| max rel. param diff | worst/bound | within bound | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        reached = "not reached" if r["steps_to_target"] is None else str(r["steps_to_target"])
        if "worst_over_bound" in r:
            diff = (
                _fmt(r["loss_diff_rel"]),
                _fmt(r["param_diff_rel"]),
                _fmt(r["worst_over_bound"], ".2g"),
                "yes"
                if r["within_bound"]
                else f"NO (from step {r['first_step_over_bound']})"
                if r["first_step_over_bound"] is not None
                else "NO (params)",
            )
        else:
            diff = ("reference", "reference", "-", "-")
        lines.append(
            f"| {r['framework']} | {LABELS.get(r['optimizer'], r['optimizer'])} | {r['initial_loss']:.6g} "
            f"| {r['final_loss']:.6g} | {reached} | {' | '.join(diff)} | {r['seconds']:.1f} |"
        )
    if meta.get("failed"):
        lines += ["", "Failed workers:", ""] + [f"- {fw}: {why}" for fw, why in meta["failed"].items()]
    return "\n".join(lines) + "\n"


def _hp(hp: dict[str, Any]) -> str:
    return ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v}" for k, v in hp.items())


def plot(path: str, results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> bool:
    """Loss curves (a panel per optimizer, a line per framework) and differences; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot written", flush=True)
        return False
    colors = {"numpy": "black", "torch": "tab:red", "jax": "tab:blue", "tensorflow": "tab:orange"}
    styles = {"numpy": (0, (1, 0)), "torch": (0, (6, 3)), "jax": (0, (2, 2)), "tensorflow": (0, (8, 2, 2, 2))}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), constrained_layout=True)
    u = meta["unit_roundoff"]
    floor = u / 10
    for row, rule in enumerate(("adamw", "lion")):
        loss_axes = axes[row, :2]
        for col, name in enumerate((rule, rule + "+caution")):
            ax = loss_axes[col]
            if col == 1 and "numpy" in results and rule in results["numpy"]["optimizers"]:
                ax.plot(
                    results["numpy"]["optimizers"][rule]["losses"],
                    color="0.75",
                    lw=3,
                    label=f"{LABELS[rule]} (numpy), for comparison",
                )
            for fw, res in results.items():
                if name in res["optimizers"]:
                    ax.plot(
                        res["optimizers"][name]["losses"],
                        color=colors.get(fw),
                        ls=styles.get(fw),
                        lw=1.4,
                        label=fw,
                    )
            ax.axhline(meta["target_fraction"] * meta["initial_loss"], color="0.5", lw=0.8, ls=":", label="target")
            ax.set_yscale("log")
            ax.set_title(LABELS[name])
            ax.set_xlabel("step")
            ax.set_ylabel("training loss (MSE)")
            ax.legend(fontsize=8)
        lo = min(a.get_ylim()[0] for a in loss_axes)
        hi = max(a.get_ylim()[1] for a in loss_axes)
        for a in loss_axes:
            a.set_ylim(lo, hi)
        ax = axes[row, 2]
        if "numpy" in results:
            steps = np.arange(meta["steps"] + 1)
            ax.plot(
                steps,
                [rounding_bound(meta["dtype"], meta["longest_sum"], int(t)) for t in steps],
                color="black",
                lw=1,
                ls=":",
                label="bound K*R*u*max(t,1)",
            )
            for fw, res in results.items():
                if fw == "numpy":
                    continue
                for name, ls in ((rule, "-"), (rule + "+caution", "--")):
                    if name not in res["optimizers"] or name not in results["numpy"]["optimizers"]:
                        continue
                    a = np.asarray(res["optimizers"][name]["losses"])
                    b = np.asarray(results["numpy"]["optimizers"][name]["losses"])
                    n = min(len(a), len(b))
                    rel = np.maximum.accumulate(np.maximum(np.abs(a[:n] - b[:n]) / np.abs(b[:n]), floor))
                    ax.plot(rel, color=colors.get(fw), ls=ls, lw=1.4, label=f"{fw} {LABELS[name]}")
        ax.set_yscale("log")
        ax.set_title(f"{LABELS[rule]}: max so far of |loss - numpy| / numpy")
        ax.set_xlabel("step")
        ax.set_ylabel(f"relative difference (0 drawn at u/10 = {floor:.1g})")
        ax.legend(fontsize=7, loc="center right")
    fig.suptitle(
        f"cautious compare: MLP {meta['features']}-{meta['width']}-{meta['width']}-1, {meta['dtype']}, "
        f"{meta['steps']} steps, seed {meta['seed']}"
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _spawn(framework: str, job: dict[str, Any], tmp: str) -> tuple[dict[str, Any] | None, str]:
    return run_worker("cautious._compare_workers", framework, job, tmp)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="cautious compare", description=__doc__.split("\n")[0])
    p.add_argument(
        "--frameworks",
        nargs="+",
        choices=FRAMEWORKS,
        help="frameworks to run (default: every installed one); numpy, the reference, always runs",
    )
    p.add_argument("--steps", type=int, default=300, help="training steps per optimizer (>= 1; default: 300)")
    p.add_argument(
        "--dtype", choices=("float64", "float32"), default="float64", help="dtype of every framework (default: float64)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the initial weights (default: 0)")
    p.add_argument("--samples", type=int, default=512, help="number of training samples (>= 1; default: 512)")
    p.add_argument("--features", type=int, default=8, help="number of input features (>= 1; default: 8)")
    p.add_argument("--width", type=int, default=64, help="width of both hidden layers (>= 1; default: 64)")
    p.add_argument(
        "--batch-size", type=int, default=0, help="mini-batch size in a fixed order, <= --samples (0: full batch)"
    )
    p.add_argument("--adamw-lr", type=float, default=3e-3, help="AdamW learning rate (> 0; default: 3e-3)")
    p.add_argument("--lion-lr", type=float, default=3e-4, help="Lion learning rate (> 0; default: 3e-4)")
    p.add_argument("--target", type=float, default=0.05, help="target loss as a fraction of the initial loss")
    p.add_argument("--out", default="compare-out", help="output directory (default: compare-out/)")
    p.add_argument("--check", action="store_true", help="exit 1 when a difference exceeds the bound")
    return p


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    args = build_parser(parser).parse_args(argv)
    from cautious.backends import available

    installed = available()
    wanted = list(args.frameworks or [fw for fw in FRAMEWORKS if fw in installed])
    missing = [fw for fw in wanted if fw not in installed]
    if missing:
        raise SystemExit(f"not installed: {', '.join(missing)} (installed: {', '.join(installed)})")
    if "numpy" not in wanted:
        print("numpy (the reference) always runs: adding it", flush=True)
    frameworks = [fw for fw in FRAMEWORKS if fw in wanted or fw == "numpy"]
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    for flag, value in (("--samples", args.samples), ("--features", args.features), ("--width", args.width)):
        if value < 1:
            raise SystemExit(f"{flag} must be >= 1, got {value}")
    if not 0 <= args.batch_size <= args.samples:
        raise SystemExit(f"--batch-size must be in [0, --samples={args.samples}], got {args.batch_size}")
    for flag, value in (("--adamw-lr", args.adamw_lr), ("--lion-lr", args.lion_lr)):
        if not (math.isfinite(value) and value > 0):
            raise SystemExit(f"{flag} must be a finite number > 0, got {value}")
    if not 0 < args.target < 1:
        raise SystemExit(f"--target must be in (0, 1): a fraction of the initial loss, got {args.target}")

    os.makedirs(args.out, exist_ok=True)
    data = make_data(args.seed, args.samples, args.features, args.width, args.steps, args.batch_size)
    rows_per_step = args.batch_size or args.samples
    longest_sum = max(rows_per_step, args.features, args.width)
    opts = optimizers(args.adamw_lr, args.lion_lr)
    command = " ".join(["cautious compare", *(sys.argv[2:] if argv is None else argv)])
    results: dict[str, dict[str, Any]] = {}
    params: dict[str, dict[str, np.ndarray]] = {}
    failed: dict[str, str] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "data.npz")
        np.savez(data_path, **data)
        for fw in frameworks:
            print(f"== {fw} (own process)", flush=True)
            job = {
                "framework": fw,
                "data": data_path,
                "dtype": args.dtype,
                "steps": args.steps,
                "optimizers": opts,
                "params_out": os.path.join(tmp, f"{fw}.params.npz"),
            }
            res, why = _spawn(fw, job, tmp)
            if res is None:
                failed[fw] = why
                print(f"[{fw}] FAILED: {why}", flush=True)
                continue
            results[fw] = res
            with np.load(job["params_out"]) as f:
                params[fw] = {k: f[k] for k in f.files}

    initial = float(results["numpy"]["optimizers"]["adamw"]["losses"][0]) if "numpy" in results else float("nan")
    meta: dict[str, Any] = {
        "command": command,
        "versions": {fw: r["version"] for fw, r in results.items()},
        "seed": args.seed,
        "samples": args.samples,
        "features": args.features,
        "width": args.width,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "steps": args.steps,
        "target_fraction": args.target,
        "initial_loss": initial,
        "optimizers": opts,
        "K": K,
        "longest_sum": longest_sum,
        "unit_roundoff": unit_roundoff(args.dtype),
        "bound_final": rounding_bound(args.dtype, longest_sum, args.steps),
        "bound_definition": "relative difference allowed after t steps: K*R*u*max(t,1)",
        "failed": failed,
    }
    rows = analyse(results, params, args.dtype, longest_sum, args.target) if "numpy" in results else []
    md = markdown(rows, meta)
    png = os.path.join(args.out, "compare.png")
    meta["plot"] = png if results and plot(png, results, meta) else None
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "curves": results}, f, indent=1)
    print()
    print(md)
    print(f"wrote {args.out}/compare.md, compare.json" + (", compare.png" if meta["plot"] else ""), end="")
    print(f" in {time.perf_counter() - t0:.0f}s")
    if failed:
        return 1
    if args.check and not all(r.get("within_bound", True) for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
