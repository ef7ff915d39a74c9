"""Property-based campaign (issue 12): random small architectures x both estimators x both
storages, checked against float64 references built here, independently of the optimizer.

- one step equals the dense block-diagonal solve ``(blockdiag(F) + damping I)^-1 m``;
- finite inputs never give a non-finite parameter (float32, extreme scales, zero damping);
- ``state_dict`` -> fresh optimizer, and ``deepcopy``, take the same next step, bitwise.

Profiles (``HYPOTHESIS_PROFILE``): ``ci`` (default; derandomized, small enough for every run of
the suite) and ``long`` (many more random examples, for a campaign before a release).
"""

from __future__ import annotations

import copy
import io
import os
import warnings
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mbf import MBF
from properties import (
    archs,
    batch,
    build,
    hyperparameters,
    loss,
    param_groups,
    served_by_hooks,
)
from reference import PAPER_FORM, block_diagonal, dense_blocks
from tensors import flat_params

settings.register_profile(
    "ci", max_examples=15, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long", max_examples=300, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ESTIMATORS = pytest.mark.parametrize("estimator", ["batch", "per_example"])
STORAGES = pytest.mark.parametrize("storage", ["full", "packed"])


def _optimizer(net: Any, arch: Any, hp: dict[str, Any], estimator: str, storage: str) -> MBF:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallback notices: the estimator's documented rule
        return MBF(
            param_groups(net, arch, hp), model=net, estimator=estimator, storage=storage,
            loss_reduction=arch.reduction, **{**PAPER_FORM, **hp},  # hp's tie_rows
        )


def _train_step(net: Any, opt: MBF, arch: Any, seed: int) -> None:
    tokens, labels = batch(arch, seed)
    opt.zero_grad()
    loss(net, tokens, labels, arch.reduction).backward()
    opt.step()


def _per_example_grads(net: Any, arch: Any, tokens: torch.Tensor, labels: torch.Tensor,
                       params: list[torch.Tensor]) -> list[torch.Tensor]:
    """``(N, numel)`` gradient of each example's own loss, for each of ``params``."""
    rows: list[list[torch.Tensor]] = [[] for _ in params]
    for i in range(tokens.shape[0]):
        one = loss(net, tokens[i : i + 1], labels[i : i + 1], "sum")
        grads = torch.autograd.grad(one, params, allow_unused=True)
        for row, p, g in zip(rows, params, grads, strict=True):
            row.append(torch.zeros(p.numel(), dtype=p.dtype) if g is None else g.reshape(-1))
    return [torch.stack(r) for r in rows]


@ESTIMATORS
@STORAGES
@settings(max_examples=settings().max_examples * 2)
@given(data=st.data())
def test_one_step_equals_the_dense_block_diagonal_solve(
    estimator: str, storage: str, data: st.DataObject
) -> None:
    arch = data.draw(archs(estimator), label="arch")
    hp = data.draw(hyperparameters(), label="hyperparameters")
    net = build(arch)
    opt = _optimizer(net, arch, hp, estimator, storage)
    tokens, labels = batch(arch, 1)
    trainable = [p for p in net.parameters() if p.requires_grad]
    frozen = {id(p): p.detach().clone() for p in net.parameters() if not p.requires_grad}
    before = {id(p): p.detach().clone() for p in trainable}
    served = served_by_hooks(net, opt.param_groups) if estimator == "per_example" else set()
    per_example: dict[int, torch.Tensor] = {}
    if served:  # on a twin without the optimizer's hooks, which would record these passes
        twin = build(arch)
        twin_params = [p for p in twin.parameters() if p.requires_grad]
        rows = _per_example_grads(twin, arch, tokens, labels, twin_params)
        per_example = dict(zip(map(id, trainable), rows, strict=True))
    opt.zero_grad()
    loss(net, tokens, labels, arch.reduction).backward()
    grads = {id(p): p.grad.detach().clone() for p in trainable}
    opt.step()

    for unit in opt.blocks():
        group = opt.param_groups[next(
            g for g, grp in enumerate(opt.param_groups)
            if any(p is unit.params[0] for p in grp["params"]))]
        lr, damping, wd = group["lr"], group["damping"], group["weight_decay"]
        decoupled = group["decoupled_weight_decay"]
        flags = {id(p) in served for p in unit.params}
        assert len(flags) == 1, f"{unit.name}: one estimator per unit"
        g = torch.cat([grads[id(p)].reshape(-1) for p in unit.params])
        theta = torch.cat([before[id(p)].reshape(-1) for p in unit.params])
        if flags.pop():  # empirical Fisher (1/N) sum_i g_i g_i^T of per-example loss gradients
            rows = torch.cat([per_example[id(p)] for p in unit.params], dim=1)
            fisher = rows.T @ rows / tokens.shape[0]
        else:  # batch gradient's outer product
            fisher = torch.outer(g, g)
        blocks = dense_blocks(unit.layout, fisher)
        tied = unit.layout.row_sharing if group["tie_rows"] else 1
        if tied > 1:  # tie_rows: every block is the mean of the blocks of the rows sharing it
            shared = len(blocks) // tied
            means = [sum(blocks[t * shared + k] for t in range(tied)) / tied
                     for k in range(shared)]
            blocks = [means[b % shared] for b in range(len(blocks))]
        # The partition: every coordinate once; blocks within max_block_size (norm pairs: 2).
        for idx in unit.layout.dense_indices():
            assert len(idx) <= max(group["max_block_size"], 2), unit.name
        size = max(b.shape[0] for b in blocks)
        stacked = torch.zeros(len(blocks), size, size, dtype=torch.float64)
        for b, blk in enumerate(blocks):
            stacked[b, : blk.shape[0], : blk.shape[0]] = blk
        dense = block_diagonal(unit.layout, stacked, damping)
        m = g + wd * theta if wd and not decoupled else g
        expected = theta * (1 - lr * wd if decoupled else 1.0) - lr * torch.linalg.solve(dense, m)
        got = torch.cat([p.detach().reshape(-1) for p in unit.params])
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-10, msg=unit.name)
        assert sorted(i for idx in unit.layout.dense_indices() for i in idx.tolist()) == list(
            range(g.numel())), f"{unit.name}: blocks do not partition the unit"
    in_units = {id(p) for u in opt.blocks() for p in u.params}
    assert in_units == {id(p) for p in trainable if p.numel() > 0}
    for p in net.parameters():
        if not p.requires_grad:
            assert torch.equal(p.detach(), frozen[id(p)])


@ESTIMATORS
@STORAGES
@pytest.mark.filterwarnings("ignore:MBF. (skipped a step|a preconditioned update):UserWarning")
@given(data=st.data())
def test_finite_inputs_never_give_a_non_finite_parameter(
    estimator: str, storage: str, data: st.DataObject
) -> None:
    arch = data.draw(archs(estimator), label="arch")
    hp = data.draw(hyperparameters(), label="hyperparameters")
    hp["damping"] = data.draw(st.sampled_from((0.0, 1e-8, hp["damping"])), label="damping")
    scale = data.draw(st.sampled_from((1e-4, 1.0, 1e4)), label="embedding scale")
    net = build(arch, torch.float32)
    with torch.no_grad():
        net.embed.weight.mul_(scale)
    opt = _optimizer(net, arch, hp, estimator, storage)
    for seed in range(3):
        _train_step(net, opt, arch, seed)
        for name, p in net.named_parameters():
            assert torch.isfinite(p).all(), f"{name} after step {seed + 1}"


@ESTIMATORS
@STORAGES
@pytest.mark.filterwarnings("ignore:MBF. skipped a step:UserWarning")  # both copies skip it
@given(data=st.data())
def test_state_dict_into_a_fresh_optimizer_takes_the_same_next_step(
    estimator: str, storage: str, data: st.DataObject
) -> None:
    arch = data.draw(archs(estimator), label="arch")
    hp = data.draw(hyperparameters(), label="hyperparameters")
    steps = data.draw(st.integers(1, 3), label="steps before saving")
    net = build(arch)
    opt = _optimizer(net, arch, hp, estimator, storage)
    for seed in range(steps):
        _train_step(net, opt, arch, seed)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = build(arch)
    fresh.load_state_dict(saved["model"])
    fresh_opt = _optimizer(fresh, arch, hp, estimator, storage)
    fresh_opt.load_state_dict(saved["opt"])
    for seed in range(steps, steps + 2):
        _train_step(net, opt, arch, seed)
        _train_step(fresh, fresh_opt, arch, seed)
        assert torch.equal(flat_params(net), flat_params(fresh))
    assert opt.counters == fresh_opt.counters


@ESTIMATORS
@STORAGES
@pytest.mark.filterwarnings("ignore:MBF. skipped a step:UserWarning")  # both copies skip it
@given(data=st.data())
def test_a_deep_copy_takes_the_same_next_step(
    estimator: str, storage: str, data: st.DataObject
) -> None:
    arch = data.draw(archs(estimator), label="arch")
    hp = data.draw(hyperparameters(), label="hyperparameters")
    steps = data.draw(st.integers(1, 3), label="steps before copying")
    net = build(arch)
    opt = _optimizer(net, arch, hp, estimator, storage)
    for seed in range(steps):
        _train_step(net, opt, arch, seed)
    twin, twin_opt = copy.deepcopy((net, opt))
    for seed in range(steps, steps + 2):
        _train_step(net, opt, arch, seed)
        _train_step(twin, twin_opt, arch, seed)
        assert torch.equal(flat_params(net), flat_params(twin))
    assert opt.counters == twin_opt.counters
