"""Cautious optimizers for TensorFlow: Keras 3 optimizer classes (public as :mod:`cautious.tensorflow`).

``AdamW``, ``Adam``, ``Lion``, ``SGD`` and ``Adafactor`` are ``keras.optimizers.Optimizer`` subclasses with
Keras's names and defaults plus ``caution``, ``cautious_weight_decay`` and (Adam)
``eps_placement``. They work with ``model.compile(optimizer=...)`` and with
``optimizer.apply_gradients`` in a custom ``tf.GradientTape`` loop, eager, in
``tf.function`` and under XLA. ``caution=False`` reproduces the matching Keras optimizer.
See :mod:`cautious.backends.tensorflow.optimizers` for the math and numerics.
:class:`Cautious` wraps any Keras optimizer (caution for any optimizer, :func:`cautious.spec.cautious_optimizer`).

Importing this module sets ``KERAS_BACKEND=tensorflow`` unless it is already set.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from cautious._caution import Caution  # noqa: E402
from cautious.backends.tensorflow.optimizers import (  # noqa: E402
    SGD,
    Adafactor,
    Adam,
    AdamW,
    Adopt,
    CautiousOptimizer,
    LaProp,
    Lion,
    Muon,
    Nadam,
    RMSprop,
)
from cautious.backends.tensorflow.wrapper import Cautious  # noqa: E402

__all__ = [
    "AdamW",
    "Adam",
    "Lion",
    "SGD",
    "Muon",
    "Nadam",
    "RMSprop",
    "Caution",
    "CautiousOptimizer",
    "Cautious",
    "Adafactor",
    "Adopt",
    "LaProp",
]
