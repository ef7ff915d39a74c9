"""MBF under ``torch.amp.GradScaler``: the same parameters and statistics as without scaling.

The scaler's scale doubles every step (``growth_interval=1``) and halves after an injected
overflow, so it changes throughout the run; scales are powers of two, so scaled and unscaled
runs agree to rounding in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from mbf import MBF
from reference import PAPER_FORM

STEPS = 5
OVERFLOW_STEP = 2  # the scaled run sees an inf here; the reference run has no such step
MICRO = 2  # micro-batches accumulated per step


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.LayerNorm(5), nn.Linear(5, 3)).double()


def _opt(model: nn.Module, estimator: str) -> MBF:
    return MBF(
        model,
        **PAPER_FORM,  # the paper's form, which the float64 references here spell out
        lr=0.05,
        momentum=0.5,
        damping=0.1,
        stat_decay=0.7,
        stat_every=1,
        inv_every=2,
        max_block_size=8,
        estimator=estimator,
        loss_reduction="mean",
    )


def _batches() -> list[list[tuple[Tensor, Tensor]]]:
    gen = torch.Generator().manual_seed(3)
    return [
        [
            (
                torch.randn(6, 4, generator=gen, dtype=torch.float64),
                torch.randn(6, 3, generator=gen, dtype=torch.float64),
            )
            for _ in range(MICRO)
        ]
        for _ in range(STEPS)
    ]


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return (model(x) - y).square().sum(1).mean() / MICRO


def _run(estimator: str, loop: str, scaled: bool) -> tuple[list[Tensor], list[Tensor], MBF]:
    """Train with or without a scaler; ``loop``: "plain" (scale, backward, ``scaler.step``) or
    "unscale_first" (``scaler.unscale_``, then gradient clipping, then ``scaler.step``)."""
    model = _model()
    opt = _opt(model, estimator)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    if scaled and loop == "unscale_first":
        opt.use_grad_scaler(scaler)
    for t, micro in enumerate(_batches()):
        if not scaled and t == OVERFLOW_STEP:
            continue
        opt.zero_grad()
        for x, y in micro:
            loss = _loss(model, x, y)
            if scaled and t == OVERFLOW_STEP:
                loss = loss * float("inf")
            (scaler.scale(loss) if scaled else loss).backward()
        if scaled and loop == "unscale_first":
            scaler.unscale_(opt)
        if loop == "unscale_first":
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        if scaled:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    assert not scaled or scaler.get_scale() != 2.0**8  # the scale really moved
    fishers = [u.fisher.clone() for u in opt.blocks()]
    return fishers, [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.parametrize("loop", ["plain", "unscale_first"])
@pytest.mark.parametrize("estimator", ["per_example", "batch"])
def test_grad_scaler_gives_the_unscaled_run(estimator: str, loop: str) -> None:
    ref_fisher, ref_params, _ = _run(estimator, loop, scaled=False)
    fisher, params, opt = _run(estimator, loop, scaled=True)
    for got, want in zip(fisher, ref_fisher, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    for got, want in zip(params, ref_params, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert opt.counters["steps"] == STEPS - 1
    # The batch estimator leaves scaling and skipping to the scaler, as any optimizer does.
    assert opt.counters["scaler_skipped_steps"] == (1 if estimator == "per_example" else 0)


def test_unscaled_early_without_the_scaler_attached_is_refused() -> None:
    """Per-example statistics of unknown scale are never used."""
    model = _model()
    opt = _opt(model, "per_example")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = _batches()[0][0]
    scaler.scale(_loss(model, x, y)).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"use_grad_scaler\(scaler\)"):
        scaler.step(opt)


def test_the_scaler_protocol_is_used_only_where_needed() -> None:
    """Only an optimizer with active per-example hooks and no attached scaler asks GradScaler to
    leave the unscaling to it (frameworks may then refuse gradient clipping)."""
    scaler = torch.amp.GradScaler("cpu")
    per_example = _opt(_model(), "per_example")
    assert per_example._step_supports_amp_scaling
    per_example.use_grad_scaler(scaler)
    assert not per_example._step_supports_amp_scaling
    per_example.use_grad_scaler(None)
    per_example.remove_hooks()
    assert not per_example._step_supports_amp_scaling
    assert not _opt(_model(), "batch")._step_supports_amp_scaling
    with pytest.raises(TypeError, match="use_grad_scaler needs a torch.amp.GradScaler"):
        per_example.use_grad_scaler(2.0**8)
