"""The model zoo: plain nn.Modules, inputs in [0, 1], normalisation as the first layer.

Every network that the architecture allows is a flat ``nn.Sequential`` of standard layers so that a
bound engine can walk it layer by layer; the wide ResNet is a Sequential whose residual stages are
the only composite modules.  This module knows nothing of the extension.
"""

from __future__ import annotations

import math

import torch
from torch import nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# Pixel statistics of scikit-learn's 8x8 digits after scaling 0..16 to [0, 1].
DIGITS_MEAN = (0.3053,)
DIGITS_STD = (0.3760,)


class Normalize(nn.Module):
    """(x - mean) / std per channel.  Buffers, not parameters: it never trains and never prunes.

    Keeping it inside the model means perturbation budgets and bounds always live in pixel space.
    """

    def __init__(self, mean, std):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        if mean.shape != std.shape:
            raise ValueError(f"Normalize: mean has {mean.numel()} channels but std has {std.numel()}")
        if (std <= 0).any():
            raise ValueError(f"Normalize: std must be positive, got {std.flatten().tolist()}")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def relu_net(mean, std, convs=(), hidden=(), flat: int = 0, num_classes: int = 10) -> nn.Sequential:
    """Normalize, then conv layers (in, out, kernel, stride, padding) each with a ReLU, Flatten,
    then linear layers of the ``hidden`` widths each with a ReLU, then the classifier; ``flat``
    is the number of features after Flatten. The verifiable-training networks are of this kind."""
    layers: list[nn.Module] = [Normalize(mean, std)]
    for c_in, c_out, k, stride, padding in convs:
        layers += [nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding), nn.ReLU()]
    layers.append(nn.Flatten())
    for width in hidden:
        layers += [nn.Linear(flat, width), nn.ReLU()]
        flat = width
    layers.append(nn.Linear(flat, num_classes))
    return nn.Sequential(*layers)


def cnn_small(num_classes: int = 10, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> nn.Sequential:
    """HYDRA's "cifar_model": the small verifiable-training CNN (214,918 parameters)."""
    return relu_net(mean, std, [(3, 16, 4, 2, 1), (16, 32, 4, 2, 1)], [100], 32 * 8 * 8,
                    num_classes)


def cnn_large(num_classes: int = 10, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> nn.Sequential:
    """HYDRA's "cifar_model_large" (2,466,858 parameters)."""
    return relu_net(mean, std, [(3, 32, 3, 1, 1), (32, 32, 4, 2, 1), (32, 64, 3, 1, 1),
                                (64, 64, 4, 2, 1)], [512, 512], 64 * 8 * 8, num_classes)


VGG16_CHANNELS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def vgg16_bn(num_classes: int = 10, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> nn.Sequential:
    """HYDRA's CIFAR VGG16-BN: 13 bias-free convs + BN, a 2x2 adaptive pool, a 3-layer head."""
    layers: list[nn.Module] = [Normalize(mean, std)]
    in_ch = 3
    for v in VGG16_CHANNELS:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(in_ch, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
            in_ch = v
    layers += [
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(in_ch * 2 * 2, 256), nn.ReLU(),
        nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, num_classes),
    ]
    model = nn.Sequential(*layers)
    # HYDRA's initialisation (torchvision's VGG recipe), so results are comparable with theirs.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


class PreActBlock(nn.Module):
    """Pre-activation basic block of a wide ResNet: BN-ReLU-conv3x3-BN-ReLU-conv3x3 + shortcut.

    Where the shape changes, the shortcut is a 1x1 conv applied to the pre-activated input, as in
    the reference WRN implementation that HYDRA uses.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut = (
            None if in_ch == out_ch and stride == 1
            else nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(o)
        o = self.conv2(self.relu(self.bn2(self.conv1(o))))
        return o + identity


def wrn_28_4(num_classes: int = 10, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> nn.Sequential:
    """Wide ResNet 28-4 without dropout (5,849,050 parameters)."""
    depth, widen = 28, 4
    n = (depth - 4) // 6
    widths = (16, 16 * widen, 32 * widen, 64 * widen)

    def stage(in_ch, out_ch, stride):
        return nn.Sequential(*[PreActBlock(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1)
                               for i in range(n)])

    model = nn.Sequential(
        Normalize(mean, std),
        nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
        stage(widths[0], widths[1], 1),
        stage(widths[1], widths[2], 2),
        stage(widths[2], widths[3], 2),
        nn.BatchNorm2d(widths[3]), nn.ReLU(),
        nn.AvgPool2d(8), nn.Flatten(),
        nn.Linear(widths[3], num_classes),
    )
    # The reference WRN initialisation (He-normal over fan_out, zero linear bias).
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    return model


def digits_mlp(num_classes: int = 10, mean=DIGITS_MEAN, std=DIGITS_STD) -> nn.Sequential:
    """A two-layer MLP for 1x8x8 digits: the cheapest network for demos and bound tests."""
    return relu_net(mean, std, [], [128], 64, num_classes)


def digits_cnn(num_classes: int = 10, mean=DIGITS_MEAN, std=DIGITS_STD) -> nn.Sequential:
    """A small CNN for 1x8x8 digits, shaped like cnn_small (two convs, two linears)."""
    return relu_net(mean, std, [(1, 16, 3, 1, 1), (16, 32, 4, 2, 1)], [64], 32 * 4 * 4,
                    num_classes)


MODELS = {f.__name__: f for f in (cnn_small, cnn_large, vgg16_bn, wrn_28_4, digits_mlp, digits_cnn)}

# The input shape each network expects (channels, height, width).
INPUT_SHAPES = {
    "cnn_small": (3, 32, 32), "cnn_large": (3, 32, 32), "vgg16_bn": (3, 32, 32),
    "wrn_28_4": (3, 32, 32), "digits_mlp": (1, 8, 8), "digits_cnn": (1, 8, 8),
}


def build(name: str, num_classes: int = 10, **kw) -> nn.Module:
    """Build a zoo network by name; ``kw`` may override the normalisation (``mean``, ``std``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return MODELS[name](num_classes=num_classes, **kw)
