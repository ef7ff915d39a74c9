"""The training loop: every task x optimizer steps, exact resume, divergence, budgets, schedule."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mbf_bench.data import DataError
from mbf_bench.optimizers import OPTIMIZERS, defaults_for
from mbf_bench.problems import MinibatchProblem, epoch_order, split_holdout
from mbf_bench.tasks import TASKS, get_task, load_data, make_problem
from mbf_bench.train import RunSpec, resolve_hparams, run, run_many
from tensors import state_tensors

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


# Small settings per task so that two steps of every optimizer stay cheap on two CPU cores.
SMOKE: dict[str, dict[str, Any]] = {
    "mnist-ae": {"subset": 8, "batch_size": 4},
    "curves-ae": {"subset": 8, "batch_size": 4},
    "faces-ae": {"subset": 8, "batch_size": 4},
    "digits-ae": {"subset": 40, "batch_size": 20},
    "cifar10-resnet32": {"subset": 4, "batch_size": 2},
    "cifar100-vgg16": {"subset": 4, "batch_size": 2},
    "cifar10-resnet8": {"subset": 8, "batch_size": 4},
    "cifar10-vgg16-small": {"subset": 8, "batch_size": 4},
    "planetoid-gcn": {},
    "text-gpt": {"subset": 200, "batch_size": 2},
    "text-gpt-tiny": {"subset": 200, "batch_size": 4},
}


def lines(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(t) for t in (directory / "metrics.jsonl").read_text().splitlines()]


def available(task: str) -> None:
    """Skip unless the task's data can be loaded (real files from ../shared/data)."""
    try:
        load_data(get_task(task), SHARED_DATA, subset=SMOKE[task].get("subset"))
    except DataError as error:
        pytest.skip(f"{task}: data not available here ({error})")


def test_smoke_settings_cover_every_task() -> None:
    assert set(SMOKE) == set(TASKS)


# The CPU-sized tasks hold every layer type of the paper's models (Linear, Conv + BatchNorm,
# pooling, graph convolution); the paper-sized ones add only size, which makes the curvature
# optimizers' first steps take tens of seconds each on two cores. By default those run with SGD
# only (data, model and loss plumbing); MBF_BENCH_SLOW=1 runs them with every optimizer.
CPU_SIZED = ("digits-ae", "cifar10-resnet8", "cifar10-vgg16-small", "planetoid-gcn",
             "text-gpt-tiny")
FIRST_ORDER = ("sgdm",)
SLOW = bool(os.environ.get("MBF_BENCH_SLOW"))


def _smoke_cases() -> list[Any]:
    cases = []
    for task in TASKS:
        for name in OPTIMIZERS:
            if task in CPU_SIZED or name in FIRST_ORDER:
                cases.append((task, name))
            else:
                reason = "paper-sized model x another optimizer: set MBF_BENCH_SLOW=1"
                cases.append(pytest.param(task, name, marks=[
                    pytest.mark.slow, pytest.mark.skipif(not SLOW, reason=reason)]))
    return cases


@pytest.mark.parametrize(("task", "optimizer"), _smoke_cases())
def test_every_task_takes_two_steps_with_every_optimizer(
    task: str, optimizer: str, tmp_path: Path
) -> None:
    available(task)
    spec = RunSpec(task=task, optimizer=optimizer, max_steps=2, data_dir=str(SHARED_DATA),
                   **SMOKE[task])
    results = run_many([spec], tmp_path, progress=False)
    metric = TASKS[task].test_metric
    for result in results:
        assert result.status == "finished", (result.spec.optimizer, result.error)
        steps = lines(result.directory)
        assert [line["step"] for line in steps if "test_loss" not in line] == [1, 2]
        assert all(math.isfinite(line["train_loss"]) for line in steps)
        assert steps[-1]["step"] == 2 and math.isfinite(steps[-1]["test_loss"])
        assert math.isfinite(steps[-1][metric])
        config = json.loads((result.directory / "config.json").read_text())
        assert config["status"] == "finished" and config["task"] == task
        assert config["hparams"]["lr"] > 0 and "torch" in config["versions"]


def _final_state(directory: Path) -> dict[str, Any]:
    return torch.load(directory / "checkpoint.pt", weights_only=True)


def _assert_same_run(a: Path, b: Path) -> None:
    """Same metrics (but wall times: ``seconds``, ``diag/seconds/...``) and bitwise the same
    final weights and optimizer state."""
    def strip(path: Path) -> list[dict[str, Any]]:
        return [{k: v for k, v in line.items() if "seconds" not in k} for line in lines(path)]

    assert strip(a) == strip(b)
    sa, sb = _final_state(a), _final_state(b)
    for key, tensor in sa["model"].items():
        assert torch.equal(tensor, sb["model"][key]), key
    flat_a = state_tensors(sa["optimizer"])
    flat_b = state_tensors(sb["optimizer"])
    assert len(flat_a) == len(flat_b)
    for (name, x), (_, y) in zip(flat_a, flat_b, strict=True):
        assert torch.equal(x, y), name


class Crash(Exception):
    pass


def _crash_at(step: int):  # type: ignore[no-untyped-def]
    def hook(current: int) -> None:
        if current == step:
            raise Crash

    return hook


def _crash_and_resume(spec: RunSpec, crash: int, tmp_path: Path) -> Any:
    """Run ``spec`` whole, and again crashed after step ``crash`` then resumed: the two must be
    the same run. Returns the whole run's result."""
    whole = run(spec, tmp_path / "whole", progress=False)
    with pytest.raises(Crash):
        run(spec, tmp_path / "cut", progress=False, on_step=_crash_at(crash))
    cut = tmp_path / "cut" / spec.task / spec.optimizer / "0"
    assert json.loads((cut / "config.json").read_text())["status"] == "failed"
    assert len(lines(cut)) > crash  # lines past the checkpoint, to be discarded on resume
    resumed = run(spec, tmp_path / "cut", resume=True, progress=False)
    assert resumed.status == whole.status == "finished"
    assert resumed.steps == whole.steps
    _assert_same_run(whole.directory, resumed.directory)
    return whole


RESUME_CASES = [
    # digits: 40 examples / batch 20 = 2 steps an epoch; 7 steps cross three epoch ends.
    # (mbf-batch is mbf with its default estimator spelled out; adamw's state is adam's.)
    *[("digits-ae", name, {"subset": 40, "batch_size": 20}, 7, 3, 5) for name in OPTIMIZERS
      if name not in ("mbf-batch", "adamw")],
    # GCN: dropout draws from the global RNG, which the checkpoint must carry.
    ("planetoid-gcn", "adam", {}, 6, 2, 5),
    # CNN: augmentation, batch norm buffers, and the step decay (epochs 2 and 3 of 4), which
    # must restart from the base rate, not from the decayed rate held in the checkpoint.
    ("cifar10-resnet8", "mbf", {"subset": 8, "batch_size": 4, "epochs": 4}, None, 3, 5),
]


@pytest.mark.parametrize(("task", "optimizer", "extra", "steps", "every", "crash"), RESUME_CASES)
def test_killed_and_resumed_run_equals_uninterrupted(
    task: str, optimizer: str, extra: dict[str, Any], steps: int | None, every: int, crash: int,
    tmp_path: Path,
) -> None:
    available(task)
    # A tenth of the default rate: the test is about exact continuation, not about divergence.
    lr = defaults_for(optimizer, TASKS[task].family)["lr"] / 10
    spec = RunSpec(task=task, optimizer=optimizer, max_steps=steps, data_dir=str(SHARED_DATA),
                   checkpoint_every_steps=every, hparams={"lr": lr}, **extra)
    whole = _crash_and_resume(spec, crash, tmp_path)
    if TASKS[task].lr_milestones:  # step decay at 0.5 and 0.75 of 4 epochs: epochs 2 and 3
        evals = [line for line in lines(whole.directory) if "test_loss" in line]
        assert [line["epoch"] for line in evals] == [1.0, 2.0, 3.0, 4.0]
        assert [line["lr"] for line in evals] == pytest.approx([lr, lr, lr / 10, lr / 100])


def test_sigkilled_cli_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    """A real kill -9 of the CLI process mid-run, then ``--resume`` to a fixed step count."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mbf_bench.cli", "run", "--task", "digits-ae", "--optimizers",
           "adam", "--checkpoint-every", "0", "--no-progress", "--out", str(tmp_path / "cut")]
    run_dir = tmp_path / "cut" / "digits-ae" / "adam" / "0"
    metrics = run_dir / "metrics.jsonl"
    proc = subprocess.Popen([*cmd, "--max-steps", "1000000"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) > 30:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((run_dir / "config.json").read_text())["status"] == "running"
    steps = 10 + len(metrics.read_text().splitlines())  # beyond the last checkpoint
    done = subprocess.run([*cmd, "--max-steps", str(steps), "--resume"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    whole = run(RunSpec(task="digits-ae", optimizer="adam", max_steps=steps,
                        checkpoint_every=1e9), tmp_path / "whole", progress=False)
    _assert_same_run(whole.directory, run_dir)


def test_diverged_run_is_marked_and_the_others_go_on(tmp_path: Path) -> None:
    specs = [RunSpec(task="digits-ae", optimizer="sgdm", hparams={"lr": 1e6}, epochs=2),
             RunSpec(task="digits-ae", optimizer="adam", epochs=1)]
    bad, good = run_many(specs, tmp_path, progress=False)
    assert bad.status == "diverged" and good.status == "finished"
    assert json.loads((bad.directory / "config.json").read_text())["status"] == "diverged"
    last = lines(bad.directory)[-1]
    assert last["status"] == "diverged" and last["train_loss"] is None
    assert len(lines(good.directory)) == 15 + 1  # 1437 / 100 -> 15 steps and one evaluation


def test_time_budget_stops_the_run_and_excludes_evaluation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    evaluate = MinibatchProblem.evaluate
    calls = []

    def slow_evaluate(self: MinibatchProblem, model: torch.nn.Module,
                      final: bool = False) -> dict[str, float]:
        calls.append(1)
        if len(calls) == 1:  # the first evaluation alone outlasts the whole budget
            time.sleep(1.5)
        return evaluate(self, model, final=final)

    monkeypatch.setattr(MinibatchProblem, "evaluate", slow_evaluate)
    spec = RunSpec(task="digits-ae", optimizer="sgdm", budget_seconds=1.0, batch_size=200)
    result = run(spec, tmp_path, progress=False)
    steps = [line for line in lines(result.directory) if "test_loss" not in line]
    assert result.seconds >= 1.0 and steps[-1]["seconds"] == result.seconds
    # Training went on after the first epoch's (8 steps of 200) evaluation: its 1.5 s were not
    # counted against the 1 s budget.
    assert result.steps > 8 and len(calls) >= 2
    gaps = [b["seconds"] - a["seconds"] for a, b in zip(steps, steps[1:], strict=False)]
    assert max(gaps) < 1.5


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    spec = RunSpec(task="digits-ae", optimizer="sgdm", max_steps=2)
    run(spec, tmp_path, progress=False)
    other = RunSpec(task="digits-ae", optimizer="sgdm", max_steps=4, hparams={"lr": 0.5})
    with pytest.raises(ValueError, match="lr"):
        run(other, tmp_path, resume=True, progress=False)
    longer = run(RunSpec(task="digits-ae", optimizer="sgdm", max_steps=4), tmp_path,
                 resume=True, progress=False)
    assert [line["step"] for line in lines(longer.directory)] == [1, 2, 2, 3, 4, 4]
    again = run(RunSpec(task="digits-ae", optimizer="sgdm", max_steps=4), tmp_path,
                resume=True, progress=False)  # nothing left to do
    assert again.last_eval == lines(longer.directory)[-1] and again.steps == 4
    assert len(lines(again.directory)) == 6


def test_gcn_objective_holds_kipf_welling_weight_decay_on_the_first_layer() -> None:
    available("planetoid-gcn")
    task = get_task("planetoid-gcn")
    data = load_data(task, SHARED_DATA)
    problem = make_problem(task, data, seed=0, device=torch.device("cpu"))
    model = task.model(data).eval()  # no dropout: the same logits twice
    with torch.no_grad():
        out = model(data.features, data.adjacency)
        ce = F.cross_entropy(out[data.train_mask], data.labels[data.train_mask])
        decay = 5e-4 * 0.5 * model.layer1.weight.pow(2).sum()  # TF's l2_loss: sum(w^2) / 2
        assert float(problem.loss(model, None)) == pytest.approx(float(ce + decay), rel=1e-6)
    # so the optimizers' own weight decay is off for this task, unless asked for
    assert resolve_hparams("adam", task, {})["weight_decay"] == 0.0
    assert resolve_hparams("adam", task, {"weight_decay": 1e-3})["weight_decay"] == 1e-3


def test_data_order_is_a_function_of_seed_and_epoch() -> None:
    a, b = epoch_order(100, 0, 3), epoch_order(100, 0, 3)
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(100))
    assert not torch.equal(a, epoch_order(100, 0, 4))
    assert not torch.equal(a, epoch_order(100, 1, 3))
    train, val = split_holdout(100, 0.1)
    assert len(val) == 10 and not set(train.tolist()) & set(val.tolist())
    assert len(train) + len(val) == 100


def test_missing_data_raises_data_error(tmp_path: Path) -> None:
    spec = RunSpec(task="mnist-ae", optimizer="sgdm", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="nowhere"):
        run(spec, tmp_path, progress=False)


# ----------------------------------------------------------------------------- optimizer modes


class _ModedSGD(torch.optim.SGD):
    """SGD with schedule-free style modes: it refuses to step in evaluation mode (as
    ``schedulefree`` does) and logs every switch with the number of steps taken so far."""

    def __init__(self, params: Any, log: list[tuple[str, int]]) -> None:
        super().__init__(params, lr=0.01)
        self.log, self.steps, self.training = log, 0, False

    def train(self) -> None:
        self.training = True
        self.log.append(("train", self.steps))

    def eval(self) -> None:
        self.training = False
        self.log.append(("eval", self.steps))

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        assert self.training, "step in evaluation mode"
        self.steps += 1
        return super().step(closure)


def test_the_loop_evaluates_in_the_optimizers_evaluation_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An optimizer with ``train()``/``eval()`` steps only in training mode and is in evaluation
    mode exactly around each evaluation (after each epoch and at the end), on random data of
    digits-ae's shape (no files needed): 100 examples in batches of 50, 5 steps, evaluations
    after 2, 4 and 5."""
    from mbf_bench import optimizers, train
    from mbf_bench.tasks import stand_in_data

    log: list[tuple[str, int]] = []
    spec = optimizers.OptimizerSpec(
        "moded-sgd", "test", {"lr": 0.01}, lambda model, hp: _ModedSGD(model.parameters(), log),
        needs_model=False)
    monkeypatch.setitem(optimizers.OPTIMIZERS, "moded-sgd", spec)
    task = get_task("digits-ae")
    data = stand_in_data(task, torch.Generator().manual_seed(0))  # one batch: 100 examples
    monkeypatch.setattr(train, "load_data", lambda *args, **kwargs: data)
    result = run(RunSpec(task="digits-ae", optimizer="moded-sgd", max_steps=5, batch_size=50),
                 tmp_path, progress=False)
    assert result.status == "finished"
    evaluations = [line["step"] for line in lines(result.directory) if "test_loss" in line]
    assert evaluations == [2, 4, 5]
    assert log == [("train", 0), ("eval", 2), ("train", 2), ("eval", 4), ("train", 4),
                   ("eval", 5), ("train", 5)]


def test_resume_restores_numpys_global_generator(tmp_path: Path) -> None:
    """PSGD-Kron draws from numpy's global generator whether to rebalance its factors; at
    ``balance_prob=0.5`` a resumed run whose numpy stream restarted would draw otherwise."""
    available("digits-ae")
    spec = RunSpec(task="digits-ae", optimizer="psgd-kron", max_steps=9, subset=40,
                   batch_size=20, data_dir=str(SHARED_DATA), checkpoint_every_steps=4,
                   hparams={"lr": 1e-4, "balance_prob": 0.5})
    _crash_and_resume(spec, 6, tmp_path)
