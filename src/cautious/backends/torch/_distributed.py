r"""DTensor parameters (FSDP2 ``fully_shard``, ``distribute_tensor``): local shards, global kept counts.

A cautious step needs, per tensor, the number ``k`` of kept entries and the size ``n`` of the
**whole** tensor (:class:`cautious.Caution`). With DTensor parameters every rank computes the
direction and the mask on its local shard and counts the kept entries of that shard; the
whole tensor's count is the sum over its shards,

.. math::

    k = \sum_{r} k_r, \qquad n = \text{p.numel()} \ \text{(the DTensor's global size)}

taken by **one** ``all_reduce`` (SUM) of the stacked int64 counts of all sharded tensors on a
mesh: 8 bytes per tensor, never a gather of tensors. A replicated tensor's local count is
already the whole count: it needs no communication, nor do plain tensors. Meshes are 1-d
(FSDP2, ``distribute_tensor`` over one dimension); a multi-dimensional mesh (HSDP, 2-D
parallelism) is refused with an error.

:func:`on_local_shards` wraps a functional step (:mod:`cautious.backends.torch._functional`):
it hands the step the local shards (views: updates land in the DTensors) and the per-tensor
:class:`Sharding`; the step reduces its counts with :func:`global_counts` and divides by
:func:`global_sizes` where it turns counts into scales.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["Sharding", "on_local_shards", "global_counts", "global_sizes"]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


@dataclasses.dataclass(frozen=True)
class Sharding:
    """How one parameter's local count adds up to its global count.

    Attributes:
      numel: the size of the whole tensor (what the scale divides by).
      mesh: the DTensor's device mesh (1-d).
      split: whether the mesh shards the tensor (else the local count is the whole count).
    """

    numel: int
    mesh: Any
    split: bool


def _sharding(p: Any) -> Sharding:
    from torch.distributed.tensor import Replicate, Shard

    if p.device_mesh.ndim != 1:
        raise NotImplementedError(
            f"cautious.torch supports DTensor parameters on a 1-d device mesh (FSDP2, distribute_tensor); "
            f"got a {p.device_mesh.ndim}-d mesh (HSDP or 2-D parallelism), not supported yet"
        )
    (placement,) = p.placements
    if not isinstance(placement, (Shard, Replicate)):
        raise ValueError(f"cautious.torch: DTensor parameters must be placed with Shard or Replicate, got {placement}")
    return Sharding(p.numel(), p.device_mesh, isinstance(placement, Shard))


def _local(x: Any, p: Any, dtensor: type) -> Any:
    if not isinstance(x, dtensor):
        return x
    if x.placements != p.placements or x.device_mesh != p.device_mesh:
        x = x.redistribute(p.device_mesh, p.placements)  # e.g. a Partial gradient
    return x.to_local()


def on_local_shards(step: Callable[..., None]) -> Callable[..., None]:
    """Run a functional step ``step(params, *lists, **kw)`` on the local shards of DTensor parameters.

    Every positional argument is a list parallel to ``params`` (a list of another length, e.g.
    an empty ``max_exp_avg_sqs``, passes through). Without DTensors the step runs as it is.
    With them it gets the local shards and ``shardings=[Sharding | None per tensor]``; state
    tensors it creates on a shard (SGD's first momentum buffer) come back as DTensors placed
    like their parameter.
    """

    @functools.wraps(step)
    def wrapper(params: list[Tensor], *lists: list[Any], **kw: Any) -> None:
        dtensor = _dtensor_type()
        if dtensor is None or not any(isinstance(p, dtensor) for p in params):
            return step(params, *lists, **kw)
        shardings = [_sharding(p) if isinstance(p, dtensor) else None for p in params]
        local_params = [p.to_local() if s is not None else p for p, s in zip(params, shardings)]
        local_lists = [
            [_local(x, p, dtensor) for x, p in zip(lst, params)] if len(lst) == len(params) else lst for lst in lists
        ]
        step(local_params, *local_lists, shardings=shardings, **kw)
        stats = kw.get("stats")
        if stats is not None:  # telemetry is keyed by the parameters the optimizer holds, not their local shards
            for p, local in zip(params, local_params):
                if local is not p and local in stats:
                    stats[p] = stats.pop(local)
        for lst, local in zip(lists, local_lists):
            for i, (before, after) in enumerate(zip(lst, local)):
                if before is None and after is not None and shardings[i] is not None:
                    lst[i] = _as_dtensor(after, params[i])

    return wrapper


def _as_dtensor(local: Tensor, like: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())


def global_counts(counts: Tensor, shardings: Sequence[Sharding | None] | None) -> Tensor:
    """The whole tensors' kept counts from their local shards' ``counts`` (int64, one per tensor).

    One ``all_reduce`` (SUM) per mesh that splits some tensor, over the stacked counts of the
    tensors it splits; ``counts`` itself when nothing is split.
    """
    meshes: dict[int, list[int]] = {}
    for i, s in enumerate(shardings or ()):
        if s is not None and s.split:
            meshes.setdefault(id(s.mesh), []).append(i)
    if not meshes:
        return counts
    counts = counts.clone()
    for idx in meshes.values():
        part = counts[idx]
        torch.distributed.all_reduce(part, group=shardings[idx[0]].mesh.get_group())
        counts[idx] = part
    return counts


def global_sizes(tensors: Sequence[Tensor], shardings: Sequence[Sharding | None] | None) -> list[int]:
    """The size of each whole tensor: a DTensor's global ``numel``, else the tensor's own."""
    if not shardings:
        return [t.numel() for t in tensors]
    return [s.numel if s is not None else t.numel() for t, s in zip(tensors, shardings)]
