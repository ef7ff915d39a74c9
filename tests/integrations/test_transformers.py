"""MBF in Hugging Face Transformers' ``Trainer`` (the recipe of ``docs/integrations.md``).

A 2-layer BERT built from its config (no download), token ids made here, gradient accumulation
over 2 micro-batches and the Trainer's default gradient clipping (``max_grad_norm=1.0``).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the Hub
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
transformers = pytest.importorskip(
    "transformers",
    reason="the Trainer recipe needs the 'integrations' extra: pip install -e '.[integrations]'",
)
pytest.importorskip("accelerate", reason="Trainer needs accelerate (the 'integrations' extra)")

from mbf import MBF  # noqa: E402
from reference import PAPER_FORM, dense_blocks, unit_vectors  # noqa: E402

# Embeddings and LayerNorms fall back to the batch estimator, as MBF warns.
pytestmark = pytest.mark.filterwarnings("ignore:MBF. per-example statistics serve:UserWarning")

VOCAB, SEQ, CLASSES = 30, 6, 3
MICRO, ACCUMULATE = 4, 2


class TokenData(torch.utils.data.Dataset):
    """Random token sequences; the label is the first token modulo the number of classes."""

    def __init__(self, n: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        ids = self.ids[i]
        return {
            "input_ids": ids,
            "attention_mask": torch.ones(SEQ, dtype=torch.long),
            "labels": ids[0] % CLASSES,
        }


def _model() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=SEQ,
        hidden_dropout_prob=0.0,  # deterministic, so the float64 reference is exact
        attention_probs_dropout_prob=0.0,
        num_labels=CLASSES,
    )
    model = transformers.BertForSequenceClassification(config).double()
    # BERT's classification loss is a plain mean that ignores the Trainer's num_items_in_batch,
    # but its forward takes **kwargs, so the Trainer would pass it and skip dividing by the
    # accumulation steps (transformers 5.24): the accumulated gradient would be a sum of means.
    # Declaring the model's loss kwargs-free makes the Trainer divide by the steps: a mean.
    model.accepts_loss_kwargs = False
    return model


def _mbf(model: nn.Module, estimator: str = "per_example") -> MBF:
    return MBF(
        model,
        **PAPER_FORM,  # the paper's form, which the float64 references here spell out
        lr=0.05,
        momentum=0.9,
        damping=0.1,
        stat_decay=0.9,
        stat_every=1,
        inv_every=2,
        max_block_size=16,
        estimator=estimator,
        loss_reduction="mean",  # the Trainer's loss: the mean over the accumulated batch
    )


class MBFTrainer(transformers.Trainer):
    """The recipe's Trainer: logs MBF's diagnostics with every loss it logs."""

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper
        if isinstance(inner, MBF):
            logs = {**logs, **{f"mbf/{k}": v for k, v in inner.diagnostics().items()}}
        super().log(logs, *args, **kwargs)


def _trainer(model: nn.Module, opt: MBF, out: Path, max_steps: int, **extra: Any) -> MBFTrainer:
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.05 * step))
    settings: dict[str, Any] = dict(
        output_dir=str(out),
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACCUMULATE,
        max_steps=max_steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    args = transformers.TrainingArguments(**{**settings, **extra})
    return MBFTrainer(
        model=model, args=args, train_dataset=TokenData(32), optimizers=(opt, schedule)
    )


def test_trainer_statistics_under_accumulation_equal_the_empirical_fisher(tmp_path: Path) -> None:
    """After one Trainer step (2 accumulated micro-batches, clipping on), every per-example
    unit's statistics are the float64 empirical Fisher of the 8 examples of that step."""
    model = _model()
    initial = copy.deepcopy(model)
    seen: list[dict[str, Tensor]] = []
    model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append({k: v.clone() for k, v in kw.items()}), with_kwargs=True
    )
    opt = _mbf(model)
    _trainer(model, opt, tmp_path, max_steps=1).train()
    assert len(seen) == ACCUMULATE
    batch = {k: torch.cat([s[k] for s in seen]) for k in ("input_ids", "attention_mask", "labels")}
    n = len(batch["labels"])
    assert n == MICRO * ACCUMULATE

    names = {id(p): k for k, p in model.named_parameters()}
    ref_params = dict(initial.named_parameters())
    per_example: dict[str, list[Tensor]] = {k: [] for k in ref_params}
    for i in range(n):
        initial.zero_grad()
        initial(**{k: v[i : i + 1] for k, v in batch.items()}).loss.backward()
        for k, p in ref_params.items():
            per_example[k].append(p.grad.clone())
    checked = 0
    for unit in opt.blocks():
        if "Linear" not in unit.name:
            continue  # embeddings and norms use the batch estimator
        v = unit_vectors([torch.stack(per_example[names[id(p)]]) for p in unit.params])
        for got, want in zip(unit.fisher, dense_blocks(unit.layout, v.T @ v / n), strict=True):
            k = want.shape[0]
            torch.testing.assert_close(got[:k, :k], want, rtol=1e-9, atol=1e-14)
        checked += 1
    assert checked == 2 * 6 + 2  # 6 Linear per BERT layer, the pooler and the classifier


def _snapshot(opt: MBF) -> list[Tensor]:
    return [t.clone() for u in opt.blocks() for t in (u.fisher, u.inverse)] + [
        opt.state[p]["momentum_buffer"].clone() for g in opt.param_groups for p in g["params"]
    ]


class Snapshot(transformers.TrainerCallback):
    """Copies MBF's curvature at one global step and when training (re)starts."""

    def __init__(self, opt: MBF, at_step: int) -> None:
        self.opt, self.at_step = opt, at_step
        self.at: list[Tensor] | None = None
        self.begin: list[Tensor] | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step > 0:
            self.begin = _snapshot(self.opt)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step == self.at_step:
            self.at = _snapshot(self.opt)


def test_trainer_trains_and_resumes_mbf_exactly(tmp_path: Path) -> None:
    steps, save_at = 16, 8
    model = _model()
    opt = _mbf(model)
    whole = _trainer(model, opt, tmp_path / "whole", steps, save_strategy="steps",
                     save_steps=save_at)
    saved = Snapshot(opt, save_at)
    whole.add_callback(saved)
    whole.train()
    losses = [e["loss"] for e in whole.state.log_history if "loss" in e]
    assert len(losses) == steps
    assert sum(losses[-3:]) < 0.5 * sum(losses[:3]), losses  # it learns
    logged = [e for e in whole.state.log_history if "loss" in e]  # one per step
    assert [e["mbf/steps"] for e in logged] == [float(s) for s in range(1, steps + 1)]
    assert all(e["mbf/group0/damping"] == 0.1 for e in logged)

    model_b = _model()
    opt_b = _mbf(model_b)
    resumed = _trainer(model_b, opt_b, tmp_path / "whole", steps, save_strategy="no")
    restored = Snapshot(opt_b, steps)
    resumed.add_callback(restored)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / f"checkpoint-{save_at}"))
    assert saved.at is not None and restored.begin is not None
    for a, b in zip(saved.at, restored.begin, strict=True):
        assert torch.equal(a, b)  # the checkpoint holds MBF's curvature and momentum exactly
    assert opt_b.counters["steps"] == opt.counters["steps"] == steps
    for (name, a), b in zip(model.named_parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14, msg=name)
    for a, b in zip(_snapshot(opt), _snapshot(opt_b), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
