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
from cautious.spec.rules import muon_shape_scale, nadam_mu

__all__ = ["K", "TensorTerms", "tensor_terms", "decay_order", "newton_schulz_bound", "caution_on_u"]

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
    eta: float | None = None  # the step size multiplying u (None: the case's lr); Adafactor's alpha_t
    err_eta: float = 0.0  # its absolute error bound
    decay_lr: float | None = None  # the lr in the decay factor 1 - lr * wd (None: the case's lr)
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
    if rule == "adafactor":
        return _adafactor_terms(case, p, g, err_g, s, t, e, tn)
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
    elif rule == "nadam":
        b1, b2 = (float(x) for x in hp.get("betas", (0.9, 0.999)))
        eps = float(hp.get("eps", 1e-8))
        m0, v0, prod0 = s
        mag_m = _ema_mag(m0, g, b1)
        m = b1 * m0 + (1 - b1) * g
        err_m = e * mag_m + (1 - b1) * err_g + _slack(mag_m, tn)
        g2 = g * g
        mag_v = _ema_mag(v0, g2, b2)
        v = b2 * v0 + (1 - b2) * g2
        err_v = e * mag_v + (1 - b2) * (2 * np.abs(g) * err_g + err_g * err_g) + _slack(mag_v, tn)
        sched = dict(
            beta1=b1,
            momentum_decay=float(hp.get("momentum_decay", 4e-3)),
            momentum_schedule=hp.get("momentum_schedule", "dozat"),
        )
        mu, mu_next = nadam_mu(t, **sched), nadam_mu(t + 1, **sched)
        prod = float(prod0) * mu
        prod_next = prod * mu_next
        a = (1 - mu) / (1 - prod)
        b = mu_next / (1 - prod_next)
        state.update(m=m, v=v, mu_product=np.asarray(prod))
        # Pi_t: one product of a stored value (the reference's too) and mu_t; a subnormal may be flushed
        err_prod = (
            e * abs(prod)
            + (abs(prod) if abs(prod) < tn else 0.0)
            + (abs(float(prod0)) if abs(float(prod0)) < tn else 0.0)
        )
        state_err.update(m=err_m, v=err_v, mu_product=np.asarray(err_prod))
        bc2 = 1 - b2**t
        q, err_q = v / bc2, err_v / bc2
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            r = np.sqrt(q)
            lo = r + np.sqrt(np.maximum(q - err_q, 0.0))
            err_r = np.minimum(np.where(lo > 0, err_q / lo, np.inf), np.sqrt(err_q)) + e * r
            den = r + eps
            err_den = err_r + e * den
            den_lo = den - err_den
            u1, u2 = g / den, m / den
            err_u1 = e * np.abs(u1) + (err_g + np.abs(u1) * err_den) / den_lo
            err_u2 = e * np.abs(u2) + (err_m + np.abs(u2) * err_den) / den_lo
            u = a * u1 + b * u2
            mag_u = np.abs(a * u1) + np.abs(b * u2)
            # a and b from mu_t, Pi_t and 1 - beta2**t: computed in the compute dtype (Keras, JAX without
            # x64) or float64; 1 - Pi cancels by Pi / (1 - Pi), 1 - beta2**t by beta2**t / bc2 (sqrt: half)
            rel_ab = K * unit_roundoff(cd) * (2 + prod / (1 - prod) + prod_next / (1 - prod_next) + 0.5 * b2**t / bc2)
            err_u = e * mag_u + a * err_u1 + b * err_u2 + rel_ab * mag_u + _slack(mag_u, tn)
            err_u = np.where(den_lo > 0, err_u, np.inf)
        sign_val, sign_err = u, err_u
    elif rule == "rmsprop":
        alpha = float(hp.get("alpha", 0.99))
        eps = float(hp.get("eps", 1e-8))
        mom = float(hp.get("momentum", 0.0))
        v0, ga0, m0 = s
        g2 = g * g
        mag_v = _ema_mag(v0, g2, alpha)
        v = alpha * v0 + (1 - alpha) * g2
        err_v = e * mag_v + (1 - alpha) * (2 * np.abs(g) * err_g + err_g * err_g) + _slack(mag_v, tn)
        state.update(v=v)
        state_err.update(v=err_v)
        if hp.get("centered", False):
            mag_a = _ema_mag(ga0, g, alpha)
            ga = alpha * ga0 + (1 - alpha) * g
            err_ga = e * mag_a + (1 - alpha) * err_g + _slack(mag_a, tn)
            with np.errstate(invalid="ignore", over="ignore"):
                q = v - ga * ga
                mag_q = np.abs(v) + ga * ga
            err_q = err_v + 2 * np.abs(ga) * err_ga + err_ga * err_ga + e * mag_q + _slack(mag_q, tn)
            state["g_avg"], state_err["g_avg"] = ga, err_ga
        else:
            q, err_q = v, err_v
            state["g_avg"], state_err["g_avg"] = None, None
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if hp.get("eps_in_sqrt", False):
                q, err_q = q + eps, err_q + e * (np.abs(q) + eps)
            # centered: v - g_avg^2 within its rounding of a negative value may be negative in one
            # evaluation (sqrt: NaN) and positive in another; there the direction is undecided
            amb = (q < 0) & (q + err_q >= 0)
            q = np.where(amb, 0.0, q)
            r = np.sqrt(q)
            lo = r + np.sqrt(np.maximum(q - err_q, 0.0))
            err_r = np.minimum(np.where(lo > 0, err_q / lo, np.inf), np.sqrt(err_q)) + e * r
            den = r if hp.get("eps_in_sqrt", False) else r + eps
            err_den = err_r + e * den
            den_lo = den - err_den
            x = g / den
            err_x = e * np.abs(x) + (err_g + np.abs(x) * err_den) / den_lo
            err_x = np.where((den_lo > 0) & ~amb, err_x, np.inf)
            if mom == 0:
                u, err_u = x, err_x
                state["m"], state_err["m"] = None, None
            else:
                mag = mom * np.abs(m0) + np.abs(x)
                m = mom * m0 + x
                err_m = e * mag + err_x + _slack(mag, tn)
                state["m"], state_err["m"] = m, err_m
                if hp.get("nesterov", False):
                    mag = np.abs(x) + mom * np.abs(m)
                    u = x + mom * m
                    err_u = e * mag + err_x + mom * err_m + _slack(mag, tn)
                else:
                    u, err_u = m, err_m
        sign_val, sign_err = u, err_u
    elif rule == "adopt":
        u, err_u, sign_val, sign_err = _adopt_terms(hp, g, err_g, s, t, e, tn, state, state_err)
    elif rule == "laprop":
        u, err_u, sign_val, sign_err = _laprop_terms(hp, g, err_g, s, t, e, tn, state, state_err)
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
    decay_on = not (rule == "adopt" and t == 1)
    return TensorTerms(p, g, err_g, u, err_u, undecided, lion_undecided, state, state_err, decay_on=decay_on)


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
    if not cand.any() or rule in ("nadam", "rmsprop"):  # not derived for these: a zero stays undecided
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
    return {"adamw": 1e-2, "muon": 0.1}.get(case.rule, 0.0)


def decoupled(case: Case) -> bool:
    """Whether the case's weight decay is decoupled (AdamW, Lion, or the explicit option)."""
    if case.rule in ("adamw", "lion", "adafactor", "laprop", "muon"):
        return True
    return bool(case.hparams.get("decoupled_weight_decay", False))


# -- Adafactor -------------------------------------------------------------------------------------------


def _mean_bound(x: np.ndarray, err_x: np.ndarray, axis: int | None, cd: str, e: float, tn: float):
    """``mean(x, axis)`` (kept dims) of nonnegative ``x`` and its bound.

    A sum of ``n`` nonnegative terms in any order errs by at most ``(n - 1) u * sum`` (recursive
    summation; pairwise and tree orders are tighter); torch reads a mean of squares as
    ``norm(g)**2 / n``, whose relative error is at most twice the norm's, ``(n/2 + 1) u``, plus
    the squaring and the division. ``(K + 2 n) u`` of the mean covers both, plus the operands'
    own bounds (``mean(err_x)``) and the flush-to-zero slack.
    """
    n = x.size if axis is None else x.shape[axis]
    m = np.mean(x, axis=axis, keepdims=axis is not None)
    err = (e + 2 * n * unit_roundoff(cd)) * m + np.mean(err_x, axis=axis, keepdims=axis is not None)
    return m, err + _slack(m, tn)


def _sqrt_bound(q: np.ndarray, err_q: np.ndarray, e: float) -> tuple[np.ndarray, np.ndarray]:
    """``sqrt(q)`` and its bound (the rule in the module docstring)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.sqrt(q)
        lo = r + np.sqrt(np.maximum(q - err_q, 0.0))
        err = np.minimum(np.where(lo > 0, err_q / lo, np.inf), np.sqrt(err_q)) + e * r
    return r, err


def _div_bound(x, err_x, y, err_y, e):
    """``x / y`` (``y > 0``) and its bound: infinite where ``y`` is within its bound of 0."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = x / y
        y_lo = y - err_y
        err = e * np.abs(q) + (err_x + np.abs(q) * err_y) / y_lo
        return q, np.where(y_lo > 0, err, np.inf)


def _adafactor_terms(case: Case, p, g, err_g, s, t: int, e: float, tn: float) -> TensorTerms:
    """Adafactor's terms (:func:`cautious.spec.adafactor`); the derivation is in docs/conformance.md."""
    from cautious.spec.rules import factored_axes

    hp = case.hparams
    cd = compute_dtype(case.dtype)
    v_row0, v_col0, v0, m0, eps1_state = s
    eps1_opt, eps2 = hp.get("eps", (None, 1e-3))
    eps1 = float(eps1_state) if eps1_opt is None else float(eps1_opt)
    add = hp.get("eps_form", "clamp") == "add"
    c_exp = float(hp.get("beta2_decay", -0.8))
    w = float(t - int(hp.get("decay_offset", 0))) ** c_exp
    # the weights w and 1 - w may each be off by e (absolute: computed as 1 - (1 - w) by Keras and optax)
    with np.errstate(over="ignore", invalid="ignore"):
        g2 = g * g
        err_q = e * g2 + 2 * np.abs(g) * err_g + err_g * err_g + _slack(g2, tn)
        q = g2 + eps1 if add else g2
        if add:
            err_q = err_q + e * q
    axes = factored_axes(g.shape, hp.get("factor_dims", "last_two"), int(hp.get("min_dim_size_to_factor", 0)))
    state: dict[str, np.ndarray | None] = {"v_row": None, "v_col": None, "v": None, "m": None}
    state_err: dict[str, np.ndarray | None] = dict(state)
    if g.size == 0:  # an empty tensor keeps its state
        state.update(v_row=v_row0, v_col=v_col0, v=v0, m=m0)
        state_err = {k: None if x is None else np.zeros_like(x) for k, x in state.items()}
        none = np.zeros(g.shape, bool)
        return TensorTerms(p, g, err_g, g, np.zeros_like(g), none, none, state, state_err, 0.0, 0.0, None)

    def ema(old, new, err_new):
        mag = np.abs(old) + np.abs(new)
        return (1 - w) * old + w * new, 2 * e * mag + w * err_new + _slack(mag, tn)

    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        if axes is not None:
            r_ax, c_ax = axes
            rq, err_rq = _mean_bound(q, err_q, c_ax, cd, e, tn)
            cq, err_cq = _mean_bound(q, err_q, r_ax, cd, e, tn)
            R, err_R = ema(v_row0, rq, err_rq)
            C, err_C = ema(v_col0, cq, err_cq)
            state.update(v_row=R, v_col=C)
            state_err.update(v_row=err_R, v_col=err_C)
            Rm, err_Rm = _mean_bound(R, err_R, r_ax, cd, e, tn)
            if not add:
                Rm = np.maximum(Rm, eps1)  # max(., c) is 1-Lipschitz: the bound carries over
            RC = R * C
            err_RC = e * RC + err_R * C + R * err_C + err_R * err_C + _slack(RC, tn)
            vh, err_vh = _div_bound(RC, err_RC, Rm, err_Rm, e)
            # other evaluation orders, (R / Rm) C (Keras) or R (C / Rm), flush their intermediate quotient
            # to zero below the smallest normal: up to tn C or tn R / Rm more; and the result itself may flush
            err_vh = err_vh + tn * (1.0 + C + np.where(Rm > 0, R / Rm, np.inf))
        else:
            vh, err_vh = ema(v0, q, err_q)
            state["v"], state_err["v"] = vh, err_vh
        if not add:
            vh = np.maximum(vh, eps1 * eps1)
        r, err_r = _sqrt_bound(vh, err_vh, e)
        uh, err_uh = _div_bound(g, err_g, r, err_r, e)
        # the clipping factor max(1, rms(uh) / d) >= 1: a sum of n squares, a sqrt and a max
        n = max(uh.size, 1)
        sq = uh * uh
        err_sq = e * sq + 2 * np.abs(uh) * err_uh + err_uh * err_uh
        ms, err_ms = _mean_bound(sq, err_sq, None, cd, e, tn)
        rms, err_rms = _sqrt_bound(ms, err_ms, e)
        d = float(hp.get("d", 1.0))
        clip = max(1.0, float(rms) / d) if np.isfinite(rms) else 1.0
        err_clip = float(err_rms) / d + e * clip if uh.size else 0.0
        u, err_u = _div_bound(uh, err_uh, np.float64(clip), np.float64(err_clip), e)
        if clip - err_clip < 1:  # every implementation divides by at least 1
            err_u = e * np.abs(u) + err_uh + np.abs(u) * err_clip
        del n
    # the step size alpha = rho * max(eps2, rms(p)) (from p after decay in Keras's form)
    lr = float(hp.get("lr", 1e-2))
    wd = float(hp.get("weight_decay", 0.0))
    form = hp.get("weight_decay_form", "lr")
    rho = min(lr, 1.0 / math.sqrt(t)) if hp.get("relative_step", True) else lr
    alpha, err_alpha = rho, e * rho
    if hp.get("multiply_by_parameter_scale", True):
        ps = p * (1.0 - lr * wd) if form == "lr_before_scale" else p
        with np.errstate(over="ignore", invalid="ignore"):
            pp = ps * ps
            mp, err_mp = _mean_bound(pp, 2 * e * pp, None, cd, e, tn)
            rp, err_rp = _sqrt_bound(mp, err_mp, e)
        scale = max(float(eps2), float(rp)) if p.size else float(eps2)
        alpha = rho * scale
        err_alpha = e * alpha + rho * (float(err_rp) if p.size else 0.0)
    beta1 = float(hp.get("beta1", 0.0))
    decay_lr = 1.0 if form == "rate" else lr
    # alpha u may be formed as (rho u) scale (optax's chain): rho u may flush to zero, an error of tn * scale
    scale_ = alpha / rho if rho > 0 else 0.0
    flush = np.where(u != 0, tn * (1.0 + scale_), 0.0)
    if beta1 > 0:
        mag = np.abs(m0) + (1 - beta1) * alpha * np.abs(u)
        m = beta1 * m0 + (1 - beta1) * alpha * u
        err_m = e * mag + (1 - beta1) * (alpha * err_u + err_alpha * np.abs(u) + flush) + _slack(mag, tn)
        state["m"], state_err["m"] = m, err_m
        sign_val, sign_err, out_u, out_err, eta, err_eta = m, err_m, m, err_m, 1.0, 0.0
    else:
        if alpha > 0:
            err_u = err_u + flush / alpha
        sign_val, sign_err, out_u, out_err, eta, err_eta = u, err_u, u, err_u, alpha, err_alpha
    with np.errstate(invalid="ignore"):
        undecided = ((np.abs(sign_val) <= sign_err) & (sign_err > 0)) | ((np.abs(g) <= err_g) & (err_g > 0))
    undecided |= ((np.abs(out_u) < tn) & (out_u != 0)) | np.isinf(out_err)
    if "mask_boundary" in case.allow:
        undecided |= (out_u == 0) | (g == 0)
    lion_undecided = np.zeros(g.shape, bool)
    return TensorTerms(p, g, err_g, out_u, out_err, undecided, lion_undecided, state, state_err, eta, err_eta, decay_lr)


def decay_order(case: Case) -> str:
    """``"post_update"`` where decoupled decay shrinks the updated parameter (LaProp's default);
    else ``"pre_update"``."""
    return str(case.hparams.get("decay_order", "post_update" if case.rule == "laprop" else "pre_update"))


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
