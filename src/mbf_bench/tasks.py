"""The task registry: each benchmark problem of the paper (and CPU-sized stand-ins) by name.

A :class:`Task` names its data (and their shape), model, loss, batch size, default length and
learning-rate schedule; :func:`load_data` reads (and caches) its data, :func:`stand_in_data`
makes random data of the same shape (``mbf-bench speed``), and :func:`make_problem` turns either
into the :mod:`mbf_bench.problems` object the training loop drives. This registry is the one home
of each task's settings: training, tuning and ``mbf-bench speed`` all read them from here.

Data directory: tasks that read files take ``data_dir`` (CLI ``--data-dir``); without one they
use ``$MBF_BENCH_DATA`` if set, else ``./data`` (see :func:`default_data_dir`). The layout
inside it is the one of the original public files (see ``docs/bench.md``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mbf_bench.data import (
    DataError,
    Graph,
    Split,
    Text,
    augment_cifar,
    black_level,
    load_cifar,
    load_curves_mat,
    load_digits,
    load_faces_mat,
    load_mnist,
    load_planetoid,
    load_text,
    make_curves,
)
from mbf_bench.data.stand_in import DataShape, GraphShape, SplitShape, TextShape
from mbf_bench.models import (
    CURVES_AE_SIZES,
    DIGITS_AE_SIZES,
    FACES_AE_SIZES,
    GCN,
    GPT,
    MNIST_AE_SIZES,
    GPTConfig,
    autoencoder,
    resnet_cifar,
    vgg16_bn,
)
from mbf_bench.problems import GraphProblem, MinibatchProblem, Problem, TextProblem

__all__ = [
    "DATA_ENV",
    "TASKS",
    "Task",
    "default_data_dir",
    "get_task",
    "load_data",
    "make_problem",
    "stand_in_data",
]

#: Environment variable naming the default data directory.
DATA_ENV = "MBF_BENCH_DATA"

Data = Split | Graph | Text
Loader = Callable[[Path, Mapping[str, str], int | None], Data]


def default_data_dir() -> Path:
    """``$MBF_BENCH_DATA`` when set, else ``./data`` (relative to the working directory)."""
    return Path(os.environ.get(DATA_ENV, "data"))


@dataclass(frozen=True)
class Task:
    """One benchmark problem.

    Attributes:
        name: registry key, e.g. ``"mnist-ae"``.
        family: ``"autoencoder"``, ``"cnn"``, ``"gcn"`` or ``"transformer"`` (selects
            optimizer defaults).
        description: one line for ``mbf-bench list``.
        data: what the task reads, for ``list`` and for error messages.
        loader: ``(data_dir, options, subset) -> Split | Graph | Text``.
        model: builds the network from the loaded data.
        batch_size: training minibatch size; None means the full graph.
        epochs: default length of a run.
        epoch_steps: for tasks that sample their batches (text): the steps of one "epoch",
            i.e. between two evaluations; None for tasks whose epoch is a pass over the data.
        eval_tokens: for text tasks, how many tokens of the validation (and test) tail each
            evaluation reads.
        loss: a key of :data:`mbf_bench.problems.LOSSES`.
        shape: the shape of the data (with the default ``options``), for random stand-ins.
        augment: random crop + flip on training batches (CIFAR).
        lr_milestones: fractions of the planned epochs at which the learning rate is
            multiplied by ``lr_gamma`` (step decay).
        options: task options and their allowed values; the first value is the default.
        tune_epochs: length of one ``mbf-bench tune`` grid point when no budget is given
            (default a tenth of ``epochs``, at least 1).
        penalty: a term added to the training loss (GCN: weight decay of the first layer).
        hparam_defaults: optimizer settings this task fixes on top of the optimizer's family
            defaults (before ``--config`` and ``--set``): the GCN keeps its weight decay in
            ``penalty``, so the optimizers' own ``weight_decay`` is 0 there.
    """

    name: str
    family: str
    description: str
    data: str
    loader: Loader
    model: Callable[[Data], nn.Module]
    batch_size: int | None
    epochs: int
    loss: str
    shape: DataShape
    augment: bool = False
    lr_milestones: tuple[float, ...] = ()
    lr_gamma: float = 0.1
    tune_epochs: int | None = None
    options: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    penalty: Callable[[nn.Module], Tensor] | None = None
    hparam_defaults: Mapping[str, Any] = field(default_factory=dict)
    epoch_steps: int | None = None
    eval_tokens: int | None = None

    @property
    def test_metric(self) -> str:
        """``"test_error"`` for autoencoders (lower is better), ``"test_loss"`` (nats per token)
        for language models, else ``"test_accuracy"``."""
        if self.family == "transformer":
            return "test_loss"
        return "test_error" if self.family == "autoencoder" else "test_accuracy"

    def resolve_options(self, given: Mapping[str, str]) -> dict[str, str]:
        """Defaults filled in; unknown options or values raise ``ValueError`` naming them."""
        for key, value in given.items():
            if key not in self.options:
                known = ", ".join(self.options) or "none"
                raise ValueError(f"task {self.name} has no option {key!r} (options: {known})")
            if value not in self.options[key]:
                raise ValueError(
                    f"task {self.name}: option {key} must be one of {self.options[key]}, "
                    f"got {value!r}"
                )
        return {key: given.get(key, values[0]) for key, values in self.options.items()}


def _require(path: Path, task: str, what: str) -> Path:
    """``path`` if it exists (the loaders then look for their files in it and its subfolders),
    else a DataError saying how to point the benchmark at the data."""
    if not path.exists():
        raise DataError(
            f"task {task} needs {what} under {path}, which does not exist; pass --data-dir DIR "
            f"(or set ${DATA_ENV}) to a folder that holds it"
        )
    return path


def _subset(split: Split, n: int | None) -> Split:
    """The first ``n`` training and test examples (smoke tests on big data)."""
    if n is None:
        return split
    return dataclasses.replace(
        split,
        x_train=split.x_train[:n],
        y_train=None if split.y_train is None else split.y_train[:n],
        x_test=split.x_test[:n],
        y_test=None if split.y_test is None else split.y_test[:n],
    )


def _load_mnist(data_dir: Path, options: Mapping[str, str], subset: int | None) -> Data:
    return _subset(load_mnist(_require(data_dir, "mnist-ae", "the MNIST files")), subset)


def _load_curves(data_dir: Path, options: Mapping[str, str], subset: int | None) -> Data:
    # The folders load_curves_mat searches; without the file, the generated stand-in.
    for folder in (data_dir, data_dir / "curves", data_dir / "CURVES"):
        if (folder / "digs3pts_1.mat").is_file():
            return _subset(load_curves_mat(folder / "digs3pts_1.mat"), subset)
    if subset is None:
        return make_curves()
    return make_curves(n_train=subset, n_test=subset)


def _load_faces(data_dir: Path, options: Mapping[str, str], subset: int | None) -> Data:
    folder = _require(data_dir, "faces-ae", "newfaces_rot_single.mat")
    return _subset(load_faces_mat(folder), subset)


def _load_digits(data_dir: Path, options: Mapping[str, str], subset: int | None) -> Data:
    return _subset(load_digits(seed=0), subset)


def _cifar_loader(num_classes: int) -> Loader:
    def load(data_dir: Path, options: Mapping[str, str], subset: int | None) -> Data:
        source = _require(data_dir, f"CIFAR-{num_classes}", f"the CIFAR-{num_classes} files")
        return _subset(load_cifar(source, num_classes=num_classes), subset)

    return load


def _load_planetoid(data_dir: Path, options: Mapping[str, str], subset: int | None) -> Data:
    name = options["dataset"]
    return load_planetoid(_require(data_dir, "planetoid-gcn", f"the {name} files"), name=name)


def _load_text(data_dir: Path, options: Mapping[str, str], subset: int | None) -> Data:
    text = load_text(_require(data_dir, "text-gpt(-tiny)", "text/warpeace_input.txt"))
    if subset is None:
        return text
    return dataclasses.replace(text, train=text.train[:subset], val=text.val[:subset],
                               test=text.test[:subset])


def _ae(sizes: tuple[int, ...] | list[int]) -> Callable[[Data], nn.Module]:
    return lambda data: autoencoder(sizes)


#: Kipf & Welling's weight decay: 5e-4 * l2_loss(W1), with TensorFlow's l2_loss = sum(w^2) / 2,
#: on the first layer only, added to the loss in their code (gcn/models.py).
GCN_WEIGHT_DECAY = 5e-4


def _gcn_penalty(model: nn.Module) -> Tensor:
    weight = model.get_parameter("layer1.weight")
    return GCN_WEIGHT_DECAY * 0.5 * weight.pow(2).sum()


def _gcn(data: Data) -> nn.Module:
    assert isinstance(data, Graph)
    return GCN(data.features.shape[1], hidden=16, num_classes=data.num_classes, dropout=0.5)


def _gpt_task(
    name: str, description: str, *, context: int, layers: int, width: int, heads: int,
    batch_size: int, epochs: int, epoch_steps: int, eval_tokens: int,
) -> Task:
    """A character-level GPT task on the text file (the vocabulary comes with the data)."""

    def model(data: Data) -> nn.Module:
        assert isinstance(data, Text)
        return GPT(GPTConfig(data.vocab_size, context, layers=layers, width=width, heads=heads))

    return Task(
        name, "transformer", description, "text/warpeace_input.txt (War and Peace, UTF-8)",
        _load_text, model, batch_size=batch_size, epochs=epochs, loss="cross_entropy",
        shape=TextShape(vocab_size=_WARPEACE_VOCAB, context=context),
        epoch_steps=epoch_steps, eval_tokens=eval_tokens, tune_epochs=epochs,
    )


#: Distinct characters of War and Peace (tests/bench/test_text.py checks it on the file).
_WARPEACE_VOCAB = 148
_CIFAR_SCHEDULE = (0.5, 0.75)
_CIFAR10 = SplitShape((3, 32, 32), num_classes=10)
#: Cora as Kipf & Welling's preprocessing leaves it (tests/bench/test_data.py checks the files).
_CORA = GraphShape(nodes=2708, features=1433, num_classes=7, edges=5278, train_nodes=140)

TASKS: dict[str, Task] = {
    task.name: task
    for task in [
        Task(
            "mnist-ae", "autoencoder", "MNIST autoencoder 784-1000-500-250-30-... (paper)",
            "MNIST (mnist_hinton_mat/ or IDX files)", _load_mnist, _ae(MNIST_AE_SIZES),
            batch_size=1000, epochs=100, loss="sigmoid_cross_entropy",
            shape=SplitShape((784,)),
        ),
        Task(
            "curves-ae", "autoencoder", "CURVES autoencoder 784-400-200-100-50-25-6-... (paper)",
            "digs3pts_1.mat if present, else generated curves", _load_curves,
            _ae(CURVES_AE_SIZES), batch_size=1000, epochs=100, loss="sigmoid_cross_entropy",
            shape=SplitShape((784,)),
        ),
        Task(
            "faces-ae", "autoencoder", "FACES autoencoder 625-2000-1000-500-30-... (paper)",
            "newfaces_rot_single.mat", _load_faces, _ae(FACES_AE_SIZES),
            batch_size=1000, epochs=100, loss="half_squared_error",
            shape=SplitShape((625,)),
        ),
        Task(
            "digits-ae", "autoencoder",
            "8x8 digits autoencoder 64-128-64-16-... (CPU-sized, data shipped)",
            "scikit-learn digits (shipped)", _load_digits, _ae(DIGITS_AE_SIZES),
            batch_size=100, epochs=30, loss="sigmoid_cross_entropy",
            shape=SplitShape((64,)),
        ),
        Task(
            "cifar10-resnet32", "cnn", "CIFAR-10 ResNet-32 (paper)", "CIFAR-10",
            _cifar_loader(10), lambda data: resnet_cifar(32, num_classes=10),
            batch_size=128, epochs=200, loss="cross_entropy", shape=_CIFAR10, augment=True,
            lr_milestones=_CIFAR_SCHEDULE,
        ),
        Task(
            "cifar100-vgg16", "cnn", "CIFAR-100 VGG-16-BN, FC 512-4096-4096 (paper)",
            "CIFAR-100", _cifar_loader(100), lambda data: vgg16_bn(num_classes=100),
            batch_size=128, epochs=200, loss="cross_entropy",
            shape=SplitShape((3, 32, 32), num_classes=100), augment=True,
            lr_milestones=_CIFAR_SCHEDULE,
        ),
        Task(
            "cifar10-resnet8", "cnn", "CIFAR-10 ResNet-8, one block per stage (CPU-sized)",
            "CIFAR-10", _cifar_loader(10), lambda data: resnet_cifar(8, num_classes=10),
            batch_size=128, epochs=20, loss="cross_entropy", shape=_CIFAR10, augment=True,
            lr_milestones=_CIFAR_SCHEDULE,
        ),
        Task(
            "cifar10-vgg16-small", "cnn", "CIFAR-10 VGG-16-BN at 1/8 width, FC 128-128 (CPU-sized)",
            "CIFAR-10", _cifar_loader(10),
            lambda data: vgg16_bn(num_classes=10, fc=(128, 128), width_mult=0.125),
            batch_size=128, epochs=20, loss="cross_entropy", shape=_CIFAR10, augment=True,
            lr_milestones=_CIFAR_SCHEDULE,
        ),
        Task(
            "planetoid-gcn", "gcn", "2-layer GCN, Kipf & Welling setup (hidden 16, dropout 0.5)",
            "Planetoid ind.<dataset>.* files", _load_planetoid, _gcn,
            batch_size=None, epochs=200, loss="cross_entropy", shape=_CORA,
            options={"dataset": ("cora", "citeseer", "pubmed")},
            penalty=_gcn_penalty, hparam_defaults={"weight_decay": 0.0},
            tune_epochs=200,  # full batch: a whole run is 200 cheap steps
        ),
        _gpt_task(
            "text-gpt", "char-level GPT, 2 layers, width 128, 4 heads, context 64 (CPU-sized)",
            context=64, layers=2, width=128, heads=4, batch_size=32,
            epochs=10, epoch_steps=100, eval_tokens=65_536,
        ),
        _gpt_task(
            "text-gpt-tiny", "char-level GPT, 1 layer, width 32, 2 heads, context 16 (CI-sized)",
            context=16, layers=1, width=32, heads=2, batch_size=8,
            epochs=3, epoch_steps=10, eval_tokens=512,
        ),
    ]
}


def get_task(name: str) -> Task:
    """The task called ``name``; ``KeyError`` with the list of tasks otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}") from None


@functools.lru_cache(maxsize=4)
def _load_cached(
    name: str, data_dir: str, options: tuple[tuple[str, str], ...], subset: int | None
) -> Data:
    return TASKS[name].loader(Path(data_dir), dict(options), subset)


def load_data(
    task: Task,
    data_dir: Path | None = None,
    options: Mapping[str, str] | None = None,
    subset: int | None = None,
) -> Data:
    """The task's data (cached per process, so several runs share one copy).

    Raises:
        DataError: the files are missing or unreadable (the message names the remedy).
    """
    resolved = task.resolve_options(options or {})
    directory = str(data_dir if data_dir is not None else default_data_dir())
    return _load_cached(task.name, directory, tuple(sorted(resolved.items())), subset)


def stand_in_data(task: Task, generator: torch.Generator) -> Data:
    """Random data of the task's shape (no files read): one batch of ``task.batch_size``
    training examples (and as many test examples; windows of a text), or the whole graph of a
    full-batch task."""
    if isinstance(task.shape, GraphShape):
        return task.shape.random(generator)
    if task.batch_size is None:
        raise ValueError(f"task {task.name}: a minibatch shape needs a batch size")
    return task.shape.random(generator, task.batch_size)


def _augmenter(split: Split) -> Callable[[Tensor, torch.Generator], Tensor]:
    """Random crop (pad 4) and flip, padding with black like torchvision's RandomCrop on the
    raw images of the reference setup (the data are already normalized)."""
    return functools.partial(augment_cifar, fill=black_level(split.num_classes or 10))


def make_problem(
    task: Task,
    data: Data,
    *,
    seed: int,
    device: torch.device,
    batch_size: int | None = None,
    holdout: float | None = None,
) -> Problem:
    """The :mod:`mbf_bench.problems` object for one run of ``task`` on ``data``."""
    if isinstance(data, Text):
        assert isinstance(task.shape, TextShape)
        assert task.epoch_steps is not None and task.eval_tokens is not None
        return TextProblem(
            data.train, data.val, data.test, context=task.shape.context,
            batch_size=batch_size or task.batch_size or 1, steps_per_epoch=task.epoch_steps,
            seed=seed, device=device, eval_tokens=task.eval_tokens, tuning=holdout is not None,
        )
    if isinstance(data, Graph):
        if holdout is not None:
            return GraphProblem(
                data.features, data.adjacency, data.labels, data.train_mask, data.val_mask,
                device=device, eval_prefix="val", penalty=task.penalty,
            )
        return GraphProblem(
            data.features, data.adjacency, data.labels, data.train_mask, data.test_mask,
            device=device, penalty=task.penalty,
        )
    size = batch_size or task.batch_size
    assert size is not None
    labelled = task.family != "autoencoder"  # autoencoders ignore labels (digits has them)
    return MinibatchProblem(
        data.x_train, data.y_train if labelled else None,
        data.x_test, data.y_test if labelled else None,
        loss=task.loss, batch_size=size, seed=seed, device=device,
        augment=_augmenter(data) if task.augment else None, holdout=holdout,
    )
