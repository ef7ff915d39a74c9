"""The ``mbf-bench`` command line: settings parsing, list, run, tune, errors, delegation."""

from __future__ import annotations

import json
import shlex
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import tomllib
import torch

from mbf_bench import cli
from mbf_bench.optimizers import OPTIMIZERS, defaults_for
from mbf_bench.settings import (
    dump_config,
    format_value,
    parse_assignment,
    parse_grid,
    parse_value,
)
from mbf_bench.tasks import TASKS
from mbf_bench.tune import default_grid, log13_grid

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser from PyPI
    import tomli as tomllib


def run_dir(out: Path, optimizer: str, seed: int = 0, task: str = "digits-ae") -> Path:
    return out / task / optimizer / str(seed)


def config_of(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "config.json").read_text())


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1e-3", 1e-3), ("20", 20), ("true", True), ("false", False), ("none", None),
     ("null", None), ("batch", "batch"), ('"1e-3"', "1e-3"), ("[0.9, 0.99]", [0.9, 0.99]),
     ("-0.5", -0.5), (" 3e-4 ", 3e-4)],
)
def test_parse_value(text: str, expected: Any) -> None:
    value = parse_value(text)
    assert value == expected and type(value) is type(expected)


def test_parse_assignment_and_grid() -> None:
    assert parse_assignment("lr=3e-4") == ("lr", 3e-4)
    assert parse_assignment("mbf.estimator=per_example") == ("mbf.estimator", "per_example")
    for bad in ("lr", "=1", "lr="):
        with pytest.raises(ValueError, match="key=value"):
            parse_assignment(bad)
    assert parse_grid(["lr=1e-4,3e-4", "damping=0.01"]) == {"lr": [1e-4, 3e-4], "damping": [0.01]}
    with pytest.raises(ValueError, match="twice"):
        parse_grid(["lr=1", "lr=2"])


def test_toml_writer_round_trips_through_tomllib() -> None:
    tables = {"mbf": {"lr": 3e-4, "damping": 1e-05, "inv_every": 20, "estimator": "batch",
                      "decoupled_weight_decay": False, "kl_clip": None},
              "mbf-batch": {"lr": 0.1, "note": 'say "hi"\\'}}
    text = dump_config(tables, top={"task": "digits-ae"}, comments=["written by a test"])
    loaded = tomllib.loads(text)
    assert loaded["task"] == "digits-ae"
    assert loaded["mbf"] == {k: v for k, v in tables["mbf"].items() if v is not None}
    assert loaded["mbf-batch"] == tables["mbf-batch"]
    for value in (1e-4, 3e-4, 0.001, 123456789.0, 1e300, -2.5):
        assert parse_value(format_value(value)) == value


def test_log13_grid() -> None:
    assert log13_grid(1e-3) == pytest.approx([1e-4, 3e-4, 1e-3, 3e-3, 1e-2])
    assert log13_grid(0.05) == pytest.approx([0.01, 0.03, 0.1, 0.3])
    assert log13_grid(0.3) == pytest.approx([0.03, 0.1, 0.3, 1.0, 3.0])


def test_default_grid_spans_a_decade_around_the_defaults() -> None:
    task = TASKS["digits-ae"]
    grid = default_grid("mbf", task)
    assert set(grid) == {"lr", "damping"}
    for key, values in grid.items():
        center = defaults_for("mbf", "autoencoder")[key]
        assert all(center / 10 * 0.999 <= v <= center * 10 * 1.001 for v in values)
        assert len(values) >= 4
    assert set(default_grid("sgdm", task)) == {"lr"}


def test_overrides_for_config_table_then_set_then_per_optimizer() -> None:
    config = {"task": "digits-ae", "mbf": {"lr": 0.5, "damping": 0.1}, "adam": {"lr": 0.2}}
    sets = ["lr=0.01", "mbf.damping=0.3", "adam.beta1=0.8"]
    known = list(OPTIMIZERS)
    assert cli.overrides_for("mbf", config, sets, known) == {"lr": 0.01, "damping": 0.3}
    assert cli.overrides_for("adam", config, sets, known) == {"lr": 0.01, "beta1": 0.8}
    with pytest.raises(ValueError, match="not an optimizer"):
        cli.overrides_for("mbf", {}, ["nosuch.lr=1"], known)


def test_list_shows_every_task_and_optimizer(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list", "--task", "planetoid-gcn"]) == 0
    out = capsys.readouterr().out
    for name in [*TASKS, *OPTIMIZERS]:
        assert name in out
    assert "--dataset cora|citeseer|pubmed" in out
    for name, spec in OPTIMIZERS.items():  # each not validated one marked, every time it is named
        marked = out.count(f"  {name} (not validated) ")
        assert marked == (0 if spec.validated else 2), name
    assert {n for n, s in OPTIMIZERS.items() if not s.validated} == {"tnt", "shampoo-ours"}
    assert f"lr={defaults_for('adam', 'gcn')['lr']}" in out


def test_run_with_config_and_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.toml"
    config.write_text('task = "digits-ae"\n[sgdm]\nlr = 0.02\nmomentum = 0.5\n')
    out = tmp_path / "runs"
    code = cli.main(["run", "--task", "digits-ae", "--optimizers", "sgdm,adam", "--seeds", "0,1",
                     "--max-steps", "2", "--out", str(out), "--config", str(config),
                     "--set", "sgdm.momentum=0.7", "--set", "adam.eps=1e-6", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    sgdm = config_of(run_dir(out, "sgdm", 1))
    assert sgdm["hparams"]["lr"] == 0.02 and sgdm["hparams"]["momentum"] == 0.7
    assert sgdm["seed"] == 1 and sgdm["status"] == "finished"
    adam = config_of(run_dir(out, "adam"))
    assert adam["hparams"]["eps"] == 1e-6
    assert adam["hparams"]["lr"] == defaults_for("adam", "autoencoder")["lr"]
    # the recorded command reruns the same thing
    assert "--set momentum=0.7" in sgdm["rerun"] and "--max-steps 2" in sgdm["rerun"]


def test_rerun_command_reproduces_the_run(tmp_path: Path) -> None:
    out = tmp_path / "a"
    try:
        assert cli.main(["run", "--task", "digits-ae", "--optimizers", "mbf", "--max-steps", "3",
                         "--out", str(out), "--set", "damping=0.5", "--threads", "2",
                         "--no-progress"]) == 0
    finally:
        torch.set_num_threads(1)
    first = config_of(run_dir(out, "mbf"))
    assert first["versions"]["torch_threads"] == "2" and "--threads 2" in first["rerun"]
    argv = shlex.split(first["rerun"])[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "b")
    try:
        assert cli.main([*argv, "--no-progress"]) == 0
    finally:
        torch.set_num_threads(1)
    second = config_of(run_dir(tmp_path / "b", "mbf"))
    assert second["hparams"] == first["hparams"]
    a = torch.load(run_dir(out, "mbf") / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(run_dir(tmp_path / "b", "mbf") / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "nosuch", "--optimizers", "sgdm"], "unknown task 'nosuch'"),
        (["--task", "digits-ae", "--optimizers", "nosuch"], "unknown optimizer 'nosuch'"),
        (["--task", "digits-ae", "--optimizers", "sgdm", "--set", "nosuch=1"],
         "no hyperparameter 'nosuch'"),
        (["--task", "digits-ae", "--optimizers", "sgdm", "--dataset", "cora"],
         "has no option 'dataset'"),
        (["--task", "planetoid-gcn", "--optimizers", "sgdm", "--dataset", "nosuch"],
         "must be one of"),
        (["--task", "digits-ae", "--optimizers", "sgdm", "--config", "/nonexistent.toml"],
         "does not exist"),
        (["--task", "mnist-ae", "--optimizers", "sgdm", "--data-dir", "/nonexistent/data"],
         "/nonexistent/data"),
    ],
)
def test_bad_input_is_one_message_and_exit_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["run", *argv, "--max-steps", "1", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err


def test_missing_data_message_names_the_remedy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["run", "--task", "faces-ae", "--optimizers", "sgdm,adam", "--data-dir",
                     str(tmp_path), "--out", str(tmp_path / "runs"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "newfaces_rot_single.mat" in err and "--data-dir" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only machine")
def test_cuda_without_cuda_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["run", "--task", "digits-ae", "--optimizers", "sgdm", "--device", "cuda",
                     "--out", str(tmp_path)])
    assert code == 2 and "CUDA is not available" in capsys.readouterr().err


def test_tune_picks_the_best_validation_point_and_run_loads_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = tmp_path / "best.toml"
    code = cli.main(["tune", "--task", "digits-ae", "--optimizer", "sgdm", "--grid",
                     "lr=1e-4,0.03", "momentum=0.9", "--max-steps", "15", "--out", str(toml),
                     "--no-progress"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "best" / "tune_results.json").read_text())
    assert results["metric"] == "val_error"
    errors = {r["point"]["lr"]: r["val_error"] for r in results["results"]}
    assert set(errors) == {1e-4, 0.03}
    best_lr = min(errors, key=lambda k: errors[k])
    chosen = tomllib.loads(toml.read_text())
    assert chosen["task"] == "digits-ae"
    assert chosen["sgdm"] == {"lr": best_lr, "momentum": 0.9}
    # the grid's runs were judged on held-out training data, never on the test set
    point = next((tmp_path / "best").glob("lr=*"))
    metrics = (point / "digits-ae" / "sgdm" / "0" / "metrics.jsonl").read_text()
    assert "val_error" in metrics and "test_" not in metrics
    assert config_of(point / "digits-ae" / "sgdm" / "0")["holdout"] == 0.1

    out = tmp_path / "runs"
    assert cli.main(["run", "--task", "digits-ae", "--optimizers", "sgdm", "--max-steps", "1",
                     "--config", str(toml), "--out", str(out), "--no-progress"]) == 0
    assert config_of(run_dir(out, "sgdm"))["hparams"]["lr"] == best_lr


def test_delegated_subcommands(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    received: list[list[str]] = []
    fake = types.ModuleType("fake_theory")
    fake.main = lambda argv: received.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_theory", fake)
    monkeypatch.setitem(cli._DELEGATED, "theory", ("fake_theory", "test"))
    assert cli.main(["theory", "--steps", "5"]) == 0
    assert received == [["--steps", "5"]]
    monkeypatch.setitem(cli._DELEGATED, "curvature", ("mbf_bench.no_such_module", "test"))
    assert cli.main(["curvature"]) == 2
    assert "not available" in capsys.readouterr().err


def test_the_demo_runs_twice_into_the_same_folder(tmp_path: Path) -> None:
    """`make demo` again must not fail on the first demo's finished runs (its folder is
    scratch), while `mbf-bench run` still refuses to overwrite results."""
    from mbf_bench import demo

    out = tmp_path / "demo"
    for _ in range(2):
        assert demo.main(["--out", str(out), "--epochs", "1", "--no-progress"]) == 0
    assert (out / "report.md").exists()


def test_run_steps_kfac_with_its_closure_when_it_adapts_the_damping(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """K-FAC's Levenberg-Marquardt damping needs ``step(closure)``: the trainer gives it one
    (without one, the step raises and the run fails)."""
    out = tmp_path / "runs"
    code = cli.main(["run", "--task", "digits-ae", "--optimizers", "kfac", "--max-steps", "3",
                     "--set", "adapt_damping=true", "--set", "adapt_every=1", "--set", "lr=1e-3",
                     "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert config_of(run_dir(out, "kfac"))["status"] == "finished"
