"""``mbf-bench report``: the numbers of the table, on hand-made runs and on a real tiny run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from mbf_bench import cli
from mbf_bench.report import load_runs, summarize, write_report
from mbf_bench.train import RunSpec, run_many

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(root: Path, optimizer: str, seed: int, evals: list[tuple[float, float, float]],
             step_seconds: float, status: str = "finished") -> None:
    """A run directory with one step line per epoch (``step_seconds`` each) and an evaluation
    line per ``(seconds, train_loss, test_error)``."""
    directory = root / "toy" / optimizer / str(seed)
    directory.mkdir(parents=True)
    config = {"task": "toy", "optimizer": optimizer, "seed": seed, "status": status,
              "test_metric": "test_error"}
    (directory / "config.json").write_text(json.dumps(config))
    lines: list[dict[str, Any]] = []
    for epoch, (seconds, loss, error) in enumerate(evals, start=1):
        lines.append({"step": epoch, "epoch": epoch, "seconds": epoch * step_seconds,
                      "train_loss": loss})
        lines.append({"step": epoch, "epoch": epoch, "seconds": seconds, "train_loss": loss,
                      "test_loss": loss, "test_error": error})
    (directory / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_summary_numbers_on_hand_made_runs(tmp_path: Path) -> None:
    # sgdm: best losses 2.0 and 4.0 (mean 3.0); mbf: best 1.0 and 1.0. Target = 1.05 * 3.0.
    fake_run(tmp_path, "sgdm", 0, [(1, 5.0, 0.5), (2, 3.0, 0.4), (3, 2.0, 0.45)], 1.0)
    fake_run(tmp_path, "sgdm", 1, [(1, 6.0, 0.6), (2, 5.0, 0.5), (3, 4.0, 0.3)], 1.0)
    fake_run(tmp_path, "mbf", 0, [(2, 3.0, 0.2), (4, 1.0, 0.1)], 2.0)
    fake_run(tmp_path, "mbf", 1, [(2, 4.0, 0.3), (4, 1.0, 0.2)], 2.0)
    summary = summarize(load_runs(tmp_path))["toy"]
    assert summary["target"] == pytest.approx(3.15)
    sgdm, mbf = summary["rows"]["sgdm"], summary["rows"]["mbf"]
    assert sgdm["final_loss"] == pytest.approx(3.0) and sgdm["best_loss"] == pytest.approx(3.0)
    assert sgdm["final_metric"] == pytest.approx(0.375)  # (0.45 + 0.3) / 2
    assert sgdm["best_metric"] == pytest.approx(0.35)  # lower is better: (0.4 + 0.3) / 2
    # sgdm seed 0 reaches 3.15 at 2 s, seed 1 never: a miss counts as infinite, so the median
    # of the two is a miss; mbf both at 2 s and 4 s -> median 3 s, steps 1 and 2 -> 1.5
    assert sgdm["time_to_target"] == math.inf and sgdm["reached"] == "1/2"
    assert mbf["time_to_target"] == pytest.approx(3.0) and mbf["reached"] == "2/2"
    assert mbf["steps_to_target"] == pytest.approx(1.5)
    assert summary["target_kind"] == "relative"
    assert sgdm["relative_step"] == pytest.approx(1.0)
    assert mbf["relative_step"] == pytest.approx(2.0)


def test_a_frozen_target_does_not_move_with_the_optimizers(tmp_path: Path) -> None:
    fake_run(tmp_path, "sgdm", 0, [(1, 5.0, 0.5), (2, 3.0, 0.4), (3, 2.0, 0.45)], 1.0)
    fake_run(tmp_path, "mbf", 0, [(2, 3.0, 0.2), (4, 1.0, 0.1)], 2.0)
    frozen = {"toy": {"metric": "train_loss", "value": 2.5}}
    summary = summarize(load_runs(tmp_path), targets=frozen)["toy"]
    assert summary["target"] == 2.5 and summary["target_kind"] == "frozen"
    assert summary["rows"]["sgdm"]["time_to_target"] == pytest.approx(3.0)
    assert summary["rows"]["mbf"]["steps_to_target"] == pytest.approx(2.0)
    # Adding an optimizer that never gets there changes nothing for the others: it misses.
    fake_run(tmp_path, "adam", 0, [(1, 9.0, 0.9), (2, 8.0, 0.9)], 1.0)
    again = summarize(load_runs(tmp_path), targets=frozen)["toy"]
    assert again["target"] == 2.5
    assert again["rows"]["sgdm"]["time_to_target"] == pytest.approx(3.0)
    assert again["rows"]["adam"]["time_to_target"] == math.inf
    text, _ = write_report(tmp_path, targets=_targets_file(tmp_path, frozen))
    assert "Frozen target: train_loss 2.5" in text and "| miss (0/1) |" in text
    # A metric target is reached in its own direction (an error: downwards).
    acc = summarize(load_runs(tmp_path), targets={"toy": {"metric": "test_error",
                                                          "value": 0.15}})["toy"]
    assert acc["rows"]["mbf"]["time_to_target"] == pytest.approx(4.0)


def _targets_file(root: Path, targets: dict[str, Any]) -> Path:
    path = root / "targets.json"
    path.write_text(json.dumps({"version": 1, "targets": targets}))
    return path


def test_a_bad_targets_file_is_named(tmp_path: Path) -> None:
    fake_run(tmp_path, "sgdm", 0, [(1, 5.0, 0.5)], 1.0)
    bad = tmp_path / "targets.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="targets.json: not a targets file"):
        write_report(tmp_path, targets=bad)


def test_the_shipped_targets_file_loads() -> None:
    from mbf_bench.report import TARGETS_FILE, load_targets

    targets = load_targets()
    assert TARGETS_FILE.exists()
    for task, entry in targets.items():
        assert entry["metric"] in ("train_loss", "test_accuracy"), task
        assert math.isfinite(float(entry["value"])), task


def test_diverged_runs_are_shown_and_excluded_from_the_target(tmp_path: Path) -> None:
    fake_run(tmp_path, "sgdm", 0, [(1, 5.0, 0.5), (2, 2.0, 0.4)], 1.0)
    fake_run(tmp_path, "adam", 0, [], 1.0, status="diverged")
    fake_run(tmp_path, "kfac", 0, [(1, 4.0, 0.5), (2, 9.0, 0.9)], 1.0, status="diverged")
    summary = summarize(load_runs(tmp_path))["toy"]
    assert summary["target"] == pytest.approx(2.1)  # not 1.05 x 4.0 from the diverged kfac
    assert summary["rows"]["adam"]["runs"] == "1 diverged"
    assert math.isnan(summary["rows"]["adam"]["best_loss"])
    assert summary["rows"]["kfac"]["best_loss"] == 4.0
    assert summary["rows"]["kfac"]["reached"] == "0/1"
    text, images = write_report(tmp_path)
    assert "| adam | 1 diverged | - |" in text and images[0].read_bytes()[:8] == PNG_MAGIC


def test_report_of_a_real_tiny_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    specs = [RunSpec(task="digits-ae", optimizer=name, seed=seed, epochs=2, batch_size=300)
             for name in ("sgdm", "adam") for seed in (0, 1)]
    results = run_many(specs, tmp_path, progress=False)
    assert all(r.status == "finished" for r in results)
    assert cli.main(["report", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    report = (tmp_path / "report.md").read_text()
    assert report in printed
    assert "| optimizer | runs | final train loss" in report
    rows = {line.split("|")[1].strip(): line for line in report.splitlines()
            if line.startswith("| sgdm") or line.startswith("| adam")}
    assert set(rows) == {"sgdm", "adam"} and "2 finished" in rows["adam"]
    # the final train loss is the mean over seeds of the last epoch's mean minibatch loss
    finals = []
    for seed in (0, 1):
        lines = [json.loads(t) for t in
                 (tmp_path / "digits-ae" / "adam" / str(seed) / "metrics.jsonl").read_text()
                 .splitlines()]
        last_epoch = [x["train_loss"] for x in lines if "test_loss" not in x and x["epoch"] > 1]
        finals.append(sum(last_epoch) / len(last_epoch))
    assert f"| {sum(finals) / 2:.4g} |" in rows["adam"]
    image = tmp_path / "digits-ae.png"
    assert f"plot: {image}" in printed
    data = image.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_report_of_an_empty_folder_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "no runs under" in capsys.readouterr().err


def test_the_report_marks_optimizers_that_are_not_validated(tmp_path: Path) -> None:
    fake_run(tmp_path, "tnt", 0, [(1, 5.0, 0.5)], 1.0)
    fake_run(tmp_path, "shampoo", 0, [(1, 4.0, 0.5)], 1.0)
    text, _ = write_report(tmp_path)
    assert "| tnt (not validated) |" in text
    assert "| shampoo |" in text  # the library's Shampoo: validated, no mark
