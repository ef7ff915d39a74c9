"""Data-parallel MBF: K gloo ranks on loopback against one process on the global batch.

The rank programs are in ``distributed_workers.py``, launched by ``ranks.run_ranks``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distributed_workers as W
from mbf import MBF
from mbf.distributed import plan_costs, shard_plan
from mbf.packed import SymmetricPacking
from ranks import run_ranks

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
    pytest.mark.filterwarnings("ignore:MBF. per-example statistics serve"),  # the LayerNorm
]

PARAM_TOL = {"rtol": 1e-10, "atol": 1e-13}  # measured: 1e-13 and 4e-16


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, dict]]]:
    """Two ranks train from scratch, checkpointing midway."""
    outdir = tmp_path_factory.mktemp("two_ranks")
    return outdir, run_ranks([("train", {}), ("accumulate", {}), ("storage", {})], 2, outdir)


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict[str, dict]]]:
    """Three ranks continue a single-process checkpoint (with the collectives used on NCCL),
    then meet the failure scenarios."""
    outdir = tmp_path_factory.mktemp("three_ranks")
    references = {e: single_process(e, save_at=outdir) for e in ("batch", "per_example")}
    scenarios = [
        ("train", {"resume": str(outdir), "native": True}),
        ("storage", {}),
        ("failures", {}),  # last: it kills a rank
    ]
    return references, run_ranks(scenarios, 3, outdir, dies=((2, "failures"),))


def _traffic(traffic: dict[str, dict[str, int]], kind: str) -> tuple[int, int]:
    """Calls and bytes of one kind of exchange, whatever collective carried it."""
    entries = [v for k, v in traffic.items() if k.split(" ")[0] == kind]
    return sum(e["calls"] for e in entries), sum(e["bytes"] for e in entries)


def single_process(estimator: str, save_at: Path | None = None) -> tuple[torch.Tensor, dict]:
    """The reference: one process, the whole global batch, no process group."""
    model = W.make_model()
    opt = W.make_optimizer(model, estimator)
    assert opt.distributed is None
    W.train(model, opt, range(W.CHECKPOINT_AT))
    if save_at is not None:
        state = {"model": model.state_dict(), "opt": opt.state_dict()}
        torch.save(state, save_at / f"single_{estimator}.pt")
    W.train(model, opt, range(W.CHECKPOINT_AT, W.STEPS))
    return W.flat_params(model), opt.counters


def _continue(model: nn.Module, opt: MBF) -> tuple[torch.Tensor, dict]:
    W.train(model, opt, range(W.CHECKPOINT_AT, W.STEPS))
    return W.flat_params(model), opt.counters


# ---------------------------------------------------------------------- without processes
def test_plan_splits_every_bucket_evenly_and_rotates_spares() -> None:
    sizes = [1000, 7, 1, 1, 1, 250, 3]
    block_sizes = [32, 9, 2, 2, 2, 17, 5]
    for world in (1, 2, 3, 4):
        plan = shard_plan(sizes, world)
        for total, ranges in zip(sizes, plan, strict=True):
            assert ranges[0][0] == 0 and ranges[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
            counts = [hi - lo for lo, hi in ranges]
            assert max(counts) - min(counts) <= 1
        costs = plan_costs(plan, block_sizes)
        for kind in ("inversion", "solve"):
            per_rank = [c[kind] for c in costs]
            # Within one block of every bucket of the ideal share, for both kinds of cost.
            slack = sum(s**3 if kind == "inversion" else 2 * s**2 for s in block_sizes)
            assert max(per_rank) - min(per_rank) <= slack
            assert max(per_rank) <= 1.02 * sum(per_rank) / world
    # Single blocks of successive buckets go to successive ranks.
    owners = [next(r for r, (lo, hi) in enumerate(rs) if hi > lo) for rs in shard_plan([1] * 5, 3)]
    assert owners == [0, 1, 2, 0, 1]


def test_triangle_packing_round_trips() -> None:
    """The one triangle packing (mbf.packed) as the collectives use it: into flat buffers."""
    packing = SymmetricPacking.of(5, torch.device("cpu"))
    a = torch.randn(4, 5, 5, dtype=torch.float64)
    sym = a @ a.transpose(1, 2)
    assert packing.pack(sym).numel() == 4 * 15
    assert torch.equal(packing.unpack(packing.pack(sym)), sym)
    out = torch.empty(4 * 15, dtype=torch.float64)
    assert packing.pack(sym, out=out) is out and torch.equal(out, packing.pack(sym).reshape(-1))
    back = torch.empty_like(sym)
    assert packing.unpack(out.view(4, 15), out=back) is back and torch.equal(back, sym)
    empty = torch.empty(0, 5, 5, dtype=torch.float64)  # a rank may own no block of a unit
    assert packing.pack(empty, out=torch.empty(0, dtype=torch.float64)).numel() == 0
    assert packing.unpack(torch.empty(0, 15, dtype=torch.float64), out=empty) is empty


def test_single_process_needs_no_process_group() -> None:
    assert not dist.is_initialized()
    opt = MBF(nn.Linear(3, 2), lr=0.1)
    assert opt.distributed is None
    opt.consolidate_state_dict()  # a no-op in one process
    with pytest.raises(ValueError, match="init_process_group"):
        MBF(nn.Linear(3, 2), lr=0.1, process_group=True)


# ---------------------------------------------------------------------- K ranks
def test_two_ranks_match_one_process_and_resume_on_one(two_ranks: tuple) -> None:
    tmp_path, results = two_ranks
    ranks = [r["train"] for r in results]
    numel = sum(p.numel() for p in W.make_model().parameters())
    for estimator in ("batch", "per_example"):
        reference, ref_counters = single_process(estimator)
        got = [r[estimator] for r in ranks]
        # Bit-identical parameters on every rank, equal to one process on the global batch.
        assert torch.equal(got[0]["params"], got[1]["params"]), estimator
        torch.testing.assert_close(got[0]["params"], reference, **PARAM_TOL)
        assert got[0]["counters"] == ref_counters == got[1]["counters"]
        traffic = got[0]["traffic"]
        # batch: the gradients DDP averaged suffice; per_example: one reduction a step.
        expected_stats = 0 if estimator == "batch" else W.STEPS
        assert _traffic(traffic, "statistics")[0] == expected_stats
        # One exchange of directions a step: on gloo a sum of the two ranks' halves (float64).
        opt = W.make_optimizer(W.make_model(), estimator)
        padded = sum(u.layout.num_blocks * u.layout.block_size for u in opt.blocks())
        assert padded >= numel
        calls, sent = _traffic(traffic, "directions")
        assert calls == W.STEPS and sent <= W.STEPS * 8 * 2 * (padded // 2 + 5)

        # A consolidated checkpoint of the 2-rank run resumes on one process.
        saved = torch.load(tmp_path / f"full_{estimator}.pt", weights_only=False)
        model = W.make_model()
        model.load_state_dict(saved["model"])
        opt = W.make_optimizer(model, estimator)
        opt.load_state_dict(saved["opt"])
        resumed, counters = _continue(model, opt)
        torch.testing.assert_close(resumed, got[0]["params"], **PARAM_TOL)
        assert counters == ref_counters

        # So do the two ranks' own files (memory-mapped), on the same bits.
        files = [torch.load(tmp_path / f"rank{r}_{estimator}.pt", mmap=True, weights_only=True)
                 for r in (1, 0)]
        assert [f["mbf"]["shard"]["rank"] for f in files] == [1, 0]
        model = W.make_model()
        model.load_state_dict(saved["model"])
        opt = W.make_optimizer(model, estimator)
        opt.load_sharded_state_dict(files)
        from_files, counters = _continue(model, opt)
        assert torch.equal(from_files, resumed) and counters == ref_counters

    # Before consolidation a rank's state dict would hold only its share: refused.
    for r, result in enumerate(results):
        for estimator in ("batch", "per_example"):
            message = result["train"][f"unconsolidated_{estimator}"]
            assert message is not None and f"MBF (rank {r} of 2)" in message
            assert "consolidate_state_dict() on every rank" in message


def test_two_ranks_accumulating_micro_batches_match_one_process(two_ranks: tuple) -> None:
    """Each rank accumulates 2 micro-batches of its shard (loss / 2): per-example statistics of
    the whole global batch, as one process taking it in one pass."""
    _, results = two_ranks
    reference, ref_counters = single_process("per_example")
    got = [r["accumulate"] for r in results]
    assert torch.equal(got[0]["params"], got[1]["params"])
    torch.testing.assert_close(got[0]["params"], reference, **PARAM_TOL)
    assert got[0]["counters"] == ref_counters


def test_three_ranks_continue_a_single_process_checkpoint(three_ranks: tuple) -> None:
    references, results = three_ranks
    for estimator, (reference, ref_counters) in references.items():
        got = [r["train"][estimator] for r in results]
        for other in got[1:]:
            assert torch.equal(got[0]["params"], other["params"]), estimator
        torch.testing.assert_close(got[0]["params"], reference, **PARAM_TOL)
        assert got[0]["counters"] == ref_counters
        # These ranks used the collectives MBF uses on NCCL.
        assert any("all_gather" in kind for kind in got[0]["traffic"])
        if estimator == "per_example":
            assert any("reduce_scatter" in kind for kind in got[0]["traffic"])


def test_mismatch_stall_and_death_are_detected(three_ranks: tuple) -> None:
    _, results = three_ranks
    for r in range(2):
        result = results[r]["failures"]
        assert "different configurations" in result["mismatch_lr"]
        assert "param group 0 'lr' is 0.1 on rank 0 but 0.2 on rank 2" in result["mismatch_lr"]
        assert "'max_block_size' is 5 on rank 0 but 4" in result["mismatch_max_block_size"]
        message, seconds = result["stall"]
        assert f"MBF (rank {r} of 3)" in message and seconds < 15.0
        message, seconds = result["dead"]
        assert f"MBF (rank {r} of 3)" in message and "died or stalled" in message
        assert seconds < 15.0


@pytest.mark.parametrize("fixture", ["two_ranks", "three_ranks"])
def test_each_rank_allocates_only_its_share_of_the_curvature(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    """Statistics, inverses and queues: the ranks' bytes add up to one process's, each rank
    holds 1/K of them (within one block per bucket), and every rank keeps all the momentum."""
    results = request.getfixturevalue(fixture)[1]
    world = len(results)
    for storage in ("full", "packed"):
        single = W.make_optimizer(W.make_model(), "batch", storage=storage, stat_buffer=2)
        alone = single.memory_report(detail=True)
        ranks = [r["storage"][f"memory_{storage}"] for r in results]
        curvature = ("statistics", "inverse", "queue")
        for name, parts in alone.items():
            for kind in curvature:
                assert sum(rank[name][kind] for rank in ranks) == parts[kind], (name, kind)
            assert all(rank[name]["momentum"] == parts["momentum"] for rank in ranks)
        total = sum(p[k] for p in alone.values() for k in curvature)
        # One block per bucket is the most a near-equal split can add to a rank's share.
        store = single._store
        slack = 0
        for b in store.buckets:
            item = b.fisher.element_size()
            queue = max(u.queue_capacity for u in b.units) * b.block_size * item
            slack += 2 * store.storage.block_bytes(b.block_size, item) + queue
        for result, rank in zip(results, ranks, strict=True):
            allocated = sum(p["statistics"] + p["inverse"] for p in rank.values())
            assert result["storage"][f"allocated_{storage}"] == allocated
            mine = sum(p[k] for p in rank.values() for k in curvature)
            assert mine <= total / world + slack
            assert mine < 0.75 * total


@pytest.mark.parametrize("fixture", ["two_ranks", "three_ranks"])
def test_packed_storage_and_queued_statistics_on_ranks_match_one_process(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    results = request.getfixturevalue(fixture)[1]
    for storage in ("full", "packed"):
        model = W.make_model()
        opt = W.make_optimizer(model, "batch", storage=storage, stat_buffer=2)
        W.train(model, opt, range(W.STEPS))
        got = [r["storage"][storage] for r in results]
        for other in got[1:]:
            assert torch.equal(got[0], other), storage
        torch.testing.assert_close(got[0], W.flat_params(model), **PARAM_TOL)
