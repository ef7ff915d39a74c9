"""Per-example statistics in the loops people write: gradient accumulation, module reuse.

The reference is the float64 empirical Fisher ``(1/N) sum_i grad l_i grad l_i^T`` of the whole
accumulated batch (``N`` examples over all micro-batches), from autodiff per-example gradients.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from mbf import MBF
from reference import PAPER_FORM, dense_blocks, per_example_grads, unit_vectors

MICRO = 4  # examples per micro-batch


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(18, 4), nn.Tanh(),
        nn.Linear(4, 3),
    ).double()


def _per_example_loss(out: Tensor) -> Tensor:
    """A nonlinear per-example loss so the output gradients differ between examples."""
    return (out.sin() + 0.3 * out.square()).sum(-1)


def _opt(model: nn.Module, reduction: str) -> MBF:
    # Every hyperparameter the statistics depend on, explicitly (defaults may change).
    return MBF(
        model,
        **PAPER_FORM,  # the paper's form, which the float64 references here spell out
        lr=0.0,
        momentum=0.0,
        damping=1.0,
        stat_decay=0.5,
        stat_every=1,
        inv_every=1,
        max_block_size=8,
        estimator="per_example",
        loss_reduction=reduction,
    )


def _reference_fisher(model: nn.Module, x: Tensor) -> dict[int, Tensor]:
    """``{id(first param of unit): dense empirical Fisher}`` of the examples ``x``."""
    grads = per_example_grads(model, lambda out: _per_example_loss(out).sum(), x)
    by_param = {id(p): grads[k] for k, p in model.named_parameters()}
    return by_param


def _assert_unit_blocks(opt: MBF, model: nn.Module, x: Tensor) -> None:
    by_param = _reference_fisher(model, x)
    for unit in opt.blocks():
        v = unit_vectors([by_param[id(p)] for p in unit.params])
        expected = dense_blocks(unit.layout, v.T @ v / x.shape[0])
        for got, want in zip(unit.fisher, expected, strict=True):
            k = want.shape[0]
            torch.testing.assert_close(got[:k, :k], want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_accumulated_micro_batches_give_the_whole_batch_empirical_fisher(
    k: int, reduction: str
) -> None:
    """The loop of Hugging Face's Trainer and Lightning: ``k`` backward passes, then one step.

    ``loss_reduction="mean"``: each micro-batch's mean loss divided by ``k`` (so the accumulated
    gradient is the mean over all ``k * MICRO`` examples); ``"sum"``: micro-batch sums (the
    accumulated gradient is the sum over all examples).
    """
    model = _model()
    opt = _opt(model, reduction)
    x = torch.randn(k * MICRO, 2, 6, dtype=torch.float64)
    for micro in x.split(MICRO):
        per = _per_example_loss(model(micro))
        (per.mean() / k if reduction == "mean" else per.sum()).backward()
    opt.step()
    _assert_unit_blocks(opt, model, x)


def test_accumulation_with_a_module_called_twice_equals_one_pass_over_the_whole_batch() -> None:
    """A module reused within a forward (treated call by call, an approximation) gives the same
    statistics whether the batch arrives in one pass or in accumulated micro-batches."""
    shared = nn.Linear(3, 3).double()

    def run(micro_batches: int) -> list[Tensor]:
        model = nn.Sequential(shared)
        opt = _opt(model, "mean")
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(3 * MICRO, 3, dtype=torch.float64, generator=gen)
        model.zero_grad()
        with pytest.warns(UserWarning, match="more than once in one backward pass"):
            for micro in x.split(len(x) // micro_batches):
                out = shared(torch.tanh(shared(micro)))
                (_per_example_loss(out).mean() / micro_batches).backward()
        opt.step()
        opt.remove_hooks()
        return [u.fisher.clone() for u in opt.blocks()]

    for one, acc in zip(run(1), run(3), strict=True):
        torch.testing.assert_close(acc, one, rtol=1e-10, atol=1e-13)


def test_statistics_are_per_step_not_carried_into_the_next() -> None:
    """After a step, the next step's accumulation starts from zero examples."""
    model = _model()
    opt = _opt(model, "mean")
    x1 = torch.randn(2 * MICRO, 2, 6, dtype=torch.float64)
    for micro in x1.split(MICRO):
        (_per_example_loss(model(micro)).mean() / 2).backward()
    opt.step()
    model.zero_grad()
    first = [u.fisher.clone() for u in opt.blocks()]
    x2 = torch.randn(3 * MICRO, 2, 6, dtype=torch.float64)
    for micro in x2.split(MICRO):
        (_per_example_loss(model(micro)).mean() / 3).backward()
    opt.step()
    # stat_decay=0.5: the second estimate enters with weight 1/2.
    by_param = _reference_fisher(model, x2)
    for unit, old in zip(opt.blocks(), first, strict=True):
        v = unit_vectors([by_param[id(p)] for p in unit.params])
        expected = dense_blocks(unit.layout, v.T @ v / x2.shape[0])
        for got, prev, want in zip(unit.fisher, old, expected, strict=True):
            k = want.shape[0]
            torch.testing.assert_close(
                got[:k, :k], 0.5 * prev[:k, :k] + 0.5 * want, rtol=1e-10, atol=1e-13
            )
