"""storage="packed": upper-triangle storage of statistics and inverses, against full storage."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from mbf import MBF, packed
from mbf.packed import SymmetricPacking, packed_size
from test_optimizer import _batch, _flat_params, _loss, _net


def _symmetric(n: int, s: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(n, s, s + 2, dtype=torch.float64, generator=gen)
    return a @ a.mT


def test_pack_unpack_outer_solve_and_inverse_agree_with_whole_blocks(monkeypatch) -> None:
    monkeypatch.setattr(packed, "CHUNK_BLOCKS", 3)  # 7 blocks: chunks of 3, 3 and 1
    gen = torch.Generator().manual_seed(0)
    packing = SymmetricPacking.of(5, torch.device("cpu"))
    blocks = _symmetric(7, 5, gen)
    stored = packing.pack(blocks)
    assert stored.shape == (7, packed_size(5)) == (7, 15)
    assert torch.equal(packing.unpack(stored), blocks)
    v = torch.randn(7, 5, dtype=torch.float64, generator=gen)
    assert torch.equal(packing.unpack(packing.outer(v)), v[:, :, None] * v[:, None, :])
    torch.testing.assert_close(packing.solve(stored, v), (blocks @ v[:, :, None])[..., 0])

    blocks[5] = float("nan")  # a poisoned block in the second-to-last chunk
    out = torch.empty_like(stored)
    report = packing.invert_into(packing.pack(blocks), 0.5, out=out)
    assert (report.blocks, report.nonfinite, report.fallback) == (7, 1, 1)
    eye = torch.eye(5, dtype=torch.float64)
    want = torch.linalg.inv(blocks + 0.5 * eye)
    want[5] = eye / 0.5
    torch.testing.assert_close(packing.unpack(out), want)


@pytest.mark.parametrize("estimator", ["batch", "per_example"])
@pytest.mark.parametrize("stat_every", [1, 2])
def test_packed_storage_takes_the_same_steps_as_full(estimator: str, stat_every: int) -> None:
    torch.manual_seed(1)
    data = [_batch() for _ in range(7)]
    results = []
    for storage in ("full", "packed"):
        torch.manual_seed(2)
        model = _net()
        opt = MBF(
            model,
            lr=0.05,
            inv_every=3,
            stat_every=stat_every,
            estimator=estimator,
            max_block_size=5,
            storage=storage,
        )
        for x, y in data:
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
        results.append((_flat_params(model), opt.blocks(), opt.counters))
    (p_full, b_full, c_full), (p_packed, b_packed, c_packed) = results
    torch.testing.assert_close(p_packed, p_full, rtol=1e-12, atol=1e-12)
    assert c_packed == c_full
    for u, v in zip(b_packed, b_full, strict=True):
        torch.testing.assert_close(u.fisher, v.fisher, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(u.inverse, v.inverse, rtol=1e-10, atol=1e-12)


def test_packed_state_is_at_most_block_size_plus_three_floats_per_parameter() -> None:
    model = nn.Sequential(nn.Linear(100, 50), nn.Linear(50, 10))
    opt = MBF(model, lr=0.1, max_block_size=20, storage="packed")
    # Linear(100, 50): 300 blocks of 17 -> 2 triangles of 153 numbers each, plus momentum.
    assert opt.memory_report()["0 (Linear)"] == 4 * (2 * 300 * 153 + 5050)
    floats = sum(opt.memory_report().values()) / 4
    params = sum(p.numel() for p in model.parameters())
    assert floats <= (17 + 3) * params
    full = MBF(model, lr=0.1, max_block_size=20)
    assert sum(full.memory_report().values()) > 1.9 * sum(opt.memory_report().values())


def test_packed_save_resume_is_bitwise_and_loads_across_storages() -> None:
    torch.manual_seed(3)
    data = [_batch() for _ in range(6)]
    kw = dict(lr=0.05, inv_every=2, max_block_size=5)

    def run(model: nn.Module, opt: MBF, batches: list) -> None:
        for x, y in batches:
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()

    torch.manual_seed(4)
    a = _net()
    states = {k: v.clone() for k, v in a.state_dict().items()}
    opt_a = MBF(a, storage="packed", **kw)
    run(a, opt_a, data)

    for storage in ("packed", "full"):
        b = _net()
        b.load_state_dict(states)
        opt_b = MBF(b, storage="packed", **kw)
        run(b, opt_b, data[:3])
        buffer = io.BytesIO()
        torch.save(opt_b.state_dict(), buffer)
        buffer.seek(0)
        opt_c = MBF(b, storage=storage, **kw)
        opt_c.load_state_dict(torch.load(buffer))
        run(b, opt_c, data[3:])
        if storage == "packed":
            assert torch.equal(_flat_params(b), _flat_params(a))
        else:  # the same numbers, kept whole from here on
            torch.testing.assert_close(_flat_params(b), _flat_params(a), rtol=1e-12, atol=1e-12)


def test_unknown_storage_is_refused() -> None:
    with pytest.raises(ValueError, match="storage"):
        MBF(nn.Linear(2, 2), lr=0.1, storage="triangles")
