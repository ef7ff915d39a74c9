"""``tie_rows``: one block per column chunk shared by a layer's rows (``mbf.tied``).

Float64 references for every layer type the option ties (Linear with and without bias,
ConvNd, 2-d and 4-d parameters given without their module), both estimators: the statistics
are the running average of ``(1/T) sum_t g_tk g_tk^T`` over the sharing rows, and one step of
the paper's form is the dense block-diagonal solve with each row's blocks replaced by the block
its rows share. Then what must not change: storage, several ranks, checkpoints, 16-bit
curvature; and the errors (FSDP2 models, where rows are not tied yet, are checked in
``tests/test_fsdp.py``). The one-step property test (``tests/test_properties.py``) and the
sharded-engine property test draw ``tie_rows`` too; ``tests/bench/test_tied_rows_prototype.py``
checks the option against the prototype it came from, an independent implementation.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from mbf import MBF, LayerRule, register_layer
from mbf.blocks import BlockLayout, conv_layout, linear_layout
from mbf.curvature import conv_block_stats, linear_block_stats
from mbf.layers import rule_for
from mbf.tied import sum_shared
from reference import PAPER_FORM, block_diagonal, dense_blocks, per_example_grads, unit_vectors
from tensors import flat_params
from threaded_ranks import World, data_parallel_steps, patch_comm_device, run_threads

#: The paper's update (the float64 references spell it out) with the rows tied.
TIED_PAPER_FORM = {**PAPER_FORM, "tie_rows": True}


def _mlp() -> nn.Module:
    # 7 inputs + bias = 8 columns: two chunks of 4; 5 + bias = 6: two chunks of 3.
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3, bias=False))


def _conv1d() -> nn.Module:
    return nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(6, 2))


def _conv2d() -> nn.Module:
    # Kernels of 9 entries cut into chunks of at most 4: three chunks (3 + 3 + 3) per kernel.
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 9, 2))


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "linear": (_mlp, (7,)),
    "conv1d": (_conv1d, (2, 2)),
    "conv2d": (_conv2d, (2, 3, 3)),
}


def _batch(shape: tuple[int, ...], seed: int, n: int = 6) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, dtype=torch.float64, generator=gen)


def _per_example_loss(out: Tensor) -> Tensor:
    """Nonlinear, so that the output gradients differ between examples."""
    return (out.sin() + 0.3 * out.square()).sum(-1)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name][0]().double()


def _shared(layout: BlockLayout, blocks: list[Tensor]) -> list[Tensor]:
    """The dense reference's blocks with every row's replaced by the mean over the rows that
    share it (rows ``t * K + k`` share block ``k``), one per shared block."""
    shared = layout.num_blocks // layout.row_sharing
    return [
        sum(blocks[t * shared + k] for t in range(layout.row_sharing)) / layout.row_sharing
        for k in range(shared)
    ]


def _padded(blocks: list[Tensor], size: int) -> Tensor:
    out = torch.zeros(len(blocks), size, size, dtype=torch.float64)
    for b, block in enumerate(blocks):
        out[b, : block.shape[0], : block.shape[0]] = block
    return out


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("estimator", ["batch", "per_example"])
def test_statistics_are_the_running_average_over_the_sharing_rows(
    name: str, estimator: str
) -> None:
    model = _model(name)
    opt = MBF(model, **TIED_PAPER_FORM, lr=0.0, momentum=0.0, damping=0.1, stat_decay=0.5,
              inv_every=1, max_block_size=4, estimator=estimator)
    expected: dict[str, Tensor] = {}
    for seed in (1, 2):  # the first estimate as it is, then half of each (stat_decay 0.5)
        x = _batch(MODELS[name][1], seed)
        if estimator == "per_example":
            grads = per_example_grads(model, lambda out: _per_example_loss(out).sum(), x)
            by_param = {id(p): grads[k] for k, p in model.named_parameters()}
        opt.zero_grad()
        _per_example_loss(model(x)).mean().backward()
        for unit in opt.blocks():
            if estimator == "per_example":
                rows = unit_vectors([by_param[id(p)] for p in unit.params])
                fisher = rows.T @ rows / x.shape[0]
            else:
                g = torch.cat([p.grad.reshape(-1) for p in unit.params])
                fisher = torch.outer(g, g)
            blocks = dense_blocks(unit.layout, fisher)
            if unit.layout.row_sharing > 1:
                blocks = _shared(unit.layout, blocks)
            estimate = _padded(blocks, unit.layout.block_size)
            previous = expected.get(unit.name)
            expected[unit.name] = estimate if previous is None else 0.5 * previous + 0.5 * estimate
        opt.step()
    tied = 0
    for unit in opt.blocks():
        want = expected[unit.name]
        assert unit.fisher.shape == want.shape, unit.name
        torch.testing.assert_close(unit.fisher, want, rtol=1e-10, atol=1e-13, msg=unit.name)
        tied += unit.layout.row_sharing > 1
    assert tied >= 2  # the weights of every layer above are tied, not only kept apart


@pytest.mark.parametrize("name", list(MODELS))
def test_one_step_is_the_dense_solve_with_the_shared_blocks(name: str) -> None:
    model = _model(name)
    lr, damping = 0.3, 0.05
    opt = MBF(model, **TIED_PAPER_FORM, lr=lr, momentum=0.0, damping=damping, stat_decay=0.9,
              inv_every=1, max_block_size=4)
    x = _batch(MODELS[name][1], 3)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    opt.zero_grad()
    _per_example_loss(model(x)).mean().backward()
    grads = {id(p): p.grad.detach().clone() for p in model.parameters()}
    opt.step()
    for unit in opt.blocks():
        g = torch.cat([grads[id(p)].reshape(-1) for p in unit.params])
        theta = torch.cat([before[id(p)].reshape(-1) for p in unit.params])
        blocks = dense_blocks(unit.layout, torch.outer(g, g))
        if unit.layout.row_sharing > 1:
            shared = _shared(unit.layout, blocks)
            blocks = [shared[b % len(shared)] for b in range(unit.layout.num_blocks)]
        dense = block_diagonal(unit.layout, _padded(blocks, unit.layout.block_size), damping)
        want = theta - lr * torch.linalg.solve(dense, g)
        got = torch.cat([p.detach().reshape(-1) for p in unit.params])
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=unit.name)


def test_parameters_given_without_their_module_tie_as_their_layers_do() -> None:
    torch.manual_seed(0)
    w2 = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)  # read as a Linear weight
    w4 = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)  # as a conv weight
    opt = MBF([w2, w4], **TIED_PAPER_FORM, lr=0.1, momentum=0.0, damping=0.1, inv_every=1,
              max_block_size=4)
    loss = (w2.sin().sum(1) ** 2).sum() + (w4.cos() * w4).sum() ** 2
    loss.backward()
    grads = [w2.grad.clone(), w4.grad.clone()]
    opt.step()
    states = opt.blocks()
    assert [tuple(u.fisher.shape) for u in states] == [(2, 4, 4), (2, 4, 4)]  # chunks; kernels
    for unit, g in zip(states, grads, strict=True):
        blocks = _shared(unit.layout, dense_blocks(unit.layout, torch.outer(g.reshape(-1),
                                                                            g.reshape(-1))))
        torch.testing.assert_close(unit.fisher, _padded(blocks, 4), rtol=1e-12, atol=1e-14)


def test_norms_embeddings_and_flat_tensors_keep_their_own_blocks() -> None:
    model = nn.Sequential(nn.Embedding(10, 6), nn.LayerNorm(6), nn.Linear(6, 4)).double()
    untied = MBF(model, max_block_size=4, tie_rows=False)
    tied = MBF(model, max_block_size=4, tie_rows=True)
    shapes = {u.name: tuple(u.fisher.shape) for u in untied.blocks()}
    tied_shapes = {u.name: tuple(u.fisher.shape) for u in tied.blocks()}
    assert tied_shapes["2 (Linear)"] == (2, 4, 4)  # 7 columns in 2 chunks, one for all 4 rows
    assert shapes["2 (Linear)"] == (8, 4, 4)
    for name in ("0 (Embedding)", "1 (LayerNorm)"):
        assert tied_shapes[name] == shapes[name], name
    stats = {n: r["statistics"] for n, r in tied.memory_report(detail=True).items()}
    assert stats["2 (Linear)"] == 2 * 4 * 4 * 8  # float64 blocks: 4x fewer than untied
    assert untied.memory_report(detail=True)["2 (Linear)"]["statistics"] == 4 * stats[
        "2 (Linear)"]


def _train(model: nn.Module, opt: MBF, steps: range, shape: tuple[int, ...]) -> None:
    for step in steps:
        x = _batch(shape, 10 + step)
        opt.zero_grad()
        _per_example_loss(model(x)).mean().backward()
        opt.step()


@pytest.mark.parametrize("estimator", ["batch", "per_example"])
def test_packed_storage_takes_the_full_storage_steps(estimator: str) -> None:
    runs = []
    for storage in ("full", "packed"):
        model = _model("conv2d")
        opt = MBF(model, max_block_size=4, tie_rows=True, storage=storage, estimator=estimator)
        _train(model, opt, range(25), MODELS["conv2d"][1])
        runs.append(flat_params(model))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-10, atol=1e-12)


def test_a_checkpoint_resumes_on_the_same_bits_and_keeps_the_setting() -> None:
    shape = MODELS["linear"][1]
    model = _model("linear")
    opt = MBF(model, max_block_size=4, tie_rows=True)
    _train(model, opt, range(7), shape)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _train(model, opt, range(7, 12), shape)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = _model("linear")
    fresh.load_state_dict(saved["model"])
    fresh_opt = MBF(fresh, max_block_size=4, tie_rows=False)  # the saved groups say tied
    fresh_opt.load_state_dict(saved["opt"])
    assert fresh_opt.param_groups[0]["tie_rows"] is True
    assert [tuple(u.fisher.shape) for u in fresh_opt.blocks()] == [(2, 4, 4), (2, 3, 3)]
    _train(fresh, fresh_opt, range(7, 12), shape)
    assert torch.equal(flat_params(fresh), flat_params(model))


def test_two_ranks_take_the_one_process_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    patch_comm_device(monkeypatch)
    shape = MODELS["conv2d"][1]
    options = {"max_block_size": 4, "tie_rows": True, "estimator": "per_example",
               "damping": 0.05}
    model = _model("conv2d")
    alone = MBF(model, process_group=False, **options)
    _train(model, alone, range(6), shape)
    world = World(2)
    built = [(m := _model("conv2d"), MBF(m, process_group=False, **options)) for _ in range(2)]

    batches = [_batch(shape, 10 + step) for step in range(6)]

    def rank_body(rank: int) -> Tensor:
        net, opt = built[rank]
        return data_parallel_steps(world, rank, net, opt, batches,
                                   lambda out: _per_example_loss(out).mean())

    first, second = run_threads(world, rank_body)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, flat_params(model), rtol=1e-8, atol=1e-11)


def test_bfloat16_curvature_stays_close_to_float32() -> None:
    runs = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = _conv2d()
        opt = MBF(model, max_block_size=4, tie_rows=True, curvature_dtype=dtype)
        for step in range(20):
            x = _batch(MODELS["conv2d"][1], 10 + step).float()
            opt.zero_grad()
            _per_example_loss(model(x)).mean().backward()
            opt.step()
        assert all(u.fisher.dtype == dtype for u in opt.blocks() if u.layout.row_sharing > 1)
        runs.append(flat_params(model))
    assert torch.isfinite(runs[1]).all()
    # 20 steps of lr 3e-3 move each weight by up to 0.06; bfloat16 blocks change the step by
    # about their rounding (2^-9 relative), far below that.
    assert (runs[0] - runs[1]).abs().max() < 5e-3


def test_a_bad_or_changed_setting_is_refused_by_name() -> None:
    model = _model("linear")
    with pytest.raises(TypeError, match="tie_rows must be True or False"):
        MBF(model, tie_rows="yes")  # type: ignore[arg-type]
    opt = MBF(model, tie_rows=True)
    opt.param_groups[0]["tie_rows"] = False
    model(torch.randn(2, 7, dtype=torch.float64)).sum().backward()
    before = flat_params(model)
    with pytest.raises(ValueError, match="tie_rows of param group 0 was changed"):
        opt.step()
    assert torch.equal(flat_params(model), before)



@pytest.mark.parametrize("positions", [(), (3,)])
def test_the_linear_rule_sums_the_shared_blocks_as_every_row_s_would(
    positions: tuple[int, ...]
) -> None:
    # One position per example (a rank-one gradient: one GEMM) and a sequence of three.
    gen = torch.Generator().manual_seed(5)
    layout = linear_layout(torch.empty(5, 7), torch.empty(5), 4)
    x = torch.randn(6, *positions, 7, dtype=torch.float64, generator=gen)
    d = torch.randn(6, *positions, 5, dtype=torch.float64, generator=gen)
    every = linear_block_stats(layout, x, d)
    shared = linear_block_stats(layout, x, d, tied=5, chunk_elems=40)  # several slices
    assert shared.shape == (2, 4, 4)
    torch.testing.assert_close(shared, sum_shared(every, 5), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="tied all or none"):
        linear_block_stats(layout, x, d, tied=2)


def test_the_conv_rule_sums_each_input_channel_s_kernels_over_the_output_channels() -> None:
    gen = torch.Generator().manual_seed(6)
    conv = nn.Conv2d(2, 3, 3).double()
    layout = conv_layout(conv.weight, 4)  # 6 kernels of 9 in chunks of 3: 18 blocks
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64, generator=gen)
    g = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=gen)
    every, _ = conv_block_stats(conv, layout, None, x, g)
    shared, _ = conv_block_stats(conv, layout, None, x, g, tied=3)
    assert shared.shape == (6, 3, 3)
    torch.testing.assert_close(shared, sum_shared(every, 3), rtol=1e-12, atol=1e-12)


class _OwnLinear(nn.Linear):
    """A module type with a rule of its own that knows nothing of tied rows."""


def test_a_rule_that_returns_every_row_s_blocks_is_summed_by_mbf() -> None:
    def every_row(module: nn.Module, layouts: Any, x: Tensor, d: Tensor, context: Any) -> list:
        return [linear_block_stats(layouts[0], x, d)]  # ignores context.tied

    runs = []
    for own in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential((_OwnLinear if own else nn.Linear)(7, 5)).double()
        rule = LayerRule(units=rule_for(nn.Linear).units, block_stats=every_row)  # type: ignore[union-attr]
        with register_layer(_OwnLinear, rule):
            opt = MBF(model, **TIED_PAPER_FORM, lr=0.1, damping=0.1, inv_every=1,
                      max_block_size=4, estimator="per_example")
            _train(model, opt, range(3), (7,))
        runs.append(opt.blocks()[0].fisher)
    assert runs[0].shape == (2, 4, 4)
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-12, atol=1e-14)


def test_a_grouped_convolution_keeps_a_block_per_kernel() -> None:
    # Its output channels read different input channels: nothing alike to share.
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Conv2d(6, 2, 3)).double()
    shapes = {u.name: tuple(u.fisher.shape) for u in MBF(model, max_block_size=9).blocks()}
    assert shapes["0 (Conv2d)"] == (6 * 2, 9, 9)  # (output, input of its group) kernels
    assert shapes["1 (Conv2d)"] == (6, 9, 9)  # tied: one per input channel
