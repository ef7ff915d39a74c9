"""Data-parallel MBF on ``torch.distributed``: statistics reduction and sharded preconditioning.

Under data parallelism every rank holds the whole model and sees its own shard of the global
batch. MBF then runs as follows (``docs/distributed.md`` has the user's view):

- **Gradients** are the ones ``DistributedDataParallel`` has already averaged, so they are the
  same on every rank. The ``batch`` estimator (``g_b g_b^T``) therefore needs no communication.
- **Every rank owns a slice of every bucket.** Each bucket of equal-size blocks is cut into
  ``world_size`` contiguous block ranges whose sizes differ by at most one (:func:`shard_plan`);
  a rank allocates and keeps the running-average statistics (and their queue) and the damped
  inverses of its ranges only, factors them and applies them to the momentum, so the curvature
  memory and workload (``~ blocks * size^2`` per step, ``~ blocks * size^3`` per inversion)
  are split evenly, with either storage.
- **Per-example statistics** are local sums ``sum_i grad l_i grad l_i^T`` over a rank's examples
  (see :mod:`mbf.hooks`: for a mean-reduced loss the hook's ``N^2`` factor undoes autograd's
  ``1/N_local``, whatever DDP later does to the parameter gradients). On statistics steps they are
  summed over ranks together with the example counts, upper triangles only, in one
  ``reduce_scatter`` per dtype that hands every rank the sums of its own blocks; dividing by the
  global count gives the empirical Fisher of the global batch.
- **Directions** (the preconditioned momentum) are exchanged with one ``all_gather`` per step.
  Every rank then applies the same directions to the same parameters and momentum (which every
  rank keeps in full), so parameters stay bit-identical across ranks.
- **Checkpoints.** :meth:`ShardedEngine.consolidate` (``MBF.consolidate_state_dict``) gathers
  every rank's statistics, inverses and queued estimates into a whole copy, kept until the next
  step (the run itself is not changed), so that a ``state_dict`` is the one a single process
  would have, loadable on any number of ranks (each loading rank copies its own slice);
  ``state_dict`` refuses to run before that, rather than write a checkpoint holding one rank's
  share. Or each rank saves its own share (``MBF.sharded_state_dict``, no collective) and every
  rank of the resumed run copies its blocks out of all those files (``load_sharded_state_dict``).

The rank-independent part of the step (units, buckets, statistics, factorization, solve) is the
curvature store of :mod:`mbf.store`, driven through the engine interface of :mod:`mbf.engine`;
:class:`ShardedEngine` adds ownership and the collectives.

A single process never reaches this module's collectives: :func:`make_engine` gives a
:class:`~mbf.engine.LocalEngine` unless a process group with more than one rank is initialized
(or given).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .engine import LocalEngine, Whole, Work
from .linalg import FactorReport
from .packed import SymmetricPacking, packed_size
from .store import CurvatureStore, span
from .units import Unit

__all__ = ["ShardedEngine", "make_engine", "plan_costs", "resolve_group", "shard_plan"]

#: ``FactorReport`` fields summed over ranks after a sharded inversion, in this order.
_REPORT_FIELDS = ("blocks", "retried", "fallback", "nonfinite")


# ---------------------------------------------------------------------------------- the group
def resolve_group(process_group: Any, model: nn.Module | None) -> Any | None:
    """The process group MBF shards over, or ``None`` for a single process.

    ``process_group=None`` (the default) means: the group of a ``DistributedDataParallel`` model,
    else the default group, when ``torch.distributed`` is initialized with more than one rank.
    ``True`` is the same but insists on an initialized ``torch.distributed``. ``False`` forces a
    single-process optimizer (e.g. independent runs launched together). An explicit group is
    used as given.
    """
    if process_group is False:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError(
                "MBF: process_group was given but torch.distributed is not initialized; call "
                "torch.distributed.init_process_group first (or leave process_group unset)"
            )
        return None
    group = process_group
    if group is None or group is True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            group = model.process_group
        else:
            group = dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _comm_device(group: Any, device: torch.device) -> torch.device:
    """The device a collective on ``group`` wants its tensors on."""
    backend = str(dist.get_backend(group)).lower()
    if ":" in backend:  # e.g. "cpu:gloo,cuda:nccl": either device works
        return device
    if backend == "nccl":
        if device.type == "cuda":
            return device
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return device


# ---------------------------------------------------------------------------------- the plan
def shard_plan(num_blocks: Sequence[int], world_size: int) -> list[list[tuple[int, int]]]:
    """Block ranges ``plan[bucket][rank] = (start, stop)``: every bucket cut into equal parts.

    Blocks of one bucket have one size, so an equal split balances inversion
    (``~ blocks * size^3``) and solves (``~ blocks * size^2``) at once: every rank gets within
    one block of ``1 / world_size`` of every bucket, hence of both costs. The spare blocks of
    successive buckets go to successive ranks (round robin), so small buckets do not all land
    on rank 0. Ranges of one bucket are contiguous and in rank order.
    """
    plan: list[list[tuple[int, int]]] = []
    next_rank = 0
    for total in num_blocks:
        base, spare = divmod(int(total), world_size)
        sizes = [base] * world_size
        for j in range(spare):
            sizes[(next_rank + j) % world_size] += 1
        next_rank = (next_rank + spare) % world_size
        ranges, start = [], 0
        for size in sizes:
            ranges.append((start, start + size))
            start += size
        plan.append(ranges)
    return plan


def plan_costs(
    plan: list[list[tuple[int, int]]], block_sizes: Sequence[int]
) -> list[dict[str, float]]:
    """Per rank: inversion (Cholesky + inverse, ``blocks * s^3``) and solve (``2 B s^2``) flops."""
    world = len(plan[0]) if plan else 1
    costs = [{"inversion": 0.0, "solve": 0.0, "blocks": 0.0} for _ in range(world)]
    for ranges, s in zip(plan, block_sizes, strict=True):
        for rank, (lo, hi) in enumerate(ranges):
            costs[rank]["inversion"] += (hi - lo) * s**3
            costs[rank]["solve"] += 2 * (hi - lo) * s**2
            costs[rank]["blocks"] += hi - lo
    return costs


# ------------------------------------------------------------------------ configuration check
def fingerprint(
    groups: list[dict[str, Any]], units: list[Unit], settings: dict[str, Any]
) -> dict[str, Any]:
    """Everything that must agree across ranks for their parameters to stay identical:
    ``settings`` (estimator, storage, ...), the param groups, parameters and units."""
    plain = [
        {k: (float(v) if isinstance(v, Tensor) else v) for k, v in group.items() if k != "params"}
        for group in groups
    ]
    return {
        **settings,
        "param group": [{k: repr(v) for k, v in sorted(g.items())} for g in plain],
        "parameter (shape, dtype, device type)": [
            repr((tuple(p.shape), str(p.dtype), p.device.type))
            for group in groups
            for p in group["params"]
        ],
        "unit (name, group, blocks, block size, dtype, tied rows, per-example)": [
            repr(
                (u.name, u.group, u.curvature_blocks, u.layout.block_size, str(u.dtype), u.tied)
                + (u.per_example,)
            )
            for u in units
        ],
    }


def _first_difference(a: Any, b: Any, path: str) -> tuple[str, Any, Any] | None:
    """The first place where two fingerprints differ, as ``(where, value_a, value_b)``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            label = f"{path} {key!r}" if path else str(key)
            found = _first_difference(a.get(key), b.get(key), label)
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return (f"{path}: count", len(a), len(b))
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _first_difference(x, y, f"{path} {i}")
            if found:
                return found
        return None
    return None if a == b else (path, a, b)


# ------------------------------------------------------------------------ the sharded engine
class ShardedEngine(LocalEngine):
    """``K`` ranks: each owns a ``1/K`` slice of every bucket (statistics and inverses are
    allocated for it alone) and the collectives that keep the ranks' parameters identical.

    Attributes:
        group: the process group; ``rank`` and ``world_size`` within it.
        traffic: per kind of exchange and collective, e.g. ``"directions (all_gather_single)"``
            (kinds: statistics, directions, counters, consolidate, config), the number of calls
            and the bytes this rank handed to them (``docs/distributed.md`` relates them to the
            bytes on the wire).
    """

    def __init__(self, group: Any) -> None:
        # gloo's all_gather and reduce_scatter are 2-3x slower than its all_reduce of the same
        # output (docs/distributed.md), so on gloo both are done as sums of disjoint parts.
        gloo = str(dist.get_backend(group)).lower() == "gloo"
        self._start(group, dist.get_rank(group), dist.get_world_size(group), sum_only=gloo)

    def _start(self, group: Any, rank: int, world_size: int, *, sum_only: bool) -> None:
        """The engine's state, apart from asking the process group (tests run ranks as
        threads: ``tests/threaded_ranks.py``)."""
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.traffic: dict[str, dict[str, int]] = {}
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}
        self._reduce_scatter_works = True
        self._sum_only = sum_only
        # The whole curvature gathered by consolidate(), for the state dict of this state.
        self._snapshot: Whole | None = None

    # -------------------------------------------------------------- collectives
    def _run(self, kind: str, what: str, collective: Callable[..., Any], *args: Tensor) -> None:
        """Run one collective (``args[-1]`` is this rank's payload), with a clear error when
        another rank died or stalled."""
        op = getattr(collective, "__name__", "collective")
        entry = self.traffic.setdefault(f"{kind} ({op})", {"calls": 0, "bytes": 0})
        entry["calls"] += 1
        entry["bytes"] += args[-1].numel() * args[-1].element_size()
        try:
            work = collective(*args, group=self.group, async_op=True)
            work.wait()
        except RuntimeError as exc:
            if "not supported" in str(exc) or "does not support" in str(exc):
                raise NotImplementedError(str(exc)) from exc
            raise RuntimeError(
                f"MBF (rank {self.rank} of {self.world_size}): the {what} with the other ranks "
                f"failed: {exc}\nAnother rank has probably died or stalled; MBF stops rather "
                "than continue with parameters that would no longer match. (Collectives give up "
                "after the timeout passed to torch.distributed.init_process_group.)"
            ) from exc

    def _all_gather(self, kind: str, what: str, local: Tensor, reuse: bool = False) -> Tensor:
        """``(world_size, n)`` from every rank's ``(n,)`` tensor (``reuse``: a cached buffer)."""
        if self._sum_only:  # every other row is zero: the sum is exact
            numel = self.world_size * local.numel()
            if reuse:
                rows = self._buffer("gather", local.dtype, local.device, numel)
            else:
                rows = local.new_empty(numel)
            rows = rows.view(self.world_size, local.numel())
            rows.zero_()
            rows[self.rank] = local
            self._run(kind, what, dist.all_reduce, rows)
            return rows
        out = local.new_empty(self.world_size, local.numel())
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self._run(kind, what, gather, out.view(-1), local)
        return out

    def _reduce_scatter(self, kind: str, what: str, chunks: Tensor) -> Tensor:
        """The sum over ranks of chunk ``rank`` of every rank's ``(world_size, n)`` tensor."""
        if self._reduce_scatter_works and not self._sum_only:
            out = chunks.new_empty(chunks.shape[1])
            scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
            try:
                self._run(kind, what, scatter, out, chunks.view(-1))
                return out
            except NotImplementedError:  # an older backend: fall back to an all-reduce
                self._reduce_scatter_works = False
        self._run(kind, what, dist.all_reduce, chunks)
        return chunks[self.rank]

    def _buffer(self, name: str, dtype: torch.dtype, device: torch.device, numel: int) -> Tensor:
        """A reusable flat buffer (fresh memory every step costs page faults on large models)."""
        key = (name, dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel]

    # -------------------------------------------------------------- construction
    def plan(self, totals: list[int]) -> list[list[tuple[int, int]]]:
        """:func:`shard_plan`: every bucket cut into ``world_size`` near-equal ranges."""
        return shard_plan(totals, self.world_size)

    def check_config(self, fingerprint: dict[str, Any]) -> None:
        """Raise ``ValueError`` on every rank unless all ranks built the same optimizer."""
        text = json.dumps(fingerprint, sort_keys=True).encode()
        digest = int.from_bytes(hashlib.sha256(text).digest()[:8], "little", signed=True)
        device = _comm_device(self.group, torch.device("cpu"))
        local = torch.tensor([digest], dtype=torch.int64, device=device)
        digests = self._all_gather("config", "configuration check", local).view(-1).tolist()
        if len(set(digests)) == 1:
            return
        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, fingerprint, group=self.group)
        for rank, theirs in enumerate(every[1:], start=1):
            found = _first_difference(every[0], theirs, "")
            if found:
                where, ours, other = found
                raise ValueError(
                    "MBF: the ranks were given different configurations; every rank must build "
                    f"MBF with the same model and arguments. {where} is {ours} on rank 0 but "
                    f"{other} on rank {rank}"
                )
        raise ValueError("MBF: the ranks were given different configurations")  # pragma: no cover

    # -------------------------------------------------------------- statistics
    def reduce_pending(self, store: CurvatureStore, units: list[Unit]) -> None:
        """Sum the units' per-example statistics over the ranks, each rank getting its blocks.

        One reduce-scatter per dtype of upper triangles, arranged by owner; every chunk ends
        with the example counts, so every rank learns the global counts. Afterwards a unit's
        ``pending`` holds the sums for this rank's blocks of it only.
        """
        ranges = {id(u): b.ranges for b in store.buckets for u in b.units}
        by_dtype: dict[torch.dtype, list[Unit]] = {}
        for unit in units:
            by_dtype.setdefault(unit.dtype, []).append(unit)
        for dtype, members in by_dtype.items():
            device = _comm_device(self.group, members[0].device)
            spans = [[span(u, *ranges[id(u)][r]) for u in members] for r in range(self.world_size)]
            summed = self.sum_statistics(members, spans, dtype, device)
            for u, (a, b), (part, total) in zip(members, spans[self.rank], summed, strict=True):
                u.pending_count = total
                if total == 0:
                    u.clear_pending()
                    continue
                packing = SymmetricPacking.of(u.layout.block_size, device)
                if u.pending is not None and u.pending.device == device:
                    u.pending = packing.unpack(part, out=u.pending[a:b])  # in place
                else:
                    u.pending = packing.unpack(part).to(u.device)

    def sum_statistics(
        self, sources: list[Unit], spans: list[list[tuple[int, int]]], dtype: torch.dtype,
        device: torch.device,
    ) -> list[tuple[Tensor, int]]:
        """Sum the ``sources``' per-example statistics over the ranks, rank ``r`` receiving the
        sums of blocks ``spans[r][i]`` of source ``i``: one reduce-scatter of upper triangles.

        Every chunk (one per rank, padded to one size) ends with the sources' example counts,
        so every rank learns the global counts. Returns, per source, this rank's summed
        triangles (``(blocks, triangle)``, a view of the received buffer: unpack before the
        next call) and the global count. A source with nothing pending sends zeros. Shared by
        data-parallel ranks (spans: the blocks each rank owns) and FSDP2 ranks (spans: the
        blocks of each rank's rows).
        """
        tri = [packed_size(u.layout.block_size) for u in sources]
        sizes = [sum((b - a) * t for (a, b), t in zip(sp, tri, strict=True)) for sp in spans]
        chunk = max(sizes) + len(sources)  # padded to one size; counts at the end
        chunks = self._buffer("scatter", dtype, device, self.world_size * chunk)
        chunks = chunks.view(self.world_size, chunk)
        counts = torch.tensor([float(u.pending_count) for u in sources], dtype=dtype)
        for r in range(self.world_size):
            offset = 0
            for u, (a, b), t in zip(sources, spans[r], tri, strict=True):
                part = chunks[r, offset : offset + (b - a) * t]
                offset += part.numel()
                if u.pending is None:
                    part.zero_()
                    continue
                packing = SymmetricPacking.of(u.layout.block_size, u.pending.device)
                if u.pending.device == device:
                    packing.pack(u.pending[a:b], out=part)
                else:
                    part.copy_(packing.pack(u.pending[a:b]).reshape(-1))
            chunks[r, offset : chunk - len(sources)] = 0.0
            chunks[r, chunk - len(sources) :] = counts
        mine = self._reduce_scatter("statistics", "sum of per-example statistics", chunks)
        totals = mine[chunk - len(sources) :].tolist()
        out: list[tuple[Tensor, int]] = []
        offset = 0
        for (a, b), t, total in zip(spans[self.rank], tri, totals, strict=True):
            out.append((mine[offset : offset + (b - a) * t].view(b - a, t), int(round(total))))
            offset += (b - a) * t
        return out

    # -------------------------------------------------------------- factor, solve, share
    def count(self, store: CurvatureStore, report: FactorReport, factorizations: int) -> None:
        """Sum the ranks' factorization reports, so that the counters agree on every rank."""
        if factorizations:
            device = _comm_device(self.group, torch.device("cpu"))
            fields = (report.blocks, report.retried, report.fallback, report.nonfinite)
            counts = torch.tensor(fields, dtype=torch.int64, device=device)
            self._run("counters", "sum of factorization counters", dist.all_reduce, counts)
            blocks, retried, fallback, nonfinite = counts.tolist()
            report = FactorReport(blocks, retried, fallback, nonfinite)
        store.count(report, factorizations)

    def exchange(self, work: list[Work], solved: list[Tensor]) -> list[Tensor]:
        """Every bucket's whole solved blocks: one all-gather of the owned ones."""
        if not work:
            return []
        buckets = [item.bucket for item in work]
        dtype, device = self._wire([item.rhs for item in work])  # not the (16-bit) curvature
        # A block's solved entries: s, or T * s for a bucket of tied rows ((total, T, s)).
        entries = [math.prod(item.rhs.shape[1:]) for item in work]
        sizes = [
            sum((b.ranges[r][1] - b.ranges[r][0]) * e for b, e in zip(buckets, entries,
                                                                     strict=True))
            for r in range(self.world_size)
        ]
        local = torch.zeros(max(sizes), dtype=dtype, device=device)
        if solved:
            flat = torch.cat([s.reshape(-1).to(device=device, dtype=dtype) for s in solved])
            local[: flat.numel()] = flat
        gathered = self._all_gather(
            "directions", "exchange of preconditioned directions", local, reuse=True
        )
        offsets = [0] * self.world_size
        whole = []
        for item, per_block in zip(work, entries, strict=True):
            out = torch.empty_like(item.rhs)
            for r, (lo, hi) in enumerate(item.bucket.ranges):
                n = (hi - lo) * per_block
                chunk = gathered[r, offsets[r] : offsets[r] + n]
                out[lo:hi] = chunk.view(hi - lo, *item.rhs.shape[1:]).to(device=out.device,
                                                                        dtype=out.dtype)
                offsets[r] += n
            whole.append(out)
        return whole

    def _wire(self, tensors: list[Tensor]) -> tuple[torch.dtype, torch.device]:
        """One dtype (that holds every one of ``tensors`` exactly) and device for a collective
        over them."""
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        return dtype, _comm_device(self.group, tensors[0].device)

    # -------------------------------------------------------------- checkpoints
    def whole_curvature(self, store: CurvatureStore) -> Whole:
        """Gather every rank's statistics and inverses (upper triangles) and queued estimates
        into whole copies on every rank, in one all-gather; every rank must call it."""
        buckets = store.buckets
        if not buckets:
            return Whole({}, {})
        # Statistics and inverses, and queued estimates (in the units' dtype: float32 when the
        # curvature is 16-bit), all exactly.
        queues = [u.queue for u in store.units if u.queue is not None]
        dtype, device = self._wire([t for b in buckets for t in (b.fisher, b.inverse)] + queues)
        storage = store.storage
        # Queued estimates: every rank has queued as many for a unit (one schedule).
        depth = {id(u): len(u.queue_weights) if u.queue is not None else 0 for u in store.units}
        weights = {id(u): u.queue_weights for u in store.units}

        def size(b: Any, rank: int) -> int:
            lo, hi = b.ranges[rank]
            queued = 0
            for u in b.units:
                a, c = span(u, lo, hi)
                queued += (c - a) * depth[id(u)] * b.block_size
            return 2 * (hi - lo) * packed_size(b.block_size) + queued

        local = torch.zeros(max(sum(size(b, r) for b in buckets)
                                for r in range(self.world_size)), dtype=dtype, device=device)
        offset = 0
        for b in buckets:
            parts = [storage.to_triangles(t, b.block_size) for t in (b.fisher, b.inverse)]
            parts += [
                u.queue[:, : depth[id(u)]]
                for u in b.units
                if depth[id(u)] and u.queue is not None
            ]
            for part in parts:
                flat = part.reshape(-1)
                local[offset : offset + flat.numel()] = flat.to(device=device, dtype=dtype)
                offset += flat.numel()
        gathered = self._all_gather("consolidate", "gathering of the curvature", local)
        offsets = [0] * self.world_size
        whole = Whole({}, {})

        def take(r: int, n: int) -> Tensor:
            chunk = gathered[r, offsets[r] : offsets[r] + n]
            offsets[r] += n
            return chunk

        for b in buckets:
            first = b.units[0]
            pair = [storage.allocate(b.total, b.block_size, b.fisher.dtype, first.device)
                    for _ in range(2)]
            queued = {
                id(u): first.fisher.new_empty(u.curvature_blocks, depth[id(u)], b.block_size,
                                              dtype=first.dtype)
                for u in b.units if depth[id(u)]
            }
            t = packed_size(b.block_size)
            for r, (lo, hi) in enumerate(b.ranges):
                for tensor in pair:
                    tri = take(r, (hi - lo) * t).view(hi - lo, t)
                    storage.from_triangles(
                        tri.to(device=tensor.device, dtype=tensor.dtype), b.block_size,
                        out=tensor[lo:hi],
                    )
                for u in b.units:
                    if depth[id(u)]:
                        a, c = span(u, lo, hi)
                        rows = take(r, (c - a) * depth[id(u)] * b.block_size)
                        queue = queued[id(u)]
                        queue[a:c] = rows.view(c - a, depth[id(u)], b.block_size).to(queue)
            whole.buckets[id(b)] = (pair[0], pair[1])
            whole.queues.update(
                {key: (queue, list(weights[key])) for key, queue in queued.items()}
            )
        return whole

    def consolidate(self, store: CurvatureStore) -> None:
        """Gather the whole curvature (queued estimates included), kept for the state dict of
        the current state (until the next step); every rank must call it."""
        self._snapshot = self.whole_curvature(store)

    def consolidated(self, store: CurvatureStore) -> Whole:
        """The curvature :meth:`consolidate` gathered for the current state; refuses a state
        dict that would hold only this rank's share."""
        if self._snapshot is None:
            raise RuntimeError(
                f"MBF (rank {self.rank} of {self.world_size}): each rank holds only its share of "
                "the curvature; call optimizer.consolidate_state_dict() on every rank before "
                "optimizer.state_dict() (e.g. just before rank 0 saves a checkpoint), or save "
                "each rank's optimizer.sharded_state_dict() to a file of its own"
            )
        return self._snapshot

    def invalidate(self) -> None:
        self._snapshot = None


def make_engine(process_group: Any, model: nn.Module | None) -> LocalEngine:
    """A :class:`ShardedEngine` over the resolved process group, or a :class:`LocalEngine`."""
    group = resolve_group(process_group, model)
    return LocalEngine() if group is None else ShardedEngine(group)
