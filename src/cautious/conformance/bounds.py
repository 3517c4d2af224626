r"""Error bounds derived from the computation, one step at a time.

For every quantity of a step the reference computes, in float64, both the value
and a bound on how far a correct implementation computing in the case's compute
dtype may be from it. With ``e = K * unit_roundoff(compute)`` and ``tn`` the
smallest normal of the compute dtype (flush-to-zero slack):

.. math::

    \text{err}(a x + b y) &= e\,(|a x| + |b y|) + |a|\,\text{err}(x) + |b|\,\text{err}(y) + tn \\
    \text{err}(\sqrt{x}) &= \min\Big(\text{err}(x) / \big(\sqrt{x} + \sqrt{\max(x - \text{err}(x), 0)}\big),
    \sqrt{\text{err}(x)}\Big) + e\sqrt{x} \\
    \text{err}(x / y) &= e\,|x/y| + \text{err}(x)/y_{lo} + |x/y|\,\text{err}(y)/y_{lo},
    \quad y_{lo} = y - \text{err}(y) > 0

First-order propagation through these rules gives bounds for ``m``, ``v``,
``u`` and the parameters. A sign is *undecided* where the value lies within its
bound of zero; there the implementation may keep or mask the entry, and the
checker requires the scale to be consistent with the decisions it took.
The ``tn`` slack is added only where the operands are nonzero, so exact zeros
stay exact (and an exact-zero gradient is always masked).
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np

from cautious.conformance.case import Case
from cautious.spec.dtypes import compute_dtype, tiny, unit_roundoff

__all__ = ["K", "TensorTerms", "tensor_terms", "decay_order"]

#: Operations' worth of rounding allowed per quantity. Generous enough for any
#: evaluation order of the formulas; tight enough that a float32 bias correction
#: or an off-by-one step is far outside it.
K = 16


@dataclasses.dataclass
class TensorTerms:
    """Reference values and bounds for one tensor's step."""

    p: np.ndarray  # input parameter (float64)
    g: np.ndarray  # gradient the rule consumed (after maximize / coupled decay)
    err_g: np.ndarray
    u: np.ndarray  # base direction (before caution)
    err_u: np.ndarray
    undecided: np.ndarray  # bool: the mask decision may go either way
    lion_sign_undecided: np.ndarray  # bool: Lion's sign(c) itself is undecided
    state: dict[str, np.ndarray | None]  # expected new state fields
    state_err: dict[str, np.ndarray | None]
    decay_on: bool = True  # decoupled decay applies at this step (ADOPT: not on its first step)


def _ema_mag(x: np.ndarray, y: np.ndarray, b: float) -> np.ndarray:
    """Magnitude for the rounding error of ``b*x + (1-b)*y`` in either form.

    The multiply-add form errs by about ``e*(|b x| + |(1-b) y|)``; the lerp form
    ``x + (1-b)*(y - x)`` (torch's ``lerp_``, Keras's ``assign_add``) also by
    ``e*(1-b)|x|``, which matters when ``b`` is small. ``|x| + (1-b)|y|`` covers both.
    """
    return np.abs(x) + (1 - b) * np.abs(y)


def _slack(mag: np.ndarray, tn: float) -> np.ndarray:
    return np.where(mag > 0, tn, 0.0)


def tensor_terms(case: Case, p: np.ndarray, g: np.ndarray, s: tuple, t: int) -> TensorTerms:
    """Reference terms with bounds for one tensor at 1-based step ``t``."""
    hp = dict(case.hparams)
    cd = compute_dtype(case.dtype)
    e = K * unit_roundoff(cd)
    tn = tiny(cd)
    p = np.asarray(p, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    s = tuple(None if x is None else np.asarray(x, dtype=np.float64) for x in s)
    wd = weight_decay(case)
    is_decoupled = decoupled(case)
    if hp.get("maximize", False):
        g = -g
    # flush-to-zero: a subnormal gradient may be read as zero.
    err_g = np.where(np.abs(g) < tn, np.abs(g), 0.0)
    if wd != 0 and not is_decoupled:
        mag = np.abs(g) + wd * np.abs(p)
        g = g + wd * p
        err_g = e * mag + err_g + _slack(mag, tn)

    state: dict[str, np.ndarray | None] = {}
    state_err: dict[str, np.ndarray | None] = {}
    lion_undecided = np.zeros(g.shape, bool)
    rule = "adam" if case.rule == "adamw" else case.rule
    if rule == "adam":
        b1, b2 = (float(x) for x in hp.get("betas", (0.9, 0.999)))
        eps = float(hp.get("eps", 1e-8))
        m0, v0, vmax0 = s
        mag_m = _ema_mag(m0, g, b1)
        m = b1 * m0 + (1 - b1) * g
        err_m = e * mag_m + (1 - b1) * err_g + _slack(mag_m, tn)
        g2 = g * g
        mag_v = _ema_mag(v0, g2, b2)
        v = b2 * v0 + (1 - b2) * g2
        err_v = e * mag_v + (1 - b2) * (2 * np.abs(g) * err_g + err_g * err_g) + _slack(mag_v, tn)
        state.update(m=m, v=v)
        state_err.update(m=err_m, v=err_v)
        if hp.get("amsgrad", False):
            vmax = np.maximum(vmax0, v)
            # a stored subnormal v_max may be read as zero (flush-to-zero)
            err_vmax = err_v + np.where(np.abs(vmax0) < tn, np.abs(vmax0), 0.0)
            state["v_max"], state_err["v_max"] = vmax, err_vmax
            vh, err_vh = vmax, err_vmax
        else:
            state["v_max"], state_err["v_max"] = None, None
            vh, err_vh = v, err_v
        bc1 = 1 - b1**t
        bc2 = 1 - b2**t
        if hp.get("eps_placement", "corrected") == "corrected":
            q, err_q = vh / bc2, err_vh / bc2
            num, err_num = m / bc1, err_m / bc1
        else:
            q, err_q = vh, err_vh
            c = math.sqrt(bc2) / bc1
            num, err_num = c * m, c * err_m
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.sqrt(q)
            # |sqrt(q') - sqrt(q)| <= d / (sqrt(q) + sqrt(max(q - d, 0))) for |q' - q| <= d (exact, any d)
            lo = r + np.sqrt(np.maximum(q - err_q, 0.0))
            # ... and |sqrt(a) - sqrt(b)| <= sqrt(|a - b|), tighter where q is far below its bound
            err_r = np.minimum(np.where(lo > 0, err_q / lo, np.inf), np.sqrt(err_q)) + e * r
            den = r + eps
            err_den = err_r + e * den
            den_lo = den - err_den
            u = num / den
            err_u = e * np.abs(u) + (err_num + np.abs(u) * err_den) / den_lo
            # 1 - b**t is computed in float64 by everyone (the reference too): cancellation leaves a
            # relative error of about eps64 * b**t / (1 - b**t) in each bias correction.
            # (declared deviation "bias_correction": computed in the compute dtype, as Keras does)
            bc_dtype = cd if "bias_correction" in case.allow else "float64"
            rel_bc = K * unit_roundoff(bc_dtype) * (b1**t / bc1 + 0.5 * b2**t / bc2)
            err_u = err_u + np.abs(u) * rel_bc
            err_u = np.where(den_lo > 0, err_u, np.inf)
        sign_err = err_m  # sign(u) == sign(m)
        sign_val = m
    elif rule == "lion":
        b1, b2 = (float(x) for x in hp.get("betas", (0.9, 0.99)))
        (m0,) = s
        mag_c = _ema_mag(m0, g, b1)
        c = b1 * m0 + (1 - b1) * g
        err_c = e * mag_c + (1 - b1) * err_g + _slack(mag_c, tn)
        u = np.sign(c)
        err_u = np.zeros_like(u)
        lion_undecided = (np.abs(c) <= err_c) & (err_c > 0)
        mag_m = _ema_mag(m0, g, b2)
        state["m"] = b2 * m0 + (1 - b2) * g
        state_err["m"] = e * mag_m + (1 - b2) * err_g + _slack(mag_m, tn)
        sign_val, sign_err = c, err_c
    elif rule == "adopt":
        u, err_u, sign_val, sign_err = _adopt_terms(hp, g, err_g, s, t, e, tn, state, state_err)
    elif rule == "laprop":
        u, err_u, sign_val, sign_err = _laprop_terms(hp, g, err_g, s, t, e, tn, state, state_err)
    else:
        mom = float(hp.get("momentum", 0.0))
        damp = float(hp.get("dampening", 0.0))
        if mom == 0:
            u, err_u = g, err_g
            state["m"], state_err["m"] = None, None
        else:
            (m0,) = s
            if t == 1:
                m, err_m = g.copy(), err_g
            else:
                mag = np.abs(mom * m0) + np.abs((1 - damp) * g)
                m = mom * m0 + (1 - damp) * g
                err_m = e * mag + (1 - damp) * err_g + _slack(mag, tn)
            state["m"], state_err["m"] = m, err_m
            if hp.get("nesterov", False):
                mag = np.abs(g) + mom * np.abs(m)
                u = g + mom * m
                err_u = e * mag + err_g + mom * err_m + _slack(mag, tn)
            else:
                u, err_u = m, err_m
        sign_val, sign_err = u, err_u

    # an exactly-zero direction computed exactly by every admitted evaluation order is decided: masked.
    exact0 = _exact_zeros(case, rule, g, err_g, s, sign_val, sign_err, u, t)
    sign_err = np.where(exact0, 0.0, sign_err)
    lion_undecided &= ~exact0
    with np.errstate(invalid="ignore"):
        undecided = ((np.abs(sign_val) <= sign_err) & (sign_err > 0)) | ((np.abs(g) <= err_g) & (err_g > 0))
    # a direction below the smallest normal may itself be flushed to zero (then masked); where
    # the direction's bound is infinite (a denominator within rounding of 0), it may even be NaN.
    undecided |= ((np.abs(u) < tn) & (u != 0)) | np.isinf(err_u)
    # declared deviations (Case.allow) the port may take instead of the spec's decision
    if "sign_vs_underflow" in case.allow:
        with np.errstate(invalid="ignore", over="ignore", under="ignore"):
            undecided |= (np.abs(u) * np.abs(g) < tn) & (u != 0) & (g != 0)
    if "mask_boundary" in case.allow:
        undecided |= (u == 0) | (g == 0)
    if "nan" in case.allow:
        undecided |= np.isnan(u) | np.isnan(g)
    else:
        undecided &= ~(np.isnan(u) | np.isnan(g))
    decay_on = not (rule == "adopt" and t == 1)
    return TensorTerms(p, g, err_g, u, err_u, undecided, lion_undecided, state, state_err, decay_on)


def _adopt_terms(hp, g, err_g, s, t, e, tn, state, state_err):
    r"""ADOPT (:func:`cautious.spec.rules.adopt_direction`) with bounds; fills ``state``/``state_err``.

    Step 1 is exact: ``u = 0``, ``m' = m``, ``v' = g^2`` (one rounding). Later steps: ``sqrt(v)`` of the
    stored ``v`` (a subnormal may flush: error ``v``), ``d = max(sqrt(v), eps)`` (1-Lipschitz: the error
    of the root), ``n = g / d``, the clip (1-Lipschitz in ``n`` and in the bound ``c = (t-1)^e``, whose
    own error is ``e c``), then the moving averages.
    """
    b1, b2 = (float(x) for x in hp.get("betas", (0.9, 0.9999)))
    eps = float(hp.get("eps", 1e-6))
    clip_exp = hp.get("clip_exp", 0.333)
    m0, v0 = s
    g2 = g * g
    if t == 1:
        state.update(m=m0, v=g2)
        state_err.update(m=np.zeros_like(m0), v=e * g2 + 2 * np.abs(g) * err_g + err_g * err_g + _slack(g2, tn))
        u = np.zeros_like(g)
        return u, np.zeros_like(g), u, np.zeros_like(g)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        err_v0 = np.where(np.abs(v0) < tn, np.abs(v0), 0.0)
        r = np.sqrt(v0)
        lo = r + np.sqrt(np.maximum(v0 - err_v0, 0.0))
        err_r = np.minimum(np.where(lo > 0, err_v0 / lo, np.inf), np.sqrt(err_v0)) + e * r
        den = np.maximum(r, eps)
        den_lo = den - err_r
        n = g / den
        err_n = e * np.abs(n) + (err_g + np.abs(n) * err_r) / den_lo
        err_n = np.where(den_lo > 0, err_n, np.inf)
        if clip_exp is not None:
            c = float(t - 1) ** float(clip_exp)
            n = np.clip(n, -c, c)
            err_n = err_n + e * c
        mag_m = _ema_mag(m0, n, b1)
        m = b1 * m0 + (1 - b1) * n
        err_m = e * mag_m + (1 - b1) * err_n + _slack(mag_m, tn)
        if hp.get("nesterov", False):
            mag_u = b1 * np.abs(m) + (1 - b1) * np.abs(n)
            u = b1 * m + (1 - b1) * n
            err_u = e * mag_u + b1 * err_m + (1 - b1) * err_n + _slack(mag_u, tn)
        else:
            u, err_u = m, err_m
        mag_v = _ema_mag(v0, g2, b2)
        v = b2 * v0 + (1 - b2) * g2
        err_v = e * mag_v + (1 - b2) * (2 * np.abs(g) * err_g + err_g * err_g) + _slack(mag_v, tn)
    state.update(m=m, v=v)
    state_err.update(m=err_m, v=err_v)
    return u, err_u, u, err_u


def _laprop_terms(hp, g, err_g, s, t, e, tn, state, state_err):
    r"""LaProp (:func:`cautious.spec.rules.laprop_update`) with bounds; fills ``state``/``state_err``.

    The checker's direction is ``u = m' / lr_avg'`` (so ``delta = -lr u``): ``v'`` and ``q = v'/(1-b2^t)``
    as Adam's (the bias correction with its float64 cancellation, or in the compute dtype with the
    ``bias_correction`` deviation), ``n = g / (sqrt(q) + eps)``, ``m' = b1 m + (1-b1) lr n``,
    ``lr_avg' = b1 lr_avg + (1-b1) lr`` (relative error ``e``), and the quotient. ``sign(u) = sign(m')``.
    """
    b1, b2 = (float(x) for x in hp.get("betas", (0.9, 0.999)))
    eps = float(hp.get("eps", 1e-15))
    lr = float(hp.get("lr", 4e-4))
    m0, v0, a0 = s
    g2 = g * g
    mag_v = _ema_mag(v0, g2, b2)
    v = b2 * v0 + (1 - b2) * g2
    err_v = e * mag_v + (1 - b2) * (2 * np.abs(g) * err_g + err_g * err_g) + _slack(mag_v, tn)
    bc2 = 1 - b2**t
    rel_bc = e * (1 + b2**t / bc2)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q, err_q = v / bc2, err_v / bc2 + rel_bc * v / bc2
        r = np.sqrt(q)
        lo = r + np.sqrt(np.maximum(q - err_q, 0.0))
        err_r = np.minimum(np.where(lo > 0, err_q / lo, np.inf), np.sqrt(err_q)) + e * r
        den = r + eps
        err_den = err_r + e * den
        den_lo = den - err_den
        n = g / den
        err_n = e * np.abs(n) + (err_g + np.abs(n) * err_den) / den_lo
        err_n = np.where(den_lo > 0, err_n, np.inf)
        ln = lr * n
        mag_m = _ema_mag(m0, ln, b1)
        m = b1 * m0 + (1 - b1) * ln
        err_m = e * mag_m + (1 - b1) * lr * (err_n + e * np.abs(n)) + _slack(mag_m, tn)
        a = b1 * float(a0) + (1 - b1) * lr
        err_a = e * (b1 * abs(float(a0)) + (1 - b1) * lr)
        if a > 0:
            u = m / a
            err_u = e * np.abs(u) + (err_m + np.abs(u) * err_a) / (a - err_a)
        else:
            u, err_u = np.zeros_like(m), np.zeros_like(m)
    state.update(m=m, v=v, lr_avg=np.asarray(a))
    state_err.update(m=err_m, v=err_v, lr_avg=np.asarray(err_a))
    return u, err_u, m, err_m


def _representable(x: Fraction, cd: str) -> bool:
    """``x`` is exactly a normal (or zero) value of the compute dtype ``cd``."""
    if x == 0:
        return True
    f = float(x)
    if not math.isfinite(f) or abs(f) < tiny(cd):
        return False
    if cd == "float32":
        return Fraction(float(np.float32(f))) == x
    return Fraction(f) == x


def _exact_combo(a: float, x: float, c: float, y: float, cd: str) -> bool:
    """Every admitted evaluation of ``a*x + c*y`` is exact in ``cd`` (and so agrees with the reference).

    The forms: multiply-add, and when ``a + c == 1`` the lerps ``x + c*(y - x)`` and
    ``y - (1 - c)*(y - x)`` (torch's ``lerp_`` picks the second for weights >= 0.5).
    """
    fa, fx, fc, fy = (Fraction(v) for v in (a, x, c, y))
    parts = [fa * fx, fc * fy, fa * fx + fc * fy]
    if fa + fc == 1:
        d = fy - fx
        parts += [d, fc * d, fx + fc * d, 1 - fc, (1 - fc) * d]
    return all(_representable(v, cd) for v in parts)


def _exact_zeros(case, rule, g, err_g, s, sign_val, sign_err, u, t) -> np.ndarray:
    """Entries whose direction is exactly zero in every correct implementation (so decided: masked)."""
    cand = (sign_val == 0) & (sign_err > 0) & (err_g == 0) & (u == 0)
    out = np.zeros(np.shape(sign_val), bool)
    if not cand.any():
        return out
    hp = case.hparams
    cd = compute_dtype(case.dtype)
    flat_out = out.reshape(-1)
    gf = np.asarray(g, np.float64).reshape(-1)
    for i in np.flatnonzero(cand.reshape(-1)):
        gi = float(gf[i])
        if rule in ("adopt", "laprop"):  # a normalized gradient enters: not decided exactly here (either way)
            ok = False
        elif rule == "adam" or rule == "lion":
            b1 = float(hp.get("betas", (0.9, 0.999 if rule == "adam" else 0.99))[0])
            m0 = float(np.asarray(s[0]).reshape(-1)[i])
            ok = _exact_combo(b1, m0, 1 - b1, gi, cd)
        else:
            mom, damp = float(hp.get("momentum", 0.0)), float(hp.get("dampening", 0.0))
            if mom == 0 or t == 1:
                ok = True  # u = g (or m = g): exact
                m = gi
            else:
                m0 = float(np.asarray(s[0]).reshape(-1)[i])
                ok = _exact_combo(mom, m0, 1 - damp, gi, cd)
                m = float(Fraction(mom) * Fraction(m0) + Fraction(1 - damp) * Fraction(gi))
            if ok and hp.get("nesterov", False) and mom != 0:
                ok = _exact_combo(1.0, gi, mom, m, cd)
        flat_out[i] = ok
    return out


def weight_decay(case: Case) -> float:
    """The case's weight decay, with the factory default when unset."""
    if "weight_decay" in case.hparams:
        return float(case.hparams["weight_decay"])
    return 1e-2 if case.rule == "adamw" else 0.0


def decoupled(case: Case) -> bool:
    """Whether the case's weight decay is decoupled (AdamW, Lion, or the explicit option)."""
    if case.rule in ("adamw", "lion", "laprop"):
        return True
    return bool(case.hparams.get("decoupled_weight_decay", False))


def decay_order(case: Case) -> str:
    """``"post_update"`` where decoupled decay shrinks the updated parameter (LaProp's default);
    else ``"pre_update"``."""
    return str(case.hparams.get("decay_order", "post_update" if case.rule == "laprop" else "pre_update"))
