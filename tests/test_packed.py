"""storage="packed": upper-triangle storage of statistics and inverses, against full storage.

That packed storage takes the steps of full storage, and resumes bitwise or across storages, are
cases of the equivalence harness (``tests/test_equivalence.py``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mbf import MBF, packed
from mbf.packed import SymmetricPacking, packed_size
from mbf.storage import STORAGES, FullStorage
from tensors import flat_params
from test_optimizer import _batch, _loss, _net


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


def test_packed_state_is_at_most_block_size_plus_three_floats_per_parameter() -> None:
    model = nn.Sequential(nn.Linear(100, 50), nn.Linear(50, 10))
    opt = MBF(model, lr=0.1, max_block_size=20, storage="packed", tie_rows=False)
    # Linear(100, 50): 300 blocks of 17 -> 2 triangles of 153 numbers each, plus momentum.
    assert opt.memory_report()["0 (Linear)"] == 4 * (2 * 300 * 153 + 5050)
    floats = sum(opt.memory_report().values()) / 4
    params = sum(p.numel() for p in model.parameters())
    assert floats <= (17 + 3) * params
    full = MBF(model, lr=0.1, max_block_size=20, tie_rows=False)
    assert sum(full.memory_report().values()) > 1.9 * sum(opt.memory_report().values())
    # Tied rows (the default): the 50 rows share the 6 blocks of their chunks.
    tied = MBF(model, lr=0.1, max_block_size=20, storage="packed")
    assert tied.memory_report()["0 (Linear)"] == 4 * (2 * 6 * 153 + 5050)


def test_unknown_storage_is_refused() -> None:
    with pytest.raises(ValueError, match="storage"):
        MBF(nn.Linear(2, 2), lr=0.1, storage="triangles")


def test_a_storage_of_ones_own_plugs_in_by_name() -> None:
    """The store calls only the Storage interface: a registered subclass is used for every
    block operation, and one that changes nothing takes the steps of full storage, bitwise."""
    calls: dict[str, int] = {}

    class Counting(FullStorage):
        name = "counting"

        def __getattribute__(self, attr: str):  # count every method the store calls
            if not attr.startswith("__") and callable(object.__getattribute__(self, attr)):
                calls[attr] = calls.get(attr, 0) + 1
            return object.__getattribute__(self, attr)

    STORAGES["counting"] = Counting()
    try:
        results = []
        for storage in ("full", "counting"):
            torch.manual_seed(2)
            model = _net()
            opt = MBF(model, lr=0.05, inv_every=3, max_block_size=5, storage=storage)
            torch.manual_seed(1)
            for _ in range(5):
                x, y = _batch()
                opt.zero_grad()
                _loss(model, x, y).backward()
                opt.step()
            results.append(flat_params(model))
        assert torch.equal(results[0], results[1])
        for method in ("allocate", "fold_", "factor", "solve", "trace"):
            assert calls.get(method, 0) > 0, method
    finally:
        del STORAGES["counting"]
    with pytest.raises(ValueError, match="storage must be one of"):
        MBF(_net(), storage="counting")


def test_packed_operations_on_no_blocks_do_nothing() -> None:
    """A rank may own none of a bucket's blocks: every packed operation takes an empty stack."""
    storage = STORAGES["packed"]
    stored = storage.allocate(0, 4, torch.float64, torch.device("cpu"))
    assert stored.shape == (0, 10)
    rhs = torch.empty(0, 4, dtype=torch.float64)
    assert storage.solve(stored, rhs).shape == (0, 4)
    assert storage.factor(stored, 0.1, out=torch.empty_like(stored)).blocks == 0
    storage.fold_(stored, torch.empty(0, 2, 4, dtype=torch.float64), [0.1, 0.1])
    storage.add_outer_(stored, rhs, 0.1)
    assert storage.trace(stored).shape == (0,)
