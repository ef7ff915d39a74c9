"""Per-rank checkpoint files: ``MBF.sharded_state_dict`` and ``MBF.load_sharded_state_dict``.

Each rank saves the blocks it owns (no collective, no gathered copy); the files restore on any
number of ranks exactly as the consolidated checkpoint does (the property test in
``tests/test_sharding_properties.py`` checks that across ranks, storages and options). Here: the
files' contents, the round trip through disk with ``mmap``, one process, and every refusal.
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mbf import MBF
from tensors import flat_params
from threaded_ranks import World, patch_comm_device, run_threads, threaded

# Untied (a block per row, queued statistics) for the block counts below; tied rows' files are
# in the sharded-engine property test (tests/test_sharding_properties.py).
KW: dict[str, Any] = {"lr": 0.05, "inv_every": 3, "max_block_size": 4, "damping": 0.1,
                      "stat_buffer": 3, "tie_rows": False}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(),
                         nn.Linear(3, 2)).double()


def _backward(model: nn.Module, opt: MBF, step: int, part: slice = slice(None)) -> None:
    """Step ``step``'s gradients of ``part`` of its batch (the caller averages and steps)."""
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(12, 6, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 2, (12,), generator=gen)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x[part]), y[part]).backward()


def _saved_on_ranks(world: int, steps: int = 5, **options: Any) -> dict[str, Any]:
    """``steps`` steps on ``world`` threaded ranks; every rank's file (deep copies), the
    consolidated state dict and the model's state."""
    shared = World(world)
    models = [_model() for _ in range(world)]

    def body(rank: int) -> dict[str, Any]:
        model = models[rank]
        opt = threaded(MBF(model, process_group=False, **{**KW, **options}), shared, rank)
        per = 12 // world
        for step in range(steps):
            _backward(model, opt, step, slice(rank * per, (rank + 1) * per))
            for p in model.parameters():  # DDP: the mean of the ranks' gradients
                shared.all_reduce(rank, p.grad)
                p.grad /= world
            opt.step()
        own = copy.deepcopy(opt.sharded_state_dict())
        opt.consolidate_state_dict()
        return {"file": own, "whole": copy.deepcopy(opt.state_dict()),
                "model": copy.deepcopy(model.state_dict())}

    with pytest.MonkeyPatch.context() as mp:
        patch_comm_device(mp)
        results = run_threads(shared, body)
    return {"files": [r["file"] for r in results], "whole": results[0]["whole"],
            "model": results[0]["model"]}


def _continued(saved: dict[str, Any], load: Any, steps: range, **options: Any) -> torch.Tensor:
    """One process resumed by ``load(opt)`` from ``saved``, trained over ``steps``."""
    model = _model()
    model.load_state_dict(saved["model"])
    opt = MBF(model, **{**KW, **options})
    load(opt)
    for step in steps:
        _backward(model, opt, step)
        opt.step()
    return flat_params(model)


@pytest.fixture(scope="module")
def two_ranks() -> dict[str, Any]:
    return _saved_on_ranks(2)


def test_each_rank_file_holds_its_own_blocks(two_ranks: dict[str, Any]) -> None:
    files, whole = two_ranks["files"], two_ranks["whole"]
    assert [f["mbf"]["shard"] for f in files] == [{"rank": r, "world_size": 2} for r in (0, 1)]
    for position, record in enumerate(whole["mbf"]["units"]):
        pieces = [f["mbf"]["units"][position] for f in files]
        (a0, b0), (a1, b1) = (p["blocks"] for p in pieces)
        assert (a0, b1) == (0, record["num_blocks"]) and b0 == a1  # rank 0 first, then rank 1
        for key in ("fisher", "inverse"):
            joined = torch.cat([p[key] for p in pieces])
            assert torch.equal(joined, record[key]), (record["name"], key)
        if record["queued"] is not None:
            assert torch.equal(torch.cat([p["queued"] for p in pieces]), record["queued"])
    assert all(w["queued"] is not None for w in whole["mbf"]["units"])  # the queue is saved
    # Blocks of 4: the first Linear's 10 and the last's 2 share a bucket, split 6 / 6: rank 0
    # owns none of the last Linear (an empty piece). Blocks of 3: the middle one's 6, split 3 / 3.
    assert [p["blocks"] for p in files[0]["mbf"]["units"]] == [[0, 6], [0, 3], [0, 0]]
    assert [p["blocks"] for p in files[1]["mbf"]["units"]] == [[6, 10], [3, 6], [0, 2]]


def test_rank_files_resume_as_the_consolidated_checkpoint(
    two_ranks: dict[str, Any], tmp_path: Path
) -> None:
    """Through disk, loaded with mmap (no rank reads more than it restores), in any order and
    in the other storage: bitwise the run resumed from the consolidated checkpoint."""
    paths = []
    for rank, f in enumerate(two_ranks["files"]):
        paths.append(tmp_path / f"opt.{rank}.pt")
        torch.save(f, paths[-1])
    files = [torch.load(p, mmap=True, weights_only=True) for p in reversed(paths)]
    for storage in ("full", "packed"):
        from_files = _continued(two_ranks, lambda opt: opt.load_sharded_state_dict(files),
                                range(5, 9), storage=storage)
        whole = _continued(two_ranks, lambda opt: opt.load_state_dict(two_ranks["whole"]),
                           range(5, 9), storage=storage)
        assert torch.equal(from_files, whole)


def test_one_process_file_is_the_whole_state() -> None:
    model = _model()
    opt = MBF(model, **KW)
    for step in range(4):
        _backward(model, opt, step)
        opt.step()
    saved = {"model": copy.deepcopy(model.state_dict()),
             "file": copy.deepcopy(opt.sharded_state_dict())}
    assert saved["file"]["mbf"]["shard"] == {"rank": 0, "world_size": 1}
    for step in range(4, 7):
        _backward(model, opt, step)
        opt.step()
    resumed = _continued(saved, lambda o: o.load_sharded_state_dict([saved["file"]]), range(4, 7))
    assert torch.equal(resumed, flat_params(model))


def _changed(files: list[dict], edit: Any) -> list[dict]:
    files = copy.deepcopy(files)
    edit(files)
    return files


def _shift_back(files: list[dict]) -> None:
    """Rank 1's piece of the first unit one block earlier: it overlaps rank 0's."""
    record = files[1]["mbf"]["units"][0]
    record["blocks"] = [record["blocks"][0] - 1, record["blocks"][1] - 1]


@pytest.mark.parametrize(
    ("files_of", "match"),
    [
        (lambda fs: fs[:1], r"ranks \[0\] of \[2\] ranks"),
        (lambda fs: [fs[0], fs[0]], r"ranks \[0, 0\] of \[2\] ranks"),
        (lambda fs: [], "no per-rank state dicts"),
        (lambda fs: _changed(fs, lambda f: f[1]["mbf"].update(step=99)), "differ in 'step'"),
        (lambda fs: _changed(fs, _shift_back), "do not hold its blocks once each"),
        (lambda fs: _changed(fs, lambda f: f[1]["mbf"]["units"][1].update(stat_updates=1)),
         "saved different 'stat_updates'"),
        (lambda fs: [{k: v for k, v in f.items() if k != "mbf"} for f in fs],
         "holds no MBF curvature"),
    ],
    ids=["a rank missing", "a rank twice", "none", "different steps", "overlapping blocks",
         "different schedules", "no curvature"],
)
def test_files_that_do_not_fit_are_refused_and_change_nothing(
    two_ranks: dict[str, Any], files_of: Any, match: str
) -> None:
    model = _model()
    opt = MBF(model, **KW)
    _backward(model, opt, 0)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_sharded_state_dict(files_of(two_ranks["files"]))
    after = opt.state_dict()
    assert after["mbf"]["step"] == before["mbf"]["step"] == 1
    for u, v in zip(after["mbf"]["units"], before["mbf"]["units"], strict=True):
        assert torch.equal(u["fisher"], v["fisher"]) and torch.equal(u["inverse"], v["inverse"])


def test_the_two_kinds_of_state_dict_are_not_mixed_up(two_ranks: dict[str, Any]) -> None:
    opt = MBF(_model(), **KW)
    with pytest.raises(ValueError, match="rank 1's share of 2.*load_sharded_state_dict"):
        opt.load_state_dict(two_ranks["files"][1])
    with pytest.raises(ValueError, match="holds the whole curvature.*load_state_dict"):
        opt.load_sharded_state_dict([two_ranks["whole"]])


def test_a_file_of_another_model_names_the_unit(two_ranks: dict[str, Any]) -> None:
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(),
                          nn.Linear(3, 2)).double()
    opt = MBF(other, **KW)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        match = r"unit 0 \(Linear\) was saved with blocks \(10, 4, 4\) but has \(14, 4, 4\)"
        with pytest.raises(ValueError, match=match):
            opt.load_sharded_state_dict(two_ranks["files"])


def test_files_pickle_without_the_optimizer() -> None:
    """A rank's file is plain tensors and built-ins (``weights_only`` loads it)."""
    model = _model()
    opt = MBF(model, **KW)
    _backward(model, opt, 0)
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.sharded_state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["mbf"]["shard"]["world_size"] == 1
