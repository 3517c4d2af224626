"""cautious: one exact specification of cautious optimizers, and faithful ports of it.

``import cautious`` imports NumPy and nothing else. Framework backends live in
``cautious.torch``, ``cautious.jax`` and ``cautious.tensorflow`` and import their
framework only when you import them.
"""

from cautious._caution import Caution

__version__ = "0.1.0"
__all__ = ["Caution", "__version__"]


def __getattr__(name: str):  # lazy submodules: `cautious.spec` without an explicit import
    if name in ("spec", "conformance", "backends"):
        import importlib

        return importlib.import_module(f"cautious.{name}")
    raise AttributeError(f"module 'cautious' has no attribute {name!r}")
