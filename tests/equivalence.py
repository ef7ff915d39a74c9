"""The equivalence harness: two configurations give the same parameters after N steps.

A :class:`Config` says how a run trains: MBF's keyword arguments (storage, stat_buffer and
estimator included), the number of ranks, and optionally a resume point: after ``resume_at``
steps the state is consolidated (every rank), saved with ``torch.save``, loaded with
``torch.load`` into a freshly built model and optimizer, possibly of another configuration
(``then``: other storage, rank count or stat_buffer), which trains on. Every run trains the
float64 model of ``distributed_workers`` on the same global batches (one process on the whole
batch, K ranks on their shards of it, under DDP), so any two runs are comparable.

:func:`run_configs` trains many configurations at once: the single-process ones here, all the
others in ONE spawn of ``max(ranks)`` gloo processes (smaller rank counts in sub-groups), since
each spawn costs seconds. :func:`assert_equivalent` compares two results bitwise or to float64
rounding; :func:`bitwise_expected` says which of the two a pair of configurations must give.
"""

from __future__ import annotations

import dataclasses
import tempfile
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import distributed_workers as W
from ranks import run_ranks

#: Steps of a run unless a config says otherwise.
STEPS = 8
#: Keyword arguments that may change across a resume: the others (the param groups'
#: hyperparameters) are restored from the checkpoint, so a change would be silently undone.
RESUMABLE_CHANGES = frozenset({"storage", "stat_buffer"})
#: Tolerances where bitwise equality is not expected (other storage, rank count or queue):
#: ``|a - b| <= rtol |b| + atol max|b|``, elementwise, with ``max|b|`` the largest entry of the
#: tensor. The absolute part is relative to the tensor's scale because rounding errors scale with
#: the summands, not with the entry: a small entry that is a difference of large ones carries
#: their rounding. The rtol are those of the hand-written comparisons these replace; their
#: absolute atol (1e-12 / 1e-14 / 1e-12) became relative: tighter for parameters (1e-13 of ~1)
#: and inverses (1e-14 of ~1e1 to 1e3), and for statistics 1e-13 of their largest entry (~1 to
#: 10 here): per-example statistics on 3 ranks differ from one process's by up to 3.3e-14 of it
#: (measured), which an absolute 1e-14 refused for a few small entries.
TOLERANCES: dict[str, dict[str, float]] = {
    "params": {"rtol": 1e-12, "atol": 1e-13},
    "fisher": {"rtol": 1e-12, "atol": 1e-13},
    "inverse": {"rtol": 1e-10, "atol": 1e-14},
}
#: Seconds for the one spawn of :func:`run_configs`.
SPAWN_TIMEOUT = 240.0


@dataclass(frozen=True)
class Config:
    """One way to train the test model for ``steps`` steps.

    Attributes:
        options: MBF's keyword arguments (pass every one the comparison depends on; the process
            group is the harness's business).
        ranks: processes under DDP, each on its shard of every global batch.
        resume_at: ``None``, or the number of steps after which the state is saved and loaded
            into a fresh model and optimizer built from ``then``.
        then: the configuration that trains on after ``resume_at`` (``None``: this one). Its own
            ``resume_at`` may chain another resume; its ``steps`` and ``changes`` must be this
            config's (use :meth:`resumed`).
        steps: total steps of the run.
        changes: ``{step: {hyperparameter: value}}`` set in every param group before that step
            (e.g. a ``stat_decay`` changed mid-run).
    """

    options: Mapping[str, Any]
    ranks: int = 1
    resume_at: int | None = None
    then: Config | None = None
    steps: int = STEPS
    changes: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)

    def resumed(self, at: int, ranks: int | None = None, **options: Any) -> Config:
        """This config saved after ``at`` steps and resumed on ``ranks`` ranks (default: the
        same) with ``options`` changed (only those in :data:`RESUMABLE_CHANGES`)."""
        then = dataclasses.replace(
            self,
            options={**self.options, **options},
            ranks=self.ranks if ranks is None else ranks,
            resume_at=None,
            then=None,
        )
        return dataclasses.replace(self, resume_at=at, then=then)

    def segments(self) -> list[dict[str, Any]]:
        """``[{"options", "ranks", "start", "stop"}]``: who trains which steps, checked."""
        out: list[dict[str, Any]] = []
        config: Config | None = self
        start = 0
        while config is not None:
            if config.ranks < 1 or W.GLOBAL_BATCH % config.ranks:
                raise ValueError(f"ranks={config.ranks} must divide {W.GLOBAL_BATCH}")
            if config.steps != self.steps or config.changes != self.changes:
                raise ValueError("a resumed config must keep the run's steps and changes")
            if "process_group" in config.options:
                raise ValueError("process_group is set by the harness, not by options")
            stop = self.steps if config.resume_at is None else config.resume_at
            if not start < stop <= self.steps:
                raise ValueError(f"resume_at={config.resume_at} not in {start + 1}..{self.steps}")
            if out:
                changed = {
                    k
                    for k in {*config.options, *out[-1]["options"]}
                    if config.options.get(k, _MISSING) != out[-1]["options"].get(k, _MISSING)
                }
                if changed - RESUMABLE_CHANGES:
                    raise ValueError(
                        f"options {sorted(changed - RESUMABLE_CHANGES)} change across a resume: "
                        "the checkpoint's param groups would overwrite them"
                    )
            options = dict(config.options)
            out.append({"options": options, "ranks": config.ranks, "start": start, "stop": stop})
            start = stop
            if config.resume_at is None:
                config = None
            elif config.then is None:  # resumed in the same configuration, to the end
                config = dataclasses.replace(config, resume_at=None)
            else:
                config = config.then
        return out

    @property
    def max_ranks(self) -> int:
        return max(seg["ranks"] for seg in self.segments())


_MISSING = object()


@dataclass
class Result:
    """What a run ends with (rank 0's, after consolidation on every rank).

    Attributes:
        params: the flat parameters.
        rank_params: every rank's flat parameters in the last segment (one entry per rank).
        counters: ``opt.counters``.
        fisher, inverse: every unit's running-average blocks and damped inverses, as
            ``opt.blocks()`` shows them (whole blocks, queued statistics folded in).
        saved_queues: for each resume, the queued statistics of each unit in the checkpoint.
        error: the traceback when the run raised (then the rest is empty).
    """

    params: torch.Tensor
    rank_params: list[torch.Tensor]
    counters: dict[str, int]
    fisher: list[torch.Tensor]
    inverse: list[torch.Tensor]
    saved_queues: list[list[int]]
    error: str | None = None

    def check(self) -> Result:
        """This result, or a test failure with the run's traceback."""
        if self.error is not None:
            pytest.fail(f"the run raised:\n{self.error}")
        return self


def _plan(key: str, config: Config) -> dict[str, Any]:
    return {"key": key, "segments": config.segments(), "changes": dict(config.changes)}


def _failed(error: str) -> Result:
    return Result(torch.empty(0), [], {}, [], [], [], error=error)


def _result(per_rank: list[dict | None], ranks: int) -> Result:
    errors = [r["error"] for r in per_rank if r is not None and "error" in r]
    if errors:
        return _failed(errors[0])
    got = per_rank[:ranks]
    if any(r is None for r in got):
        return _failed(f"ranks {[i for i, r in enumerate(got) if r is None]} left no result")
    first = got[0]
    assert first is not None
    return Result(
        params=first["params"],
        rank_params=[r["params"] for r in got if r is not None],
        counters=first["counters"],
        fisher=first["fisher"],
        inverse=first["inverse"],
        saved_queues=first["saved_queues"],
    )


def run_configs(configs: Mapping[str, Config], outdir: Path | None = None) -> dict[str, Result]:
    """Train every configuration; ``{key: Result}``.

    Single-process configurations run in this process; every configuration with several ranks
    in any segment runs in one spawn of ``max(ranks)`` processes. A configuration that raises
    gives a :class:`Result` with ``error`` set (see :meth:`Result.check`) and the others go on.
    """
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp) if outdir is None else outdir
        plans = {key: _plan(key, config) for key, config in configs.items()}
        local = [k for k, c in configs.items() if c.max_ranks == 1]
        spawned = [k for k, c in configs.items() if c.max_ranks > 1]
        out: dict[str, Result] = {}
        for key in local:
            try:
                out[key] = _result([W.run_plan(plans[key], 0, where, {1: False})], 1)
            except Exception:
                out[key] = _failed(traceback.format_exc())
        if spawned:
            world = max(configs[k].max_ranks for k in spawned)
            scenario = ("configs", {"plans": [plans[k] for k in spawned]})
            per_rank = run_ranks([scenario], world, where, timeout=SPAWN_TIMEOUT)
            for key in spawned:
                last = plans[key]["segments"][-1]["ranks"]
                out[key] = _result([r["configs"][key] for r in per_rank], last)
        return out


def train(config: Config) -> Result:
    """One configuration's run (see :func:`run_configs` to batch several)."""
    return run_configs({"run": config})["run"]


def bitwise_expected(a: Config, b: Config) -> bool:
    """Whether runs of ``a`` and ``b`` must agree bitwise: the same options on the same number
    of ranks at every step, whatever the resume points (a save and load changes no bit)."""
    if a.steps != b.steps or a.changes != b.changes:
        return False

    def per_step(config: Config) -> list[tuple[int, tuple]]:
        return [
            (seg["ranks"], tuple(sorted(seg["options"].items(), key=lambda kv: kv[0])))
            for seg in config.segments()
            for _ in range(seg["start"], seg["stop"])
        ]

    return per_step(a) == per_step(b)


def assert_equivalent(a: Result, b: Result, exact: bool) -> None:
    """Parameters, counters and every unit's statistics and inverses of two runs agree:
    bitwise when ``exact``, else to :data:`TOLERANCES` (relative to each tensor's scale).
    Also that every rank of each run ended with bitwise the same parameters."""
    a, b = a.check(), b.check()
    for result in (a, b):
        for r, params in enumerate(result.rank_params):
            assert torch.equal(params, result.params), f"rank {r} differs from rank 0"
    assert a.counters == b.counters
    assert len(a.fisher) == len(b.fisher) and len(a.inverse) == len(b.inverse)
    pairs = [("params", "params", a.params, b.params)]
    for kind in ("fisher", "inverse"):
        for i, (x, y) in enumerate(zip(getattr(a, kind), getattr(b, kind), strict=True)):
            pairs.append((kind, f"{kind} of unit {i}", x, y))
    for kind, label, x, y in pairs:
        if exact:
            assert x.dtype == y.dtype and torch.equal(x, y), f"{label} differ (bitwise expected)"
            continue
        tol = TOLERANCES[kind]
        atol = tol["atol"] * float(y.abs().max()) if y.numel() else 0.0
        try:
            torch.testing.assert_close(x, y, rtol=tol["rtol"], atol=atol)
        except AssertionError as exc:
            raise AssertionError(f"{label}: {exc}") from None
