"""`mbf-bench` misuse (issue 12): reruns into a finished --out, duplicate seeds, bad values,
corrupt result files, Ctrl-C, and the progress bar of a time budget."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mbf_bench import cli
from mbf_bench.train import ExistingRunError, RunSpec, run, run_many

RUN = ["run", "--task", "digits-ae", "--optimizers", "sgdm", "--max-steps", "2", "--no-progress"]


def _run_dir(out: Path, seed: int = 0) -> Path:
    return out / "digits-ae" / "sgdm" / str(seed)


def test_a_finished_run_is_not_overwritten_without_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs"
    assert cli.main([*RUN, "--out", str(out)]) == 0
    metrics = (_run_dir(out) / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert cli.main([*RUN, "--out", str(out), "--set", "lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run (finished)" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1
    assert (_run_dir(out) / "metrics.jsonl").read_bytes() == metrics  # untouched
    with pytest.raises(ExistingRunError):  # the library refuses too
        run(RunSpec(task="digits-ae", optimizer="sgdm", max_steps=2), out, progress=False)
    assert cli.main([*RUN, "--out", str(out), "--set", "lr=0.5", "--overwrite"]) == 0
    config = json.loads((_run_dir(out) / "config.json").read_text())
    assert config["hparams"]["lr"] == 0.5 and config["status"] == "finished"


def test_a_second_optimizer_that_exists_stops_the_first_from_starting(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    run(RunSpec(task="digits-ae", optimizer="adam", max_steps=1), out, progress=False)
    specs = [RunSpec(task="digits-ae", optimizer=name, max_steps=1) for name in ("sgdm", "adam")]
    with pytest.raises(ExistingRunError, match="adam"):
        run_many(specs, out, progress=False)
    assert not _run_dir(out).exists()  # checked before any run started


def test_duplicate_seeds_are_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([*RUN, "--seeds", "0,1,0", "--out", str(tmp_path / "runs")])
    assert info.value.code == 2 and "seed 0 given twice" in capsys.readouterr().err
    spec = RunSpec(task="digits-ae", optimizer="sgdm", max_steps=1)
    with pytest.raises(ValueError, match="listed twice"):
        run_many([spec, spec], tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--optimizers", "mbf", "--set", "damping=-1"], "damping must be"),
        (["--optimizers", "mbf", "--set", "estimator=foo"], "estimator must be one of"),
        (["--optimizers", "sgdm", "--set", "lr=-1"], "learning rate"),
        (["--optimizers", "sgdm", "--holdout", "1.5"], "--holdout must be a fraction"),
        (["--optimizers", "sgdm", "--device", "tpu"], "--device tpu"),
        (["--optimizers", "sgdm", "--device", "meta"], "--device meta"),
    ],
)
def test_bad_values_are_one_line_before_any_run(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs"
    code = cli.main(["run", "--task", "digits-ae", "--max-steps", "1", "--no-progress",
                     "--out", str(out), *extra])
    captured = capsys.readouterr()
    assert code == 2
    assert message in captured.err and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert not out.exists() and "results in" not in captured.out


def test_a_bad_grid_value_is_one_line_before_any_point_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "best.toml"
    code = cli.main(["tune", "--task", "digits-ae", "--optimizer", "mbf", "--grid",
                     "damping=0.1,-1", "--max-steps", "1", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "damping must be" in err and "Traceback" not in err
    assert not (tmp_path / "best").exists()


def test_report_names_a_corrupt_config_and_marks_truncated_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs"
    assert cli.main(["run", "--task", "digits-ae", "--optimizers", "sgdm,adam", "--seeds", "0,1",
                     "--max-steps", "2", "--no-progress", "--out", str(out)]) == 0
    broken = out / "digits-ae" / "adam" / "1" / "config.json"
    broken.write_text('{"task": "digits-ae", "sta')
    metrics = _run_dir(out, 1) / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes()[:-7])  # a kill in the middle of the last line
    capsys.readouterr()
    assert cli.main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{broken}: unreadable, run left out" in text
    assert f"{metrics}: 1 line(s) unreadable" in text
    row = next(line for line in text.splitlines() if line.startswith("| sgdm "))
    assert "1 finished, 1 finished (metrics truncated)" in row
    row = next(line for line in text.splitlines() if line.startswith("| adam "))
    assert "| 1 finished |" in row  # seed 1 left out, seed 0 shown


def test_ctrl_c_is_one_line_and_the_run_resumes(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mbf_bench.cli", "run", "--task", "digits-ae", "--optimizers",
           "sgdm", "--checkpoint-every", "0", "--no-progress", "--out", str(tmp_path)]
    metrics = _run_dir(tmp_path) / "metrics.jsonl"
    # A shell without job control starts background jobs with SIGINT ignored, and children
    # inherit that; Ctrl-C must reach this one whatever ran the tests.
    proc = subprocess.Popen([*cmd, "--max-steps", "1000000"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) > 20:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines() == ["mbf-bench run: interrupted; continue with the same "
                                        "command and --resume"]
    config = json.loads((_run_dir(tmp_path) / "config.json").read_text())
    assert config["status"] == "interrupted"
    steps = len(metrics.read_text().splitlines()) + 5
    done = subprocess.run([*cmd, "--max-steps", str(steps), "--resume"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_time_budget_progress_bar_shows_tidy_seconds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = RunSpec(task="digits-ae", optimizer="sgdm", budget_seconds=0.2)
    result = run(spec, tmp_path, progress=True)
    assert result.seconds >= 0.2
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "0.2/0.2 s" in last and "100%" in last, last
    shown = re.sub(r"loss=[^\]]*", "", err)  # the loss has its own format
    assert "<-" not in shown and not re.search(r"\d\.\d{3,}", shown), err
