"""Drive any adapter through the Hypothesis-generated suite."""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from hypothesis import HealthCheck, Phase, assume, given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from cautious import spec
from cautious.conformance.case import Adapter, Case, NumpyAdapter
from cautious.conformance.check import StepReport, check_stats, check_step, py_float, repro_snippet
from cautious.conformance.strategies import cases, step_inputs

__all__ = [
    "ConformanceError",
    "ConformanceResult",
    "run_conformance",
    "check_trajectory",
    "register_profiles",
]

_REFERENCE = NumpyAdapter()


class ConformanceError(AssertionError):
    """An implementation disagreed with the reference; the message carries a runnable repro."""

    def __init__(self, message: str, report: StepReport | None = None, repro: str = "") -> None:
        super().__init__(message)
        self.report = report
        self.repro = repro


@dataclasses.dataclass
class ConformanceResult:
    """What a run checked: examples per (rule, dtype), the worst error in units of the bound, notes."""

    examples: dict[tuple[str, str], int]
    worst: float
    notes: set[str]


def register_profiles() -> None:
    """Hypothesis profiles: ``ci`` (derandomized, bounded, no database) and ``thorough`` (local)."""
    common = dict(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
    settings.register_profile("ci", max_examples=40, derandomize=True, database=None, **common)
    settings.register_profile("thorough", max_examples=1000, **common)
    settings.register_profile("dev", max_examples=100, **common)


def check_trajectory(
    adapter: Adapter,
    case: Case,
    params: Sequence[np.ndarray],
    grad_seq: Sequence[Sequence[np.ndarray]],
    state: spec.State,
) -> tuple[float, set[str]]:
    """Step ``adapter`` along ``grad_seq``, re-synced to the reference before every step.

    Raises :class:`ConformanceError` at the first step that disagrees.
    Returns the worst error in units of the bound and the notes collected.
    """
    worst, notes = 0.0, set()
    params = [np.asarray(p) for p in params]
    for step_i, grads in enumerate(grad_seq):
        repro = repro_snippet(case, params, grads, state)
        try:
            got_params, got_state = adapter.step(case, [p.copy() for p in params], [g.copy() for g in grads], state)
        except Exception as e:  # the port raised: its type, message and frame, with the inputs that made it
            from cautious.conformance.profile import describe_exception

            raise ConformanceError(
                f"{adapter.name} raised at step {step_i + 1} of {len(grad_seq)} ({case.describe()}):\n"
                f"  {describe_exception(e)}\nReproduce the reference step with:\n{repro}",
                None,
                repro,
            ) from e
        report = check_step(case, params, grads, state, got_params, got_state)
        notes.update(report.notes)
        if not report.ok:
            first = report.mismatches[0]
            if first.what.startswith(("params[", "state.leaves[")) and not first.what.endswith(".shape"):
                repro += (
                    f"\nprint(new_{first.what}[{first.index!r}])  # reference: {py_float(first.expected)}; "
                    f"{adapter.name} gave {py_float(first.got)} (allowed error {first.bound:.3g})"
                )
            msg = (
                f"{adapter.name} disagrees with the reference at step {step_i + 1} of {len(grad_seq)} "
                f"({case.describe()}):\n  {first}\n"
                + "".join(f"  also: {m}\n" for m in report.mismatches[1:4])
                + "Reproduce the reference step with:\n"
                + repro
            )
            raise ConformanceError(msg, report, repro)
        worst = max(worst, report.worst)
        reader = getattr(adapter, "last_stats", None)  # optional: the implementation's telemetry of that step
        got_stats = reader() if reader is not None and case.caution is not None else None
        if got_stats is not None:
            bad = check_stats(case, params, grads, state, got_stats)
            if bad:
                raise ConformanceError(
                    f"{adapter.name}'s telemetry disagrees with the reference's Optimizer.stats at step {step_i + 1} "
                    f"of {len(grad_seq)} ({case.describe()}):\n  {bad[0]}\nReproduce the reference step with:\n"
                    f"{repro}\nprint(opt.stats(params, grads, state))",
                    None,
                    repro,
                )
        params, state = _REFERENCE.step(case, params, grads, state)
    return worst, notes


def run_conformance(
    adapter: Adapter,
    *,
    rules: Sequence[str] | None = None,
    dtypes: Sequence[str] = ("float32", "float64"),
    max_examples: int | None = None,
    allow_nan: bool = True,
    max_steps: int = 3,
    seed: int | None = None,
    pin: dict | None = None,
    shrink: bool = True,
    allow: frozenset = frozenset(),
) -> ConformanceResult:
    """Check ``adapter`` against the reference on Hypothesis-generated cases.

    Every supported rule, option and dtype in ``rules`` x ``dtypes`` is drawn;
    cases the adapter declines (``supports`` returns a reason) are skipped, but a
    requested rule with no supported case at all is an error. The number of
    examples (split evenly over the rules) comes from the active
    Hypothesis profile (``ci`` in CI) unless ``max_examples`` is given. An adapter may pin hyperparameters it does not
    vary with a ``fixed_hparams(rule) -> dict`` method; ``pin`` pins more for
    this run (``pin={"caution": Caution("exact")}``). ``shrink=False`` reports the
    first failing example as found (faster; for mutation testing). ``allow`` names
    declared deviations the checker admits (:attr:`Case.allow`). On failure,
    Hypothesis shrinks the example and a :class:`ConformanceError` with a runnable
    repro is raised.
    """
    rules = tuple(rules or spec.RULES)
    fixed = getattr(adapter, "fixed_hparams", None)
    # An implementation whose state cannot be loaded is checked from fresh states, one step at a time.
    fresh_only = bool(getattr(adapter, "fresh_only", False))
    # Caution denominators the adapter implements (optional attribute; default: the size only, never drawn).
    denominators = tuple(getattr(adapter, "denominators", ("size",)))
    if pin:
        base_fixed = fixed
        fixed = lambda rule: {**((base_fixed(rule) or {}) if base_fixed else {}), **pin}  # noqa: E731
    examples: collections.Counter = collections.Counter()
    all_notes: set[str] = set()
    worst = [0.0]
    budget = max_examples if max_examples is not None else settings.default.max_examples
    # One Hypothesis run per rule, so that every rule is exercised whatever the generator favours.
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
            case = data.draw(cases((rule,), dtypes, fixed, denominators), label="case")
            if allow:
                case = dataclasses.replace(case, allow=frozenset(allow))
            reason = adapter.supports(case)
            assume(reason is None)
            params, grad_seq, state = data.draw(
                step_inputs(case, max_steps=max_steps, allow_nan=allow_nan, fresh_only=fresh_only), label="inputs"
            )
            note(f"case: {case.describe()}")
            w, n = check_trajectory(adapter, case, params, grad_seq, state)
            examples[(case.rule, case.dtype)] += 1
            all_notes.update(n)
            worst[0] = max(worst[0], w)

        if seed is not None:
            from hypothesis import seed as hseed

            run = hseed(seed)(run)
        try:
            run()
        except Unsatisfiable:
            pass  # every drawn case was declined: reported below

    for rule in rules:
        one_rule(rule)
    missing = [r for r in rules if not any(k[0] == r for k in examples)]
    if missing and os.environ.get("CAUTIOUS_ALLOW_EMPTY") != "1":
        raise ConformanceError(
            f"{adapter.name}: no example ran for rule(s) {missing}; the adapter declined every drawn case "
            "(pass rules=... to restrict the run to what it implements)"
        )
    return ConformanceResult(dict(examples), worst[0], all_notes)
