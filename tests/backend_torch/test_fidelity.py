"""Drop-in fidelity with torch.optim (issue 12): torch.compile, capturable, checkpoints, complex, float16, errors."""

import io
import pickle
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounter

import cautious.torch as ct
from cautious import Caution, spec
from cautious.spec.errors import FLAGS, invalid_examples, param_dtype_message, type_message

RULES = {
    "AdamW": lambda ps, **kw: ct.AdamW(ps, lr=1e-2, **kw),
    "Adam": lambda ps, **kw: ct.Adam(ps, lr=1e-2, weight_decay=0.1, **kw),
    "Lion": lambda ps, **kw: ct.Lion(ps, lr=1e-3, weight_decay=0.1, **kw),
    "SGD": lambda ps, **kw: ct.SGD(ps, lr=1e-2, momentum=0.9, **kw),
}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


# ----------------------------------------------------------------------------------------------------------
# torch.compile: one optimizer graph, no recompiles
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("caution", [True, False], ids=["caution", "off"])
@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("rule", list(RULES))
def test_compiled_step_is_one_graph_without_recompiles(rule, foreach, caution):
    torch._dynamo.reset()
    model = _model()
    opt = RULES[rule](model.parameters(), foreach=foreach, caution=caution)
    counter = CompileCounter()

    @torch.compile(backend=counter)
    def opt_step():
        opt.step()

    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    frames = []
    for _ in range(22):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt_step()
        frames.append(counter.frame_count)
    # SGD's first step creates its momentum buffers (a second graph, as for torch.optim.SGD); after that
    # no step compiles anything: 20 steps at least run the same graph.
    assert frames[-1] == frames[1] == (2 if rule == "SGD" else 1), frames
    assert counter.op_count > 0


#: every rule with a fused kernel (NAdam, Adopt and LaProp keep host scalars: not in the one-graph test above)
FUSED_RULES = {
    **RULES,
    "NAdam": lambda ps, **kw: ct.NAdam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, **kw),
    "Adopt": lambda ps, **kw: ct.Adopt(ps, lr=1e-2, **kw),
    "LaProp": lambda ps, **kw: ct.LaProp(ps, lr=1e-2, weight_decay=0.1, **kw),
}


#: every optimizer class, for the compiled-equals-eager check (matrices only: Muon orthogonalizes 2-d tensors)
ALL_CLASSES = {
    **FUSED_RULES,
    "RMSprop": lambda ps, **kw: ct.RMSprop(ps, lr=1e-2, momentum=0.9, centered=True, **kw),
    "Adafactor": lambda ps, **kw: ct.Adafactor(ps, lr=1e-2, **kw),
    "Muon": lambda ps, **kw: ct.Muon(ps, lr=1e-2, **kw),
}


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("rule", list(ALL_CLASSES))
def test_compiled_step_keeps_advancing_the_state(rule, foreach):
    """torch.compile(opt.step) equals the eager step, state included. Dynamo runs an optimizer's
    ``_init_group`` once, at trace time: per-step bookkeeping there is lost (LaProp's step counter and
    learning-rate average stayed at step 1 until it moved out of ``_init_group``)."""
    torch._dynamo.reset()

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False), torch.nn.Linear(4, 3, bias=False))

    m1, m2 = model(), model()
    o1, o2 = ALL_CLASSES[rule](m1.parameters(), foreach=foreach), ALL_CLASSES[rule](m2.parameters(), foreach=foreach)
    step = torch.compile(o1.step, backend="eager")
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(4):
        for model_, run in ((m1, step), (m2, o2.step)):
            model_.zero_grad()
            model_(x).square().mean().backward()
            run()
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        for key, value in o2.state[b].items():
            got = o1.state[a][key]
            if key == "step" or not isinstance(value, torch.Tensor):
                assert float(got) == float(value), key


@pytest.mark.parametrize("rule", list(FUSED_RULES))
def test_compiled_fused_step_runs_eagerly_like_torch_optims_fused(rule):
    # torch.optim does not trace its fused steps (torch.compiler.disable): neither do we, so nothing recompiles
    from cautious.backends.torch import fused

    if not fused.is_available(torch.device("cpu")):
        pytest.skip("no fused CPU kernel")
    torch._dynamo.reset()
    m1, m2 = _model(), _model()
    o1, o2 = FUSED_RULES[rule](m1.parameters(), fused=True), FUSED_RULES[rule](m2.parameters(), fused=True)
    counter = CompileCounter()
    step = torch.compile(o1.step, backend=counter)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(21):
        for model, run in ((m1, step), (m2, o2.step)):
            model.zero_grad()
            model(x).square().mean().backward()
            run()
    assert counter.frame_count == 0
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("rule", ["AdamW", "Lion"])
def test_compiled_full_training_step_matches_eager(rule):
    torch._dynamo.reset()
    m1, m2 = _model(), _model()
    o1, o2 = RULES[rule](m1.parameters(), foreach=True), RULES[rule](m2.parameters(), foreach=True)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    counter = CompileCounter()

    def train_step(model, opt):
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss

    compiled = torch.compile(train_step, backend=counter)
    compiled(m1, o1)
    train_step(m2, o2)
    seen = counter.frame_count
    for _ in range(20):
        compiled(m1, o1)
        train_step(m2, o2)
    assert counter.frame_count == seen  # no recompiles over 20 steps
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        # compiled: bias corrections from the float32 step tensor (as torch.optim under compile)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_eager_step_stays_bit_identical_to_torch_optim_after_compile_support():
    model_a, model_b = _model(), _model()
    ours = ct.AdamW(model_a.parameters(), lr=1e-2, caution=False, foreach=False)
    theirs = torch.optim.AdamW(model_b.parameters(), lr=1e-2, foreach=False)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        for model, opt in ((model_a, ours), (model_b, theirs)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# capturable=True
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("caution", [True, False], ids=["caution", "off"])
def test_capturable_keeps_step_and_lr_on_device_without_host_sync(foreach, caution, monkeypatch):
    m1, m2 = _model(), _model()
    lr = torch.tensor(1e-2)
    cap = ct.AdamW(m1.parameters(), lr=lr, capturable=True, foreach=foreach, caution=caution)
    ref = ct.AdamW(m2.parameters(), lr=1e-2, foreach=foreach, caution=caution)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    for model, opt in ((m1, cap), (m2, ref)):
        for _ in range(4):
            opt.zero_grad()
            model(x).square().mean().backward()
            if opt is cap:
                with monkeypatch.context() as mp:  # no .item(): nothing is read back to the host
                    mp.setattr(torch.Tensor, "item", lambda self: pytest.fail("host sync (.item()) in a step"))
                    opt.step()
            else:
                opt.step()
    for p in m1.parameters():
        step = cap.state[p]["step"]
        assert step.device == p.device and step.dim() == 0 and float(step) == 4.0
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_capturable_step_is_compiled_as_one_graph():
    torch._dynamo.reset()
    model = _model()
    opt = ct.AdamW(model.parameters(), lr=torch.tensor(1e-2), capturable=True, foreach=True)
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter)
    x = torch.randn(8, 6)
    for _ in range(21):
        opt.zero_grad()
        model(x).square().mean().backward()
        step()
    assert counter.frame_count == 1


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: plain data in the param groups
# ----------------------------------------------------------------------------------------------------------

_LOAD_WITHOUT_CAUTIOUS = """
import sys, torch
sd = torch.load(sys.argv[1])  # weights_only=True, the default
assert "cautious" not in sys.modules, sorted(m for m in sys.modules if m.startswith("cautious"))
print(sd["param_groups"][0]["caution"])
"""


@pytest.mark.parametrize("caution", [True, Caution("exact"), False], ids=["on", "exact", "off"])
def test_checkpoint_loads_with_plain_torch_load_in_a_process_without_cautious(tmp_path, caution):
    model = _model()
    opt = ct.AdamW(model.parameters(), caution=caution)
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    out = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_CAUTIOUS, str(path)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    expected = None if caution is False else asdict(caution if isinstance(caution, Caution) else Caution())
    assert out.stdout.strip() == str(expected)


def _old_checkpoint(tmp_path, stored):
    """A checkpoint as older versions wrote it: the param group holds ``stored`` (a Caution, False or None)."""
    model = _model()
    opt = ct.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        g["caution"] = stored
    path = tmp_path / "old.pt"
    torch.save(sd, path)
    return model, opt, path


@pytest.mark.parametrize("stored", [Caution("count_plus_one"), False, None], ids=["Caution", "False", "None"])
def test_older_checkpoints_still_load(tmp_path, stored):
    model, opt, path = _old_checkpoint(tmp_path, stored)
    ck = torch.load(path, weights_only=True)  # a pickled Caution is an allowed global once cautious is imported
    assert ck["param_groups"][0]["caution"] == stored
    fresh = ct.AdamW(model.parameters(), lr=0.01)
    fresh.load_state_dict(ck)
    # load_state_dict keeps the current caution options, stored as plain data
    assert fresh.param_groups[0]["caution"] == asdict(Caution())
    torch.testing.assert_close(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    model(torch.randn(3, 6)).sum().backward()
    fresh.step()


@pytest.mark.parametrize("stored", [Caution("exact"), False, None], ids=["Caution", "False", "None"])
def test_older_pickles_are_normalised_to_plain_data(stored):
    model = _model()
    opt = ct.Lion(model.parameters())
    opt.param_groups[0]["caution"] = stored  # what an older pickle holds
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.param_groups[0]["caution"] == (asdict(stored) if isinstance(stored, Caution) else None)
    model(torch.randn(3, 6)).sum().backward()
    clone.step()


def test_group_caution_is_plain_data_and_off_is_none():
    model = _model()
    opt = ct.AdamW(model.parameters(), caution=Caution("mean_clamp", 0.25))
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "caution": False})
    assert opt.param_groups[0]["caution"] == {"normalize": "mean_clamp", "floor": 0.25, "denominator": "size"}
    assert opt.param_groups[1]["caution"] is None
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    assert b"cautious._caution" not in buf.getvalue()  # no cautious global is pickled


# ----------------------------------------------------------------------------------------------------------
# Complex parameters: a complex tensor is its real view
# ----------------------------------------------------------------------------------------------------------

SPEC_RULES = {
    "AdamW": ("adamw", dict(lr=0.05, weight_decay=0.1)),
    "Adam": ("adam", dict(lr=0.05, weight_decay=0.1, amsgrad=True)),
    "Lion": ("lion", dict(lr=0.01, weight_decay=0.1)),
    "SGD": ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True)),
}


@pytest.mark.parametrize("impl", ["single", "foreach", "fused"])
@pytest.mark.parametrize("cls", list(SPEC_RULES))
def test_complex_parameters_follow_the_spec_on_their_real_view(cls, impl):
    if impl == "fused":
        from cautious.backends.torch import fused

        if not fused.is_available(torch.device("cpu")):
            pytest.skip("no fused CPU kernel")
    rule, hp = SPEC_RULES[cls]
    rng = np.random.default_rng(0)
    shapes = [(3, 2), (4,)]
    real = [rng.standard_normal((*s, 2)) for s in shapes]  # the real views
    params = [torch.nn.Parameter(torch.view_as_complex(torch.tensor(r))) for r in real]
    kw = dict(fused=True) if impl == "fused" else dict(foreach=impl == "foreach")
    opt = getattr(ct, cls)(params, **hp, caution=Caution("exact"), **kw)
    ref = getattr(spec, rule)(**hp, caution=Caution("exact"))
    state = ref.init(real)
    for _ in range(4):
        grads = [rng.standard_normal(r.shape) for r in real]
        for p, g in zip(params, grads, strict=True):
            p.grad = torch.view_as_complex(torch.tensor(g))
        opt.step()
        real, state = ref.step(real, grads, state)
    for p, r in zip(params, real, strict=True):
        assert p.dtype == torch.complex128
        np.testing.assert_allclose(torch.view_as_real(p.detach()).numpy(), r, rtol=1e-10, atol=1e-12)
    for st in opt.state.values():
        for k in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if k in st:
                assert st[k].dtype == torch.complex128  # state keeps the parameter's dtype, as torch.optim


def test_complex_count_is_over_the_real_view():
    # u = g = (1 + 1j, -1 - 1j) with real view [1, 1, -1, -1]; g's real view [1, -1, -1, 1]: 2 of 4 kept,
    # so "exact" scales by 4 / 2 = 2 (not by 2 / 1 as a count of complex entries would)
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex128))
    opt = ct.SGD([p], lr=1.0, momentum=0.9, caution=Caution("exact"))
    p.grad = torch.tensor([1 - 1j, -1 + 1j], dtype=torch.complex128)
    opt.state[p]["momentum_buffer"] = torch.tensor([1 + 1j, -1 - 1j], dtype=torch.complex128) / 0.9 * 5
    opt.step()
    # m' = 0.9 * m + g = (5 + 5j) + (1 - 1j) = 6 + 4j, and -(6 + 4j): all agree with g's real parts only
    torch.testing.assert_close(
        torch.view_as_real(p.detach()), torch.tensor([[-12.0, 0.0], [12.0, 0.0]], dtype=torch.float64)
    )


# ----------------------------------------------------------------------------------------------------------
# float16: single/foreach compute in float16 (as torch.optim), fused in float32 (as torch's fused)
# ----------------------------------------------------------------------------------------------------------


def _half_run(make, g=1e-4):
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.5], dtype=torch.float16))
    opt = make([p])
    for _ in range(2):
        p.grad = torch.tensor([g, g, -g], dtype=torch.float16)
        opt.step()
    return p.detach()


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_float16_single_and_foreach_are_torch_optims_float16_arithmetic(foreach):
    # eps=1e-8 is 0 in float16 and g*g underflows: torch.optim.Adam divides 0 by 0... and gives -inf/+inf.
    # Our single/foreach paths compute in the parameter dtype op by op, so they do the same, bit for bit.
    ours = _half_run(lambda ps: ct.Adam(ps, lr=1e-3, caution=False, foreach=foreach))
    theirs = _half_run(lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=foreach))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert torch.isinf(ours).all()
    cautious_run = _half_run(lambda ps: ct.Adam(ps, lr=1e-3, foreach=foreach))
    assert torch.isinf(cautious_run).all()  # caution keeps these coordinates: u and g agree


@pytest.mark.parametrize("caution", [True, False], ids=["caution", "off"])
def test_float16_fused_computes_in_float32_and_rounds_once(caution):
    from cautious.backends.torch import fused

    if not fused.is_available(torch.device("cpu")):
        pytest.skip("no fused CPU kernel")
    got = _half_run(lambda ps: ct.Adam(ps, lr=1e-3, fused=True, caution=caution))
    assert torch.isfinite(got).all()
    # the spec in float64 on the float16 values, rounded once: within one float16 ulp
    ref = spec.adam(lr=1e-3, caution=caution)
    params = [np.array([1.0, -1.0, 0.5])]
    state = ref.init(params)
    g = float(np.float16(1e-4))
    for _ in range(2):
        params, state = ref.step(params, [np.array([g, g, -g])], state)
    expected = torch.tensor(params[0], dtype=torch.float16)
    ulp = torch.tensor([2**-10, 2**-10, 2**-11], dtype=torch.float16)
    assert ((got.double() - expected.double()).abs() <= ulp.double()).all(), (got, expected)


# ----------------------------------------------------------------------------------------------------------
# Validation: the one table's messages
# ----------------------------------------------------------------------------------------------------------

CLASS_KEYS = {
    ct.AdamW: ("lr", "eps", "weight_decay", "eps_placement", "amsgrad", "maximize", "cautious_weight_decay"),
    ct.Adam: ("lr", "eps", "weight_decay", "eps_placement", "amsgrad", "maximize", "decoupled_weight_decay"),
    ct.Lion: ("lr", "weight_decay", "maximize", "cautious_weight_decay"),
    ct.SGD: ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "decoupled_weight_decay"),
    ct.NAdam: ("lr", "eps", "momentum_decay", "momentum_schedule", "maximize", "decoupled_weight_decay"),
    ct.RMSprop: ("lr", "alpha", "eps", "momentum", "centered", "maximize", "decoupled_weight_decay"),
}


def _type_cases():
    for cls, keys in CLASS_KEYS.items():
        for key, value, exc, msg in invalid_examples():
            if key in keys and exc is TypeError:
                yield cls, key, value, msg


@pytest.mark.parametrize(("cls", "key", "value", "msg"), list(_type_cases()), ids=str)
def test_none_and_non_bool_flags_are_refused_with_the_tables_message(cls, key, value, msg):
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(TypeError) as info:
        cls([p], **{key: value})
    assert str(info.value) == msg
    if key in FLAGS:
        assert "must be a bool" in msg


@pytest.mark.parametrize("cls", list(CLASS_KEYS))
def test_caution_none_is_an_error_not_off(cls):
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(TypeError) as info:
        cls([p], caution=None)
    assert str(info.value) == "caution must be a bool or a cautious.Caution, got None"
    opt = cls([p])
    with pytest.raises(TypeError, match="got None"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "caution": None})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("cls", list(CLASS_KEYS))
def test_integer_parameters_are_refused_with_the_tables_message(cls, dtype):
    with pytest.raises(ValueError) as info:
        cls([torch.nn.Parameter(torch.zeros(2)), torch.zeros(2, dtype=dtype)])
    assert str(info.value) == param_dtype_message("parameter param_groups[0]['params'][1]", str(dtype)[6:])
    with pytest.raises(ValueError) as info:
        cls([("w", torch.zeros(2, dtype=dtype))])
    assert str(info.value) == param_dtype_message("parameter 'w'", str(dtype)[6:])


def test_type_message_is_the_shared_text():
    with pytest.raises(TypeError) as info:
        ct.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=None)
    assert str(info.value) == type_message("lr", None) == "lr must be a real number (a finite number >= 0), got None"
