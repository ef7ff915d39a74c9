"""``mbf-bench speed`` on tiny shapes: the JSON records and the amortization arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mbf_bench import cli
from mbf_bench.speed import SHAPES, measure, state_bytes


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
    assert set(SHAPES) >= {"mnist-ae", "cifar10-resnet32", "cifar100-vgg16", "planetoid-gcn"}
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
