"""Training problems: what one step sees (batches in a resumable order), its loss, its evaluation.

A task (``tasks.py``) says *which* data, model and loss; a problem holds the loaded data on the
run's device and answers the three questions the training loop asks:

- ``batch(epoch, index)``: the ``index``-th minibatch of ``epoch``. The order is a pure function
  of ``(seed, epoch)`` and the augmentation of a batch a pure function of ``(seed, epoch, index)``,
  so a run killed after any step can be resumed exactly from ``(epoch, index)`` with no hidden
  data-loader state to save.
- ``loss(model, batch)``: the training loss of the paper's setup (a scalar, mean over the batch).
- ``evaluate(model, final)``: loss and task metric on the evaluation split (the test split, or a
  validation split held out of the training set when tuning); ``final`` marks the evaluation
  that ends a run, where a text task also reports its test loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LOSSES",
    "GraphProblem",
    "MinibatchProblem",
    "Problem",
    "TextProblem",
    "epoch_order",
    "mix_seed",
    "split_holdout",
]


def mix_seed(*parts: int) -> int:
    """A 63-bit seed derived from non-negative integers, well mixed (numpy ``SeedSequence``).

    Used so that e.g. seed 0 epoch 1 and seed 1 epoch 0 give unrelated streams.
    """
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]
    return int(state) & (2**63 - 1)


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The permutation of ``range(n)`` used in ``epoch`` of a run with ``seed`` (CPU, int64)."""
    generator = torch.Generator().manual_seed(mix_seed(seed, epoch, 0))
    return torch.randperm(n, generator=generator)


def split_holdout(n: int, fraction: float) -> tuple[Tensor, Tensor]:
    """Split ``range(n)`` into (train, validation) index sets with ``fraction`` held out.

    The split uses a fixed seed, independent of the run's seed, so that every point of a
    hyperparameter grid and every seed is judged on the same validation examples.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    held = max(1, int(round(n * fraction)))
    if held >= n:
        raise ValueError(f"holdout of {fraction} leaves no training examples out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(2**31 - 1)))
    return order[held:].sort().values, order[:held].sort().values


def sigmoid_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Bernoulli reconstruction loss: cross-entropy summed over pixels, mean over the batch."""
    total = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
    return total / logits.shape[0]


def half_squared_error(output: Tensor, target: Tensor) -> Tensor:
    """Gaussian reconstruction loss: half the squared error summed over pixels, mean over batch."""
    return 0.5 * (output - target).pow(2).sum() / output.shape[0]


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Classification loss: softmax cross-entropy, mean over the batch."""
    return F.cross_entropy(logits, target)


#: Loss name -> function(output, target) returning the mean over the batch.
LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "sigmoid_cross_entropy": sigmoid_cross_entropy,
    "half_squared_error": half_squared_error,
    "cross_entropy": cross_entropy,
}


class Problem(Protocol):
    """What the training loop needs from a task once its data is loaded."""

    #: Number of minibatches (optimizer steps) in one epoch.
    steps_per_epoch: int
    #: Prefix of the evaluation keys: ``"test"``, or ``"val"`` for a held-out validation split.
    eval_prefix: str

    def batch(self, epoch: int, index: int) -> Any:
        """The ``index``-th training batch of ``epoch``."""
        ...

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        """Training loss of ``model`` on ``batch`` (a scalar)."""
        ...

    def evaluate(self, model: nn.Module, final: bool = False) -> dict[str, float]:
        """Loss and metric on the evaluation split, keyed ``<prefix>_loss`` etc.; ``final``: the
        evaluation that ends the run (figures reported only once, such as a text's test loss)."""
        ...


class MinibatchProblem:
    """Minibatch training on arrays: autoencoders (target = input) and image classifiers.

    Args:
        x_train, y_train, x_test, y_test: the data; ``y_*`` is None for autoencoders.
        loss: a key of :data:`LOSSES`.
        batch_size: training minibatch size; the last batch of an epoch may be smaller.
        seed: the run's seed (data order and augmentation).
        device: where batches are sent; the data stays on the CPU.
        augment: ``f(x, generator) -> x`` applied to training batches, or None.
        holdout: evaluate on this fraction of the training set (held out from training)
            instead of the test set.
        eval_batch_size: chunk size of the evaluation pass.
    """

    def __init__(
        self,
        x_train: Tensor,
        y_train: Tensor | None,
        x_test: Tensor,
        y_test: Tensor | None,
        *,
        loss: str,
        batch_size: int,
        seed: int,
        device: torch.device,
        augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
        holdout: float | None = None,
        eval_batch_size: int = 1000,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        self.autoencoder = y_train is None
        self.eval_prefix = "test"
        if holdout is not None:
            train_idx, val_idx = split_holdout(x_train.shape[0], holdout)
            x_test, y_test = x_train[val_idx], None if y_train is None else y_train[val_idx]
            x_train, y_train = x_train[train_idx], None if y_train is None else y_train[train_idx]
            self.eval_prefix = "val"
        self.x_train, self.y_train, self.x_test, self.y_test = x_train, y_train, x_test, y_test
        self.loss_fn = LOSSES[loss]
        self.loss_name = loss
        self.batch_size = min(batch_size, x_train.shape[0])
        self.steps_per_epoch = math.ceil(x_train.shape[0] / self.batch_size)
        self.seed, self.device, self.augment = seed, device, augment
        self.eval_batch_size = eval_batch_size
        self._order: tuple[int, Tensor] | None = None

    def batch(self, epoch: int, index: int) -> tuple[Tensor, Tensor]:
        """Inputs and targets of minibatch ``index`` of ``epoch`` (targets = inputs for AEs)."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.x_train.shape[0], self.seed, epoch))
        rows = self._order[1][index * self.batch_size : (index + 1) * self.batch_size]
        x = self.x_train[rows]
        if self.augment is not None:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index + 1))
            x = self.augment(x, generator)
        x = x.to(self.device)
        if self.y_train is None:
            return x, x
        return x, self.y_train[rows].to(self.device)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        """The task's training loss on one minibatch."""
        inputs, targets = batch
        return self.loss_fn(model(inputs), targets)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, final: bool = False) -> dict[str, float]:
        """Mean loss over the evaluation split, plus ``error`` (autoencoders) or ``accuracy``.

        ``error`` is the reconstruction's squared error summed over pixels, mean over images,
        with the reconstruction ``sigmoid(output)`` for Bernoulli losses and the output itself
        for the squared-error loss; the same measure for every autoencoder, following the
        test error reported by the K-BFGS/TNT experiment framework.
        """
        was_training = model.training
        model.eval()
        n = self.x_test.shape[0]
        loss_sum, metric_sum = 0.0, 0.0
        for start in range(0, n, self.eval_batch_size):
            x = self.x_test[start : start + self.eval_batch_size].to(self.device)
            out = model(x)
            if self.autoencoder:
                loss_sum += float(self.loss_fn(out, x)) * x.shape[0]
                recon = torch.sigmoid(out) if self.loss_name == "sigmoid_cross_entropy" else out
                metric_sum += float((recon - x).pow(2).sum())
            else:
                assert self.y_test is not None
                y = self.y_test[start : start + self.eval_batch_size].to(self.device)
                loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
                metric_sum += float((out.argmax(dim=1) == y).sum())
        model.train(was_training)
        metric = "error" if self.autoencoder else "accuracy"
        p = self.eval_prefix
        return {f"{p}_loss": loss_sum / n, f"{p}_{metric}": metric_sum / n}


class GraphProblem:
    """Full-batch node classification on one graph (one optimizer step per epoch).

    Trains on ``train_mask``; evaluates on ``test_mask``, or on ``val_mask`` when ``holdout``
    (tuning), so that tuning never looks at test nodes. ``penalty(model)``, when given, is added
    to the training loss (Kipf & Welling's weight decay on the first layer is part of their
    objective, not of the optimizer); the evaluation loss is the plain cross-entropy.
    """

    steps_per_epoch = 1

    def __init__(
        self,
        features: Tensor,
        adjacency: Tensor,
        labels: Tensor,
        train_mask: Tensor,
        eval_mask: Tensor,
        *,
        device: torch.device,
        eval_prefix: str = "test",
        penalty: Callable[[nn.Module], Tensor] | None = None,
    ) -> None:
        self.penalty = penalty
        self.features = features.to(device)
        self.adjacency = adjacency.to(device)
        self.labels = labels.to(device)
        self.train_mask = train_mask.to(device)
        self.eval_mask = eval_mask.to(device)
        self.eval_prefix = eval_prefix

    def batch(self, epoch: int, index: int) -> None:
        """The whole graph is the batch; nothing to select."""
        return None

    def loss(self, model: nn.Module, batch: None) -> Tensor:
        """Cross-entropy over the training nodes (plus the penalty, if any)."""
        out = model(self.features, self.adjacency)
        loss = F.cross_entropy(out[self.train_mask], self.labels[self.train_mask])
        return loss if self.penalty is None else loss + self.penalty(model)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, final: bool = False) -> dict[str, float]:
        """Cross-entropy and accuracy over the evaluation nodes (dropout off)."""
        was_training = model.training
        model.eval()
        out = model(self.features, self.adjacency)[self.eval_mask]
        labels = self.labels[self.eval_mask]
        loss = float(F.cross_entropy(out, labels))
        accuracy = float((out.argmax(dim=1) == labels).float().mean())
        model.train(was_training)
        return {f"{self.eval_prefix}_loss": loss, f"{self.eval_prefix}_accuracy": accuracy}


class TextProblem:
    """Next-token prediction on a tokenized text (:class:`mbf_bench.data.Text`).

    A training batch is ``batch_size`` windows of ``context + 1`` consecutive tokens of the
    training part, their starts drawn uniformly from a generator seeded by ``(seed, epoch,
    index)``: a pure function of the position, so a resumed run sees the same batches. An
    "epoch" here is ``steps_per_epoch`` steps, the interval between evaluations (a pass over
    three million characters would be too long an interval).

    The loss is the cross-entropy of every position's next token, mean over the batch's tokens
    (nats per token). Evaluations use fixed, non-overlapping windows covering the first
    ``eval_tokens`` tokens of a part, so every optimizer and seed is judged on the same tokens:
    ``val_loss`` on the validation tail at every evaluation, and ``test_loss`` on the test tail
    once, at the end of the run. ``tuning`` (the benchmark's ``holdout``: the text's validation
    tail is already held out, so its fraction is not used) never reads the test tail.
    """

    eval_prefix = "val"

    def __init__(
        self,
        train: Tensor,
        val: Tensor,
        test: Tensor,
        *,
        context: int,
        batch_size: int,
        steps_per_epoch: int,
        seed: int,
        device: torch.device,
        eval_tokens: int,
        tuning: bool = False,
        eval_batch_size: int = 64,
    ) -> None:
        for name, value in (("context", context), ("batch_size", batch_size),
                            ("steps_per_epoch", steps_per_epoch), ("eval_tokens", eval_tokens)):
            if value <= 0:
                raise ValueError(f"TextProblem: {name} must be positive, got {value}")
        for name, part in (("training", train), ("validation", val), ("test", test)):
            if part.numel() < context + 1:
                raise ValueError(f"TextProblem: the {name} part ({part.numel()} tokens) is "
                                 f"shorter than one window of {context + 1}")
        self.train, self.context, self.batch_size = train, context, batch_size
        self.steps_per_epoch, self.seed, self.device = steps_per_epoch, seed, device
        self.tuning, self.eval_batch_size = tuning, eval_batch_size
        self.val_windows = self.windows(val, eval_tokens)
        self.test_windows = self.windows(test, eval_tokens)
        self._offsets = torch.arange(context + 1)

    def windows(self, part: Tensor, tokens: int) -> Tensor:
        """``(n, context + 1)`` non-overlapping windows (consecutive windows share one token,
        the target of one being the first input of the next) over the first ``tokens``
        predicted tokens of ``part``."""
        usable = min(tokens, part.numel() - 1) // self.context
        starts = torch.arange(max(usable, 1)) * self.context
        return part[starts[:, None] + torch.arange(self.context + 1)]

    def batch(self, epoch: int, index: int) -> tuple[Tensor, Tensor]:
        """Inputs and next-token targets, both ``(batch_size, context)``."""
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index + 1))
        high = self.train.numel() - self.context
        starts = torch.randint(0, high, (self.batch_size,), generator=generator)
        rows = self.train[starts[:, None] + self._offsets].to(self.device)
        return rows[:, :-1], rows[:, 1:]

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Cross-entropy per token, mean over the batch's tokens."""
        inputs, targets = batch
        logits = model(inputs)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def _mean_loss(self, model: nn.Module, windows: Tensor) -> float:
        total = 0.0
        for start in range(0, windows.shape[0], self.eval_batch_size):
            rows = windows[start : start + self.eval_batch_size].to(self.device)
            logits = model(rows[:, :-1])
            total += float(F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(),
                                           reduction="sum"))
        return total / (windows.shape[0] * self.context)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, final: bool = False) -> dict[str, float]:
        """``val_loss`` (nats per token), and ``test_loss`` too when ``final`` and not tuning."""
        was_training = model.training
        model.eval()
        result = {"val_loss": self._mean_loss(model, self.val_windows)}
        if final and not self.tuning:
            result["test_loss"] = self._mean_loss(model, self.test_windows)
        model.train(was_training)
        return result
