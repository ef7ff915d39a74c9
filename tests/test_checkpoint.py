"""The versioned curvature schema of MBF's state dict: migrations, matching units by name."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from mbf import MBF, checkpoint
from reference import paper_mbf
from tensors import flat_params
from test_optimizer import _batch, _loss, _net

KW: dict[str, Any] = {"lr": 0.05, "inv_every": 3, "max_block_size": 5, "damping": 0.1}


def _train(model: torch.nn.Module, opt: MBF, data: list) -> None:
    for x, y in data:
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()


def _saved_and_continued(stat_buffer: int) -> tuple[dict, list, torch.Tensor]:
    """A paper-form run saved after 5 steps (one estimate queued since the factorization at
    step 3), and its parameters after 3 more."""
    torch.manual_seed(0)
    data = [_batch() for _ in range(8)]
    torch.manual_seed(1)
    model = _net()
    opt = paper_mbf(model, stat_buffer=stat_buffer, **KW)
    _train(model, opt, data[:5])
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    _train(model, opt, data[5:])
    return saved, data[5:], flat_params(model)


def _resume(saved: dict, data: list, stat_buffer: int) -> tuple[torch.nn.Module, MBF]:
    model = _net()
    model.load_state_dict(saved["model"])
    opt = paper_mbf(model, stat_buffer=stat_buffer, **KW)
    opt.load_state_dict(saved["opt"])
    _train(model, opt, data)
    return model, opt


def _as_version(sd: dict, version: int) -> dict:
    """The state dict as mbf wrote it at schema ``version`` (fields removed, version set)."""
    sd = copy.deepcopy(sd)
    extra = sd["mbf"]
    extra["version"] = version
    for unit in extra["units"]:
        if version < 3:
            del unit["stat_mass"], unit["inverse_scale"]
        if version < 2:
            del unit["queued"], unit["queued_weights"]
    if version < 2:
        del extra["storage"], extra["version"]  # version 1 wrote no version at all
    return sd


def test_every_older_version_has_a_migration() -> None:
    assert set(checkpoint.MIGRATIONS) == set(range(1, checkpoint.VERSION))


@pytest.mark.parametrize("version", [1, 2])
def test_older_checkpoints_are_migrated_and_resume_bitwise(version: int) -> None:
    # Version 1 had no queue: saved with stat_buffer=1, so that nothing is queued.
    stat_buffer = 1 if version == 1 else 3
    saved, rest, expected = _saved_and_continued(stat_buffer)
    if version == 2:
        assert any(u["queued"] is not None for u in saved["opt"]["mbf"]["units"])
    old = {"model": saved["model"], "opt": _as_version(saved["opt"], version)}
    model, opt = _resume(old, rest, stat_buffer)
    assert torch.equal(flat_params(model), expected)
    assert opt.state_dict()["mbf"]["version"] == checkpoint.VERSION


def test_units_are_matched_by_name_not_position() -> None:
    saved, rest, expected = _saved_and_continued(3)
    shuffled = copy.deepcopy(saved)
    shuffled["opt"]["mbf"]["units"].reverse()
    model, _ = _resume(shuffled, rest, 3)
    assert torch.equal(flat_params(model), expected)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda e: e["units"].pop(2), "unit 3 \\(Linear\\) of this optimizer is not in the state"),
        (lambda e: e["units"].append(dict(e["units"][0], name="9 (Linear)")),
         "holds unit 9 \\(Linear\\), which this optimizer does not have"),
        (lambda e: e.update(version=checkpoint.VERSION + 1), "saved by a newer mbf"),
        (lambda e: e.update(version="2"), "invalid version '2'"),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_refused_by_name_and_changes_nothing(
    edit: Any, match: str
) -> None:
    saved, _, _ = _saved_and_continued(3)
    bad = copy.deepcopy(saved["opt"])
    edit(bad["mbf"])
    model = _net()
    opt = paper_mbf(model, stat_buffer=3, **KW)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["mbf"]["step"] == before["mbf"]["step"]
    for u, v in zip(after["mbf"]["units"], before["mbf"]["units"], strict=True):
        assert torch.equal(u["fisher"], v["fisher"]) and u["name"] == v["name"]
