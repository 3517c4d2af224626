"""Describe a third-party implementation once, and check it: :class:`Target` and :func:`load_adapter`.

A target is named by import path and kind:

==========  =====================================================  ========================
kind        what ``path`` names                                    state it can load
==========  =====================================================  ========================
torch       a ``torch.optim.Optimizer`` subclass                   via ``load_state_dict``
optax       a factory returning an ``optax.GradientTransformation``  by field name in the state tree
keras       a ``keras.optimizers.Optimizer`` subclass              by slot-variable attribute
numpy       ``step(params, grads, state, **hparams) -> (params, state)``  a dict
==========  =====================================================  ========================

The user says which spec rule it implements, how its hyperparameter names map to
the spec's (``hparams``), fixed constructor arguments (``fixed``), which options it
implements (``options``: ``caution`` as ``{normalize, floor}`` or false,
``eps_placement``, ``decay_masked``, ...; every spec option not mapped and not listed
is pinned to the spec default), and how its state maps to the spec's (``state``:
``m``, ``v``, ``v_max``, ``step``). Without a state mapping the target is checked from
fresh states, parameters only, and the report says so.

A target can be written in TOML::

    [target]
    name = "my-adamw"
    kind = "torch"
    path = "my_port:CautiousAdamW"
    rule = "adamw"
    dtypes = ["float32", "float64"]
    [target.hparams]      # spec name = the target's name
    lr = "lr"
    betas = "betas"
    eps = "eps"
    weight_decay = "weight_decay"
    [target.fixed]        # passed to the constructor as is
    caution = true
    [target.options]      # what it implements
    caution = { normalize = "mean_clamp", floor = 1e-3 }
    [target.state]        # spec field = the target's state name ("group:step": a counter in the param group)
    m = "exp_avg"
    v = "exp_avg_sq"
    step = "step"
    [target.deviations]   # clause = the deviation it declares (cautious.conformance.profile.CLAUSES)
    nan = "NaN entries are masked (product mask)"

Further keys: ``pin``, ``allow_nan``, ``max_examples``, ``seed``, ``setup``, ``load_state``,
``dump_state``, ``requires``, ``source`` (docs/verify.md lists them all).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
from collections.abc import Mapping
from typing import Any

from cautious import spec
from cautious.conformance.case import Case

__all__ = ["Target", "load_adapter", "resolve", "DEFAULT_STATE_NAMES"]

KINDS = ("torch", "optax", "keras", "numpy")

#: Conventional state names per kind, used when a target gives no ``state`` table.
DEFAULT_STATE_NAMES: dict[str, dict[str, dict[str, str]]] = {
    "torch": {
        "adam": {"m": "exp_avg", "v": "exp_avg_sq", "v_max": "max_exp_avg_sq", "step": "step"},
        "lion": {"m": "exp_avg"},
        "sgd": {"m": "momentum_buffer"},
    },
    "optax": {
        "adam": {"m": "mu", "v": "nu", "v_max": "nu_max", "step": "count"},
        "lion": {"m": "mu", "step": "count"},
        "sgd": {"m": "trace"},
    },
}


@dataclasses.dataclass
class Target:
    """A third-party implementation to verify (see the module docstring)."""

    kind: str
    path: str
    rule: str
    name: str = ""
    hparams: Mapping[str, str] = dataclasses.field(default_factory=dict)
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    state: Mapping[str, str] | None = None
    dtypes: tuple[str, ...] = ("float32", "float64")
    sys_path: tuple[str, ...] = ()
    #: clause -> the deviation the port declares (``nan = "NaN handled as torch.sign"``)
    deviations: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: spec hyperparameters pinned for this run (``pin = {lr = 0.1}``)
    pin: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    allow_nan: bool = True  # False: no NaN/inf inputs anywhere (the nan clause is untested)
    max_examples: int | None = None  # the random clause's budget (the CLI's --max-examples otherwise)
    seed: int | None = None
    setup: str = ""  # "module:function" called before the target is imported
    load_state: str = ""  # "module:function(optimizer, spec_state)" loading state itself (torch)
    dump_state: str = ""  # "module:function(optimizer) -> {'step': int, 'leaves': [{field: array}]}" (torch)
    requires: tuple[str, ...] = ()  # distributions that must be installed (--known skips the target otherwise)
    source: str = ""  # where the port comes from (a URL or a package==version)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.rule not in spec.RULES:
            raise ValueError(f"rule must be one of {', '.join(spec.RULES)}, got {self.rule!r}")
        if ":" not in self.path:
            raise ValueError(f"path must look like 'package.module:Name', got {self.path!r}")
        self.name = self.name or self.path
        self.dtypes = tuple(self.dtypes)
        self.requires = tuple(self.requires)
        from cautious.conformance.profile import CLAUSES

        bad = set(self.deviations) - set(CLAUSES)
        if bad:
            raise ValueError(f"deviations names unknown clauses {sorted(bad)}; expected some of {', '.join(CLAUSES)}")
        unknown = set(self.hparams) - set(_spec_defaults(self.rule))
        if unknown:
            raise ValueError(f"hparams maps unknown spec names {sorted(unknown)} for rule {self.rule!r}")

    @classmethod
    def from_toml(cls, path: str) -> list[Target]:
        """Targets from a TOML file: one ``[target]`` table or an array ``[[target]]``."""
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        with open(path, "rb") as f:
            data = tomllib.load(f)
        raw = data.get("target")
        if raw is None:
            raise ValueError(f"{path}: no [target] table")
        tables = raw if isinstance(raw, list) else [raw]
        here = os.path.dirname(os.path.abspath(path))
        return [
            cls(
                **{
                    **t,
                    "dtypes": tuple(t.get("dtypes", ("float32", "float64"))),
                    # sys_path entries are relative to the TOML file
                    "sys_path": tuple(os.path.join(here, os.path.expanduser(p)) for p in t.get("sys_path", ())),
                    "requires": tuple(t.get("requires", ())),
                }
            )
            for t in tables
        ]

    def state_names(self) -> dict[str, str]:
        if self.state is not None:
            return dict(self.state)
        rule = "adam" if self.rule == "adamw" else self.rule
        return dict(DEFAULT_STATE_NAMES.get(self.kind, {}).get(rule, {}))

    def pinned(self) -> dict[str, Any]:
        """Spec hyperparameters the target does not take: fixed to its declared options or spec defaults."""
        out: dict[str, Any] = {}
        defaults = _spec_defaults(self.rule)
        for key, default in defaults.items():
            if key in self.hparams:
                continue
            if key == "caution":
                opt = self.options.get("caution", True)
                out[key] = spec.Caution(**opt) if isinstance(opt, Mapping) else spec.as_caution(opt) or False
            elif key in self.options:
                out[key] = self.options[key]
            else:
                out[key] = default
        if self.options.get("decay_masked"):
            out["weight_decay"] = 0.0  # masked decay is not the spec's: only decay-free cases apply
        for key, value in self.pin.items():
            out[key] = _spec_value(key, value)
        return out

    def declared(self) -> dict[str, Any]:
        """What the target claims, for the report: its rule, options and pinned hyperparameters."""
        return {"rule": self.rule, "options": dict(self.options), "pin": dict(self.pin), "fixed": dict(self.fixed)}

    def notes(self) -> list[str]:
        out = []
        if self.options.get("decay_masked"):
            out.append("the target masks decoupled weight decay (not the spec's choice): checked with weight_decay=0")
        if not self.state_names():
            out.append("no state mapping: checked from fresh states, parameters only")
        return out


def _spec_value(key: str, value: Any) -> Any:
    """A TOML/JSON value as the spec takes it (betas as a tuple, caution as a Caution)."""
    if key == "betas":
        return tuple(value)
    if key == "caution":
        return spec.Caution(**value) if isinstance(value, Mapping) else spec.as_caution(value) or False
    return value


def _spec_defaults(rule: str) -> dict[str, Any]:
    sig = inspect.signature(getattr(spec, rule))
    return {k: p.default for k, p in sig.parameters.items()}


def resolve(path: str, sys_path: tuple[str, ...] = ()) -> Any:
    """Import ``'package.module:Name'`` (``sys_path`` entries are prepended first)."""
    for entry in reversed(sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    module, _, attr = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class TargetAdapterBase:
    """What every third-party adapter shares: pinning, support checks, constructor kwargs."""

    def __init__(self, target: Target) -> None:
        if target.setup:
            resolve(target.setup, target.sys_path)()
        self.target = target
        self.name = target.name
        self.fresh_only = not target.state_names()
        self._pinned = target.pinned()

    def fixed_hparams(self, rule: str) -> dict[str, Any]:
        return dict(self._pinned)

    def supports(self, case: Case) -> str | None:
        if case.rule != self.target.rule:
            return f"{self.name} implements {self.target.rule}, not {case.rule}"
        if case.dtype not in self.target.dtypes:
            return f"{self.name} is checked in {', '.join(self.target.dtypes)}"
        for key, value in self._pinned.items():
            if key in case.hparams and case.hparams[key] != value:
                return f"{self.name} does not take {key} (fixed to {value!r})"
        return None

    def kwargs(self, case: Case) -> dict[str, Any]:
        """Constructor arguments: ``fixed``, then every mapped hyperparameter (the spec default where
        the case leaves it unset, never the port's own default)."""
        out = dict(self.target.fixed)
        defaults = _spec_defaults(self.target.rule)
        for key, name in self.target.hparams.items():
            value = case.hparams.get(key, defaults.get(key))
            if key == "caution" and not isinstance(value, bool):
                value = value is not False and value is not None
            if value is not None:
                if isinstance(name, (list, tuple)):  # betas -> (b1, b2) as separate arguments
                    out.update(zip(name, value))
                else:
                    out[name] = value
        return out


def load_adapter(target: Target):
    """The adapter for ``target`` (imports its framework)."""
    module = importlib.import_module(f"cautious.conformance.targets._{target.kind}")
    return module.Adapter(target)
