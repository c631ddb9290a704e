"""The model zoo: published parameter counts, shapes, normalisation, layer-walkable structure."""

import sys

import pytest
import torch
from torch import nn

from robprune_fast import models

PARAMS = {
    "cnn_small": 214_918,
    "cnn_large": 2_466_858,
    "vgg16_bn": 15_311_818,
    "wrn_28_4": 5_849_050,
}


@pytest.mark.parametrize("name,count", sorted(PARAMS.items()))
def test_published_parameter_counts(name, count):
    model = models.build(name)
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_forward_shape_and_num_classes(name):
    torch.manual_seed(0)
    model = models.build(name, num_classes=7).eval()
    x = torch.rand(2, *models.INPUT_SHAPES[name])
    assert model(x).shape == (2, 7)


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_normalize_is_first_and_parameter_free(name):
    model = models.build(name)
    assert isinstance(model, nn.Sequential)
    first = model[0]
    assert isinstance(first, models.Normalize)
    assert list(first.parameters()) == []
    assert {"0.mean", "0.std"} <= set(model.state_dict())


@pytest.mark.parametrize("name", ["cnn_small", "cnn_large", "vgg16_bn", "digits_mlp", "digits_cnn"])
def test_walkable_networks_are_flat(name):
    # A bound engine walks these layer by layer: every child is a leaf module.
    for layer in models.build(name):
        assert not list(layer.children()), f"{name} has composite layer {layer}"


def test_normalize_matches_formula():
    norm = models.Normalize((0.5, 0.25), (0.5, 2.0))
    x = torch.rand(3, 2, 4, 4)
    expected = torch.stack([(x[:, 0] - 0.5) / 0.5, (x[:, 1] - 0.25) / 2.0], dim=1)
    torch.testing.assert_close(norm(x), expected)


def test_normalize_rejects_bad_std():
    with pytest.raises(ValueError, match="std must be positive"):
        models.Normalize((0.0,), (0.0,))
    with pytest.raises(ValueError, match="channels"):
        models.Normalize((0.0, 0.0), (1.0,))


def test_custom_normalisation_override():
    model = models.build("cnn_small", mean=(0, 0, 0), std=(1, 1, 1))
    assert model[0].mean.flatten().tolist() == [0, 0, 0]


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match="unknown model 'resnet9'.*cnn_small.*wrn_28_4"):
        models.build("resnet9")


def test_models_do_not_import_the_extension():
    # models is a plain-torch layer: importing it must not pull in ops or the compiled _C.
    import subprocess
    code = ("import sys, robprune_fast.models; "
            "print([m for m in sys.modules if m.startswith('robprune_fast.') and m != 'robprune_fast.models'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
