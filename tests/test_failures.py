"""Singular, indefinite and NaN blocks, non-finite and sparse gradients: never a NaN parameter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mbf import MBF
from mbf.linalg import damped_cholesky, damped_inverse
from reference import PAPER_FORM


def _step(opt: MBF, model: nn.Module, scale: float = 1.0) -> None:
    opt.zero_grad()
    (model(torch.randn(4, 3, dtype=torch.float64)).sin().sum() * scale).backward()
    opt.step()


def test_damped_cholesky_retries_and_falls_back() -> None:
    good = torch.eye(3, dtype=torch.float64)[None] * 2.0
    indefinite = -torch.eye(3, dtype=torch.float64)[None] * 0.5  # fixed by 10x damping retries
    hopeless = -torch.eye(3, dtype=torch.float64)[None] * 1e6
    poisoned = torch.full((1, 3, 3), float("nan"), dtype=torch.float64)
    fisher = torch.cat([good, indefinite, hopeless, poisoned])
    factor, report = damped_cholesky(fisher, damping=0.1)
    assert (report.retried, report.fallback, report.nonfinite) == (1, 2, 1)
    assert torch.isfinite(factor).all()
    torch.testing.assert_close(
        factor[0] @ factor[0].T, good[0] + 0.1 * torch.eye(3, dtype=torch.float64)
    )
    # Retried with 10x damping (1.0): -0.5 I + I = 0.5 I.
    torch.testing.assert_close(factor[1] @ factor[1].T, 0.5 * torch.eye(3, dtype=torch.float64))
    # Fallbacks precondition with (1 / damping) I.
    torch.testing.assert_close(factor[2], 0.1**0.5 * torch.eye(3, dtype=torch.float64))
    inverse, _ = damped_inverse(fisher, damping=0.1)
    torch.testing.assert_close(inverse[1], 2.0 * torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(inverse[3], 10.0 * torch.eye(3, dtype=torch.float64))
    assert torch.isfinite(inverse).all()


def test_zero_damping_singular_block_is_retried() -> None:
    rank_one = torch.ones(1, 3, 3, dtype=torch.float32)
    factor, report = damped_cholesky(rank_one, damping=0.0)
    assert report.retried == 1 and report.fallback == 0 and torch.isfinite(factor).all()


@pytest.mark.parametrize("poison", ["nan", "indefinite", "singular"])
def test_bad_statistics_never_reach_the_parameters(poison: str) -> None:
    damping = 1e-3 if poison != "singular" else 0.0
    layer = nn.Linear(3, 2).double()  # two row blocks of size 4
    opt = MBF(layer, lr=0.1, momentum=0.0, damping=damping, stat_decay=0.5, inv_every=1,
              max_block_size=4, stat_every=1 if poison != "singular" else 1000, **PAPER_FORM)
    _step(opt, layer)
    unit = opt.blocks()[0]
    eye = torch.eye(4, dtype=torch.float64)
    if poison == "nan":
        unit.fisher[0, 1, 1] = float("nan")
    elif poison == "indefinite":  # stays indefinite after blending in this step's estimate
        unit.fisher[1] = -1e9 * eye
    else:  # zero statistics and zero damping; stat_every keeps new statistics out
        unit.fisher.zero_()
    before = opt.counters
    theta = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1)
    _step(opt, layer)
    c = {k: v - before[k] for k, v in opt.counters.items()}
    g = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
    moved = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1) - theta
    if poison == "singular":
        # Retried with 10x the base damping 1e-6 of an all-zero block: (1e-5 I)^-1, counted.
        assert (c["retried_blocks"], c["fallback_blocks"], c["nonfinite_blocks"]) == (2, 0, 0)
        torch.testing.assert_close(unit.inverse, 1e5 * eye.expand(2, 4, 4))
        torch.testing.assert_close(moved, -0.1 * 1e5 * g)
    else:
        # The hopeless block (NaN, or indefinite past a thousand times the damping) falls
        # back to (1 / damping) I and is counted; the other block is solved as usual.
        bad = 0 if poison == "nan" else 1
        assert (c["retried_blocks"], c["fallback_blocks"]) == (0, 1)
        assert c["nonfinite_blocks"] == (1 if poison == "nan" else 0)
        torch.testing.assert_close(unit.inverse[bad], eye / damping)
        torch.testing.assert_close(moved[bad], -0.1 * g[bad] / damping)
        if poison == "nan":
            assert torch.isfinite(unit.fisher).all()  # the poisoned block was started afresh
    _step(opt, layer)
    assert torch.isfinite(layer.weight).all() and torch.isfinite(layer.bias).all()


def test_nonfinite_gradient_skips_the_step_and_changes_nothing() -> None:
    layer = nn.Linear(3, 2).double()
    opt = MBF(layer, lr=0.1, estimator="per_example")
    _step(opt, layer)
    sd_before = {k: v.clone() for k, v in layer.state_dict().items()}
    fisher_before = opt.blocks()[0].fisher.clone()
    _step(opt, layer, scale=float("inf"))
    assert opt.counters["skipped_steps"] == 1 and opt.counters["steps"] == 1
    for k, v in layer.state_dict().items():
        assert torch.equal(v, sd_before[k])
    assert torch.equal(opt.blocks()[0].fisher, fisher_before)
    _step(opt, layer)
    assert opt.counters["steps"] == 2 and torch.isfinite(opt.blocks()[0].fisher).all()


def test_nonfinite_gradient_can_raise_instead() -> None:
    layer = nn.Linear(3, 2).double()
    opt = MBF(layer, lr=0.1, nonfinite="raise")
    weight = layer.weight.detach().clone()
    with pytest.raises(FloatingPointError, match="no state was changed"):
        _step(opt, layer, scale=float("nan"))
    assert torch.equal(layer.weight, weight) and opt.counters["steps"] == 0


def test_sparse_gradients_are_refused() -> None:
    emb = nn.Embedding(10, 4, sparse=True)
    opt = MBF(emb, lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
