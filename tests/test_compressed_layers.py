"""robprune_fast.nn's compressed layers (CompressedLinear, CompressedConv2d: the kept weights are
the parameter): compress / decompress, forward and gradients against the masked layers, training,
state dicts, the bound engine, the compact file, export, and what they refuse."""
import copy

import pytest
import torch
from torch import nn

from robprune_fast import bounds, compact, models, ops
from robprune_fast import nn as rnn


def _model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = nn.Sequential(models.Normalize((0.4,), (0.3,)),
                          nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(6 * 4 * 4, 10), nn.ReLU(), nn.Linear(10, 3))
    return rnn.convert(model).to(dtype)


def _masked(keep=0.3, seed=1, dtype=torch.float64):
    """A masked model with random masks (one layer left with an empty row) and its weights'
    pruned entries set to zero."""
    model = _model(dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    for layer in rnn.masked_modules(model).values():
        mask = torch.rand(layer.weight.shape, generator=g) < keep
        layer.set_mask(mask)
    model[6].weight_mask[3] = 0  # an output with no kept weight
    with torch.no_grad():
        for layer in rnn.masked_modules(model).values():
            layer.weight.mul_(layer.weight_mask)
    return model


def _compressed_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (rnn.CompressedLinear, rnn.CompressedConv2d))}


def test_compress_keeps_outputs_and_holds_only_the_kept_weights():
    masked = _masked()
    model = rnn.compress(copy.deepcopy(masked))
    layers = _compressed_layers(model)
    assert set(layers) == {"1", "3", "6", "8"}
    for name, layer in layers.items():
        ref = masked.get_submodule(name)
        assert layer.weight_values.numel() == int(ref.weight_mask.sum())
        assert torch.equal(layer.weight, ref.weight * ref.weight_mask)
        assert torch.equal(layer.weight_mask, ref.weight_mask)
    others = {k for k in masked.state_dict() if k.split(".")[0] not in layers}
    assert set(model.state_dict()) == others | {f"{n}.{k}" for n in layers for k in (
        "weight_values", "weight_row_ptr", "weight_col", "bias")}
    for x in (torch.rand(5, 1, 8, 8, dtype=torch.float64), torch.rand(1, 1, 8, 8, dtype=torch.float64),
              torch.rand(4, 1, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last),
              torch.rand(4, 1, 8, 16, dtype=torch.float64)[..., ::2]):
        torch.testing.assert_close(model(x), masked(x), rtol=1e-12, atol=1e-12)


def test_gradients_equal_the_masked_layers_at_the_kept_weights():
    masked = _masked()
    model = rnn.compress(copy.deepcopy(masked))
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    xm, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    masked(xm).square().sum().backward()
    model(xc).square().sum().backward()
    torch.testing.assert_close(xc.grad, xm.grad, rtol=1e-12, atol=1e-12)
    for name, layer in _compressed_layers(model).items():
        ref = masked.get_submodule(name)
        kept = ref.weight.grad.flatten()[ref.weight_mask.flatten() != 0]
        torch.testing.assert_close(layer.weight_values.grad, kept, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_gradcheck_in_values_bias_and_input(layer):
    torch.manual_seed(0)
    if layer == "linear":
        m = rnn.MaskedLinear(7, 5, dtype=torch.float64)
        x = torch.randn(3, 7, dtype=torch.float64)
    else:
        m = rnn.MaskedConv2d(4, 6, 3, stride=2, padding=1, groups=2, dtype=torch.float64)
        x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    m.set_mask(torch.rand(m.weight.shape) < 0.5)
    c = rnn.compress(nn.Sequential(m))[0]

    def f(x, values, bias):
        with torch.no_grad():
            c.weight_values.copy_(values)
        c.weight_values.grad = None
        return torch.func.functional_call(c, {"weight_values": values, "bias": bias}, (x,))

    args = (x.requires_grad_(), c.weight_values.detach().clone().requires_grad_(),
            c.bias.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_training_the_kept_weights_follows_the_masked_model(opt):
    """The same steps on the masked model (dense weight, masked gradient) and on its compressed
    twin (kept weights only) end at the same weights: momentum, weight decay and Adam's state
    of a pruned weight are all zero, so dropping them changes nothing."""
    masked = _masked()
    model = rnn.compress(copy.deepcopy(masked))
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
            "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=5e-4)}[opt]
    optims = [make(masked.parameters()), make(model.parameters())]
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        x, y = torch.rand(8, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
        for net, optim in zip((masked, model), optims):
            optim.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            optim.step()
    for name, layer in _compressed_layers(model).items():
        ref = masked.get_submodule(name)
        assert (ref.weight[ref.weight_mask == 0] == 0).all()
        torch.testing.assert_close(layer.weight, ref.weight, rtol=1e-9, atol=1e-12)
    # The compressed model's optimiser state holds the kept weights only.
    state = optims[1].state[model[6].weight_values]
    assert all(t.numel() == model[6].weight_values.numel() for t in state.values() if t.dim())


def test_decompress_goes_back_and_strip_exports():
    masked = _masked()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    model = rnn.decompress(rnn.compress(copy.deepcopy(masked)))
    for name, layer in rnn.masked_modules(model).items():
        ref = masked.get_submodule(name)
        assert type(layer) is type(ref)
        assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.weight_mask, ref.weight_mask)
    stripped = rnn.strip(rnn.compress(copy.deepcopy(masked))).eval()
    assert not _compressed_layers(stripped)
    exported = torch.export.export(stripped, (x,))
    torch.testing.assert_close(exported.module()(x), masked(x), rtol=1e-12, atol=1e-12)


def test_bounds_of_compressed_equal_bounds_of_masked(monkeypatch):
    """The engine reads a compressed layer's kept weights as they are (its IBP layers on the
    compressed path, nothing gathered from a dense weight) and the bounds are the masked
    model's; the training bound's gradient reaches the kept weights, equal to the masked
    weight's there."""
    masked = _masked().eval()
    model = rnn.compress(copy.deepcopy(masked))
    for layer in rnn.masked_modules(masked).values():
        layer.path = "sparse"
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    C = bounds.margin_spec(torch.tensor([0, 2, 1]), 3, torch.float64)
    want = {method: bounds.compute_bounds(masked, x, 0.02, method, C) for method in bounds.METHODS}
    bounds.training_bounds(masked, x, 0.02, C).ibp_lower.sum().backward()

    def no_gather(*args):
        raise AssertionError("a compressed layer's values were gathered from a dense weight")

    monkeypatch.setattr(ops.sparse, "gather_values", no_gather)
    for method in bounds.METHODS:
        for got, ref in zip(bounds.compute_bounds(model, x, 0.02, method, C), want[method]):
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    bounds.training_bounds(model, x, 0.02, C).ibp_lower.sum().backward()
    for name, layer in _compressed_layers(model).items():
        ref = masked.get_submodule(name)
        kept = ref.weight.grad.flatten()[ref.weight_mask.flatten() != 0]
        torch.testing.assert_close(layer.weight_values.grad, kept, rtol=1e-9, atol=1e-12)


def test_certified_points_survive_the_models_own_forward():
    """No point the engine certifies on a compressed float32 model is misclassified by its
    forward on sampled corners of the ball."""
    model = rnn.compress(_masked(keep=0.5, dtype=torch.float32)).eval()
    x = torch.rand(16, 1, 8, 8)
    y = model(x).argmax(1)
    eps = 0.01
    C = bounds.margin_spec(y, 3, torch.float32)
    lower = bounds.compute_bounds(model, x, eps, "crown", C)[0]
    ok = (lower > 0).all(1)
    assert ok.any()  # the check below has points to check
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        corner = (x + eps * (2 * torch.randint(0, 2, x.shape, generator=g) - 1)).clamp(0, 1)
        assert (model(corner).argmax(1)[ok] == y[ok]).all()


def test_state_dicts_load_across_numbers_of_kept_weights_and_damage_is_refused():
    masked = _masked()
    state = rnn.compress(copy.deepcopy(masked)).state_dict()
    full = rnn.compress(_model())  # masks full: every weight kept
    full.load_state_dict(state, strict=True)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(full(x), masked(x), rtol=1e-12, atol=1e-12)
    bad = {
        "6.weight_col": lambda s: s["6.weight_col"].clone().fill_(96),
        "6.weight_row_ptr": lambda s: s["6.weight_row_ptr"][:-1].clone(),
        "6.weight_values": lambda s: s["6.weight_values"][1:].clone(),
    }
    for key, damage in bad.items():
        broken = dict(state)
        broken[key] = damage(state)
        with pytest.raises(RuntimeError, match="6.weight"):
            rnn.compress(_model()).load_state_dict(broken)
    unsorted = dict(state)
    col, ptr = state["6.weight_col"].clone(), state["6.weight_row_ptr"]
    first = int((ptr[1:] - ptr[:-1] >= 2).nonzero()[0])
    a = int(ptr[first])
    col[a], col[a + 1] = col[a + 1].clone(), col[a].clone()
    unsorted["6.weight_col"] = col
    with pytest.raises(RuntimeError, match="increase within each row"):
        rnn.compress(_model()).load_state_dict(unsorted)


def test_compact_file_round_trip(tmp_path):
    masked = _masked()
    model = rnn.compress(copy.deepcopy(masked))
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    compact.save_compact(model, tmp_path / "m.safetensors")
    again = rnn.compress(_model())
    compact.load_compact(again, tmp_path / "m.safetensors")
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    into_masked = _model()
    compact.load_compact(into_masked, tmp_path / "m.safetensors")
    torch.testing.assert_close(into_masked(x), masked(x), rtol=1e-12, atol=1e-12)


def test_refuses_what_it_cannot_compress_and_bad_inputs():
    scored = _model()
    scored[6].attach_scores(torch.rand(10, 96), 20)
    with pytest.raises(TypeError, match="detach_scores"):
        rnn.compress(scored)
    with pytest.raises(TypeError, match="wrap a single layer"):
        rnn.compress(rnn.MaskedLinear(3, 3))
    model = rnn.compress(_masked())
    with pytest.raises(ValueError, match="in_features = 96"):
        model[6](torch.rand(2, 95, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32 or float64"):
        model[6](torch.ones(2, 96, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"x must be \(N, 1, H, W\)"):
        model[1](torch.rand(2, 3, 8, 8, dtype=torch.float64))
    with pytest.raises((TypeError, RuntimeError), match="dtype"):
        model[6](torch.rand(2, 96, dtype=torch.float32))

    class Lying(rnn.CompressedLinear):
        @property
        def weight(self):
            return torch.zeros(self.out_features, self.in_features, dtype=torch.float64)

    layer = model[6]
    liar = Lying(96, 10, layer.weight_values.detach(), layer.weight_row_ptr, layer.weight_col,
                 layer.bias.detach())
    with pytest.raises(TypeError, match="overrides CompressedLinear.weight"):
        bounds.compute_bounds(nn.Sequential(liar), torch.rand(1, 96, dtype=torch.float64), 0.1, "ibp")


def test_second_derivatives_raise_instead_of_going_wrong():
    """As on the ops' path (tests/test_second_order.py): the first gradient taken with
    create_graph is right, and a backward through it raises rather than treating the backward
    op as a constant."""
    masked = _masked()
    model = rnn.compress(copy.deepcopy(masked))
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    for layer in (model[6], model[1]):
        inp = (x if layer is model[1] else torch.rand(2, 96, dtype=torch.float64)).requires_grad_()
        (g,) = torch.autograd.grad(layer(inp).square().sum(), layer.weight_values, create_graph=True)
        ref = masked.get_submodule("6" if layer is model[6] else "1")
        (want,) = torch.autograd.grad(ref(inp).square().sum(), ref.weight)
        torch.testing.assert_close(g, want.flatten()[ref.weight_mask.flatten() != 0], rtol=1e-12, atol=1e-12)
        with pytest.raises(RuntimeError, match="derivative for robprune_fast::sparse_.* is not implemented"):
            g.sum().backward()
