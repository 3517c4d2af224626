"""Proof of power: every planted bug is caught, every correct implementation passes (CI profile)."""

import time

import my_port  # docs/examples/my_port.py: a third-party-style torch port with planted bugs
import pytest

from cautious.conformance import ConformanceError, run_conformance
from cautious.conformance.targets import Target, load_adapter

HPARAMS = {
    "adamw": {"lr": "lr", "betas": "betas", "eps": "eps", "weight_decay": "weight_decay"},
    "lion": {"lr": "lr", "betas": "betas", "weight_decay": "weight_decay"},
    "sgd": {"lr": "lr", "momentum": "momentum", "weight_decay": "weight_decay"},
}


def target(path: str, rule: str) -> Target:
    return Target(kind="torch", path=f"my_port:{path}", rule=rule, hparams=HPARAMS[rule])


@pytest.mark.parametrize(
    ("cls", "rule"), [("CautiousAdamW", "adamw"), ("CautiousLion", "lion"), ("CautiousSGD", "sgd")]
)
def test_correct_port_passes(cls, rule):
    result = run_conformance(load_adapter(target(cls, rule)), rules=(rule,))
    assert sum(result.examples.values()) >= 20
    assert result.worst <= 1.0


@pytest.mark.parametrize("bug", my_port.BUGS)
def test_mutant_is_caught(bug):
    t0 = time.perf_counter()
    with pytest.raises(ConformanceError) as info:
        run_conformance(load_adapter(target(f"CautiousAdamW_{bug}", "adamw")), rules=("adamw",), shrink=False)
    assert "disagrees with the reference" in str(info.value)
    print(f"{bug}: caught in {time.perf_counter() - t0:.1f}s by {info.value.report.mismatches[0].what}")


def test_every_bug_has_a_mutant_class():
    for bug in my_port.BUGS:
        assert getattr(my_port, f"CautiousAdamW_{bug}").bug == bug
    with pytest.raises(ValueError, match="bug must be one of"):
        my_port.mutant("no_such_bug")
