"""``benchmarks/time_to_target.py``: CPU seconds to the frozen target from protocol records."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script() -> Any:
    spec = importlib.util.spec_from_file_location(
        "time_to_target", ROOT / "benchmarks" / "time_to_target.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(name: str, seed: int, losses: list[float]) -> dict[str, Any]:
    evals = [{"step": 10 * (i + 1), "seconds": 5.0 * (i + 1), "train_loss": v}
             for i, v in enumerate(losses)]
    return {"phase": "final", "task": "mnist-ae", "name": name, "seed": seed, "evals": evals}


def test_the_first_epoch_at_or_below_the_target_counts_and_a_miss_is_never(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = _script()
    assert script.seconds_to_target(_record("a", 0, [200.0, 97.0712, 50.0]), "train_loss",
                                    97.0712) == 10.0
    assert math.isinf(script.seconds_to_target(_record("a", 0, [200.0, float("nan"), 98.0]),
                                               "train_loss", 97.0712))
    folder = tmp_path / "final" / "mnist-ae"
    folder.mkdir(parents=True)
    rows = [_record("fast", s, [120.0, 90.0, 80.0]) for s in range(3)]
    rows += [_record("slow", s, [150.0, 130.0, 96.0 if s else 99.0]) for s in range(3)]
    for name in ("fast", "slow"):
        (folder / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows if r["name"] == name))
    assert script.main(["--task", "mnist-ae", "--records", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| fast | 10.0 | 3/3 | 10.0 / 10.0 / 10.0 |" in table
    assert "| slow | 15.0 | 2/3 | miss / 15.0 / 15.0 |" in table
    assert table.index("| fast |") < table.index("| slow |")
