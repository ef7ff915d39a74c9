"""Models of the benchmark: structure, output shapes, and parameter counts against closed-form
counts and the published figures (He et al. 2016: ResNet-20 0.27M, ResNet-32 0.46M)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mbf_bench.models import (
    CURVES_AE_SIZES,
    DIGITS_AE_SIZES,
    FACES_AE_SIZES,
    GCN,
    MNIST_AE_SIZES,
    autoencoder,
    count_parameters,
    resnet_cifar,
    vgg16_bn,
)

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _mlp_params(sizes: list[int]) -> int:
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


@pytest.mark.parametrize(
    "sizes", [MNIST_AE_SIZES, FACES_AE_SIZES, CURVES_AE_SIZES, DIGITS_AE_SIZES]
)
def test_autoencoder_structure(sizes: list[int]) -> None:
    model = autoencoder(sizes)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == list(
        zip(sizes[:-1], sizes[1:], strict=True)
    )
    assert all(m.bias is not None for m in linears)
    assert count_parameters(model) == _mlp_params(sizes)
    # ReLU after every hidden layer except the code layer; nothing after the output layer.
    kinds = ["L" if isinstance(m, nn.Linear) else "R" for m in model]
    code = sizes.index(min(sizes[1:-1]))
    expected = []
    for i in range(1, len(sizes)):
        expected.append("L")
        if i not in (code, len(sizes) - 1):
            expected.append("R")
    assert kinds == expected
    assert sizes[code] in (30, 6, 16)


def test_autoencoder_code_and_output_are_linear() -> None:
    torch.manual_seed(0)
    model = autoencoder(DIGITS_AE_SIZES)
    codes = []
    model[4].register_forward_hook(lambda _m, _i, out: codes.append(out))  # the 64 -> 16 layer
    out = model(torch.rand(256, 64))
    assert out.shape == (256, 64)
    assert (codes[0] < 0).any() and (out < 0).any()  # no ReLU clipped them


def test_autoencoder_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="autoencoder"):
        autoencoder([784, 784])


def _resnet_params(depth: int, width: int = 16, classes: int = 10) -> int:
    """Closed form: stem conv + BN, 3 stages of n blocks (2 convs + 2 BNs), FC; option A adds
    no shortcut parameters."""
    n = (depth - 2) // 6
    total = 3 * width * 9 + 2 * width
    in_planes = width
    for planes in (width, 2 * width, 4 * width):
        for _ in range(n):
            total += in_planes * planes * 9 + planes * planes * 9 + 4 * planes
            in_planes = planes
    return total + in_planes * classes + classes


@pytest.mark.parametrize("depth", [8, 20, 32, 56])
def test_resnet_parameter_count(depth: int) -> None:
    with torch.device("meta"):
        model = resnet_cifar(depth)
    assert count_parameters(model) == _resnet_params(depth)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == depth - 1  # + the FC layer = depth weighted layers
    assert all(c.bias is None for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == len(convs)


def test_resnet_published_sizes() -> None:
    assert count_parameters(resnet_cifar(32)) == 464_154  # He et al. Table 6: 0.46M
    assert round(count_parameters(resnet_cifar(20)) / 1e6, 2) == 0.27


def test_resnet_forward_shapes_and_downsampling() -> None:
    torch.manual_seed(0)
    model = resnet_cifar(8, num_classes=100, width=4)
    assert count_parameters(model) == _resnet_params(8, 4, 100)
    features = []
    model.layer3.register_forward_hook(lambda _m, _i, out: features.append(out))
    out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 100) and features[0].shape == (3, 16, 8, 8)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="6n \\+ 2"):
        resnet_cifar(30)


def test_resnet_option_a_shortcut_pads_with_zero_channels() -> None:
    block = resnet_cifar(8, width=4).layer2[0]
    x = torch.randn(2, 4, 8, 8)
    shortcut = block.shortcut(x)
    assert shortcut.shape == (2, 8, 4, 4)
    assert torch.equal(shortcut[:, 2:6], x[:, :, ::2, ::2])
    assert shortcut[:, :2].abs().sum() == 0 and shortcut[:, 6:].abs().sum() == 0
    assert count_parameters(block.shortcut) == 0


def _vgg_params(num_classes: int, scale: float = 1.0, fc: tuple[int, int] = (4096, 4096)) -> int:
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    total, c_in = 0, 3
    for w in (max(1, round(w * scale)) for w in widths):
        total += c_in * w * 9 + w + 2 * w  # conv weight + bias, BN gamma + beta
        c_in = w
    h1, h2 = (max(1, round(f * scale)) for f in fc)
    return total + c_in * h1 + h1 + h1 * h2 + h2 + h2 * num_classes + num_classes


def test_vgg16_bn_full_size_on_meta_device() -> None:
    with torch.device("meta"):
        model = vgg16_bn(num_classes=100)
    assert count_parameters(model) == _vgg_params(100) == 34_015_396
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (512, 4096),
        (4096, 4096),
        (4096, 100),
    ]
    assert sum(isinstance(m, nn.Conv2d) for m in model.features) == 13
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


def test_vgg16_bn_small_forward() -> None:
    torch.manual_seed(0)
    model = vgg16_bn(num_classes=10, fc=(64, 64), width_mult=0.0625)
    assert count_parameters(model) == _vgg_params(10, 0.0625, (64, 64))
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def _dense_gcn(model: GCN, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    w1, w2 = model.layer1.weight, model.layer2.weight
    return a @ torch.relu(a @ x @ w1.T) @ w2.T


def test_gcn_matches_dense_formula_and_trains_its_linear_layers() -> None:
    torch.manual_seed(0)
    n, f = 12, 9
    a = (torch.rand(n, n) < 0.3).float()
    a = ((a + a.T) > 0).float() + torch.eye(n)
    d = a.sum(1).rsqrt()
    a = d[:, None] * a * d[None, :]
    x = torch.rand(n, f)
    model = GCN(f, hidden=5, num_classes=3).eval()
    assert isinstance(model.layer1, nn.Linear) and model.layer1.bias is None
    expected = _dense_gcn(model, x, a)
    torch.testing.assert_close(model(x, a.to_sparse()), expected)
    torch.testing.assert_close(model(x, a), expected)
    model.train()
    out = model(x, a.to_sparse())
    assert not torch.allclose(out, expected)  # dropout is active in training mode
    out.square().sum().backward()
    assert model.layer1.weight.grad is not None and model.layer2.weight.grad is not None
    assert count_parameters(model) == f * 5 + 5 * 3


def test_gcn_on_cora() -> None:
    if not (SHARED_DATA / "planetoid").is_dir():
        pytest.skip(f"real data {SHARED_DATA / 'planetoid'} not present")
    from mbf_bench.data import load_planetoid

    graph = load_planetoid(SHARED_DATA)
    model = GCN(graph.features.shape[1], num_classes=graph.num_classes).eval()
    logits = model(graph.features, graph.adjacency)
    assert logits.shape == (2708, 7) and torch.isfinite(logits).all()


def test_count_parameters_counts_shared_tensors_once() -> None:
    layer = nn.Linear(3, 3)
    assert count_parameters(nn.Sequential(layer, layer)) == 12
