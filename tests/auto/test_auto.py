"""`cautious.auto` and `cautious.backends.available()`: chosen from outside, no framework imported unasked."""

import json
import subprocess
import sys

import pytest

FRAMEWORKS = ("torch", "jax", "tensorflow", "keras", "optax", "triton")


def _run(code: str, **env) -> subprocess.CompletedProcess:
    import os

    full_env = {k: v for k, v in os.environ.items() if k != "CAUTIOUS_BACKEND"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def _modules_after(code: str, **env) -> set[str]:
    out = _run(code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))", **env)
    assert out.returncode == 0, out.stderr
    return {m.split(".")[0] for m in json.loads(out.stdout.strip().splitlines()[-1])}


def test_import_auto_imports_no_framework():
    assert not _modules_after("import cautious.auto, cautious") & set(FRAMEWORKS)
    assert not _modules_after("import cautious.auto", CAUTIOUS_BACKEND="torch") & set(FRAMEWORKS)


def test_numpy_backend_resolves_without_frameworks():
    mods = _modules_after(
        "from cautious.auto import AdamW, Lion, SGD, Adam, BACKEND\n"
        "from cautious import spec\n"
        "assert BACKEND == 'numpy' and AdamW is spec.adamw and SGD is spec.sgd and Lion is spec.lion",
        CAUTIOUS_BACKEND="numpy",
    )
    assert not mods & set(FRAMEWORKS)


@pytest.mark.parametrize(
    ("backend", "expected", "imported", "not_imported"),
    [
        ("torch", "cautious.backends.torch.optim.AdamW", "torch", ("jax", "tensorflow")),
        ("jax", "cautious.backends.jax", "jax", ("torch", "tensorflow")),
    ],
)
def test_named_backend_imports_only_itself(backend, expected, imported, not_imported):
    from cautious.backends import available

    if backend not in available():
        pytest.skip(f"{backend} is not installed in this environment")
    code = (
        "from cautious.auto import AdamW\n"
        "name = getattr(AdamW, '__module__', '') + '.' + getattr(AdamW, '__qualname__', '')\n"
        f"assert name.startswith({expected!r}) or AdamW.__module__.startswith({expected!r}), name"
    )
    mods = _modules_after(code, CAUTIOUS_BACKEND=backend)
    assert imported in mods and not mods & set(not_imported)


def test_unknown_and_missing_backends_are_clear_errors():
    out = _run("from cautious.auto import AdamW", CAUTIOUS_BACKEND="mxnet")
    assert out.returncode != 0
    assert "CAUTIOUS_BACKEND must be one of 'torch', 'jax', 'tensorflow', 'numpy', got 'mxnet'" in out.stderr
    code = (
        "import cautious.backends as b\n"
        "b.available = lambda: {'numpy': '2'}\n"
        "import cautious.auto as a\n"
        "a.available = b.available\n"
        "try:\n    a.AdamW\nexcept b.MissingBackendError as e:\n    print(e)\n"
    )
    out = _run(code, CAUTIOUS_BACKEND="torch")
    assert "pip install 'cautious[torch]'" in out.stdout


def test_available_lists_versions_and_load_errors():
    from cautious import backends

    avail = backends.available()
    assert list(avail) == [b for b in backends.ORDER if b in avail] and "numpy" in avail
    assert all(isinstance(v, str) and v for v in avail.values())
    with pytest.raises(ValueError, match="unknown backend 'mxnet'"):
        backends.load("mxnet")


def test_default_is_first_installed():
    from cautious import backends

    out = _run("import cautious.auto as a; print(a.BACKEND)")
    assert out.stdout.strip() == next(iter(backends.available()))
