"""Per-example and batch mini-blocks against float64 autodiff ground truth."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from mbf import curvature
from reference import dense_blocks, paper_mbf, per_example_grads, unit_vectors

N = 7


class Head(nn.Module):
    """A fixed nonlinear per-example loss of the layer's output (so output gradients vary)."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.register_buffer("c", torch.randn(shape, dtype=torch.float64))

    def forward(self, out: Tensor) -> Tensor:
        return (torch.sin(out) * self.c).flatten(1).sum(1) + 0.1 * out.flatten(1).square().sum(1)


def _setup(layer: nn.Module, x_shape: tuple[int, ...]) -> tuple[nn.Module, Head, Tensor]:
    layer = layer.double()
    x = torch.randn(N, *x_shape, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
    return layer, Head(out.shape[1:]), x


LAYERS = {
    "linear": (lambda: nn.Linear(6, 4), (6,)),
    "linear-nobias": (lambda: nn.Linear(6, 4, bias=False), (6,)),
    "linear-seq": (lambda: nn.Linear(5, 3), (3, 5)),
    "conv1d-stride": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (3, 9)),
    "conv2d-groups-dilation-same": (
        lambda: nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding="same"),
        (4, 7, 6),
    ),
    "conv2d-even-same": (lambda: nn.Conv2d(3, 4, (2, 3), padding="same", bias=False), (3, 5, 5)),
    "conv2d-reflect": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 5, 6)),
    "conv2d-circular-stride": (
        lambda: nn.Conv2d(2, 3, 3, stride=2, padding=2, padding_mode="circular"),
        (2, 6, 5),
    ),
    "conv3d": (lambda: nn.Conv3d(2, 3, (2, 2, 3), stride=(1, 2, 1), padding=1), (2, 3, 4, 4)),
}


# Convolutions have two routes to per-example gradients (mbf.curvature); test both.
ROUTES = [(name, "im2col") for name in sorted(LAYERS)] + [
    (name, "grouped") for name in sorted(LAYERS) if name.startswith("conv")
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("max_block_size", [32, 4])
@pytest.mark.parametrize(("name", "conv_route"), ROUTES)
def test_per_example_blocks_match_dense_empirical_fisher(
    name: str, conv_route: str, max_block_size: int, reduction: str, monkeypatch
) -> None:
    # Both routes to per-example conv gradients, whatever the layer's number of positions.
    threshold = 0 if conv_route == "grouped" else 10**9
    monkeypatch.setattr(curvature, "GROUPED_MIN_POSITIONS", threshold)
    make, x_shape = LAYERS[name]
    layer, head, x = _setup(make(), x_shape)
    opt = paper_mbf(
        layer,
        lr=0.0,
        estimator="per_example",
        loss_reduction=reduction,
        max_block_size=max_block_size,
        chunk_elements=50,
    )  # tiny chunks: exercise chunking
    per_loss = head(layer(x))
    (per_loss.mean() if reduction == "mean" else per_loss.sum()).backward()
    opt.step()

    grads = per_example_grads(layer, lambda out: head(out).sum(), x)
    by_param = {id(p): grads[k] for k, p in layer.named_parameters()}
    for unit in opt.blocks():
        v = unit_vectors([by_param[id(p)] for p in unit.params])
        dense = v.T @ v / N
        expected = dense_blocks(unit.layout, dense)
        assert len(expected) == unit.fisher.shape[0]
        for got, want in zip(unit.fisher, expected, strict=True):
            k = want.shape[0]
            torch.testing.assert_close(got[:k, :k], want, rtol=1e-10, atol=1e-12)
            assert torch.count_nonzero(got[k:]) == 0 and torch.count_nonzero(got[:, k:]) == 0


@pytest.mark.parametrize("name", ["linear", "conv2d-groups-dilation-same", "linear-seq"])
def test_batch_blocks_are_minibatch_gradient_outer_products(name: str) -> None:
    make, x_shape = LAYERS[name]
    layer, head, x = _setup(make(), x_shape)
    extra = nn.LayerNorm(3).double()  # a module the per-example hooks do not serve
    params = list(layer.parameters()) + list(extra.parameters())
    opt = paper_mbf(params, lr=0.0, max_block_size=4, model=nn.ModuleList([layer, extra]))
    z = torch.randn(N, 3, dtype=torch.float64)
    loss = head(layer(x)).mean() + extra(z).sin().sum()
    loss.backward()
    opt.step()
    for unit in opt.blocks():
        g = torch.cat([p.grad.reshape(-1) for p in unit.params])
        for got, want in zip(
            unit.fisher, dense_blocks(unit.layout, torch.outer(g, g)), strict=True
        ):
            k = want.shape[0]
            torch.testing.assert_close(got[:k, :k], want, rtol=1e-12, atol=1e-14)


def test_per_example_falls_back_to_batch_for_other_modules_with_one_warning() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).double()
    with pytest.warns(UserWarning, match=r"1 \(BatchNorm1d\)"):
        opt = paper_mbf(model, lr=0.0, estimator="per_example")
    x = torch.randn(N, 4, dtype=torch.float64)
    model(x).square().mean().backward()
    opt.step()
    bn = model[1]
    unit = next(u for u in opt.blocks() if "BatchNorm" in u.name)
    g = torch.stack([bn.weight.grad, bn.bias.grad], 1)
    torch.testing.assert_close(unit.fisher, g[:, :, None] * g[:, None, :])


def test_in_place_activation_after_a_hooked_layer() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 2)).double()
    opt = paper_mbf(model, lr=0.0, estimator="per_example")
    x = torch.randn(N, 4, dtype=torch.float64)
    model(x).square().sum(1).mean().backward()
    opt.step()
    grads = per_example_grads(model, lambda out: out.square().sum(), x)
    v = unit_vectors([grads["0.weight"], grads["0.bias"]])
    first = opt.blocks()[0]
    for got, want in zip(first.fisher, dense_blocks(first.layout, v.T @ v / N), strict=True):
        torch.testing.assert_close(got, want)


EMBEDDINGS_AND_NORMS = {
    "embedding": (lambda: nn.Embedding(6, 5), "ids"),
    "embedding-padding": (lambda: nn.Embedding(6, 5, padding_idx=2), "ids"),
    "embedding-freq": (lambda: nn.Embedding(6, 5, scale_grad_by_freq=True), "ids"),
    "layernorm": (lambda: nn.LayerNorm(5), (3, 5)),
    "layernorm-2d-shape": (lambda: nn.LayerNorm((2, 3), eps=1e-3), (4, 2, 3)),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("max_block_size", [32, 2])
@pytest.mark.parametrize("name", sorted(EMBEDDINGS_AND_NORMS))
def test_per_example_blocks_of_embeddings_and_layer_norms(
    name: str, max_block_size: int, reduction: str
) -> None:
    """Float64: token rows (padding_idx, scale_grad_by_freq) and LayerNorm pairs against the
    dense empirical Fisher of torch.func per-example gradients."""
    make, kind = EMBEDDINGS_AND_NORMS[name]
    layer = make().double()
    if kind == "ids":
        x = torch.randint(0, 6, (N, 4))
        x[0, :2] = 2  # token 2 twice in one example (and the padding index, where there is one)
        x[1:, 3] = 5  # token 5 in every example: a row shared across the batch
    else:
        x = torch.randn(N, *kind, dtype=torch.float64)
        with torch.no_grad():
            layer.weight.normal_()
            layer.bias.normal_()
    with torch.no_grad():
        out = layer(x)
    head = Head(out.shape[1:])
    opt = paper_mbf(layer, lr=0.0, estimator="per_example", loss_reduction=reduction,
                    max_block_size=max_block_size, chunk_elements=60)  # tiny chunks
    per_loss = head(layer(x))
    (per_loss.mean() if reduction == "mean" else per_loss.sum()).backward()
    opt.step()
    if name == "embedding-freq":
        # autograd divides a row's gradient by the token's count in the whole batch, which no
        # single-example call sees: the reference divides each example's gradient by it.
        counts = torch.bincount(x.reshape(-1), minlength=6).double()
        grads = {"weight": per_example_grads(layer, lambda o: head(o).sum(), x)["weight"]}
        per_one = torch.stack([torch.bincount(row, minlength=6) for row in x]).double()
        grads["weight"] = grads["weight"] * (per_one / counts.clamp_min(1))[:, :, None]
    else:
        grads = per_example_grads(layer, lambda o: head(o).sum(), x)
    by_param = {id(p): grads[k] for k, p in layer.named_parameters()}
    (unit,) = opt.blocks()
    v = unit_vectors([by_param[id(p)] for p in unit.params])
    expected = dense_blocks(unit.layout, v.T @ v / N)
    assert len(expected) == unit.fisher.shape[0]
    for got, want in zip(unit.fisher, expected, strict=True):
        k = want.shape[0]
        torch.testing.assert_close(got[:k, :k], want, rtol=1e-10, atol=1e-12)
    if name == "embedding-padding":
        assert torch.count_nonzero(unit.fisher.reshape(6, -1)[2]) == 0
