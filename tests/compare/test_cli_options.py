"""CLI hygiene (issue 12): --version, rejected demo steps, help for every compare option, one-line errors."""

import argparse
import json
import subprocess
import sys

import pytest

import cautious
from cautious import _demo
from cautious.compare import _spawn, build_parser

CLI = [sys.executable, "-m", "cautious"]


def _run(*args, cwd=None):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_version():
    proc = _run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"cautious {cautious.__version__}"


@pytest.mark.parametrize("steps", ["-1", "0", "x"])
def test_demo_rejects_non_positive_steps(steps):
    proc = _run("demo", "--steps", steps)
    assert proc.returncode == 2
    assert "argument --steps: must be an integer >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_run_rejects_non_positive_steps():
    with pytest.raises(ValueError, match=r"^steps must be an integer >= 1, got -1$"):
        _demo.run(-1)


def test_every_compare_option_has_help_text():
    parser = build_parser(argparse.ArgumentParser())
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 13
    for action in options:
        assert action.help, f"{action.option_strings} has no help text"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--target", "2"], "--target must be in (0, 1): a fraction of the initial loss, got 2.0"),
        (["--width", "0"], "--width must be >= 1, got 0"),
        (["--samples", "-5"], "--samples must be >= 1, got -5"),
        (["--batch-size", "600"], "--batch-size must be in [0, --samples=512], got 600"),
        (["--adamw-lr", "nan"], "--adamw-lr must be a finite number > 0, got nan"),
    ],
)
def test_bad_compare_options_give_one_line(args, message, tmp_path):
    proc = _run("compare", "--frameworks", "numpy", *args, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == message
    assert not (tmp_path / "compare-out").exists()


def test_a_failing_worker_reports_one_line_not_a_traceback(tmp_path):
    job = {"framework": "nosuch", "data": str(tmp_path / "missing.npz"), "optimizers": {}}
    res, why = _spawn("numpy", job, str(tmp_path))
    assert res is None
    assert why.startswith("FileNotFoundError: ") and "\n" not in why
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cautious._compare_workers",
            "--worker",
            str(tmp_path / "numpy.job.json"),
            str(tmp_path / "o.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert json.loads((tmp_path / "o.json").read_text())["error"] == why
