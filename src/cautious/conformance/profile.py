"""A conformance profile: one verdict per clause of the spec, instead of a first failure.

Each clause is exercised with inputs that isolate it (no NaN outside the NaN clause,
one kept entry of thousands only where the floor is judged, ...), so every clause is
judged even when another fails, and each deviation carries its own minimal runnable
example. Where a clause is a choice (the normalization and its floor, the eps
placement, how decoupled decay meets the mask) the profile also says which choice the
port implements (``detected``).

>>> from cautious.conformance import NumpyAdapter
>>> from cautious.conformance.profile import conformance_profile
>>> prof = conformance_profile(NumpyAdapter(), rules=("lion",), budget=4)
>>> prof.conforms, prof.clauses["mask_boundary"].status
(True, 'matches')

A clause is ``matches``, ``deviates`` (with ``example``: a snippet that recomputes
the reference step, and the port's diverging value) or ``untested`` (with the reason:
the port does not take the hyperparameter the clause needs, or exposes no state).
A port conforms when every clause matches, or deviates where it declares it does
(``deviations={"nan": "NaN handled as torch.sign"}``).
"""

from __future__ import annotations

import dataclasses
import os
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from cautious import spec
from cautious.conformance.case import MODELED_DEVIATIONS, Adapter, Case, NumpyAdapter
from cautious.conformance.check import StepReport, check_step, py_float, repro_snippet
from cautious.spec.dtypes import numpy_dtype, round_to

__all__ = ["CLAUSES", "ClauseResult", "Profile", "PortError", "conformance_profile", "describe_exception"]

#: The rules a clause-by-clause profile judges: the entrywise ones (Muon's Newton-Schulz and Adafactor's
#: factored statistics mix entries, so the fixed probes below, which place single entries, do not apply;
#: run_conformance covers them).
PROFILED_RULES = tuple(r for r in spec.RULES if r not in ("muon", "adafactor"))

#: Every clause, in report order, with what it judges.
CLAUSES: dict[str, str] = {
    "mask_boundary": "exact zeros (+0, -0, and zero by exact cancellation) are masked and not counted",
    "nan": "a NaN gradient or state entry is kept and reaches the parameter, as without caution",
    "sign_vs_underflow": "the mask is decided from signs: agreeing tiny u and g whose product underflows stay kept",
    "normalization": "the rescale of kept entries (mean_clamp with its floor, count_plus_one, exact, none)",
    "eps_placement": "eps added to the bias-corrected or the uncorrected sqrt(v)",
    "bias_correction": "bias corrections 1 - beta**t in float64 at the right t",
    "state_untouched": "caution never changes the optimizer state",
    "weight_decay": "decoupled decay applied to every entry (unmasked), or only where u*p >= 0 (cautious)",
    "step_counting": "the step counter advances by one per step, from a fresh and from a resumed state",
    "dtype": "each dtype computes in its compute dtype and stores in its own",
    "errors": "invalid hyperparameters raise ValueError",
    "trajectory": "several steps on one instance of the port agree with the reference from its own state",
    "resume_plain_checkpoint": "resumes from a plain torch.optim checkpoint (no extra param-group keys) with caution",
    "random": "Hypothesis-drawn cases over every option the port takes (NaN excluded)",
}

_REFERENCE = NumpyAdapter()


@dataclasses.dataclass
class ClauseResult:
    """The verdict on one clause."""

    status: str  # matches | deviates | untested
    example: str | None = None  # a runnable snippet (deviates), or None
    detail: str = ""  # what differed, or why untested
    detected: Any = None  # the choice the port implements, where the clause is a choice

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "example": self.example}
        if self.detail:
            out["detail"] = self.detail
        if self.detected is not None:
            out["detected"] = self.detected
        return out


@dataclasses.dataclass
class Profile:
    """A port's conformance profile."""

    name: str
    rules: tuple[str, ...]
    declared: dict[str, Any]
    deviations: dict[str, str]
    clauses: dict[str, ClauseResult]
    beyond: set[str] = dataclasses.field(default_factory=set)  # declared clauses that deviate further

    @property
    def conforms(self) -> bool:
        return all(
            r.status != "deviates" or (name in self.deviations and name not in self.beyond)
            for name, r in self.clauses.items()
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rules": list(self.rules),
            "conforms": self.conforms,
            "declared": {**self.declared, "deviations": dict(self.deviations)},
            "beyond_declared": sorted(self.beyond),
            "profile": {k: v.to_json() for k, v in self.clauses.items()},
        }

    def table(self) -> str:
        rows = [("clause", "status", "detail")]
        for k, r in self.clauses.items():
            st = r.status + (" (declared)" if r.status == "deviates" and k in self.deviations else "")
            det = f"detected {r.detected}; " if r.detected is not None else ""
            rows.append((k, st, (det + r.detail).splitlines()[0][:110] if (det + r.detail) else ""))
        w = [max(len(r[i]) for r in rows) for i in range(2)]
        return "\n".join(f"{a.ljust(w[0])}  {b.ljust(w[1])}  {c}".rstrip() for a, b, c in rows)


class PortError(Exception):
    """The port raised: carries its type, message and the port's own frame."""


def describe_exception(e: BaseException) -> str:
    """``Type: message`` and the innermost frame outside ``cautious`` (the port's), with its source line."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frames = traceback.extract_tb(e.__traceback__)
    outside = [f for f in frames if not os.path.abspath(f.filename).startswith(here)]
    # the port's frame: the deepest one outside cautious and outside the framework it calls into
    framework = (
        os.sep + "torch" + os.sep,
        os.sep + "jax" + os.sep,
        os.sep + "keras" + os.sep,
        os.sep + "optax" + os.sep,
    )
    own = [f for f in outside if not any(d in f.filename for d in framework)] or outside
    lines = [f"{type(e).__name__}: {e}"]
    if own:
        port = own[-1]
        lines.append(f'  raised in File "{port.filename}", line {port.lineno}, in {port.name}: {port.line}')
        if frames[-1] is not port:
            inner = frames[-1]
            lines.append(f'  innermost File "{inner.filename}", line {inner.lineno}, in {inner.name}')
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- running


@dataclasses.dataclass
class _Probe:
    case: Case
    params: list[np.ndarray]
    grad_seq: list[list[np.ndarray]]
    state: spec.State
    only_state: bool = False  # judge only the state (state_untouched)
    plain_checkpoint: bool = False  # load through a plain torch.optim checkpoint


def _run(adapter: Adapter, probe: _Probe) -> list[tuple[list[np.ndarray], spec.State | None]]:
    """The port's outputs for every step of ``probe`` (one instance where the adapter can)."""
    case, params, grads, state = probe.case, probe.params, probe.grad_seq, probe.state
    try:
        if probe.plain_checkpoint:
            return [adapter.step_plain_checkpoint(case, _copy(params), _copy(grads[0]), state)]
        if len(grads) > 1 and hasattr(adapter, "trajectory"):
            return list(adapter.trajectory(case, _copy(params), [_copy(g) for g in grads], state))
        outs = []
        for g in grads:
            p_new, s_new = adapter.step(case, _copy(params), _copy(g), state)
            ref_p, ref_s = _REFERENCE.step(case, params, g, state)
            outs.append((p_new, s_new))
            params, state = (
                [np.asarray(p, dtype=np.asarray(r).dtype) for p, r in zip(p_new, ref_p)],
                _merge(s_new, ref_s),
            )
        return outs
    except Exception as e:  # the port raised
        raise PortError(describe_exception(e)) from e


def _copy(xs: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.array(x, copy=True) for x in xs]


def _merge(got: spec.State | None, ref: spec.State) -> spec.State:
    """The port's state where it exposes it, the reference's elsewhere."""
    if got is None:
        return ref
    leaves = tuple(
        type(r)(*(r_f if g_f is None else np.asarray(g_f, dtype=np.asarray(r_f).dtype) for g_f, r_f in zip(g, r)))
        if g is not None
        else r
        for g, r in zip(got.leaves, ref.leaves)
    )
    return spec.State(int(got.step), leaves)


def _judge(
    probe: _Probe, outs, case: Case | None = None
) -> tuple[StepReport | None, int, list[np.ndarray], list[np.ndarray], spec.State]:
    """The first step whose output disagrees (judged from the port's own previous output), or None."""
    case = case or probe.case
    params, state = probe.params, probe.state
    for i, (grads, (gp, gs)) in enumerate(zip(probe.grad_seq, outs)):
        report = check_step(case, params, grads, state, gp, gs)
        if probe.only_state:
            report.mismatches = [m for m in report.mismatches if m.what.startswith("state")]
        if not report.ok:
            return report, i, params, grads, state
        ref_p, ref_s = _REFERENCE.step(case, params, grads, state)
        params = [np.asarray(p, dtype=np.asarray(r).dtype) for p, r in zip(gp, ref_p)]
        state = _merge(gs, ref_s)
    return None, -1, params, [], state


def _example(name: str, probe: _Probe, report: StepReport, i: int, params, grads, state) -> str:
    first = report.mismatches[0]
    snippet = repro_snippet(probe.case, params, grads, state)
    if first.what.startswith(("params[", "state.leaves[")) and not first.what.endswith(".shape"):
        snippet += (
            f"\nprint(new_{first.what}[{first.index!r}])  # reference: {py_float(first.expected)}; "
            f"{name} gave {py_float(first.got)} (allowed error {first.bound:.3g})"
        )
    head = f"# step {i + 1} of {len(probe.grad_seq)}: {first}".replace("\n", " ")
    return head + "\n" + snippet


# ---------------------------------------------------------------------------------------------- inputs


class _Ctx:
    """Builds cases the adapter takes: pinned hyperparameters win; ``need`` must hold, ``want`` may not."""

    def __init__(self, adapter: Adapter, rule: str, dtypes: Sequence[str], allow: frozenset = frozenset()) -> None:
        self.adapter, self.rule, self.allow = adapter, rule, allow
        fixed = getattr(adapter, "fixed_hparams", None)
        self.pinned = dict((fixed(rule) or {}) if fixed else {})
        self.dtypes = tuple(dtypes)
        self.fresh_only = bool(getattr(adapter, "fresh_only", False))
        self.multi_step = hasattr(adapter, "trajectory") or not self.fresh_only
        self.family = "adam" if rule in ("adam", "adamw") else rule

    def case(self, dtype: str = "float64", need: Mapping[str, Any] | None = None, **want: Any) -> Case | None:
        if dtype not in self.dtypes:
            dtype = "float64" if "float64" in self.dtypes else self.dtypes[0]
        hp: dict[str, Any] = {"caution": spec.Caution()}
        if self.rule == "sgd":
            hp.update(momentum=0.5)
        hp.update(want)
        for k, v in self.pinned.items():
            hp[k] = v
        for k, v in (need or {}).items():
            if k in self.pinned and self.pinned[k] != v:
                return None
            hp[k] = v
        if self.rule == "sgd" and hp.get("nesterov") and (not hp.get("momentum") or hp.get("dampening")):
            hp["nesterov"] = False
        if not (self.rule in ("adamw", "lion") or hp.get("decoupled_weight_decay")):
            hp.pop("cautious_weight_decay", None)
        case = Case(self.rule, hp, dtype, "float32" if dtype in ("bfloat16", "float16") else None, self.allow)
        try:
            spec_opt(case)
        except (ValueError, TypeError):
            return None
        return case if self.adapter.supports(case) is None else None

    def b1(self, case: Case) -> float:
        if self.rule == "sgd":
            return float(case.hparams.get("momentum", 0.0))
        return float(case.hparams.get("betas", (0.9, 0.999))[0])

    def state(self, case: Case, params, step: int = 0, m=None, v=None) -> spec.State:
        st = spec_opt(case).init([np.zeros_like(p) for p in params])
        if step == 0 and m is None:
            return st
        sd = numpy_dtype(case.state_storage)
        leaves = []
        for leaf, mi, vi in zip(st.leaves, m or [None] * len(params), v or [None] * len(params)):
            rep = {}
            if mi is not None and getattr(leaf, "m", None) is not None:
                rep["m"] = round_to(np.asarray(mi, np.float64), case.state_storage).astype(sd)
            if vi is not None and hasattr(leaf, "v"):
                rep["v"] = round_to(np.asarray(vi, np.float64), case.state_storage).astype(sd)
                if getattr(leaf, "v_max", None) is not None:
                    rep["v_max"] = rep["v"]
            leaves.append(leaf._replace(**rep))
        return spec.State(step, tuple(leaves))

    def arr(self, case: Case, x) -> np.ndarray:
        return round_to(np.asarray(x, np.float64), case.dtype).astype(numpy_dtype(case.dtype))


def spec_opt(case: Case) -> spec.Optimizer:
    return getattr(spec, case.rule)(**case.hparams)


def _disagreeing_state(ctx: _Ctx, case: Case, g: np.ndarray, keep: np.ndarray, cancel: np.ndarray | None = None):
    """m (and v): m against g where not ``keep`` (masked), along g where ``keep``, exactly 0 at ``cancel``."""
    b = ctx.b1(case)
    m = np.where(keep, g, -8.0 * g)
    if cancel is not None and b == 0.5:
        # b*m + c*g == 0 exactly: Adam/Lion c = 1 - b = 0.5 -> m = -g; SGD c = 1 - dampening = 1 -> m = -2g
        c = 1.0 - float(case.hparams.get("dampening", 0.0)) if ctx.rule == "sgd" else 0.5
        m = np.where(cancel, -g * (c / b), m)
    return m, np.ones_like(g)


def _probes_mask_boundary(ctx: _Ctx) -> list[_Probe]:
    out = []
    case = ctx.case(lr=0.1, weight_decay=0.0, need={"caution": ctx.pinned.get("caution", spec.Caution("exact"))})
    if case is not None and case.caution is not None:
        g = ctx.arr(case, [1.0, -1.0, 0.0, -0.0, 2.0, -3.0, 0.5, 0.0])
        params = [ctx.arr(case, np.ones(8))]
        out.append(_Probe(case, params, [[g]], ctx.state(case, params)))
        plain = ctx.case(lr=0.1, weight_decay=0.0, need={"momentum": 0.0}) if ctx.rule == "sgd" else None
        if plain is not None and plain.caution is not None:  # SGD without momentum: only zeros are masked
            out.append(_Probe(plain, params, [[g]], ctx.state(plain, params)))
    b_key = "momentum" if ctx.rule == "sgd" else "betas"
    b_val = 0.5 if ctx.rule == "sgd" else (0.5, 0.999 if ctx.family == "adam" else 0.99)
    case = ctx.case(lr=0.1, weight_decay=0.0, need={b_key: b_val})
    if case is not None and case.caution is not None and not ctx.fresh_only:
        g = ctx.arr(case, [1.0, -1.0, 2.0, -2.0, 1.0, -1.0, 3.0, -3.0])
        keep = np.array([0, 0, 1, 1, 0, 0, 1, 1], bool)
        cancel = np.array([1, 1, 0, 0, 0, 0, 0, 0], bool)
        m, v = _disagreeing_state(ctx, case, g, keep, cancel)
        params = [ctx.arr(case, np.ones(8))]
        out.append(_Probe(case, params, [[g]], ctx.state(case, params, 3, [m], [v])))
    return out


def _probes_nan(ctx: _Ctx) -> list[_Probe]:
    out = []
    case = ctx.case(lr=0.1, weight_decay=0.0)
    if case is None:
        return out
    params = [ctx.arr(case, np.ones(4))]
    g = ctx.arr(case, [np.nan, 1.0, -1.0, 2.0])
    out.append(_Probe(case, params, [[g]], ctx.state(case, params)))
    if not ctx.fresh_only and (ctx.family != "sgd" or case.hparams.get("momentum")):
        g2 = ctx.arr(case, [1.0, 1.0, -1.0, 2.0])
        m = np.array([np.nan, 1.0, -1.0, 2.0])
        out.append(_Probe(case, params, [[g2]], ctx.state(case, params, 2, [m], [np.ones(4)])))
    return out


def _probes_sign_vs_underflow(ctx: _Ctx) -> list[_Probe]:
    if ctx.rule == "lion":
        return []  # Lion's u is +-1: its product with a normal gradient cannot underflow
    dtype = "float32" if "float32" in ctx.dtypes else "float64"
    tinyv = 1e-30 if dtype == "float32" else 1e-200
    case = ctx.case(dtype, lr=0.1, weight_decay=0.0)  # from a fresh state u = g (SGD) or ~ g / eps (Adam)
    if case is None or case.caution is None:
        return []
    g = ctx.arr(case, [tinyv, -tinyv, 4 * tinyv, -4 * tinyv, 1.0, -1.0])
    params = [ctx.arr(case, np.ones(6))]
    return [_Probe(case, params, [[g]], ctx.state(case, params))]


_CANDIDATE_FLOORS = (1e-3, 1e-2, 0.1, 0.5, 1.0)


def _normalization_candidates(declared: spec.Caution | None) -> dict[str, Any]:
    out: dict[str, Any] = {"off": False}
    floors = sorted(set(_CANDIDATE_FLOORS) | ({declared.floor} if declared else set()))
    for f in floors:
        out[f"mean_clamp(floor={f:g})"] = spec.Caution("mean_clamp", f)
    for n in ("count_plus_one", "exact", "none"):
        out[n] = spec.Caution(n)
    return out


def _probes_normalization(ctx: _Ctx) -> list[_Probe]:
    case = ctx.case(lr=0.1, weight_decay=0.0)
    if case is None or case.caution is None:
        return []
    rng = np.random.default_rng(0)
    out = []
    for n, k in ((2048, 1), (10, 3), (1500, 2), (6, 6)):
        g = ctx.arr(case, rng.choice([-1.0, 1.0], n) * rng.uniform(0.5, 2.0, n))
        keep = np.zeros(n, bool)
        keep[rng.choice(n, k, replace=False)] = True
        params = [ctx.arr(case, np.ones(n))]
        # isolated from the mask boundary: nonzero gradients, masked by the direction's sign
        has_m = ctx.rule != "sgd" or bool(case.hparams.get("momentum"))
        if has_m and not ctx.fresh_only:
            m, v = _disagreeing_state(ctx, case, g, keep)  # masked by the injected state
            out.append(_Probe(case, params, [[g]], ctx.state(case, params, 5, [m], [v])))
        elif has_m and ctx.multi_step:  # two steps from fresh: a small reversal of g is masked
            g2 = ctx.arr(case, np.where(keep, g, -0.01 * g))
            out.append(_Probe(case, params, [[g], [g2]], ctx.state(case, params)))
        else:  # SGD without momentum masks only exactly-zero gradients
            out.append(_Probe(case, params, [[ctx.arr(case, np.where(keep, g, 0.0))]], ctx.state(case, params)))
    return out


def _probes_eps_placement(ctx: _Ctx) -> list[_Probe]:
    if ctx.family != "adam":
        return []
    case = ctx.case(lr=0.1, weight_decay=0.0, eps=float(np.float32(1e-3)), betas=(0.9, 0.999))
    if case is None:
        return []
    g = ctx.arr(case, [1e-3, -2e-3, 5e-4, 1.0, -1e-6, 3e-2])
    params = [ctx.arr(case, np.ones(6))]
    return [_Probe(case, params, [[g]], ctx.state(case, params))]


def _probes_bias_correction(ctx: _Ctx) -> list[_Probe]:
    if ctx.family != "adam":
        return []
    case = ctx.case("float64", lr=0.1, weight_decay=0.0, betas=(0.9, float(np.float32(0.9999))))
    if case is None:
        return []
    g = ctx.arr(case, [1.0, -0.5, 2.0, -3.0])
    params = [ctx.arr(case, np.ones(4))]
    out = [_Probe(case, params, [[g]], ctx.state(case, params))]
    if not ctx.fresh_only:
        for step in (1, 9, 999):
            out.append(_Probe(case, params, [[g]], ctx.state(case, params, step, [0.3 * g], [g * g])))
    return out


def _probes_state_untouched(ctx: _Ctx) -> list[_Probe]:
    case = ctx.case(lr=0.1, weight_decay=0.0)
    if case is None or case.caution is None or ctx.fresh_only:
        return []
    g = ctx.arr(case, [1.0, -1.0, 2.0, -2.0, 0.5, -0.5])
    keep = np.array([1, 0, 0, 0, 1, 0], bool)
    m, v = _disagreeing_state(ctx, case, g, keep)
    params = [ctx.arr(case, np.ones(6))]
    return [_Probe(case, params, [[g]], ctx.state(case, params, 4, [m], [v]), only_state=True)]


def _probes_weight_decay(ctx: _Ctx) -> list[_Probe]:
    case = ctx.case(lr=0.1, weight_decay=float(np.float32(0.1)))
    if case is None or not float(case.hparams.get("weight_decay", 0.0)):
        return []
    params = [ctx.arr(case, [10.0, -10.0, 10.0, -10.0, 3.0, -3.0])]
    g = ctx.arr(case, [0.0, 0.0, 1.0, -1.0, -1.0, 1.0])
    out = [_Probe(case, params, [[g]], ctx.state(case, params))]
    if not ctx.fresh_only:
        keep = np.array([0, 0, 1, 1, 0, 1], bool)
        m, v = _disagreeing_state(ctx, case, ctx.arr(case, [1.0, -1.0, 1.0, -1.0, -1.0, 1.0]), keep)
        out.append(_Probe(case, params, [[g]], ctx.state(case, params, 2, [m], [v])))
    return out


def _probes_step_counting(ctx: _Ctx) -> list[_Probe]:
    case = ctx.case(lr=0.1, weight_decay=0.0, betas=(0.9, 0.999)) if ctx.family == "adam" else None
    case = case or ctx.case(lr=0.1, weight_decay=0.0)
    if case is None:
        return []
    params = [ctx.arr(case, [1.0, 2.0, -1.0])]
    seq = [[ctx.arr(case, [1.0, -1.0, 0.5])], [ctx.arr(case, [0.5, -2.0, 1.0])], [ctx.arr(case, [1.0, -1.0, 2.0])]]
    out = []
    if ctx.multi_step:
        out.append(_Probe(case, params, seq, ctx.state(case, params)))
    if not ctx.fresh_only:
        m = [ctx.arr(case, [0.1, -0.1, 0.1])]
        out.append(_Probe(case, params, seq[:2], ctx.state(case, params, 99, m, [np.ones(3)])))
    return out


def _probes_dtype(ctx: _Ctx) -> list[_Probe]:
    out = []
    rng = np.random.default_rng(1)
    for dtype in ctx.dtypes:
        case = ctx.case(dtype, lr=0.1)
        if case is None or case.dtype != dtype:
            continue
        params = [ctx.arr(case, rng.normal(size=(3, 5)))]
        g = ctx.arr(case, rng.normal(size=(3, 5)) * 1e-2)
        out.append(_Probe(case, params, [[g]], ctx.state(case, params)))
    return out


def _probes_trajectory(ctx: _Ctx) -> list[_Probe]:
    if not ctx.multi_step:
        return []
    case = ctx.case("float32", lr=float(np.float32(1e-2)))
    if case is None:
        return []
    rng = np.random.default_rng(2)
    # several tensors, the last one empty (a port that skips the step for it is caught here)
    params = [ctx.arr(case, rng.normal(size=(4, 6))), ctx.arr(case, rng.normal(size=7)), ctx.arr(case, np.zeros(0))]
    seq = [[ctx.arr(case, rng.normal(size=np.shape(p))) for p in params] for _ in range(5)]
    return [_Probe(case, params, seq, ctx.state(case, params))]


def _probes_resume(ctx: _Ctx) -> list[_Probe]:
    if not hasattr(ctx.adapter, "step_plain_checkpoint") or ctx.fresh_only:
        return []
    probes = _probes_mask_boundary(ctx) + _probes_normalization(ctx)[:1] + _probes_step_counting(ctx)
    return [dataclasses.replace(p, plain_checkpoint=True, grad_seq=p.grad_seq[:1]) for p in probes if p.state.step > 0]


_PROBES: dict[str, Callable[[_Ctx], list[_Probe]]] = {
    "mask_boundary": _probes_mask_boundary,
    "nan": _probes_nan,
    "sign_vs_underflow": _probes_sign_vs_underflow,
    "normalization": _probes_normalization,
    "eps_placement": _probes_eps_placement,
    "bias_correction": _probes_bias_correction,
    "state_untouched": _probes_state_untouched,
    "weight_decay": _probes_weight_decay,
    "step_counting": _probes_step_counting,
    "dtype": _probes_dtype,
    "trajectory": _probes_trajectory,
    "resume_plain_checkpoint": _probes_resume,
}


# ---------------------------------------------------------------------------------------------- judging


def _detect(probes: list[_Probe], outs: list, candidates: dict[str, Callable[[Case], Case]]) -> list[str]:
    """The candidate choices (case transformations) under which every probe's output matches."""
    found = []
    for label, make in candidates.items():
        if all(_judge(p, o, make(p.case))[0] is None for p, o in zip(probes, outs)):
            found.append(label)
    return found


def _with(case: Case, **hp: Any) -> Case:
    return dataclasses.replace(case, hparams={**case.hparams, **hp})


def _choice_candidates(clause: str, probes: list[_Probe]) -> dict[str, Callable[[Case], Case]] | None:
    if clause == "normalization":
        declared = probes[0].case.caution
        return {k: (lambda c, v=v: _with(c, caution=v)) for k, v in _normalization_candidates(declared).items()}
    if clause == "eps_placement":
        return {k: (lambda c, k=k: _with(c, eps_placement=k)) for k in ("corrected", "uncorrected")}
    if clause == "weight_decay" and (
        probes[0].case.rule in ("adamw", "lion") or probes[0].case.hparams.get("decoupled_weight_decay")
    ):
        return {
            "unmasked": lambda c: _with(c, cautious_weight_decay=False),
            "cautious": lambda c: _with(c, cautious_weight_decay=True),
        }
    return None


def _masked_decay(probes: list[_Probe], outs: list) -> bool:
    """Decay applied only to kept entries: every masked entry's parameter unchanged where the spec decays it."""
    seen = False
    for p, o in zip(probes, outs):
        if p.state.step != 0 or p.case.caution is None:
            continue
        got = np.asarray(o[0][0][0], np.float64)
        zero = np.asarray(p.grad_seq[0][0]) == 0
        if not zero.any():
            continue
        seen = True
        if not np.array_equal(got[zero], np.asarray(p.params[0], np.float64)[zero]):
            return False
    return seen


_NEEDS_CAUTION = {"mask_boundary", "sign_vs_underflow", "normalization", "state_untouched"}


def _untested_reason(ctx: _Ctx, clause: str) -> str:
    base = ctx.case()
    if base is not None and base.caution is None and clause in _NEEDS_CAUTION:
        return "caution is off for this port"
    if clause == "resume_plain_checkpoint" and not hasattr(ctx.adapter, "step_plain_checkpoint"):
        return "not a torch.optim target"
    if clause in ("eps_placement", "bias_correction") and ctx.family != "adam":
        return f"{ctx.rule} has no {clause.replace('_', ' ')}"
    if clause == "sign_vs_underflow" and ctx.rule == "lion":
        return "Lion's update is +-1: its product with a normal gradient cannot underflow"
    if ctx.fresh_only and clause in ("state_untouched", "resume_plain_checkpoint"):
        return "the port's state is not mapped"
    return "no input isolating this clause is accepted by the port (its pinned hyperparameters exclude them)"


def _judge_clause(name: str, adapter: Adapter, clause: str, probes: list[_Probe], ctx: _Ctx) -> ClauseResult:
    if not probes:
        return ClauseResult("untested", detail=_untested_reason(ctx, clause))
    outs = []
    for p in probes:
        try:
            outs.append(_run(adapter, p))
        except PortError as e:
            ex = repro_snippet(p.case, p.params, p.grad_seq[0], p.state)
            head = "\n".join("# " + line for line in f"{name} raised {e}".splitlines())
            return ClauseResult("deviates", f"{head}\n{ex}", f"raised {e}")
    candidates = _choice_candidates(clause, probes)
    detected = None
    if candidates:
        detected = _detect(probes, outs, candidates)
        if clause == "weight_decay" and _masked_decay(probes, outs):
            detected.append("masked")
    for p, o in zip(probes, outs):
        report, i, params, grads, state = _judge(p, o)
        if report is not None:
            ex = _example(name, p, report, i, params, grads, state)
            return ClauseResult("deviates", ex, str(report.mismatches[0]), detected)
    return ClauseResult("matches", detected=detected)


def _judge_errors(name: str, ctx: _Ctx) -> ClauseResult:
    base = ctx.case(lr=0.1)
    if base is None:
        return ClauseResult("untested", detail="no case accepted")
    bad: list[tuple[str, Any]] = [("lr", -1.0), ("weight_decay", -1.0)]
    if ctx.family == "adam":
        bad += [("eps", -1.0), ("betas", (1.5, 0.999))]
    elif ctx.family == "lion":
        bad += [("betas", (1.5, 0.99))]
    elif ctx.family == "nadam":
        bad += [("eps", -1.0), ("betas", (1.5, 0.999)), ("momentum_decay", -1.0)]
    elif ctx.family == "rmsprop":
        bad += [("eps", -1.0), ("alpha", 1.5)]
    elif ctx.family in ("adopt", "laprop"):
        bad += [("eps", -1.0), ("betas", (1.5, 0.999))]
    else:
        bad += [("momentum", -0.5)]
    tried, problems = [], []
    params = [np.ones(3, numpy_dtype(base.dtype))]
    grads = [np.ones(3, numpy_dtype(base.dtype))]
    for key, value in bad:
        if key in ctx.pinned:
            continue
        case = _with(base, **{key: value})
        tried.append(key)
        try:
            adapter_out = ctx.adapter.step(case, _copy(params), _copy(grads), base_state(base, params))
        except ValueError:
            continue
        except Exception as e:
            problems.append(f"{key}={value!r} raised {describe_exception(e).splitlines()[0]} (expected ValueError)")
            continue
        del adapter_out
        problems.append(f"{key}={value!r} was accepted silently (expected ValueError)")
    if not tried:
        return ClauseResult("untested", detail="the port takes none of lr, weight_decay, eps, betas, momentum")
    if problems:
        return ClauseResult("deviates", None, "; ".join(problems))
    return ClauseResult("matches", detail=f"ValueError for invalid {', '.join(tried)}")


def base_state(case: Case, params) -> spec.State:
    return spec_opt(case).init([np.zeros_like(p) for p in params])


def _judge_random(
    adapter: Adapter, rules, dtypes, budget: int, seed: int | None, allow=frozenset(), shrink: bool = True
) -> ClauseResult:
    from cautious.conformance.runner import ConformanceError, run_conformance

    try:
        res = run_conformance(
            adapter,
            rules=rules,
            dtypes=dtypes,
            max_examples=budget,
            seed=seed,
            allow_nan=False,
            allow=allow,
            shrink=shrink,
        )
    except ConformanceError as e:
        if "no example ran" in str(e):
            return ClauseResult("untested", detail=str(e))
        return ClauseResult("deviates", e.repro or None, str(e).split("Reproduce", 1)[0].strip())
    return ClauseResult("matches", detail=f"{sum(res.examples.values())} examples, worst {res.worst:.2f} of bound")


def _combine(results: list[ClauseResult]) -> ClauseResult:
    """One verdict over several rules: deviates if any does, untested only if all are."""
    dev = [r for r in results if r.status == "deviates"]
    if dev:
        return dev[0]
    done = [r for r in results if r.status == "matches"]
    if not done:
        return results[0]
    det = [r.detected for r in done if r.detected is not None]
    detected = sorted(set.intersection(*(set(d) for d in det))) if det else None
    return ClauseResult("matches", detail=done[0].detail, detected=detected)


def conformance_profile(
    adapter: Adapter,
    *,
    rules: Sequence[str] | None = None,
    dtypes: Sequence[str] = ("float32", "float64"),
    budget: int = 10,
    seed: int | None = 0,
    deviations: Mapping[str, str] | None = None,
    declared: Mapping[str, Any] | None = None,
    clauses: Sequence[str] | None = None,
    allow_nan: bool = True,
) -> Profile:
    """Judge ``adapter`` clause by clause (see :data:`CLAUSES`).

    ``budget`` is the number of Hypothesis examples of the ``random`` clause (per
    rule); the other clauses run fixed, small inputs. ``deviations`` maps clause
    names to the port's declared deviation; ``declared`` (the options it claims) is
    carried into the report. ``allow_nan=False`` leaves the ``nan`` clause untested
    and admits a masked NaN wherever one arises inside (0 / 0), as if ``nan`` were declared.
    ``clauses`` restricts the run.
    """
    rules = tuple(rules or PROFILED_RULES)
    if set(rules) - set(PROFILED_RULES):
        raise ValueError(
            f"profiles judge the entrywise rules {', '.join(PROFILED_RULES)}, got {rules}; Muon (a matrix "
            "iteration: the clause probes are entrywise) is judged by run_conformance"
        )
    deviations = dict(deviations or {})
    unknown = set(deviations) - set(CLAUSES)
    if unknown:
        raise ValueError(f"deviations names unknown clauses {sorted(unknown)}; expected some of {', '.join(CLAUSES)}")
    want = tuple(clauses or CLAUSES)
    name = getattr(adapter, "name", type(adapter).__name__)
    # declared deviations the checker models are admitted everywhere; a declared clause is also judged
    # strictly, so the report shows that it deviates (and whether it stays within the declaration)
    allow = frozenset(deviations) & MODELED_DEVIATIONS
    if not allow_nan:  # NaN handling is not judged at all: also not where a NaN arises inside (0 / 0)
        allow |= {"nan"}
    per_rule: dict[str, list[ClauseResult]] = {c: [] for c in want}
    beyond: set[str] = set()
    for rule in rules:
        ctx = _Ctx(adapter, rule, dtypes, allow)
        strict = _Ctx(adapter, rule, dtypes)
        for clause in want:
            if clause == "nan" and not allow_nan:
                res = ClauseResult("untested", detail="NaN and inf inputs excluded (allow_nan=False)")
            elif clause == "errors":
                res = _judge_errors(name, ctx)
            elif clause == "random":
                # shrinking is what costs time; where a fixed-input clause already deviates outside the
                # declaration, it has given a minimal example, and the random one is reported as found
                undeclared = any(
                    r.status == "deviates" and (c not in deviations or c in beyond)
                    for c, rs in per_rule.items()
                    for r in rs
                )
                res = _judge_random(adapter, (rule,), dtypes, budget, seed, allow, shrink=not undeclared)
                if undeclared and res.status == "deviates":
                    res.detail = "(not shrunk: another clause already deviates) " + res.detail
            elif clause in allow:
                res = _judge_clause(name, adapter, clause, _PROBES[clause](strict), strict)
                within = _judge_clause(name, adapter, clause, _PROBES[clause](ctx), ctx)
                if within.status == "deviates":
                    beyond.add(clause)
                    within.detail = f"beyond the declared deviation: {within.detail}"
                    res = within
            else:
                res = _judge_clause(name, adapter, clause, _PROBES[clause](ctx), ctx)
            per_rule[clause].append(res)
    results = {c: _combine(per_rule[c]) for c in want}
    return Profile(name, rules, dict(declared or {}), deviations, results, beyond)
