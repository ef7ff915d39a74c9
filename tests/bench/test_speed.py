"""``mbf-bench speed`` on tiny shapes: the JSON records and the amortization arithmetic."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mbf_bench import cli
from mbf_bench.data import DataError, Graph, Split, Text
from mbf_bench.data.stand_in import GraphShape, SplitShape, TextShape
from mbf_bench.optimizers import OPTIMIZERS
from mbf_bench.problems import LOSSES
from mbf_bench.speed import _Runner, measure, state_bytes, workload
from mbf_bench.tasks import TASKS, load_data
from mbf_bench.train import resolve_hparams

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CPU = torch.device("cpu")


def test_speed_command_writes_records_with_the_documented_fields(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    code = cli.main(["speed", "--tasks", "digits-ae", "--optimizers", "sgdm,adam,mbf",
                     "--repeats", "1", "--warmup", "1", "--json", str(out)])  # fmt: skip
    assert code == 0
    records = json.loads(out.read_text())
    assert [r["optimizer"] for r in records] == ["sgdm", "adam", "mbf"]
    for r in records:
        for key in ("task", "optimizer", "median_step_seconds", "state_bytes", "num_params"):
            assert key in r
        assert r["task"] == "digits-ae" and r["median_step_seconds"] > 0
    sgdm, adam, mbf = records
    n = sgdm["num_params"]
    assert sgdm["state_bytes"] == 4 * n
    assert 8 * n <= adam["state_bytes"] <= 8 * n + 64 * 4  # two moments and a step per tensor
    # MBF: statistics + inverses of every block, momentum; more than Adam, at most 2s+1 floats.
    assert 8 * n < mbf["state_bytes"] <= 4 * n * (2 * 32 + 1) * 1.5
    assert mbf["statistics_seconds"] is not None and mbf["factorization_seconds"] is not None
    amortized = (
        mbf["plain_step_seconds"]
        + mbf["statistics_seconds"] / mbf["stat_every"]
        + mbf["factorization_seconds"] / mbf["inv_every"]
    )
    assert mbf["median_step_seconds"] == pytest.approx(amortized)


def test_every_shape_builds_and_state_bytes_counts_shared_storage_once() -> None:
    assert set(TASKS) >= {"mnist-ae", "cifar10-resnet32", "cifar100-vgg16", "planetoid-gcn"}
    weight = torch.nn.Parameter(torch.zeros(3, 4))
    opt = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    weight.grad = torch.ones_like(weight)
    opt.step()
    assert state_bytes(opt) == 48
    records = measure("planetoid-gcn", ["sgdm"], torch.device("cpu"), repeats=1, warmup=0)
    assert records[0].num_params == 1433 * 16 + 16 * 7


def test_unknown_names_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["speed", "--tasks", "nope"])
    assert "unknown task" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(TASKS))
def test_speed_times_the_task_registrys_batch_size_and_loss(name: str) -> None:
    """Speed's batch is the registry's batch size (the whole graph for the GCN), and its loss
    is the registry's loss (GCN: training nodes only, plus the weight-decay penalty), compared
    with a float64 reference built from the registry's entries alone."""
    task = TASKS[name]
    work = workload(name, CPU)
    model = work.make_model().eval()  # dropout off, batch-norm running statistics: deterministic
    model64 = copy.deepcopy(model).double()
    if isinstance(task.shape, GraphShape):
        assert task.batch_size is None and work.batch is None
        graph = work.data
        assert isinstance(graph, Graph)
        assert graph.features.shape == (task.shape.nodes, task.shape.features)
        train = torch.arange(task.shape.nodes) < task.shape.train_nodes
        assert torch.equal(graph.train_mask, train)
        out = model64(graph.features.double(), graph.adjacency.double())
        reference = F.cross_entropy(out[train], graph.labels[train])
        if task.penalty is not None:
            reference = reference + task.penalty(model64)
        got = work.loss(model, work.batch)
    elif isinstance(task.shape, TextShape):
        inputs, targets = work.batch
        assert inputs.shape == targets.shape == (task.batch_size, task.shape.context)
        assert int(inputs.max()) < task.shape.vocab_size
        few = inputs[:4], targets[:4]
        logits = model64(few[0])
        reference = F.cross_entropy(logits.flatten(0, 1), few[1].flatten())
        got = work.loss(model, few)
    else:
        inputs, targets = work.batch
        assert inputs.shape == (task.batch_size, *task.shape.example)
        if task.family == "autoencoder":
            assert torch.equal(targets, inputs)
        few = inputs[:4], targets[:4]  # the loss is a mean over the batch; 4 keep it cheap
        x64 = few[0].double()
        target64 = x64 if task.family == "autoencoder" else few[1]
        reference = LOSSES[task.loss](model64(x64), target64)
        got = work.loss(model, few)
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(TASKS))
def test_the_declared_data_shapes_match_the_loaded_data(name: str) -> None:
    """The registry's data shape (what speed's random stand-ins are made of) is the shape of the
    real data wherever the data can be read (digits and curves always; the rest when
    ../shared/data holds them)."""
    task = TASKS[name]
    try:
        data = load_data(task, SHARED_DATA, subset=8)
    except DataError as error:
        pytest.skip(f"no {name} data here: {error}")
    if isinstance(task.shape, GraphShape):
        assert isinstance(data, Graph)
        assert data.features.shape == (task.shape.nodes, task.shape.features)
        assert data.num_classes == task.shape.num_classes
        assert int(data.train_mask.sum()) == task.shape.train_nodes
        assert data.adjacency._nnz() == 2 * task.shape.edges + task.shape.nodes
    elif isinstance(task.shape, TextShape):
        assert isinstance(data, Text)
        assert data.vocab_size == task.shape.vocab_size
    else:
        assert isinstance(task.shape, SplitShape) and isinstance(data, Split)
        assert tuple(data.x_train.shape[1:]) == task.shape.example
        if task.family != "autoencoder":
            assert data.num_classes == task.shape.num_classes


MUON_ADAMW = {"adamw_lr": "lr", "adamw_wd": "weight_decay", "adamw_eps": "eps"}


def test_speed_builds_each_optimizer_with_the_hyperparameters_training_uses() -> None:
    """The GCN fixes weight_decay (its decay is in the loss): speed's optimizers must see the
    same settings as ``mbf-bench run`` (bar the early refreshes, switched off to time phases)."""
    work = workload("planetoid-gcn", CPU)
    state = work.make_model().state_dict()
    for name in OPTIMIZERS:
        runner = _Runner(name, work, state, CPU)
        expected = resolve_hparams(name, work.task, {})
        group = runner.optimizer.param_groups[0]
        if group.get("use_muon") is False:  # Muon on a model without hidden matrices: AdamW
            expected = {plain: expected[key] for key, plain in MUON_ADAMW.items()}
        shared = sorted(set(expected) & set(group) - {"invert_early", "early_refresh"})
        assert "lr" in shared, name
        assert {k: group[k] for k in shared} == {k: expected[k] for k in shared}, name


@pytest.mark.parametrize("name", ["mbf", "mbf-paper", "mbf-packed"])
def test_statistics_only_samples_hold_no_factorization(name: str) -> None:
    """MBF's early refreshes (updates 2, 4, 8, 16, ... below ``inv_every``) once put whole
    factorizations into the statistics-only samples (VGG-16: 2.6 s where 0.5 s was due)."""
    work = workload("digits-ae", CPU)
    runner = _Runner(name, work, work.make_model().state_dict(), CPU)
    opt = runner.optimizer
    runner.set_mode(stats=True, factor=False)
    runner.step(work.batch)  # the first statistics are factored, as in any mode
    first = opt.counters["factorizations"]
    for _ in range(20):
        runner.step(work.batch)
    assert opt.counters["factorizations"] == first


def test_the_speed_table_marks_optimizers_that_are_not_validated() -> None:
    from mbf_bench.speed import SpeedRecord, format_table

    rows = [SpeedRecord("toy", name, "cpu", 10, 80, 0.1, 0.2, 0.2, 0.2)
            for name in ("adam", "tnt", "soap")]
    text = format_table(rows)
    assert "| toy | tnt (not validated) |" in text
    assert "| toy | soap |" in text and "| toy | adam |" in text
