"""Known public ports: TOML descriptions shipped with the package, and the hooks they need.

``cautious verify --known`` runs every description here whose port is installed
(``requires`` lists its distributions) or, for the paper's own files (not on PyPI),
whose files are found on ``--path``. Each description was written from the port's
source; docs/ports.md lists the profiles (regenerate it with ``scripts/known_ports.py``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from importlib import metadata, resources

__all__ = ["known_targets", "installed_known", "timm_optim", "c_optim", "heavyball_eager"]


def known_targets() -> list:
    """Every known port's :class:`~cautious.conformance.targets.Target`, in file-name order."""
    from cautious.conformance.targets import Target

    out = []
    for entry in sorted(resources.files(__name__).iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            with resources.as_file(entry) as path:
                out += Target.from_toml(str(path))
    return out


def installed_known(paths: tuple[str, ...] = ()) -> tuple[list, list]:
    """``(found, skipped)``: known targets whose port is available, and ``(target, reason)`` for the rest.

    ``paths`` are directories searched for ports given by a local path (the paper's files).
    """
    found, skipped = [], []
    for t in known_targets():
        missing = [d for d in t.requires if not _installed(d)]
        if missing:
            skipped.append((t, f"{', '.join(missing)} not installed"))
            continue
        if not t.requires:  # a port by local path: its module file must be on one of `paths`
            module = t.path.split(":")[0].split(".")[-1]
            where = [p for p in paths if os.path.exists(os.path.join(p, module + ".py"))]
            if not where:
                skipped.append((t, f"{module}.py not found on --path"))
                continue
            t.sys_path = tuple(where) + tuple(t.sys_path)
        found.append(t)
    return found, skipped


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def _bare_package(name: str, path: str) -> None:
    """Register package ``name`` at ``path`` without running its ``__init__``."""
    if name in sys.modules:
        return
    mod = types.ModuleType(name)
    mod.__path__ = [path]
    mod.__package__ = name
    sys.modules[name] = mod


def timm_optim() -> None:
    """Make ``timm.optim.<module>`` importable without timm's top-level import (which needs torchvision)."""
    if "timm.optim" in sys.modules:
        return
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("timm is not installed")
    root = list(spec.submodule_search_locations)[0]
    _bare_package("timm", root)
    _bare_package("timm.optim", os.path.join(root, "optim"))


def c_optim() -> None:
    """The paper's repository (kyleliang919/C-Optim) as package ``c_optim``: its files import ``.opt_utils``.

    The directory is the first ``sys.path`` entry holding ``c_adamw.py`` (``cautious verify --known --path DIR``).
    """
    for entry in sys.path:
        if entry and os.path.exists(os.path.join(entry, "c_adamw.py")):
            _bare_package("c_optim", entry)
            return
    raise ImportError("c_adamw.py (kyleliang919/C-Optim) not found on sys.path: pass --path DIR")


def heavyball_eager() -> None:
    """Run heavyball's kernels eagerly (its default compiles every kernel with torch.compile)."""
    import heavyball.utils

    heavyball.utils.compile_mode = None
    heavyball.utils.compile_mode_recommended_to_none = None
