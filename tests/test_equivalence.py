"""Two configurations give the same parameters after N steps (``tests/equivalence.py``).

Across storage (full, packed) x ranks (1, 2, 3) x stat_buffer (1, 4) x resume point (none,
mid-run, also into another rank count, storage or stat_buffer), for both estimators, in the
library's step form and in the paper's. Every configuration of this file is trained once, in
one module fixture: the single-process ones in this process, all the others in one spawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

import mbf
from equivalence import Config, Result, assert_equivalent, bitwise_expected, run_configs

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
    pytest.mark.filterwarnings("ignore:MBF. per-example statistics serve"),  # the LayerNorm
]

ESTIMATORS = ("batch", "per_example")
#: The resume point of the matrix, of the 8 steps. With inv_every=3 the inverses are factored
#: at steps 0, (1,) 3 and 6: the step after the resume uses the saved inverses, and statistics
#: are queued at the save (stat_buffer=4); the next factorization uses the loaded statistics.
MID_RUN = 5
#: The library's step options (its defaults today), spelt out: the comparisons must not move
#: when a default does.
LIBRARY_STEP = {
    "graft": "adam",
    "graft_beta2": 0.999,
    "graft_eps": 1e-8,
    "bias_correction": True,
    "early_refresh": True,
    "relative_damping": True,
}
#: What the tests below need beyond the step form, every value given.
COMMON = {
    "stat_every": 1,
    "inv_every": 3,
    "max_block_size": 5,  # several buckets (block sizes 5, 3, 2), each split over the ranks
    "weight_decay": 1e-3,
    "decoupled_weight_decay": False,
    "kl_clip": 1e-2,
}
FORMS: dict[str, dict[str, Any]] = {
    "library": {
        "lr": 0.01,
        "momentum": 0.9,
        "damping": 0.05,
        "stat_decay": 0.9,
        **LIBRARY_STEP,
        **COMMON,
    },
    # mbf.PAPER: lr, momentum, damping, stat_decay and the paper's step form.
    "paper": {**mbf.PAPER, **COMMON},
}

#: Every configuration this file trains, by key (filled at import, trained by ``results``).
CONFIGS: dict[str, Config] = {}


def _register(key: str, config: Config) -> str:
    assert CONFIGS.get(key, config) == config, f"two configurations named {key}"
    CONFIGS[key] = config
    return key


def _options(form: str, estimator: str, storage: str, stat_buffer: int) -> dict[str, Any]:
    return {**FORMS[form], "estimator": estimator, "storage": storage, "stat_buffer": stat_buffer}


def _key(config: Config) -> str:
    """A readable key: each segment as ``<ranks>r-<storage>-sb<stat_buffer>``, form, estimator."""
    first = config.segments()[0]["options"]
    form = "paper" if first["graft"] is None else "library"
    parts = [
        f"{s['ranks']}r-{s['options']['storage']}-sb{s['options']['stat_buffer']}@{s['start']}"
        for s in config.segments()
    ]
    return f"{form}-{first['estimator']}-" + "-".join(parts)


def _pair(case: Config, other: Config, marks: Any = ()) -> Any:
    """A test parameter: two configurations compared (registered)."""
    a, b = _register(_key(case), case), _register(_key(other), other)
    return pytest.param(a, b, id=a, marks=marks)


def _reference(form: str, estimator: str) -> Config:
    """One process, full storage, statistics folded at every update, no resume."""
    return Config(_options(form, estimator, "full", 1))


# ------------------------------------------------------------------ the matrix
MATRIX = []  # every case against the single-process reference
SAME_CONFIG_RESUMES = []  # resumed in the same configuration, against the uninterrupted run
for form in FORMS:
    for estimator in ESTIMATORS:
        reference = _reference(form, estimator)
        for storage in ("full", "packed"):
            for ranks in (1, 2, 3):
                for stat_buffer in (1, 4):
                    run = Config(_options(form, estimator, storage, stat_buffer), ranks=ranks)
                    if run != reference:
                        MATRIX.append(_pair(run, reference))
                    resumed = run.resumed(MID_RUN)
                    MATRIX.append(_pair(resumed, reference))
                    SAME_CONFIG_RESUMES.append(_pair(resumed, run))

# Resumed into another rank count (N -> M), storage (full <-> packed) or stat_buffer.
ACROSS = [
    # (ranks, storage, stat_buffer) before -> after the resume
    ((1, "full", 4), (2, "full", 1)),
    ((2, "full", 1), (3, "full", 4)),
    ((3, "full", 4), (1, "full", 1)),
    ((2, "full", 4), (1, "packed", 4)),
    ((1, "packed", 1), (3, "full", 4)),
    ((1, "full", 4), (1, "packed", 1)),
    ((1, "packed", 4), (1, "full", 4)),
    ((1, "full", 1), (1, "full", 4)),
    ((1, "full", 4), (2, "packed", 1)),
    ((2, "packed", 4), (1, "full", 1)),
    ((3, "packed", 1), (2, "packed", 4)),
    ((2, "full", 1), (3, "packed", 1)),
]
RESUMES_ACROSS = []
for i, (before, after) in enumerate(ACROSS):
    for estimator in ESTIMATORS:
        form = ("library", "paper")[i % 2]
        first = Config(_options(form, estimator, before[1], before[2]), ranks=before[0])
        case = first.resumed(MID_RUN, ranks=after[0], storage=after[1], stat_buffer=after[2])
        RESUMES_ACROSS.append(_pair(case, _reference(form, estimator)))


def test_the_harness_expects_bits_only_from_identical_steps() -> None:
    run = Config(_options("library", "batch", "full", 4), ranks=2)
    assert bitwise_expected(run, run.resumed(MID_RUN))
    assert bitwise_expected(run.resumed(2), run.resumed(4))
    for other in (
        run.resumed(MID_RUN, ranks=3),
        run.resumed(MID_RUN, storage="packed"),
        run.resumed(MID_RUN, stat_buffer=1),
        Config(run.options, ranks=1),
        Config(run.options, ranks=2, steps=7),
        Config(run.options, ranks=2, changes={1: {"stat_decay": 0.5}}),
    ):
        assert not bitwise_expected(run, other)
    with pytest.raises(ValueError, match=r"\['lr'\] change across a resume"):
        run.resumed(MID_RUN, lr=0.5).segments()
    with pytest.raises(ValueError, match="ranks=5 must divide"):
        Config(run.options, ranks=5).segments()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Result]:
    """Every configuration of this file, trained once."""
    return run_configs(CONFIGS, Path(tmp_path_factory.mktemp("equivalence")))


def _same_steps(results: dict[str, Result], case: str, reference: str, exact: bool) -> None:
    """The two configurations are expected to agree bitwise exactly when ``exact``, and their
    runs do: bit for bit, or to float64 rounding (:func:`equivalence.assert_equivalent`)."""
    assert bitwise_expected(CONFIGS[case], CONFIGS[reference]) == exact
    assert_equivalent(results[case], results[reference], exact=exact)


@pytest.mark.parametrize(("case", "reference"), MATRIX)
def test_every_configuration_takes_the_steps_of_one_process(
    results: dict[str, Result], case: str, reference: str
) -> None:
    """Storage, rank count, statistics queue and a resume change no step beyond float64
    rounding; bitwise where nothing but the resume differs."""
    exact = bitwise_expected(CONFIGS[case], CONFIGS[reference])
    assert_equivalent(results[case], results[reference], exact=exact)


@pytest.mark.parametrize(("case", "uninterrupted"), SAME_CONFIG_RESUMES)
def test_resuming_in_the_same_configuration_changes_no_bit(
    results: dict[str, Result], case: str, uninterrupted: str
) -> None:
    _same_steps(results, case, uninterrupted, exact=True)


@pytest.mark.parametrize(("case", "reference"), RESUMES_ACROSS)
def test_resuming_on_other_ranks_storage_or_queue_takes_the_same_steps(
    results: dict[str, Result], case: str, reference: str
) -> None:
    _same_steps(results, case, reference, exact=False)


# ------------------------------------------------ formerly hand-written in test_optimizer.py
def _save_resume_pairs() -> list[Any]:
    pairs = []
    for estimator in ESTIMATORS:
        options = {
            **mbf.PAPER,
            "lr": 0.05,
            "damping": 1e-2,
            "stat_every": 2,
            "inv_every": 3,
            "max_block_size": 5,
            "weight_decay": 0.0,
            "decoupled_weight_decay": False,
            "kl_clip": None,
            "stat_buffer": 4,
            "storage": "full",
            "estimator": estimator,
        }
        run = Config(options, steps=8)
        pairs.append(pytest.param(_register(f"save-resume-{estimator}", run.resumed(5)),
                                  _register(f"save-resume-{estimator}-whole", run), id=estimator))
    return pairs


@pytest.mark.parametrize(("case", "uninterrupted"), _save_resume_pairs())
def test_save_and_resume_is_bitwise_identical(
    results: dict[str, Result], case: str, uninterrupted: str
) -> None:
    """Saved after 5 of 8 steps (statistics every 2nd step, a queue of 4) and resumed in a
    fresh model and optimizer: parameters, counters and curvature bit for bit."""
    _same_steps(results, case, uninterrupted, exact=True)


def _queue_pairs() -> list[Any]:
    pairs = []
    for stat_every in (1, 2):
        runs = {}
        for stat_buffer in (1, 2, 3, 5):
            options = {
                **mbf.PAPER,
                "lr": 0.05,
                "damping": 1e-2,
                "stat_every": stat_every,
                "inv_every": 7,  # not a multiple of the queue lengths: cuts queues short
                "max_block_size": 32,
                "weight_decay": 0.0,
                "decoupled_weight_decay": False,
                "kl_clip": None,
                "stat_buffer": stat_buffer,
                "storage": "full",
                "estimator": "batch",
            }
            config = Config(options, steps=12, changes={6: {"stat_decay": 0.5}})
            runs[stat_buffer] = _register(f"queue-every{stat_every}-sb{stat_buffer}", config)
        pairs += [
            pytest.param(runs[k], runs[1], id=f"stat_every={stat_every}-stat_buffer={k}")
            for k in (2, 3, 5)
        ]
    return pairs


@pytest.mark.parametrize(("case", "folded"), _queue_pairs())
def test_queued_statistics_equal_folding_every_update(
    results: dict[str, Result], case: str, folded: str
) -> None:
    """stat_buffer only changes when the running average is formed, not what it is: the same
    steps and statistics as stat_buffer=1 to float64 rounding, also when stat_decay changes
    mid-run and when a factorization cuts the queue short."""
    _same_steps(results, case, folded, exact=False)


def _loader_pairs() -> list[Any]:
    options = {
        **mbf.PAPER,
        "lr": 0.05,
        "damping": 1e-2,
        "stat_every": 1,
        "inv_every": 50,  # factored at step 0 only: every later update is queued
        "max_block_size": 32,
        "weight_decay": 0.0,
        "decoupled_weight_decay": False,
        "kl_clip": None,
        "stat_buffer": 8,
        "storage": "full",
        "estimator": "batch",
    }
    run = Config(options, steps=6)
    whole = _register("loader-whole", run)
    loaders: dict[str, dict[str, Any]] = {
        "stat_buffer=1": {"stat_buffer": 1},
        "packed": {"storage": "packed"},
        "2 ranks": {"ranks": 2},  # several ranks fold at once
    }
    return [
        pytest.param(_register(f"loader-{name}", run.resumed(3, **kw)), whole, id=name)
        for name, kw in loaders.items()
    ]


@pytest.mark.parametrize(("case", "uninterrupted"), _loader_pairs())
def test_a_queue_the_loader_cannot_keep_is_folded_on_load(
    results: dict[str, Result], case: str, uninterrupted: str
) -> None:
    """Two updates are queued at the save (the first was folded to factor at once); a loader
    with a shorter queue, packed storage or several ranks folds them into the statistics and
    the run goes on as if uninterrupted."""
    assert results[case].check().saved_queues[0][0] == 2
    assert_equivalent(results[case], results[uninterrupted], exact=False)


# -------------------------------------------------- formerly hand-written in test_packed.py
def _library(**kw: Any) -> dict[str, Any]:
    """The library's step form at the hyperparameters of the packed-storage comparisons.

    lr 0.01, not the 0.05 of the hand-written test: on these batches Adam-length steps of 0.05
    amplify the rounding along the run to 2e-12 of the statistics' scale (measured), beyond
    the tolerances that test set on its own data; at 0.01 the runs stay within them."""
    return {
        "lr": 0.01,
        "momentum": 0.9,
        "damping": 1e-2,
        "stat_decay": 0.9,
        "stat_every": 1,
        "inv_every": 3,
        "max_block_size": 5,
        "weight_decay": 0.0,
        "decoupled_weight_decay": False,
        "kl_clip": None,
        **LIBRARY_STEP,
        "stat_buffer": 4,
        "estimator": "batch",
        **kw,
    }


def _packed_pairs() -> list[Any]:
    pairs = []
    for estimator in ESTIMATORS:
        for stat_every in (1, 2):
            runs = {
                storage: _register(
                    f"packed-vs-full-{estimator}-every{stat_every}-{storage}",
                    Config(
                        _library(storage=storage, estimator=estimator, stat_every=stat_every),
                        steps=7,
                    ),
                )
                for storage in ("full", "packed")
            }
            pairs.append(pytest.param(runs["packed"], runs["full"],
                                      id=f"{estimator}-stat_every={stat_every}"))
    return pairs


@pytest.mark.parametrize(("packed", "full"), _packed_pairs())
def test_packed_storage_takes_the_same_steps_as_full(
    results: dict[str, Result], packed: str, full: str
) -> None:
    _same_steps(results, packed, full, exact=False)


def _packed_resume_pairs() -> list[Any]:
    # Factored at steps 0, 1, 2 and 4: the step after the resume uses the saved inverses.
    run = Config(_library(storage="packed", inv_every=2), steps=6)
    whole = _register("packed-resume-whole", run)
    return [
        pytest.param(
            _register(f"packed-resume-into-{storage}", run.resumed(3, storage=storage)),
            whole,
            storage == "packed",
            id=storage,
        )
        for storage in ("packed", "full")
    ]


@pytest.mark.parametrize(("case", "uninterrupted", "exact"), _packed_resume_pairs())
def test_packed_save_resume_is_bitwise_and_loads_across_storages(
    results: dict[str, Result], case: str, uninterrupted: str, exact: bool
) -> None:
    """Resumed as packed: bit for bit; as full: the same numbers, kept whole from there on."""
    _same_steps(results, case, uninterrupted, exact=exact)
