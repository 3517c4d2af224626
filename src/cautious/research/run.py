"""``cautious research``: the grid, the worker processes, the progress bar and the output files.

The parent process builds the corpus, the batches of every seed and the initial weights with
NumPy (:mod:`cautious.research.data`), writes them to one ``.npz``, and runs the grid's training
runs in worker processes, one framework per process (:mod:`cautious._worker_process`), at most
``--jobs`` at a time. Each framework therefore trains on the same batches in the same order from
the same initial weights. Two sets of runs:

* **grid**: every variant (:data:`VARIANTS`) x learning rate x seed, for ``--steps`` steps in
  ``--dtype`` (float32 by default), in every framework of ``--frameworks``;
* **agreement**: every variant at the middle learning rate and seed 0 for ``--agree-steps``
  steps in float64, in every installed framework including the NumPy reference; the report
  compares each with the reference against the rounding bound of ``cautious compare``. When
  the grid itself runs in float64 with the reference among its frameworks (``--quick``), its
  runs serve as the agreement set and no extra runs are made.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

from cautious._worker_process import finish_worker, start_worker
from cautious.research import data as D
from cautious.research import model as M

__all__ = ["VARIANTS", "HPARAMS", "PRESETS", "build_parser", "main", "plan_runs"]

#: Hyperparameters other than the learning rate, per base rule (every one explicit; constant lr).
HPARAMS: dict[str, dict[str, Any]] = {
    "adamw": dict(betas=[0.9, 0.99], eps=1e-8, weight_decay=0.01, eps_placement="corrected"),
    "lion": dict(betas=[0.9, 0.99], weight_decay=0.1),
}

#: The grid's optimizers: name -> (base rule, keyword arguments of ``cautious.Caution`` or None).
#: Each cautious variant is compared with the variant of the same rule whose caution is None.
VARIANTS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "adamw": ("adamw", None),
    "adamw+mean_clamp": ("adamw", {"normalize": "mean_clamp", "floor": 1e-3}),
    "adamw+count_plus_one": ("adamw", {"normalize": "count_plus_one"}),
    "adamw+nonzero": ("adamw", {"normalize": "mean_clamp", "floor": 1e-3, "denominator": "nonzero"}),
    "lion": ("lion", None),
    "lion+mean_clamp": ("lion", {"normalize": "mean_clamp", "floor": 1e-3}),
    "lion+nonzero": ("lion", {"normalize": "mean_clamp", "floor": 1e-3, "denominator": "nonzero"}),
}

#: The torch path of every run: the single-tensor loop, so that torch's numbers do not depend on whether the
#: native fused CPU kernel can be built on the machine (the CPU default with caution when it can).
TORCH_OPTIONS: dict[str, Any] = {"foreach": False}

#: Settings of the default run and of ``--quick``; any option given on the command line wins.
PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(
        d_model=32,
        heads=4,
        layers=2,
        context=32,
        batch=16,
        steps=600,
        seeds=3,
        adamw_lrs=[1e-3, 3e-3, 1e-2],
        lion_lrs=[3e-4, 1e-3, 3e-3],
        corpus_bytes=400_000,
        val_windows=96,
        dtype="float32",
        agree_steps=40,
    ),
    "quick": dict(
        d_model=16,
        heads=2,
        layers=1,
        context=16,
        batch=8,
        steps=30,
        seeds=2,
        adamw_lrs=[3e-3, 1e-2],
        lion_lrs=[3e-4, 1e-3],
        corpus_bytes=60_000,
        val_windows=16,
        dtype="float64",
        agree_steps=30,
    ),
}

#: Relative cost of a step per framework (measured: the NumPy reference is about 2.5x torch's).
COST = {"numpy": 2.5, "torch": 1.0, "jax": 1.0, "tensorflow": 1.0}


def rule_of(variant: str) -> str:
    return VARIANTS[variant][0]


def lrs_of(args: argparse.Namespace, rule: str) -> list[float]:
    return list(args.adamw_lrs if rule == "adamw" else args.lion_lrs)


def plan_runs(args: argparse.Namespace, installed: list[str]) -> list[dict[str, Any]]:
    """Every training run: grid and agreement sets (see the module docstring)."""
    runs: list[dict[str, Any]] = []

    def add(phase: str, fw: str, dtype: str, variant: str, lr: float, seed: int, steps: int) -> None:
        rule, caution = VARIANTS[variant]
        runs.append(
            {
                "id": f"{phase}/{fw}/{variant}/lr={lr:g}/seed={seed}",
                "phase": phase,
                "framework": fw,
                "dtype": dtype,
                "variant": variant,
                "rule": rule,
                "lr": lr,
                "seed": seed,
                "steps": steps,
                "hparams": {"lr": lr, **HPARAMS[rule]},
                "caution": caution,
                "caution_stats": bool(caution),  # the backends' opt-in telemetry, where it is opt-in
                "torch_options": TORCH_OPTIONS,
            }
        )

    for fw in args.frameworks:
        for variant in args.variants:
            for lr in lrs_of(args, rule_of(variant)):
                for seed in range(args.seeds):
                    add("grid", fw, args.dtype, variant, lr, seed, args.steps)
    grid_is_agreement = args.dtype == "float64" and "numpy" in args.frameworks
    if args.agree_steps and not grid_is_agreement:
        for fw in [f for f in FRAMEWORK_ORDER if f in installed]:
            for variant in args.variants:
                lrs = lrs_of(args, rule_of(variant))
                add("agree", fw, "float64", variant, lrs[len(lrs) // 2], 0, args.agree_steps)
    return runs


FRAMEWORK_ORDER = ("numpy", "torch", "jax", "tensorflow")


def make_jobs(runs: list[dict[str, Any]], jobs: int) -> list[list[dict[str, Any]]]:
    """Runs grouped into worker processes: one framework, dtype and phase each, the biggest first.

    A framework's grid is cut into ``jobs`` contiguous pieces (runs sorted by variant and learning
    rate, so a piece shares compiled steps across seeds) to keep ``jobs`` processes busy.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["framework"], r["dtype"], r["phase"]), []).append(r)
    out = []
    for (_, _, phase), rs in groups.items():
        pieces = max(1, min(jobs, len(rs))) if phase == "grid" else 1
        size = -(-len(rs) // pieces)
        out += [rs[i : i + size] for i in range(0, len(rs), size)]
    return sorted(out, key=lambda rs: -sum(COST[r["framework"]] * r["steps"] for r in rs))


class Progress:
    """A plain-text progress bar on stderr, fed by the workers' ``@progress`` lines."""

    def __init__(self, runs: list[dict[str, Any]], stream: Any = None) -> None:
        self.steps = {r["id"]: r["steps"] for r in runs}
        self.total = sum(self.steps.values())
        self.done: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.shown = -1

    def update(self, run_id: str, done: int) -> None:
        with self.lock:
            self.done[run_id] = min(done, self.steps.get(run_id, done))

    def render(self, force: bool = False) -> None:
        with self.lock:
            done = sum(self.done.values())
            finished = sum(1 for k, v in self.done.items() if v >= self.steps[k])
        frac = done / max(self.total, 1)
        pct = int(100 * frac)
        if not (self.tty or force or pct // 5 > self.shown // 5):
            return
        self.shown = pct
        elapsed = time.perf_counter() - self.t0
        eta = f"{elapsed * (1 - frac) / frac:5.0f}s" if frac > 0.02 else "    ?"
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        line = (
            f"[{bar}] {pct:3d}%  steps {done}/{self.total}  runs {finished}/{len(self.steps)}  "
            f"elapsed {elapsed:5.0f}s  eta {eta}"
        )
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()


def _reader(proc: subprocess.Popen, progress: Progress, log: Any) -> None:
    for line in proc.stdout:
        if line.startswith("@progress "):
            _, run_id, done = line.split()
            progress.update(run_id, int(done))
        else:
            log.write(line)


def run_jobs(
    jobs: list[list[dict[str, Any]]], base: dict[str, Any], parallel: int, tmp: str, logdir: str, progress: Progress
) -> tuple[dict[str, dict[str, Any]], dict[str, str], dict[str, str]]:
    """Run the worker processes, ``parallel`` at a time; returns runs by id, failures, versions."""
    pending = list(enumerate(jobs))
    running: list[tuple[str, subprocess.Popen, str, threading.Thread, Any]] = []
    results: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    versions: dict[str, str] = {}
    while pending or running:
        while pending and len(running) < parallel:
            i, runs = pending.pop(0)
            fw, dtype, phase = runs[0]["framework"], runs[0]["dtype"], runs[0]["phase"]
            name = f"{i:02d}-{phase}-{fw}-{dtype}"
            job = {**base, "framework": fw, "dtype": dtype, "steps": runs[0]["steps"], "runs": runs}
            log = open(os.path.join(logdir, name + ".log"), "w")  # noqa: SIM115 (closed when the job ends)
            proc, out = start_worker(
                "cautious.research._workers",
                name,
                job,
                tmp,
                one_thread=True,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
            reader = threading.Thread(target=_reader, args=(proc, progress, log), daemon=True)
            reader.start()
            running.append((name, proc, out, reader, log))
        time.sleep(0.25)
        progress.render()
        for item in [r for r in running if r[1].poll() is not None]:
            name, proc, out, reader, log = item
            running.remove(item)
            reader.join()
            log.close()
            res, why = finish_worker(proc, out)
            if res is None:
                with open(log.name) as f:
                    tail = f.read()[-2000:]
                failed[name] = f"{why}; log {log.name}:\n{tail}"
                print(f"\n[{name}] FAILED: {why} (log: {log.name})", file=sys.stderr, flush=True)
                continue
            versions[res["framework"]] = res["version"]
            results.update(res["runs"])
    if progress.shown < 100:
        progress.render(force=True)
    if progress.tty:
        progress.stream.write("\n")
    return results, failed, versions


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="cautious research", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny model and grid in float64 (under a minute)")
    p.add_argument(
        "--frameworks",
        nargs="+",
        choices=FRAMEWORK_ORDER,
        help="frameworks of the grid (default: every installed one; the NumPy reference only with --quick or alone)",
    )
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), help="optimizers (default: all)")
    p.add_argument("--adamw-lrs", type=float, nargs="+", help="AdamW learning rates (default 1e-3 3e-3 1e-2)")
    p.add_argument("--lion-lrs", type=float, nargs="+", help="Lion learning rates (default 3e-4 1e-3 3e-3)")
    p.add_argument("--seeds", type=int, help="seeds 0..N-1: initial weights and batch order (default 3)")
    p.add_argument("--steps", type=int, help="training steps per run (default 600)")
    p.add_argument("--batch", type=int, help="windows per batch (default 16)")
    p.add_argument("--context", type=int, help="tokens per window (default 32)")
    p.add_argument("--d-model", type=int, help="model width (default 32)")
    p.add_argument("--heads", type=int, help="attention heads (default 4)")
    p.add_argument("--layers", type=int, help="transformer blocks (default 2)")
    p.add_argument("--corpus-bytes", type=int, help="bytes of standard-library source (default 400000)")
    p.add_argument("--val-windows", type=int, help="validation windows (default 96)")
    p.add_argument("--dtype", choices=("float32", "float64"), help="dtype of the grid (default float32)")
    p.add_argument("--agree-steps", type=int, help="steps of the float64 agreement runs (default 40; 0: none)")
    p.add_argument("--evals", type=int, default=24, help="validation evaluations per run (default 24)")
    p.add_argument("--stats-every", type=int, default=0, help="telemetry every N steps (default: steps / 50)")
    p.add_argument(
        "--target",
        type=float,
        default=1.0,
        help="target validation loss for steps-to-target, times the plain optimizer's best final loss (default 1.0)",
    )
    p.add_argument("--jobs", type=int, default=2, help="worker processes at a time (default 2)")
    p.add_argument("--out", default="research-out", help="output directory (default: research-out/)")
    return p


def resolve(args: argparse.Namespace, installed: list[str]) -> argparse.Namespace:
    """Fill unset options from the preset; validate."""
    preset = PRESETS["quick" if args.quick else "default"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.frameworks is None:
        frameworks = [fw for fw in FRAMEWORK_ORDER if fw in installed]
        if not args.quick and len(frameworks) > 1:
            frameworks.remove("numpy")  # the reference is slow; it runs the agreement set
        args.frameworks = frameworks
    missing = [fw for fw in args.frameworks if fw not in installed]
    if missing:
        raise SystemExit(f"not installed: {', '.join(missing)} (installed: {', '.join(installed)})")
    args.frameworks = [fw for fw in FRAMEWORK_ORDER if fw in args.frameworks]
    args.variants = [v for v in VARIANTS if v in (args.variants or VARIANTS)]
    for name in ("steps", "seeds", "batch", "context", "d_model", "heads", "layers", "jobs", "evals"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.agree_steps < 0 or args.agree_steps > args.steps and args.dtype == "float64":
        raise SystemExit(f"--agree-steps must be in [0, steps={args.steps}] here, got {args.agree_steps}")
    if not args.stats_every:
        args.stats_every = max(1, args.steps // 50)
    return args


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    from cautious.backends import available
    from cautious.research import report

    argv = sys.argv[2:] if argv is None else argv
    installed = list(available())
    args = resolve(build_parser(parser).parse_args(argv), installed)
    t0 = time.perf_counter()
    c0 = os.times()
    corpus = D.build_corpus(args.corpus_bytes)
    cfg = M.ModelConfig(corpus.meta["vocab"], args.d_model, args.heads, args.layers, args.context)
    runs = plan_runs(args, installed)
    steps = max(r["steps"] for r in runs)
    arrays: dict[str, np.ndarray] = {"val": D.make_val(corpus.val, args.val_windows, args.context)}
    for seed in range(args.seeds):
        arrays[f"batches{seed}"] = D.make_batches(corpus.train, seed, steps, args.batch, args.context)
        for i, p in enumerate(D.init_params(cfg, seed)):
            arrays[f"init{seed}_{i}"] = p
    os.makedirs(args.out, exist_ok=True)
    logdir = os.path.join(args.out, "logs")
    os.makedirs(logdir, exist_ok=True)
    n_params = sum(int(np.prod(s.shape)) for s in M.param_specs(cfg))
    print(
        f"cautious research: {len(runs)} runs ({sum(r['steps'] for r in runs)} steps) of a {n_params}-parameter "
        f"transformer on {corpus.meta['bytes']} bytes of standard-library source; frameworks "
        f"{', '.join(args.frameworks)}; {args.jobs} worker processes at a time",
        file=sys.stderr,
        flush=True,
    )
    progress = Progress(runs)
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "data.npz")
        np.savez(data_path, **arrays)
        base = {
            "data": data_path,
            "model": cfg._asdict(),
            "eval_every": max(1, args.steps // args.evals),
            "stats_every": args.stats_every,
        }
        results, failed, versions = run_jobs(make_jobs(runs, args.jobs), base, args.jobs, tmp, logdir, progress)
    c1 = os.times()
    for r in runs:
        r.update(results.get(r["id"], {"missing": True}))
    meta = {
        "command": " ".join(["cautious research", *argv]),
        "versions": versions,
        "python": sys.version.split()[0],
        "corpus": corpus.meta,
        "model": cfg._asdict(),
        "n_params": n_params,
        "params": [s._asdict() for s in M.param_specs(cfg)],
        "batch": args.batch,
        "steps": args.steps,
        "seeds": args.seeds,
        "dtype": args.dtype,
        "frameworks": args.frameworks,
        "variants": {v: VARIANTS[v] for v in args.variants},
        "hparams": HPARAMS,
        "lrs": {"adamw": args.adamw_lrs, "lion": args.lion_lrs},
        "agree_steps": args.agree_steps,
        "eval_every": base["eval_every"],
        "stats_every": args.stats_every,
        "target": args.target,
        "longest_sum": M.longest_sum(cfg, args.batch),
        "wall_seconds": time.perf_counter() - t0,
        "cpu_seconds": (c1.children_user + c1.children_system + c1.user + c1.system)
        - (c0.children_user + c0.children_system + c0.user + c0.system),
        "failed": failed,
    }
    summary = report.write(args.out, runs, meta)
    print(summary, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
