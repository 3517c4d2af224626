r"""The analysis and the output files of ``cautious research``: ``research.json``, ``research.md``, PNGs.

Definitions (every number in the report is one of these):

* **final loss** of a run: its validation loss after the last step; a run whose training loss
  stopped being finite is *diverged* and has no final loss (a cell with a diverged seed shows
  how many diverged and the statistics of the others).
* **loss vs learning rate**: per framework, variant and learning rate, the mean, standard
  deviation (``ddof=1``), minimum and maximum of the final loss over the seeds.
* **steps to target**: per framework and base rule, the target is ``--target`` times the best
  (over learning rates) seed-mean final loss of the plain optimizer. A variant's steps to target
  is the first step where its seed-mean validation curve is at or below the target, linearly
  interpolated between evaluations, at the variant's own best learning rate; the *speedup* is the
  plain optimizer's steps over the variant's, the quantity the paper reports (about 1.47x).
  The same ratio per seed (each seed's own curve against the same target) gives its range.
* **kept fraction** of a tensor group (embedding, attention, mlp, norms, head) at a step:
  ``sum k / sum n`` over the group's tensors, from the backend's caution telemetry (``k`` kept of
  ``n`` entries in the last step), averaged over seeds, at the middle learning rate.
* **agreement**: in float64, per step ``t``, ``|loss_fw(t) - loss_numpy(t)| / loss_numpy(t)``
  against the bound ``K * R * u * max(t, 1)`` of :func:`cautious.compare.rounding_bound`
  (``R``: the longest sum of a step, ``batch * context`` here); reported as the worst ratio
  to the bound and the first step above it. In the float32 grid, per variant and learning
  rate, the largest difference between the frameworks' seed-mean final losses, next to the
  seeds' standard deviation.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from cautious.compare import rounding_bound
from cautious.research.model import GROUPS

__all__ = ["analyse", "markdown", "write", "final_loss", "steps_to_target", "kept_fractions"]


def final_loss(run: dict[str, Any]) -> float | None:
    """The validation loss after the last step, or None for a diverged or missing run."""
    if run.get("missing") or run.get("diverged_at") is not None or not run.get("val"):
        return None
    t, loss = run["val"][-1]
    return float(loss) if t == run["steps"] and math.isfinite(loss) else None


def crossing(steps: np.ndarray, losses: np.ndarray, target: float) -> float | None:
    """The first step where the piecewise-linear curve ``(steps, losses)`` is at or below ``target``."""
    below = np.nonzero(losses <= target)[0]
    if not len(below):
        return None
    i = int(below[0])
    if i == 0:
        return float(steps[0])
    s0, s1, l0, l1 = steps[i - 1], steps[i], losses[i - 1], losses[i]
    return float(s0 + (s1 - s0) * (l0 - target) / (l0 - l1))


def _grid(runs: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Grid runs by (framework, variant, lr), seeds in order."""
    out: dict[tuple, list[dict[str, Any]]] = {}
    for r in sorted((r for r in runs if r["phase"] == "grid"), key=lambda r: r["seed"]):
        out.setdefault((r["framework"], r["variant"], r["lr"]), []).append(r)
    return out


def lr_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for (fw, variant, lr), rs in _grid(runs).items():
        vals = [v for v in (final_loss(r) for r in rs) if v is not None]
        a = np.asarray(vals)
        rows.append(
            {
                "framework": fw,
                "variant": variant,
                "lr": lr,
                "seeds": len(rs),
                "diverged": len(rs) - len(vals),
                "mean": float(a.mean()) if len(a) else None,
                "std": float(a.std(ddof=1)) if len(a) > 1 else None,
                "min": float(a.min()) if len(a) else None,
                "max": float(a.max()) if len(a) else None,
            }
        )
    return rows


def _best(rows: list[dict[str, Any]], fw: str, variant: str) -> dict[str, Any] | None:
    ok = [r for r in rows if r["framework"] == fw and r["variant"] == variant and r["diverged"] == 0]
    return min(ok, key=lambda r: r["mean"]) if ok else None


def _val_curves(rs: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray] | None:
    """Evaluation steps and the seeds' validation losses (seeds x evals); None when a seed is incomplete."""
    if any(final_loss(r) is None for r in rs):
        return None
    steps = np.array([t for t, _ in rs[0]["val"]], dtype=np.float64)
    return steps, np.array([[v for _, v in r["val"]] for r in rs], dtype=np.float64)


def steps_to_target(runs: list[dict[str, Any]], variants: dict[str, Any], target: float) -> list[dict[str, Any]]:
    rows = lr_table(runs)
    grid = _grid(runs)
    out = []
    for fw in dict.fromkeys(r["framework"] for r in rows):
        for variant, (rule, _) in variants.items():
            base_name = next(v for v, (ru, c) in variants.items() if ru == rule and c is None)
            base, best = _best(rows, fw, base_name), _best(rows, fw, variant)
            row: dict[str, Any] = {"framework": fw, "variant": variant, "baseline": base_name}
            if base is None or best is None:
                out.append({**row, "target": None, "steps": None, "speedup": None})
                continue
            goal = target * base["mean"]
            curves = {name: _val_curves(grid[(fw, name, b["lr"])]) for name, b in ((base_name, base), (variant, best))}
            s_base = crossing(curves[base_name][0], curves[base_name][1].mean(0), goal)
            s_var = crossing(curves[variant][0], curves[variant][1].mean(0), goal)
            per_seed = []
            for cb, cv in zip(curves[base_name][1], curves[variant][1]):
                a, b = crossing(curves[base_name][0], cb, goal), crossing(curves[variant][0], cv, goal)
                per_seed.append(a / b if a is not None and b else None)
            out.append(
                {
                    **row,
                    "lr": best["lr"],
                    "baseline_lr": base["lr"],
                    "target": goal,
                    "steps": s_var,
                    "baseline_steps": s_base,
                    "speedup": s_base / s_var if s_base is not None and s_var else None,
                    "speedup_per_seed": per_seed,
                }
            )
    return out


def kept_fractions(runs: list[dict[str, Any]], params: list[dict[str, Any]], lrs: dict[str, list[float]]) -> dict:
    """Per (framework, variant) at the middle learning rate: steps and per group the seed-mean kept fraction."""
    groups = [p["group"] for p in params]
    out: dict[str, Any] = {}
    for (fw, variant, lr), rs in _grid(runs).items():
        rule_lrs = lrs[rs[0]["rule"]]
        if lr != rule_lrs[len(rule_lrs) // 2] or not all(r.get("stats") for r in rs):
            continue
        n_points = min(len(r["stats"]) for r in rs)
        steps = [t for t, _ in rs[0]["stats"][:n_points]]
        per_group: dict[str, list[float]] = {}
        for g in GROUPS:
            idx = [i for i, gg in enumerate(groups) if gg == g]
            if not idx:
                continue
            fr = []
            for j in range(n_points):
                seeds = []
                for r in rs:
                    kns = r["stats"][j][1]
                    k = sum(kns[i][0] for i in idx)
                    n = sum(kns[i][1] for i in idx)
                    seeds.append(k / n if n else float("nan"))
                fr.append(float(np.mean(seeds)))
            per_group[g] = fr
        out[f"{fw}/{variant}"] = {"framework": fw, "variant": variant, "lr": lr, "steps": steps, "kept": per_group}
    return out


def agreement(runs: list[dict[str, Any]], longest_sum: int, agree_steps: int) -> list[dict[str, Any]]:
    """float64 runs against the NumPy reference (see the module docstring)."""
    f64 = [r for r in runs if r["dtype"] == "float64" and r.get("train") and not r.get("missing")]
    phase = "agree" if any(r["phase"] == "agree" for r in f64) else "grid"
    ref = {(r["variant"], r["lr"], r["seed"]): r for r in f64 if r["framework"] == "numpy" and r["phase"] == phase}
    out = []
    for r in f64:
        key = (r["variant"], r["lr"], r["seed"])
        if r["phase"] != phase or r["framework"] == "numpy" or key not in ref:
            continue
        a, b = np.asarray(r["train"]), np.asarray(ref[key]["train"])
        n = min(len(a), len(b), agree_steps)
        t = np.arange(n)  # train[t] is the loss of the parameters after t steps
        bound = np.array([rounding_bound("float64", longest_sum, int(s)) for s in t])
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.abs(a[:n] - b[:n]) / np.abs(b[:n])
        rel = np.where(np.isfinite(rel), rel, np.inf)
        ratio = rel / bound
        over = np.nonzero(ratio > 1)[0]
        out.append(
            {
                "framework": r["framework"],
                "variant": r["variant"],
                "lr": r["lr"],
                "seed": r["seed"],
                "steps": int(n),
                "max_rel_diff": float(rel.max()),
                "worst_over_bound": float(ratio.max()),
                "first_step_over_bound": int(over[0]) if len(over) else None,
                "rel_diff": rel.tolist(),
            }
        )
    return out


def grid_agreement(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (variant, lr): the spread of the frameworks' seed-mean final losses next to the seeds' std."""
    by: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["variant"], r["lr"]), []).append(r)
    out = []
    for (variant, lr), rs in by.items():
        means = [r["mean"] for r in rs if r["mean"] is not None and r["diverged"] == 0]
        stds = [r["std"] for r in rs if r["std"] is not None and r["diverged"] == 0]
        if len(rs) < 2 or len(means) < 2:
            continue
        out.append(
            {
                "variant": variant,
                "lr": lr,
                "frameworks": len(rs),
                "max_diff_of_means": float(max(means) - min(means)),
                "seed_std": float(np.mean(stds)) if stds else None,
            }
        )
    return out


def analyse(runs: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    rows = lr_table(runs)
    return {
        "lr_table": rows,
        "steps_to_target": steps_to_target(runs, meta["variants"], meta["target"]),
        "kept": kept_fractions(runs, meta["params"], meta["lrs"]),
        "agreement": agreement(runs, meta["longest_sum"], meta["agree_steps"]),
        "grid_agreement": grid_agreement(rows),
    }


def _f(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(summary: dict[str, Any], meta: dict[str, Any], plots: list[str]) -> str:
    c, m = meta["corpus"], meta["model"]
    lines = [
        "# cautious research",
        "",
        f"- command: `{meta['command']}`",
        f"- versions: Python {meta['python']}, " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- corpus: {c['bytes']} bytes from {c['files_used']} of {c['files_available']} standard-library files "
        f"(first {c['chunk']} bytes each; every {c['val_every']}th file for validation: {c['val_bytes']} bytes), "
        f"vocabulary {c['vocab']} bytes, sha256 `{c['sha256'][:16]}...`",
        f"- model: {m['layers']} blocks, d_model {m['d_model']}, {m['heads']} heads, context {m['context']}, "
        f"{meta['n_params']} parameters; batch {meta['batch']} windows; {meta['steps']} steps, constant lr; "
        f"grid in {meta['dtype']} on {', '.join(meta['frameworks'])}; {meta['seeds']} seeds",
        f"- AdamW {_hp(meta['hparams']['adamw'])}, lr {meta['lrs']['adamw']}; "
        f"Lion {_hp(meta['hparams']['lion'])}, lr {meta['lrs']['lion']}",
        "- variants: " + "; ".join(f"{k}: {r} caution={c}" for k, (r, c) in meta["variants"].items()),
        f"- time: {meta['wall_seconds']:.0f} s wall, {meta['cpu_seconds']:.0f} s CPU (all processes)",
        "",
        "## Validation loss vs learning rate",
        "",
        "Final validation loss (nats per byte), mean ± std over seeds [min, max]; `k div` = k seeds diverged.",
        "",
    ]
    rows = summary["lr_table"]
    by = {(r["framework"], r["variant"], r["lr"]): r for r in rows}
    for rule in ("adamw", "lion"):
        names = [v for v, (ru, _) in meta["variants"].items() if ru == rule]
        lrs = meta["lrs"][rule]
        if not names:
            continue
        lines += ["| framework | variant | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |"]
        lines += ["|---|---|" + "---:|" * len(lrs)]
        for fw in meta["frameworks"]:
            for v in names:
                cells = []
                for lr in lrs:
                    r = by.get((fw, v, lr))
                    if r is None or r["mean"] is None:
                        cells.append("all diverged" if r else "")
                        continue
                    cell = f"{_f(r['mean'])} ± {_f(r['std'], '.3f')} [{_f(r['min'], '.3f')}, {_f(r['max'], '.3f')}]"
                    cells.append(cell + (f" ({r['diverged']} div)" if r["diverged"] else ""))
                lines.append(f"| {fw} | {v} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## Steps to target",
        "",
        f"Target: {meta['target']} x the plain optimizer's best seed-mean final loss; each variant at its own "
        "best learning rate; speedup = plain steps / variant steps (seed-mean curves), range over seeds.",
        "",
        "| framework | variant | best lr | target | steps | plain steps | speedup | per seed |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in summary["steps_to_target"]:
        seeds = ", ".join(_f(s, ".2f") for s in r.get("speedup_per_seed") or [])
        lines.append(
            f"| {r['framework']} | {r['variant']} | {_f(r.get('lr'), 'g')} | {_f(r['target'])} | "
            f"{_f(r['steps'], '.0f')} | {_f(r.get('baseline_steps'), '.0f')} | {_f(r['speedup'], '.2f')} | {seeds} |"
        )
    lines += ["", "## Kept fraction", ""]
    if summary["kept"]:
        lines += [
            "Fraction of entries caution keeps, `sum k / sum n` per tensor group, seed mean, at the middle "
            "learning rate: first and last telemetry reading.",
            "",
            "| framework | variant | lr | " + " | ".join(GROUPS) + " |",
            "|---|---|---:|" + "---:|" * len(GROUPS),
        ]
        for k in summary["kept"].values():
            cells = [f"{k['kept'][g][0]:.3f} -> {k['kept'][g][-1]:.3f}" if g in k["kept"] else "-" for g in GROUPS]
            lines.append(f"| {k['framework']} | {k['variant']} | {k['lr']:g} | " + " | ".join(cells) + " |")
    else:
        lines.append("No backend of this run reported caution telemetry, so there is no kept fraction.")
    lines += ["", "## Cross-framework agreement", ""]
    ag = summary["agreement"]
    if ag:
        lines += [
            f"float64, first {meta['agree_steps']} steps, against the NumPy reference; bound "
            f"K*R*u*max(t,1) with R = {meta['longest_sum']}.",
            "",
            "| framework | variant | lr | seed | steps | max rel. loss diff | worst/bound | first step over |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in ag:
            lines.append(
                f"| {r['framework']} | {r['variant']} | {r['lr']:g} | {r['seed']} | {r['steps']} | "
                f"{r['max_rel_diff']:.2e} | {r['worst_over_bound']:.2g} | {_f(r['first_step_over_bound'], 'd')} |"
            )
    else:
        lines.append("No float64 agreement runs (needs the NumPy reference and `--agree-steps` > 0).")
    if summary["grid_agreement"]:
        lines += [
            "",
            f"Grid ({meta['dtype']}): largest difference between the frameworks' seed-mean final losses "
            "next to the seeds' standard deviation (mean over frameworks).",
            "",
            "| variant | lr | frameworks | max diff of means | seed std |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in summary["grid_agreement"]:
            lines.append(
                f"| {r['variant']} | {r['lr']:g} | {r['frameworks']} | {r['max_diff_of_means']:.4f} | "
                f"{_f(r['seed_std'])} |"
            )
    if plots:
        lines += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    if meta["failed"]:
        lines += ["", "## Failed workers", ""] + [f"- {k}: {v.splitlines()[0]}" for k, v in meta["failed"].items()]
    return "\n".join(lines) + "\n"


def _hp(hp: dict[str, Any]) -> str:
    return ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v}" for k, v in hp.items())


COLORS = {
    "adamw": "black",
    "adamw+mean_clamp": "tab:red",
    "adamw+count_plus_one": "tab:orange",
    "adamw+nonzero": "tab:purple",
    "lion": "black",
    "lion+mean_clamp": "tab:blue",
    "lion+count_plus_one": "tab:cyan",
    "lion+nonzero": "tab:green",
}


def plots(out: str, runs: list[dict[str, Any]], summary: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    """research_lr.png, research_curves.png, research_kept.png, research_agreement.png (those with data)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plots written", flush=True)
        return []
    written = []
    rules = [r for r in ("adamw", "lion") if any(v[0] == r for v in meta["variants"].values())]
    fws = meta["frameworks"]
    rows = summary["lr_table"]

    # validation loss vs learning rate
    fig, axes = plt.subplots(len(rules), len(fws), figsize=(4.6 * len(fws), 3.6 * len(rules)), squeeze=False)
    for i, rule in enumerate(rules):
        for j, fw in enumerate(fws):
            ax = axes[i, j]
            for v, (ru, _) in meta["variants"].items():
                if ru != rule:
                    continue
                rs = sorted((r for r in rows if r["framework"] == fw and r["variant"] == v), key=lambda r: r["lr"])
                ok = [r for r in rs if r["mean"] is not None]
                ax.errorbar(
                    [r["lr"] for r in ok],
                    [r["mean"] for r in ok],
                    yerr=[[r["mean"] - r["min"] for r in ok], [r["max"] - r["mean"] for r in ok]],
                    color=COLORS.get(v),
                    marker="o",
                    ms=4,
                    capsize=3,
                    label=v,
                )
            ax.set_xscale("log")
            ax.set_title(f"{fw}: {rule}")
            ax.set_xlabel("learning rate")
            ax.set_ylabel("final val loss (mean, min-max over seeds)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, plt, os.path.join(out, "research_lr.png")))

    # validation curves at each variant's best lr, first framework
    grid = _grid(runs)
    fig, axes = plt.subplots(1, len(rules), figsize=(6 * len(rules), 4), squeeze=False)
    fw = fws[0]
    for i, rule in enumerate(rules):
        ax = axes[0, i]
        for v, (ru, _) in meta["variants"].items():
            best = _best(rows, fw, v)
            if ru != rule or best is None:
                continue
            steps, vals = _val_curves(grid[(fw, v, best["lr"])])
            ax.plot(steps, vals.mean(0), color=COLORS.get(v), label=f"{v} (lr {best['lr']:g})")
            ax.fill_between(steps, vals.min(0), vals.max(0), color=COLORS.get(v), alpha=0.15)
        for r in summary["steps_to_target"]:
            if r["framework"] == fw and r["baseline"] == rule and r["target"] is not None:
                ax.axhline(r["target"], color="0.5", ls=":", lw=0.8)
        ax.set_ylim(top=min(ax.get_ylim()[1], 3.5))
        ax.set_title(f"{fw}: validation loss at each variant's best lr (band: seeds)")
        ax.set_xlabel("step")
        ax.set_ylabel("val loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, plt, os.path.join(out, "research_curves.png")))

    # kept fraction per group
    with_stats = [fw for fw in fws if any(k["framework"] == fw for k in summary["kept"].values())]
    kept = [k for k in summary["kept"].values() if with_stats and k["framework"] == with_stats[0]]
    if kept:
        fig, axes = plt.subplots(1, len(kept), figsize=(4.2 * len(kept), 3.6), squeeze=False)
        for ax, k in zip(axes[0], kept):
            for g, fr in k["kept"].items():
                ax.plot(k["steps"], fr, label=g)
            ax.set_ylim(0, 1)
            ax.set_title(f"{k['framework']}: {k['variant']} (lr {k['lr']:g})", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("kept fraction k/n")
            ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, plt, os.path.join(out, "research_kept.png")))

    # float64 agreement
    if summary["agreement"]:
        fig, ax = plt.subplots(figsize=(7, 4))
        n = max(r["steps"] for r in summary["agreement"])
        t = np.arange(n)
        ax.plot(t, [rounding_bound("float64", meta["longest_sum"], int(s)) for s in t], "k:", label="bound")
        styles = {"torch": "tab:red", "jax": "tab:blue", "tensorflow": "tab:orange"}
        for r in summary["agreement"]:
            rel = np.maximum(np.asarray(r["rel_diff"]), 1e-18)
            ax.plot(rel, color=styles.get(r["framework"]), lw=0.8, alpha=0.7)
        for fw_, c in styles.items():
            ax.plot([], [], color=c, label=fw_)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("|loss - numpy| / numpy (0 drawn at 1e-18)")
        ax.set_title("float64 training loss against the NumPy reference, every variant")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, plt, os.path.join(out, "research_agreement.png")))
    return written


def _save(fig: Any, plt: Any, path: str) -> str:
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _clean(x: Any) -> Any:
    """JSON without NaN/Infinity: non-finite floats become None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def write(out: str, runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Analyse, write research.json, research.md and the PNGs into ``out``; return the markdown."""
    summary = analyse(runs, meta)
    pngs = plots(out, runs, summary, meta)
    md = markdown(summary, meta, pngs)
    with open(os.path.join(out, "research.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "research.json"), "w") as f:
        json.dump(_clean({"meta": meta, "summary": summary, "runs": runs}), f, allow_nan=False)
    return md
