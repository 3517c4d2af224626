"""PyTorch backend: cautious ``torch.optim.Optimizer`` classes.

AdamW, Adam, Lion, SGD, NAdam, RMSprop, Adafactor, Adopt, LaProp and Muon.

Public import path: :mod:`cautious.torch`. The algorithm is :mod:`cautious.spec`. :class:`Cautious`
wraps any ``torch.optim.Optimizer`` (caution for any optimizer: :func:`cautious.spec.cautious_optimizer`).

Also public: :func:`fused_available` (whether ``fused=True`` runs on a device), :func:`build_fused`
(prebuild the native CPU kernel, the CPU default with caution on) and the fused
step functions :func:`fused_adam_`, :func:`fused_lion_`, :func:`fused_sgd_`, :func:`fused_nadam_`,
:func:`fused_adopt_`, :func:`fused_laprop_` (in-place steps over
lists of tensors, with opt-in ``stochastic_rounding`` of bfloat16 results), from
:mod:`cautious.backends.torch.fused`.
"""

from cautious._caution import Caution
from cautious.backends.torch.fused import (
    build_fused,
    fused_adam_,
    fused_adopt_,
    fused_laprop_,
    fused_lion_,
    fused_nadam_,
    fused_sgd_,
)
from cautious.backends.torch.fused import is_available as fused_available
from cautious.backends.torch.optim import SGD, Adafactor, Adam, AdamW, Adopt, LaProp, Lion, Muon, NAdam, RMSprop
from cautious.backends.torch.wrapper import Cautious

__all__ = [
    "AdamW",
    "Adam",
    "Lion",
    "SGD",
    "NAdam",
    "RMSprop",
    "Adafactor",
    "Adopt",
    "LaProp",
    "Muon",
    "Caution",
    "fused_available",
    "build_fused",
    "fused_adam_",
    "fused_lion_",
    "fused_sgd_",
    "fused_nadam_",
    "fused_adopt_",
    "fused_laprop_",
    "Cautious",
]
