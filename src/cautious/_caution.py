"""The :class:`Caution` options object, shared by the reference and every backend."""

from __future__ import annotations

import dataclasses

NORMALIZATIONS = ("mean_clamp", "count_plus_one", "exact", "none")

#: What ``n`` counts: every entry of the tensor, or the entries whose gradient is not exactly zero.
DENOMINATORS = ("size", "nonzero")


@dataclasses.dataclass(frozen=True)
class Caution:
    r"""How the cautious mask rescales the kept coordinates of a tensor.

    With ``n`` entries in a tensor (see ``denominator``) and ``k`` of them kept by
    the mask, the kept entries of the base direction ``u`` are multiplied by ``scale``:

    .. math::

        \text{mean\_clamp:}\quad s = 1 / \max(k/n,\ \text{floor}) \qquad
        \text{count\_plus\_one:}\quad s = n / (k + 1) \qquad
        \text{exact:}\quad s = n / \max(k, 1) \qquad
        \text{none:}\quad s = 1

    Args:
      normalize: one of ``"mean_clamp"`` (default; what timm and the paper's
        current AdamW code do), ``"count_plus_one"`` (the paper's text and its
        Lion code), ``"exact"`` or ``"none"``.
      floor: the lower clamp on the kept fraction ``k/n`` used by
        ``"mean_clamp"``; must lie in ``(0, 1]``. The other normalizations have
        no floor: setting one with them is an error, not silently ignored.
      denominator: what ``n`` counts: ``"size"`` (default) every entry of the
        tensor; ``"nonzero"`` only the entries whose gradient (the one the mask
        compares with) is not exactly zero (``+0`` and ``-0`` are zero, NaN is not).
        For sparse gradients (embedding rows absent from a batch): with ``"size"``,
        a tensor whose gradient is mostly exact zeros keeps few entries and
        ``mean_clamp`` rescales them by up to ``1 / floor``; ``"nonzero"`` measures
        the kept fraction among the entries the batch touched. A tensor whose
        gradient is all zeros has ``n = 0`` and scale 1.

    Passing ``caution=True`` to any optimizer means ``Caution()``;
    ``caution=False`` turns the mask off and reproduces the base optimizer.
    """

    normalize: str = "mean_clamp"
    floor: float = 1e-3
    denominator: str = "size"

    def __post_init__(self) -> None:
        from cautious.spec.errors import validate

        validate({"normalize": self.normalize, "floor": self.floor, "denominator": self.denominator})
        object.__setattr__(self, "floor", float(self.floor))
        if self.normalize != "mean_clamp" and self.floor != 1e-3:
            raise ValueError(
                f"floor is used only by normalize='mean_clamp', got floor={self.floor!r} "
                f"with normalize={self.normalize!r}"
            )

    def scale(self, count: int, n: int) -> float:
        """The exact rescale factor for ``count`` kept entries out of ``n`` (float64)."""
        if n <= 0:
            return 1.0
        if self.normalize == "mean_clamp":
            return 1.0 / max(count / n, self.floor)
        if self.normalize == "count_plus_one":
            return n / (count + 1)
        if self.normalize == "exact":
            return n / max(count, 1)
        return 1.0


def caution_arg(caution: bool | Caution, *, name: str = "caution") -> Caution | None:
    """Normalise a user's ``caution`` argument: ``True`` -> ``Caution()``, ``False`` -> ``None`` (off).

    Only ``True``, ``False`` (Python or NumPy bools) and a :class:`Caution` are accepted;
    ``None`` is a ``TypeError``, not a second spelling of "off". Every optimizer constructor
    calls this on what the user passed.
    """
    if isinstance(caution, Caution):
        return caution
    if isinstance(caution, bool) or type(caution).__name__ == "bool_":
        return Caution() if caution else None
    raise TypeError(f"{name} must be a bool or a cautious.Caution, got {caution!r}")


def as_caution(caution: bool | Caution | None, *, name: str = "caution") -> Caution | None:
    """Like :func:`caution_arg`, but also passes through ``None``, the already-normalised "off".

    For internal functional APIs whose ``caution`` parameter holds the normalised value
    (``Caution | None``); user-facing constructors use :func:`caution_arg`.
    """
    if caution is None:
        return None
    return caution_arg(caution, name=name)
