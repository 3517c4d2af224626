"""`import cautious` (and the reference) imports NumPy and no framework."""

import json
import subprocess
import sys

FRAMEWORKS = ("torch", "jax", "jaxlib", "tensorflow", "keras", "triton", "optax", "hypothesis")


def _imported_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_cautious_imports_numpy_only():
    mods = _imported_after("import cautious; cautious.Caution()")
    assert "numpy" in mods
    leaked = {m for m in mods if m.split(".")[0] in FRAMEWORKS}
    assert not leaked, leaked


def test_reference_and_registry_import_no_framework():
    mods = _imported_after("import cautious.spec, cautious.backends as b; b.available(); b.load('numpy').adamw()")
    leaked = {m for m in mods if m.split(".")[0] in FRAMEWORKS}
    assert not leaked, leaked


def test_no_generic_top_level_packages_installed():
    # `spec`, `backends` or `conformance` must never be importable as top-level packages.
    code = "import importlib.util as u; print([n for n in ('spec','backends','conformance') if u.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd="/")
    assert out.stdout.strip() == "[]"
