r"""The cautious-mask algebra, defined once for every base rule.

Given a base direction ``u`` (descent convention: the rule moves ``p <- p - lr * u``)
and the gradient ``g`` that the rule consumed, for one tensor of ``n`` entries:

.. math::

    \text{mask}_i &= [u_i > 0 \wedge g_i > 0] \vee [u_i < 0 \wedge g_i < 0]
                     \vee \operatorname{isnan}(u_i) \vee \operatorname{isnan}(g_i) \\
    \text{count} &= \textstyle\sum_i \text{mask}_i \quad (\text{an integer}) \\
    \text{scale} &= \text{Caution.scale}(\text{count}, n), \quad
        n = \text{size, or } \textstyle\sum_i [g_i \ne 0] \text{ with denominator="nonzero"} \\
    u^{c}_i &= \text{mask}_i \cdot \text{scale} \cdot u_i

Notes:
  * The mask is decided from **signs**, never from the product ``u * g``: the
    product underflows (in float16, ``1e-4 * 1e-4 == 0``) and would mask a pair
    that agrees.
  * Exact zeros, ``+0`` and ``-0`` alike, are masked: a zero has no direction.
  * NaN is **kept**, so a NaN in ``u`` or ``g`` reaches the parameters exactly as
    it would with the base optimizer. (A product-based ``u * g > 0`` is False for
    NaN and would freeze training silently, with finite parameters and NaN state.)
  * ``count`` is an integer; it is never a float mean (a bfloat16 mean is off by
    0.2-0.4 %, a float32 count is exact only up to 2**24).
  * The scale is per tensor, never global over all parameters.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from cautious._caution import Caution

__all__ = [
    "cautious_mask",
    "kept_count",
    "caution_denominator",
    "cautious_scale",
    "apply_caution",
    "whole_update",
    "CautionStats",
    "whole_step",
    "decay_mask",
]


class CautionStats(NamedTuple):
    """Telemetry of one tensor's caution in one step: ``count`` kept of ``n`` entries, and the ``scale``."""

    count: int
    n: int
    scale: float


def cautious_mask(u: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Boolean mask of the entries of ``u`` that agree in sign with ``g`` (NaN kept).

    >>> import numpy as np
    >>> cautious_mask(np.array([1.0, -2.0, 3.0, 0.0, -0.0, np.nan]),
    ...               np.array([0.5, 1.0, -0.0, 1.0, -1.0, 1.0])).tolist()
    [True, False, False, False, False, True]
    """
    u = np.asarray(u)
    g = np.asarray(g)
    agree = ((u > 0) & (g > 0)) | ((u < 0) & (g < 0))
    return agree | np.isnan(u) | np.isnan(g)


def kept_count(mask: np.ndarray) -> int:
    """The integer number of kept entries."""
    return int(np.count_nonzero(mask))


def caution_denominator(g: np.ndarray, caution: Caution) -> int:
    """The ``n`` of the scale: ``g``'s size, or with ``denominator="nonzero"`` its entries that are not 0.

    >>> import numpy as np
    >>> caution_denominator(np.array([0.0, -0.0, 2.0, np.nan]), Caution(denominator="nonzero"))
    2
    """
    g = np.asarray(g)
    return int(g.size) if caution.denominator == "size" else int(np.count_nonzero(g))


def cautious_scale(count: int, n: int, caution: Caution) -> float:
    """The per-tensor rescale factor, exactly (float64). See :class:`cautious.Caution`."""
    return caution.scale(int(count), int(n))


def apply_caution(u: np.ndarray, g: np.ndarray, caution: Caution) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Mask and rescale one tensor's direction.

    Returns:
      ``(u_c, mask, count, scale)`` with ``u_c = where(mask, scale * u, 0)``.
      ``u_c`` has ``u``'s dtype; inputs are not modified.

    >>> import numpy as np
    >>> u_c, mask, count, scale = apply_caution(
    ...     np.array([1.0, -2.0, 3.0, 4.0]), np.array([1.0, 1.0, 1.0, -1.0]), Caution("exact"))
    >>> u_c.tolist(), count, scale
    ([2.0, 0.0, 6.0, 0.0], 2, 2.0)
    """
    u = np.asarray(u)
    mask = cautious_mask(u, g)
    count = kept_count(mask)
    scale = cautious_scale(count, caution_denominator(g, caution), caution)
    u_c = np.where(mask, u * np.asarray(scale, dtype=u.dtype), np.zeros((), u.dtype))
    return u_c.astype(u.dtype, copy=False), mask, count, scale


def whole_update(update: np.ndarray, g: np.ndarray, caution: Caution) -> tuple[np.ndarray, np.ndarray, int, float]:
    r"""The *whole-update form*: mask a whole optimizer's parameter update against the gradient.

    ``update`` is what an optimizer adds to the parameters (``p' = p + update``): the
    learning rate's ``-lr`` and any weight decay are already in it, so its descent
    direction is ``-update``. The whole update, decay included, is kept where it has the
    sign of ``-g`` and rescaled per tensor; this is :func:`apply_caution` with ``-g``:

    .. math::

        \text{mask}_i = [o_i < 0 \wedge g_i > 0] \vee [o_i > 0 \wedge g_i < 0]
            \vee \operatorname{isnan}(o_i) \vee \operatorname{isnan}(g_i), \qquad
        o^c_i = \text{mask}_i \cdot \text{scale}(\text{count}, n) \cdot o_i

    Zeros, NaN, the integer count and the scale are as in :func:`apply_caution`. For a rule
    without decoupled decay and ``lr > 0``, ``update = -lr * u`` and this is exactly the
    direction form (``mask(-lr u, -g) = mask(u, g)``); with decoupled decay it masks the
    decay too, unlike :func:`cautious.spec.adamw`. ``g`` is the gradient given to the optimizer.

    Returns:
      ``(update_c, mask, count, scale)``, ``update_c`` in ``update``'s dtype.

    >>> import numpy as np
    >>> o_c, mask, count, scale = whole_update(
    ...     np.array([-0.1, 0.1, 0.2, 0.0]), np.array([1.0, 1.0, -1.0, 1.0]), Caution("exact"))
    >>> o_c.tolist(), count, scale
    ([-0.2, 0.0, 0.4, 0.0], 2, 2.0)
    """
    return apply_caution(update, -np.asarray(g), caution)


def whole_step(
    p: np.ndarray, p_next: np.ndarray, g: np.ndarray, caution: Caution, *, maximize: bool = False
) -> tuple[np.ndarray, np.ndarray, int, float]:
    r"""Caution for any optimizer: mask the step an optimizer took, ``p -> p_next``, against the gradient.

    ``p_next`` is what an optimizer without caution made of ``p`` from the gradient ``g``. The
    update is measured as a difference and masked in the whole-update form (:func:`whole_update`):

    .. math::

        \delta = p_{next} - p \ \text{(float64)}, \qquad
        \hat g = -g \text{ if maximize else } g, \qquad
        p' = \operatorname{round}\bigl(p + \text{mask}(\delta, -\hat g)\cdot\text{scale}\cdot\delta\bigr)

    ``delta`` is computed in float64 from the stored values and the sum ``p + delta^c`` is rounded
    once to ``p``'s dtype (a backend computes ``delta`` in its compute dtype, float32 below float64,
    and so adds one rounding of ``delta``; docs/conformance.md bounds it). ``maximize`` says that
    the optimizer *ascends* ``g`` (torch's ``maximize=True``): its descent gradient is then ``-g``,
    so its update is kept where it has the sign of ``+g``. Entries where the mask drops the update
    keep ``p`` exactly. Zeros, NaN (of ``delta`` or ``g``: kept), the integer count and the scale
    are as in :func:`apply_caution`; the scale counts the entries of ``p`` (or, with
    ``denominator="nonzero"``, the nonzero entries of ``g``).

    Returns:
      ``(p_c, mask, count, scale)`` with ``p_c`` in ``p``'s dtype (bfloat16 is carried in float32;
      round it with :func:`cautious.spec.round_to`).

    >>> import numpy as np
    >>> p_c, mask, count, scale = whole_step(
    ...     np.array([1.0, 1.0, 1.0, 1.0]), np.array([0.9, 1.1, 0.8, 1.0]),
    ...     np.array([1.0, 1.0, 1.0, 1.0]), Caution("exact"))
    >>> p_c.round(12).tolist(), count, scale
    ([0.8, 1.0, 0.6, 1.0], 2, 2.0)
    """
    p = np.asarray(p)
    p64 = np.asarray(p, dtype=np.float64)
    g64 = np.asarray(g, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        delta = np.asarray(p_next, dtype=np.float64) - p64
        delta_c, mask, count, scale = whole_update(delta, g64 if not maximize else -g64, caution)
        p_c = np.asarray(p64 + delta_c, dtype=p.dtype)
    return p_c, mask, count, scale


def decay_mask(u: np.ndarray, p: np.ndarray) -> np.ndarray:
    r"""Where *cautious weight decay* (arXiv:2510.12402) applies: ``u_i * p_i >= 0``.

    Decided from signs like :func:`cautious_mask`: decay is skipped only where
    ``u`` and ``p`` have strictly opposite signs; zeros and NaN get the decay
    (so NaN propagates as with plain decay).

    >>> import numpy as np
    >>> decay_mask(np.array([1.0, 1.0, -1.0, 0.0]), np.array([2.0, -2.0, -2.0, -2.0])).tolist()
    [True, False, True, True]
    """
    u = np.asarray(u)
    p = np.asarray(p)
    return ~(((u > 0) & (p < 0)) | ((u < 0) & (p > 0)))
