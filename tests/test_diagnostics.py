"""``MBF.diagnostics()``: a flat dict of numbers, each checked against what it claims to be."""

from __future__ import annotations

import math

import torch
from torch import nn

from mbf import MBF
from reference import PAPER_FORM

DAMPING = 0.1


def _opt(layer: nn.Module) -> MBF:
    return MBF(
        layer,
        **PAPER_FORM,  # the paper's form, which the float64 references here spell out
        lr=0.05,
        momentum=0.0,
        damping=DAMPING,
        stat_decay=0.5,
        stat_every=1,
        inv_every=1,
        max_block_size=32,
        weight_decay=0.0,
        kl_clip=None,
    )


def _step(opt: MBF, layer: nn.Module) -> None:
    opt.zero_grad()
    layer(torch.randn(5, 3, dtype=torch.float64)).sin().sum().backward()
    opt.step()


def test_step_to_grad_norm_is_the_preconditioned_direction_over_the_gradient() -> None:
    """First step, batch estimator, no momentum: every unit-wise block is ``F_b = g_b g_b^T``,
    so ``d_b = g_b / (|g_b|^2 + damping)`` in closed form."""
    layer = nn.Linear(3, 2).double()
    opt = _opt(layer)
    _step(opt, layer)
    rows = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)  # one block per row
    sq = rows.square().sum(1)
    d_norm = (sq / (sq + DAMPING) ** 2).sum().sqrt()
    want = float(d_norm / sq.sum().sqrt())
    got = opt.diagnostics()
    assert math.isclose(got["group0/step_to_grad_norm"], want, rel_tol=1e-6)
    assert got["group0/damping"] == DAMPING and got["group0/lr"] == 0.05
    assert all(isinstance(v, float) for v in got.values())


def test_counts_fractions_and_seconds() -> None:
    layer = nn.Linear(3, 2).double()
    opt = _opt(layer)
    _step(opt, layer)
    first = opt.diagnostics()
    assert first["steps"] == 1.0 and first["factorizations"] == 1.0
    assert first["fallback_block_fraction"] == 0.0 and first["retried_block_fraction"] == 0.0
    assert first["seconds/statistics"] > 0.0 and first["seconds/factorization"] > 0.0

    # One hopeless block (curvature -1e12 I): of the 2 + 2 blocks factored, 1 falls back.
    opt.blocks()[0].fisher[1] = -1e12 * torch.eye(4, dtype=torch.float64)
    _step(opt, layer)
    # A non-finite gradient: the step is skipped and counted.
    opt.zero_grad()
    layer(torch.randn(5, 3, dtype=torch.float64)).sum().mul(float("inf")).backward()
    opt.step()
    later = opt.diagnostics()
    assert later["fallback_block_fraction"] == 0.25 and later["retried_block_fraction"] == 0.0
    assert later["steps"] == 2.0 and later["skipped_steps"] == 1.0
    assert later["scaler_skipped_steps"] == 0.0
    assert later["seconds/statistics"] > first["seconds/statistics"]
    assert later["seconds/factorization"] > first["seconds/factorization"]


def test_one_entry_per_param_group() -> None:
    a, b = nn.Linear(3, 2).double(), nn.Linear(2, 2).double()
    model = nn.Sequential(a, b)
    opt = MBF(
        [{"params": a.parameters(), "damping": 0.2}, {"params": b.parameters(), "lr": 0.01}],
        **PAPER_FORM,  # the paper's form, which the float64 references here spell out
        lr=0.05,
        momentum=0.0,
        damping=0.1,
        inv_every=1,
        model=model,
    )
    opt.zero_grad()
    model(torch.randn(5, 3, dtype=torch.float64)).square().sum().backward()
    opt.step()
    got = opt.diagnostics()
    assert (got["group0/damping"], got["group1/damping"]) == (0.2, 0.1)
    assert (got["group0/lr"], got["group1/lr"]) == (0.05, 0.01)
    assert got["group0/step_to_grad_norm"] > 0 and got["group1/step_to_grad_norm"] > 0
