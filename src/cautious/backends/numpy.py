"""The NumPy backend: the reference itself (``cautious.spec``), under the backend names."""

from cautious._caution import Caution
from cautious.spec import adam, adamw, lion, sgd

__all__ = ["Caution", "adam", "adamw", "lion", "sgd"]
