"""The profiles of the installed public ports, pinned clause by clause (docs/ports.md).

Each known port is checked on every clause with fixed inputs (the ``random`` clause runs in
``scripts/known_ports.py``, not here, to keep CI short). A port's pinned profile changes only
when the port changes: then re-read its source, update its TOML and this table.
"""

import warnings

import numpy as np
import pytest

from cautious.conformance.known import installed_known, known_targets
from cautious.conformance.profile import CLAUSES, conformance_profile
from cautious.conformance.targets import load_adapter

M, D, U = "matches", "deviates", "untested"
#: port -> {clause: status} for every clause but ``random``; plus what it conforms to
PINNED = {
    "timm.optim.AdamWLegacy(caution=True)": (True, {
        "mask_boundary": M, "nan": D, "sign_vs_underflow": D, "normalization": M, "eps_placement": M,
        "bias_correction": M, "state_untouched": M, "weight_decay": M, "step_counting": M, "dtype": M,
        "errors": D, "trajectory": M, "resume_plain_checkpoint": D}),
    "timm.optim.Lion(caution=True)": (True, {
        "mask_boundary": M, "nan": D, "sign_vs_underflow": U, "normalization": M, "eps_placement": U,
        "bias_correction": U, "state_untouched": M, "weight_decay": M, "step_counting": M, "dtype": M,
        "errors": D, "trajectory": M, "resume_plain_checkpoint": D}),
    # caution is skipped without momentum (sgdw.py: `if momentum != 0: ... if caution:`): not declared
    "timm.optim.SGDW(caution=True)": (False, {
        "mask_boundary": D, "nan": D, "sign_vs_underflow": D, "normalization": M, "eps_placement": U,
        "bias_correction": U, "state_untouched": M, "weight_decay": M, "step_counting": M, "dtype": M,
        "errors": M, "trajectory": M, "resume_plain_checkpoint": D}),
    "pytorch_optimizer.Lion(cautious=True)": (True, {
        "mask_boundary": M, "nan": D, "sign_vs_underflow": U, "normalization": M, "eps_placement": U,
        "bias_correction": U, "state_untouched": M, "weight_decay": M, "step_counting": M, "dtype": M,
        "errors": D, "trajectory": M, "resume_plain_checkpoint": D}),
    # float32 arithmetic of the debiased betas (utils.beta_debias) exceeds the bound: not declared
    "heavyball.AdamW(caution=True)": (False, {
        "mask_boundary": D, "nan": M, "sign_vs_underflow": M, "normalization": M, "eps_placement": D,
        "bias_correction": M, "state_untouched": U, "weight_decay": M, "step_counting": M, "dtype": D,
        "errors": D, "trajectory": M, "resume_plain_checkpoint": U}),
    "heavyball.SGD(caution=True)": (True, {
        "mask_boundary": D, "nan": M, "sign_vs_underflow": M, "normalization": M, "eps_placement": U,
        "bias_correction": U, "state_untouched": U, "weight_decay": M, "step_counting": M, "dtype": M,
        "errors": D, "trajectory": M, "resume_plain_checkpoint": U}),
}  # fmt: skip
DETECTED = {
    "timm.optim.AdamWLegacy(caution=True)": {
        "normalization": ["mean_clamp(floor=0.001)"], "eps_placement": ["corrected"]},
    "timm.optim.Lion(caution=True)": {"normalization": ["mean_clamp(floor=0.001)"], "weight_decay": ["unmasked"]},
    "pytorch_optimizer.Lion(cautious=True)": {"normalization": ["count_plus_one"], "weight_decay": ["unmasked"]},
    "heavyball.SGD(caution=True)": {"normalization": ["exact"]},
}  # fmt: skip

INSTALLED = {t.name: t for t in installed_known()[0]}


def test_every_known_port_is_pinned_and_declares_only_clauses():
    names = {t.name for t in known_targets()}
    assert set(PINNED) <= names
    assert {n for n in names if not n.startswith("C-Optim")} == set(PINNED)  # the paper's files run by path
    for t in known_targets():
        assert set(t.deviations) <= set(CLAUSES)
        assert t.source


@pytest.mark.parametrize("name", sorted(PINNED))
def test_known_port_profile_is_pinned(name):
    if name not in INSTALLED:
        pytest.skip(f"{name}: not installed")
    t = INSTALLED[name]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        prof = conformance_profile(
            load_adapter(t), rules=(t.rule,), dtypes=t.dtypes, deviations=t.deviations,
            clauses=[c for c in CLAUSES if c != "random"],
        )  # fmt: skip
    conforms, pinned = PINNED[name]
    got = {c: r.status for c, r in prof.clauses.items()}
    assert got == pinned, prof.table()
    assert prof.conforms == conforms, prof.table()
    for clause, detected in DETECTED.get(name, {}).items():
        assert prof.clauses[clause].detected == detected, (clause, prof.clauses[clause])
    for r in prof.clauses.values():
        if r.status == "deviates" and r.example:
            exec(r.example, {})  # every example runs
