"""``cautious.torch``: cautious optimizers for PyTorch, drop-in for ``torch.optim``.

>>> import cautious.torch as ct                              # doctest: +SKIP
>>> opt = ct.AdamW(model.parameters(), lr=1e-3)              # doctest: +SKIP

``AdamW``, ``Adam`` and ``SGD`` take the arguments of their ``torch.optim``
namesakes plus ``caution``, ``eps_placement`` (Adam) and ``cautious_weight_decay``;
``caution=False`` reproduces the torch optimizer. See :mod:`cautious.spec`.
"""

try:
    import torch as _torch  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised in a subprocess test
    raise ImportError("cautious.torch needs PyTorch: pip install 'cautious[torch]'") from e

from cautious.backends.torch import *  # noqa: F403
from cautious.backends.torch import __all__  # noqa: F401
