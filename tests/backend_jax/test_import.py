"""``cautious.jax``: the public module, and its error without JAX."""

import subprocess
import sys

import cautious.backends.jax as backend
import cautious.jax as cj


def test_public_names_match_backend():
    assert set(cj.__all__) == set(backend.__all__)
    for name in ("cautious", "whole_update", "adamw", "adam", "lion", "sgd", "Caution"):
        assert getattr(cj, name) is getattr(backend, name)


def test_import_error_without_jax():
    code = (
        "import sys; sys.modules['jax'] = None\n"
        "try:\n"
        "    import cautious.jax\n"
        "except ImportError as e:\n"
        "    print('MSG', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "MSG cautious.jax needs JAX and optax: pip install 'cautious[jax]'" in out.stdout, out.stderr


def test_import_cautious_does_not_import_jax():
    code = "import sys, cautious, cautious.spec; print('jax' in sys.modules, 'optax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False False", out.stderr
