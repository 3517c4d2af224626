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
from cautious.spec.mask import apply_caution
from cautious.spec.rules import muon_shape_scale

__all__ = ["K", "TensorTerms", "tensor_terms", "newton_schulz_bound", "caution_on_u"]

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
    elif rule == "muon":
        u, err_u, sign_val, sign_err, state, state_err = _muon_terms(case, g, err_g, s, t, e, tn, cd)
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
    if rule == "muon":  # NS mixes entries: an exact zero of u is not decided entrywise
        exact0 = np.zeros(np.shape(u), bool)
    else:
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
    return TensorTerms(p, g, err_g, u, err_u, undecided, lion_undecided, state, state_err)


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
        if rule == "adam" or rule == "lion":
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
    return {"adamw": 1e-2, "muon": 0.1}.get(case.rule, 0.0)


def decoupled(case: Case) -> bool:
    """Whether the case's weight decay is decoupled (AdamW, Lion, or the explicit option)."""
    if case.rule in ("adamw", "lion", "muon"):
        return True
    return bool(case.hparams.get("decoupled_weight_decay", False))


# -- Muon: the momentum elementwise, then a bound on Newton-Schulz in the Frobenius norm -----------------


def _quad_max_abs(c0: float, c1: float, c2: float, hi: float) -> float:
    """``max |c0 + c1 x + c2 x^2|`` over ``x`` in ``[0, hi]`` (endpoints and the vertex)."""
    xs = [0.0, hi]
    if c2 != 0:
        vertex = -c1 / (2 * c2)
        if 0 < vertex < hi:
            xs.append(vertex)
    return max(abs(c0 + c1 * x + c2 * x * x) for x in xs)


def _fro(x: np.ndarray) -> float:
    """The Frobenius norm without underflow (error bounds of subnormal size must not square to 0)."""
    big = float(np.max(np.abs(x))) if x.size else 0.0
    if big == 0 or not math.isfinite(big):
        return big
    return big * float(np.linalg.norm(x / big))


def newton_schulz_bound(
    v: np.ndarray, err_v: np.ndarray, *, ns_coefficients, ns_steps: int, eps: float, ns_eps: str, cd: str
) -> tuple[np.ndarray, float]:
    r"""``(NS(v), delta)``: the float64 orthogonalization and a bound ``delta`` on the Frobenius norm of
    the error of any implementation computing it in ``cd`` from a ``v'`` with ``|v' - v| <= err_v``.

    Derivation in docs/conformance.md ("Muon"). With ``u_c = unit_roundoff(cd)``, a matrix product
    with inner dimension ``n`` errs by at most ``(n + K) u_c |A||B|`` entrywise, so by
    ``(n + K) u_c |A|_F |B|_F`` in the Frobenius norm; elementwise operations by ``K u_c`` relative.

    * normalization: ``|X0' - X0|_F <= (|dV|_F + |X0|_F dN) / (D - dN) + K u_c |X0|_F`` with
      ``dN = |dV|_F + (rc + K) u_c |V|_F`` the error of the norm and ``D`` the denominator;
    * each step ``X -> p(X) = X q(X^T X)``, ``q(y) = a + b y + c y^2``: the exact map is Lipschitz
      with constant ``L = max(|p'(s)|, |q(s^2)|)`` over ``s`` in ``[0, |X|_2 + delta]`` (the Frechet
      derivative of a generalized matrix function is bounded by its first divided differences),
      and the step adds its own rounding ``R`` (products and sums, with the norms of the computed
      iterate bounded by the reference's plus ``delta``): ``delta' = L delta + R``.
    """
    a, b, c = (float(k) for k in ns_coefficients)
    uc = unit_roundoff(cd)
    e = K * uc
    x = np.asarray(v, dtype=np.float64)
    dv = _fro(np.asarray(err_v, dtype=np.float64))
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    r, cols = x.shape
    with np.errstate(over="ignore", invalid="ignore"):
        norm = float(np.linalg.norm(x))
        den = max(norm, eps) if ns_eps == "clamp" else norm + eps
        x = x / den
        if not (np.isfinite(norm) and np.isfinite(dv)):
            delta = math.inf
        else:
            dn = dv + (r * cols + K) * uc * norm
            fx = float(np.linalg.norm(x))
            delta = (dv + fx * dn) / (den - dn) + e * fx if den > dn else math.inf
        for _ in range(int(ns_steps)):
            gram = x @ x.T
            gram2 = gram @ gram
            bmat = b * gram + c * gram2
            y = bmat @ x
            x_new = a * x + y
            if math.isfinite(delta):
                s2 = float(np.linalg.norm(x, 2)) + delta
                lip = max(_quad_max_abs(a, 3 * b, 5 * c, s2 * s2), _quad_max_abs(a, b, c, s2 * s2))
                f = float(np.linalg.norm(x)) + delta  # |X'|_F of the computed iterate
                fa = f * f  # |A'|_F <= |X'|_F^2 (and |A'|_2 <= |A'|_F)
                fa2 = fa * fa
                fb = abs(b) * fa + abs(c) * fa2
                r_a = (cols + K) * uc * f * f
                r_b = abs(c) * (r + K) * uc * fa2 + e * (abs(b) * fa + abs(c) * fa2)
                r_b += (abs(b) + 2 * abs(c) * fa) * r_a
                r_x = (r + K) * uc * fb * f + e * (abs(a) * f + fb * f) + r_b * f
                delta = lip * delta + r_x
            x = x_new
    return (x.T if tall else x), delta


def _muon_terms(case: Case, g, err_g, s, t, e, tn, cd):
    """Muon's u, err_u, the values the mask is decided from, and the state, with bounds."""
    hp = case.hparams
    mu = float(hp.get("momentum", 0.95))
    nesterov = bool(hp.get("nesterov", True))
    form = hp.get("muon_momentum", "ema")
    (m0,) = s
    if form == "sum":
        # Keras computes m + (g + m (mu - 1)): its rounding scales with |m| even for mu = 0
        mag = np.abs(m0) + np.abs(g)
        m = mu * m0 + g
        err_m = e * mag + err_g + _slack(mag, tn)
    else:
        mag = _ema_mag(m0, g, mu)
        m = mu * m0 + (1 - mu) * g
        err_m = e * mag + (1 - mu) * err_g + _slack(mag, tn)
    if not nesterov:
        v, err_v = m, err_m
        if form == "debiased":
            bc = 1 - mu**t
            v, err_v = m / bc, err_m / bc + e * np.abs(m / bc) * (1 + mu**t / bc)
    elif form == "sum":
        mag = np.abs(g) + mu * np.abs(m)
        v = g + mu * m
        err_v = e * mag + err_g + mu * err_m + _slack(mag, tn)
    elif form == "ema":
        mag = _ema_mag(g, m, 1 - mu)
        v = (1 - mu) * g + mu * m
        err_v = e * mag + (1 - mu) * err_g + mu * err_m + _slack(mag, tn)
    else:
        bc1, bc2 = 1 - mu**t, 1 - mu ** (t + 1)
        t1, t2 = mu * m / bc2, (1 - mu) * g / bc1
        v = t1 + t2
        # optax computes 1 - mu**t in the compute dtype: relative error about e * mu**t / (1 - mu**t)
        err_v = (
            e * (np.abs(t1) * (1 + mu ** (t + 1) / bc2) + np.abs(t2) * (1 + mu**t / bc1))
            + mu * err_m / bc2
            + (1 - mu) * err_g / bc1
            + _slack(np.abs(t1) + np.abs(t2), tn)
        )
    caution = case.caution
    before = caution is not None and hp.get("mask_position", "after") == "before"
    undecided_v = np.zeros(np.shape(v), bool)
    vin, err_in = v, err_v
    if before:
        with np.errstate(invalid="ignore"):
            undecided_v = ((np.abs(v) <= err_v) & (err_v > 0)) | ((np.abs(g) <= err_g) & (err_g > 0))
        v_c, mask, count, scale = apply_caution(v, g, caution)
        vin = v_c
        err_in = np.where(mask, scale * err_v + e * np.abs(v_c), 0.0)
    shape_scale = muon_shape_scale(
        np.shape(v), shape_scale=hp.get("shape_scale", "rows_over_cols"), rms_rate=float(hp.get("rms_rate", 0.2))
    )
    o, delta = newton_schulz_bound(
        vin,
        err_in,
        ns_coefficients=hp.get("ns_coefficients", (3.4445, -4.7750, 2.0315)),
        ns_steps=int(hp.get("ns_steps", 5)),
        eps=float(hp.get("eps", 1e-7)),
        ns_eps=hp.get("ns_eps", "clamp"),
        cd=cd,
    )
    u = shape_scale * o
    with np.errstate(invalid="ignore", over="ignore"):
        err_u = shape_scale * delta + e * np.abs(u) + _slack(np.abs(u), tn)
    if before and np.any(undecided_v & ~(np.isnan(v) | np.isnan(g))):
        # a mask decision on v within rounding of zero changes the matrix orthogonalized: unbounded
        err_u = np.full(np.shape(u), np.inf)
    err_u = np.broadcast_to(err_u, np.shape(u)).copy()
    # "before": the mask was applied to v; the checker's elementwise mask is then off (caution_on_u)
    sign_val, sign_err = u, err_u
    return u, err_u, sign_val, sign_err, {"m": m}, {"m": err_m}


def caution_on_u(case: Case):
    """The caution the checker applies elementwise to ``u``: None for Muon with ``mask_position="before"``
    (the mask is inside the reference's ``u``, see :func:`_muon_terms`)."""
    if case.rule == "muon" and case.hparams.get("mask_position", "after") == "before":
        return None
    return case.caution
