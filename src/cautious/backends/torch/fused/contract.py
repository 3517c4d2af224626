r"""The fused path's contract: every number that crosses from Python into a kernel, by name.

Three readers implement it: the Triton kernels (:mod:`.triton_kernels`), the C++ kernel
(``cpu_kernel.cpp``, loaded by :mod:`.cpu`) and the eager fallback (:mod:`.eager`, the readable
statement of the contract). :class:`Launch` is what a driver hands to any of them; its ``hp``
vector is indexed by :class:`Slot`, the same index in every reader. ``cpu_kernel.cpp`` mirrors
:class:`Rule`, :class:`Norm`, :class:`Slot` and :class:`CpuArgs` field by field
(``tests/backend_fused/test_contract.py`` checks that it does).

Per entry, with ``g`` the gradient after ``maximize`` and coupled decay
(``g <- g + hp[COUPLED_DECAY] * p``), each base rule computes a direction ``u``, new state and a
*test* value with the sign of ``u`` (what the mask and the count read):

========  =====================================================================  ==============
rule      direction and state                                                    test
========  =====================================================================  ==============
ADAM      ``m' = MIX1_OLD m + MIX1_NEW g``, ``v' = MIX2_OLD v + MIX2_NEW g^2``,     ``m'`` (``u``
          ``v_u = max(v_max, v')`` (amsgrad) else ``v'``,                         when
          ``u = ADAM_C ((m' ADAM_A) / (sqrt(v_u) ADAM_B + EPS))``                  ``exact_u``)
LION      ``c = MIX1_OLD m + MIX1_NEW g``, ``u = sign(c)`` (NaN kept),            ``c``
          ``m' = MIX2_OLD m + MIX2_NEW g``
SGD       ``b = g`` (first step or no momentum) else ``MIX1_OLD b + MIX1_NEW g``,  ``u``
          ``u = g + MIX1_OLD b`` (nesterov) else ``b``
NADAM     ``m'``, ``v'`` as ADAM, ``d = sqrt(v') ADAM_B + EPS``,                  ``u``
          ``u = G_COEF (g / d) + M_COEF (m' / d)``
ADOPT     first step: ``v' = g^2``, ``m' = m``, ``u = 0``; later:                 ``u``
          ``n = clip(g / max(sqrt(v), EPS), +-CLIP)``,
          ``m' = MIX1_OLD m + MIX1_NEW n``, ``u = m'`` (nesterov:
          ``MIX1_OLD m' + MIX1_NEW n``), ``v' = MIX2_OLD v + MIX2_NEW g^2``
LAPROP    ``v' = MIX2_OLD v + MIX2_NEW g^2``, ``n = g / (sqrt(v') ADAM_B + EPS)``,  ``m'`` (``0 m'``
          ``m' = MIX1_OLD m + MIX1_NEW n`` (``MIX1_NEW = lr (1 - beta1)``),       when
          ``u = m'``                                                              ``STEP_LR = 0``)
========  =====================================================================  ==============

then ``keep = mask(test, g)``, ``scale`` from the per-tensor count (:class:`Norm`), and

.. math::

    p' = p - \text{lr}\cdot\text{DECOUPLED\_DECAY}\cdot d - (\text{rate}\cdot\text{scale})\cdot
    \text{keep}\odot u

with ``d = p`` (``0`` where cautious weight decay skips it) and ``rate = lr``, except LaProp's
``rate = STEP_LR`` (``lr / lr_avg``: its momentum carries the learning rate). With
:attr:`Launch.post_decay` (LaProp's ``decay_order="post_update"``) the decay shrinks the moved
parameter instead: ``p1 = p - (rate scale) keep u``, ``p' = p1 - lr DECOUPLED_DECAY d1`` with
``d1 = p1`` (``0`` where cautious weight decay skips it, decided from ``p`` and ``keep u``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum

import torch

from cautious._caution import NORMALIZATIONS, Caution

__all__ = ["Rule", "Norm", "Slot", "STORAGE", "Launch", "CpuArgs", "slots"]


class Rule(enum.IntEnum):
    """The base rule a kernel runs."""

    ADAM = 0
    LION = 1
    SGD = 2
    NADAM = 3
    ADOPT = 4
    LAPROP = 5


#: Normalization of the kept count (:class:`cautious.Caution`); ``NONE`` also means caution off.
Norm = enum.IntEnum("Norm", {name.upper(): i for i, name in enumerate(NORMALIZATIONS)})
Norm.__doc__ = "The normalizations of :data:`cautious._caution.NORMALIZATIONS`, in that order."


class Slot(enum.IntEnum):
    """Positions in the float64 hyperparameter vector ``hp`` (``len(Slot)`` entries)."""

    COUPLED_DECAY = 0  # g <- g + COUPLED_DECAY * p (coupled L2 decay; 0 when decoupled)
    MIX1_OLD = 1  # Adam/Lion/NAdam/ADOPT/LaProp beta1; SGD momentum
    MIX1_NEW = 2  # Adam/Lion/NAdam/ADOPT 1 - beta1; SGD 1 - dampening; LaProp lr * (1 - beta1)
    MIX2_OLD = 3  # Adam/NAdam/ADOPT/LaProp beta2 (v); Lion beta2 (m)
    MIX2_NEW = 4  # 1 - beta2
    EPS = 5
    ADAM_A = 6  # Adam: u = ADAM_C * ((m' * ADAM_A) / (sqrt(v) * ADAM_B + EPS))
    ADAM_B = 7  # also NAdam's and LaProp's 1 / sqrt(1 - beta2^t)
    ADAM_C = 8
    DECOUPLED_DECAY = 9  # p <- p - lr * DECOUPLED_DECAY * d
    LR = 10  # the learning rate (when it is not a device tensor)
    FLOOR = 11  # mean_clamp's floor on the kept fraction
    G_COEF = 12  # NAdam: (1 - mu_t) / (1 - prod_t), the weight of g / d
    M_COEF = 13  # NAdam: mu_{t+1} / (1 - prod_t mu_{t+1}), the weight of m' / d
    CLIP = 14  # ADOPT: the clip bound (t - 1)^clip_exp (inf: no clipping)
    STEP_LR = 15  # LaProp: the rate of the direction, lr / lr_avg (0 while lr_avg is 0)


#: Storage codes of the supported dtypes (the kernels load and store by code).
STORAGE: dict[torch.dtype, int] = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


@dataclasses.dataclass(frozen=True)
class Launch:
    """Everything a kernel needs besides the tensors and ``lr``: one step's contract."""

    rule: Rule
    hp: tuple[float, ...]  # indexed by Slot; FLOOR and LR are filled by with_lr
    caution: Caution | None
    maximize: bool = False
    coupled: bool = False  # coupled L2 decay is on (wd != 0)
    decoupled: bool = False  # decoupled decay is on (wd != 0)
    cwd: bool = False  # cautious weight decay
    exact_u: bool = False  # Adam with eps == 0: the mask tests u itself (0/0 is NaN)
    amsgrad: bool = False
    first: bool = False  # SGD: the momentum buffer is set to g; ADOPT: v is set to g^2 and nothing moves
    nesterov: bool = False
    has_momentum: bool = False
    post_decay: bool = False  # LaProp's decay_order="post_update": decay shrinks the moved parameter
    stochastic_rounding: bool = False
    seed: int = 0

    @property
    def norm(self) -> Norm:
        """The normalization code; ``Norm.NONE`` without caution."""
        return Norm[self.caution.normalize.upper()] if self.caution is not None else Norm.NONE

    @property
    def nonzero(self) -> bool:
        """Whether the scale's ``n`` counts the entries of ``g`` that are not 0 (``denominator="nonzero"``).

        The kernels then count them in the count pass (after maximize and coupled decay, as the
        mask reads ``g``; NaN counts) and the update pass takes the scales from the caller.
        """
        return self.caution is not None and self.caution.denominator == "nonzero"

    @property
    def counts(self) -> bool:
        """Whether the count pass runs (caution on, with a normalization that uses the count)."""
        return self.norm != Norm.NONE

    def with_lr(self, lr: float) -> Launch:
        hp = list(self.hp)
        hp[Slot.LR] = float(lr)
        return dataclasses.replace(self, hp=tuple(hp))


def slots(caution: Caution | None, **values: float) -> tuple[float, ...]:
    """The ``hp`` vector: ``values`` by :class:`Slot` name (0.0 elsewhere), ``FLOOR`` from ``caution``.

    The launches of :mod:`cautious.backends.torch.fused` (``adam_launch``, ...) name each rule's slots.
    """
    hp = [0.0] * len(Slot)
    for name, value in values.items():
        hp[Slot[name]] = float(value)
    if caution is not None:
        hp[Slot.FLOOR] = caution.floor
    return tuple(hp)


class CpuArgs(ctypes.Structure):
    """The C++ kernel's argument block (``struct CpuArgs`` in ``cpu_kernel.cpp``, same order)."""

    _fields_ = [
        ("rule", ctypes.c_int64),
        ("param_code", ctypes.c_int64),
        ("state_code", ctypes.c_int64),
        ("maximize", ctypes.c_int64),
        ("coupled", ctypes.c_int64),
        ("decoupled", ctypes.c_int64),
        ("cwd", ctypes.c_int64),
        ("caution", ctypes.c_int64),
        ("norm", ctypes.c_int64),
        ("exact_u", ctypes.c_int64),
        ("amsgrad", ctypes.c_int64),
        ("first", ctypes.c_int64),
        ("nesterov", ctypes.c_int64),
        ("has_momentum", ctypes.c_int64),
        ("post_decay", ctypes.c_int64),
        ("stochastic_rounding", ctypes.c_int64),
        ("seed", ctypes.c_uint64),
        ("nthreads", ctypes.c_int64),
        ("piece", ctypes.c_int64),
        ("counts_out", ctypes.c_int64),  # address of int64 per row: the count pass alone (0: off)
        ("scales_in", ctypes.c_int64),  # address of float64 per row: the update pass with these scales (0: off)
        ("nonzero_out", ctypes.c_int64),  # with counts_out: address of int64 per row, g's nonzero entries (0: off)
        ("lr", ctypes.c_double),
        ("hp", ctypes.c_double * len(Slot)),
    ]
