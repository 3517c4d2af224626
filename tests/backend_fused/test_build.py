"""The native CPU kernel's build: its cost is reported once, cached, and can be prebuilt."""

import warnings

import numpy as np
import pytest
import torch

from cautious.__main__ import main
from cautious.backends.torch.fused import cpu


def test_first_build_reports_seconds_and_cache_dir_then_is_cached(tmp_path, monkeypatch):
    if cpu._compiler() is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("CAUTIOUS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu, "_libs", {})
    with pytest.warns(
        UserWarning, match=r"compiled the native fused CPU kernel \(float64\) once in [0-9.]+ s; cached in "
    ):
        assert cpu.native_available(torch.float64)
    assert any(p.suffix == ".so" for p in (tmp_path / "fused_cpu").iterdir())
    monkeypatch.setattr(cpu, "_libs", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # found in the cache: no compile, no warning
        assert cpu.native_available(torch.float64)


@pytest.mark.parametrize("missing", [None, (3, 3)])
def test_cli_build_prebuilds_every_pair(missing, monkeypatch, capsys):
    built = []

    def fake_native(pc, sc):
        built.append((pc, sc))
        return None if (pc, sc) == missing else object()

    monkeypatch.setattr(cpu, "_native", fake_native)
    assert main(["build"]) == (0 if missing is None else 1)
    out = capsys.readouterr().out
    assert sorted(built) == sorted(cpu.NATIVE_PAIRS)
    assert "float32: native" in out and "bfloat16 with float32 state: native" in out
    assert ("float16: not built" in out) == (missing is not None)


def test_native_step_increment_is_torchs(monkeypatch):
    if not cpu.native_available(torch.float32):
        pytest.skip("no C++ compiler")
    for dtype in (torch.float32, torch.float64):
        ours = [torch.tensor(v, dtype=dtype) for v in (0.0, 7.0, 2.0**24, 1e300 if dtype == torch.float64 else 3e38)]
        theirs = [t.clone() for t in ours]
        values = cpu.increment_steps_(ours)
        for t in theirs:
            t += 1
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b)
        np.testing.assert_array_equal(values, [t.item() for t in theirs])
    assert cpu.increment_steps_([torch.tensor(1.0), torch.tensor(1.0, dtype=torch.float64)]) is None  # mixed
    assert cpu.increment_steps_([torch.zeros(2)]) is None  # not a scalar
