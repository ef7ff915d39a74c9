"""Protocol v2's machinery: independent draws, edge widening, seeds, intervals and wins,
records that resume and are never overwritten, diverged runs recorded, docs = regenerated."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from mbf_bench.optimizers import OPTIMIZERS
from mbf_bench.protocol import (
    Dimension,
    ExistingRecordError,
    RecordStore,
    TrialJob,
    best_trial,
    defaults_jobs,
    draw_points,
    final_jobs,
    load_rules,
    run_job,
    screen_main,
    screen_run,
    second_round_space,
    space_for,
    tune_jobs,
)
from mbf_bench.protocol_summary import (
    beats,
    docs_section,
    median_interval,
    replace_docs_section,
    summary_markdown,
)

ROOT = Path(__file__).resolve().parents[2]
RULES = load_rules()
# Tiny runs: 4 steps of 50 digits (data shipped with the package), budget far away.
TINY = {"max_steps": 4, "batch_size": 50, "subset": 200}


def _tiny_rules() -> dict[str, Any]:
    rules = copy.deepcopy(RULES)
    rules["trials"] = {"first_round": 3, "second_round": 2}
    rules["seeds"]["final"] = [0, 1]
    return rules


def _fake(job: TrialJob, score: float | None) -> dict[str, Any]:
    """A record as run_job writes it, without training (for the bookkeeping tests)."""
    return {**job.record_base(), "status": "finished" if score is not None else "diverged",
            "steps": 10, "cpu_seconds": 1.0, "metric": "val_loss", "value": score,
            "score": score}


# --- draws -------------------------------------------------------------------------------

def test_no_two_optimizers_tasks_or_hyperparameters_share_a_sequence() -> None:
    # adamw and soap have the same space: under a shared sequence their trials would coincide.
    assert RULES["spaces"]["adamw"]["dims"] == RULES["spaces"]["soap"]["dims"]
    space = space_for(RULES, "adamw")
    draws = {(task, opt): draw_points(RULES, task, opt, space, 0, 16)
             for task in ("mnist-ae", "text-gpt") for opt in ("adamw", "soap")}
    lrs = {key: [p["lr"] for p in points] for key, points in draws.items()}
    assert len({tuple(v) for v in lrs.values()}) == len(lrs)
    for points in draws.values():  # within one optimizer, dimensions are not coupled
        units = {name: [dim.unit(p[name]) for p in points] for name, dim in space.items()}
        assert abs(np.corrcoef(units["lr"], units["weight_decay"])[0, 1]) < 0.9
        assert units["lr"] != units["beta1"]
    # Deterministic, and a later trial does not change the earlier ones (resume-safe).
    again = draw_points(RULES, "mnist-ae", "adamw", space, 0, 24)
    assert again[:16] == draws["mnist-ae", "adamw"]
    assert draw_points(RULES, "mnist-ae", "adamw", space, 16, 8) == again[16:]


def test_draws_are_uniform_in_each_dimension_and_inside_the_range() -> None:
    space = space_for(RULES, "sgdm")
    points = draw_points(RULES, "digits-ae", "sgdm", space, 0, 2000)
    for name, dim in space.items():
        units = np.array([dim.unit(p[name]) for p in points])
        assert units.min() >= -1e-3 and units.max() <= 1 + 1e-3  # 4 significant digits
        assert stats.kstest(units, "uniform").pvalue > 1e-3, name


def test_every_optimizer_gets_the_same_number_of_trials(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    counts = {}
    for name in RULES["optimizers"]:
        try:
            counts[name] = len(tune_jobs(RULES, store, "mnist-ae", name))
        except ValueError as error:  # library baselines not merged in this registry yet
            assert name not in OPTIMIZERS or "rules call" in str(error)
    assert len(counts) >= 4
    assert set(counts.values()) == {RULES["trials"]["first_round"]}
    assert RULES["trials"]["first_round"] + RULES["trials"]["second_round"] >= 16


# --- edges -------------------------------------------------------------------------------

@pytest.mark.parametrize(("scale", "low", "high", "best", "side", "new"), [
    ("log", 1e-4, 1e-2, 1.1e-4, "low", (1e-5, 1e-2)),
    ("log", 1e-4, 1e-2, 9e-3, "high", (1e-4, 1e-1)),
    ("log", 1e-4, 1e-2, 1e-3, None, (1e-4, 1e-2)),
    # beta1 = 1 - x, x in [4e-3, 0.1]: beta1 0.9959 is at x's low edge.
    ("one_minus_log", 4e-3, 0.1, 0.9959, "low", (4e-3 / 5.0, 0.1)),
    ("uniform", 0.0, 1.0, 0.95, "high", (0.0, 1.5)),
    # momentum 0 is 1 - momentum = 1 at the high edge: widened, but never past momentum 0.
    ("one_minus_log", 0.01, 1.0, 0.0, "high", (0.01, 1.0)),
    ("one_minus_log", 0.01, 0.2, 0.79, "high", (0.01, 0.2 * 20 ** 0.5)),
])
def test_a_best_value_on_an_edge_widens_that_side_once(
    scale: str, low: float, high: float, best: float, side: str | None,
    new: tuple[float, float],
) -> None:
    space = {"x": Dimension("x", scale, low, high)}
    wider, widened = second_round_space(RULES, space, {"x": best})
    assert widened == ({"x": side} if side else {})
    assert (wider["x"].low, wider["x"].high) == pytest.approx(new, rel=1e-9)


@settings(max_examples=50, deadline=None)
@given(st.floats(0.0, 1.0))
def test_widening_happens_exactly_within_the_margin(u: float) -> None:
    dim = Dimension("lr", "log", 1e-4, 1e-2)
    _, widened = second_round_space(RULES, {"lr": dim}, {"lr": dim.value(u)})
    margin = RULES["edge"]["margin"]
    if u < margin - 1e-3 or u > 1 - margin + 1e-3:
        assert widened == {"lr": "low" if u < 0.5 else "high"}
    elif margin + 1e-3 < u < 1 - margin - 1e-3:
        assert widened == {}


def test_second_round_draws_from_the_widened_space_with_the_same_trial_count(
    tmp_path: Path,
) -> None:
    rules = _tiny_rules()
    counts = []
    for edge in (True, False):
        store = RecordStore(tmp_path / str(edge))
        first = tune_jobs(rules, store, "digits-ae", "adamw")
        assert [j.trial for j in first] == [0, 1, 2] and {j.round for j in first} == {1}
        lows = [j.hparams["lr"] for j in first]
        for job in first:  # trial 0 is best: its lr on the low edge, or inside; the rest inside
            job.hparams.update(lr=1.05e-4 if edge else 1e-3, beta1=0.97, weight_decay=0.07)
            store.append(_fake(job, 1.0 if job.trial == 0 else 2.0))
        second = tune_jobs(rules, store, "digits-ae", "adamw")
        counts.append(len(second))
        assert [j.trial for j in second] == [3, 4] and {j.round for j in second} == {2}
        space = second[0].space
        assert space is not None
        if edge:
            assert second[0].widened == {"lr": "low"}
            assert space["lr"]["low"] == pytest.approx(1e-5)
        else:
            assert second[0].widened == {} and space["lr"]["low"] == 1e-4
        assert min(lows) >= 1e-4
    assert counts[0] == counts[1]


def test_a_space_naming_a_hyperparameter_the_optimizer_lacks_is_refused(tmp_path: Path) -> None:
    rules = copy.deepcopy(RULES)
    rules["spaces"]["sgdm"]["dims"]["betas"] = {"scale": "log", "low": 0.1, "high": 0.2}
    with pytest.raises(ValueError, match="'betas'|betas of 'sgdm'"):
        tune_jobs(rules, RecordStore(tmp_path), "digits-ae", "sgdm")


def test_changed_rules_after_results_are_refused(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    job = tune_jobs(RULES, store, "digits-ae", "adamw")[0]
    store.append(_fake(job, 1.0))
    changed = copy.deepcopy(RULES)
    changed["spaces"]["adamw"]["dims"]["lr"]["high"] = 1.0
    with pytest.raises(ValueError, match="frozen"):
        tune_jobs(changed, store, "digits-ae", "adamw")


# --- seeds ---------------------------------------------------------------------------------

def test_tuning_seeds_are_disjoint_from_final_seeds(tmp_path: Path) -> None:
    rules = _tiny_rules()
    assert not set(RULES["seeds"]["tune"]) & set(RULES["seeds"]["final"])
    assert len(RULES["seeds"]["final"]) >= 5
    store = RecordStore(tmp_path)
    for _ in range(2):
        for job in tune_jobs(rules, store, "digits-ae", "sgdm"):
            store.append(_fake(job, float(job.trial)))
    tune_seeds = {r["seed"] for r in store.load("tune")}
    final_seeds = {j.seed for j in final_jobs(rules, store, "digits-ae", "sgdm")}
    default_seeds = {j.seed for j in defaults_jobs(rules, store, "digits-ae", "sgdm")}
    assert final_seeds == default_seeds == set(rules["seeds"]["final"])
    assert not tune_seeds & final_seeds
    # The final runs take the best trial's settings (trial 0 scored lowest).
    best = best_trial(store.load("tune"))
    assert best is not None and best["trial"] == 0
    assert all(j.hparams == best["hparams"] for j in final_jobs(rules, store, "digits-ae",
                                                                  "sgdm"))


# --- intervals and wins --------------------------------------------------------------------

def _exact_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The percentile interval of the bootstrap (lower) median from its exact distribution:
    the median of n draws is <= x_(j) iff at least m + 1 draws are <= x_(j), m = (n - 1) // 2."""
    x = np.sort(values)
    n, m = x.size, (x.size - 1) // 2
    cdf = np.array([stats.binom.sf(m, n, (j + 1) / n) for j in range(n)], dtype=np.float64)
    tail = (1 - confidence) / 2
    return float(x[np.argmax(cdf >= tail)]), float(x[np.argmax(cdf >= 1 - tail)])


@pytest.mark.parametrize("n", [5, 9, 21])
def test_bootstrap_interval_matches_the_exact_distribution(n: int) -> None:
    rng = np.random.default_rng(n)
    values = rng.normal(size=n) * 3 + 10
    median, low, high = median_interval(values, resamples=20000)
    assert median == np.sort(values)[(n - 1) // 2]
    assert (low, high) == _exact_interval(values, 0.95)


def test_diverged_seeds_are_worst_scores_not_nan() -> None:
    median, low, high = median_interval([1.0, 2.0, 3.0, math.inf, math.inf])
    assert (median, low) == (3.0, 1.0) and high == math.inf
    assert median_interval([math.inf] * 5) == (math.inf, math.inf, math.inf)
    with pytest.raises(ValueError, match="NaN"):
        median_interval([1.0, math.nan])


def test_a_win_needs_separated_intervals() -> None:
    a, b = (1.0, 0.5, 1.5), (3.0, 2.0, 4.0)
    assert beats(a, b) and not beats(b, a)
    overlapping = (1.0, 0.5, 2.5)  # better median, interval reaching into b's
    assert not beats(overlapping, b) and not beats(b, overlapping)
    assert not beats(a, a)


# --- records ---------------------------------------------------------------------------------

def test_a_finished_record_is_never_overwritten(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    job = defaults_jobs(_tiny_rules(), store, "digits-ae", "adamw@lr=3e-3")[0]
    store.append(_fake(job, 1.0))
    path = store.path("defaults", "digits-ae", "adamw@lr=3e-3")
    before = path.read_bytes()
    with pytest.raises(ExistingRecordError, match="never replaced"):
        store.append(_fake(job, 0.5))
    assert path.read_bytes() == before
    # The next call asks only for the seeds not recorded yet.
    assert [j.seed for j in defaults_jobs(_tiny_rules(), store, "digits-ae",
                                          "adamw@lr=3e-3")] == [1]


class _Cut(Exception):
    pass


def _cut(step: int) -> None:
    if step == 2:
        raise _Cut


def test_an_interrupted_run_leaves_no_record_and_is_run_again(tmp_path: Path) -> None:
    rules, store = _tiny_rules(), RecordStore(tmp_path)
    job = tune_jobs(rules, store, "digits-ae", "adamw")[0]
    with pytest.raises(_Cut):
        run_job(rules, job, None, TINY, on_step=_cut)
    assert store.load() == []
    again = tune_jobs(rules, store, "digits-ae", "adamw")[0]
    assert again.hparams == job.hparams and again.trial == job.trial
    record = run_job(rules, again, None, TINY)
    store.append(record)
    assert record["status"] == "finished" and record["steps"] == 4
    assert record["metric"] == "val_loss" and record["score"] == record["value"] > 0
    assert record["schedule"] == "warmup-cosine" and record["setup_seconds"] >= 0
    assert [j.trial for j in tune_jobs(rules, store, "digits-ae", "adamw")] == [1, 2]


def test_a_screen_run_is_kept_out_of_the_records_and_not_run_twice(tmp_path: Path) -> None:
    rules, store = _tiny_rules(), RecordStore(tmp_path / "records")
    job = tune_jobs(rules, store, "digits-ae", "adamw")[0]
    rows = tmp_path / "screen" / "runs.jsonl"
    label = {"task": "digits-ae", "seed": job.seed, "variant": "a"}
    row = screen_run(rules, job, None, rows, label, TINY)
    assert row is not None and row["status"] == "finished" and row["steps"] == 4
    assert list(row)[:3] == list(label) and row["metric"] == "val_loss"
    assert row["score"] == row["value"] > 0 and "curve" not in row
    assert screen_run(rules, job, None, rows, label, TINY) is None  # already there
    assert screen_run(rules, job, None, rows, {**label, "variant": "b"}, TINY) is not None
    assert [json.loads(t)["variant"] for t in rows.read_text().splitlines()] == ["a", "b"]
    assert store.load() == []


def test_a_screen_command_line_runs_or_reports_with_its_own_arguments() -> None:
    seen: list[tuple[str, Any]] = []

    def run(args: Any) -> int:
        seen.append(("run", (args.data_dir, args.tasks, args.seeds, args.values)))
        return 0

    def report(args: Any) -> int:
        seen.append(("report", None))
        return 3

    def arguments(parser: Any) -> None:
        parser.add_argument("--values", default="0.9")

    tasks = ("digits-ae", "mnist-ae")
    assert screen_main("A screen.\nMore.", tasks, run, report, arguments, ["run"]) == 0
    assert screen_main("A screen.", tasks, run, report, arguments,
                       ["run", "--tasks", "mnist-ae", "--seeds", "7", "--values", "1"]) == 0
    assert screen_main("A screen.", tasks, run, report, arguments, ["report"]) == 3
    assert seen == [("run", ("../shared/data", "digits-ae,mnist-ae", "100,101", "0.9")),
                    ("run", ("../shared/data", "mnist-ae", "7", "1")), ("report", None)]
    with pytest.raises(SystemExit):  # an argument the screen did not add
        screen_main("A screen.", tasks, run, report, None, ["run", "--values", "1"])


def test_a_diverged_run_is_recorded_and_ranked_last(tmp_path: Path) -> None:
    rules, store = _tiny_rules(), RecordStore(tmp_path)
    job = defaults_jobs(rules, store, "digits-ae", "sgdm")[0]
    job.hparams["lr"] = 1e6
    record = run_job(rules, job, None, TINY)
    assert record["status"] == "diverged" and record["score"] is None
    store.append(record)
    assert json.loads(store.path("defaults", "digits-ae", "sgdm").read_text())["status"] == (
        "diverged")
    fine = defaults_jobs(rules, store, "digits-ae", "sgdm")[0]
    store.append(run_job(rules, fine, None, TINY))
    table = summary_markdown(rules, store)
    assert "| sgdm | " in table and "| 2 | 1/2 |" in table  # both seeds, one diverged


def test_a_non_finite_evaluation_is_a_divergence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mbf_bench.problems import MinibatchProblem

    monkeypatch.setattr(MinibatchProblem, "evaluate",
                        lambda self, model, **kw: {"val_loss": math.nan, "val_error": math.nan})
    rules = _tiny_rules()
    job = tune_jobs(rules, RecordStore(tmp_path), "digits-ae", "adamw")[0]
    record = run_job(rules, job, None, TINY)
    assert record["status"] == "diverged" and record["score"] is None


# --- docs --------------------------------------------------------------------------------

def test_docs_tables_equal_the_tables_regenerated_from_the_records() -> None:
    store = RecordStore(ROOT / "benchmarks" / "protocol2")
    assert store.load(), "protocol v2 records are missing from benchmarks/protocol2"
    regenerated = summary_markdown(RULES, store, image_dir="img")
    docs = (ROOT / "docs" / "results.md").read_text()
    assert docs_section(docs) == regenerated, "run `python benchmarks/protocol2.py report`"
    summary = (ROOT / "benchmarks" / "protocol2" / "summary.md").read_text()
    assert summary.endswith(regenerated.replace("](img/", "](../../docs/img/"))
    for task in {r["task"] for r in store.load()}:
        assert (ROOT / "docs" / "img" / f"protocol2-{task}.png").exists()


def test_docs_section_is_replaced_between_the_markers_only(tmp_path: Path) -> None:
    from mbf_bench.protocol_summary import DOCS_BEGIN, DOCS_END

    page = tmp_path / "results.md"
    page.write_text(f"before\n{DOCS_BEGIN}\nold\n{DOCS_END}\nafter\n")
    replace_docs_section(page, "new\n")
    assert page.read_text() == f"before\n{DOCS_BEGIN}\nnew\n{DOCS_END}\nafter\n"
    page.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        replace_docs_section(page, "new\n")


def _script() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("protocol2_script",
                                                  ROOT / "benchmarks" / "protocol2.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_crashed_run_is_named_not_recorded_and_the_next_optimizer_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    script = _script()
    calls: list[str] = []

    def fake_run(rules: dict[str, Any], job: TrialJob, data_dir: str | None) -> dict[str, Any]:
        calls.append(job.name)
        if job.name == "kfac" and len(calls) == 1:
            raise RuntimeError("factorization failed")
        return _fake(job, 1.0)

    monkeypatch.setattr(script, "run_job", fake_run)
    argv = ["defaults", "--task", "digits-ae", "--optimizers", "kfac,sgdm",
            "--records", str(tmp_path)]
    assert script.main(argv) == 1
    assert "kfac trial -1 seed 0: failed (RuntimeError: factorization failed)" in (
        capsys.readouterr().out)
    store = RecordStore(tmp_path)
    assert {r["name"] for r in store.load()} == {"sgdm"} and len(store.load()) == 5
    assert calls.count("kfac") == 1
    # The next command retries it; this time it runs, and the crash is never recorded.
    assert script.main(argv) == 0 and calls.count("kfac") == 6  # sgdm not rerun
    assert len(store.load()) == 10 and {r["status"] for r in store.load()} == {"finished"}


def test_a_run_that_crashes_twice_alike_is_recorded_as_crashed_and_ranks_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    script = _script()
    errors = iter([RuntimeError("svd failed"), ValueError("other"), RuntimeError("svd again")])

    def fake_run(rules: dict[str, Any], job: TrialJob, data_dir: str | None) -> dict[str, Any]:
        if job.seed == 1:
            raise next(errors)
        return {**_fake(job, 1.0 + job.seed), "steps": 10 * (job.seed + 1)}

    monkeypatch.setattr(script, "run_job", fake_run)
    argv = ["defaults", "--task", "digits-ae", "--optimizers", "shampoo",
            "--records", str(tmp_path)]
    store = RecordStore(tmp_path)
    assert script.main(argv) == 1 and script.main(argv) == 1  # RuntimeError, then ValueError
    assert [r["seed"] for r in store.load()] == [0]
    assert script.main(argv) == 0  # the second RuntimeError of seed 1: recorded
    out = capsys.readouterr().out
    assert "seed 1: failed (RuntimeError: svd again), 2 times alike: recorded as crashed" in out
    records = {r["seed"]: r for r in store.load()}
    assert sorted(records) == [0, 1, 2, 3, 4]
    crashed = records[1]
    assert crashed["status"] == "crashed" and crashed["score"] is None
    assert crashed["error"] == "RuntimeError: svd again" and crashed["attempts"] == 2
    assert crashed["hparams"] == records[0]["hparams"]
    assert [json.loads(t)["error"] for t in store.crash_log(
        "defaults", "digits-ae", "shampoo").read_text().splitlines()] == [
        "RuntimeError", "ValueError", "RuntimeError"]
    # It ranks as a divergence: the worst score, counted and named in the table; the steps
    # and step cost of the entry come from the runs that ran.
    table = summary_markdown(_tiny_rules(), store)
    row = next(t for t in table.splitlines() if t.startswith("| shampoo |"))
    assert "| 5 | 1/5 (1 crashed) | 35 | 0.0292 |" in row  # medians of seeds 0, 2, 3, 4
    assert script.main(argv) == 0 and len(store.load()) == 5  # nothing left to run
