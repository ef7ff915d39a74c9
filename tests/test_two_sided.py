"""``two_sided``: an output-side block per chunk of a tied layer's rows (``mbf.output_side``).

A float64 reference for each layer type that ties rows (Linear with and without bias, Conv2d):
one step of the paper's form is the tied rows' dense block-diagonal solve on the input side,
then, column by column, the dense solve with the rows' blocks ``(1/W) G_r G_r^T + damping I``
(rows cut as ``chunk_plan`` cuts a row: the last chunk shorter). Then what must hold besides:
untied layers unchanged, the statistics' running average, checkpoints, two ranks, and the
errors. ``tests/bench/test_two_sided_prototype.py`` checks the option against the prototype it
came from (an independent implementation) step for step; FSDP2's refusal is in
``tests/test_fsdp.py``.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import Tensor, nn

from mbf import MBF
from mbf.blocks import chunk_plan
from reference import PAPER_FORM, block_diagonal, dense_blocks
from tensors import flat_params
from threaded_ranks import World, data_parallel_steps, patch_comm_device, run_threads

TWO_SIDED_PAPER_FORM = {**PAPER_FORM, "tie_rows": True, "two_sided": True}


def _mlp() -> nn.Module:
    # Linear(7, 5): rows of 8 (with the bias) in 2 chunks of 4, 5 rows in chunks of 3 + 2;
    # Linear(5, 3): rows of 5 in 2 chunks of 3 (padded), 3 rows in one chunk.
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3, bias=False))


def _conv() -> nn.Module:
    # 4 output channels by 2 kernels of 9, cut into 3 chunks of 3 each; 4 rows in one chunk.
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 9, 5))


MODELS = {"linear": (_mlp, (7,)), "conv": (_conv, (2, 3, 3))}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name][0]().double()


def _batch(shape: tuple[int, ...], seed: int, n: int = 6) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, dtype=torch.float64, generator=gen)


def _loss(out: Tensor) -> Tensor:
    return (out.sin() + 0.3 * out.square()).sum(-1).mean()


def _rows(tensors: list[Tensor], rows: int) -> Tensor:
    """A layer's ``rows x W`` matrix: its weight's rows, with the bias as the last column."""
    return torch.cat([t.reshape(rows, -1) for t in tensors], dim=1)


def _tied_right_solve(layout, g: Tensor, damping: float) -> Tensor:  # noqa: ANN001
    """The input side alone (``tests/test_tied_rows.py``'s reference): every row's blocks
    replaced by the mean over the rows that share them, the dense block-diagonal solve."""
    blocks = dense_blocks(layout, torch.outer(g, g))
    shared_count = layout.num_blocks // layout.row_sharing
    shared = [sum(blocks[t * shared_count + k] for t in range(layout.row_sharing))
              / layout.row_sharing for k in range(shared_count)]
    padded = torch.zeros(layout.num_blocks, layout.block_size, layout.block_size,
                         dtype=torch.float64)
    for b in range(layout.num_blocks):
        block = shared[b % shared_count]
        padded[b, : block.shape[0], : block.shape[0]] = block
    return torch.linalg.solve(block_diagonal(layout, padded, damping), g)


@pytest.mark.parametrize("name", list(MODELS))
def test_one_step_is_the_dense_solve_on_both_sides(name: str) -> None:
    model = _model(name)
    lr, damping, limit = 0.3, 0.05, 4
    opt = MBF(model, **TWO_SIDED_PAPER_FORM, lr=lr, momentum=0.0, damping=damping,
              inv_every=1, max_block_size=limit)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    _loss(model(_batch(MODELS[name][1], 3))).backward()
    grads = {id(p): p.grad.detach().clone() for p in model.parameters()}
    opt.step()
    two_sided = 0
    for unit in opt.blocks():
        g = torch.cat([grads[id(p)].reshape(-1) for p in unit.params])
        theta = torch.cat([before[id(p)].reshape(-1) for p in unit.params])
        got = torch.cat([p.detach().reshape(-1) for p in unit.params])
        rows = unit.layout.row_sharing
        if rows == 1:  # untied (a conv or Linear bias elsewhere): nothing on the output side
            continue
        two_sided += 1
        shapes = [p.shape for p in unit.params]
        right = _tied_right_solve(unit.layout, g, damping)
        # Split back into the unit's tensors, then read as rows x columns.
        sizes = [s.numel() for s in shapes]
        grad_rows = _rows([t.view(s) for t, s in zip(g.split(sizes), shapes, strict=True)], rows)
        right_rows = _rows([t.view(s) for t, s in zip(right.split(sizes), shapes, strict=True)],
                           rows)
        columns = grad_rows.shape[1]
        chunks, size = chunk_plan(rows, limit)
        direction = torch.empty_like(right_rows)
        for r in range(chunks):
            part = slice(r * size, min((r + 1) * size, rows))
            g_r = grad_rows[part]
            left = g_r @ g_r.T / columns + damping * torch.eye(g_r.shape[0], dtype=g.dtype)
            direction[part] = torch.linalg.solve(left, right_rows[part])
        pieces = [direction[:, : shapes[0][1:].numel()].reshape(shapes[0])]
        if len(shapes) > 1:  # the bias column
            pieces.append(direction[:, -1].reshape(shapes[1]))
        want = theta - lr * torch.cat([p.reshape(-1) for p in pieces])
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=unit.name)
    assert two_sided == 2  # both layers of each model are tied


def test_the_output_side_is_a_running_average_and_off_for_untied_layers() -> None:
    model = nn.Sequential(nn.Embedding(10, 6), nn.LayerNorm(6), nn.Linear(6, 4)).double()
    opt = MBF(model, max_block_size=4, two_sided=True, stat_decay=0.5, lr=0.0)
    expected = torch.zeros(1, 4, 4, dtype=torch.float64)
    mass = 0.0
    for step in range(3):
        opt.zero_grad()
        tokens = torch.randint(0, 10, (5,), generator=torch.Generator().manual_seed(step))
        model(tokens).square().sum().backward()
        head = model[2]
        g = torch.cat([head.weight.grad, head.bias.grad[:, None]], dim=1)  # 4 rows x 7
        expected = 0.5 * expected + 0.5 * (g @ g.T / 7)[None]
        mass = 0.5 * mass + 0.5
        opt.step()
    side = opt.state[model[2].weight]["output_side"]
    torch.testing.assert_close(side["fisher"], expected, rtol=1e-12, atol=1e-14)
    assert side["stat_updates"] == 3 and side["stat_mass"] == pytest.approx(mass)
    for module in (model[0], model[1]):  # embeddings and norms keep their own blocks only
        assert "output_side" not in opt.state[module.weight]


def _train(model: nn.Module, opt: MBF, steps: range, shape: tuple[int, ...]) -> None:
    for step in steps:
        opt.zero_grad()
        _loss(model(_batch(shape, 10 + step))).backward()
        opt.step()


def test_it_changes_the_step_and_off_is_the_tied_step() -> None:
    shape = MODELS["linear"][1]
    runs = {}
    for label, options in (("tied", {}), ("off", {"two_sided": False}),
                           ("two", {"two_sided": True})):
        model = _model("linear")
        _train(model, MBF(model, max_block_size=4, **options), range(25), shape)
        runs[label] = flat_params(model)
    assert torch.equal(runs["tied"], runs["off"])
    assert (runs["two"] - runs["tied"]).abs().max() > 1e-4


def test_a_checkpoint_resumes_on_the_same_bits() -> None:
    shape = MODELS["conv"][1]
    model = _model("conv")
    opt = MBF(model, max_block_size=4, two_sided=True, inv_every=5)
    _train(model, opt, range(7), shape)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _train(model, opt, range(7, 14), shape)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = _model("conv")
    fresh.load_state_dict(saved["model"])
    fresh_opt = MBF(fresh, max_block_size=4, inv_every=5)  # the saved groups say two-sided
    fresh_opt.load_state_dict(saved["opt"])
    assert fresh_opt.param_groups[0]["two_sided"] is True
    _train(fresh, fresh_opt, range(7, 14), shape)
    assert torch.equal(flat_params(fresh), flat_params(model))


def test_two_ranks_take_the_one_process_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    patch_comm_device(monkeypatch)
    shape = MODELS["conv"][1]
    options = {"max_block_size": 4, "two_sided": True, "damping": 0.05, "inv_every": 3}
    model = _model("conv")
    alone = MBF(model, process_group=False, **options)
    _train(model, alone, range(6), shape)
    world = World(2)
    built = [(m := _model("conv"), MBF(m, process_group=False, **options)) for _ in range(2)]

    batches = [_batch(shape, 10 + step) for step in range(6)]

    def rank_body(rank: int) -> Tensor:
        net, opt = built[rank]
        return data_parallel_steps(world, rank, net, opt, batches,
                                   lambda out: _loss(out))

    first, second = run_threads(world, rank_body)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, flat_params(model), rtol=1e-8, atol=1e-11)


def test_16_bit_curvature_keeps_the_output_side_in_float32() -> None:
    model = _model("linear").float()
    opt = MBF(model, max_block_size=4, two_sided=True, curvature_dtype=torch.bfloat16)
    for step in range(5):
        opt.zero_grad()
        _loss(model(_batch(MODELS["linear"][1], step).float())).backward()
        opt.step()
    side = opt.state[model[0].weight]["output_side"]
    assert side["fisher"].dtype == torch.float32 and side["inverse"].dtype == torch.float32
    assert torch.isfinite(flat_params(model)).all()


def test_bad_settings_are_refused_by_name() -> None:
    model = _model("linear")
    with pytest.raises(ValueError, match="two_sided=True needs tie_rows=True"):
        MBF(model, two_sided=True, tie_rows=False)
    with pytest.raises(TypeError, match="two_sided must be True or False"):
        MBF(model, two_sided=1)  # type: ignore[arg-type]
