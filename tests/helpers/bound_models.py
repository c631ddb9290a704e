"""Small networks of every layer the bound engine knows, inputs with pixels on the faces of
[0, 1], and points of the ball around them: shared by the bound tests (CPU and CUDA)."""
import torch
from torch import nn
from torch.nn.utils import prune

from robprune_fast import models

TOL64 = 1e-9


def randomise_bn(model):
    """Non-trivial running statistics and affine parameters, so eval-mode BN is a real affine map."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1.5, 1.5)  # negative scales too
            m.bias.data.uniform_(-0.5, 0.5)
    return model


def mlp():
    torch.manual_seed(1)
    return randomise_bn(nn.Sequential(
        models.Normalize((0.4,), (0.3,)), nn.Flatten(),
        nn.Linear(36, 20), nn.BatchNorm1d(20), nn.ReLU(),
        nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Identity(), nn.ReLU()),
        nn.Linear(16, 5),
    )).double().eval()


def cnn():
    torch.manual_seed(2)
    relu = nn.ReLU()  # one instance used twice: the walk must run it twice
    model = nn.Sequential(
        models.Normalize((0.5, 0.4), (0.25, 0.3)),
        nn.Conv2d(2, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), relu,
        nn.Conv2d(6, 8, 3, padding="same", dilation=2, groups=2), relu,
        nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False),
        nn.Conv2d(8, 8, 2, stride=2, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(32, 12), nn.ReLU(), nn.Linear(12, 4),
    )
    # Masked layers in torch.nn.utils.prune's convention (weight_orig * weight_mask).
    prune.random_unstructured(model[4], "weight", amount=0.5)
    prune.random_unstructured(model[11], "weight", amount=0.3)
    return randomise_bn(model).double().eval()


def maxpool_cnn():
    torch.manual_seed(3)
    return nn.Sequential(
        models.Normalize((0.5,), (0.25,)),
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, padding=1),
        nn.Flatten(), nn.Linear(36, 3),
    ).double().eval()


def resnet():
    torch.manual_seed(4)
    return randomise_bn(nn.Sequential(
        models.Normalize((0.5,), (0.25,)),
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.Sequential(models.PreActBlock(4, 4, 1), models.PreActBlock(4, 8, 2)),
        nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(3), nn.Flatten(), nn.Linear(8, 3),
    )).double().eval()


def inputs(shape, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g, dtype=torch.float64)
    x[0].clamp_(0.2, 0.8)
    x[1, ..., 0] = 0.0  # pixels on the border of [0, 1]: the clipping must be handled
    x[1, ..., -1] = 1.0
    return x


def ball_samples(x, eps, n, seed=None):
    """Uniform points and random vertices of the ball around each x, clipped to [0, 1]: (n,
    *x.shape). seed: draw from a generator of its own instead of the global one."""
    g = None if seed is None else torch.Generator().manual_seed(seed)
    u = torch.rand(n, *x.shape, generator=g, dtype=x.dtype) * 2 - 1
    u[: n // 2] = u[: n // 2].sign()  # vertices: where linear pieces reach their extremes
    return (x + eps * u).clamp(0, 1)
