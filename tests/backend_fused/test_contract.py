"""The fused contract is written once: the C++ kernel's enums and argument block mirror contract.py."""

from __future__ import annotations

import ctypes
import re

import pytest

from cautious.backends.torch.fused import contract, cpu


def _enum(src: str, name: str) -> dict[str, int]:
    body = re.search(rf"enum {name}\b[^{{]*\{{([^}}]*)\}}", src).group(1)
    out = {}
    for item in body.split(","):
        item = re.sub(r"//.*", "", item).strip()
        if item:
            key, value = (x.strip() for x in item.split("="))
            out[key] = int(value)
    return out


@pytest.mark.parametrize("name,py", [("Rule", contract.Rule), ("Norm", contract.Norm), ("Slot", contract.Slot)])
def test_cpp_enums_match_the_contract(name, py):
    cpp = _enum(cpu.source(), name)
    cpp.pop("N_SLOTS", None)
    assert cpp == {m.name: int(m) for m in py}


def test_cpp_argument_block_matches_cpuargs():
    body = re.search(r"struct CpuArgs \{([^}]*)\};", cpu.source()).group(1)
    fields = re.findall(r"(int64_t|uint64_t|double)\s+(\w+)(\[N_SLOTS\])?;", body)
    ctype = {"int64_t": ctypes.c_int64, "uint64_t": ctypes.c_uint64, "double": ctypes.c_double}
    got = [(n, ctype[t] * len(contract.Slot) if arr else ctype[t]) for t, n, arr in fields]
    want = [(n, t) for n, t in contract.CpuArgs._fields_]
    assert [n for n, _ in got] == [n for n, _ in want]
    for (n, a), (_, b) in zip(got, want, strict=True):
        assert ctypes.sizeof(a) == ctypes.sizeof(b), n


def test_norm_follows_caution_normalizations():
    from cautious._caution import NORMALIZATIONS

    assert [m.name.lower() for m in contract.Norm] == list(NORMALIZATIONS)


def test_kernel_source_ships_as_package_data():
    assert 'extern "C" int cautious_fused_run' in cpu.source()
