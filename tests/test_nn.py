"""robprune_fast.nn: masked layers, convert / strip / to_torch_prune, and what they keep."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from robprune_fast import bounds, models
from robprune_fast import nn as rnn


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(models.Normalize((0.4,), (0.3,)),
                         nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 4 * 4, 10), nn.ReLU(), nn.Linear(10, 3))


def _random_masks(model, keep=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    for layer in rnn.masked_modules(model).values():
        layer.set_mask(torch.rand(layer.weight.shape, generator=g) < keep)


def test_convert_keeps_names_outputs_and_state_dict():
    model = _model().eval()
    x = torch.rand(5, 1, 8, 8)
    want, state = model(x), copy.deepcopy(model.state_dict())
    rnn.convert(model)
    assert set(rnn.masked_modules(model)) == {"1", "4", "7", "9"}
    assert isinstance(model[1], rnn.MaskedConv2d) and isinstance(model[9], rnn.MaskedLinear)
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-6)
    # A plain state dict loads strictly (masks stay full); its keys are all still there.
    model.load_state_dict(state, strict=True)
    assert set(state) <= set(model.state_dict())
    assert {k for k in model.state_dict() if k.endswith("weight_mask")} == {
        "1.weight_mask", "4.weight_mask", "7.weight_mask", "9.weight_mask"}


def test_masked_forward_and_gradients_match_baked_zeros():
    model = rnn.convert(_model()).eval()
    _random_masks(model)
    baked = rnn.strip(copy.deepcopy(model))
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(model(x), baked(x), rtol=1e-6, atol=1e-6)
    model(x).sum().backward()
    for layer in rnn.masked_modules(model).values():
        assert (layer.weight.grad[layer.weight_mask == 0] == 0).all()  # pruned: no gradient


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_a_pruned_weight_stays_exactly_zero_through_training(opt):
    model = rnn.convert(_model())
    _random_masks(model)
    with torch.no_grad():
        for layer in rnn.masked_modules(model).values():
            layer.weight.mul_(layer.weight_mask)
    optim = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
             "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=5e-4),
             "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2)}[opt](model.parameters())
    for step in range(25):
        x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,))
        loss = nn.functional.cross_entropy(model(x), y)
        optim.zero_grad()
        loss.backward()
        optim.step()
    for layer in rnn.masked_modules(model).values():
        assert (layer.weight[layer.weight_mask == 0] == 0).all()
        assert (layer.weight[layer.weight_mask == 1] != 0).any()


def test_convert_takes_torch_prune_masks_and_to_torch_prune_goes_back():
    model = _model().eval()
    prune.random_unstructured(model[1], "weight", amount=0.5)
    prune.l1_unstructured(model[7], "weight", amount=0.7)
    x = torch.rand(3, 1, 8, 8)
    want = model(x)
    masks = {1: model[1].weight_mask.clone(), 7: model[7].weight_mask.clone()}
    rnn.convert(model)
    assert not model[1]._forward_pre_hooks and torch.equal(model[1].weight_mask, masks[1])
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-6)
    rnn.to_torch_prune(model)
    assert type(model[7]) is nn.Linear and torch.equal(model[7].weight_mask, masks[7])
    assert prune.is_pruned(model)
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-6)


def test_strip_gives_stock_modules_that_export():
    model = rnn.convert(_model()).eval()
    _random_masks(model)
    x = torch.rand(2, 1, 8, 8)
    want = model(x)
    rnn.strip(model)
    assert not rnn.masked_modules(model)
    assert {type(m) for m in model.modules()} <= {nn.Sequential, models.Normalize, nn.Conv2d,
                                                   nn.BatchNorm2d, nn.ReLU, nn.Flatten, nn.Linear}
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_bounds_of_masked_equal_bounds_of_stripped(path):
    """On either path (the compressed one runs the interval layers and the rounding budget over
    the kept weights only) the bounds are those of the network with the zeros baked in; the
    training bounds' gradients reach the weights on both."""
    model = rnn.convert(_model()).double().eval()
    _random_masks(model)
    stripped = rnn.strip(copy.deepcopy(model))
    for layer in rnn.masked_modules(model).values():
        layer.path = path
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    C = bounds.margin_spec(torch.tensor([0, 2, 1]), 3, torch.float64)
    for method in bounds.METHODS:
        for got, want in zip(bounds.compute_bounds(model, x, 0.02, method, C),
                             bounds.compute_bounds(stripped, x, 0.02, method, C)):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    lower = bounds.training_bounds(model, x, 0.02, C).ibp_lower
    lower.sum().backward()
    for layer in rnn.masked_modules(model).values():
        assert layer.weight.grad is not None and (layer.weight.grad[layer.weight_mask == 0] == 0).all()


def test_shared_modules_are_converted_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    rnn.convert(model)
    assert model[0] is model[2] and isinstance(model[0], rnn.MaskedLinear)


@pytest.mark.parametrize("bad,error,match", [
    (torch.ones(3, 3), ValueError, "weight_mask must have the weight's shape"),
    (torch.full((10, 96), 0.5), ValueError, "only 0 and 1"),
    (torch.ones(10, 96, dtype=torch.complex64), TypeError, "bool, integer or floating"),
    ("ones", TypeError, "must be a torch.Tensor"),
    (torch.ones(10, 96, device="meta"), ValueError, "on the weight's device"),
])
def test_bad_masks_name_the_argument(bad, error, match):
    layer = rnn.MaskedLinear(96, 10)
    with pytest.raises(error, match=match):
        layer.set_mask(bad)


def test_refuses_what_it_cannot_convert():
    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(TypeError, match="has its own forward"):
        rnn.convert(nn.Sequential(Custom(3, 3)))
    hooked = nn.Sequential(nn.Linear(3, 3))
    hooked[0].register_forward_hook(lambda m, i, o: o)
    with pytest.raises(TypeError, match="forward hooks"):
        rnn.convert(hooked)
    with pytest.raises(TypeError, match="wrap a single layer"):
        rnn.convert(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="path must be one of"):
        rnn.MaskedLinear(3, 3, path="fast")
    # Attention reads its projection's weight directly: it is left alone.
    attention = nn.Sequential(nn.MultiheadAttention(8, 2))
    rnn.convert(attention)
    assert not rnn.masked_modules(attention)
