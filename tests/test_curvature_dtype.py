"""``curvature_dtype``: statistics and inverses kept in bfloat16, worked on in float32.

Storage operations against float64 references within bounds derived from bfloat16's epsilon
(one rounding of a float32 result); the optimizer in bfloat16 against itself across storages,
ranks (threads), checkpoints and dtypes; the float32 option against the default, bitwise; and
the refusals.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from torch import nn

from mbf import MBF, packed
from mbf import storage as storage_module
from mbf.packed import SymmetricPacking
from mbf.storage import STORAGES
from threaded_ranks import World, patch_comm_device, run_threads, threaded

BF16 = torch.bfloat16
#: Half a unit in the last place of bfloat16, relative: the error of rounding once.
HALF_ULP = torch.finfo(BF16).eps / 2
#: float32's epsilon: the float32 work before the rounding adds errors of this order.
F32 = torch.finfo(torch.float32).eps


def _symmetric(n: int, s: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(n, s, s + 2, dtype=torch.float64, generator=gen)
    return a @ a.mT / s


def _stored(kind: str, blocks: torch.Tensor) -> torch.Tensor:
    """``blocks`` (float64) in ``kind`` storage, rounded to bfloat16."""
    return STORAGES[kind].from_blocks(blocks).to(BF16)


def _whole(kind: str, stored: torch.Tensor, size: int) -> torch.Tensor:
    return STORAGES[kind].to_blocks(stored, size).double()


def _assert_rounded_once(got: torch.Tensor, want: torch.Tensor, slack: float) -> None:
    """``got`` is ``want`` rounded once to bfloat16, up to float32 work of about ``slack``
    times the largest entry's float32 epsilon."""
    bound = HALF_ULP * want.abs() + slack * F32 * float(want.abs().max())
    excess = (got - want).abs() - bound
    assert float(excess.max()) <= 0, f"off by {float(excess.max()):.3g} beyond one rounding"


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 3 blocks, so that 7 blocks take chunks of 3, 3 and 1."""
    monkeypatch.setattr(packed, "CHUNK_BLOCKS", 3)


@pytest.mark.parametrize("kind", ["full", "packed"])
def test_updates_folds_factorizations_and_solves_round_float32_work_once(kind: str) -> None:
    storage = STORAGES[kind]
    gen = torch.Generator().manual_seed(0)
    s, n = 5, 7
    blocks = _symmetric(n, s, gen)
    v = torch.randn(n, s, dtype=torch.float32, generator=gen)
    v64 = v.double()

    # The running-average update with a batch estimate v v^T.
    stored = _stored(kind, blocks)
    start = _whole(kind, stored, s)
    storage.add_outer_(stored, v, 0.1)
    want = 0.9 * start + 0.1 * v64[:, :, None] * v64[:, None, :]
    _assert_rounded_once(_whole(kind, stored, s), want, slack=4)

    # The fold of a queue of three estimates (weights a_i), as one product.
    stored = _stored(kind, blocks)
    start = _whole(kind, stored, s)
    rows = torch.randn(n, 3, s, dtype=torch.float32, generator=gen)
    weights = [0.1, 0.1, 0.1]
    want = start.clone()
    for i, a in enumerate(weights):
        g = rows[:, i].double()
        want = (1 - a) * want + a * g[:, :, None] * g[:, None, :]
    storage.fold_(stored, rows.clone(), weights)
    _assert_rounded_once(_whole(kind, stored, s), want, slack=16)

    # A per-example estimate (whole blocks).
    stored = _stored(kind, blocks)
    start = _whole(kind, stored, s)
    estimate = _symmetric(n, s, gen).float()
    storage.lerp_(stored, estimate, 0.25)
    _assert_rounded_once(_whole(kind, stored, s), start + 0.25 * (estimate.double() - start), 4)

    # Traces in float32 of the stored values.
    stored = _stored(kind, blocks)
    trace = storage.trace(stored)
    assert trace.dtype == torch.float32
    torch.testing.assert_close(trace.double(), _whole(kind, stored, s).diagonal(0, 1, 2).sum(-1),
                               rtol=4 * F32, atol=0)

    # The factorization: the float64 inverse of the stored statistics (positive definite: no
    # damping raise), rounded once.
    damping = torch.rand(n, dtype=torch.float32, generator=gen) + 0.5
    out = torch.empty_like(stored)
    report = storage.factor(stored, damping, out=out)
    assert (report.blocks, report.retried, report.fallback) == (n, 0, 0)
    eye = torch.eye(s, dtype=torch.float64)
    want = torch.linalg.inv(_whole(kind, stored, s) + damping.double()[:, None, None] * eye)
    cond = float(torch.linalg.cond(want).max())
    _assert_rounded_once(_whole(kind, out, s), want, slack=8 * cond)

    # The solve reads the bfloat16 inverses exactly: float32 error only, no bfloat16 rounding
    # of the right-hand side or the result (which would be ~1e-3 off).
    rhs = torch.randn(n, s, dtype=torch.float32, generator=gen)
    got = storage.solve(out, rhs)
    assert got.dtype == torch.float32
    want = (_whole(kind, out, s) @ rhs.double()[:, :, None])[..., 0]
    scale = (_whole(kind, out, s).abs() @ rhs.double().abs()[:, :, None])[..., 0]
    assert float(((got.double() - want).abs() - 2 * s * F32 * scale).max()) <= 0


@pytest.mark.parametrize("kind", ["full", "packed"])
def test_rounded_low_rank_statistics_factor_without_retries(kind: str) -> None:
    """Rank-one blocks ``g g^T`` rounded to bfloat16 are indefinite at a damping of 1e-4 of
    their trace; the raised damping makes those positive definite, and only those: the
    full-rank blocks beside them keep the damping they were given."""
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(32, 32, dtype=torch.float64, generator=gen)
    blocks = torch.cat([g[:, :, None] * g[:, None, :], _symmetric(32, 32, gen)])
    stored = _stored(kind, blocks)
    damping = 1e-4 * blocks.diagonal(0, 1, 2).sum(-1).float()
    report = STORAGES[kind].factor(stored, damping, out=torch.empty_like(stored))
    assert (report.retried, report.fallback) == (0, 0)
    exact = torch.linalg.eigvalsh(_whole(kind, stored, 32)) + damping.double()[:, None]
    failing = exact.amin(-1) < 0
    assert bool(failing.any()) and not bool(failing.all())  # without the raise some would fail
    # Only those get more damping: the others' inverses are those of the given damping.
    inverse = torch.empty_like(stored)
    STORAGES[kind].factor(stored, damping, out=inverse)
    eye = torch.eye(32, dtype=torch.float64)
    fine = ~failing
    want = torch.linalg.inv(
        _whole(kind, stored, 32)[fine] + damping.double()[fine, None, None] * eye
    )
    got = _whole(kind, inverse, 32)[fine]
    assert float(((got - want).abs() / want.abs().amax((1, 2), keepdim=True)).max()) < 0.05


def test_a_poisoned_16_bit_block_is_reset_and_falls_back() -> None:
    storage = STORAGES["full"]
    blocks = _symmetric(7, 4, torch.Generator().manual_seed(1))
    blocks[4] = float("nan")
    stored = _stored("full", blocks)
    out = torch.empty_like(stored)
    report = storage.factor(stored, 0.5, out=out)
    assert (report.nonfinite, report.fallback) == (1, 1)
    assert torch.equal(stored[4], torch.zeros_like(stored[4]))
    assert torch.equal(out[4].double(), torch.eye(4, dtype=torch.float64) / 0.5)


# ------------------------------------------------------------------------ the optimizer
def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(50 + step)
    return torch.randn(16, 12, generator=gen), torch.randn(16, 3, generator=gen)


def _step(model: nn.Module, opt: MBF, step: int) -> None:
    x, y = _batch(step)
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()


OPTIONS: dict[str, Any] = {"lr": 0.01, "inv_every": 3, "max_block_size": 5}


def _build(**options: Any) -> tuple[nn.Module, MBF]:
    model = _model()
    return model, MBF(model, **{**OPTIONS, **options})


def _train(steps: range, **options: Any) -> tuple[nn.Module, MBF]:
    model, opt = _build(**options)
    for step in steps:
        _step(model, opt, step)
    return model, opt


def _params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _saved(opt: MBF) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_float32_is_the_default_path_bitwise_and_bfloat16_is_not() -> None:
    default, _ = _train(range(6))
    named, opt = _train(range(6), curvature_dtype=torch.float32)
    assert torch.equal(_params(default), _params(named))
    assert opt.state_dict()["mbf"]["units"][0]["fisher"].dtype == torch.float32
    low, low_opt = _train(range(6), curvature_dtype="bfloat16")
    assert not torch.equal(_params(default), _params(low))  # the option does something
    assert low_opt.curvature_dtype is BF16
    torch.testing.assert_close(_params(low), _params(default), rtol=0, atol=0.05)


@pytest.mark.parametrize("storage", ["full", "packed"])
def test_bfloat16_state_holds_half_the_curvature_bytes(storage: str) -> None:
    _, wide = _train(range(2), storage=storage)
    _, low = _train(range(2), storage=storage, curvature_dtype=BF16)
    for name, parts in low.memory_report(detail=True).items():
        theirs = wide.memory_report(detail=True)[name]
        assert 2 * parts["statistics"] == theirs["statistics"]
        assert 2 * parts["inverse"] == theirs["inverse"]
        assert (parts["queue"], parts["momentum"]) == (theirs["queue"], theirs["momentum"])
    for record in low.state_dict()["mbf"]["units"]:
        assert record["fisher"].dtype == record["inverse"].dtype == BF16
        assert record["queued"] is None or record["queued"].dtype == torch.float32


def test_packed_and_full_bfloat16_hold_the_same_curvature() -> None:
    """The same float32 products, rounded once, in either storage (stat_buffer=1: both fold
    every estimate at once; full storage by one fused product, packed by a chunked lerp, so
    they may differ by a rounding)."""
    _, full = _train(range(3), curvature_dtype=BF16, stat_buffer=1, lr=0.0)
    _, tri = _train(range(3), curvature_dtype=BF16, storage="packed", lr=0.0)
    for a, b in zip(full.blocks(), tri.blocks(), strict=True):
        assert b.fisher.dtype == BF16
        torch.testing.assert_close(a.fisher.double(), b.fisher.double(),
                                   rtol=2 * HALF_ULP, atol=0)
        torch.testing.assert_close(a.inverse.double(), b.inverse.double(),
                                   rtol=8 * HALF_ULP, atol=8 * HALF_ULP * float(
                                       b.inverse.double().abs().max()))


@pytest.mark.parametrize("storage", ["full", "packed"])
@pytest.mark.parametrize("world", [2, 3])
def test_threaded_ranks_take_one_process_steps_bitwise(
    storage: str, world: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every rank steps on the whole batch (equal gradients, no averaging), so the sharded
    engine must give one process's bits: blocks are factored and solved alike wherever they
    live, and the directions cross in float32, not in the curvature's dtype."""
    patch_comm_device(monkeypatch)
    options = {"storage": storage, "curvature_dtype": BF16}
    alone, alone_opt = _train(range(7), **options)
    shared = World(world)
    built = [_build(**options) for _ in range(world)]

    def rank_body(rank: int) -> tuple[torch.Tensor, bytes]:
        model, opt = built[rank]
        threaded(opt, shared, rank)
        for step in range(7):
            _step(model, opt, step)
        opt.consolidate_state_dict()
        buffer = io.BytesIO()
        torch.save(opt.state_dict()["mbf"]["units"], buffer)
        return _params(model), buffer.getvalue()

    results = run_threads(shared, rank_body)
    want = alone_opt.state_dict()["mbf"]["units"]
    for params, saved in results:
        assert torch.equal(params, _params(alone))
        units = torch.load(io.BytesIO(saved), weights_only=False)
        for mine, theirs in zip(units, want, strict=True):
            for key in ("fisher", "inverse"):
                assert mine[key].dtype == BF16 and torch.equal(mine[key], theirs[key])
            if theirs["queued"] is not None:
                assert torch.equal(mine["queued"], theirs["queued"])


@pytest.mark.parametrize("storage", ["full", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_a_checkpoint_resumes_bitwise_in_its_dtype(storage: str, dtype: torch.dtype) -> None:
    options = {"storage": storage, "curvature_dtype": dtype}
    straight, _ = _train(range(8), **options)
    first, opt = _train(range(4), **options)  # saved with queued estimates (stat_buffer=4)
    saved = _saved(opt)
    assert all(r["fisher"].dtype == dtype for r in saved["mbf"]["units"])
    model, resumed = _build(**options)
    model.load_state_dict(first.state_dict())
    resumed.load_state_dict(saved)
    for step in range(4, 8):
        _step(model, resumed, step)
    assert torch.equal(_params(model), _params(straight))


@pytest.mark.parametrize("storage", ["full", "packed"])
def test_checkpoints_load_across_dtypes(storage: str) -> None:
    """float32 curvature loads into bfloat16 rounded; bfloat16 into float32 exactly; either
    trains on."""
    _, wide = _train(range(4), storage="full")
    _, low = _train(range(4), storage="full", curvature_dtype=BF16)
    for saved, dtype in ((_saved(wide), BF16), (_saved(low), torch.float32)):
        model, opt = _build(storage=storage, curvature_dtype=dtype)
        opt.load_state_dict(saved)
        source = wide if dtype is BF16 else low
        for mine, theirs in zip(opt.blocks(), source.blocks(), strict=True):
            assert mine.fisher.dtype == mine.inverse.dtype == dtype
            # blocks() folds the queue: in float32 on one side, rounded on the other.
            assert torch.equal(mine.inverse, theirs.inverse.to(dtype))
            torch.testing.assert_close(mine.fisher.double(), theirs.fisher.double(),
                                       rtol=2 * HALF_ULP, atol=0)
        _step(model, opt, 4)
        assert torch.isfinite(_params(model)).all()


def test_a_copy_keeps_its_16_bit_curvature() -> None:
    model, opt = _train(range(3), curvature_dtype=BF16)
    twin_model, twin = copy.deepcopy((model, opt))
    for step in range(3, 5):
        _step(model, opt, step)
        _step(twin_model, twin, step)
    assert torch.equal(_params(model), _params(twin_model))


# ------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("value", [torch.float16, torch.float64, torch.int8, "bf16", "half"])
def test_a_dtype_that_is_not_offered_is_refused_by_name(value: Any) -> None:
    with pytest.raises(ValueError, match="curvature_dtype"):
        MBF(_model(), curvature_dtype=value)


def test_a_value_that_is_not_a_dtype_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="curvature_dtype"):
        MBF(_model(), curvature_dtype=16)


def test_a_device_that_cannot_work_the_dtype_is_refused_at_construction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def missing(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError('"baddbmm" not implemented for \'BFloat16\'')

    monkeypatch.setattr(storage_module, "_widened", missing)
    with pytest.raises(ValueError, match="curvature_dtype=torch.bfloat16 cannot be used on cpu"):
        MBF(_model(), curvature_dtype=BF16)
    MBF(_model())  # float32 needs no widening: never refused


def test_the_packing_widens_16_bit_triangles_when_asked() -> None:
    packing = SymmetricPacking.of(3, torch.device("cpu"))
    blocks = _symmetric(2, 3, torch.Generator().manual_seed(2)).to(BF16)
    out = torch.empty(2, 3, 3)
    assert torch.equal(packing.unpack(packing.pack(blocks), out=out), blocks.float())
