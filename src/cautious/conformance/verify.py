"""``cautious verify``: check our backends or a third-party port against the reference.

Each target runs in its own subprocess (frameworks never share a process); the
parent streams their progress lines and prints one table at the end::

    implementation     rule   option          dtype    result  examples  worst/bound
    torch/foreach      adamw  mean_clamp      float32  pass          10   0.12

A third-party target (``--target``, ``--config``, ``--known``) gets a conformance
profile instead: one verdict per clause of the spec (:mod:`cautious.conformance.profile`),
each deviation with its own runnable example. ``--json FILE`` writes
``{"targets": [{name, conforms, declared, profile: {clause: {status, example}}}], "cells": [...]}``.
The exit code is 0 exactly when every target conforms and every cell passed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from cautious import spec

#: Our backends' lanes: backend -> [(lane, "module:Adapter", kwargs, extra environment)].
LANES: dict[str, list[tuple[str, str, dict[str, Any], dict[str, str]]]] = {
    "numpy": [("reference", "cautious.conformance.case:NumpyAdapter", {}, {})],
    "torch": [
        ("single", "cautious.conformance.adapters.torch:TorchAdapter", {"impl": "single"}, {}),
        ("foreach", "cautious.conformance.adapters.torch:TorchAdapter", {"impl": "foreach"}, {}),
        ("fused", "cautious.conformance.adapters.torch:TorchAdapter", {"impl": "fused"}, {}),
    ],
    "jax": [
        ("eager", "cautious.conformance.adapters.jax:JaxAdapter", {"jit": False}, {"JAX_ENABLE_X64": "1"}),
        ("jit", "cautious.conformance.adapters.jax:JaxAdapter", {"jit": True}, {"JAX_ENABLE_X64": "1"}),
    ],
    "tensorflow": [
        ("eager", "cautious.conformance.adapters.tensorflow:TFAdapter", {"mode": "eager"}, {}),
        ("function", "cautious.conformance.adapters.tensorflow:TFAdapter", {"mode": "function"}, {}),
        ("xla", "cautious.conformance.adapters.tensorflow:TFAdapter", {"mode": "xla"}, {}),
    ],
}

EPILOG = """\
TOML keys of a [[target]] table (docs/verify.md has the full reference):
  name, kind (torch|optax|keras|numpy), path ("module:Name"), rule, dtypes, sys_path,
  [hparams] spec name = port name, [fixed] constructor arguments as is,
  [options] what it implements (caution = {normalize, floor} or false, eps_placement, decay_masked),
  [state] spec field = port state name (step = "group:step" for a counter in the param group),
  [deviations] clause = declared deviation, [pin] spec hyperparameter = value,
  allow_nan, max_examples, seed, setup ("module:function"), load_state / dump_state hooks,
  requires (distributions), source.
Clauses: mask_boundary nan sign_vs_underflow normalization eps_placement bias_correction
  state_untouched weight_decay step_counting dtype errors trajectory resume_plain_checkpoint random.
Known ports and their profiles: docs/ports.md (cautious verify --known).
"""

OPTIONS = ("off", "mean_clamp", "count_plus_one", "exact", "none", "wrapper")

#: Caution for any optimizer (option ``wrapper``): per backend, the lane whose wrapper is checked around
#: every rule against the spec's wrapper (:mod:`cautious.conformance.wrapper`): backend -> (lane, adapter, kwargs).
WRAPPER_LANES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "numpy": ("reference", "cautious.conformance.wrapper:NumpyWrapperAdapter", {}),
    "torch": ("foreach", "cautious.conformance.adapters.torch:TorchWrapperAdapter", {"impl": "foreach"}),
    "jax": ("jit", "cautious.conformance.adapters.jax:JaxWrapperAdapter", {"jit": True}),
    "tensorflow": ("eager", "cautious.conformance.adapters.tensorflow:TFWrapperAdapter", {"mode": "eager"}),
}

#: The rules ``cautious verify`` checks on our backends by default: the spec's elementwise rules
#: (which also have the clause probes of the profile) and Adafactor (random cells only).
BACKEND_RULES = spec.RULES


@dataclasses.dataclass
class Cell:
    implementation: str
    rule: str
    option: str
    dtype: str
    result: str  # pass | fail | skip
    examples: int = 0
    worst: float = 0.0
    seconds: float = 0.0
    detail: str = ""


def _caution(option: str) -> Any:
    return False if option == "off" else spec.Caution(option)


def _run_cells(name: str, adapter: Any, rules, options, dtypes, max_examples: int, seed: int) -> list[Cell]:
    from cautious.conformance.runner import ConformanceError, run_conformance

    cells = []
    for rule in rules:
        for option in options:
            for dtype in dtypes:
                t0 = time.perf_counter()
                pin = None if option == "declared" else {"caution": _caution(option)}
                try:
                    res = run_conformance(
                        adapter, rules=(rule,), dtypes=(dtype,), max_examples=max_examples, seed=seed, pin=pin
                    )
                    n = sum(res.examples.values())
                    cell = Cell(name, rule, option, dtype, "pass", n, res.worst, detail="; ".join(sorted(res.notes)))
                except ConformanceError as e:
                    skipped = "no example ran" in str(e)
                    cell = Cell(name, rule, option, dtype, "skip" if skipped else "fail", detail=str(e))
                except Exception as e:  # the implementation raised outside a step: type, message, its frame
                    from cautious.conformance.profile import describe_exception

                    cell = Cell(name, rule, option, dtype, "fail", detail=f"{name} raised {describe_exception(e)}")
                cell.seconds = time.perf_counter() - t0
                print(
                    f"[{name}] {rule:<6} {option:<15} {dtype:<8} {cell.result.upper():<4} "
                    f"{cell.examples:>4} ex  worst {cell.worst:.2f}  ({cell.seconds:.1f}s)",
                    flush=True,
                )
                cells.append(cell)
    return cells


def _run_wrapper_cells(name: str, adapter: Any, rules, dtypes, max_examples: int, seed: int) -> list[Cell]:
    """One cell per rule: the backend's wrapper around the rule's caution-free optimizer (option ``wrapper``)."""
    from cautious.conformance.runner import ConformanceError
    from cautious.conformance.wrapper import run_wrapper_conformance

    cells = []
    for rule in rules:
        t0 = time.perf_counter()
        dtype = ",".join(dtypes)
        try:
            res = run_wrapper_conformance(adapter, rules=(rule,), dtypes=dtypes, max_examples=max_examples, seed=seed)
            cell = Cell(name, rule, "wrapper", dtype, "pass", sum(res.examples.values()), res.worst)
        except ConformanceError as e:
            cell = Cell(name, rule, "wrapper", dtype, "skip" if "no wrapper example ran" in str(e) else "fail",
                        detail=str(e))  # fmt: skip
        except Exception as e:
            from cautious.conformance.profile import describe_exception

            cell = Cell(name, rule, "wrapper", dtype, "fail", detail=f"{name} raised {describe_exception(e)}")
        cell.seconds = time.perf_counter() - t0
        print(
            f"[{name}] {rule:<6} {'wrapper':<15} {dtype:<8} {cell.result.upper():<4} "
            f"{cell.examples:>4} ex  worst {cell.worst:.2f}  ({cell.seconds:.1f}s)",
            flush=True,
        )
        cells.append(cell)
    return cells


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job (a backend, or a third-party target) in this process: ``{"cells": [...], "profiles": [...]}``."""
    import warnings

    import numpy as np

    from cautious.conformance import register_profiles
    from cautious.conformance.profile import (
        CLAUSES,
        PROFILED_RULES,
        ClauseResult,
        conformance_profile,
        describe_exception,
    )
    from cautious.conformance.targets import Target, load_adapter, resolve

    # the suite feeds infinities, NaN and subnormals on purpose: numpy's warnings about them are noise
    np.seterr(all="ignore")
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    register_profiles()
    from hypothesis import settings

    settings.load_profile("ci")
    dtypes = tuple(job["dtypes"])
    cells: list[Cell] = []
    profiles: list[dict[str, Any]] = []
    if job["kind"] == "backend":
        wrapper = "wrapper" in job["options"]
        job = {**job, "options": [o for o in job["options"] if o != "wrapper"]}
        for lane, path, kwargs, _ in LANES[job["backend"]]:
            name = f"{job['backend']}/{lane}"
            try:
                adapter = resolve(path)(**kwargs)
            except Exception as e:  # an uninstalled or broken lane is a failure, said plainly
                cells.append(Cell(name, "-", "-", "-", "fail", detail=f"cannot build adapter: {e!r}"))
                print(f"[{name}] cannot build adapter: {e!r}", flush=True)
                continue
            lane_cells = _run_cells(
                name, adapter, job["rules"], job["options"], dtypes, job["max_examples"], job["seed"]
            )
            cells += lane_cells
            # the clause probes are written for the elementwise rules (PROFILED_RULES); the others are judged
            # by their cells only
            profiled = tuple(r for r in job["rules"] if r in PROFILED_RULES)
            if not profiled:
                continue
            prof = conformance_profile(
                adapter,
                rules=profiled,
                dtypes=dtypes,
                seed=job["seed"],
                clauses=[c for c in CLAUSES if c != "random"],
            )
            bad = [c for c in lane_cells if c.result == "fail"]
            prof.clauses["random"] = (
                ClauseResult("deviates", None, bad[0].detail)
                if bad
                else ClauseResult("matches", detail="see the cells")
            )
            profiles.append({**prof.to_json(), "name": name})
        if wrapper and job["backend"] in WRAPPER_LANES:
            lane, path, kwargs = WRAPPER_LANES[job["backend"]]
            name = f"{job['backend']}/{lane}-wrapper"
            try:
                adapter = resolve(path)(**kwargs)
                budget = max(4, job["max_examples"] // 2)  # half a cell's budget: the group stays within +30 s
                cells += _run_wrapper_cells(name, adapter, job["rules"], dtypes, budget, job["seed"])
            except Exception as e:
                cells.append(Cell(name, "-", "wrapper", "-", "fail", detail=f"cannot build adapter: {e!r}"))
    else:
        target = Target(**job["target"])
        try:
            adapter = load_adapter(target)
        except Exception as e:
            text = describe_exception(e)
            print(f"[{target.name}] cannot load the target: {text}", flush=True)
            return {"cells": [dataclasses.asdict(Cell(target.name, target.rule, "declared", "-", "fail", detail=text))],
                    "profiles": []}  # fmt: skip
        for note in target.notes():
            print(f"[{target.name}] note: {note}", flush=True)
        dts = tuple(d for d in dtypes if d in target.dtypes) or target.dtypes
        t0 = time.perf_counter()
        prof = conformance_profile(
            adapter,
            rules=(target.rule,),
            dtypes=dts,
            budget=target.max_examples or job["max_examples"],
            seed=job["seed"] if target.seed is None else target.seed,
            deviations=target.deviations,
            declared=target.declared(),
            allow_nan=target.allow_nan and job.get("allow_nan", True),
        )
        out = prof.to_json()
        out["seconds"] = round(time.perf_counter() - t0, 1)
        out["notes"] = target.notes() + list(getattr(adapter, "notes", lambda: [])())
        out["source"] = target.source
        out["versions"] = _versions(target)
        profiles.append(out)
        print(f"[{target.name}] profile in {out['seconds']}s:\n{prof.table()}", flush=True)
    return {"cells": [dataclasses.asdict(c) for c in cells], "profiles": profiles}


def _versions(target) -> dict[str, str]:
    """Installed versions of the target's distributions and of torch/jax/keras."""
    from importlib import metadata

    out = {}
    for dist in (*target.requires, {"torch": "torch", "optax": "optax", "keras": "keras"}.get(target.kind, "")):
        if dist:
            try:
                out[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                out[dist] = "not installed"
    return out


def _spawn(job: dict[str, Any], env_extra: dict[str, str]) -> tuple[list[Cell], list[dict[str, Any]]]:
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = os.path.join(tmp, "job.json"), os.path.join(tmp, "cells.json")
        with open(inp, "w") as f:
            json.dump(job, f)
        env = {**os.environ, **env_extra, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run([sys.executable, "-m", "cautious.conformance.verify", "--worker", inp, out], env=env)
        if proc.returncode != 0 or not os.path.exists(out):
            label = job.get("backend") or job["target"]["name"] or job["target"]["path"]
            return [Cell(str(label), "-", "-", "-", "fail", detail=f"worker exited with status {proc.returncode}")], []
        with open(out) as f:
            data = json.load(f)
        return [Cell(**c) for c in data["cells"]], data["profiles"]


def _table(cells: list[Cell]) -> str:
    head = ("implementation", "rule", "option", "dtype", "result", "examples", "worst/bound")
    rows = [head] + [
        (c.implementation, c.rule, c.option, c.dtype, c.result, str(c.examples), f"{c.worst:.2f}") for c in cells
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="cautious verify", description=__doc__.split("\n")[0])
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--backend", action="append", default=[], help="one of ours: numpy, torch, jax, tensorflow")
    p.add_argument("--target", help="a third-party implementation: 'package.module:Name'")
    p.add_argument("--kind", choices=("torch", "optax", "keras", "numpy"), help="what --target is")
    p.add_argument("--rule", choices=spec.RULES, help="the spec rule --target implements")
    p.add_argument("--hparam", action="append", default=[], metavar="SPEC=NAME", help="name mapping, repeatable")
    p.add_argument("--fixed", action="append", default=[], metavar="NAME=JSON", help="constructor argument")
    p.add_argument("--option", action="append", default=[], metavar="KEY=JSON", help="implemented option")
    p.add_argument("--state", action="append", default=[], metavar="FIELD=NAME", help="state mapping")
    p.add_argument("--path", action="append", default=[], help="add a directory to sys.path for --target")
    p.add_argument("--config", action="append", default=[], help="a TOML file describing targets (docs/verify.md)")
    p.add_argument(
        "--known",
        action="store_true",
        help="verify the known public ports that are installed (docs/ports.md); "
        "--path DIR adds a directory holding the paper's c_adamw.py / c_lion.py",
    )
    p.add_argument("--pin", action="append", default=[], metavar="SPEC=JSON", help="pin a spec hyperparameter")
    p.add_argument("--deviation", action="append", default=[], metavar="CLAUSE=TEXT", help="a declared deviation")
    p.add_argument("--no-nan", action="store_true", help="no NaN/inf inputs (the nan clause is untested)")
    p.add_argument("--setup", default="", metavar="MODULE:FUNCTION", help="called before --target is imported")
    p.add_argument("--rules", nargs="+", default=list(BACKEND_RULES), help="rules to check for our backends")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    p.add_argument("--options", nargs="+", default=list(OPTIONS), help="caution settings for our backends")
    p.add_argument("--max-examples", type=int, default=10, help="examples per cell (the budget)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report as JSON to this file")
    return p


def _pairs(items: list[str], parse_json: bool) -> dict[str, Any]:
    """``KEY=VALUE`` items; VALUE is JSON, or a name (``a,b`` is a list of names: betas=b1,b2)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        out[key] = json.loads(value) if parse_json else (value.split(",") if "," in value else value)
    return out


def jobs_from_args(args: argparse.Namespace) -> list[tuple[dict[str, Any], dict[str, str]]]:
    from cautious.backends import BACKENDS, available
    from cautious.conformance.targets import Target

    common = {"dtypes": args.dtypes, "max_examples": args.max_examples, "seed": args.seed, "allow_nan": not args.no_nan}
    jobs = []
    targets: list[Target] = []
    for path in args.config:
        targets += Target.from_toml(path)
    if args.known:
        from cautious.conformance.known import installed_known

        found, skipped = installed_known(tuple(os.path.abspath(p) for p in args.path))
        for t, why in skipped:
            print(f"== {t.name}: skipped ({why})", flush=True)
        targets += found
        if not found:
            raise SystemExit("--known: none of the known ports is installed (docs/ports.md)")
    if args.target:
        if not (args.kind and args.rule):
            raise SystemExit("--target needs --kind and --rule")
        targets.append(
            Target(
                kind=args.kind,
                path=args.target,
                rule=args.rule,
                hparams=_pairs(args.hparam, False),
                fixed=_pairs(args.fixed, True),
                options=_pairs(args.option, True),
                state=_pairs(args.state, False) or None,
                sys_path=tuple(os.path.abspath(p) for p in args.path),
                deviations=_pairs(args.deviation, False),
                pin=_pairs(args.pin, True),
                setup=args.setup,
            )
        )
    for t in targets:
        t.sys_path = tuple(os.path.abspath(p) for p in t.sys_path) or (os.getcwd(),)
        env = {"JAX_ENABLE_X64": "1"} if t.kind == "optax" else {}
        jobs.append(({"kind": "target", "target": dataclasses.asdict(t), **common}, env))
    backends = args.backend or ([] if targets else list(available()))
    for b in backends:
        if b not in BACKENDS:
            raise SystemExit(f"unknown backend {b!r}; expected one of {', '.join(BACKENDS)}")
        env: dict[str, str] = {}
        for _, _, _, e in LANES[b]:
            env.update(e)
        jobs.append(({"kind": "backend", "backend": b, "rules": args.rules, "options": args.options, **common}, env))
    return jobs


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    args = build_parser(parser).parse_args(argv)
    jobs = jobs_from_args(args)
    cells: list[Cell] = []
    profiles: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for job, env in jobs:
        label = job.get("backend") or job["target"]["name"]
        print(f"== {label} (own process)", flush=True)
        c, p = _spawn(job, env)
        cells += c
        profiles += p
    if cells:
        print()
        print(_table(cells))
    failed = [c for c in cells if c.result == "fail"]
    for c in failed:
        print(f"\n--- FAIL {c.implementation} {c.rule} {c.option} {c.dtype}\n{c.detail}")
    for prof in profiles:
        print(f"\n=== {prof['name']}: {'conforms' if prof['conforms'] else 'DOES NOT CONFORM'}")
        for clause, r in prof["profile"].items():
            declared = clause in prof["declared"].get("deviations", {})
            if r["status"] == "deviates":
                print(f"--- {clause} deviates{' (declared)' if declared else ''}: {r.get('detail', '')}")
                if r["example"]:
                    print(f"```python\n{r['example']}\n```")
    passed = sum(c.result == "pass" for c in cells)
    skipped = sum(c.result == "skip" for c in cells)
    conform = sum(p["conforms"] for p in profiles)
    print(
        f"\n{passed} passed, {len(failed)} failed, {skipped} skipped; "
        f"{conform} of {len(profiles)} conform in {time.perf_counter() - t0:.0f}s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"targets": profiles, "cells": [dataclasses.asdict(c) for c in cells]}, f, indent=1)
    ok = (cells or profiles) and not failed and all(p["conforms"] for p in profiles)
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        with open(sys.argv[2]) as f:
            job = json.load(f)
        result = worker(job)
        with open(sys.argv[3], "w") as f:
            json.dump(result, f)
        sys.exit(0)
    sys.exit(main())
