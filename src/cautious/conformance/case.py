"""What the conformance suite asks an implementation to do: a :class:`Case`, and the adapter protocol."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from cautious import spec
from cautious.spec.dtypes import numpy_dtype

__all__ = ["Case", "Adapter", "NumpyAdapter", "spec_optimizer", "MODELED_DEVIATIONS"]

#: Declared deviations the checker can model exactly (others exempt their clause only).
MODELED_DEVIATIONS = frozenset({"nan", "sign_vs_underflow", "mask_boundary", "bias_correction"})


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration to check.

    Attributes:
      rule: ``"adam"``, ``"adamw"``, ``"lion"``, ``"sgd"`` or ``"adafactor"``: the spec factory.
      hparams: keyword arguments of that factory, spec names (``lr``, ``betas``,
        ``eps``, ``weight_decay``, ``amsgrad``, ``maximize``, ``caution`` (False or a
        :class:`cautious.Caution`), ``eps_placement``, ``cautious_weight_decay``,
        ``momentum``, ``dampening``, ``nesterov``, ``decoupled_weight_decay``).
      dtype: storage dtype of params and grads (see :mod:`cautious.spec.dtypes`).
      state_dtype: storage dtype of state tensors (None: same as ``dtype``).
      allow: declared deviations the checker admits (:data:`MODELED_DEVIATIONS`): ``"nan"`` (an
        entry with NaN in u or g may be masked), ``"sign_vs_underflow"`` (an agreeing pair whose
        product underflows in the compute dtype may be masked), ``"mask_boundary"`` (an entry with
        an exactly-zero u or g may be kept), ``"bias_correction"`` (bias corrections computed in the
        compute dtype instead of float64).
    """

    rule: str
    hparams: Mapping[str, Any]
    dtype: str = "float32"
    state_dtype: str | None = None
    allow: frozenset = frozenset()

    @property
    def caution(self) -> spec.Caution | None:
        return spec.as_caution(self.hparams.get("caution", True))

    @property
    def state_storage(self) -> str:
        return self.state_dtype or self.dtype

    def describe(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"spec.{self.rule}({hp}) dtype={self.dtype} state_dtype={self.state_storage}"


def spec_optimizer(case: Case) -> spec.Optimizer:
    """The reference optimizer for ``case``."""
    return getattr(spec, case.rule)(**case.hparams)


@runtime_checkable
class Adapter(Protocol):
    """How the suite drives an implementation: one stateless step from a given state.

    An adapter translates the spec's inputs into its framework, runs **one** step
    of the implementation from exactly the given params and state, and translates
    the result back. Because every step starts from the reference's state, rounding
    never compounds and every state tensor is compared after every step.

    ``params``/``grads`` are NumPy arrays (bfloat16 values carried in float32);
    ``state`` is a :class:`cautious.spec.State` whose leaves are ``AdamState``,
    ``LionState`` or ``SGDState`` of NumPy arrays. The adapter returns the same
    structure. An adapter whose implementation cannot expose some state returns
    ``None`` in that leaf field: the suite then compares what it can, and says so.

    Optionally, ``fixed_hparams(rule) -> dict`` pins the hyperparameters an
    implementation does not vary (``{"caution": Caution(), "amsgrad": False}``), so
    the suite draws only what it implements instead of skipping most cases.
    ``denominators`` (e.g. ``("size", "nonzero")``) lists the :class:`cautious.Caution`
    denominators it implements (default: ``"size"`` only). An implementation with caution
    telemetry offers ``last_stats() -> [(count, n, scale) per tensor] | None``, its telemetry of
    the last :meth:`step`; the suite checks it against the reference's ``Optimizer.stats``
    (:func:`cautious.conformance.check.check_stats`). Without it telemetry is not checked.
    """

    name: str

    def supports(self, case: Case) -> str | None:
        """None if ``case`` is supported, else the reason it is skipped."""
        ...

    def step(
        self, case: Case, params: Sequence[np.ndarray], grads: Sequence[np.ndarray], state: spec.State
    ) -> tuple[list[np.ndarray], spec.State]: ...


class NumpyAdapter:
    """The reference itself, driven through its own suite (and the template for other adapters)."""

    name = "numpy"
    denominators = ("size", "nonzero")

    def __init__(self) -> None:
        self._stats: list[tuple[int, int, float]] | None = None

    def last_stats(self) -> list[tuple[int, int, float]] | None:
        """``Optimizer.stats`` of the last :meth:`step` (``None`` without caution)."""
        return self._stats

    def supports(self, case: Case) -> str | None:
        return None

    def step(
        self, case: Case, params: Sequence[np.ndarray], grads: Sequence[np.ndarray], state: spec.State
    ) -> tuple[list[np.ndarray], spec.State]:
        opt = spec_optimizer(case)
        self._stats = None if case.caution is None else [tuple(x) for x in opt.stats(params, grads, state)]
        new_params, new_state = opt.step(params, grads, state)
        rnd = lambda x, d: None if x is None else spec.round_to(x, d).astype(numpy_dtype(d))  # noqa: E731
        leaves = tuple(type(s)(*(rnd(x, case.state_storage) for x in s)) for s in new_state.leaves)
        return [rnd(p, case.dtype) for p in new_params], spec.State(new_state.step, leaves)
