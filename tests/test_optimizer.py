"""The update rule, its schedules and the torch.optim.Optimizer contract.

Comparisons of two configurations (save and resume, queued statistics, loading into another
queue or storage) are cases of the equivalence harness (``tests/test_equivalence.py``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reference import block_diagonal, dense_blocks, paper_mbf, unit_vectors
from tensors import flat_params


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
        nn.Tanh(),
        nn.Linear(5, 3),
        nn.LayerNorm(3),
    ).double()


def _batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (n,))


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def _per_example_fisher(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> dict[int, torch.Tensor]:
    """Per-example loss gradients ``(N, *shape)`` keyed by parameter id."""

    def loss_one(out: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, label)

    grads = {}
    names = dict(model.named_parameters())
    for i in range(x.shape[0]):
        model.zero_grad()
        loss_one(model(x[i : i + 1]), y[i : i + 1]).backward()
        for p in names.values():
            grads.setdefault(id(p), []).append(p.grad.clone())
    model.zero_grad()
    return {k: torch.stack(v) for k, v in grads.items()}


@pytest.mark.parametrize("estimator", ["batch", "per_example"])
def test_step_equals_dense_block_diagonal_solve(estimator: str) -> None:
    """The whole pipeline (statistics, factorization, solve) against a dense solve."""
    model, (x, y) = _net(), _batch()
    damping = 0.03
    pe = _per_example_fisher(model, x, y) if estimator == "per_example" else None
    opt = paper_mbf(
        model,
        lr=1.0,
        momentum=0.0,
        damping=damping,
        inv_every=1,
        estimator=estimator,
        max_block_size=5,
    )
    before = flat_params(model)
    _loss(model, x, y).backward()
    grads = {id(p): p.grad.clone() for p in model.parameters()}
    opt.step()
    after = flat_params(model)
    moved = dict(
        zip(
            [id(p) for p in model.parameters()],
            torch.split(after - before, [p.numel() for p in model.parameters()]),
            strict=True,
        )
    )
    for unit in opt.blocks():
        g = torch.cat([grads[id(p)].reshape(-1) for p in unit.params])
        if pe is None:
            fisher = torch.outer(g, g)
        else:  # every unit of this net is served, the LayerNorm pairs included
            v = unit_vectors([pe[id(p)] for p in unit.params])
            fisher = v.T @ v / x.shape[0]
        stacked = torch.zeros_like(unit.fisher)
        for b, blk in enumerate(dense_blocks(unit.layout, fisher)):
            stacked[b, : blk.shape[0], : blk.shape[0]] = blk
        dense = block_diagonal(unit.layout, stacked, damping)
        step = torch.cat([moved[id(p)] for p in unit.params])
        torch.testing.assert_close(step, -torch.linalg.solve(dense, g), rtol=1e-8, atol=1e-11)


def test_one_block_per_layer_is_the_layerwise_natural_gradient() -> None:
    layer = nn.Linear(6, 1).double()  # one output unit: its block is the whole layer
    x, t = torch.randn(9, 6, dtype=torch.float64), torch.randn(9, 1, dtype=torch.float64)
    grads = []
    for i in range(9):
        layer.zero_grad()
        (0.5 * (layer(x[i : i + 1]) - t[i : i + 1]).square().sum()).backward()
        grads.append(torch.cat([layer.weight.grad.reshape(-1), layer.bias.grad]))
    layer.zero_grad()
    opt = paper_mbf(
        layer, lr=1.0, momentum=0.0, damping=0.1, estimator="per_example", max_block_size=64
    )
    G = torch.stack(grads)
    fisher = G.T @ G / 9
    g = G.mean(0)
    before = torch.cat([layer.weight.detach().reshape(-1), layer.bias.detach()]).clone()
    (0.5 * (layer(x) - t).square().sum(1)).mean().backward()
    opt.step()
    after = torch.cat([layer.weight.detach().reshape(-1), layer.bias.detach()])
    expected = -torch.linalg.solve(fisher + 0.1 * torch.eye(7, dtype=torch.float64), g)
    torch.testing.assert_close(after - before, expected, rtol=1e-9, atol=1e-12)


def test_size_one_blocks_give_the_diagonal_formula() -> None:
    model, (x, y) = _net(), _batch()
    opt = paper_mbf(model, lr=1.0, momentum=0.0, damping=0.2, max_block_size=1)
    before = flat_params(model)
    _loss(model, x, y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    opt.step()
    norm_idx = sum(p.numel() for p in list(model.parameters())[:-2])
    diag = (after := flat_params(model)) - before
    # Every unit but the LayerNorm's fixed 2x2 pairs has size-1 blocks: d = g / (g^2 + damping).
    torch.testing.assert_close(diag[:norm_idx], -(g / (g * g + 0.2))[:norm_idx])
    assert torch.isfinite(after).all()


def test_running_average_and_frequencies() -> None:
    torch.manual_seed(1)
    layer = nn.Linear(3, 2).double()
    opt = paper_mbf(
        layer, lr=0.01, momentum=0.0, damping=0.1, stat_decay=0.7, stat_every=2, inv_every=3
    )
    unit = opt.blocks()[0]
    expected = None
    factors = []
    for t in range(7):
        opt.zero_grad()
        layer(torch.randn(4, 3, dtype=torch.float64)).sin().sum().backward()
        g = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
        est = g[:, :, None] * g[:, None, :]
        if t % 2 == 0:
            expected = est if expected is None else 0.7 * expected + 0.3 * est
        opt.step()
        unit = opt.blocks()[0]  # folds queued statistics (stat_buffer) into the running average
        torch.testing.assert_close(unit.fisher, expected)
        factors.append(unit.inverse.clone())
        if t % 3 == 0:
            damped = expected + 0.1 * torch.eye(4, dtype=torch.float64)
            torch.testing.assert_close(unit.inverse, torch.linalg.inv(damped))
        else:
            assert torch.equal(factors[-1], factors[-2])
    assert opt.counters["factorizations"] == 3 and opt.counters["steps"] == 7


def test_momentum_and_both_weight_decays() -> None:
    torch.manual_seed(2)
    for decoupled in (False, True):
        layer = nn.Linear(3, 2).double()
        opt = paper_mbf(
            layer,
            lr=0.5,
            momentum=0.8,
            damping=1.0,
            inv_every=1,
            max_block_size=1,
            weight_decay=0.1,
            decoupled_weight_decay=decoupled,
            stat_decay=0.0,
        )
        theta = layer.weight.detach().clone()
        m = torch.zeros_like(theta)
        for _ in range(3):
            opt.zero_grad()
            layer(torch.randn(5, 3, dtype=torch.float64)).square().mean().backward()
            g = layer.weight.grad.clone()
            m = 0.8 * m + g + (0.0 if decoupled else 0.1 * theta)
            d = m / (g * g + 1.0)
            theta = theta * (1 - 0.5 * 0.1 if decoupled else 1.0) - 0.5 * d
            opt.step()
            torch.testing.assert_close(layer.weight.detach(), theta)


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_kl_clip_scales_the_step_as_kfac_does(weight_decay: float) -> None:
    torch.manual_seed(8)
    a, b = nn.Linear(4, 3).double(), nn.Linear(4, 3).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 4, dtype=torch.float64)
    lr, clip = 0.5, 1e-6
    kw = dict(lr=lr, momentum=0.0, damping=1e-2, weight_decay=weight_decay)
    opt_a = paper_mbf(a, **kw)
    opt_b = paper_mbf(b, kl_clip=clip, **kw)
    w0 = torch.cat([a.weight.detach(), a.bias.detach()[:, None]], 1)
    for opt, m in ((opt_a, a), (opt_b, b)):
        m(x).square().sum().backward()
        opt.step()
    # The preconditioned vector m is the gradient plus the L2 term (no momentum).
    g = torch.cat([a.weight.grad, a.bias.grad[:, None]], 1) + weight_decay * w0
    d = (w0 - torch.cat([a.weight.detach(), a.bias.detach()[:, None]], 1)) / lr  # unclipped
    nu = min(1.0, (clip / (lr * lr * float((d * g).sum()))) ** 0.5)
    assert nu < 1.0
    moved = w0 - torch.cat([b.weight.detach(), b.bias.detach()[:, None]], 1)
    torch.testing.assert_close(moved, lr * nu * d)


def test_load_rejects_a_different_layout() -> None:
    model = _net()
    sd = paper_mbf(model, lr=0.1, max_block_size=5).state_dict()
    other = paper_mbf(model, lr=0.1, max_block_size=32)
    other.load_state_dict(sd)  # hyperparameters, max_block_size included, come from the save
    assert other.blocks()[0].layout.block_size == 5
    wide, narrow = nn.Linear(6, 3), nn.Linear(3, 6)
    target = paper_mbf(narrow, lr=0.1, damping=0.5)
    before = target.state_dict()
    with pytest.raises(ValueError, match="another model"):
        target.load_state_dict(paper_mbf(wide, lr=0.1).state_dict())
    after = target.state_dict()  # nothing was lost
    assert after["param_groups"] == before["param_groups"]
    assert [u.fisher.shape for u in target.blocks()] == [(6, 4, 4)]
    with pytest.raises(ValueError, match="no MBF curvature"):
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        paper_mbf(model, lr=0.1).load_state_dict(sgd.state_dict())


def _dense_direction(layout, fisher: torch.Tensor, g: torch.Tensor, damping: float):
    """``(blockdiag(fisher) + damping I)^-1 g`` built densely from a unit's ``(n, n)`` Fisher."""
    blocks = dense_blocks(layout, fisher)
    size = max(b.shape[0] for b in blocks)
    stacked = torch.zeros(len(blocks), size, size, dtype=fisher.dtype)
    for b, blk in enumerate(blocks):
        stacked[b, : blk.shape[0], : blk.shape[0]] = blk
    return torch.linalg.solve(block_diagonal(layout, stacked, damping), g)


def test_lr_scheduler_and_param_groups() -> None:
    torch.manual_seed(5)
    a, b = nn.Linear(3, 2).double(), nn.Linear(3, 2).double()
    b.load_state_dict(a.state_dict())
    xs = [torch.randn(4, 3, dtype=torch.float64) for _ in range(2)]
    kw = dict(momentum=0.0, damping=0.3, stat_decay=0.9, inv_every=1, max_block_size=32)
    opt_a = paper_mbf(a, lr=1.0, **kw)
    opt_b = paper_mbf(
        [{"params": [b.weight], "lr": 0.5}, {"params": [b.bias], "lr": 0.25}],
        lr=1.0,
        model=b,
        **kw,
    )
    sched = torch.optim.lr_scheduler.StepLR(opt_a, step_size=1, gamma=0.5)
    # Groups split the Linear unit: the weight keeps row blocks, the bias gets its own blocks.
    assert [u.name for u in opt_b.blocks()] == ["<root> (Linear)", "bias"]
    unit_a = opt_a.blocks()[0]
    fisher_a = None
    for t, x in enumerate(xs):
        for opt, m in ((opt_a, a), (opt_b, b)):
            opt.zero_grad()
            m(x).sin().sum().backward()
        theta_a = flat_params(a)  # the unit's coordinates: weight then bias, flattened
        g_a = torch.cat([a.weight.grad.reshape(-1), a.bias.grad])
        est = torch.outer(g_a, g_a)
        fisher_a = est if fisher_a is None else 0.9 * fisher_a + 0.1 * est
        lr = 1.0 * 0.5**t  # StepLR halves the rate after every step
        assert opt_a.param_groups[0]["lr"] == lr
        expected_a = theta_a - lr * _dense_direction(unit_a.layout, fisher_a, g_a, 0.3)
        expected_b = [
            p.detach() - group_lr * _dense_direction(
                u.layout, torch.outer(p.grad.reshape(-1), p.grad.reshape(-1)),
                p.grad.reshape(-1), 0.3,
            ).reshape(p.shape)
            for p, group_lr, u in ((b.weight, 0.5, opt_b.blocks()[0]),
                                   (b.bias, 0.25, opt_b.blocks()[1]))
        ]
        opt_a.step()
        sched.step()
        if t == 0:
            opt_b.step()
            torch.testing.assert_close(b.weight.detach(), expected_b[0], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(b.bias.detach(), expected_b[1], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(flat_params(a), expected_a, rtol=1e-10, atol=1e-12)


def test_group_lr_scales_the_update_exactly() -> None:
    torch.manual_seed(6)
    a, b = nn.Linear(3, 2).double(), nn.Linear(3, 2).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3, dtype=torch.float64)
    opt_a = paper_mbf([{"params": a.parameters()}], lr=1.0, model=a)
    opt_b = paper_mbf([{"params": b.parameters(), "lr": 0.25}], lr=1.0, model=b)
    w0 = a.weight.detach().clone()
    for opt, m in ((opt_a, a), (opt_b, b)):
        m(x).sin().sum().backward()
        opt.step()
    torch.testing.assert_close(b.weight.detach() - w0, 0.25 * (a.weight.detach() - w0))


def test_parameters_without_gradients_are_skipped() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)).double()
    opt = paper_mbf(model, lr=0.1)
    frozen = model[0].weight.detach().clone()
    model[1](torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    opt.step()
    assert torch.equal(model[0].weight, frozen)
    assert opt.blocks()[0].fisher.abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_parameters_keep_float32_state(dtype: torch.dtype) -> None:
    torch.manual_seed(7)
    ref = nn.Linear(8, 4)
    low = nn.Linear(8, 4).to(dtype)
    low.load_state_dict({k: v.to(dtype) for k, v in ref.state_dict().items()})
    ref.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    x = torch.randn(16, 8)
    opt_ref, opt_low = paper_mbf(ref, lr=0.1, damping=0.1), paper_mbf(low, lr=0.1, damping=0.1)
    for _ in range(3):
        for opt, m in ((opt_ref, ref), (opt_low, low)):
            opt.zero_grad()
            m(x.to(m.weight.dtype)).float().square().mean().backward()
            opt.step()
    unit = opt_low.blocks()[0]
    assert unit.fisher.dtype == torch.float32 and unit.inverse.dtype == torch.float32
    assert opt_low.state[low.weight]["momentum_buffer"].dtype == torch.float32
    assert low.weight.dtype == dtype
    torch.testing.assert_close(low.weight.float(), ref.weight, rtol=0.05, atol=0.02)
    sd = opt_low.state_dict()
    opt_low.load_state_dict(sd)
    assert opt_low.state[low.weight]["momentum_buffer"].dtype == torch.float32


def test_memory_report_and_budget() -> None:
    model = nn.Sequential(nn.Linear(100, 50), nn.Linear(50, 10))
    opt = paper_mbf(model, lr=0.1, max_block_size=20)
    report = opt.memory_report()
    # Linear(100, 50): rows of 101 -> 6 chunks of 17 -> 300 blocks of 17^2, x2, + a queue of
    # 4 (stat_buffer) block vectors + momentum.
    assert report["0 (Linear)"] == 4 * (2 * 300 * 17 * 17 + 300 * 4 * 17 + 5050)
    with pytest.raises(ValueError, match=r"0 \(Linear\).*max_block_size"):
        paper_mbf(model, lr=0.1, max_block_size=64, max_state_bytes=1_000_000)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": -1.0}, ValueError, "lr"),
        ({"damping": -1e-3}, ValueError, "damping"),
        ({"stat_decay": 1.0}, ValueError, "stat_decay"),
        ({"momentum": -0.1}, ValueError, "momentum"),
        ({"stat_every": 0}, ValueError, "stat_every"),
        ({"inv_every": 1.5}, TypeError, "inv_every"),
        ({"max_block_size": 0}, ValueError, "max_block_size"),
        ({"weight_decay": -1.0}, ValueError, "weight_decay"),
        ({"estimator": "kfac"}, ValueError, "estimator"),
        ({"loss_reduction": "none"}, ValueError, "loss_reduction"),
        ({"nonfinite": "ignore"}, ValueError, "nonfinite"),
        ({"kl_clip": 0.0}, ValueError, "kl_clip"),
        ({"stat_buffer": 0}, ValueError, "stat_buffer"),
    ],
)
def test_invalid_hyperparameters_are_refused(kwargs: dict, error: type, match: str) -> None:
    params = dict({"lr": 0.1}, **kwargs)
    with pytest.raises(error, match=match):
        paper_mbf(nn.Linear(2, 2), **params)


def test_per_example_needs_the_model() -> None:
    with pytest.raises(ValueError, match="needs the model"):
        paper_mbf(nn.Linear(2, 2).parameters(), lr=0.1, estimator="per_example")


def test_kl_clip_after_momentum_is_switched_off_uses_the_gradient_not_a_stale_buffer() -> None:
    """With momentum set to 0 mid-run the preconditioned vector is the gradient; the KL clip
    must measure that vector, not the momentum buffer left from the earlier steps (issue 10)."""
    torch.manual_seed(9)
    a, b = nn.Linear(4, 3).double(), nn.Linear(4, 3).double()
    b.load_state_dict(a.state_dict())
    kw = dict(lr=0.5, damping=1e-2, kl_clip=1e-6, inv_every=1)
    with_history = paper_mbf(a, momentum=0.9, **kw)
    x = torch.randn(5, 4, dtype=torch.float64)
    for _ in range(3):  # builds a momentum buffer
        with_history.zero_grad()
        a(x).square().sum().backward()
        with_history.step()
    with_history.param_groups[0]["momentum"] = 0.0
    b.load_state_dict(a.state_dict())
    fresh = paper_mbf(b, momentum=0.0, **kw)
    fresh.load_state_dict(with_history.state_dict())  # same curvature, and the stale buffer
    for opt, m in ((with_history, a), (fresh, b)):
        opt.zero_grad()
        m(x).square().sum().backward()
    fresh.state[b.weight].pop("momentum_buffer", None)  # the twin never had one
    fresh.state[b.bias].pop("momentum_buffer", None)
    with_history.step()
    fresh.step()
    torch.testing.assert_close(a.weight.detach(), b.weight.detach(), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(a.bias.detach(), b.bias.detach(), rtol=1e-10, atol=1e-13)


def test_finish_replaces_exactly_the_overflowed_blocks_under_grafting() -> None:
    """Rows with an infinite entry, a NaN, or finite entries whose length overflows float32 take
    the right-hand side's direction; every row ends at its graft length; without grafting the
    rows are only scaled (a non-finite row stays so and the step is then not applied)."""
    from mbf.direction import finish

    solved = torch.tensor([[3.0, 4.0], [float("inf"), 1.0], [float("nan"), 0.0], [3e38, 3e38]])
    rhs = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [-1.0, -1.0]])
    graft = torch.tensor([10.0, 1.0, 5.0, 2.0])
    out, count = finish(solved.clone(), graft, 7.0, rhs)
    expected = torch.stack([torch.tensor([6.0, 8.0]), torch.tensor([0.0, 1.0]),
                            torch.tensor([3.0, 4.0]), -torch.ones(2) * 2**0.5])
    assert count == 3
    torch.testing.assert_close(out, expected)
    plain, none = finish(solved.clone(), None, 2.0, rhs)
    assert none == 0 and plain[0].tolist() == [6.0, 8.0] and not torch.isfinite(plain[1:3]).all()
