"""robprune_fast.pruning: exact counts, targets, strategies, structures, schedules, HYDRA."""
import tempfile

import pytest
import torch
from torch import nn

from robprune_fast import models, objectives, pruning, train
from robprune_fast import nn as rnn
from robprune_fast.data import Split


def _cnn(seed=0):
    torch.manual_seed(seed)
    return rnn.convert(models.build("cnn_small"))


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("strategy", ["magnitude", "random"])
def test_exact_counts(sparsity, scope, strategy):
    model = _cnn()
    report = pruning.prune(model, sparsity, strategy=strategy, scope=scope)
    assert report.kept == round((1 - sparsity) * report.total)
    if scope == "layer":  # the same keep ratio everywhere, each layer exact to a weight
        for kept, total in report.layers.values():
            assert abs(kept - (1 - sparsity) * total) < 1
    for name, layer in rnn.masked_modules(model).items():
        assert set(layer.weight_mask.unique().tolist()) <= {0.0, 1.0}
        assert int(layer.weight_mask.sum()) == report.layers[name][0]


def test_magnitude_keeps_the_largest():
    model = _cnn()
    pruning.prune(model, 0.9, scope="global")
    kept, dropped = [], []
    for layer in rnn.masked_modules(model).values():
        w = layer.weight.detach().abs()
        kept.append(w[layer.weight_mask == 1])
        dropped.append(w[layer.weight_mask == 0])
    assert torch.cat(kept).min() >= torch.cat(dropped).max()


def test_targets_count_excluded_layers():
    """10x compression over all weights with the first and last layers dense: the other layers
    make up for them, and the whole model keeps exactly a tenth."""
    model = _cnn()
    report = pruning.prune(model, compression=10, exclude=["first", "last"])
    assert report.kept == round(report.total / 10)
    assert report.layers["1"][0] == report.layers["1"][1]
    assert report.layers["8"][0] == report.layers["8"][1]
    with pytest.raises(ValueError, match="cannot be reached"):
        pruning.prune(_cnn(), 0.999, exclude=["6"])  # the big layer alone holds 95%


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(sparsity=1.0), ValueError, r"sparsity must lie in \[0, 1\)"),
    (dict(sparsity=-0.1), ValueError, r"sparsity must lie in \[0, 1\)"),
    (dict(compression=0.5), ValueError, "compression must be a finite number >= 1"),
    (dict(sparsity=0.5, compression=2), ValueError, "exactly one of"),
    (dict(sparsity=0.5, strategy="largest"), ValueError, "strategy must be one of"),
    (dict(sparsity=0.5, exclude=["conv9"]), ValueError, "not a masked layer"),
    (dict(sparsity=0.5, strategy="hydra", scope="global"), ValueError, "layer by layer"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        pruning.prune(_cnn(), **kwargs)
    with pytest.raises(TypeError, match="convert it first"):
        pruning.prune(models.build("cnn_small"), 0.5)


def test_pruning_again_never_revives_a_weight():
    model = _cnn()
    pruning.prune(model, 0.5)
    before = {n: l.weight_mask.clone() for n, l in rnn.masked_modules(model).items()}
    with torch.no_grad():  # make a pruned weight the largest of all
        layer = rnn.masked_modules(model)["6"]
        layer.weight[layer.weight_mask == 0] = 100.0
    for target in (0.6, 0.8, 0.9):
        pruning.prune(model, target)
        for name, layer in rnn.masked_modules(model).items():
            assert (layer.weight_mask <= before[name]).all()


def test_n_of_m():
    model = _cnn()
    report = pruning.prune(model, structure="n:m", n_m=(2, 4))
    assert report.sparsity == pytest.approx(0.5)
    for layer in rnn.masked_modules(model).values():
        groups = layer.weight_mask.reshape(layer.weight.shape[0], -1, 4)
        assert (groups.sum(-1) == 2).all()
        # the two kept of each four are the two largest
        w = (layer.weight.detach().reshape(layer.weight.shape[0], -1, 4)).abs()
        inf = torch.tensor(float("inf"))
        assert (torch.where(groups == 1, w, inf).amin(-1) >= torch.where(groups == 0, w, -inf).amax(-1)).all()
    with pytest.raises(ValueError, match="multiple of m"):
        pruning.prune(rnn.convert(nn.Sequential(nn.Linear(6, 3))), structure="n:m", n_m=(2, 4))


def test_channel_pruning_shrinks_to_the_same_outputs():
    torch.manual_seed(1)
    model = rnn.convert(nn.Sequential(
        models.Normalize((0.4,), (0.3,)), nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8),
        nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 2 * 2, 16), nn.ReLU(), nn.Linear(16, 3))).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    pruning.prune(model, 0.5, structure="channel")
    x = torch.rand(5, 1, 8, 8)
    small = pruning.structured.shrink(model, x)
    assert sum(p.numel() for p in small.parameters()) < 0.5 * sum(
        p.numel() for p in model.parameters() if p is not None)
    assert all(type(m) in (nn.Sequential, models.Normalize, nn.Conv2d, nn.BatchNorm2d, nn.ReLU,
                           nn.MaxPool2d, nn.Flatten, nn.Linear) for m in small.modules())
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)
    assert small[1].out_channels == 4 and small[-1].out_features == 3


def test_cubic_schedule():
    s = lambda step: pruning.schedules.cubic(0.0, 0.9, 2, 10, step)
    assert s(0) == s(2) == 0.0 and s(10) == s(20) == 0.9
    values = [s(t) for t in range(2, 11)]
    assert values == sorted(values)
    assert values[1] - values[0] > values[-1] - values[-2]  # fast first, slow last


def test_hydra_beats_magnitude_where_the_right_mask_is_known():
    """Five informative inputs (0.2 or 0.8 by class) get small weights; fifteen uninformative
    ones (0.5 +- noise) get large equal weights in both rows. Keeping 10 of 40 weights by
    magnitude keeps uninformative ones (chance accuracy); HYDRA's scores, trained on the loss
    with the weights frozen, find the informative ones."""
    g = torch.Generator().manual_seed(0)
    n = 512
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.5 + 0.02 * torch.randn(n, 20, generator=g)
    x[:, :5] = torch.where(y[:, None] == 1, 0.8, 0.2) + 0.05 * torch.randn(n, 5, generator=g)
    split = Split((x.clamp(0, 1) * 255).round().to(torch.uint8).view(n, 1, 4, 5), y)

    def model():
        m = rnn.convert(nn.Sequential(nn.Flatten(), nn.Linear(20, 2)))
        with torch.no_grad():
            m[1].weight.copy_(torch.cat([torch.full((2, 5), 0.3), torch.full((2, 15), 1.0)], 1))
            m[1].weight[0, :5] *= -1
            m[1].bias.copy_(torch.tensor([0.75, -0.75]))  # the threshold between 0.2 and 0.8
        return m

    def accuracy(m):
        with torch.no_grad():
            return (m(split.images.float() / 255).argmax(1) == y).float().mean().item()

    magnitude, hydra = model(), model()
    assert accuracy(magnitude) == 1.0
    pruning.prune(magnitude, 0.75)
    pruning.prune(hydra, 0.75, strategy="hydra")
    config = train.TrainConfig(epochs=20, batch_size=64, lr=0.1, weight_decay=0.0, progress_bar=False)
    with pruning.hydra.only_scores_train(hydra):
        train.train(hydra, split, objectives.build("natural"), config, tempfile.mkdtemp())
    pruning.hydra.finish(hydra)
    assert int(hydra[1].weight_mask.sum()) == 10
    assert hydra[1].weight.detach()[:, 5:].eq(1.0).all()  # the weights stayed frozen
    assert accuracy(hydra) > 0.95 and accuracy(magnitude) < 0.7
    assert hydra[1].weight_mask[:, :5].sum() == 10  # exactly the informative weights
