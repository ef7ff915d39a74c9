"""A statistical check on real data: MBF's documented defaults against tuned SGD with momentum.

scikit-learn's digits autoencoder (the paper's autoencoder setting at toy size: sigmoid
cross-entropy summed over pixels, mean over the batch), fixed seeds, same steps and batches.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mbf import MBF

sklearn = pytest.importorskip("sklearn.datasets")

# 4 x 3 runs of 300 steps: the slowest file of the suite (`pytest -m "not slow"` leaves it out).
pytestmark = pytest.mark.slow

STEPS, BATCH, SEEDS = 300, 128, (0, 1, 2)


def _autoencoder() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 8),
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 64),
    )  # fmt: skip


def _final_loss(make_optimizer, seed: int) -> float:
    x = torch.tensor(sklearn.load_digits().data / 16.0, dtype=torch.float32)
    torch.manual_seed(seed)
    model = _autoencoder()
    optimizer = make_optimizer(model)
    batches = torch.Generator().manual_seed(seed)

    def loss_of(inputs: torch.Tensor) -> torch.Tensor:
        out = model(inputs)
        return nn.functional.binary_cross_entropy_with_logits(out, inputs, reduction="sum") / len(
            inputs
        )

    for _ in range(STEPS):
        idx = torch.randint(0, len(x), (BATCH,), generator=batches)
        optimizer.zero_grad()
        loss_of(x[idx]).backward()
        optimizer.step()
    with torch.no_grad():
        return float(loss_of(x))


def test_mbf_defaults_beat_the_best_sgd_momentum_of_a_grid() -> None:
    torch.set_num_threads(1)
    mbf = [_final_loss(lambda m: MBF(m), s) for s in SEEDS]
    sgd = {
        lr: [_final_loss(lambda m, lr=lr: torch.optim.SGD(m.parameters(), lr, momentum=0.9), s)
             for s in SEEDS]
        for lr in (0.01, 0.03, 0.1)
    }  # fmt: skip
    best_sgd = min(sum(v) / len(v) for v in sgd.values())
    mean_mbf = sum(mbf) / len(mbf)
    assert all(torch.isfinite(torch.tensor(mbf)))
    assert mean_mbf < best_sgd, (mbf, sgd)
    # Not a fluke of one seed: MBF wins on every seed against SGD's best learning rate.
    best_lr = min(sgd, key=lambda lr: sum(sgd[lr]))
    assert all(m < s for m, s in zip(mbf, sgd[best_lr], strict=True)), (mbf, sgd[best_lr])
