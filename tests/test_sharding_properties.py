"""Property tests of the sharded engine: any model, any number of ranks (2-5), any split.

K ranks run as K threads of this process (``threaded_ranks.py``: the real ``ShardedEngine`` with
its all-reduce done in shared memory), so hypothesis can try many models, block sizes and rank
counts, including buckets with fewer blocks than ranks (ranks that own none of a unit or of a
bucket). Promised for each: every rank's parameters are bitwise the same, they equal one
process's on the global batch, each rank allocates its share of the curvature only, and a
consolidated checkpoint resumes on any number of ranks (1-4), in either storage, on the same
trajectory; so do the per-rank files (``sharded_state_dict``), bitwise as the consolidated one,
each holding that rank's blocks only. Profiles as in
``tests/test_properties.py`` (``HYPOTHESIS_PROFILE``).
"""

from __future__ import annotations

import io
import threading
import warnings
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import test_properties  # noqa: F401 - registers and loads the hypothesis profiles
from mbf import MBF
from tensors import flat_params
from threaded_ranks import World, patch_comm_device, run_threads, threaded

# The ranks average their shards' gradients (as DDP does) where one process takes the mean of
# the whole batch: equal up to rounding, which the preconditioner amplifies by up to about
# 1 / damping relative to the blocks' scale; hence dampings of 0.05 and up and this tolerance.
TOL = {"rtol": 1e-7, "atol": 1e-10}


def _model(widths: tuple[int, int], conv: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    if conv:
        layers += [nn.Conv2d(2, widths[0], 3, padding=1), nn.Tanh(), nn.Flatten()]
        d = widths[0] * 9
    else:
        layers += [nn.Flatten()]
        d = 18
    layers += [nn.Linear(d, widths[1]), nn.Tanh(), nn.Linear(widths[1], 3), nn.LayerNorm(3)]
    return nn.Sequential(*layers).double()


def _batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(size, 2, 3, 3, dtype=torch.float64, generator=gen)
    return x, torch.randint(0, 3, (size,), generator=gen)


def _step(model: nn.Module, opt: MBF, step: int, size: int, shard: slice,
          average: Any = None) -> None:
    x, y = _batch(step, size)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x[shard]), y[shard]).backward()
    if average is not None:
        average(model)
    opt.step()


@st.composite
def cases(draw: st.DrawFn) -> dict[str, Any]:
    steps = draw(st.integers(3, 6))
    return {
        "world": draw(st.integers(2, 5)),
        "resume_world": draw(st.integers(1, 4)),
        "resume_storage": draw(st.sampled_from(["full", "packed"])),
        "widths": (draw(st.integers(1, 3)), draw(st.integers(1, 6))),
        "conv": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
        "per_rank": draw(st.integers(1, 2)),
        "steps": steps,
        "save_at": draw(st.integers(1, steps - 1)),  # a checkpoint mid-run
        "options": {
            "lr": 0.05,
            "momentum": 0.9,
            "damping": draw(st.sampled_from([0.05, 0.3])),
            "stat_decay": 0.9,
            "inv_every": draw(st.integers(1, 3)),
            "max_block_size": draw(st.integers(2, 7)),
            "graft": draw(st.sampled_from([None, "adam"])),
            "bias_correction": draw(st.booleans()),
            "early_refresh": True,
            "relative_damping": draw(st.booleans()),
            "estimator": draw(st.sampled_from(["batch", "per_example"])),
            "storage": draw(st.sampled_from(["full", "packed"])),
            "stat_buffer": draw(st.integers(1, 3)),
            "tie_rows": draw(st.booleans()),
        },
    }


def _build(case: dict[str, Any], **changes: Any) -> tuple[nn.Module, MBF]:
    model = _model(case["widths"], case["conv"], case["seed"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the LayerNorm's batch-estimator notice
        opt = MBF(model, process_group=False, **{**case["options"], **changes})
    return model, opt


def _train(
    case: dict[str, Any], world: int, steps: range, size: int, *, save_at: int | None = None,
    resume: bytes | None = None, resume_files: list[bytes] | None = None, **changes: Any,
) -> list[dict[str, Any]]:
    """Train ``steps`` on ``world`` threaded ranks (one plain process when ``world == 1``),
    from scratch, the ``resume`` checkpoint or the per-rank ``resume_files``; save a
    consolidated checkpoint and per-rank files before ``save_at``. Every rank's parameters,
    memory report, (rank 0) checkpoint bytes and its own per-rank file."""
    shared = World(world)
    rank_of: dict[int, int] = {}

    def average(m: nn.Module) -> None:  # DDP: the mean of the ranks' gradients, in rank order
        for p in m.parameters():
            if p.grad is not None:
                shared.all_reduce(rank_of[threading.get_ident()], p.grad)
                p.grad /= world

    # Built one after another: torch's global generator (initial weights) is not per thread.
    built = [_build(case, **changes) for _ in range(world)]

    def rank_body(rank: int) -> dict[str, Any]:
        rank_of[threading.get_ident()] = rank
        model, opt = built[rank]
        if world > 1:
            threaded(opt, shared, rank)
        if resume is not None:
            state = torch.load(io.BytesIO(resume), weights_only=False)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
        if resume_files is not None:
            files = [torch.load(io.BytesIO(f), weights_only=False) for f in resume_files]
            model.load_state_dict(files[0]["model"])
            opt.load_sharded_state_dict([f["opt"] for f in reversed(files)])  # any order
        per = size // world
        shard = slice(rank * per, (rank + 1) * per)
        saved = own_file = None
        for step in steps:
            if step == save_at:
                buffer = io.BytesIO()  # before consolidating: it needs no gathered copy
                torch.save({"model": model.state_dict(), "opt": opt.sharded_state_dict()},
                           buffer)
                own_file = buffer.getvalue()
                opt.consolidate_state_dict()
                if rank == 0:
                    buffer = io.BytesIO()
                    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
                    saved = buffer.getvalue()
            _step(model, opt, step, size, shard, average if world > 1 else None)
        return {"params": flat_params(model), "memory": opt.memory_report(detail=True),
                "saved": saved, "file": own_file}

    if world == 1:
        return [rank_body(0)]
    return run_threads(shared, rank_body)


@given(cases())
def test_threaded_ranks_take_one_process_steps_and_resume_on_any_number(
    case: dict[str, Any]
) -> None:
    with pytest.MonkeyPatch.context() as mp:
        patch_comm_device(mp)
        _check(case)


def _check(case: dict[str, Any]) -> None:
    world, resumed_on, steps, save_at = (
        case["world"], case["resume_world"], case["steps"], case["save_at"])
    size = case["per_rank"] * world * resumed_on  # shards of equal size on both
    (alone,) = _train(case, 1, range(steps), size)
    results = _train(case, world, range(steps), size, save_at=save_at)
    for r in results[1:]:
        assert torch.equal(r["params"], results[0]["params"])
    torch.testing.assert_close(results[0]["params"], alone["params"], **TOL)
    for name, parts in alone["memory"].items():
        for kind in ("statistics", "inverse"):
            assert sum(r["memory"][name][kind] for r in results) == parts[kind], (name, kind)

    # The consolidated checkpoint resumes on another number of ranks, in either storage.
    resumed = _train(case, resumed_on, range(save_at, steps), size, resume=results[0]["saved"],
                     storage=case["resume_storage"])
    for r in resumed:
        torch.testing.assert_close(r["params"], results[0]["params"], **TOL)

    # So do the per-rank files, on the same bits; each holds its rank's blocks only.
    files = [r["file"] for r in results]
    from_files = _train(case, resumed_on, range(save_at, steps), size, resume_files=files,
                        storage=case["resume_storage"])
    for r, twin in zip(from_files, resumed, strict=True):
        assert torch.equal(r["params"], twin["params"])
    held = [torch.load(io.BytesIO(f), weights_only=False)["opt"]["mbf"]["units"] for f in files]
    for position, unit in enumerate(_build(case)[1].blocks()):
        spans = [records[position]["blocks"] for records in held]
        assert [len(records[position]["fisher"]) for records in held] == [b - a for a, b in spans]
        assert sum(b - a for a, b in spans) == len(unit.fisher)  # tied: fewer than num_blocks
