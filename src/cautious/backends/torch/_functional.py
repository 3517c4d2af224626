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

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from cautious._caution import Caution
from cautious.backends.torch import _distributed
from cautious.spec.mask import CautionStats

__all__ = ["adam", "lion", "sgd", "default_foreach"]

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
    stats: dict | None = None,
) -> str:
    """The path a step runs: ``"fused"``, ``"foreach"`` or ``"single"``; an explicit choice wins.

    Defaults, measured (docs/benchmarks.md): CUDA -> fused (Triton); CPU with caution -> the
    native fused loop when available, else the single-tensor loop (on CPU the foreach ops make
    one pass over memory per op; the loop works on one tensor while it is in cache); caution
    off -> torch.optim's own choice. While compiling: foreach (the previous default). Every path
    has telemetry, so ``stats`` no longer changes the choice (kept for the callers' signature).
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
    impl = _resolve(params, foreach, fused, lr, caution, capturable=capturable, stats=stats)
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

        steps = fused_kernels.increment_steps_(state_steps)
        if steps is None:
            _increment_steps_(state_steps)
            steps = _step_values(state_steps)
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
    impl = _resolve(params, foreach, fused, lr, caution, stats=stats)
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
    impl = _resolve(params, foreach, fused, lr, caution, stats=stats)
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
