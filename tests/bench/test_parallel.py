"""``mbf-bench run --nproc K``: data-parallel runs through torchrun, against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from mbf_bench import cli, parallel

ARGS = ["--task", "digits-ae", "--subset", "200", "--batch-size", "50", "--set", "lr=0.01",
        "--checkpoint-every", "0", "--no-progress"]


def losses(directory: Path) -> list[float]:
    """The per-step training losses of a run (evaluation lines left out)."""
    lines = [json.loads(t) for t in (directory / "metrics.jsonl").read_text().splitlines()]
    return [line["train_loss"] for line in lines if "test_loss" not in line]


def test_two_processes_match_one_and_resume_on_one(tmp_path: Path) -> None:
    optimizers = "mbf-per_example,sgdm"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "mbf_bench.cli", "run", *ARGS, "--optimizers", optimizers,
         "--max-steps", "3", "--nproc", "2", "--out", str(tmp_path / "cut")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("finished, 3 steps") == 2  # rank 0 alone reports
    for optimizer in optimizers.split(","):
        config = json.loads((tmp_path / "cut" / "digits-ae" / optimizer / "0" / "config.json")
                            .read_text())
        assert config["processes"] == 2 and config["rerun"].endswith("--nproc 2")
    # The 2-process checkpoints resume in one process, on the one-process trajectory.
    common = ["run", *ARGS, "--optimizers", optimizers, "--max-steps", "6"]
    assert cli.main([*common, "--resume", "--out", str(tmp_path / "cut")]) == 0
    assert cli.main([*common, "--out", str(tmp_path / "whole")]) == 0
    for optimizer in optimizers.split(","):
        whole = losses(tmp_path / "whole" / "digits-ae" / optimizer / "0")
        resumed = losses(tmp_path / "cut" / "digits-ae" / optimizer / "0")
        assert len(whole) == len(resumed) == 6
        # float32: the averaged shard gradients round differently from the whole batch's.
        assert resumed == pytest.approx(whole, rel=1e-5), optimizer
        assert whole[-1] < whole[0] - 1.0  # it trains


@pytest.mark.parametrize(
    ("task", "optimizer", "match"),
    [("digits-ae", "kfac", "kfac keeps per-process"), ("planetoid-gcn", "sgdm", "full-graph")],
)
def test_unsupported_runs_are_refused_before_launch(
    task: str, optimizer: str, match: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(parallel, "launch", lambda *a: pytest.fail("should not launch"))
    code = cli.main(["run", "--task", task, "--optimizers", optimizer, "--nproc", "2"])
    assert code == 2 and match in capsys.readouterr().err


def test_launch_hands_the_command_to_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def call(command: list[str], env: dict[str, str]) -> int:
        seen.update(command=command, env=env)
        return 0

    monkeypatch.setattr(subprocess, "call", call)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert parallel.launch(3, ["run", "--task", "t", "--nproc", "3", "--out", "o"]) == 0
    command = seen["command"]
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3"]
    assert command[5:] == ["-m", "mbf_bench.cli", "run", "--task", "t", "--out", "o"]
    assert seen["env"]["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 3))
    with pytest.raises(ValueError, match="--nproc"):
        parallel.launch(0, [])


def test_shards_cover_the_batch_in_order() -> None:
    x, y = torch.arange(11.0)[:, None], torch.arange(11)
    parts = [parallel.DataParallel(r, 3, torch.device("cpu")).shard((x, y)) for r in range(3)]
    assert [n for _, n in parts] == [11, 11, 11]
    assert torch.equal(torch.cat([b[1] for b, _ in parts]), y)
    assert [b[0].shape[0] for b, _ in parts] == [3, 4, 4]
