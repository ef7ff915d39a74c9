"""VGG-16 with BatchNorm for 32x32 images (CIFAR-100 experiment of the paper).

Thirteen 3x3 conv-BN-ReLU layers in five stages (64, 128, 256, 512, 512 channels), each stage
ending in 2x2 max pooling, so a 32x32 input leaves a 512x1x1 map; then the classifier
512-4096-4096-classes with ReLU, no dropout and no adaptive pooling, as in the authors' framework
("vgg16-NoAdaptiveAvgPoolNoDropout-BN"). Convolutions keep their bias, as in the standard
VGG-16-BN. Full size (CIFAR-100): 34,015,396 parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: Output channels per conv layer; "M" is a 2x2 max pool.
VGG16_LAYOUT: list[int | str] = [
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
]


class VGG(nn.Module):
    """``features`` (conv stages) then ``classifier`` (fully connected layers)."""

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg16_bn(
    num_classes: int = 100, fc: tuple[int, int] = (4096, 4096), width_mult: float = 1.0
) -> VGG:
    """VGG-16-BN for 32x32 inputs; ``width_mult`` scales every conv width and ``fc`` (for
    CPU-sized variants: 0.125 gives 8..64 channels and 512-512 hidden units)."""
    if width_mult <= 0 or num_classes < 1:
        raise ValueError(f"vgg16_bn: width_mult={width_mult} must be > 0, num_classes >= 1")

    def scaled(n: int) -> int:
        return max(1, round(n * width_mult))

    layers: list[nn.Module] = []
    channels = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        out = scaled(int(item))
        conv = nn.Conv2d(channels, out, 3, padding=1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        assert conv.bias is not None
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.BatchNorm2d(out), nn.ReLU()]
        channels = out
    hidden = [scaled(n) for n in fc]
    classifier = nn.Sequential(
        nn.Linear(channels, hidden[0]),
        nn.ReLU(),
        nn.Linear(hidden[0], hidden[1]),
        nn.ReLU(),
        nn.Linear(hidden[1], num_classes),
    )
    return VGG(nn.Sequential(*layers), classifier)
