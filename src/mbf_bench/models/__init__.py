"""Models of the benchmark: the paper's autoencoders, CIFAR ResNet and VGG-16-BN, the GCN and a
small GPT."""

from torch import nn

from .autoencoder import (
    CURVES_AE_SIZES,
    DIGITS_AE_SIZES,
    FACES_AE_SIZES,
    MNIST_AE_SIZES,
    autoencoder,
)
from .gcn import GCN
from .gpt import GPT, GPTConfig
from .resnet import resnet_cifar
from .vgg import vgg16_bn


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (each shared tensor counted once; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "CURVES_AE_SIZES",
    "DIGITS_AE_SIZES",
    "FACES_AE_SIZES",
    "GCN",
    "GPT",
    "GPTConfig",
    "MNIST_AE_SIZES",
    "autoencoder",
    "count_parameters",
    "resnet_cifar",
    "vgg16_bn",
]
