"""Backend registry: one line per backend, frameworks imported only on request.

Each backend is a module path (a string), so listing or naming a backend imports
nothing. :func:`available` reports which are installed (looking for the
framework's distribution, not importing it); :func:`load` imports one.

==========  ===============================  ==============================
name        module                           needs
==========  ===============================  ==============================
numpy       cautious.backends.numpy          (always available)
torch       cautious.backends.torch          ``pip install 'cautious[torch]'``
jax         cautious.backends.jax            ``pip install 'cautious[jax]'``
tensorflow  cautious.backends.tensorflow     ``pip install 'cautious[tensorflow]'``
==========  ===============================  ==============================
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from types import ModuleType

__all__ = ["BACKENDS", "ORDER", "available", "load", "MissingBackendError"]

#: name -> (module path, distributions that must be installed, pip extra)
BACKENDS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "numpy": ("cautious.backends.numpy", ("numpy",), ""),
    "torch": ("cautious.backends.torch", ("torch",), "torch"),
    "jax": ("cautious.backends.jax", ("jax", "optax"), "jax"),
    "tensorflow": ("cautious.backends.tensorflow", ("tensorflow", "keras"), "tensorflow"),
}

#: Resolution order when no backend is named: frameworks first, the reference last.
ORDER: tuple[str, ...] = ("torch", "jax", "tensorflow", "numpy")

_DIST_ALIASES = {"tensorflow": ("tensorflow", "tensorflow-cpu", "tf-nightly")}


class MissingBackendError(ImportError):
    """A backend was requested whose framework is not installed."""


def _version(module: str) -> str | None:
    for dist in _DIST_ALIASES.get(module, (module,)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None if importlib.util.find_spec(module) is None else "unknown"


def available() -> dict[str, str]:
    """Installed backends and their framework versions, in resolution order; imports no framework.

    >>> "numpy" in available()
    True
    """
    out: dict[str, str] = {}
    for name in ORDER:
        _, needs, _ = BACKENDS[name]
        versions = [_version(m) for m in needs]
        if all(v is not None for v in versions):
            out[name] = versions[0]  # type: ignore[assignment]
    return out


def load(name: str) -> ModuleType:
    """Import and return backend ``name``; a clear error if it is unknown or not installed."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(repr(b) for b in BACKENDS)}")
    module, needs, extra = BACKENDS[name]
    missing = [m for m in needs if _version(m) is None]
    if missing:
        raise MissingBackendError(
            f"backend {name!r} needs {', '.join(missing)}, which is not installed: pip install 'cautious[{extra}]'"
        )
    return importlib.import_module(module)
