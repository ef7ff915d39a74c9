"""MBF in PyTorch Lightning (the recipe of ``docs/integrations.md``).

``configure_optimizers`` returns MBF with a per-step scheduler; automatic optimization calls
``optimizer.step(closure)``; gradient accumulation over 2 batches and gradient clipping are on.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

pl = pytest.importorskip(
    "lightning.pytorch",
    reason="the Lightning recipe needs the 'integrations' extra: pip install -e '.[integrations]'",
)

from mbf import MBF  # noqa: E402
from reference import PAPER_FORM, dense_blocks, unit_vectors  # noqa: E402

pytestmark = [
    # Lightning's advice for real runs (worker processes, logging intervals) is noise here.
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
]

BATCH, ACCUMULATE = 8, 2


def _data(n: int = 64) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, torch.sin(x @ w))


class Regressor(pl.LightningModule):
    """The recipe's module: MBF plus scheduler, and MBF's diagnostics logged every step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
        self.seen: list[Tensor] = []

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        self.seen.append(x.clone())
        loss = (self.net(x) - y).square().sum(1).mean()  # a mean over the batch
        self.log("train_loss", loss)
        return loss

    def on_train_batch_end(self, *args: Any) -> None:
        mbf = self.optimizers().optimizer  # LightningOptimizer wraps the MBF instance
        self.log_dict({f"mbf/{k}": v for k, v in mbf.diagnostics().items()})

    def configure_optimizers(self) -> dict[str, Any]:
        opt = MBF(
            self,  # the module: per-example hooks on its Linear layers
            **PAPER_FORM,  # the paper's form, which the float64 references here spell out
            lr=0.1,
            momentum=0.9,
            damping=0.3,
            stat_decay=0.9,
            stat_every=1,
            inv_every=2,
            max_block_size=16,
            estimator="per_example",
            loss_reduction="mean",  # Lightning divides each batch's loss by the accumulation
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.02 * step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _trainer(tmp: Path, max_steps: int, callbacks: list[Any]) -> Any:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        accumulate_grad_batches=ACCUMULATE,
        gradient_clip_val=1.0,
        precision="64-true",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp),
        callbacks=callbacks,
    )


def _loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(_data(), batch_size=BATCH, shuffle=False)


def _fit(module: Regressor, trainer: Any, **kwargs: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's notices about workers and log intervals
        trainer.fit(module, _loader(), **kwargs)


def test_lightning_step_closure_statistics_equal_the_empirical_fisher(tmp_path: Path) -> None:
    """One optimizer step of two accumulated batches: the statistics of every unit are the
    float64 empirical Fisher of the 16 examples."""
    module = Regressor()
    initial = [p.detach().clone() for p in module.net.parameters()]
    trainer = _trainer(tmp_path, 1, [])
    _fit(module, trainer)
    assert len(module.seen) == ACCUMULATE
    x = torch.cat(module.seen)
    y = _data()[: len(x)][1]
    with torch.no_grad():
        for p, p0 in zip(module.net.parameters(), initial, strict=True):
            p.copy_(p0)
    grads: dict[int, list[Tensor]] = {id(p): [] for p in module.net.parameters()}
    for i in range(len(x)):
        module.net.zero_grad()
        (module.net(x[i : i + 1]) - y[i : i + 1]).square().sum().backward()
        for p in module.net.parameters():
            grads[id(p)].append(p.grad.clone())
    opt = trainer.optimizers[0]
    assert isinstance(opt, MBF)
    for unit in opt.blocks():
        v = unit_vectors([torch.stack(grads[id(p)]) for p in unit.params])
        want_blocks = dense_blocks(unit.layout, v.T @ v / len(x))
        for got, want in zip(unit.fisher, want_blocks, strict=True):
            k = want.shape[0]
            torch.testing.assert_close(got[:k, :k], want, rtol=1e-9, atol=1e-14)


def _snapshot(opt: MBF) -> list[Tensor]:
    return [t.clone() for u in opt.blocks() for t in (u.fisher, u.inverse)] + [
        opt.state[p]["momentum_buffer"].clone() for g in opt.param_groups for p in g["params"]
    ]


class Snapshot(pl.Callback):
    """MBF's curvature after optimizer step ``at_step``, and when a resumed fit starts."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step
        self.at: list[Tensor] | None = None
        self.start: list[Tensor] | None = None

    def on_train_start(self, trainer: Any, module: Any) -> None:
        if trainer.global_step > 0:
            self.start = _snapshot(trainer.optimizers[0])

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.at_step and self.at is None:
            self.at = _snapshot(trainer.optimizers[0])


def test_lightning_trains_and_model_checkpoint_resumes_mbf_exactly(tmp_path: Path) -> None:
    # 64 examples in batches of 8, 2 batches a step: 4 steps an epoch. A checkpoint every 4 steps
    # is written after the epoch's last batch. (Lightning 2.6 with a plain DataLoader restarts an
    # epoch resumed mid-way, and resuming from an on_train_epoch_end checkpoint shifts the
    # accumulation by one batch: neither continues the run exactly, whatever the optimizer.)
    steps, save_at = 12, 4
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=save_at, save_top_k=-1
    )
    module = Regressor()
    saved = Snapshot(save_at)
    trainer = _trainer(tmp_path, steps, [saved, checkpoints])
    _fit(module, trainer)
    opt = trainer.optimizers[0]
    assert opt.counters["steps"] == steps
    assert trainer.callback_metrics["mbf/steps"] == steps  # diagnostics were logged
    with torch.no_grad():
        x, y = _data()[:]
        final_loss = float((module.net(x) - y).square().sum(1).mean())
    module_0 = Regressor()
    with torch.no_grad():
        first_loss = float((module_0.net(x) - y).square().sum(1).mean())
    assert final_loss < 0.7 * first_loss, (first_loss, final_loss)  # it learns

    (path,) = (tmp_path / "ckpt").glob(f"*step={save_at}.ckpt")
    resumed_module = Regressor()
    restored = Snapshot(steps)
    resumed = _trainer(tmp_path, steps, [restored])
    _fit(resumed_module, resumed, ckpt_path=str(path))
    assert saved.at is not None and restored.start is not None
    for a, b in zip(saved.at, restored.start, strict=True):
        assert torch.equal(a, b)  # the checkpoint holds MBF's curvature and momentum exactly
    opt_b = resumed.optimizers[0]
    assert opt_b.counters["steps"] == steps
    for a, b in zip(module.net.parameters(), resumed_module.net.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
    for a, b in zip(_snapshot(opt), _snapshot(opt_b), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
