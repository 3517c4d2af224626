"""`cautious compare`, run as a user would: the CLI in a subprocess, in a temporary directory.

Frameworks come from ``cautious.backends.available()`` so the tests run wherever NumPy does;
every installed framework is included (about 25 s for all four at 30 steps on 2 cores).
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from cautious.backends import available
from cautious.compare import make_data

CLI = [sys.executable, "-m", "cautious", "compare"]
FRAMEWORKS = [fw for fw in ("numpy", "torch", "jax", "tensorflow") if fw in available()]
STEPS, SAMPLES, FEATURES, WIDTH = 30, 256, 8, 32
OPTIMIZERS = ("adamw", "adamw+caution", "lion", "lion+caution")


def _run(args, cwd, timeout=300):
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    args = ["--steps", str(STEPS), "--samples", str(SAMPLES), "--features", str(FEATURES),
            "--width", str(WIDTH), "--frameworks", *FRAMEWORKS, "--out", "out"]  # fmt: skip
    proc = _run(args, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / "out", proc


def test_writes_table_json_and_png(report):
    out, proc = report
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = (out / "compare.md").read_text()
    data = json.loads((out / "compare.json").read_text())
    assert sorted(data["curves"]) == sorted(FRAMEWORKS)
    assert len(data["rows"]) == 4 * len(FRAMEWORKS)
    for fw in FRAMEWORKS:
        for label in ("| AdamW |", "| cautious AdamW |", "| Lion |", "| cautious Lion |"):
            assert any(line.startswith(f"| {fw} ") and label in line for line in md.splitlines()), (fw, label)
    # progress lines were streamed from every worker
    for fw in FRAMEWORKS:
        assert f"[{fw}] lion+caution" in proc.stdout and f"{STEPS:>5}/{STEPS}" in proc.stdout


def test_every_framework_starts_from_the_same_loss(report):
    out, _ = report
    data = json.loads((out / "compare.json").read_text())
    d = make_data(0, SAMPLES, FEATURES, WIDTH, STEPS)
    h = np.tanh(np.tanh(d["X"] @ d["w0"] + d["w1"]) @ d["w2"] + d["w3"])
    expected = float(np.mean((h @ d["w4"] + d["w5"] - d["y"]) ** 2))
    for fw in FRAMEWORKS:
        for name in OPTIMIZERS:
            losses = data["curves"][fw]["optimizers"][name]["losses"]
            assert len(losses) == STEPS + 1
            assert losses[0] == pytest.approx(expected, rel=1e-12), (fw, name)


def test_float64_differences_are_within_the_rounding_bound(report):
    out, _ = report
    data = json.loads((out / "compare.json").read_text())
    eps = 2.0**-53
    R = max(SAMPLES, FEATURES, WIDTH)  # the longest sum in a full-batch step
    ref = data["curves"]["numpy"]["optimizers"]
    for fw in FRAMEWORKS:
        if fw == "numpy":
            continue
        for name in OPTIMIZERS:
            a = np.array(data["curves"][fw]["optimizers"][name]["losses"])
            b = np.array(ref[name]["losses"])
            bound = 16 * R * eps * np.maximum(np.arange(STEPS + 1), 1)
            assert np.all(np.abs(a - b) / b <= bound), (fw, name, np.max(np.abs(a - b) / b))
    rows = [r for r in data["rows"] if r["framework"] != "numpy"]
    assert all(r["within_bound"] and r["param_diff_rel"] <= r["bound_final"] for r in rows)


def test_losses_decrease_and_caution_changes_the_curve(report):
    out, _ = report
    data = json.loads((out / "compare.json").read_text())
    for fw in FRAMEWORKS:
        opts = data["curves"][fw]["optimizers"]
        for name in OPTIMIZERS:
            losses = opts[name]["losses"]
            assert losses[-1] < 0.7 * losses[0], (fw, name, losses[0], losses[-1])
        for rule in (
            "adamw",
            "lion",
        ):  # caution reached the optimizer: the curves differ well beyond rounding
            a, b = np.array(opts[rule]["losses"]), np.array(opts[rule + "+caution"]["losses"])
            assert np.max(np.abs(a - b) / b) > 1e-4, (fw, rule)


def test_minibatch_float32_numpy_only(tmp_path):
    proc = _run(["--steps", "12", "--samples", "64", "--width", "16", "--batch-size", "16",
                 "--dtype", "float32", "--frameworks", "numpy", "--target", "0.9", "--out", "o"],
                cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "o" / "compare.json").read_text())
    assert data["meta"]["dtype"] == "float32" and data["meta"]["longest_sum"] == 16
    losses = data["curves"]["numpy"]["optimizers"]["adamw"]["losses"]
    assert len(losses) == 13 and losses[-1] < losses[0]
    row = next(r for r in data["rows"] if r["optimizer"] == "adamw")
    t = row["steps_to_target"]
    assert t is None or (losses[t] <= 0.9 * losses[0] and all(v > 0.9 * losses[0] for v in losses[:t]))


def test_batch_order_is_fixed_by_the_seed_and_covers_each_epoch():
    a = make_data(3, samples=40, steps=7, batch_size=16)["batches"]
    b = make_data(3, samples=40, steps=7, batch_size=16)["batches"]
    assert a.shape == (7, 16) and np.array_equal(a, b)
    epoch = np.concatenate(a[:2])  # 2 batches per epoch of 40 (the last 8 rows of each permutation are dropped)
    assert len(set(epoch.tolist())) == 32
    with pytest.raises(ValueError, match="batch_size"):
        make_data(0, samples=10, batch_size=11)


def test_bad_arguments_are_clear(tmp_path):
    proc = _run(["--frameworks", "mxnet"], cwd=tmp_path)
    assert proc.returncode == 2 and "invalid choice: 'mxnet'" in proc.stderr
    proc = _run(["--target", "1.5", "--frameworks", "numpy"], cwd=tmp_path)
    assert proc.returncode != 0 and "--target must be in (0, 1)" in proc.stderr
