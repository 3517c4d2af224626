r"""Functional cautious optimizers for PyTorch, in the manner of ``torch.optim``.

Each rule has a dispatcher (:func:`adam`, :func:`lion`, :func:`sgd`) that splits the
tensors with :func:`_groups` (one per tensor for ``foreach=False``, one per device and
dtype for ``foreach=True``) and runs the rule's one step function (``_adam_tensors``, ...)
on each group with per-tensor or ``torch._foreach_*`` ops; ``fused=True`` hands the groups
to :mod:`cautious.backends.torch.fused` (imported lazily). Without ``foreach``/``fused``,
:func:`_resolve` picks the path per device (docs/backends/torch.md). All of them update ``params``
and the state tensors in place. ``caution=None`` means caution off.

The math is :mod:`cautious.spec` (see :func:`cautious.spec.rules.cautious`):

.. math::

    u^c = \text{mask}(u, g)\cdot\text{scale}\cdot u, \qquad
    p' = p - \eta\lambda\,d\odot p - \eta\,u^c

Caution is written once, in :func:`_mask_and_scales`: it takes a list of tensors that
are positive multiples of the directions, and returns them masked, plus the
per-tensor scales. Counts are int64 tensors and scales are computed on the
device: there is no host-device synchronisation and no loop over elements.

Without caution, the Adam and SGD paths run exactly torch.optim's operations, so
``caution=False`` reproduces ``torch.optim.Adam``/``AdamW``/``SGD`` bit for bit.

DTensor parameters (FSDP2, ``distribute_tensor``): the dispatchers run on the local shards
(:func:`cautious.backends.torch._distributed.on_local_shards`), and
:func:`_mask_and_scales` sums each tensor's count over its shards with one all-reduce per
group before :func:`_scales`, which divides by the whole tensor's size. Shards group by
device and dtype on every path, so that a step's counts are reduced together.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from cautious._caution import Caution
from cautious.backends.torch import _distributed
from cautious.spec.mask import CautionStats

__all__ = ["adam", "lion", "sgd", "default_foreach", "nadam", "rmsprop", "adafactor", "adopt", "laprop", "muon"]

_NATIVE_TYPES = (torch.Tensor, torch.nn.Parameter)


def _foreach_devices() -> tuple[str, ...]:
    # torch.optim's list (cuda, xpu, mtia, privateuse1) plus cpu: on CPU the foreach
    # ops are a C++ loop over the same kernels, which saves Python overhead.
    return ("cuda", "xpu", "mtia", "cpu", torch._C._get_privateuse1_backend_name())


def default_foreach(tensors: list[Tensor]) -> bool:
    """torch.optim's ``_default_to_fused_or_foreach`` rule, with CPU added: the default while compiling."""
    if torch.jit.is_scripting():
        return False
    devices = _foreach_devices()
    return all(t is None or (type(t) in _NATIVE_TYPES and t.device.type in devices) for t in tensors)


def _scalar(x: Any) -> Any:
    """A Python number for a 1-element tensor hyperparameter (eager), the tensor itself when compiling."""
    if isinstance(x, Tensor):
        if torch.compiler.is_compiling():
            return x.squeeze()
        return x.item()
    return x


def _step_value(step_t: Tensor) -> int:
    # ``step`` lives on the CPU (as in torch.optim without capturable/fused): .item() does not sync a GPU.
    return int(step_t.item()) if isinstance(step_t, Tensor) else int(step_t)


def _tensor_steps(capturable: bool) -> bool:
    """Whether steps (and the bias corrections from them) stay tensors: under ``torch.compile`` (no
    ``.item()`` graph break, no recompile per step) and with ``capturable=True`` (no host sync)."""
    return capturable or torch.compiler.is_compiling()


def _step_values(state_steps: list[Tensor]) -> list[int]:
    """``[int(step) for step in state_steps]``, read with one ``stack`` (not one ``.item()`` per tensor)."""
    if len(state_steps) > 1 and not torch.compiler.is_compiling():
        try:
            return [int(x) for x in torch.stack(state_steps).tolist()]
        except (RuntimeError, TypeError):  # mixed devices or shapes: read one by one
            pass
    return [_step_value(st) for st in state_steps]


def _increment_steps_(state_steps: list[Tensor]) -> None:
    """``step += 1`` for every step tensor, in one foreach call (bitwise a loop of ``step += 1``)."""
    if state_steps:
        torch._foreach_add_(state_steps, 1)


def _fused_steps(state_steps: list[Tensor]) -> list[int]:
    """``step += 1`` for the fused path (one native call on CPU when it can) and the new steps."""
    from cautious.backends.torch import fused as fused_kernels

    steps = fused_kernels.increment_steps_(state_steps)
    if steps is None:
        _increment_steps_(state_steps)
        steps = _step_values(state_steps)
    return steps


# ----------------------------------------------------------------------------------------------------------
# The cautious mask, written once.
# ----------------------------------------------------------------------------------------------------------


def _denominators(
    xs: list[Tensor], grads: list[Tensor], caution: Caution, shardings: list[_distributed.Sharding | None] | None
) -> list[int] | list[Tensor]:
    """The ``n`` of each scale: the whole tensors' sizes, or with ``denominator="nonzero"`` the gradients'
    entries that are not 0 (int64 tensors, summed over shards with the counts: nothing leaves the device;
    +0/-0 are zero, NaN is not)."""
    if caution.denominator == "size":
        return _distributed.global_sizes(xs, shardings)
    return [torch.count_nonzero(g) for g in grads]


def _scales(counts: Tensor, sizes: list[int] | Tensor, caution: Caution) -> Tensor:
    """Per-tensor scales from integer counts (int64, 1-d): float64 on their device (see :class:`cautious.Caution`).

    The one place where the single-tensor and foreach paths (and the fused path for DTensor
    shards) turn counts into scales. On the CPU (not compiling) it is :meth:`cautious.Caution.scale`
    per tensor, the same float64 values. ``sizes`` are the whole tensors' sizes (Python ints), or
    an int64 tensor of counted denominators (``denominator="nonzero"``: a zero ``n`` gives scale 1).
    """
    counted = isinstance(sizes, Tensor)
    if counts.device.type == "cpu" and not torch.compiler.is_compiling():
        # read the counts (no device to sync): Caution.scale gives the same float64 values in far
        # fewer torch ops, which is what the single-tensor loop pays per tensor
        ns = sizes.tolist() if counted else sizes
        return torch.tensor(
            [caution.scale(k, n) for k, n in zip(counts.tolist(), ns, strict=True)], dtype=torch.float64
        )
    k = counts.to(torch.float64)
    n = sizes.to(torch.float64) if counted else torch.tensor(sizes, dtype=torch.float64, device=counts.device)
    if caution.normalize == "mean_clamp":
        scale = (k / n).clamp_min_(caution.floor).reciprocal_()
    elif caution.normalize == "count_plus_one":
        scale = n / (k + 1.0)
    elif caution.normalize == "exact":
        scale = n / k.clamp_min_(1.0)
    else:
        return torch.ones_like(k)
    return torch.where(n > 0, scale, torch.ones_like(scale)) if counted else scale


def _mask_and_scales(
    xs: list[Tensor],
    signs: list[Tensor],
    grads: list[Tensor],
    caution: Caution,
    *,
    foreach: bool,
    shardings: list[_distributed.Sharding | None] | None = None,
    stats: dict[Tensor, CautionStats] | None = None,
    params: list[Tensor] | None = None,
) -> tuple[list[Tensor], Tensor | None]:
    r"""Mask a list of directions: ``x^c = where(mask(u, g), x, 0)``, and compute the scales.

    This is the one implementation of caution, used by every rule and every path.

    Args:
      xs: positive multiples of the directions ``u`` (``u`` itself, or Adam's
        numerator ``m'``). They are not modified; new tensors are returned.
      signs: tensors with the sign of ``u`` entrywise (``u``, or ``m'`` for Adam),
        NaN wherever ``u`` is NaN, and finite wherever ``g == 0`` unless ``u`` is
        NaN. A NaN in ``g`` makes ``u`` NaN in every base rule, so ``g``'s NaN
        are covered by ``signs``. Pass ``signs is xs`` when the direction itself
        qualifies: the masked tensor is then rebuilt without a select.
      grads: the gradients the rule consumed (after maximize and coupled decay).
      caution: the normalization.
      foreach: use ``torch._foreach_*`` ops for the elementwise passes.
      shardings: for local shards of DTensors (:mod:`._distributed`), how each tensor's count
        adds up over its shards: the counts are then summed over the shards (one all-reduce)
        and the scales use the whole tensors' sizes.
      stats: the telemetry record (``caution_stats=True``): ``stats[p]`` is set to
        ``CautionStats(count, n, scale)`` (device tensors, no synchronisation) for each
        parameter ``p`` of ``params``.
      params: the parameters of ``xs``, in order (with ``stats``).

    Returns:
      ``(masked xs, scales)``: ``scales`` is a 1-d float64 tensor on the device,
      one entry per tensor, or ``None`` for ``normalize="none"``. The caller
      multiplies each masked direction by its scale (:func:`_apply_scales_`) or
      folds the scale into a divisor (Adam).

    The mask is decided from signs, never from a product that can underflow:
    ``t = max(sign(g) * s, 0)`` is exact (a product with -1, 0 or 1), equals ``|s|``
    where ``s`` and ``g`` agree, ``0`` where they disagree or either is +0/-0, and
    NaN where ``s`` is NaN (kept, as the spec says). The kept count is
    ``count_nonzero(t != 0)``, an int64 tensor: nothing leaves the device. Where
    ``xs is signs``, ``copysign(t, g)`` is ``where(mask, s, 0)`` exactly.
    """
    if foreach:
        ts = torch._foreach_sign(grads)
        torch._foreach_mul_(ts, signs)
        torch._foreach_clamp_min_(ts, 0.0)
    else:
        ts = [torch.sign(g).mul_(s).clamp_min_(0.0) for g, s in zip(grads, signs, strict=False)]
    # count_nonzero on bool is vectorised (on float it is not); NaN -> True, +0/-0 -> False
    counts = [torch.count_nonzero(t.bool()) for t in ts] if caution.normalize != "none" or stats is not None else []
    if xs is signs:
        masked = [t.copysign_(g) for t, g in zip(ts, grads, strict=False)]
    else:
        masked = [
            torch.where(t.ne(0), x, torch.zeros((), dtype=x.dtype, device=x.device))
            for x, t in zip(xs, ts, strict=False)
        ]
    if not xs or not counts:
        return masked, None
    k = torch.stack(counts)
    dens = _denominators(xs, grads, caution, shardings)
    if dens and isinstance(dens[0], Tensor):  # counted denominators: reduced with the counts, one all-reduce
        both = _distributed.global_counts(torch.cat([k, torch.stack(dens)]), list(shardings) * 2 if shardings else None)
        k, n = both[: len(xs)], both[len(xs) :]
    else:
        k, n = _distributed.global_counts(k, shardings), dens
    scales = _scales(k, n, caution)
    if stats is not None:
        sizes = _distributed.global_sizes(xs, shardings)
        for i, p in enumerate(params):
            stats[p] = CautionStats(k[i], sizes[i], scales[i])
    return masked, None if caution.normalize == "none" else scales


def _apply_scales_(xs: list[Tensor], scales: Tensor | None, *, foreach: bool) -> None:
    """``x <- scale * x`` in place, with each scale rounded once to the tensor's dtype."""
    if scales is None or not xs:
        return
    per_tensor = list(scales.to(xs[0].dtype).unbind())
    if foreach:
        torch._foreach_mul_(xs, per_tensor)
    else:
        for x, s in zip(xs, per_tensor, strict=False):
            x.mul_(s)


def _decay_(
    params: list[Tensor],
    directions: list[Tensor],
    *,
    lr: Any,
    weight_decay: float,
    cautious_weight_decay: bool,
    foreach: bool,
) -> None:
    r"""Decoupled weight decay ``p <- p (1 - lr wd)``; cautious weight decay: only where NOT ``u^c p < 0``.

    ``directions`` carry the sign of the cautious direction ``u^c`` (used only with
    ``cautious_weight_decay``; :func:`cautious.spec.mask.decay_mask`, decided from signs; NaN decays).
    """
    factor = 1 - lr * weight_decay
    if not cautious_weight_decay:
        if foreach:
            torch._foreach_mul_(params, factor)
        else:
            for p in params:
                p.mul_(factor)
        return
    for p, d in zip(params, directions, strict=False):
        skip = torch.sign(d).mul_(p).lt_(0).bool()  # strictly opposite signs: no decay
        p.copy_(torch.where(skip, p, p * factor))


def _nan_sign(x: Tensor) -> Tensor:
    """``sign(x)`` with NaN kept (``torch.sign(NaN)`` is 0; the spec's Lion direction is NaN there)."""
    return torch.where(torch.isnan(x), x, torch.sign(x))


def _check_no_fused_foreach(foreach: bool | None, fused: bool | None) -> None:
    if foreach and fused:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def _torch_default_foreach(params: list[Tensor]) -> bool:
    """torch.optim's own default: foreach on CUDA-like devices, the single-tensor loop on CPU."""
    if torch.jit.is_scripting():
        return False
    devices = tuple(d for d in _foreach_devices() if d != "cpu")
    return all(t is None or (type(t) in _NATIVE_TYPES and t.device.type in devices) for t in params)


def _default_fused(params: list[Tensor], caution: Caution | None, *, capturable: bool) -> bool:
    """Whether the default is the fused path (see the table in docs/backends/torch.md).

    Only with caution on (off, the default is torch.optim's, so ``caution=False`` reproduces
    ``torch.optim`` bit for bit). CUDA: the Triton kernels when Triton imports. CPU: the native
    C++ loop when the kernel is built or can be built for every parameter dtype (the first call
    compiles it, once, into ``~/.cache/cautious``; :func:`cautious.torch.build_fused` prebuilds);
    not under Triton's interpreter. Never while compiling, and never for what the fused path
    refuses or handles differently (``capturable``, complex parameters): those keep the
    single-tensor or foreach default. ``denominator="nonzero"`` and telemetry run fused too.
    """
    if not params or caution is None or torch.compiler.is_compiling():
        return False
    if capturable or any(p.is_complex() for p in params):
        return False
    kind = params[0].device.type
    if kind == "cuda":
        if not all(p.device.type == "cuda" for p in params):
            return False
        from cautious.backends.torch import fused

        return fused.is_available(params[0].device)
    if kind != "cpu" or not all(type(p) in _NATIVE_TYPES and p.device.type == "cpu" for p in params):
        return False  # DTensor and other subclasses: not the native kernel
    from cautious.backends.torch import fused

    if fused.backend_for(params[0].device) != "cpu":
        return False
    from cautious.backends.torch.fused import cpu

    return all(cpu.native_available(dtype) for dtype in {p.dtype for p in params})


def _resolve(
    params: list[Tensor],
    foreach: bool | None,
    fused: bool | None,
    lr: Any,
    caution: Caution | None,
    *,
    capturable: bool = False,
) -> str:
    """The path a step runs: ``"fused"``, ``"foreach"`` or ``"single"``; an explicit choice wins.

    Defaults, measured (docs/benchmarks.md): CUDA -> fused (Triton); CPU with caution -> the
    native fused loop when available, else the single-tensor loop (on CPU the foreach ops make
    one pass over memory per op; the loop works on one tensor while it is in cache); caution
    off -> torch.optim's own choice. While compiling: foreach (the previous default).
    """
    _check_no_fused_foreach(foreach, fused)
    if fused:
        return "fused"
    if foreach is None and fused is None:
        if _default_fused(params, caution, capturable=capturable):
            return "fused"
        if torch.compiler.is_compiling():
            foreach = default_foreach(params) and not isinstance(lr, Tensor)
        else:
            foreach = _torch_default_foreach(params)
    return "foreach" if foreach else "single"


def _groups(params: list[Tensor], impl: str, *keys: list[Any], shards: bool = False) -> list[list[int]]:
    """Indices of ``params`` that run together: one per tensor (``"single"``), else one per
    device, dtype and the extra per-tensor ``keys`` (list order kept inside a group).

    Local shards of DTensors (``shards``) group by device and dtype on every path, so that
    their counts are reduced together; ``"single"`` still runs per-tensor operations.
    """
    if impl == "single" and not shards:
        return [[i] for i in range(len(params))]
    if len({p.dtype for p in params}) == 1 and len({p.device for p in params}) == 1:
        keys = tuple(k for k in keys if len(set(k)) > 1)  # one device and dtype: group by varying keys only
        if not keys:
            return [list(range(len(params)))]
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        groups[(p.device, p.dtype, *(k[i] for k in keys))].append(i)
    return list(groups.values())


def _as_real(tensors: list[Tensor | None] | None) -> list[Tensor | None] | None:
    """Complex tensors as their real views (``torch.view_as_real``, as torch.optim): the spec's entries
    of a complex parameter are its real and imaginary parts (docs/spec.md), updated in place through the view."""
    if tensors is None:
        return None
    return [torch.view_as_real(t) if t is not None and t.is_complex() else t for t in tensors]


def _pick(lst: list[Any] | None, idx: list[int]) -> list[Any]:
    return [] if lst is None else [lst[i] for i in idx]


# ----------------------------------------------------------------------------------------------------------
# Adam / AdamW
# ----------------------------------------------------------------------------------------------------------


def _adam_bias(step: int, *, lr: Any, beta1: float, beta2: float, eps_placement: str) -> tuple[Any, float]:
    """``(step_size, bc2_sqrt)`` in float64 from Python floats (never from float32 betas)."""
    bc1 = 1.0 - float(beta1) ** step
    bc2 = 1.0 - float(beta2) ** step
    bc2_sqrt = bc2**0.5
    if eps_placement == "corrected":
        return lr / bc1, bc2_sqrt
    return lr * bc2_sqrt / bc1, bc2_sqrt


def _adam_bias_tensor(
    step_t: Tensor, *, device: torch.device, lr: Any, beta1: float, beta2: float, eps_placement: str
) -> tuple[Any, Any]:
    """:func:`_adam_bias` as 0-d float64 tensors from the step tensor, on the parameters' ``device`` (the spec
    computes bias corrections in float64: a float32 ``1 - beta2**t`` is 1.7e-4 off at ``beta2 = 0.9999``)."""
    step_t = step_t.to(device=device, dtype=torch.float64)
    bc1 = 1.0 - torch.pow(beta1, step_t)
    bc2_sqrt = (1.0 - torch.pow(beta2, step_t)).sqrt()
    if eps_placement == "corrected":
        return lr / bc1, bc2_sqrt
    return lr * bc2_sqrt / bc1, bc2_sqrt


def _adam_plain_denoms_(
    denoms: list[Tensor], biases: list[tuple[Any, float]], *, eps: float, eps_placement: str, foreach: bool
) -> None:
    """``sqrt(v) / bc2_sqrt + eps`` ("corrected") or ``sqrt(v) + eps``, in place, with torch.optim's ops."""
    if eps_placement == "corrected":
        if foreach:
            torch._foreach_div_(denoms, [b for _, b in biases])
            torch._foreach_add_(denoms, eps)
        else:
            for d, (_, b) in zip(denoms, biases, strict=False):
                d.div_(b).add_(eps)
    elif foreach:
        torch._foreach_add_(denoms, eps)
    else:
        for d in denoms:
            d.add_(eps)


def _adam_tensors(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: Any,
    weight_decay: float,
    eps: float,
    maximize: bool,
    decoupled_weight_decay: bool,
    caution: Caution | None,
    eps_placement: str,
    cautious_weight_decay: bool,
    capturable: bool,
    shardings: list[_distributed.Sharding | None] | None = None,
    stats: dict[Tensor, CautionStats] | None = None,
) -> None:
    """One Adam step on tensors of one device and dtype; ``foreach`` picks the op flavour only."""
    if foreach:
        if maximize:
            grads = torch._foreach_neg(grads)
        if state_steps[0].is_cpu and not torch.compiler.is_compiling():
            torch._foreach_add_(state_steps, torch.tensor(1.0), alpha=1.0)
        else:
            torch._foreach_add_(state_steps, 1)
        if weight_decay != 0 and not decoupled_weight_decay:
            if maximize:
                torch._foreach_add_(grads, params, alpha=weight_decay)
            else:
                grads = torch._foreach_add(grads, params, alpha=weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        if amsgrad:
            torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        denoms = torch._foreach_sqrt(max_exp_avg_sqs if amsgrad else exp_avg_sqs)
    else:
        grads = [-g if maximize else g for g in grads]
        _increment_steps_(state_steps)
        if weight_decay != 0 and not decoupled_weight_decay:
            grads = [g.add(p, alpha=weight_decay) for g, p in zip(grads, params, strict=False)]
        for m, v, g in zip(exp_avgs, exp_avg_sqs, grads, strict=False):
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if amsgrad:
            for vmax, v in zip(max_exp_avg_sqs, exp_avg_sqs, strict=False):
                torch.maximum(vmax, v, out=vmax)
        denoms = [v.sqrt() for v in (max_exp_avg_sqs if amsgrad else exp_avg_sqs)]

    tensor_steps = _tensor_steps(capturable)
    hp = dict(lr=lr, beta1=beta1, beta2=beta2, eps_placement=eps_placement)
    if tensor_steps:
        biases = [_adam_bias_tensor(st, device=params[0].device, **hp) for st in state_steps]
    else:
        biases = [_adam_bias(step, **hp) for step in _step_values(state_steps)]
    neg_step_sizes = [-s for s, _ in biases]

    if caution is not None and eps == 0:
        # With eps == 0 the denominator can be 0: u = 0/0 is NaN (kept, as the spec says) and a
        # masked x/0 must not move p. Decide and apply from u itself (a rare, slower path).
        _adam_plain_denoms_(denoms, biases, eps=0.0, eps_placement=eps_placement, foreach=foreach)
        us = [m / d for m, d in zip(exp_avgs, denoms, strict=False)]
        # u may be infinite here: sign(g) * inf is NaN where g == 0, so decide from clamp(u, -1, 1)
        # (same signs, NaN kept) and select from u.
        signs = [u.clamp(-1.0, 1.0) for u in us]
        us, scales = _mask_and_scales(
            us, signs, grads, caution, foreach=foreach, shardings=shardings, stats=stats, params=params
        )
        _apply_scales_(us, scales, foreach=foreach)
        if weight_decay != 0 and decoupled_weight_decay:
            _decay_(
                params,
                us,
                lr=lr,
                weight_decay=weight_decay,
                cautious_weight_decay=cautious_weight_decay,
                foreach=foreach,
            )
        for p, u, s in zip(params, us, neg_step_sizes, strict=False):
            p.add_(u * s)
        return

    numerators, scales = exp_avgs, None
    if caution is not None:
        # u = step_size * m' / denom with denom > 0, so sign(u) == sign(m'): the mask comes from (m', g).
        numerators, scales = _mask_and_scales(
            exp_avgs, exp_avgs, grads, caution, foreach=foreach, shardings=shardings, stats=stats, params=params
        )
    if scales is None:
        # torch.optim's own operations: bitwise parity with torch.optim.Adam/AdamW when caution is off.
        _adam_plain_denoms_(denoms, biases, eps=eps, eps_placement=eps_placement, foreach=foreach)
    elif denoms[0].dtype == torch.float16:
        # float16's range is too short for eps / scale: scale the numerator instead.
        _apply_scales_(numerators, scales, foreach=foreach)
        _adam_plain_denoms_(denoms, biases, eps=eps, eps_placement=eps_placement, foreach=foreach)
    else:
        # Fold the scale into the denominator: denom / scale = sqrt(v) * (a / scale) + eps / scale,
        # a = 1 / bc2_sqrt ("corrected") or 1 ("uncorrected"): one pass, as many as without caution.
        if tensor_steps:
            a = torch.stack([(1.0 / b if eps_placement == "corrected" else torch.ones_like(b)) for _, b in biases])
            a = a.to(device=scales.device, dtype=torch.float64)
        else:
            a = torch.tensor(
                [1.0 / b if eps_placement == "corrected" else 1.0 for _, b in biases],
                dtype=torch.float64,
                device=scales.device,
            )
        muls = (a / scales).to(denoms[0].dtype).unbind()
        adds = (eps / scales).to(denoms[0].dtype).unbind()
        for d, mul, add in zip(denoms, muls, adds, strict=False):
            torch.addcmul(add, d, mul, out=d)

    if weight_decay != 0 and decoupled_weight_decay:
        _decay_(
            params,
            numerators,
            lr=lr,
            weight_decay=weight_decay,
            cautious_weight_decay=cautious_weight_decay,
            foreach=foreach,
        )

    if tensor_steps:
        # step sizes are tensors: fold them into the denominators (as torch.optim's capturable path)
        if foreach:
            torch._foreach_div_(denoms, neg_step_sizes)
            torch._foreach_addcdiv_(params, numerators, denoms)
        else:
            for p, n, d, s in zip(params, numerators, denoms, neg_step_sizes, strict=False):
                p.addcdiv_(n, d.div_(s))
    elif foreach and not isinstance(lr, Tensor):
        torch._foreach_addcdiv_(params, numerators, denoms, neg_step_sizes)
    else:
        for p, n, d, s in zip(params, numerators, denoms, neg_step_sizes, strict=False):
            p.addcdiv_(n, d, value=s)


@_distributed.on_local_shards
def adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: Any,
    weight_decay: float,
    eps: float,
    maximize: bool,
    decoupled_weight_decay: bool,
    caution: Caution | None,
    eps_placement: str = "corrected",
    cautious_weight_decay: bool = False,
    shardings: list[_distributed.Sharding | None] | None = None,
    capturable: bool = False,
    stats: dict[Tensor, CautionStats] | None = None,
) -> None:
    """Functional cautious Adam/AdamW; see :class:`cautious.backends.torch.AdamW`.

    Hyperparameters are taken as validated (the optimizer classes validate them once, at construction).
    With ``capturable=True`` (as torch.optim) the steps, ``lr`` (if a tensor) and the bias corrections stay
    tensors on the device: no host synchronisation; under ``torch.compile`` they are tensors as well.
    """
    impl = _resolve(params, foreach, fused, lr, caution, capturable=capturable)
    hyper = dict(
        amsgrad=amsgrad,
        beta1=float(beta1),
        beta2=float(beta2),
        weight_decay=float(weight_decay),
        eps=float(eps),
        maximize=maximize,
        caution=caution,
        eps_placement=eps_placement,
        cautious_weight_decay=cautious_weight_decay,
    )
    if not (capturable and isinstance(lr, Tensor)):
        lr = _scalar(lr)
    params, grads, exp_avgs, exp_avg_sqs = (_as_real(x) for x in (params, grads, exp_avgs, exp_avg_sqs))
    vmax = _as_real(max_exp_avg_sqs) if amsgrad else None
    if impl == "fused":
        from cautious.backends.torch import fused as fused_kernels

        steps = _fused_steps(state_steps)
        for idx in _groups(params, impl, steps):
            launch = fused_kernels.adam_launch(step=steps[idx[0]], decoupled=decoupled_weight_decay, **hyper)
            lists = [_pick(params, idx), _pick(grads, idx), _pick(exp_avgs, idx), _pick(exp_avg_sqs, idx)]
            lists.append(_pick(vmax, idx) if amsgrad else [None] * len(idx))
            fused_kernels.run(launch, lists, lr, shardings=_pick(shardings, idx) or None, stats=stats)
        return
    for idx in _groups(params, impl, shards=bool(shardings)):
        _adam_tensors(
            *(_pick(x, idx) for x in (params, grads, exp_avgs, exp_avg_sqs, vmax, state_steps)),
            foreach=impl == "foreach",
            stats=stats,
            lr=lr,
            shardings=_pick(shardings, idx) or None,
            decoupled_weight_decay=decoupled_weight_decay,
            capturable=capturable,
            **hyper,
        )


# ----------------------------------------------------------------------------------------------------------
# Lion
# ----------------------------------------------------------------------------------------------------------


def _lion_tensors(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool,
    beta1: float,
    beta2: float,
    lr: Any,
    weight_decay: float,
    maximize: bool,
    caution: Caution | None,
    cautious_weight_decay: bool,
    shardings: list[_distributed.Sharding | None] | None = None,
    stats: dict[Tensor, CautionStats] | None = None,
) -> None:
    """One Lion step: ``c = lerp(m, g, 1-b1)``, ``u = sign(c)`` (NaN kept), ``m <- lerp(m, g, 1-b2)``."""
    if foreach:
        if maximize:
            grads = torch._foreach_neg(grads)
        if state_steps:
            torch._foreach_add_(state_steps, 1)
        cs = torch._foreach_lerp(exp_avgs, grads, 1 - beta1)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta2)
    else:
        grads = [-g if maximize else g for g in grads]
        _increment_steps_(state_steps)
        cs = [m.lerp(g, 1 - beta1) for m, g in zip(exp_avgs, grads, strict=False)]
        for m, g in zip(exp_avgs, grads, strict=False):
            m.lerp_(g, 1 - beta2)
    us = [_nan_sign(c) for c in cs]
    if caution is not None:
        us, scales = _mask_and_scales(
            us, us, grads, caution, foreach=foreach, shardings=shardings, stats=stats, params=params
        )
        _apply_scales_(us, scales, foreach=foreach)
    if weight_decay != 0:
        _decay_(
            params, us, lr=lr, weight_decay=weight_decay, cautious_weight_decay=cautious_weight_decay, foreach=foreach
        )
    _descend_(params, us, lr, foreach=foreach)


def _descend_(params: list[Tensor], us: list[Tensor], lr: Any, *, foreach: bool) -> None:
    """``p <- p - lr * u``."""
    if foreach and not isinstance(lr, Tensor):
        torch._foreach_add_(params, us, alpha=-lr)
    else:
        for p, u in zip(params, us, strict=False):
            p.add_(u, alpha=-lr)


@_distributed.on_local_shards
def lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    beta1: float,
    beta2: float,
    lr: Any,
    weight_decay: float,
    maximize: bool,
    caution: Caution | None,
    cautious_weight_decay: bool = False,
    shardings: list[_distributed.Sharding | None] | None = None,
    stats: dict[Tensor, CautionStats] | None = None,
) -> None:
    """Functional cautious Lion. See :class:`cautious.backends.torch.Lion` and :func:`cautious.spec.lion`."""
    impl = _resolve(params, foreach, fused, lr, caution)
    hyper = dict(
        beta1=float(beta1),
        beta2=float(beta2),
        weight_decay=float(weight_decay),
        maximize=maximize,
        caution=caution,
        cautious_weight_decay=cautious_weight_decay,
    )
    lr = _scalar(lr)
    params, grads, exp_avgs = (_as_real(x) for x in (params, grads, exp_avgs))
    if impl == "fused":
        from cautious.backends.torch import fused as fused_kernels

        if fused_kernels.increment_steps_(state_steps) is None:
            _increment_steps_(state_steps)
        launch = fused_kernels.lion_launch(**hyper)
        for idx in _groups(params, impl):
            nones = [None] * len(idx)
            fused_kernels.run(
                launch,
                [_pick(params, idx), _pick(grads, idx), _pick(exp_avgs, idx), nones, nones],
                lr,
                shardings=_pick(shardings, idx) or None,
                stats=stats,
            )
        return
    for idx in _groups(params, impl, shards=bool(shardings)):
        _lion_tensors(
            *(_pick(x, idx) for x in (params, grads, exp_avgs, state_steps or None)),
            foreach=impl == "foreach",
            stats=stats,
            lr=lr,
            shardings=_pick(shardings, idx) or None,
            **hyper,
        )


# ----------------------------------------------------------------------------------------------------------
# SGD
# ----------------------------------------------------------------------------------------------------------


def _sgd_tensors(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    *,
    foreach: bool,
    lr: Any,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    caution: Caution | None,
    cautious_weight_decay: bool,
    shardings: list[_distributed.Sharding | None] | None = None,
    stats: dict[Tensor, CautionStats] | None = None,
) -> None:
    """One SGD step; new momentum buffers are written into ``momentum_buffer_list``."""
    if foreach:
        if maximize:
            grads = torch._foreach_neg(grads)
        if weight_decay != 0 and not decoupled_weight_decay:
            if maximize:
                torch._foreach_add_(grads, params, alpha=weight_decay)
            else:
                grads = torch._foreach_add(grads, params, alpha=weight_decay)
    else:
        grads = [-g if maximize else g for g in grads]
        if weight_decay != 0 and not decoupled_weight_decay:
            grads = [g.add(p, alpha=weight_decay) for g, p in zip(grads, params, strict=False)]
    if momentum != 0:
        bufs: list[Tensor] = []
        if foreach and all(b is not None for b in momentum_buffer_list):
            bufs = list(momentum_buffer_list)  # type: ignore[arg-type]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads, alpha=1 - dampening)
        else:
            for i, g in enumerate(grads):
                buf = momentum_buffer_list[i]
                if buf is None:
                    buf = momentum_buffer_list[i] = g.detach().clone()
                else:
                    buf.mul_(momentum).add_(g, alpha=1 - dampening)
                bufs.append(buf)
        if nesterov:
            us = (
                torch._foreach_add(grads, bufs, alpha=momentum)
                if foreach
                else [g.add(b, alpha=momentum) for g, b in zip(grads, bufs, strict=False)]
            )
        else:
            us = bufs
    else:
        us = grads
    if caution is not None:
        # SGD's u can be +-inf where g == 0 (after an inf gradient): clamp to keep the sign test exact.
        signs = [u.clamp(-1, 1) for u in us]
        us, scales = _mask_and_scales(
            us, signs, grads, caution, foreach=foreach, shardings=shardings, stats=stats, params=params
        )
        _apply_scales_(us, scales, foreach=foreach)
    if weight_decay != 0 and decoupled_weight_decay:
        _decay_(
            params, us, lr=lr, weight_decay=weight_decay, cautious_weight_decay=cautious_weight_decay, foreach=foreach
        )
    _descend_(params, us, lr, foreach=foreach)


@_distributed.on_local_shards
def sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    lr: Any,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    decoupled_weight_decay: bool = False,
    caution: Caution | None,
    cautious_weight_decay: bool = False,
    shardings: list[_distributed.Sharding | None] | None = None,
    stats: dict[Tensor, CautionStats] | None = None,
) -> None:
    """Functional cautious SGD. See :class:`cautious.backends.torch.SGD` and :func:`cautious.spec.sgd`.

    New momentum buffers are written into ``momentum_buffer_list``.
    """
    impl = _resolve(params, foreach, fused, lr, caution)
    hyper = dict(
        momentum=float(momentum),
        dampening=float(dampening),
        nesterov=nesterov,
        weight_decay=float(weight_decay) if not isinstance(weight_decay, Tensor) else weight_decay,
        maximize=maximize,
        caution=caution,
        cautious_weight_decay=cautious_weight_decay,
    )
    lr = _scalar(lr)
    if momentum == 0:  # torch.optim passes an empty list then
        momentum_buffer_list = [None] * len(params)
    complex_at = [i for i, p in enumerate(params) if p.is_complex()]
    if complex_at:  # new buffers of complex parameters are stored complex (state as torch.optim.SGD's)
        params, grads = _as_real(params), _as_real(grads)
        real_bufs = _as_real(momentum_buffer_list)
        sgd(
            params,
            grads,
            real_bufs,
            foreach=foreach,
            fused=fused,
            lr=lr,
            decoupled_weight_decay=decoupled_weight_decay,
            **hyper,
        )
        for i, b in enumerate(real_bufs):
            momentum_buffer_list[i] = torch.view_as_complex(b) if i in complex_at and b is not None else b
        return
    if impl == "fused":
        from cautious.backends.torch import fused as fused_kernels

        first = [momentum != 0 and b is None for b in momentum_buffer_list]
        for i, p in enumerate(params):
            if first[i]:
                momentum_buffer_list[i] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for idx in _groups(params, impl, first):
            launch = fused_kernels.sgd_launch(first_step=first[idx[0]], decoupled=decoupled_weight_decay, **hyper)
            bufs = _pick(momentum_buffer_list, idx) if momentum != 0 else [None] * len(idx)
            nones = [None] * len(idx)
            fused_kernels.run(
                launch,
                [_pick(params, idx), _pick(grads, idx), bufs, nones, nones],
                lr,
                shardings=_pick(shardings, idx) or None,
                stats=stats,
            )
        return
    for idx in _groups(params, impl, shards=bool(shardings)):
        bufs = _pick(momentum_buffer_list, idx)
        _sgd_tensors(
            _pick(params, idx),
            _pick(grads, idx),
            bufs,
            foreach=impl == "foreach",
            stats=stats,
            lr=lr,
            shardings=_pick(shardings, idx) or None,
            decoupled_weight_decay=decoupled_weight_decay,
            **hyper,
        )
        for j, i in enumerate(idx):
            momentum_buffer_list[i] = bufs[j]


# ----------------------------------------------------------------------------------------------------------
# NAdam / NAdamW (single-tensor, foreach and fused) and RMSprop (single-tensor and foreach)
# ----------------------------------------------------------------------------------------------------------


def _no_fused(name: str, foreach: bool | None, fused: bool | None) -> None:
    """``fused=True`` is refused for rules without a fused kernel (RMSprop, Adafactor, Muon), with one message;
    the default never picks it for them."""
    _check_no_fused_foreach(foreach, fused)
    if fused:
        raise ValueError(f"fused=True is not available for {name} (no fused kernel); use foreach=True or foreach=False")


def _plain_resolve(params: list[Tensor], foreach: bool | None) -> str:
    """The path of a rule without a fused kernel: an explicit ``foreach`` wins, else torch.optim's default."""
    if foreach is None:
        foreach = default_foreach(params) if torch.compiler.is_compiling() else _torch_default_foreach(params)
    return "foreach" if foreach else "single"


def _caution_and_descend_(
    params: list[Tensor],
    us: list[Tensor],
    grads: list[Tensor],
    *,
    foreach: bool,
    lr: Any,
    weight_decay: float,
    decoupled_weight_decay: bool,
    caution: Caution | None,
    cautious_weight_decay: bool,
    shardings: list[_distributed.Sharding | None] | None,
    stats: dict[Tensor, CautionStats] | None,
) -> None:
    """``u^c = mask * scale * u``, decoupled decay, ``p <- p - lr * u^c`` for directions given as tensors.

    ``u`` may be infinite where ``g == 0``: the mask is decided from ``clamp(u, -1, 1)`` (same signs, NaN kept).
    """
    if caution is not None:
        signs = [u.clamp(-1.0, 1.0) for u in us]
        us, scales = _mask_and_scales(
            us, signs, grads, caution, foreach=foreach, shardings=shardings, stats=stats, params=params
        )
        _apply_scales_(us, scales, foreach=foreach)
    if weight_decay != 0 and decoupled_weight_decay:
        _decay_(
            params, us, lr=lr, weight_decay=weight_decay, cautious_weight_decay=cautious_weight_decay, foreach=foreach
        )
    _descend_(params, us, lr, foreach=foreach)


def _nadam_tensors(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    mu_products: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool,
    beta1: float,
    beta2: float,
    lr: Any,
    weight_decay: float,
    momentum_decay: float,
    eps: float,
    maximize: bool,
    decoupled_weight_decay: bool,
    caution: Caution | None,
    cautious_weight_decay: bool,
    momentum_schedule: str,
    shardings: list[_distributed.Sharding | None] | None = None,
    stats: dict[Tensor, CautionStats] | None = None,
) -> None:
    """One NAdam step on tensors of one device and dtype (:func:`cautious.spec.nadam_direction`).

    Without caution (and without cautious weight decay) it runs torch.optim.NAdam's own operations,
    per flavour, so ``caution=False`` is bitwise torch's. With caution, ``u = (a g + b m') / d`` is
    formed, masked, scaled and descended along.
    """
    from cautious.spec.rules import nadam_mu

    grads = torch._foreach_neg(grads) if (foreach and maximize) else [-g if maximize else g for g in grads]
    _increment_steps_(state_steps)
    steps = _step_values(state_steps)
    coupled = weight_decay != 0 and not decoupled_weight_decay
    if coupled:
        if foreach:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        else:
            grads = [g.add(p, alpha=weight_decay) for g, p in zip(grads, params, strict=False)]
    plain = caution is None and not cautious_weight_decay
    if plain and weight_decay != 0 and decoupled_weight_decay:  # torch decays before the update
        _decay_(params, params, lr=lr, weight_decay=weight_decay, cautious_weight_decay=False, foreach=foreach)
    hp = dict(beta1=beta1, momentum_decay=momentum_decay, momentum_schedule=momentum_schedule)
    mus = [nadam_mu(t, **hp) for t in steps]
    mu_nexts = [nadam_mu(t + 1, **hp) for t in steps]
    if foreach:
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_mul_(mu_products, mus)
        torch._foreach_div_(denoms, [(1 - beta2**t) ** 0.5 for t in steps])
        torch._foreach_add_(denoms, eps)
    else:
        denoms = []
        for m, v, mp, g, mu, t in zip(exp_avgs, exp_avg_sqs, mu_products, grads, mus, steps, strict=False):
            mp *= mu
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denoms.append(v.div(1 - beta2**t).sqrt().add_(eps))
    prods = [float(mp.item()) for mp in mu_products] if mu_products else []
    # u = a * g / d + b * m' / d: a = (1 - mu) / (1 - prod), b = mu_next / (1 - prod * mu_next), both > 0
    a_s = [(1.0 - mu) / (1.0 - mp) for mu, mp in zip(mus, prods, strict=False)]
    b_s = [mn / (1.0 - mp * mn) for mn, mp in zip(mu_nexts, prods, strict=False)]
    if plain:
        # torch.optim's step sizes, in its order of operations
        c_g = [-lr * (1.0 - mu) / (1.0 - mp) for mu, mp in zip(mus, prods, strict=False)]
        c_m = [(-lr * mn) / (1.0 - mp * mn) for mn, mp in zip(mu_nexts, prods, strict=False)]
        if foreach:
            torch._foreach_addcdiv_(params, grads, denoms, c_g)
            torch._foreach_addcdiv_(params, exp_avgs, denoms, c_m)
        else:
            for p, g, m, d, cg, cm in zip(params, grads, exp_avgs, denoms, c_g, c_m, strict=False):
                p.addcdiv_(g, d, value=cg)
                p.addcdiv_(m, d, value=cm)
        return
    # a * (g / d) + b * (m' / d), the spec's order: g = 0 with d = 0 (eps = 0) is NaN, as 0 / 0 is
    us = [
        g.div(d).mul_(a).add_(m.div(d), alpha=b)
        for g, m, d, a, b in zip(grads, exp_avgs, denoms, a_s, b_s, strict=False)
    ]
    _caution_and_descend_(
        params,
        us,
        grads,
        foreach=foreach,
        lr=lr,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        caution=caution,
        cautious_weight_decay=cautious_weight_decay,
        shardings=shardings,
        stats=stats,
    )


@_distributed.on_local_shards
def nadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    mu_products: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    beta1: float,
    beta2: float,
    lr: Any,
    weight_decay: float,
    momentum_decay: float,
    eps: float,
    maximize: bool,
    decoupled_weight_decay: bool,
    caution: Caution | None,
    cautious_weight_decay: bool = False,
    momentum_schedule: str = "dozat",
    shardings: list[_distributed.Sharding | None] | None = None,
    stats: dict[Tensor, CautionStats] | None = None,
) -> None:
    """Functional cautious NAdam/NAdamW; see :class:`cautious.backends.torch.NAdam`."""
    impl = _resolve(params, foreach, fused, lr, caution)
    lr = _scalar(lr)
    params, grads, exp_avgs, exp_avg_sqs = (_as_real(x) for x in (params, grads, exp_avgs, exp_avg_sqs))
    hyper = dict(
        beta1=float(beta1),
        beta2=float(beta2),
        eps=float(eps),
        weight_decay=float(weight_decay),
        maximize=maximize,
        caution=caution,
        cautious_weight_decay=cautious_weight_decay,
    )
    schedule = dict(momentum_decay=float(momentum_decay), momentum_schedule=momentum_schedule)
    if impl == "fused":
        from cautious.backends.torch import fused as fused_kernels
        from cautious.spec.rules import nadam_mu

        steps = _fused_steps(state_steps)
        torch._foreach_mul_(mu_products, [nadam_mu(t, beta1=hyper["beta1"], **schedule) for t in steps])
        prods = torch.stack(mu_products).tolist() if mu_products else []
        for idx in _groups(params, impl, steps, prods):
            t = steps[idx[0]]
            launch = fused_kernels.nadam_launch(
                step=t,
                mu=nadam_mu(t, beta1=hyper["beta1"], **schedule),
                mu_next=nadam_mu(t + 1, beta1=hyper["beta1"], **schedule),
                mu_product=prods[idx[0]],
                decoupled=decoupled_weight_decay,
                **hyper,
            )
            lists = [_pick(x, idx) for x in (params, grads, exp_avgs, exp_avg_sqs)] + [[None] * len(idx)]
            fused_kernels.run(launch, lists, lr, shardings=_pick(shardings, idx) or None, stats=stats)
        return
    for idx in _groups(params, impl, shards=bool(shardings)):
        _nadam_tensors(
            *(_pick(x, idx) for x in (params, grads, exp_avgs, exp_avg_sqs, mu_products, state_steps)),
            foreach=impl == "foreach",
            lr=lr,
            decoupled_weight_decay=decoupled_weight_decay,
            shardings=_pick(shardings, idx) or None,
            stats=stats,
            **hyper,
            **schedule,
        )


def _rmsprop_tensors(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffer_list: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool,
    lr: Any,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    caution: Caution | None,
    cautious_weight_decay: bool,
    shardings: list[_distributed.Sharding | None] | None = None,
    stats: dict[Tensor, CautionStats] | None = None,
) -> None:
    """One RMSprop step (:func:`cautious.spec.rmsprop_direction`), with torch.optim.RMSprop's operations
    per flavour: without caution it is bitwise torch's. ``u = m'`` (momentum) or ``g / d``."""
    grads = torch._foreach_neg(grads) if (foreach and maximize) else [-g if maximize else g for g in grads]
    _increment_steps_(state_steps)
    if weight_decay != 0 and not decoupled_weight_decay:
        if foreach:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        else:
            grads = [g.add(p, alpha=weight_decay) for g, p in zip(grads, params, strict=False)]
    if foreach:
        torch._foreach_mul_(square_avgs, alpha)
        torch._foreach_addcmul_(square_avgs, grads, grads, value=1 - alpha)
        if centered:
            torch._foreach_lerp_(grad_avgs, grads, 1 - alpha)
            avgs = torch._foreach_addcmul(square_avgs, grad_avgs, grad_avgs, value=-1)
            torch._foreach_sqrt_(avgs)
        else:
            avgs = torch._foreach_sqrt(square_avgs)
        torch._foreach_add_(avgs, eps)
    else:
        avgs = []
        for i, (v, g) in enumerate(zip(square_avgs, grads, strict=False)):
            v.mul_(alpha).addcmul_(g, g, value=1 - alpha)
            if centered:
                grad_avgs[i].lerp_(g, 1 - alpha)
                avgs.append(v.addcmul(grad_avgs[i], grad_avgs[i], value=-1).sqrt_().add_(eps))
            else:
                avgs.append(v.sqrt().add_(eps))
    plain = caution is None and not cautious_weight_decay
    if plain and weight_decay != 0 and decoupled_weight_decay:
        _decay_(params, params, lr=lr, weight_decay=weight_decay, cautious_weight_decay=False, foreach=foreach)
    if momentum > 0:
        if foreach:
            torch._foreach_mul_(momentum_buffer_list, momentum)
            torch._foreach_addcdiv_(momentum_buffer_list, grads, avgs)
        else:
            for b, g, d in zip(momentum_buffer_list, grads, avgs, strict=False):
                b.mul_(momentum).addcdiv_(g, d)
        if plain:
            _descend_(params, momentum_buffer_list, lr, foreach=foreach)
            return
        us = list(momentum_buffer_list)
    else:
        if plain:
            if foreach and not isinstance(lr, Tensor):
                torch._foreach_addcdiv_(params, grads, avgs, value=-lr)
            else:
                for p, g, d in zip(params, grads, avgs, strict=False):
                    p.addcdiv_(g, d, value=-lr)
            return
        us = [g / d for g, d in zip(grads, avgs, strict=False)]
    _caution_and_descend_(
        params,
        us,
        grads,
        foreach=foreach,
        lr=lr,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        caution=caution,
        cautious_weight_decay=cautious_weight_decay,
        shardings=shardings,
        stats=stats,
    )


@_distributed.on_local_shards
def rmsprop(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffer_list: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    lr: Any,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    decoupled_weight_decay: bool = False,
    caution: Caution | None,
    cautious_weight_decay: bool = False,
    shardings: list[_distributed.Sharding | None] | None = None,
    stats: dict[Tensor, CautionStats] | None = None,
) -> None:
    """Functional cautious RMSprop; see :class:`cautious.backends.torch.RMSprop`."""
    _no_fused("RMSprop", foreach, fused)
    impl = _plain_resolve(params, foreach)
    lr = _scalar(lr)
    params, grads, square_avgs = (_as_real(x) for x in (params, grads, square_avgs))
    grad_avgs, momentum_buffer_list = _as_real(grad_avgs), _as_real(momentum_buffer_list)
    for idx in _groups(params, impl, shards=bool(shardings)):
        _rmsprop_tensors(
            *(_pick(x, idx) for x in (params, grads, square_avgs)),
            _pick(grad_avgs, idx) if centered else [],
            _pick(momentum_buffer_list, idx) if momentum > 0 else [],
            _pick(state_steps, idx),
            foreach=impl == "foreach",
            lr=lr,
            alpha=float(alpha),
            eps=float(eps),
            weight_decay=float(weight_decay),
            momentum=float(momentum),
            centered=centered,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
            caution=caution,
            cautious_weight_decay=cautious_weight_decay,
            shardings=_pick(shardings, idx) or None,
            stats=stats,
        )


# ----------------------------------------------------------------------------------------------------------
# Adafactor
# ----------------------------------------------------------------------------------------------------------


def _refuse_dtensor(params: list[Tensor], where: str) -> None:
    """Adafactor's factored statistics are row and column means over whole tensors: a shard's are not the
    tensor's, and reducing them would need collectives this path does not make. Refused before any change."""
    dtensor = _distributed._dtensor_type()
    if dtensor is not None and any(isinstance(p, dtensor) for p in params):
        raise NotImplementedError(
            f"{where} does not support DTensor parameters: its factored second moment (row and column means "
            "of g^2, the RMS clipping and the parameter scale) needs reductions across shards; "
            "use AdamW, Lion or SGD with FSDP2/DTensor, or replicate these parameters"
        )


def _adafactor_tensors(
    params: list[Tensor],
    grads: list[Tensor],
    row_vars: list[Tensor | None],
    col_vars: list[Tensor | None],
    variances: list[Tensor | None],
    exp_avgs: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool,
    lr: Any,
    beta2_decay: float,
    eps1: float | None,
    eps2: float,
    d: float,
    weight_decay: float,
    beta1: float,
    maximize: bool,
    caution: Caution | None,
    stats: dict[Tensor, CautionStats] | None = None,
) -> None:
    r"""One Adafactor step over tensors of one device and dtype, all factored or all not (torch.optim's ops).

    ``u = clip(g / sqrt(v_hat))`` (:func:`cautious.spec.adafactor_direction`, torch's form), step size
    ``alpha = min(lr, 1/sqrt(t)) * max(eps2, rms(p))`` from ``p`` before decay. Without momentum:
    ``p <- p (1 - lr wd) - alpha * mask * scale * u``; with ``beta1 > 0``: ``m <- lerp(m, alpha u, 1 - beta1)``,
    ``p <- p (1 - lr wd) - mask * scale * m`` (the mask compares ``u``, or ``m``, with ``g``).
    """
    if maximize:
        grads = torch._foreach_neg(grads) if foreach else [-g for g in grads]
    if foreach and state_steps and state_steps[0].is_cpu and not torch.compiler.is_compiling():
        torch._foreach_add_(state_steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
    else:
        _increment_steps_(state_steps)
    steps = [float(s) for s in _step_values(state_steps)]
    ws = [t**beta2_decay for t in steps]
    alphas = [
        max(eps2, p.norm(2).item() / (p.numel() ** 0.5)) * min(lr, 1 / (t**0.5))
        for p, t in zip(params, steps, strict=True)
    ]
    if weight_decay != 0:
        if foreach:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        else:
            for p in params:
                p.mul_(1 - lr * weight_decay)
    e1 = torch.finfo(params[0].dtype).eps if eps1 is None else eps1  # one dtype per call
    if row_vars[0] is not None:
        if foreach:
            row_means = [torch.norm(g, dim=-1, keepdim=True) for g in grads]
            torch._foreach_mul_(row_means, row_means)
            torch._foreach_div_(row_means, [g.size(-1) for g in grads])
            torch._foreach_lerp_(row_vars, row_means, ws)
            col_means = [torch.norm(g, dim=-2, keepdim=True) for g in grads]
            torch._foreach_mul_(col_means, col_means)
            torch._foreach_div_(col_means, [g.size(-2) for g in grads])
            torch._foreach_lerp_(col_vars, col_means, ws)
            var_estimates = [r @ c for r, c in zip(row_vars, col_vars, strict=True)]
            row_var_means = [r.mean(dim=-2, keepdim=True) for r in row_vars]
            torch._foreach_clamp_min_(row_var_means, e1)
            torch._foreach_div_(var_estimates, row_var_means)
        else:
            var_estimates = []
            for g, r, c, w in zip(grads, row_vars, col_vars, ws, strict=True):
                r.lerp_(torch.norm(g, dim=-1, keepdim=True).square_().div_(g.size(-1)), w)
                c.lerp_(torch.norm(g, dim=-2, keepdim=True).square_().div_(g.size(-2)), w)
                var_estimates.append((r @ c).div_(r.mean(dim=-2, keepdim=True).clamp_(min=e1)))
    else:
        if foreach:
            torch._foreach_lerp_(variances, torch._foreach_mul(grads, grads), ws)
        else:
            for g, v, w in zip(grads, variances, ws, strict=True):
                v.lerp_(g * g, w)
        var_estimates = [v.clone() for v in variances]
    if foreach:
        torch._foreach_clamp_min_(var_estimates, e1 * e1)
        torch._foreach_rsqrt_(var_estimates)
        torch._foreach_mul_(var_estimates, grads)
    else:
        for x, g in zip(var_estimates, grads, strict=True):
            x.clamp_(min=e1 * e1).rsqrt_().mul_(g)
    updates = var_estimates
    denoms = [max(1.0, u.norm(2).item() / ((u.numel() ** 0.5) * d)) for u in updates]
    if beta1 > 0:  # momentum over the scaled updates (optax, timm): caution masks m'
        coefs = [a / n for a, n in zip(alphas, denoms, strict=True)]
        if foreach:
            torch._foreach_mul_(updates, coefs)
            torch._foreach_lerp_(exp_avgs, updates, 1 - beta1)
        else:
            for u, c, m in zip(updates, coefs, exp_avgs, strict=True):
                m.lerp_(u.mul_(c), 1 - beta1)
        steps_ = exp_avgs
        if caution is not None:
            steps_, scales = _mask_and_scales(
                exp_avgs, exp_avgs, grads, caution, foreach=foreach, stats=stats, params=params
            )
            _apply_scales_(steps_, scales, foreach=foreach)
        if foreach:
            torch._foreach_sub_(params, steps_)
        else:
            for p, m in zip(params, steps_, strict=True):
                p.sub_(m)
        return
    if caution is not None:
        updates, scales = _mask_and_scales(
            updates, updates, grads, caution, foreach=foreach, stats=stats, params=params
        )
        _apply_scales_(updates, scales, foreach=foreach)
    coefs = [-a / n for a, n in zip(alphas, denoms, strict=True)]
    if foreach:
        torch._foreach_mul_(updates, coefs)
        torch._foreach_add_(params, updates)
    else:
        for p, u, c in zip(params, updates, coefs, strict=True):
            p.add_(u, alpha=c)


def adafactor(
    params: list[Tensor],
    grads: list[Tensor],
    row_vars: list[Tensor | None],
    col_vars: list[Tensor | None],
    variances: list[Tensor | None],
    exp_avgs: list[Tensor | None],
    state_steps: list[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    lr: Any,
    beta2_decay: float,
    eps1: float | None,
    eps2: float,
    d: float,
    weight_decay: float,
    beta1: float = 0.0,
    maximize: bool,
    caution: Caution | None,
    stats: dict[Tensor, CautionStats] | None = None,
) -> None:
    """Functional cautious Adafactor: :class:`cautious.backends.torch.Adafactor`, :func:`cautious.spec.adafactor`.

    Paths: single-tensor and foreach (grouped by device, dtype and whether the tensor is factored, as
    torch.optim's foreach Adafactor); ``fused=True`` is refused (no fused kernel for Adafactor), and the
    default never picks it. DTensor parameters are refused (:func:`_refuse_dtensor`).
    """
    _no_fused("Adafactor", foreach, fused)
    _refuse_dtensor(params, "cautious.torch.Adafactor")
    if foreach is None:
        foreach = _torch_default_foreach(params)
    if isinstance(lr, Tensor) and lr.dim() != 0:  # as torch.optim.Adafactor: a 0-d tensor lr stays a tensor
        lr = lr.squeeze()
    hyper = dict(
        lr=lr,
        beta2_decay=float(beta2_decay),
        eps1=None if eps1 is None else float(eps1),
        eps2=float(eps2),
        d=float(d),
        weight_decay=float(weight_decay),
        beta1=float(beta1),
        maximize=maximize,
        caution=caution,
    )
    # an empty tensor has nothing to update (torch.optim.Adafactor divides by its size and raises): its step
    # counts, and its telemetry is the spec's for n = 0 (nothing kept, scale 1)
    _increment_steps_([st for p, st in zip(params, state_steps, strict=True) if p.numel() == 0])
    if stats is not None and caution is not None:
        for p in params:
            if p.numel() == 0:
                zero = torch.zeros((), dtype=torch.int64, device=p.device)
                stats[p] = CautionStats(zero, 0, torch.ones((), dtype=torch.float64, device=p.device))
    keep = [i for i, p in enumerate(params) if p.numel() > 0]
    if not keep:
        return
    lists = [
        _pick(x, keep) if x is not None else None
        for x in (params, grads, row_vars, col_vars, variances, exp_avgs or None, state_steps)
    ]
    impl = "foreach" if foreach else "single"
    for idx in _groups(lists[0], impl, [g.dim() > 1 for g in lists[1]]):
        _adafactor_tensors(*(_pick(x, idx) for x in lists), foreach=foreach, stats=stats, **hyper)


# ----------------------------------------------------------------------------------------------------------
# ADOPT and LaProp (timm's operations, so that caution=False is timm's Adopt / LaProp bit for bit)
# ----------------------------------------------------------------------------------------------------------


def _decay_skips(params: list[Tensor], us: list[Tensor], cautious_weight_decay: bool) -> list[Tensor] | None:
    """Cautious weight decay: where ``u^c`` and ``p`` have strictly opposite signs (no decay there); else None."""
    if not cautious_weight_decay:
        return None
    return [torch.sign(u).mul_(p).lt(0) for p, u in zip(params, us, strict=False)]


def _decay_add_(params: list[Tensor], skips: list[Tensor] | None, alpha: float, *, foreach: bool) -> None:
    """timm's decoupled decay ``p <- p + alpha p`` (``alpha = -lr wd``), kept where ``skips`` says so."""
    if skips is not None:
        for p, skip in zip(params, skips, strict=False):
            p.copy_(torch.where(skip, p, p.add(p, alpha=alpha)))
    elif foreach:
        torch._foreach_add_(params, params, alpha=alpha)
    else:
        for p in params:
            p.add_(p, alpha=alpha)


def _adopt_tensors(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool,
    beta1: float,
    beta2: float,
    lr: Any,
    eps: float,
    clip_exp: float | None,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
    caution: Caution | None,
    cautious_weight_decay: bool,
    shardings: list[_distributed.Sharding | None] | None = None,
    stats: dict[Tensor, CautionStats] | None = None,
) -> None:
    """One ADOPT step (:func:`cautious.spec.rules.adopt_direction`): step 1 sets ``v = g^2`` and moves nothing;
    later steps ``n = clip(g / max(sqrt(v), eps))``, ``m <- lerp(m, n, 1-b1)``, ``u = m``,
    ``v <- b2 v + (1-b2) g^2``."""
    if foreach:
        if maximize:
            grads = torch._foreach_neg(grads)
        _increment_steps_(state_steps)
        if weight_decay != 0 and not decoupled:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    else:
        grads = [-g if maximize else g for g in grads]
        _increment_steps_(state_steps)
        if weight_decay != 0 and not decoupled:
            grads = [g.add(p, alpha=weight_decay) for g, p in zip(grads, params, strict=False)]
    steps = _step_values(state_steps)
    first = [i for i, t in enumerate(steps) if t == 1]
    if first:
        vs, gs = _pick(exp_avg_sqs, first), _pick(grads, first)
        if foreach:
            torch._foreach_addcmul_(vs, gs, gs)
        else:
            for v, g in zip(vs, gs, strict=False):
                v.addcmul_(g, g)
        if caution is not None and stats is not None:
            # u = 0: nothing is kept but a NaN gradient entry (the mask keeps NaN in either; here u is 0, not
            # NaN, so the signs carry g's NaN themselves), and the scale of that count
            zeros = [torch.zeros_like(g) for g in gs]
            _mask_and_scales(
                zeros,
                [torch.where(g.isnan(), g, z) for g, z in zip(gs, zeros, strict=True)],
                gs,
                caution,
                foreach=foreach,
                shardings=_pick(shardings, first) or None,
                stats=stats,
                params=_pick(params, first),
            )
        later = [i for i, t in enumerate(steps) if t != 1]
        if not later:
            return
        params, grads, exp_avgs, exp_avg_sqs, steps = (
            _pick(x, later) for x in (params, grads, exp_avgs, exp_avg_sqs, steps)
        )
        shardings = _pick(shardings, later) or None
    clips = None if clip_exp is None else [(float(t) - 1) ** clip_exp for t in steps]
    if foreach:
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_maximum_(denoms, eps)
        ns = torch._foreach_div(grads, denoms)
        if clips is not None:
            torch._foreach_maximum_(ns, [-c for c in clips])
            torch._foreach_minimum_(ns, clips)
        torch._foreach_lerp_(exp_avgs, ns, 1 - beta1)
    else:
        for i, (g, m, v) in enumerate(zip(grads, exp_avgs, exp_avg_sqs, strict=False)):
            n = g.div(torch.clamp(v.sqrt(), eps))
            if clips is not None:
                n.clamp_(-clips[i], clips[i])
            m.lerp_(n, 1 - beta1)
    us = exp_avgs
    if caution is not None:
        us, scales = _mask_and_scales(
            us, us, grads, caution, foreach=foreach, shardings=shardings, stats=stats, params=params
        )
        _apply_scales_(us, scales, foreach=foreach)
    if weight_decay != 0 and decoupled:
        _decay_add_(params, _decay_skips(params, us, cautious_weight_decay), -lr * weight_decay, foreach=foreach)
    _descend_(params, us, lr, foreach=foreach)
    if foreach:
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    else:
        for v, g in zip(exp_avg_sqs, grads, strict=False):
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)


@_distributed.on_local_shards
def adopt(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    beta1: float,
    beta2: float,
    lr: Any,
    eps: float,
    clip_exp: float | None,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
    caution: Caution | None,
    cautious_weight_decay: bool = False,
    shardings: list[_distributed.Sharding | None] | None = None,
    stats: dict[Tensor, CautionStats] | None = None,
) -> None:
    """Functional cautious ADOPT. See :class:`cautious.backends.torch.Adopt` and :func:`cautious.spec.adopt`."""
    impl = _resolve(params, foreach, fused, lr, caution)
    lr = _scalar(lr)
    params, grads, exp_avgs, exp_avg_sqs = (_as_real(x) for x in (params, grads, exp_avgs, exp_avg_sqs))
    hyper = dict(
        beta1=float(beta1),
        beta2=float(beta2),
        eps=float(eps),
        clip_exp=None if clip_exp is None else float(clip_exp),
        weight_decay=float(weight_decay),
        decoupled=decoupled,
        maximize=maximize,
        caution=caution,
        cautious_weight_decay=cautious_weight_decay,
    )
    if impl == "fused":
        from cautious.backends.torch import fused as fused_kernels

        steps = _fused_steps(state_steps)
        for idx in _groups(params, impl, steps):
            launch = fused_kernels.adopt_launch(step=steps[idx[0]], nesterov=False, **hyper)
            lists = [_pick(x, idx) for x in (params, grads, exp_avgs, exp_avg_sqs)] + [[None] * len(idx)]
            fused_kernels.run(launch, lists, lr, shardings=_pick(shardings, idx) or None, stats=stats)
        return
    for idx in _groups(params, impl, shards=bool(shardings)):
        _adopt_tensors(
            *(_pick(x, idx) for x in (params, grads, exp_avgs, exp_avg_sqs, state_steps)),
            foreach=impl == "foreach",
            lr=lr,
            shardings=_pick(shardings, idx) or None,
            stats=stats,
            **hyper,
        )


def _laprop_tensors(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    step_sizes: list[float],
    bias_corrections2: list[Tensor],
    *,
    foreach: bool,
    beta1: float,
    beta2: float,
    lr: Any,
    eps: float,
    weight_decay: float,
    decay_order: str,
    maximize: bool,
    caution: Caution | None,
    cautious_weight_decay: bool,
    shardings: list[_distributed.Sharding | None] | None = None,
    stats: dict[Tensor, CautionStats] | None = None,
) -> None:
    """One LaProp step (:func:`cautious.spec.rules.laprop_update`): ``v <- b2 v + (1-b2) g^2``,
    ``n = g / (sqrt(v / bc2) + eps)``, ``m <- b1 m + lr (1-b1) n``, ``p <- p - step_size * m^c``
    (``step_size = lr / lr_avg``, from the class); ``u = m`` is a positive multiple of ``-delta``."""
    if foreach:
        if maximize:
            grads = torch._foreach_neg(grads)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denoms = torch._foreach_div(exp_avg_sqs, [_scalar(bc) for bc in bias_corrections2])
        torch._foreach_sqrt_(denoms)
        torch._foreach_add_(denoms, eps)
        ns = torch._foreach_div(grads, denoms)
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, ns, alpha=lr * (1 - beta1))
    else:
        grads = [-g if maximize else g for g in grads]
        for g, m, v, bc in zip(grads, exp_avgs, exp_avg_sqs, bias_corrections2, strict=False):
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            n = g / v.div(bc).sqrt_().add_(eps)
            m.mul_(beta1)
            m.add_(n, alpha=lr * (1 - beta1))
    us = exp_avgs
    if caution is not None:
        # the mask is decided from delta = -step_size * m: where step_size is 0 (lr = 0), delta is 0 (NaN kept)
        signs = [m if s > 0 else m * s for m, s in zip(exp_avgs, step_sizes, strict=False)]
        us, scales = _mask_and_scales(
            us, signs, grads, caution, foreach=foreach, shardings=shardings, stats=stats, params=params
        )
        _apply_scales_(us, scales, foreach=foreach)
    decay = weight_decay != 0
    skips = _decay_skips(params, us, cautious_weight_decay) if decay else None
    if decay and decay_order == "pre_update":
        _decay_add_(params, skips, -lr * weight_decay, foreach=foreach)
    if foreach and len(set(step_sizes)) == 1:
        torch._foreach_add_(params, us, alpha=-step_sizes[0])
    elif foreach:
        torch._foreach_add_(params, torch._foreach_mul(us, [-s for s in step_sizes]))
    else:
        for p, u, s in zip(params, us, step_sizes, strict=False):
            p.add_(u, alpha=-s)
    if decay and decay_order == "post_update":
        _decay_add_(params, skips, -lr * weight_decay, foreach=foreach)


@_distributed.on_local_shards
def laprop(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    step_sizes: list[float],
    bias_corrections2: list[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    beta1: float,
    beta2: float,
    lr: Any,
    eps: float,
    weight_decay: float,
    decay_order: str = "post_update",
    maximize: bool = False,
    caution: Caution | None,
    cautious_weight_decay: bool = False,
    shardings: list[_distributed.Sharding | None] | None = None,
    stats: dict[Tensor, CautionStats] | None = None,
) -> None:
    """Functional cautious LaProp. See :class:`cautious.backends.torch.LaProp` and :func:`cautious.spec.laprop`.

    ``step_sizes`` (``lr / lr_avg``, 0 while ``lr_avg`` is 0) and ``bias_corrections2`` (``1 - b2^t`` as
    timm's running product, a 0-d CPU tensor) are per-parameter scalars the optimizer class keeps.
    """
    impl = _resolve(params, foreach, fused, lr, caution)
    lr = _scalar(lr)
    params, grads, exp_avgs, exp_avg_sqs = (_as_real(x) for x in (params, grads, exp_avgs, exp_avg_sqs))
    hyper = dict(
        lr=lr,
        beta1=float(beta1),
        beta2=float(beta2),
        eps=float(eps),
        weight_decay=float(weight_decay),
        decay_order=decay_order,
        maximize=maximize,
        caution=caution,
        cautious_weight_decay=cautious_weight_decay,
    )
    if impl == "fused":
        from cautious.backends.torch import fused as fused_kernels

        bcs = [float(_scalar(bc)) for bc in bias_corrections2]
        for idx in _groups(params, impl, list(step_sizes), bcs):
            launch = fused_kernels.laprop_launch(step_lr=step_sizes[idx[0]], bias_correction2=bcs[idx[0]], **hyper)
            lists = [_pick(x, idx) for x in (params, grads, exp_avgs, exp_avg_sqs)] + [[None] * len(idx)]
            fused_kernels.run(launch, lists, lr, shardings=_pick(shardings, idx) or None, stats=stats)
        return
    for idx in _groups(params, impl, shards=bool(shardings)):
        _laprop_tensors(
            *(_pick(x, idx) for x in (params, grads, exp_avgs, exp_avg_sqs, step_sizes, bias_corrections2)),
            foreach=impl == "foreach",
            shardings=_pick(shardings, idx) or None,
            stats=stats,
            **hyper,
        )


# ----------------------------------------------------------------------------------------------------------
# Muon
# ----------------------------------------------------------------------------------------------------------


def _newton_schulz(
    x: Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float, dtype: torch.dtype
) -> Tensor:
    r"""torch.optim.Muon's orthogonalization, op for op (so ``caution=False`` is bitwise torch's): in ``dtype``
    (torch's bfloat16 by default), on the wide orientation, ``X / max(|X|_F, eps)`` then
    ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``.

    The result has ``dtype``; :func:`cautious.spec.newton_schulz` is the float64 definition.
    """
    a, b, c = ns_coefficients
    # a copy always: torch's x.bfloat16() is x itself for a bfloat16 x, and the in-place division below
    # would then rescale a bfloat16 momentum buffer (nesterov=False) in torch.optim.Muon
    o = x.to(dtype, copy=True)
    tall = x.size(0) > x.size(1)
    if tall:
        o = o.T
    o.div_(o.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram = o @ o.T
        o = torch.addmm(o, torch.addmm(gram, gram, gram, beta=b, alpha=c), o, beta=a)
    return o.T if tall else o


def _muon_shape_scale(shape: torch.Size, adjust_lr_fn: str | None) -> float:
    """torch.optim.Muon's ``adjust_lr_fn`` factor (:func:`cautious.spec.muon_shape_scale`), a Python float."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))


def _muon_tensors(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor],
    *,
    foreach: bool,
    lr: Any,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_coefficients: tuple[float, float, float],
    eps: float,
    ns_steps: int,
    adjust_lr_fn: str | None,
    caution: Caution | None,
    cautious_weight_decay: bool,
    mask_position: str,
    ns_dtype: str = "bfloat16",
    stats: dict[Tensor, CautionStats] | None = None,
) -> None:
    r"""One Muon step: ``m <- lerp(m, g, 1-mu)``, ``v = lerp(g, m, mu)`` (nesterov) else ``m``,
    ``u = s(shape) NS(v)``; caution masks ``u`` (``mask_position="after"``) or ``v`` (``"before"``)."""
    if foreach:
        torch._foreach_lerp_(momentum_buffer_list, grads, 1 - momentum)
    else:
        for m, g in zip(momentum_buffer_list, grads, strict=True):
            m.lerp_(g, 1 - momentum)
    vs = [g.lerp(m, momentum) if nesterov else m for g, m in zip(grads, momentum_buffer_list, strict=True)]
    if caution is not None and mask_position == "before":
        vs, scales = _mask_and_scales(vs, vs, grads, caution, foreach=foreach, stats=stats, params=params)
        _apply_scales_(vs, scales, foreach=foreach)
    dtype = getattr(torch, ns_dtype)
    us = [_newton_schulz(v, ns_coefficients, ns_steps, eps, dtype) for v in vs]
    if caution is not None and mask_position == "after":
        us, scales = _mask_and_scales(us, us, grads, caution, foreach=foreach, stats=stats, params=params)
        _apply_scales_(us, scales, foreach=foreach)
    if weight_decay != 0:
        _decay_(
            params, us, lr=lr, weight_decay=weight_decay, cautious_weight_decay=cautious_weight_decay, foreach=foreach
        )
    for p, u in zip(params, us, strict=True):
        p.add_(u, alpha=-lr * _muon_shape_scale(p.shape, adjust_lr_fn))


def muon(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor],
    *,
    foreach: bool | None = None,
    lr: Any,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_coefficients: tuple[float, float, float],
    eps: float,
    ns_steps: int,
    adjust_lr_fn: str | None,
    caution: Caution | None,
    cautious_weight_decay: bool = False,
    mask_position: str = "after",
    ns_dtype: str = "bfloat16",
    stats: dict[Tensor, CautionStats] | None = None,
) -> None:
    """Functional cautious Muon. See :class:`cautious.backends.torch.Muon` and :func:`cautious.spec.muon`.

    2-d, non-DTensor parameters (the optimizer class checks). ``foreach=True`` runs the momentum and the
    mask with ``torch._foreach_*`` ops; Newton-Schulz is per matrix on every path. No fused path.
    """
    impl = "foreach" if foreach else "single"
    hyper = dict(
        weight_decay=float(weight_decay),
        momentum=float(momentum),
        nesterov=nesterov,
        ns_coefficients=tuple(float(k) for k in ns_coefficients),
        eps=float(eps),
        ns_steps=int(ns_steps),
        adjust_lr_fn=adjust_lr_fn,
        caution=caution,
        cautious_weight_decay=cautious_weight_decay,
        mask_position=mask_position,
        ns_dtype=ns_dtype,
    )
    lr = _scalar(lr)
    for idx in _groups(params, impl):
        _muon_tensors(
            *(_pick(x, idx) for x in (params, grads, momentum_buffer_list)),
            foreach=impl == "foreach",
            stats=stats,
            lr=lr,
            **hyper,
        )
