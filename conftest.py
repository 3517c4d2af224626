"""Root conftest: refuse a pytest run that would put TensorFlow in one process with torch/triton/JAX.

Importing TensorFlow before triton or ``torch._inductor`` aborts the process, so ``tests/backend_tf``
runs in a process of its own. A bare ``pytest`` (or any selection mixing ``tests/backend_tf`` with
another group) stops with a one-line message naming ``scripts/test.sh``, which runs each group in
its own process; ``pytest tests/<group>`` runs one group.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).parent / "tests"
ALONE = "backend_tf"


def _groups(config: pytest.Config) -> set[str]:
    """The test groups (``tests/<group>``) the command line selects."""
    args = config.args or [str(Path(config.rootpath) / p) for p in config.getini("testpaths")]
    groups: set[str] = set()
    everything = {p.name for p in TESTS.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    for arg in args:
        path = Path(config.invocation_params.dir, arg.split("::")[0]).resolve()
        if path == TESTS or TESTS.is_relative_to(path):
            groups |= everything
        elif path.is_relative_to(TESTS):
            groups.add(path.relative_to(TESTS).parts[0])
    return groups


def pytest_collection(session: pytest.Session) -> None:
    groups = _groups(session.config)
    if ALONE in groups and len(groups - {ALONE} - {"conftest.py"}) > 0:
        pytest.exit(
            "tests/backend_tf must run in its own process (TensorFlow aborts next to torch/triton/JAX): "
            "run `bash scripts/test.sh` for everything, or `pytest tests/<group>` for one group",
            returncode=4,
        )
