r"""Caution for any ``torch.optim.Optimizer``: :class:`Cautious` masks the step the optimizer takes.

The spec is :func:`cautious.spec.cautious_optimizer` (per tensor :func:`cautious.spec.whole_step`):

.. math::

    \delta = p_{next} - p, \qquad \hat g = -g \text{ if maximize else } g, \qquad
    p' = p + \text{mask}(\delta, -\hat g)\cdot\text{scale}\cdot\delta

where ``p_next`` is what the wrapped optimizer made of ``p``. Numerics, which
docs/conformance.md bounds: ``delta`` is computed in the compute dtype (float64 for float64
parameters, float32 otherwise) from the parameter and a snapshot of it taken before the inner
step; the mask comes from the signs of ``delta`` (exactly the signs of the float64 difference,
since a correctly rounded difference keeps its sign) and ``g``; the scale is float64 from the
integer count, rounded once to the compute dtype; ``p + delta^c`` is computed in the compute
dtype and rounded once into the parameter.
"""

from __future__ import annotations

import math
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from cautious._caution import Caution, caution_arg
from cautious.backends.torch import _distributed
from cautious.backends.torch import _functional as functional
from cautious.spec.mask import CautionStats

__all__ = ["Cautious"]

_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


def _caution_on(value: Any) -> bool:
    """Whether a param group's ``caution`` entry (ours: data or None; other libraries: a bool) is on."""
    return value is not None and value is not False


class Cautious(torch.optim.Optimizer):
    r"""Caution for any ``torch.optim.Optimizer``: its whole step, weight decay included, masked against the gradient.

    ``Cautious(optimizer)`` is a drop-in for ``optimizer``: it shares its ``param_groups``,
    ``state`` and ``defaults`` (so learning-rate schedulers, ``add_param_group`` and
    ``zero_grad`` act on the inner optimizer), and ``state_dict()`` / ``load_state_dict()``
    are the inner optimizer's own (checkpoints move freely between the bare and the wrapped
    optimizer: the wrapper keeps no state of its own across checkpoints).

    Each step snapshots every parameter that has a gradient (one buffer per parameter, in the
    parameter's dtype, allocated on its first step and reused), runs the inner step, and then
    per tensor keeps ``delta = p_next - p`` only where it has the sign of ``-g`` (``+g`` in a
    group with ``maximize=True``), rescaled by ``caution.scale(count, n)``
    (:func:`cautious.spec.whole_step`); masked entries keep their old value.

    Args:
      optimizer: any ``torch.optim.Optimizer`` with caution off (a ``cautious.torch`` optimizer
        needs ``caution=False``; a group whose ``caution`` is set is refused).
      caution: ``True`` (``Caution()``), ``False`` (the inner step, bit for bit) or a :class:`cautious.Caution`.
      caution_stats: keep the kept count, size and scale of each parameter's last step
        (:meth:`caution_stats`).

    The gradient the mask compares with is ``p.grad`` after the inner step. With a ``closure``,
    the wrapper evaluates it once (under ``torch.enable_grad``), then runs the inner step without
    it: optimizers that re-evaluate the closure inside their step (``LBFGS``) are not supported.
    Sparse gradients and DTensor parameters are refused before anything changes.

    Example:
      >>> import torch
      >>> from cautious.torch import Caution, Cautious
      >>> w = torch.nn.Parameter(torch.ones(4))
      >>> opt = Cautious(torch.optim.SGD([w], lr=0.1), caution=Caution("exact"))
      >>> w.grad = torch.tensor([1.0, -1.0, 0.0, 2.0])
      >>> _ = opt.step()
      >>> [round(x, 4) for x in w.tolist()]
      [0.8667, 1.1333, 1.0, 0.7333]
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, caution: bool | Caution = True, *, caution_stats: bool = False
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, Cautious):
            raise ValueError("the optimizer is already wrapped in Cautious: the mask would apply twice")
        for gi, group in enumerate(optimizer.param_groups):
            if _caution_on(group.get("caution")):
                raise ValueError(
                    f"Cautious wraps an optimizer with caution off: param_groups[{gi}] of {type(optimizer).__name__} "
                    "has caution on (build it with caution=False), else the mask would apply twice"
                )
        if not isinstance(caution_stats, bool):
            raise TypeError(f"caution_stats must be a bool, got {caution_stats!r}")
        self.caution = caution_arg(caution)
        if caution_stats and self.caution is None:
            raise ValueError("caution_stats=True needs caution on (caution=False has no mask to report)")
        self.optimizer = optimizer
        for name in _HOOK_DICTS:
            setattr(self, name, OrderedDict())
        self._patch_step_function()
        #: The snapshot of each parameter before the inner step (one buffer per parameter, reused).
        self._snapshots: dict[Tensor, Tensor] = {}
        self._caution_stats: dict[Tensor, CautionStats] | None = {} if caution_stats else None

    # -- shared with the inner optimizer -----------------------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> defaultdict:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: defaultdict) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __repr__(self) -> str:
        return f"Cautious({self.optimizer!r}, caution={self.caution!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_snapshots"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._snapshots = {}

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict (the snapshots are scratch space, not state)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the inner optimizer (a checkpoint of the bare optimizer loads as is)."""
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer (refused when it turns caution on in the inner optimizer)."""
        if isinstance(param_group, dict) and _caution_on(param_group.get("caution")):
            raise ValueError("Cautious wraps an optimizer with caution off: the new group has caution on")
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def caution_stats(self) -> list[CautionStats | None]:
        """Per parameter (in ``param_groups`` order): ``CautionStats(count, n, scale)`` of its last step.

        As the ``cautious.torch`` optimizers: ``count`` an int64 and ``scale`` a float64 tensor on the
        parameter's device; ``None`` for a parameter that has not stepped. Needs ``caution_stats=True``.
        """
        if self._caution_stats is None:
            raise ValueError("caution_stats() needs Cautious built with caution_stats=True")
        return [self._caution_stats.get(p) for group in self.param_groups for p in group["params"]]

    # -- the step --------------------------------------------------------------------------------------------

    def _stepping(self) -> list[tuple[dict[str, Any], list[Tensor]]]:
        """Per group, the parameters with a gradient; refuses sparse gradients and DTensors first."""
        dtensor = _distributed._dtensor_type()
        out = []
        for gi, group in enumerate(self.param_groups):
            ps = []
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                where = f"param_groups[{gi}]['params'][{i}]"
                if p.grad.is_sparse:
                    raise RuntimeError(f"cautious.torch.Cautious does not support sparse gradients ({where})")
                if dtensor is not None and isinstance(p, dtensor):
                    raise RuntimeError(
                        f"cautious.torch.Cautious does not support DTensor parameters yet ({where}): use a "
                        "cautious.torch optimizer, whose counts are summed over the shards"
                    )
                if p.is_complex():
                    raise RuntimeError(f"cautious.torch.Cautious does not support complex parameters ({where})")
                ps.append(p)
            out.append((group, ps))
        return out

    def _snapshot(self, p: Tensor) -> Tensor:
        s = self._snapshots.get(p)
        if s is None or s.shape != p.shape or s.dtype != p.dtype or s.device != p.device:
            s = torch.empty_like(p, memory_format=torch.preserve_format)
            self._snapshots[p] = s
        return s

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of the inner optimizer, masked (see the class docstring); returns the closure's loss."""
        if self.caution is None:
            return self.optimizer.step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self._stepping()
        params = [p for _, ps in groups for p in ps]
        if params:
            torch._foreach_copy_([self._snapshot(p) for p in params], params)
        self.optimizer.step()
        for group, ps in groups:
            if ps:
                self._mask_(ps, bool(group.get("maximize", False)))
        return loss

    def _mask_(self, params: list[Tensor], maximize: bool) -> None:
        """``p <- snapshot + mask(delta, -g_hat) * scale * delta`` for one group's stepped parameters."""
        buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
        for p in params:
            buckets[(p.device, p.dtype)].append(p)
        for (_, dtype), ps in buckets.items():
            cd = torch.float64 if dtype == torch.float64 else torch.float32
            snaps = [self._snapshots[p] for p in ps]
            grads = [p.grad for p in ps]
            if dtype == cd:
                olds = snaps
                deltas = torch._foreach_sub(ps, snaps)
            else:
                olds = [s.to(cd) for s in snaps]
                deltas = [p.to(cd) - s for p, s in zip(ps, olds, strict=True)]
            # The signs the mask reads: those of the descent direction -delta (+delta when maximizing), NaN where
            # delta or g is NaN, and finite (times +-2**(emax-1), clamped to [-1, 1]: every nonzero delta, an
            # infinite one too, keeps its sign), so that a zero g never meets an infinite delta (0 * inf is NaN).
            big = 2.0 ** (math.frexp(torch.finfo(cd).max)[1] - 2) * (1.0 if maximize else -1.0)
            signs = [torch.where(g.isnan(), g.to(cd), d.mul(big).clamp_(-1.0, 1.0)) for g, d in zip(grads, deltas)]
            masked, scales = functional._mask_and_scales(
                deltas, signs, grads, self.caution, foreach=True, stats=self._caution_stats, params=ps
            )
            functional._apply_scales_(masked, scales, foreach=True)
            torch._foreach_add_(masked, olds)
            torch._foreach_copy_(ps, masked)
