"""``cautious.conformance``: check any implementation of cautious optimizers against the reference.

Write an :class:`Adapter` (``name``, ``supports(case)``, ``step(case, params, grads,
state)``) for your implementation, then::

    from cautious.conformance import run_conformance
    run_conformance(MyAdapter())

The suite draws cases and inputs with Hypothesis, compares parameters and every
state tensor after every step against :mod:`cautious.spec` within error bounds
derived from the computation (see :mod:`cautious.conformance.bounds`), re-syncs to
the reference before each step, and shrinks a failure to a runnable repro.

Importing this module imports NumPy and Hypothesis, never a framework.
"""

from cautious.conformance.case import Adapter, Case, NumpyAdapter, spec_optimizer
from cautious.conformance.check import Mismatch, StepReport, check_step, repro_snippet
from cautious.conformance.runner import (
    ConformanceError,
    ConformanceResult,
    check_trajectory,
    register_profiles,
    run_conformance,
)

__all__ = [
    "Adapter",
    "Case",
    "NumpyAdapter",
    "spec_optimizer",
    "Mismatch",
    "StepReport",
    "check_step",
    "repro_snippet",
    "ConformanceError",
    "ConformanceResult",
    "check_trajectory",
    "register_profiles",
    "run_conformance",
]
