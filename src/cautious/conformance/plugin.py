"""pytest plugin (entry point ``cautious``): run the conformance suite from a port's own repository.

Loaded in every pytest run of an environment that has ``cautious`` installed, so it
imports nothing but the standard library until used.

Two ways to use it:

* an option, no code: ``pytest --pyargs cautious.conformance.test_targets
  --cautious-config my_port.toml`` (or ``--cautious-target pkg.mod:Class
  --cautious-kind torch --cautious-rule adamw``), one test per target;
* a fixture, in any test: ``def test_port(cautious_conformance):
  cautious_conformance(MyAdapter())`` (an :class:`~cautious.conformance.Adapter`
  or a :class:`~cautious.conformance.targets.Target`).

``--cautious-max-examples`` sets the examples per check; the Hypothesis profile is
``ci`` when ``CI`` is set, else ``dev``.
"""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("cautious", "cautious optimizer conformance")
    group.addoption("--cautious-config", action="append", default=[], help="TOML file describing targets")
    group.addoption("--cautious-target", help="an implementation to check: 'package.module:Name'")
    group.addoption("--cautious-kind", help="torch, optax, keras or numpy (with --cautious-target)")
    group.addoption("--cautious-rule", help="the spec rule it implements (with --cautious-target)")
    group.addoption(
        "--cautious-hparam",
        action="append",
        default=[],
        metavar="SPEC=NAME",
        help="hyperparameter name mapping",
    )
    group.addoption("--cautious-max-examples", type=int, default=None, help="examples per check")


def _targets(config: pytest.Config) -> list:
    from cautious.conformance.targets import Target

    out = []
    for path in config.getoption("cautious_config"):
        out += Target.from_toml(path)
    path = config.getoption("cautious_target")
    if path:
        kind, rule = config.getoption("cautious_kind"), config.getoption("cautious_rule")
        if not (kind and rule):
            raise pytest.UsageError("--cautious-target needs --cautious-kind and --cautious-rule")
        hparams = dict(item.split("=", 1) for item in config.getoption("cautious_hparam"))
        out.append(Target(kind=kind, path=path, rule=rule, hparams=hparams, sys_path=(os.getcwd(),)))
    return out


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "cautious_target" in metafunc.fixturenames:
        targets = _targets(metafunc.config)
        metafunc.parametrize("cautious_target", targets, ids=[t.name for t in targets])


@pytest.fixture
def cautious_conformance(request: pytest.FixtureRequest):
    """A function ``check(adapter_or_target, **run_conformance_kwargs) -> ConformanceResult``."""
    from hypothesis import settings

    from cautious.conformance import register_profiles, run_conformance
    from cautious.conformance.targets import Target, load_adapter

    register_profiles()
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))
    max_examples = request.config.getoption("cautious_max_examples")

    def check(impl, **kwargs):
        adapter = load_adapter(impl) if isinstance(impl, Target) else impl
        if isinstance(impl, Target):
            kwargs.setdefault("rules", (impl.rule,))
            kwargs.setdefault("dtypes", impl.dtypes)
        if max_examples is not None:
            kwargs.setdefault("max_examples", max_examples)
        return run_conformance(adapter, **kwargs)

    return check
