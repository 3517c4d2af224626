"""Every Python code block in README.md and docs/ runs, each in its own process.

Shell blocks are the commands CI itself runs (scripts/test.sh) or are run by the
CLI tests (tests/verify, tests/compare); TOML blocks are checked against the
files they quote.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.S | re.M)


def _blocks(lang: str):
    for page in PAGES:
        for i, m in enumerate(b for b in FENCE.finditer(page.read_text()) if b.group(1) == lang):
            yield pytest.param(page, m.group(2), id=f"{page.relative_to(ROOT)}#{i}")


def _framework(code: str) -> str | None:
    for fw, pat in (("tensorflow", r"\b(keras|tensorflow)\b"), ("jax", r"\b(jax|optax)\b"), ("torch", r"\btorch\b")):
        if re.search(pat, code):
            return fw
    return None


@pytest.mark.parametrize(("page", "code"), list(_blocks("python")))
def test_python_block_runs(page, code, tmp_path):
    from cautious.backends import available

    fw = _framework(code)
    if fw is not None and fw not in available():
        pytest.skip(f"needs {fw}, which is not installed")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "docs" / "examples"), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, f"{page.name} block failed:\n{code}\n{out.stderr[-3000:]}"


@pytest.mark.parametrize(("page", "code"), list(_blocks("toml")))
def test_toml_blocks_match_shipped_examples(page, code):
    import tomllib

    data = tomllib.loads(code)
    shipped = tomllib.loads((ROOT / "docs" / "examples" / "my_port.toml").read_text())
    assert data["target"][0] == shipped["target"][0]
