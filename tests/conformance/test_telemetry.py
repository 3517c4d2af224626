"""The suite checks an adapter's caution telemetry (``last_stats``) against the reference's ``Optimizer.stats``."""

from __future__ import annotations

import pytest

from cautious import Caution
from cautious.conformance import ConformanceError, NumpyAdapter, run_conformance


class _Skewed(NumpyAdapter):
    """The reference with its telemetry altered by ``alter(count, n, scale)``."""

    def __init__(self, alter) -> None:
        super().__init__()
        self.alter = alter
        self.name = "skewed"

    def last_stats(self):
        got = super().last_stats()
        return None if got is None else [self.alter(*s) for s in got]


def test_reference_telemetry_passes_with_both_denominators():
    result = run_conformance(NumpyAdapter(), rules=("adamw", "lion"), max_examples=10)
    assert sum(result.examples.values()) > 0


@pytest.mark.parametrize(
    "alter,what",
    [
        (lambda k, n, s: (k + 1, n, s), "count"),  # one kept entry too many
        (lambda k, n, s: (k, n + 1, s), ".n"),
        (lambda k, n, s: (k, n, s * (1 + 1e-6)), "scale"),
    ],
    ids=["count", "n", "scale"],
)
def test_wrong_telemetry_is_caught(alter, what):
    with pytest.raises(ConformanceError, match=f"telemetry disagrees(.|\\n)*{what}"):
        run_conformance(_Skewed(alter), rules=("sgd",), max_examples=4, pin={"caution": Caution("exact")})


def test_size_scale_under_the_nonzero_denominator_is_caught():
    """A port that ignores denominator='nonzero' in its reported scale (uses the size) is caught."""
    skew = _Skewed(lambda k, n, s: (k, n, Caution("exact").scale(k, n)))
    with pytest.raises(ConformanceError, match="telemetry disagrees(.|\\n)*scale"):
        run_conformance(skew, rules=("sgd",), max_examples=8, pin={"caution": Caution("exact", denominator="nonzero")})
