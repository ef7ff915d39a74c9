"""The learning-rate schedule of the training loop: its shape, and that a run follows it to the
end of its budget (steps or CPU seconds)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mbf_bench import train
from mbf_bench.optimizers import build_optimizer
from mbf_bench.schedule import lr_factor
from mbf_bench.tasks import get_task
from mbf_bench.train import RunSpec, _milestones, run, validate


def _reference(p: float, warmup: float) -> float:
    """The schedule written out once more, in float64 arithmetic on plain numbers."""
    if p < warmup:
        return max(p, 1e-3 * warmup) / warmup
    return (1 + math.cos(math.pi * (p - warmup) / (1 - warmup))) / 2


@settings(max_examples=200, deadline=None)
@given(st.floats(-0.5, 1.5), st.floats(0.0, 0.9))
def test_warmup_cosine_matches_the_reference(p: float, warmup: float) -> None:
    factor = lr_factor("warmup-cosine", p, warmup)
    assert factor == pytest.approx(_reference(min(max(p, 0.0), 1.0), warmup), abs=1e-12)
    assert 0.0 <= factor <= 1.0
    assert lr_factor("constant", p, warmup) == 1.0


def test_warmup_cosine_shape() -> None:
    assert lr_factor("warmup-cosine", 0.025, 0.05) == pytest.approx(0.5)
    assert lr_factor("warmup-cosine", 0.05, 0.05) == 1.0
    assert lr_factor("warmup-cosine", 0.525, 0.05) == pytest.approx(0.5)
    assert lr_factor("warmup-cosine", 1.0, 0.05) == pytest.approx(0.0, abs=1e-15)
    assert 0.0 < lr_factor("warmup-cosine", 0.0, 0.05) < 0.01  # the first step is not wasted
    # The cosine half is continuous where the warmup ends and decreasing after.
    assert lr_factor("warmup-cosine", 0.05 - 1e-9, 0.05) == pytest.approx(1.0, abs=1e-6)
    values = [lr_factor("warmup-cosine", p / 100, 0.05) for p in range(5, 101)]
    assert values == sorted(values, reverse=True)


def test_bad_schedule_settings_are_named() -> None:
    with pytest.raises(ValueError, match="'cosine'"):
        lr_factor("cosine", 0.5)
    with pytest.raises(ValueError, match="warmup_fraction"):
        validate(RunSpec(task="digits-ae", optimizer="adam", schedule="warmup-cosine",
                         warmup_fraction=1.0))
    with pytest.raises(ValueError, match="clock"):
        validate(RunSpec(task="digits-ae", optimizer="adam", clock="gpu"))


def _evals(directory: Path) -> list[dict[str, Any]]:
    lines = [json.loads(t) for t in (directory / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "test_loss" in x]


def test_a_step_budget_run_follows_the_schedule_to_its_end(tmp_path: Path) -> None:
    # One step per epoch, so that every step is followed by an evaluation line with its lr.
    spec = RunSpec(task="digits-ae", optimizer="sgdm", hparams={"lr": 0.1}, max_steps=10,
                   subset=40, batch_size=40, schedule="warmup-cosine", warmup_fraction=0.2)
    evals = _evals(run(spec, tmp_path, progress=False).directory)
    # The lr shown after step s is the one step s used, at progress (s - 1) / 10.
    wanted = [0.1 * lr_factor("warmup-cosine", (s - 1) / 10, 0.2) for s in range(1, 11)]
    assert [x["lr"] for x in evals] == pytest.approx(wanted, rel=1e-12)
    constant = RunSpec(task="digits-ae", optimizer="sgdm", hparams={"lr": 0.1}, max_steps=3,
                       subset=40, batch_size=40)
    assert {x["lr"] for x in _evals(run(constant, tmp_path / "c", progress=False).directory)} \
        == {0.1}


def test_a_cpu_second_budget_decays_to_nearly_zero_at_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def slow_build(*args: Any, **kwargs: Any) -> Any:
        start = time.process_time()
        while time.process_time() - start < 0.2:  # start-up work of 0.2 CPU s
            pass
        return build_optimizer(*args, **kwargs)

    monkeypatch.setattr(train, "build_optimizer", slow_build)
    spec = RunSpec(task="digits-ae", optimizer="adam", budget_seconds=0.8, batch_size=50,
                   schedule="warmup-cosine", warmup_fraction=0.1, clock="cpu")
    result = run(spec, tmp_path, progress=False)
    config = json.loads((result.directory / "config.json").read_text())
    lines = [json.loads(t) for t in (result.directory / "metrics.jsonl").read_text().splitlines()]
    assert config["clock"] == "cpu" and config["setup_seconds"] >= 0.2
    assert lines[0]["seconds"] > config["setup_seconds"]  # construction counted in the budget
    assert 0.8 <= result.seconds < 1.1
    evals = _evals(result.directory)
    assert evals[-1]["lr"] < 0.05 * 1e-3  # the last step was taken near the budget's end
    peak = max(x["lr"] for x in evals)
    assert peak > 0.8e-3  # and the rate did reach the base rate in between


def test_a_schedule_replaces_the_tasks_step_decay() -> None:
    task = get_task("cifar10-resnet8")
    assert _milestones(task, RunSpec(task=task.name, optimizer="sgdm"))
    assert _milestones(task, RunSpec(task=task.name, optimizer="sgdm",
                                     schedule="warmup-cosine")) == []


def test_a_run_saved_before_the_schedule_options_existed_still_resumes(tmp_path: Path) -> None:
    spec = RunSpec(task="digits-ae", optimizer="sgdm", max_steps=2, batch_size=200)
    first = run(spec, tmp_path, progress=False)
    config_path = first.directory / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("schedule", "warmup_fraction", "clock"):
        del config[key]
    config_path.write_text(json.dumps(config))
    longer = RunSpec(task="digits-ae", optimizer="sgdm", max_steps=3, batch_size=200)
    assert run(longer, tmp_path, resume=True, progress=False).steps == 3
    with pytest.raises(ValueError, match="schedule"):  # a different schedule is still refused
        run(RunSpec(task="digits-ae", optimizer="sgdm", max_steps=4, batch_size=200,
                    schedule="warmup-cosine"), tmp_path, resume=True, progress=False)
