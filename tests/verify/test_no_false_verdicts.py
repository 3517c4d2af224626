"""Zero false verdicts: torch.optim's own optimizers (caution off) and our backends conform, over 3 seeds.

The fixed-input clauses do not depend on the seed; the ``random`` clause is run for seeds 0, 1, 2.
(optax and Keras natives: tests/verify/test_cli.py, each in its own process.)
"""

import warnings

import numpy as np
import pytest

from cautious.conformance.profile import CLAUSES, conformance_profile
from cautious.conformance.targets import Target, load_adapter

ADAM = {"lr": "lr", "betas": "betas", "eps": "eps", "weight_decay": "weight_decay", "amsgrad": "amsgrad",
        "maximize": "maximize"}  # fmt: skip
NATIVES = [
    Target(kind="torch", path="torch.optim:AdamW", rule="adamw", hparams=ADAM, options={"caution": False}),
    Target(kind="torch", path="torch.optim:Adam", rule="adam", hparams=ADAM, options={"caution": False}),
    Target(
        kind="torch",
        path="torch.optim:SGD",
        rule="sgd",
        hparams={
            "lr": "lr",
            "momentum": "momentum",
            "dampening": "dampening",
            "nesterov": "nesterov",
            "weight_decay": "weight_decay",
            "maximize": "maximize",
        },  # fmt: skip
        options={"caution": False},
    ),
]


def _quiet(fn):
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return fn()


@pytest.mark.parametrize("target", NATIVES, ids=lambda t: t.path)
def test_torch_optim_natives_conform_with_caution_off(target):
    adapter = load_adapter(target)
    prof = _quiet(lambda: conformance_profile(adapter, rules=(target.rule,), seed=0))
    assert prof.conforms, prof.table()
    assert prof.clauses["normalization"].status == "untested"  # caution off: nothing to normalize
    assert prof.clauses["resume_plain_checkpoint"].status == "matches"
    for seed in (1, 2):
        again = _quiet(lambda s=seed: conformance_profile(adapter, rules=(target.rule,), seed=s, clauses=["random"]))
        assert again.conforms, again.clauses["random"].detail


@pytest.mark.parametrize("impl", ["single", "foreach"])
def test_our_torch_backend_conforms_on_every_clause(impl):
    from cautious.conformance.adapters.torch import TorchAdapter

    adapter = TorchAdapter(impl)
    prof = _quiet(lambda: conformance_profile(adapter, seed=0, clauses=[c for c in CLAUSES if c != "random"]))
    assert prof.conforms, prof.table()
    for seed in (0, 1, 2):
        again = _quiet(lambda s=seed: conformance_profile(adapter, seed=s, clauses=["random"]))
        assert again.conforms, again.clauses["random"].detail
