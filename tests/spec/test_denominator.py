"""The sparse-gradient denominator (``Caution(denominator="nonzero")``) and the reference telemetry (``stats``)."""

import numpy as np
import pytest

import cautious.spec as spec
from cautious import Caution


def _embedding_run(caution, steps=3, rows=10, lr=1e-3):
    """The issue's case: Embedding(1000, 8), gradient only on `rows` random rows per batch, plain AdamW settings."""
    rng = np.random.default_rng(0)
    opt = spec.adamw(lr=lr, weight_decay=0.0, caution=caution)
    W0 = rng.standard_normal((1000, 8))
    W, state, stats = W0, opt.init([W0]), []
    for _ in range(steps):
        g = np.zeros_like(W)
        g[rng.choice(1000, rows, replace=False)] = rng.standard_normal((rows, 8))
        stats.append(opt.stats([W], [g], state)[0])
        (W,), state = opt.step([W], [g], state)
    return float(np.abs(W - W0).max()), stats


def test_size_denominator_inflates_sparse_steps_and_nonzero_does_not():
    plain, _ = _embedding_run(False)
    inflated, stats = _embedding_run(Caution())
    fixed, stats_nz = _embedding_run(Caution(denominator="nonzero"))
    assert plain == pytest.approx(0.0022, abs=2e-4)
    assert inflated == pytest.approx(0.1, rel=1e-6)  # k/n = 80/8000: every kept entry scaled by 100
    assert [s.scale for s in stats] == [100.0] * 3 and stats[0] == spec.CautionStats(80, 8000, 100.0)
    assert fixed <= plain and [s.scale for s in stats_nz] == [1.0] * 3


def test_denominator_counts_entries_whose_gradient_is_not_exactly_zero():
    g = np.array([0.0, -0.0, 1.0, -2.0, np.nan, 3.0])
    u = np.array([1.0, -1.0, 1.0, 2.0, 1.0, -3.0])  # kept: 1.0 (agrees) and the NaN entry
    c = Caution("exact", denominator="nonzero")
    assert spec.caution_denominator(g, c) == 4
    assert spec.caution_denominator(g, Caution("exact")) == 6
    u_c, mask, count, scale = spec.apply_caution(u, g, c)
    assert count == 2 and scale == 4 / 2
    assert spec.apply_caution(u, np.zeros(6), Caution(denominator="nonzero"))[3] == 1.0  # n = 0: scale 1


@pytest.mark.parametrize("rule", ["adamw", "lion"])
@pytest.mark.parametrize("caution", [Caution("count_plus_one"), Caution(), Caution("exact", denominator="nonzero")])
def test_stats_are_the_numbers_of_the_step_taken(rule, caution):
    """Against a plain step from the same state: exactly ``count`` entries move, each by ``scale`` x plain."""
    rng = np.random.default_rng(1)
    make = getattr(spec, rule)
    opt, plain = make(lr=0.1, weight_decay=0.0, caution=caution), make(lr=0.1, weight_decay=0.0, caution=False)
    params = [rng.standard_normal((4, 5)), rng.standard_normal(7)]
    state = opt.init(params)
    for _ in range(3):
        grads = [rng.standard_normal(x.shape) * (rng.random(x.shape) < 0.7) for x in params]
        stats = opt.stats(params, grads, state)
        new, new_state = opt.step(params, grads, state)
        base, _ = plain.step(params, grads, state)
        for s, p, p_c, p_b in zip(stats, params, new, base):
            moved = p_c != p
            assert s.n == p.size and s.count == np.count_nonzero(moved)
            assert np.allclose((p - p_c)[moved] / (p - p_b)[moved], s.scale, rtol=1e-9)
        params, state = new, new_state
    assert plain.stats(params, params, state) == (None, None)


@pytest.mark.parametrize("bad", ["nnz", "SIZE", ""])
def test_invalid_denominator_names_the_parameter(bad):
    with pytest.raises(ValueError, match=rf"^denominator must be one of 'size', 'nonzero', got {bad!r}$"):
        Caution(denominator=bad)
