r"""Conformance of *caution for any optimizer*: a backend's wrapper around each spec rule, against the spec's wrapper.

A wrapper adapter is an ordinary :class:`~cautious.conformance.case.Adapter` with one more
attribute, ``wrap_caution``: ``None`` runs the caution-free optimizer of the case (``caution``
is pinned to ``False``), a :class:`~cautious.Caution` runs the backend's wrapper around that same
optimizer (``cautious.torch.Cautious``, ``cautious.tensorflow.Cautious``,
``cautious.jax.cautious(..., form="update")``). For every drawn case and inputs,
:func:`run_wrapper_conformance` runs both from the same state and checks

* the wrapped step against :func:`cautious.spec.whole_step` of the bare step ``p -> q``
  (so the inner rule itself is the existing suite's business, and this check is generic over
  :data:`cautious.spec.RULES`: a rule added to the suite is covered here with no change), and
* the state: the wrapper never changes it (equal to the bare step's, bit for bit).

The bound per entry (docs/conformance.md, "Caution for any optimizer") for a kept entry with
``delta = q - p`` and scale ``s``, compute dtype unit roundoff ``u_c`` and storage ``u_s``:

.. math::

    |p'_{impl} - (p + s\,\delta)| \le 3.01\,u_c\,s\,|\delta| + (u_c + u_s)\,|p + s\,\delta| + a
    \;\bigl[+\; s\,u_s\,|q| \text{ when the implementation masks the update itself}\bigr]

(``a``: the storage dtype's smallest subnormal, plus ``(1 + s)`` times the compute dtype's smallest
normal for a platform that flushes subnormals); a dropped entry keeps ``p`` exactly (up to such a flush). A mask
decision is *undecided* where ``|delta|`` is below the smallest normal of the compute dtype (a
platform may flush it to zero) or, for an implementation that masks the update itself (optax),
where ``q == p`` (the bare update rounded away), and where ``g`` is subnormal (flushed: no sign, and
not counted by ``denominator="nonzero"``); then either outcome and every count in between is admitted.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, assume, given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from cautious import spec
from cautious._caution import Caution
from cautious.conformance.case import Case, NumpyAdapter, spec_optimizer
from cautious.conformance.check import _match, repro_snippet
from cautious.conformance.runner import ConformanceError, ConformanceResult
from cautious.conformance.strategies import cases, step_inputs
from cautious.spec.dtypes import compute_dtype, numpy_dtype, round_to, tiny, unit_roundoff

__all__ = ["WRAP_CAUTIONS", "NumpyWrapperAdapter", "check_wrapped_step", "run_wrapper_conformance"]

#: The wrapper's caution options the suite draws.
WRAP_CAUTIONS = (
    Caution(),
    Caution("count_plus_one"),
    Caution("exact"),
    Caution("none"),
    Caution("exact", denominator="nonzero"),
)

_ABS = {"float64": 2.0**-1074, "float32": 2.0**-149, "bfloat16": 2.0**-133, "float16": 2.0**-24}
_MAX_COUNTS = 64  # undecided entries beyond this: the count range is checked at its ends


class NumpyWrapperAdapter(NumpyAdapter):
    """The reference's own wrapper (:func:`cautious.spec.cautious_optimizer`) as a wrapper adapter."""

    name = "numpy-wrapper"
    measures_delta = True

    def __init__(self) -> None:
        self.wrap_caution: Caution | None = None

    def step(self, case: Case, params: Sequence[np.ndarray], grads: Sequence[np.ndarray], state: spec.State):
        if self.wrap_caution is None:
            return super().step(case, params, grads, state)
        opt = spec.cautious_optimizer(spec_optimizer(case), self.wrap_caution)
        new_params, new_state = opt.step(params, grads, state)
        rnd = lambda x, d: None if x is None else round_to(x, d).astype(numpy_dtype(d))  # noqa: E731
        leaves = tuple(type(s)(*(rnd(x, case.state_storage) for x in s)) for s in new_state.leaves)
        return [rnd(p, case.dtype) for p in new_params], spec.State(new_state.step, leaves)


def check_wrapped_step(
    case: Case,
    caution: Caution,
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    bare: Sequence[np.ndarray],
    wrapped: Sequence[np.ndarray],
    *,
    measures_delta: bool = True,
) -> tuple[list[str], float]:
    """Compare ``wrapped`` with ``spec.whole_step(p, bare, g)`` per tensor: ``(mismatches, worst error / bound)``."""
    maximize = bool(case.hparams.get("maximize", False))
    cd, sd = compute_dtype(case.dtype), case.dtype
    u_c, u_s = unit_roundoff(cd), unit_roundoff(sd)
    problems, worst = [], 0.0
    with np.errstate(all="ignore"):
        for i, (p, g, q, got) in enumerate(zip(params, grads, bare, wrapped, strict=True)):
            p64, g64, q64 = (np.asarray(x, np.float64).reshape(-1) for x in (p, g, q))
            got64 = np.asarray(got, np.float64).reshape(-1)
            delta = q64 - p64
            g_hat = -g64 if maximize else g64
            mask = spec.cautious_mask(delta, -g_hat)
            flush = tiny(cd)  # a platform may flush a subnormal input or result to zero
            # a flush (of a subnormal delta or g) can only turn a kept entry into a dropped one ...
            sub_g = (np.abs(g64) < flush) & (g64 != 0)
            und = mask & ~np.isnan(delta) & ~np.isnan(g64) & ((np.abs(delta) < flush) | sub_g)
            if not measures_delta:  # ... and an update that p + o rounded away may be kept by who masks o itself
                und |= ~mask & (q64 == p64) & ~np.isnan(g64) & ~sub_g & (g64 != 0)
            n_hi = spec.caution_denominator(g64, caution)
            n_lo = n_hi - (int(np.count_nonzero(sub_g)) if caution.denominator == "nonzero" else 0)
            k_min = int(np.count_nonzero(mask & ~und))
            k_max = k_min + int(np.count_nonzero(und))
            ks = range(k_min, k_max + 1) if k_max - k_min <= _MAX_COUNTS else (k_min, k_max)
            ns = range(n_lo, n_hi + 1) if n_hi - n_lo <= _MAX_COUNTS else (n_lo, n_hi)
            best, best_ratio = None, np.inf
            for k, n in itertools.product(ks, ns):
                s = caution.scale(k, n)
                kept = p64 + s * delta
                tol = 3.01 * u_c * s * np.abs(delta) + (u_c + u_s) * np.abs(kept) + _ABS[sd] + (1 + s) * flush
                if not measures_delta:
                    tol = tol + s * u_s * np.abs(q64)
                ok_kept, r_kept = _match(got64, kept, tol)
                ok_drop, r_drop = _match(got64, p64, np.where(np.abs(p64) < flush, flush, 0.0))
                ok = np.where(und, ok_kept | ok_drop, np.where(mask, ok_kept, ok_drop))
                # an infinite p: the measured delta is inf - inf = NaN (kept: p' = NaN); who masks the update
                # itself keeps p infinite. Either is admitted (docs/conformance.md, "Non-finite parameters").
                ok |= np.isinf(p64) & ((got64 == p64) | np.isnan(got64))
                ratio = np.where(und, np.minimum(r_kept, r_drop), np.where(mask, r_kept, r_drop))
                worst_k = float(np.max(ratio, initial=0.0))
                if ok.all():
                    best, best_ratio = None, worst_k
                    break
                if best is None or worst_k < best_ratio:
                    j = int(np.argmax(~ok))
                    want = kept[j] if mask[j] else p64[j]
                    best, best_ratio = (
                        (
                            f"params[{i}] flat index {j}: expected {want!r} ({'kept' if mask[j] else 'dropped'}, "
                            f"delta={delta[j]!r}, g={g64[j]!r}, count {k} of {n}, scale {s!r}), got {got64[j]!r}"
                        ),
                        worst_k,
                    )
            if best is not None:
                problems.append(best)
            else:
                worst = max(worst, best_ratio)
    return problems, worst


def run_wrapper_conformance(
    adapter: Any,
    *,
    rules: Sequence[str] | None = None,
    dtypes: Sequence[str] = ("float32", "float64"),
    max_examples: int | None = None,
    allow_nan: bool = True,
    seed: int | None = None,
    shrink: bool = True,
) -> ConformanceResult:
    """Check a wrapper adapter around every rule in ``rules`` (default :data:`cautious.spec.RULES`).

    Cases are the suite's own (:func:`cautious.conformance.strategies.cases`) with ``caution``
    pinned to ``False`` for the inner optimizer; the wrapper's caution is drawn from
    :data:`WRAP_CAUTIONS`. Raises :class:`~cautious.conformance.runner.ConformanceError` with a
    runnable repro of the bare reference step on the first disagreement (shrunk unless ``shrink=False``).
    """
    rules = tuple(rules or spec.RULES)
    base_fixed = getattr(adapter, "fixed_hparams", None)
    measures = bool(getattr(adapter, "measures_delta", True))

    def fixed(rule: str) -> dict:
        return {**((base_fixed(rule) or {}) if base_fixed else {}), "caution": False}

    examples: dict[tuple[str, str], int] = {}
    worst = [0.0]
    budget = max_examples if max_examples is not None else settings.default.max_examples
    per_rule = max(1, -(-budget // len(rules)))

    def one_rule(rule: str) -> None:
        @settings(
            max_examples=per_rule,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            **({"derandomize": False} if seed is not None else {}),
            **({} if shrink else {"phases": [Phase.explicit, Phase.reuse, Phase.generate]}),
        )
        @given(data=st.data())
        def run(data: st.DataObject) -> None:
            case = data.draw(cases((rule,), dtypes, fixed), label="case")
            assume(adapter.supports(case) is None)
            params, grad_seq, state = data.draw(step_inputs(case, max_steps=1, allow_nan=allow_nan), label="inputs")
            grads = grad_seq[0]
            caution = data.draw(st.sampled_from(WRAP_CAUTIONS), label="wrapper caution")
            note(f"case: {case.describe()}, wrapper caution {caution!r}")
            copies = lambda xs: [np.array(x, copy=True) for x in xs]  # noqa: E731
            adapter.wrap_caution = None
            bare, bare_state = adapter.step(case, copies(params), copies(grads), state)
            adapter.wrap_caution = caution
            try:
                wrapped, wrapped_state = adapter.step(case, copies(params), copies(grads), state)
            finally:
                adapter.wrap_caution = None
            problems, w = check_wrapped_step(case, caution, params, grads, bare, wrapped, measures_delta=measures)
            for a, b in zip(bare_state.leaves, wrapped_state.leaves, strict=True):
                for x, y in zip(a, b, strict=True):
                    if x is not None and not np.array_equal(x, y, equal_nan=True):
                        problems.append("the wrapper changed the optimizer state")
            if problems:
                raise ConformanceError(
                    f"{adapter.name} (wrapper, caution={caution!r}) disagrees with spec.whole_step of its own "
                    f"bare step ({case.describe()}):\n  "
                    + "\n  ".join(problems[:4])
                    + "\nThe bare reference step:\n"
                    + repro_snippet(case, params, grads, state)
                )
            examples[(case.rule, case.dtype)] = examples.get((case.rule, case.dtype), 0) + 1
            worst[0] = max(worst[0], w)

        if seed is not None:
            from hypothesis import seed as hseed

            run = hseed(seed)(run)
        try:
            run()
        except Unsatisfiable:
            pass

    for rule in rules:
        one_rule(rule)
    missing = [r for r in rules if not any(k[0] == r for k in examples)]
    if missing:
        raise ConformanceError(f"{adapter.name}: no wrapper example ran for rule(s) {missing}")
    return ConformanceResult(examples, worst[0], set())
