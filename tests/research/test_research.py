"""`cautious research`: its data, its reference model, and the `--quick` run as a user would start it.

The quick run (every installed framework, float64, about 30 s of CPU on 2 cores) is shared by the
tests of this module; the others use NumPy only.
"""

import json
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from cautious.backends import available
from cautious.compare import rounding_bound
from cautious.research import data as D
from cautious.research import model as M
from cautious.research.report import crossing, final_loss
from cautious.research.run import PRESETS, VARIANTS

FRAMEWORKS = [fw for fw in ("numpy", "torch", "jax", "tensorflow") if fw in available()]
QUICK = PRESETS["quick"]


def _fail_on_nan(x):
    raise ValueError(f"non-standard JSON constant {x}")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("research")
    cmd = [sys.executable, "-m", "cautious", "research", "--quick", "--out", "out"]
    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp / "out" / "research.json").read_text(), parse_constant=_fail_on_nan)
    return tmp / "out", data, proc


@pytest.fixture(scope="module")
def quick_inputs():
    """The corpus, model and batches the quick run used, rebuilt here independently of the run."""
    corpus = D.build_corpus(QUICK["corpus_bytes"])
    cfg = M.ModelConfig(corpus.meta["vocab"], QUICK["d_model"], QUICK["heads"], QUICK["layers"], QUICK["context"])
    return corpus, cfg


# -- data and the reference model ----------------------------------------------------------------------------


def test_corpus_is_deterministic_and_split_by_file():
    a, b = D.build_corpus(50_000, chunk=2048), D.build_corpus(50_000, chunk=2048)
    assert a.meta == b.meta and np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert a.meta["bytes"] == 50_000 == len(a.train) + len(a.val)
    assert 0 < len(a.val) < len(a.train)
    assert a.train.min() >= 0 and max(a.train.max(), a.val.max()) == a.meta["vocab"] - 1
    files = D.stdlib_files()
    assert files == sorted(files) and not any("site-packages" in f for f in files)
    # the validation text is the files at positions 0, val_every, ... and none of the others
    first_val = open(sysconfig.get_paths()["stdlib"] + "/" + files[0], "rb").read(2048)
    assert a.decode(a.val[: len(first_val)]).encode() == first_val
    assert a.decode(a.train[:200]) not in a.decode(a.val)


def test_batches_and_weights_are_a_function_of_the_seed():
    corpus = D.build_corpus(50_000)
    b0, b0_again, b1 = (D.make_batches(corpus.train, s, 5, 4, 8) for s in (0, 0, 1))
    assert b0.shape == (5, 4, 9) and b0.dtype == np.int32
    assert np.array_equal(b0, b0_again) and not np.array_equal(b0, b1)
    cfg = M.ModelConfig(corpus.meta["vocab"], 16, 2, 1, 8)
    w0, w0_again, w1 = D.init_params(cfg, 0), D.init_params(cfg, 0), D.init_params(cfg, 1)
    specs = M.param_specs(cfg)
    assert [w.shape for w in w0] == [s.shape for s in specs]
    assert all(np.array_equal(x, y) for x, y in zip(w0, w0_again))
    assert not np.array_equal(w0[0], w1[0])
    assert {s.group for s in specs} == set(M.GROUPS)
    for w, s in zip(w0, specs):
        if s.init == "one":
            assert np.all(w == 1)
        elif s.init == "zero":
            assert np.all(w == 0)


def test_reference_gradients_match_finite_differences():
    corpus = D.build_corpus(50_000)
    cfg = M.ModelConfig(corpus.meta["vocab"], 8, 2, 2, 6)
    rng = np.random.default_rng(0)
    params = [p + 0.3 * rng.standard_normal(p.shape) for p in D.init_params(cfg, 0)]
    tokens = D.make_batches(corpus.train, 0, 1, 3, 6)[0]
    loss, grads = M.loss_and_grads(params, tokens, cfg)
    assert loss == M.loss_only(params, tokens, cfg)
    present = set(tokens[:, :-1].ravel().tolist())
    absent = [i for i in range(cfg.vocab) if i not in present]
    assert np.all(grads[0][absent] == 0), "the untied embedding's gradient is exactly zero on absent tokens"
    h = 1e-6
    for i, (p, g) in enumerate(zip(params, grads)):
        for _ in range(3):
            idx = tuple(int(rng.integers(0, n)) for n in p.shape)
            if i == 0:
                idx = (int(tokens[0, 0]), idx[1])
            p[idx] += h
            up = M.loss_only(params, tokens, cfg)
            p[idx] -= 2 * h
            down = M.loss_only(params, tokens, cfg)
            p[idx] += h
            assert (up - down) / (2 * h) == pytest.approx(g[idx], abs=1e-8), (M.param_specs(cfg)[i].name, idx)


def test_crossing_interpolates_between_evaluations():
    steps, losses = np.array([0.0, 10, 20, 30]), np.array([4.0, 3.0, 2.0, 1.0])
    assert crossing(steps, losses, 2.5) == pytest.approx(15.0)
    assert crossing(steps, losses, 4.0) == 0.0
    assert crossing(steps, losses, 0.5) is None


# -- the quick run -------------------------------------------------------------------------------------------


def test_writes_markdown_json_and_pngs(quick):
    out, data, proc = quick
    for name in ("research_lr.png", "research_curves.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name
    if "numpy" in FRAMEWORKS and len(FRAMEWORKS) > 1:
        assert (out / "research_agreement.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "research.md").read_text()
    for fw in FRAMEWORKS:
        for variant in VARIANTS:
            assert f"| {fw} | {variant} |" in md, (fw, variant)
    n = len(FRAMEWORKS) * sum(len(QUICK[f"{VARIANTS[v][0]}_lrs"]) for v in VARIANTS) * QUICK["seeds"]
    assert len(data["runs"]) == n and not data["meta"]["failed"]
    assert "100%" in proc.stderr and "runs " in proc.stderr  # the progress bar


def test_every_framework_starts_from_the_same_weights_on_the_same_batches(quick, quick_inputs):
    _, data, _ = quick
    corpus, cfg = quick_inputs
    val = D.make_val(corpus.val, QUICK["val_windows"], cfg.context)
    for seed in range(QUICK["seeds"]):
        init = D.init_params(cfg, seed)
        batches = D.make_batches(corpus.train, seed, QUICK["steps"], QUICK["batch"], cfg.context)
        val0, train0 = M.loss_only(init, val, cfg), M.loss_only(init, batches[0], cfg)
        runs = [r for r in data["runs"] if r["seed"] == seed]
        assert {r["framework"] for r in runs} == set(FRAMEWORKS)
        for r in runs:
            assert r["val"][0][1] == pytest.approx(val0, rel=1e-13), r["id"]
            assert r["train"][0] == pytest.approx(train0, rel=1e-13), r["id"]


def test_numpy_reference_trains_on_the_batches_in_order(quick, quick_inputs):
    """Replaying the reference run here, step by step on batches 0, 1, 2, ..., gives its curve exactly."""
    _, data, _ = quick
    corpus, cfg = quick_inputs
    from cautious._compare_workers import spec_optimizer

    run = next(r for r in data["runs"] if r["framework"] == FRAMEWORKS[0] and r["variant"] == "adamw+mean_clamp")
    params = D.init_params(cfg, run["seed"])
    batches = D.make_batches(corpus.train, run["seed"], 5, QUICK["batch"], cfg.context)
    opt = spec_optimizer(run)
    state = opt.init(params)
    for t in range(5):
        loss, grads = M.loss_and_grads(params, batches[t], cfg)
        assert loss == pytest.approx(run["train"][t], rel=1e-12), t
        params, state = opt.step(params, grads, state)


def test_loss_decreases_in_every_run(quick):
    _, data, _ = quick
    for r in data["runs"]:
        assert r["diverged_at"] is None, r["id"]
        assert final_loss(r) < r["val"][0][1] - 0.1, r["id"]
        assert np.mean(r["train"][-5:]) < np.mean(r["train"][:5]), r["id"]


@pytest.mark.skipif("numpy" not in FRAMEWORKS or len(FRAMEWORKS) < 2, reason="needs a framework besides NumPy")
def test_float64_frameworks_agree_with_the_reference_within_the_rounding_bound(quick):
    """Every step of every run: |loss - numpy| / numpy <= 16 * R * u * max(t, 1), R = batch * context."""
    _, data, _ = quick
    R = max(QUICK["batch"] * QUICK["context"], 4 * QUICK["d_model"], data["meta"]["corpus"]["vocab"])
    assert data["meta"]["longest_sum"] == R
    ref = {(r["variant"], r["lr"], r["seed"]): r for r in data["runs"] if r["framework"] == "numpy"}
    checked = 0
    for r in data["runs"]:
        if r["framework"] == "numpy":
            continue
        a, b = np.array(r["train"]), np.array(ref[(r["variant"], r["lr"], r["seed"])]["train"])
        bound = np.array([rounding_bound("float64", R, t) for t in range(len(a))])
        assert np.all(np.abs(a - b) / b <= bound), (r["id"], np.max(np.abs(a - b) / b / bound))
        checked += 1
    rows = data["summary"]["agreement"]
    assert len(rows) == checked > 0 and all(row["worst_over_bound"] <= 1 for row in rows)


def test_steps_to_target_and_lr_table_are_consistent(quick):
    _, data, _ = quick
    summary = data["summary"]
    for row in summary["lr_table"]:
        assert row["diverged"] == 0 and row["min"] <= row["mean"] <= row["max"]
    for row in summary["steps_to_target"]:
        base = [
            r["mean"]
            for r in summary["lr_table"]
            if (r["framework"], r["variant"]) == (row["framework"], row["baseline"])
        ]
        assert row["target"] == pytest.approx(min(base))
        if row["variant"] == row["baseline"]:
            assert row["speedup"] == pytest.approx(1.0)


def test_every_backend_telemetry_equals_the_reference(quick):
    """Per tensor and telemetry step, (k, n, scale) of each framework equals the reference's (the scale to 4 ulp)."""
    _, data, _ = quick
    runs = {(r["framework"], r["variant"], r["lr"], r["seed"]): r for r in data["runs"]}
    ref = [r for r in data["runs"] if r["framework"] == "numpy" and r["caution"]]
    assert ref and all(r["stats"] for r in ref), "the reference reports telemetry for every cautious run"
    compared = set()
    for r in ref:
        for fw in FRAMEWORKS:
            other = runs[(fw, r["variant"], r["lr"], r["seed"])]
            if fw == "numpy" or not other["stats"]:
                continue
            for (t, got), (t_ref, want) in zip(other["stats"], r["stats"], strict=True):
                assert t == t_ref and [kn[:2] for kn in got] == [kn[:2] for kn in want], other["id"]  # k, n exact
                # the scale within 4 ulp (JAX computes n/k where the reference computes 1/(k/n))
                np.testing.assert_allclose([kn[2] for kn in got], [kn[2] for kn in want], rtol=4 * 2.0**-52)
            compared.add(fw)
    assert compared == set(FRAMEWORKS) - {"numpy"}
    kept = data["summary"]["kept"]
    assert {k["variant"] for k in kept.values()} == {v for v, (_, c) in VARIANTS.items() if c}
