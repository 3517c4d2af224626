"""``cautious.tensorflow``: cautious AdamW, Adam, Lion and SGD as Keras 3 optimizers.

>>> import cautious.tensorflow as ctf                      # doctest: +SKIP
>>> model.compile(optimizer=ctf.AdamW(learning_rate=1e-3), loss="mse")  # doctest: +SKIP

Implemented in :mod:`cautious.backends.tensorflow`. Importing this module sets
``KERAS_BACKEND=tensorflow`` unless it is already set.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

_MISSING = "cautious.tensorflow needs TensorFlow and Keras 3: pip install 'cautious[tensorflow]'"
try:
    import keras
    import tensorflow  # noqa: F401  (absolute import: the real TensorFlow, not this module)
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(_MISSING) from exc
if not str(getattr(keras, "__version__", "0")).startswith("3"):  # pragma: no cover
    raise ImportError(_MISSING + f" (found keras {getattr(keras, '__version__', '?')})")

from cautious.backends.tensorflow import (  # noqa: E402
    SGD,
    Adafactor,
    Adam,
    AdamW,
    Adopt,
    Caution,
    Cautious,
    CautiousOptimizer,
    LaProp,
    Lion,
    Muon,
    Nadam,
    RMSprop,
)

__all__ = [
    "AdamW",
    "Adam",
    "Lion",
    "SGD",
    "Muon",
    "Nadam",
    "RMSprop",
    "Adafactor",
    "Caution",
    "CautiousOptimizer",
    "Cautious",
    "Adopt",
    "LaProp",
]
