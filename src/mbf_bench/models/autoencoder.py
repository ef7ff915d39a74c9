"""Deep autoencoders of the paper's experiments (Hinton & Salakhutdinov 2006 sizes, ReLU)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

MNIST_AE_SIZES = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
FACES_AE_SIZES = [625, 2000, 1000, 500, 30, 500, 1000, 2000, 625]
CURVES_AE_SIZES = [784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784]
#: A CPU-sized autoencoder for scikit-learn's 8x8 digits (64 pixels, 16-unit code).
DIGITS_AE_SIZES = [64, 128, 64, 16, 64, 128, 64]


def autoencoder(sizes: Sequence[int]) -> nn.Sequential:
    """Fully connected autoencoder with layer widths ``sizes`` (input, hidden..., output).

    Every layer is ``nn.Linear`` (with bias). ReLU follows each hidden layer except the code
    layer, the narrowest hidden layer, which stays linear; the output layer is linear too: it
    returns logits, and the loss applies the sigmoid (cross-entropy) or compares directly
    (squared error), as in the TNT / K-BFGS / MBF framework. Weights keep PyTorch's default
    initialization.
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 3 or min(sizes) < 1:
        raise ValueError(f"autoencoder: need input, >= 1 hidden and output sizes >= 1, got {sizes}")
    hidden = sizes[1:-1]
    code = 1 + hidden.index(min(hidden))  # index in `sizes` of the code layer
    layers: list[nn.Module] = []
    for i in range(1, len(sizes)):
        layers.append(nn.Linear(sizes[i - 1], sizes[i]))
        if i != code and i != len(sizes) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)
