"""``from cautious.auto import AdamW, Adam, Lion, SGD``: the backend chosen from outside.

The backend is named by the environment variable ``CAUTIOUS_BACKEND``
(``torch``, ``jax``, ``tensorflow`` or ``numpy``). If it is unset, the first
installed backend in the order torch, jax, tensorflow, numpy is used
(:data:`cautious.backends.ORDER`).

Names resolve lazily: ``import cautious.auto`` imports no framework; taking a name
imports the chosen backend and nothing else. For JAX and NumPy, whose optimizers
are functions, ``AdamW`` is ``adamw`` and so on:

=========  ==================  =====================  ======================
name       torch, tensorflow   jax (optax)            numpy (reference)
=========  ==================  =====================  ======================
AdamW      ``AdamW`` class     ``adamw()``            ``spec.adamw()``
Adam       ``Adam`` class      ``adam()``             ``spec.adam()``
Lion       ``Lion`` class      ``lion()``             ``spec.lion()``
SGD        ``SGD`` class       ``sgd()``              ``spec.sgd()``
=========  ==================  =====================  ======================
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from cautious.backends import BACKENDS, ORDER, MissingBackendError, available

__all__ = ["AdamW", "Adam", "Lion", "SGD", "BACKEND", "backend_name"]  # noqa: F822 (lazy names)

_PUBLIC = {
    "torch": "cautious.torch",
    "jax": "cautious.jax",
    "tensorflow": "cautious.tensorflow",
    "numpy": "cautious.spec",
}
_FUNCTIONS = {"AdamW": "adamw", "Adam": "adam", "Lion": "lion", "SGD": "sgd"}


def backend_name() -> str:
    """The backend ``cautious.auto`` resolves to now (reads ``CAUTIOUS_BACKEND``)."""
    name = os.environ.get("CAUTIOUS_BACKEND", "").strip()
    if name:
        if name not in BACKENDS:
            raise ValueError(f"CAUTIOUS_BACKEND must be one of {', '.join(repr(b) for b in ORDER)}, got {name!r}")
        if name not in available():
            extra = BACKENDS[name][2]
            raise MissingBackendError(
                f"CAUTIOUS_BACKEND={name!r} but {name} is not installed: pip install 'cautious[{extra}]'"
            )
        return name
    return next(iter(available()))  # numpy is always installed


def __getattr__(name: str) -> Any:
    if name == "BACKEND":
        return backend_name()
    if name not in _FUNCTIONS:
        raise AttributeError(f"module 'cautious.auto' has no attribute {name!r}")
    backend = backend_name()
    module = importlib.import_module(_PUBLIC[backend])
    return getattr(module, name if backend in ("torch", "tensorflow") else _FUNCTIONS[name])
