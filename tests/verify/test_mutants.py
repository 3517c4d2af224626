"""Proof of power: every planted bug is caught for the right clause, every correct port conforms."""

import time

import my_port  # docs/examples/my_port.py: a third-party-style torch port with planted bugs
import pytest

from cautious.conformance import ConformanceError, run_conformance
from cautious.conformance.profile import CLAUSES, conformance_profile
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
def test_correct_port_conforms_on_every_clause(cls, rule):
    prof = conformance_profile(load_adapter(target(cls, rule)), rules=(rule,), budget=10, seed=0)
    assert prof.conforms, prof.table()
    assert prof.clauses["normalization"].detected == ["mean_clamp(floor=0.001)"]
    for seed in (1, 2):  # the random clause over more seeds (the other clauses are fixed inputs)
        again = conformance_profile(load_adapter(target(cls, rule)), rules=(rule,), seed=seed, clauses=["random"])
        assert again.conforms, again.clauses["random"].detail


def test_correct_port_passes_the_random_suite():
    result = run_conformance(load_adapter(target("CautiousAdamW", "adamw")), rules=("adamw",))
    assert sum(result.examples.values()) >= 20
    assert result.worst <= 1.0


@pytest.mark.parametrize("bug", my_port.BUGS)
def test_mutant_is_caught_for_the_right_clause(bug):
    clause = my_port.CLAUSE[bug]
    t0 = time.perf_counter()
    prof = conformance_profile(
        load_adapter(target(f"CautiousAdamW_{bug}", "adamw")), rules=("adamw",), clauses=[clause]
    )
    res = prof.clauses[clause]
    assert res.status == "deviates", (bug, clause, res)
    assert not prof.conforms
    if res.example is not None:
        ns: dict = {}
        exec(res.example, ns)  # every example runs
    print(f"{bug}: caught by {clause} in {time.perf_counter() - t0:.1f}s")


def test_mutant_table_is_complete():
    assert set(my_port.CLAUSE) == set(my_port.BUGS)
    assert set(my_port.CLAUSE.values()) <= set(CLAUSES)


def test_random_suite_still_catches_a_numeric_mutant_without_shrinking():
    with pytest.raises(ConformanceError) as info:
        run_conformance(load_adapter(target("CautiousAdamW_eps_moved", "adamw")), rules=("adamw",), shrink=False)
    assert "disagrees with the reference" in str(info.value)


def test_every_bug_has_a_mutant_class():
    for bug in my_port.BUGS:
        assert getattr(my_port, f"CautiousAdamW_{bug}").bug == bug
    with pytest.raises(ValueError, match="bug must be one of"):
        my_port.mutant("no_such_bug")
