"""Compare one step of an implementation with the reference, within computed bounds.

:func:`check_step` is the heart of the suite. For each parameter entry it builds
the small set of outcomes a correct implementation may produce (one, unless a
mask decision, Lion's sign, or a cautious-weight-decay decision lies within
rounding of zero), and for each admissible kept count ``k`` it tests whether
every entry matches one of its outcomes under the scale ``scale(k)`` and the
undecided entries can account for exactly ``k``. So an implementation may decide
a borderline entry either way, but its scale must agree with the decisions it
actually took. Every state tensor and the step counter are compared too.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from cautious import spec
from cautious.conformance.bounds import K, TensorTerms, caution_on_u, decay_order, decoupled, tensor_terms, weight_decay
from cautious.conformance.case import Case
from cautious.spec.dtypes import compute_dtype, numpy_dtype, round_to, tiny, unit_roundoff

__all__ = ["Mismatch", "StepReport", "check_step", "check_stats", "repro_snippet", "py_float"]

_ABS_FLOOR = {"float64": 2.0**-1075, "float32": 2.0**-150, "bfloat16": 2.0**-134, "float16": 2.0**-25}


@dataclasses.dataclass
class Mismatch:
    """The first diverging entry of one tensor."""

    what: str
    index: tuple[int, ...]
    expected: float
    got: float
    bound: float
    detail: str = ""

    def __str__(self) -> str:
        idx = ", ".join(map(str, self.index))
        return (
            f"{self.what}[{idx}]: expected {self.expected!r}, got {self.got!r}, "
            f"|diff| = {abs(self.got - self.expected):.3g} > bound {self.bound:.3g}"
            + (f" ({self.detail})" if self.detail else "")
        )


@dataclasses.dataclass
class StepReport:
    """Result of :func:`check_step`."""

    mismatches: list[Mismatch]
    worst: float  # worst |got - expected| / bound over compared entries (<= 1 passes)
    notes: list[str]

    @property
    def ok(self) -> bool:
        return not self.mismatches


def _storage_tol(x: np.ndarray, dtype: str) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        # an infinite value is stored exactly: no slack (else an infinite bound would admit anything)
        return np.where(np.isinf(x), 0.0, unit_roundoff(dtype) * np.abs(x) + _ABS_FLOOR[dtype])


def _match(got: np.ndarray, exp: np.ndarray, tol: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(matches, ratio) elementwise; NaN matches NaN, infinities match themselves."""  # noqa: D401
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        diff = np.abs(got - exp)
        # an infinite (or, where the expected value is not NaN, undefined) bound admits anything:
        # e.g. x/0 with a flushed subnormal x may be NaN. An expected NaN must stay NaN.
        same = (got == exp) | (np.isnan(got) & np.isnan(exp)) | np.isinf(tol) | (np.isnan(tol) & ~np.isnan(exp))
        ok = same | (diff <= tol)
        ratio = np.where(same, 0.0, np.where(tol > 0, diff / tol, np.inf))
    ratio = np.where(np.isnan(ratio), np.inf, ratio)
    return ok, ratio


def _param_options(case: Case, tt: TensorTerms, lr: float) -> dict[str, np.ndarray]:
    """All admissible (kept, u, decay) outcomes per entry, as (n, O) arrays."""
    caution = caution_on_u(case)
    wd = weight_decay(case)
    dec = decoupled(case) and wd != 0 and tt.decay_on
    cwd = bool(case.hparams.get("cautious_weight_decay", False))
    u = tt.u.reshape(-1)
    n = u.size
    mask_ref = spec.cautious_mask(tt.u, tt.g).reshape(-1) if caution is not None else np.ones(n, bool)
    sign_und = tt.undecided.reshape(-1)  # the sign of u (or g) is within rounding of zero
    und = sign_und if caution is not None else np.zeros(n, bool)  # the mask decision may go either way
    lion_und = tt.lion_sign_undecided.reshape(-1)
    p = tt.p.reshape(-1)
    # a subnormal parameter may be read as zero (flush-to-zero): its decay decision may go either way
    p_flush = (np.abs(p) < tiny(compute_dtype(case.dtype))) & (p != 0)
    kept_l, u_l, d_l, valid_l = [], [], [], []
    for kept, uc, d in itertools.product((False, True), ("ref", -1.0, 0.0, 1.0), (False, True)):
        uval = u if uc == "ref" else np.full(n, uc)
        valid = (und | (mask_ref == kept)) if caution is not None else np.full(n, kept)
        valid = valid & ((uc == "ref") | lion_und)
        uc_val = uval if kept else np.zeros(n)
        if not dec:
            valid = valid & (not d)
        elif cwd:
            natural = spec.decay_mask(uc_val, p)
            valid = valid & ((natural == d) | sign_und | lion_und | p_flush)
        else:
            valid = valid & d
        kept_l.append(np.full(n, kept))
        u_l.append(uval)
        d_l.append(np.full(n, d))
        valid_l.append(valid)
    return {
        "kept": np.stack(kept_l, 1),
        "u": np.stack(u_l, 1),
        "d": np.stack(d_l, 1),
        "valid": np.stack(valid_l, 1),
        "mask_ref": mask_ref,
        "undecided": und,
    }


def _check_param(
    case: Case, tt: TensorTerms, got: np.ndarray, lr: float, what: str
) -> tuple[Mismatch | None, float, str | None]:
    cd = compute_dtype(case.dtype)
    e = K * unit_roundoff(cd)
    tn = tiny(cd)
    wd = weight_decay(case)
    caution = caution_on_u(case)
    opts = _param_options(case, tt, lr)
    # a rule with its own per-tensor step size (Adafactor's alpha_t) or decay factor (optax's rate form)
    lr_u = lr if tt.eta is None else tt.eta
    lr_d = lr if tt.decay_lr is None else tt.decay_lr
    p = tt.p.reshape(-1)[:, None]
    err_u = tt.err_u.reshape(-1)[:, None]
    gotf = np.asarray(got, dtype=np.float64).reshape(-1)[:, None]
    finite_p = np.isfinite(p)
    nan_entry = (np.isnan(tt.u) | np.isnan(tt.g)).reshape(-1)
    n = p.shape[0]
    if n == 0:
        return None, 0.0, None
    und = opts["undecided"]
    k_certain = int(np.count_nonzero(opts["mask_ref"] & ~und))
    n_und = int(np.count_nonzero(und))
    k_ref = int(np.count_nonzero(opts["mask_ref"]))
    ks = range(k_certain, k_certain + n_und + 1) if caution is not None else [n]
    post = decay_order(case) == "post_update"
    dens = _denominators(caution, tt, und)
    best: tuple[float, int, np.ndarray, np.ndarray, np.ndarray] | None = None
    for k, den in itertools.product(ks, dens):
        s = caution.scale(k, den) if caution is not None else 1.0
        uval = opts["u"]
        kept = opts["kept"]
        step_u = np.where(kept, s * uval, 0.0)
        with np.errstate(invalid="ignore", over="ignore"):
            # decoupled decay in the spec's multiplicative form p * (1 - lr*wd), of p or of the moved p
            if post:
                moved = p - lr_u * step_u
                decay = np.where(opts["d"], lr_d * wd * np.where(np.isfinite(moved), moved, 0.0), 0.0)
                exp = np.where(opts["d"], moved * (1.0 - lr_d * wd), moved)
            else:
                decay = np.where(opts["d"], lr_d * wd * np.where(finite_p, p, 0.0), 0.0)
                exp = np.where(opts["d"], p * (1.0 - lr_d * wd), p) - lr_u * step_u
            tol = (
                e * (np.where(finite_p, np.abs(p), 0.0) + np.abs(decay) + lr_u * np.abs(step_u))
                + np.where(kept, lr_u * s * err_u + tt.err_eta * np.abs(step_u), 0.0)
                + np.where((np.abs(p) + np.abs(step_u)) > 0, tn, 0.0)
            )
            exp_r = round_to(exp, case.dtype).astype(np.float64) if case.dtype != "float64" else exp
            rounding = np.where(np.isinf(exp), 0.0, np.abs(exp_r - exp))
            tol = tol * (1 + unit_roundoff(case.dtype)) + _storage_tol(exp, case.dtype) + rounding
        ok, ratio = _match(np.broadcast_to(gotf, exp.shape), exp, tol)
        # at an infinite parameter the additive form p - lr*wd*p (optax) gives NaN: admitted too
        nan_ok = opts["d"] & ~(np.isfinite(exp) if post else finite_p) & np.isnan(gotf)
        if "nan" in case.allow:  # declared: a NaN entry may be masked (counted out) and still turn NaN (0 * NaN)
            nan_ok = nan_ok | (nan_entry[:, None] & np.isnan(gotf))
        ok = ok | nan_ok
        ratio = np.where(nan_ok, 0.0, ratio)
        fit = ok & opts["valid"]
        ratio = np.where(opts["valid"], ratio, np.inf)
        entry_ok = fit.any(1)
        can_keep = (fit & kept).any(1)
        can_mask = (fit & ~kept).any(1)
        must = int(np.count_nonzero(und & can_keep & ~can_mask))
        most = int(np.count_nonzero(und & can_keep))
        feasible = bool(entry_ok.all()) and (caution is None or must <= k - k_certain <= most)
        worst = float(ratio.min(1).max())
        if feasible:
            return None, worst, None
        key = (0 if k == k_ref else 1, k)
        if best is None or key < (0 if best[1] == k_ref else 1, best[1]):
            best = (worst, k, exp, tol, ratio)
    assert best is not None
    worst, k, exp, tol, ratio = best
    per_entry = ratio.min(1)
    bad = np.flatnonzero(per_entry > 1)
    if bad.size:
        i = int(bad[0])
        o = int(np.argmin(np.where(opts["valid"][i], np.abs(gotf[i, 0] - exp[i]), np.inf)))
        idx = tuple(int(x) for x in np.unravel_index(i, tt.p.shape)) if tt.p.shape else ()
        detail = f"kept={bool(opts['kept'][i, o])}, u={opts['u'][i, o]!r}, count k={k} of n={n}"
        if caution is not None:
            detail += f", scale={caution.scale(k, n)!r}"
        mm = Mismatch(what, idx, float(exp[i, o]), float(gotf[i, 0]), float(tol[i, o]), detail)
    else:
        mm = Mismatch(
            what,
            (),
            float(k_ref),
            float("nan"),
            0.0,
            "every entry matches some admissible outcome, but no kept count k is consistent "
            "with the scale the implementation used",
        )
    return mm, worst, None


def _denominators(caution: spec.Caution | None, tt: TensorTerms, und: np.ndarray) -> range:
    """The admissible ``n`` of the scale: the size, or with ``denominator="nonzero"`` the consumed gradient's
    nonzero entries, where an entry whose ``g`` is within rounding of zero (undecided) may count either way."""
    if caution is None or caution.denominator == "size":
        return range(tt.p.size, tt.p.size + 1)
    nz = tt.g.reshape(-1) != 0  # NaN counts
    return range(int(np.count_nonzero(nz & ~und)), int(np.count_nonzero(nz | und)) + 1)


def check_stats(
    case: Case,
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    state: spec.State,
    got: Sequence[tuple[int, int, float] | None],
) -> list[Mismatch]:
    """Check an implementation's telemetry of one step (per tensor ``(count, n, scale)``) against the reference.

    ``n`` must equal the tensor's size; ``count`` the reference's kept count, except that each
    entry whose mask decision is within rounding (undecided, as in :func:`check_step`) may count
    either way; ``scale`` must be :meth:`cautious.Caution.scale` of the reported count and an
    admissible denominator, within ``K`` unit roundoffs of the compute dtype (float64 scales are
    exact). Without caution there is nothing to check. Not checked yet: Muon with
    ``mask_position="before"``, whose mask is decided on the momentum, before Newton-Schulz, while
    the bounds here carry the orthogonalized direction.
    """
    caution = case.caution
    if caution is None or (case.rule == "muon" and case.hparams.get("mask_position") == "before"):
        return []
    t = int(state.step) + 1
    out: list[Mismatch] = []
    if len(got) != len(params):
        return [Mismatch("len(stats)", (), len(params), len(got), 0.0)]
    e = K * unit_roundoff(compute_dtype(case.dtype))
    for i, (p, g, s, st) in enumerate(zip(params, grads, state.leaves, got)):
        what = f"stats[{i}]"
        if st is None:
            out.append(Mismatch(what, (), np.nan, np.nan, 0.0, "no telemetry for this tensor"))
            continue
        count, n, scale = int(st[0]), int(st[1]), float(st[2])
        tt = tensor_terms(case, p, g, tuple(s), t)
        und = tt.undecided.reshape(-1)
        mask_ref = spec.cautious_mask(tt.u, tt.g).reshape(-1)
        lo, hi = int(np.count_nonzero(mask_ref & ~und)), int(np.count_nonzero(mask_ref | und))
        if n != tt.p.size:
            out.append(Mismatch(f"{what}.n", (), float(tt.p.size), float(n), 0.0))
        if not lo <= count <= hi:
            out.append(Mismatch(f"{what}.count", (), float(int(np.count_nonzero(mask_ref))), float(count), 0.0,
                                f"admissible {lo}..{hi}"))  # fmt: skip
            continue
        exps = [caution.scale(count, den) for den in _denominators(caution, tt, und)]
        j = int(np.argmin([abs(scale - x) for x in exps]))
        if not abs(scale - exps[j]) <= e * abs(exps[j]):
            out.append(Mismatch(f"{what}.scale", (), exps[j], scale, e * abs(exps[j]), f"count {count} of n={n}"))
    return out


def check_step(
    case: Case,
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    state: spec.State,
    got_params: Sequence[np.ndarray],
    got_state: spec.State | None,
) -> StepReport:
    """Check one step of an implementation (``got_*``) taken from ``params``/``grads``/``state``."""
    t = int(state.step) + 1
    lr = float(case.hparams.get("lr", _default_lr(case)))
    mismatches: list[Mismatch] = []
    notes: list[str] = []
    worst = 0.0
    if len(got_params) != len(params):
        return StepReport([Mismatch("len(params)", (), len(params), len(got_params), 0.0)], np.inf, notes)
    for i, (p, g, s, gp) in enumerate(zip(params, grads, state.leaves, got_params)):
        gp = np.asarray(gp)
        if gp.shape != np.shape(p):
            mismatches.append(Mismatch(f"params[{i}].shape", (), np.nan, np.nan, 0.0, f"{gp.shape} != {np.shape(p)}"))
            continue
        if case.dtype == "bfloat16" and gp.size:
            if not np.array_equal(round_to(gp, "bfloat16"), gp.astype(np.float32), equal_nan=True):
                notes.append(f"params[{i}] holds values that are not bfloat16")
        tt = tensor_terms(case, p, g, tuple(s), t)
        mm, w, _ = _check_param(case, tt, gp, lr, f"params[{i}]")
        worst = max(worst, w)
        if mm is not None:
            mismatches.append(mm)
        if got_state is None:
            continue
        got_leaf = got_state.leaves[i]
        for field, exp in tt.state.items():
            got = getattr(got_leaf, field, None)
            if exp is None:
                continue
            if got is None:
                notes.append(f"state.leaves[{i}].{field} not exposed by the implementation: not compared")
                continue
            got = np.asarray(got, dtype=np.float64)
            if got.shape != exp.shape:
                mismatches.append(Mismatch(f"state.leaves[{i}].{field}.shape", (), np.nan, np.nan, 0.0, f"{got.shape}"))
                continue
            sd = case.state_storage
            tol = tt.state_err[field] * (1 + unit_roundoff(sd)) + _storage_tol(exp, sd)
            with np.errstate(over="ignore", invalid="ignore"):  # beyond the storage dtype's range: overflows
                tol = np.where(np.isinf(round_to(exp, sd)) & np.isfinite(exp), np.inf, tol)
            ok, ratio = _match(got, exp, tol)
            if ratio.size:
                worst = max(worst, float(ratio.max()))
            if not ok.all():
                j = int(np.flatnonzero(~ok.reshape(-1))[0])
                idx = tuple(int(x) for x in np.unravel_index(j, exp.shape)) if exp.shape else ()
                mismatches.append(
                    Mismatch(
                        f"state.leaves[{i}].{field}",
                        idx,
                        float(exp.reshape(-1)[j]),
                        float(got.reshape(-1)[j]),
                        float(tol.reshape(-1)[j]),
                    )
                )
    if got_state is None:
        notes.append("the implementation's state is not exposed: parameters compared only")
    elif int(got_state.step) != t:
        mismatches.append(Mismatch("state.step", (), float(t), float(got_state.step), 0.0))
    return StepReport(mismatches, worst, notes)


def _default_lr(case: Case) -> float:
    return {"lion": 1e-4, "nadam": 2e-3, "rmsprop": 1e-2, "adafactor": 1e-2, "laprop": 4e-4}.get(case.rule, 1e-3)


def py_float(x: float) -> str:
    """``x`` as Python source that evaluates to it: ``float('nan')``, ``float('-inf')``, ``-0.0``, ``0.1``."""
    x = float(x)
    if np.isnan(x):
        return "float('nan')"
    if np.isinf(x):
        return "float('inf')" if x > 0 else "float('-inf')"
    return repr(x)


def _nested(x) -> str:
    if isinstance(x, list):
        return "[" + ", ".join(_nested(v) for v in x) + "]"
    return py_float(x)


def _arr(x: np.ndarray | None, dtype: str) -> str:
    if x is None:
        return "None"
    x = np.asarray(x, dtype=np.float64)
    return f"np.array({_nested(x.tolist())}, dtype=np.{numpy_dtype(dtype)})"


def repro_snippet(case: Case, params: Sequence[np.ndarray], grads: Sequence[np.ndarray], state: spec.State) -> str:
    """A runnable Python snippet that recomputes the reference step for these inputs."""
    hp = dict(case.hparams)
    caution = hp.get("caution", True)
    hp_s = ", ".join(
        f"{k}={('cautious.' + repr(v)) if isinstance(v, spec.Caution) else repr(v)}"
        for k, v in hp.items()
        if k != "caution"
    )
    caution_s = ("cautious." + repr(caution)) if isinstance(caution, spec.Caution) else repr(caution)
    leaves = []
    for s in state.leaves:
        fields = ", ".join(f"{f}={_arr(getattr(s, f), case.state_storage)}" for f in s._fields)
        leaves.append(f"spec.{type(s).__name__}({fields})")
    lines = [
        "import numpy as np",
        "import cautious",
        "from cautious import spec",
        f"# dtype={case.dtype} (bfloat16 values are carried in float32), state_dtype={case.state_storage}",
        f"opt = spec.{case.rule}({hp_s}{', ' if hp_s else ''}caution={caution_s})",
        f"params = [{', '.join(_arr(p, case.dtype) for p in params)}]",
        f"grads = [{', '.join(_arr(g, case.dtype) for g in grads)}]",
        f"state = spec.State(step={int(state.step)}, leaves=({', '.join(leaves)}{',' if len(leaves) == 1 else ''}))",
        "new_params, new_state = opt.step(params, grads, state)",
    ]
    return "\n".join(lines)
