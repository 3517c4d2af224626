"""PyTorch backend: cautious ``AdamW``, ``Adam``, ``Lion`` and ``SGD`` as ``torch.optim.Optimizer`` classes.

Public import path: :mod:`cautious.torch`. The algorithm is :mod:`cautious.spec`.
"""

from cautious._caution import Caution
from cautious.backends.torch.optim import SGD, Adam, AdamW, Lion

__all__ = ["AdamW", "Adam", "Lion", "SGD", "Caution"]
