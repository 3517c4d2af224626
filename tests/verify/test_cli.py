"""`cautious verify` and the pytest plugin, run as a user would: subprocesses, other directories."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from cautious.conformance.profile import CLAUSES

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
CLI = [sys.executable, "-m", "cautious"]


def _run(args, cwd, timeout=600):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _snippets(stdout: str) -> list[str]:
    return re.findall(r"```python\n(.*?)\n```", stdout, flags=re.S)


def test_verify_config_passes_and_writes_json(tmp_path):
    out = _run([*CLI, "verify", "--config", str(EXAMPLES / "my_port.toml"), "--max-examples", "5",
                "--json", str(tmp_path / "r.json")], cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    targets = report["targets"]
    assert {t["rules"][0] for t in targets} == {"adamw", "lion", "sgd"}
    for t in targets:
        assert t["conforms"] is True and t["declared"]["rule"] == t["rules"][0]
        assert set(t["profile"]) == set(CLAUSES)
        assert {r["status"] for r in t["profile"].values()} <= {"matches", "untested"}
        assert t["profile"]["mask_boundary"]["status"] == "matches"
        assert t["profile"]["random"]["status"] == "matches"
    assert "3 of 3 conform" in out.stdout


def test_verify_reports_a_mutant_with_runnable_examples(tmp_path):
    out = _run([*CLI, "verify", "--target", "my_port:CautiousAdamW_masked_decay", "--kind", "torch",
                "--rule", "adamw", "--path", str(EXAMPLES), "--hparam", "lr=lr", "--hparam", "betas=betas",
                "--hparam", "eps=eps", "--hparam", "weight_decay=weight_decay", "--max-examples", "20",
                "--dtypes", "float64", "--json", str(tmp_path / "r.json")], cwd=tmp_path)  # fmt: skip
    assert out.returncode == 1
    assert "=== my_port:CautiousAdamW_masked_decay: DOES NOT CONFORM" in out.stdout
    assert "--- weight_decay deviates" in out.stdout
    prof = json.loads((tmp_path / "r.json").read_text())["targets"][0]
    assert prof["conforms"] is False and prof["profile"]["weight_decay"]["status"] == "deviates"
    assert prof["profile"]["weight_decay"]["detected"] == ["masked"]
    assert prof["profile"]["mask_boundary"]["status"] == "matches"  # the other clauses are judged on their own
    snippets = _snippets(out.stdout)
    assert snippets
    for snippet in snippets:  # every printed example runs
        exec(snippet, {})


def test_declared_deviation_makes_a_port_conform_and_no_nan(tmp_path):
    base = [*CLI, "verify", "--target", "my_port:CautiousAdamW_nan_masked", "--kind", "torch", "--rule", "adamw",
            "--path", str(EXAMPLES), "--hparam", "lr=lr", "--hparam", "betas=betas", "--hparam", "eps=eps",
            "--hparam", "weight_decay=weight_decay", "--max-examples", "5", "--dtypes", "float64"]  # fmt: skip
    bad = _run([*base, "--json", str(tmp_path / "a.json")], cwd=tmp_path)
    assert bad.returncode == 1 and "--- nan deviates" in bad.stdout
    for snippet in _snippets(bad.stdout):
        exec(snippet, {})  # NaN is printed as float('nan'): the snippet runs
    assert "float('nan')" in bad.stdout
    ok = _run([*base, "--deviation", "nan=NaN masked like a product mask", "--json", str(tmp_path / "b.json")],
              cwd=tmp_path)  # fmt: skip
    assert ok.returncode == 0, ok.stdout[-3000:]
    prof = json.loads((tmp_path / "b.json").read_text())["targets"][0]
    assert prof["conforms"] and prof["declared"]["deviations"] == {"nan": "NaN masked like a product mask"}
    off = _run([*base, "--no-nan", "--json", str(tmp_path / "c.json")], cwd=tmp_path)
    assert off.returncode == 0, off.stdout[-3000:]
    prof = json.loads((tmp_path / "c.json").read_text())["targets"][0]
    assert prof["profile"]["nan"]["status"] == "untested"


def test_port_exception_is_reported_with_type_message_and_frame(tmp_path):
    out = _run([*CLI, "verify", "--target", "my_port:CautiousAdamW_group_keys_required", "--kind", "torch",
                "--rule", "adamw", "--path", str(EXAMPLES), "--hparam", "lr=lr", "--hparam", "betas=betas",
                "--hparam", "eps=eps", "--hparam", "weight_decay=weight_decay", "--max-examples", "3",
                "--dtypes", "float64"], cwd=tmp_path)  # fmt: skip
    assert out.returncode == 1
    assert "--- resume_plain_checkpoint deviates: raised KeyError: 'caution'" in out.stdout
    assert 'my_port.py", line' in out.stdout  # the port's own frame


def test_help_names_the_toml_keys():
    out = _run([*CLI, "verify", "--help"], cwd=EXAMPLES)
    assert out.returncode == 0
    for key in ("[hparams]", "[state]", "[deviations]", "group:step", "allow_nan", "setup", "docs/verify.md"):
        assert key in out.stdout


def test_verify_our_numpy_backend_and_bad_arguments(tmp_path):
    out = _run([*CLI, "verify", "--backend", "numpy", "--max-examples", "3", "--rules", "lion"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "numpy/reference" in out.stdout and "11 passed, 0 failed" in out.stdout  # 5 options x 2 dtypes + wrapper
    bad = _run([*CLI, "verify", "--backend", "mxnet"], cwd=tmp_path)
    assert bad.returncode != 0 and "unknown backend 'mxnet'" in bad.stderr
    bad = _run([*CLI, "verify", "--target", "x:Y"], cwd=tmp_path)
    assert bad.returncode != 0 and "--target needs --kind and --rule" in bad.stderr


def test_pytest_plugin_from_a_separate_directory(tmp_path):
    # The port lives outside our package; the port's own test run uses only the plugin's option.
    shutil.copy(EXAMPLES / "my_port.py", tmp_path)
    shutil.copy(EXAMPLES / "my_port.toml", tmp_path)
    base = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--pyargs",
        "cautious.conformance.test_targets",
    ]
    ok = _run([*base, "--cautious-config", "my_port.toml", "--cautious-max-examples", "10"], cwd=tmp_path)
    assert ok.returncode == 0 and "3 passed" in ok.stdout, ok.stdout + ok.stderr
    bad = _run([*base, "--cautious-target", "my_port:CautiousAdamW_f32_bias_correction", "--cautious-kind", "torch",
                "--cautious-rule", "adamw", "--cautious-hparam", "lr=lr", "--cautious-hparam", "betas=betas",
                "--cautious-hparam", "eps=eps"], cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 1 and "1 failed" in bad.stdout


def test_pytest_plugin_fixture_in_a_port_conftest(tmp_path):
    shutil.copy(EXAMPLES / "my_port.py", tmp_path)
    (tmp_path / "test_port.py").write_text(
        "from cautious.conformance.targets import Target\n"
        "def test_lion(cautious_conformance):\n"
        "    t = Target(kind='torch', path='my_port:CautiousLion', rule='lion',\n"
        "               hparams={'lr': 'lr', 'betas': 'betas', 'weight_decay': 'weight_decay'})\n"
        "    assert sum(cautious_conformance(t).examples.values()) == 10\n"
    )
    out = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--cautious-max-examples", "10",
                "--rootdir", str(tmp_path), str(tmp_path)], cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout + out.stderr


def test_verify_a_numpy_step_function(tmp_path):
    out = _run([*CLI, "verify", "--target", "numpy_port:cautious_lion_step", "--kind", "numpy", "--rule", "lion",
                "--path", str(EXAMPLES), "--hparam", "lr=lr", "--hparam", "betas=beta1,beta2",
                "--hparam", "weight_decay=weight_decay", "--state", "m=exp_avg", "--state", "step=steps",
                "--max-examples", "20", "--json", str(tmp_path / "r.json")], cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    prof = json.loads((tmp_path / "r.json").read_text())["targets"][0]
    assert prof["name"] == "numpy_port:cautious_lion_step" and prof["conforms"]


def test_verify_native_optax_and_keras_as_caution_off(tmp_path):
    # zero false verdicts on the natives, over 3 seeds; neither validates hyperparameters (declared)
    from cautious.backends import available

    have = available()
    no_errors = ["--deviation", "errors=does not validate hyperparameters"]
    if "jax" in have:
        for seed in ("0", "1", "2"):
            out = _run([*CLI, "verify", "--target", "optax:adamw", "--kind", "optax", "--rule", "adamw",
                        "--hparam", "lr=learning_rate", "--hparam", "betas=b1,b2", "--hparam", "eps=eps",
                        "--hparam", "weight_decay=weight_decay", "--option", "caution=false", *no_errors,
                        "--seed", seed], cwd=tmp_path)  # fmt: skip
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    if "tensorflow" in have:
        # Keras computes 1 - beta**t in the variable's dtype (float32): declared, and modelled by the checker
        keras = [*CLI, "verify", "--target", "keras.optimizers:AdamW", "--kind", "keras", "--rule", "adamw",
                 "--hparam", "lr=learning_rate", "--hparam", "betas=beta_1,beta_2", "--hparam", "eps=epsilon",
                 "--hparam", "weight_decay=weight_decay", "--option", "caution=false", *no_errors,
                 "--deviation", "bias_correction=float32 bias corrections", "--dtypes", "float32"]  # fmt: skip
        for seed in ("0", "1", "2"):
            out = _run([*keras, "--option", 'eps_placement="uncorrected"', "--seed", seed,
                        "--json", str(tmp_path / f"k{seed}.json")], cwd=tmp_path)  # fmt: skip
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        # Keras is NOT the spec's corrected eps placement: the profile detects which one it is
        prof = json.loads((tmp_path / "k0.json").read_text())["targets"][0]
        assert prof["profile"]["eps_placement"]["detected"] == ["uncorrected"]


def test_verify_our_torch_backend_on_nadam_and_rmsprop(tmp_path):
    # the new base rules through the CLI: every lane conforms; the fused lane runs NAdam and declines RMSprop
    out = _run(
        [*CLI, "verify", "--backend", "torch", "--max-examples", "3", "--rules", "nadam", "rmsprop",
         "--options", "off", "exact"], cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    for lane in ("single", "foreach", "fused"):
        assert f"=== torch/{lane}: conforms" in out.stdout
    assert "20 passed, 0 failed, 4 skipped" in out.stdout


def test_verify_includes_adafactor_on_our_torch_backend(tmp_path):
    """Adafactor is in `cautious verify`'s default rules; torch's single and foreach lanes pass, fused declines."""
    from cautious.conformance.verify import BACKEND_RULES

    assert "adafactor" in BACKEND_RULES
    out = _run(
        [*CLI, "verify", "--backend", "torch", "--max-examples", "3", "--rules", "adafactor", "--options", "off",
         "exact", "--json", str(tmp_path / "r.json")],
        cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    cells = json.loads((tmp_path / "r.json").read_text())["cells"]
    result = {(c["implementation"], c["option"], c["dtype"]): c["result"] for c in cells}
    assert {r for (lane, _, _), r in result.items() if lane != "torch/fused"} == {"pass"} and len(result) == 12
    assert {r for (lane, _, _), r in result.items() if lane == "torch/fused"} == {"skip"}
