"""Optimizer diagnostics in ``metrics.jsonl`` and in ``mbf-bench report``'s plots."""

from __future__ import annotations

import json
from pathlib import Path

from mbf_bench.report import _diagnostic_series, load_runs, write_report
from mbf_bench.train import RunSpec, run_many

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _evals(directory: Path) -> list[dict]:
    lines = [json.loads(t) for t in (directory / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "test_loss" in line]


def test_mbf_runs_record_diagnostics_and_the_report_plots_them(tmp_path: Path) -> None:
    specs = [
        RunSpec(task="digits-ae", optimizer=name, epochs=2, batch_size=300,
                hparams={"lr": 1e-3} if name == "mbf" else {})
        for name in ("mbf", "sgdm")
    ]
    results = run_many(specs, tmp_path, progress=False)
    assert all(r.status == "finished" for r in results), [r.error for r in results]
    mbf_dir, sgdm_dir = (r.directory for r in results)
    evals = _evals(mbf_dir)
    assert len(evals) == 2
    for line in evals:
        assert line["diag/steps"] == line["step"]
        assert line["diag/group0/step_to_grad_norm"] > 0
        assert 0.0 <= line["diag/fallback_block_fraction"] <= 1.0
        assert 0.0 < line["diag/seconds/statistics"] <= line["seconds"]
        assert 0.0 < line["diag/seconds/factorization"] <= line["seconds"]
    assert not any(k.startswith("diag/") for line in _evals(sgdm_dir) for k in line)
    _, images = write_report(tmp_path)
    names = sorted(p.name for p in images)
    assert names == ["digits-ae-diagnostics.png", "digits-ae.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in images)


def _fake(root: Path, evals: list[dict]) -> None:
    directory = root / "toy" / "mbf" / "0"
    directory.mkdir(parents=True)
    config = {"task": "toy", "optimizer": "mbf", "status": "finished", "test_metric": "test_error"}
    (directory / "config.json").write_text(json.dumps(config))
    text = "\n".join(json.dumps({"train_loss": 1.0, "test_loss": 1.0, "test_error": 0.5, **e})
                     for e in evals)
    (directory / "metrics.jsonl").write_text(text + "\n")


def test_seconds_are_plotted_as_a_share_of_training_seconds(tmp_path: Path) -> None:
    _fake(tmp_path, [
        {"step": 1, "epoch": 1.0, "seconds": 2.0, "diag/seconds/statistics": 0.5},
        {"step": 2, "epoch": 2.0, "seconds": 4.0, "diag/seconds/statistics": 3.0},
    ])
    (run,) = load_runs(tmp_path)
    assert _diagnostic_series(run, "diag/seconds/statistics") == ([1.0, 2.0], [0.25, 0.75])
    x, y = _diagnostic_series(run, "diag/group0/step_to_grad_norm")
    assert x == [] and y == []


def test_no_diagnostics_no_extra_plot(tmp_path: Path) -> None:
    _fake(tmp_path, [{"step": 1, "epoch": 1.0, "seconds": 2.0}])
    _, images = write_report(tmp_path)
    assert [p.name for p in images] == ["toy.png"]
