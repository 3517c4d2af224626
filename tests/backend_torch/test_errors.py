"""Invalid hyperparameters: the spec's table (cautious.spec.errors), same types and messages."""

import pytest
import torch

import cautious.torch as ct
from cautious.spec.errors import ERROR_TABLE, message

NAMES = {"beta1": "betas[0]", "beta2": "betas[1]"}
KEYS = {
    "AdamW": ("lr", "beta1", "beta2", "eps", "weight_decay", "eps_placement"),
    "Adam": ("lr", "beta1", "beta2", "eps", "weight_decay", "eps_placement"),
    "Lion": ("lr", "beta1", "beta2", "weight_decay"),
    "SGD": ("lr", "momentum", "dampening", "weight_decay"),
    "NAdam": ("lr", "beta1", "beta2", "eps", "weight_decay", "momentum_decay", "momentum_schedule"),
    "RMSprop": ("lr", "alpha", "eps", "weight_decay", "momentum"),
}
CLS = {"AdamW": ct.AdamW, "Adam": ct.Adam, "Lion": ct.Lion, "SGD": ct.SGD, "NAdam": ct.NAdam, "RMSprop": ct.RMSprop}


def _cases():
    for cls, keys in KEYS.items():
        for check in ERROR_TABLE:
            if check.key in keys:
                for value in check.invalid:
                    yield cls, check.key, value


def _kwargs(cls, key, value):
    if key in ("beta1", "beta2"):
        betas = [0.9, 0.99 if cls == "Lion" else 0.999]
        betas[0 if key == "beta1" else 1] = value
        return {"betas": tuple(betas)}
    return {key: value}


@pytest.mark.parametrize("cls,key,value", list(_cases()), ids=str)
def test_invalid_values_give_the_spec_message(cls, key, value):
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError) as info:
        CLS[cls]([p], **_kwargs(cls, key, value))
    assert str(info.value) == message(key, value, NAMES.get(key, key))


@pytest.mark.parametrize("cls", list(CLS))
def test_wrong_types(cls):
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(TypeError, match="lr must be a real number"):
        CLS[cls]([p], lr="fast")
    with pytest.raises(TypeError, match="maximize must be a bool"):
        CLS[cls]([p], maximize=1)
    with pytest.raises(TypeError, match="caution must be a bool or a cautious.Caution"):
        CLS[cls]([p], caution="mean_clamp")


def test_tensor_lr_is_validated_like_a_number():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"lr must be a finite number >= 0, got -0.5"):
        ct.AdamW([p], lr=torch.tensor(-0.5))


def test_cautious_weight_decay_requires_decoupled_decay():
    p = torch.nn.Parameter(torch.zeros(2))
    for make in (
        lambda: ct.Adam([p], cautious_weight_decay=True),
        lambda: ct.SGD([p], cautious_weight_decay=True),
    ):
        with pytest.raises(ValueError) as info:
            make()
        assert str(info.value) == "cautious_weight_decay=True requires decoupled weight decay"
    ct.AdamW([p], cautious_weight_decay=True)
    ct.Adam([p], cautious_weight_decay=True, decoupled_weight_decay=True)
    ct.SGD([p], cautious_weight_decay=True, decoupled_weight_decay=True)
    ct.Lion([p], cautious_weight_decay=True)


def test_nesterov_needs_momentum_and_no_dampening():
    p = torch.nn.Parameter(torch.zeros(2))
    for kw in ({"momentum": 0.0}, {"momentum": 0.9, "dampening": 0.1}):
        with pytest.raises(ValueError) as info:
            ct.SGD([p], nesterov=True, **kw)
        assert str(info.value) == "nesterov=True requires momentum > 0 and dampening == 0"


def test_bad_caution_options():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="floor must be a finite number in"):
        ct.AdamW([p], caution=ct.Caution("mean_clamp", 0.0))
    with pytest.raises(TypeError, match="betas must be a pair"):
        ct.Lion([p], betas=0.9)
