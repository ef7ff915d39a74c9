"""Data-parallel MBF on ``torch.distributed``: statistics reduction and sharded preconditioning.

Under data parallelism every rank holds the whole model and sees its own shard of the global
batch. MBF then runs as follows (``docs/distributed.md`` has the user's view):

- **Gradients** are the ones ``DistributedDataParallel`` has already averaged, so they are the
  same on every rank. The ``batch`` estimator (``g_b g_b^T``) therefore needs no communication.
- **Every rank owns a slice of every bucket.** Each bucket of equal-size blocks is cut into
  ``world_size`` contiguous block ranges whose sizes differ by at most one (:func:`shard_plan`);
  a rank keeps the running-average statistics, computes the damped inverses (every
  ``inv_every`` steps) and applies them to the momentum (every step) for its ranges only, so the
  whole curvature workload (``~ blocks * size^2`` per step, ``~ blocks * size^3`` per inversion)
  is split evenly.
- **Per-example statistics** are local sums ``sum_i grad l_i grad l_i^T`` over a rank's examples
  (see :mod:`mbf.hooks`: for a mean-reduced loss the hook's ``N^2`` factor undoes autograd's
  ``1/N_local``, whatever DDP later does to the parameter gradients). On statistics steps they are
  summed over ranks together with the example counts, upper triangles only, in one
  ``reduce_scatter`` per dtype that hands every rank the sums of its own blocks; dividing by the
  global count gives the empirical Fisher of the global batch.
- **Directions** (the preconditioned momentum) are exchanged with one ``all_gather`` per step.
  Every rank then applies the same directions to the same parameters and momentum (which every
  rank keeps in full), so parameters stay bit-identical across ranks.
- **Checkpoints.** :meth:`ShardedMBF.consolidate` (``MBF.consolidate_state_dict``) gathers every
  rank's statistics and inverses so that a ``state_dict`` is the one a single process would
  have, loadable on any number of ranks; ``state_dict`` refuses to run before that, rather than
  write a checkpoint holding one rank's share.

A single process never reaches this module's collectives: :func:`resolve_group` returns ``None``
unless a process group with more than one rank is initialized (or given).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .linalg import FactorReport, solve_blocks

if TYPE_CHECKING:  # pragma: no cover
    from .optimizer import MBF, _Bucket
    from .units import Unit

__all__ = ["ShardedMBF", "plan_costs", "resolve_group", "shard_plan"]

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


# ------------------------------------------------------------------------ triangle packing
# Packing is a gather along the flattened ``s * s`` axis with cached indices (``index_select``
# is about 2.5x faster than indexing rows and columns separately).
_INDEX_CACHE: dict[tuple[str, int, torch.device], Tensor] = {}


def _index(kind: str, size: int, device: torch.device) -> Tensor:
    key = (kind, size, device)
    if key not in _INDEX_CACHE:
        rows, cols = torch.triu_indices(size, size)
        if kind == "upper":  # flat positions of the upper triangle, row by row
            index = rows * size + cols
        else:  # "sym": for each flat position, its entry in the packed upper triangle
            index = torch.empty((size, size), dtype=torch.long)
            k = torch.arange(rows.numel())
            index[rows, cols] = k
            index[cols, rows] = k
            index = index.reshape(-1)
        _INDEX_CACHE[key] = index.to(device)
    return _INDEX_CACHE[key]


def _triangle(size: int) -> int:
    return size * (size + 1) // 2


def pack_upper(blocks: Tensor, out: Tensor | None = None) -> Tensor:
    """The upper triangles of ``(B, s, s)`` symmetric blocks, flattened to ``B * s(s+1)/2``.

    ``out``, if given, is a contiguous tensor of that many entries to write into.
    """
    b, s = blocks.shape[0], blocks.shape[-1]
    index = _index("upper", s, blocks.device)
    if out is None:
        return blocks.reshape(b, s * s).index_select(1, index).reshape(-1)
    torch.index_select(blocks.reshape(b, s * s), 1, index, out=out.view(b, index.numel()))
    return out


def unpack_symmetric(
    packed: Tensor, num_blocks: int, size: int, out: Tensor | None = None
) -> Tensor:
    """Inverse of :func:`pack_upper`: ``(B, s, s)`` symmetric blocks (into ``out`` if given)."""
    tri = packed.reshape(num_blocks, _triangle(size))
    index = _index("sym", size, packed.device)
    if out is None:
        return tri.index_select(1, index).reshape(num_blocks, size, size)
    torch.index_select(tri, 1, index, out=out.view(num_blocks, size * size))
    return out


# ------------------------------------------------------------------------ configuration check
def _fingerprint(opt: MBF) -> dict[str, Any]:
    """Everything that must agree across ranks for their parameters to stay identical."""
    groups = [
        {k: (float(v) if isinstance(v, Tensor) else v) for k, v in group.items() if k != "params"}
        for group in opt.param_groups
    ]
    return {
        "estimator": opt.estimator,
        "loss_reduction": opt.loss_reduction,
        "nonfinite": opt.nonfinite,
        "param group": [{k: repr(v) for k, v in sorted(g.items())} for g in groups],
        "parameter (shape, dtype, device type)": [
            repr((tuple(p.shape), str(p.dtype), p.device.type))
            for group in opt.param_groups
            for p in group["params"]
        ],
        "unit (name, group, blocks, block size, dtype, per-example)": [
            repr(
                (u.name, u.group, u.layout.num_blocks, u.layout.block_size, str(u.dtype))
                + (u.per_example,)
            )
            for u in opt._units
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
def _unit_span(unit: Unit, start: int, stop: int) -> tuple[int, int]:
    """The part of bucket blocks ``[start, stop)`` that falls in ``unit``, in its own indices."""
    nb = unit.layout.num_blocks
    a = min(max(start - unit.offset, 0), nb)
    b = min(max(stop - unit.offset, 0), nb)
    return a, max(a, b)


@dataclass
class _Piece:
    """One bucket's part in this step's exchange of directions."""

    bucket: _Bucket
    ranges: list[tuple[int, int]]
    members: list[Unit]


class ShardedMBF:
    """The distributed side of one :class:`~mbf.optimizer.MBF`: collectives and ownership.

    Attributes:
        group: the process group; ``rank`` and ``world_size`` within it.
        traffic: per kind of exchange and collective, e.g. ``"directions (all_gather_single)"``
            (kinds: statistics, directions, counters, consolidate, config), the number of calls
            and the bytes this rank handed to them (``docs/distributed.md`` relates them to the
            bytes on the wire).
    """

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.traffic: dict[str, dict[str, int]] = {}
        self._plan_key: tuple = ()
        self._plan: list[list[tuple[int, int]]] = []
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}
        self._reduce_scatter_works = True
        # gloo's all_gather and reduce_scatter are 2-3x slower than its all_reduce of the same
        # output (docs/distributed.md), so on gloo both are done as sums of disjoint parts.
        self._sum_only = str(dist.get_backend(group)).lower() == "gloo"

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
    def check_config(self, opt: MBF) -> None:
        """Raise ``ValueError`` on every rank unless all ranks built the same optimizer."""
        mine = _fingerprint(opt)
        text = json.dumps(mine, sort_keys=True).encode()
        digest = int.from_bytes(hashlib.sha256(text).digest()[:8], "little", signed=True)
        first = opt._units[0].device if opt._units else torch.device("cpu")
        local = torch.tensor([digest], dtype=torch.int64, device=_comm_device(self.group, first))
        digests = self._all_gather("config", "configuration check", local).view(-1).tolist()
        if len(set(digests)) == 1:
            return
        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, mine, group=self.group)
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

    def plan(self, buckets: list[_Bucket]) -> list[list[tuple[int, int]]]:
        """:func:`shard_plan` of the buckets, cached until the buckets change."""
        key = tuple((id(b), b.fisher.shape[0]) for b in buckets)
        if key != self._plan_key:
            self._plan = shard_plan([b.fisher.shape[0] for b in buckets], self.world_size)
            self._plan_key = key
        return self._plan

    def _ranges_of(self, opt: MBF) -> dict[int, list[tuple[int, int]]]:
        """``{id(unit): plan ranges of its bucket}``."""
        plan = self.plan(opt._buckets)
        return {
            id(u): ranges for b, ranges in zip(opt._buckets, plan, strict=True) for u in b.units
        }

    # -------------------------------------------------------------- statistics
    def update_statistics(self, opt: MBF, live: list[tuple[Unit, list[Tensor]]]) -> set[int]:
        """Update the running-average statistics of this rank's blocks; ``{id(unit)}`` updated.

        Per-example units first get the global sums for those blocks (:meth:`_reduce_pending`).
        """
        due = [(u, g) for u, g in live if opt._is_stat_step(u)]
        ranges = self._ranges_of(opt)
        self._reduce_pending([u for u, _ in due if u.per_example], ranges)
        bucket_of = {id(u): b for b in opt._buckets for u in b.units}
        refreshed: set[int] = set()
        for unit, grads in due:
            a, b = _unit_span(unit, *ranges[id(unit)][self.rank])
            if opt._update_stats(unit, grads, slice(a, b)):
                refreshed.add(id(unit))
            bucket_of[id(unit)].sharded = True
        return refreshed

    def _reduce_pending(self, units: list[Unit], ranges: dict[int, list[tuple[int, int]]]) -> None:
        """Sum the units' per-example statistics over the ranks, each rank getting its blocks.

        One reduce-scatter per dtype of upper triangles, arranged by owner; every chunk ends
        with the example counts, so every rank learns the global counts. Afterwards a unit's
        ``pending`` holds the sums for this rank's blocks of it only.
        """
        by_dtype: dict[torch.dtype, list[Unit]] = {}
        for unit in units:
            by_dtype.setdefault(unit.dtype, []).append(unit)
        for dtype, members in by_dtype.items():
            device = _comm_device(self.group, members[0].device)
            spans = [
                [_unit_span(u, *ranges[id(u)][r]) for u in members] for r in range(self.world_size)
            ]
            tri = [_triangle(u.layout.block_size) for u in members]
            sizes = [sum((b - a) * t for (a, b), t in zip(sp, tri, strict=True)) for sp in spans]
            chunk = max(sizes) + len(members)  # padded to one size; counts at the end
            chunks = self._buffer("scatter", dtype, device, self.world_size * chunk)
            chunks = chunks.view(self.world_size, chunk)
            counts = torch.tensor([float(u.pending_count) for u in members], dtype=dtype)
            for r in range(self.world_size):
                offset = 0
                for u, (a, b), t in zip(members, spans[r], tri, strict=True):
                    part = chunks[r, offset : offset + (b - a) * t]
                    offset += part.numel()
                    if u.pending is None:
                        part.zero_()
                    elif u.pending.device == device:
                        pack_upper(u.pending[a:b], out=part)
                    else:
                        part.copy_(pack_upper(u.pending[a:b]))
                chunks[r, offset : chunk - len(members)] = 0.0
                chunks[r, chunk - len(members) :] = counts
            mine = self._reduce_scatter("statistics", "sum of per-example statistics", chunks)
            totals = mine[chunk - len(members) :].tolist()
            offset = 0
            for u, (a, b), t, total in zip(members, spans[self.rank], tri, totals, strict=True):
                part = mine[offset : offset + (b - a) * t]
                offset += part.numel()
                u.pending_count = int(round(total))
                if u.pending_count == 0:
                    u.clear_pending()
                    continue
                s = u.layout.block_size
                if u.pending is not None and u.pending.device == device:
                    u.pending = unpack_symmetric(part, b - a, s, out=u.pending[a:b])  # in place
                else:
                    u.pending = unpack_symmetric(part, b - a, s).to(u.device)

    # -------------------------------------------------------------- invert, solve, share
    def precondition(
        self, opt: MBF, live_ids: set[int], refreshed: set[int]
    ) -> dict[int, list[Tensor]]:
        """Invert and solve this rank's blocks, exchange the directions; ``{id(unit): [d, ...]}``.

        Every live unit's momentum is updated on every rank (cheap, elementwise, and it keeps
        that state complete everywhere); only the owner of a block range inverts and solves it.
        """
        plan = self.plan(opt._buckets)
        pieces: list[_Piece] = []
        sends: list[Tensor] = []
        rhs_of: list[Tensor] = []
        report = FactorReport()
        factored = 0
        for bucket, ranges in zip(opt._buckets, plan, strict=True):
            members = [u for u in bucket.units if id(u) in live_ids]
            if not members:
                continue
            group = opt.param_groups[bucket.group]
            # Blocks of units without gradients (if any) keep a zero right-hand side.
            full = bucket.fisher.new_empty(bucket.fisher.shape[:2])
            if len(members) < len(bucket.units):
                full.zero_()
            for u in members:
                opt._momentum_blocks(u, group, full[u.offset : u.offset + u.layout.num_blocks])
            lo, hi = ranges[self.rank]
            if opt._factor_due(bucket, members, refreshed):
                self._invert(opt, bucket, lo, hi, report)
                factored += 1
            pieces.append(_Piece(bucket, ranges, members))
            rhs_of.append(full)
            if hi > lo:
                sends.append(solve_blocks(bucket.inverse[lo:hi], full[lo:hi]))
        if factored:
            self._sync_report(opt, pieces[0].bucket, report, factored)
        return self._exchange(opt, pieces, sends, rhs_of)

    def _invert(self, opt: MBF, bucket: _Bucket, lo: int, hi: int, report: FactorReport) -> None:
        with opt._diag.timed("factorization"):
            report.add(opt._factor_range(bucket, lo, hi))
        bucket.factored = True
        bucket.sharded = True

    def _sync_report(self, opt: MBF, bucket: _Bucket, report: FactorReport, factored: int) -> None:
        """Sum the ranks' inversion reports, so that the counters agree on every rank."""
        device = _comm_device(self.group, bucket.fisher.device)
        counts = torch.tensor(
            [getattr(report, f) for f in _REPORT_FIELDS], dtype=torch.int64, device=device
        )
        self._run("counters", "sum of inversion counters", dist.all_reduce, counts)
        blocks, retried, fallback, nonfinite = counts.tolist()
        c = opt._counters
        c["factorizations"] += factored
        c["factored_blocks"] += blocks
        c["retried_blocks"] += retried
        c["fallback_blocks"] += fallback
        c["nonfinite_blocks"] += nonfinite

    def _exchange(
        self, opt: MBF, pieces: list[_Piece], sends: list[Tensor], rhs_of: list[Tensor]
    ) -> dict[int, list[Tensor]]:
        if not pieces:
            return {}
        dtype = pieces[0].bucket.fisher.dtype
        for piece in pieces[1:]:
            dtype = torch.promote_types(dtype, piece.bucket.fisher.dtype)
        device = _comm_device(self.group, pieces[0].bucket.fisher.device)
        sizes = [
            sum((p.ranges[r][1] - p.ranges[r][0]) * p.bucket.block_size for p in pieces)
            for r in range(self.world_size)
        ]
        local = torch.zeros(max(sizes), dtype=dtype, device=device)
        if sends:
            flat = torch.cat([s.reshape(-1).to(device=device, dtype=dtype) for s in sends])
            local[: flat.numel()] = flat
        gathered = self._all_gather(
            "directions", "exchange of preconditioned directions", local, reuse=True
        )
        offsets = [0] * self.world_size
        directions: dict[int, list[Tensor]] = {}
        for piece, rhs in zip(pieces, rhs_of, strict=True):
            s = piece.bucket.block_size
            solved = torch.empty_like(rhs)
            for r, (lo, hi) in enumerate(piece.ranges):
                n = (hi - lo) * s
                chunk = gathered[r, offsets[r] : offsets[r] + n]
                solved[lo:hi] = chunk.view(hi - lo, s).to(device=rhs.device, dtype=rhs.dtype)
                offsets[r] += n
            for unit in piece.members:
                part = solved[unit.offset : unit.offset + unit.layout.num_blocks]
                directions[id(unit)] = opt._finish_direction(unit, part)
        return directions

    # -------------------------------------------------------------- checkpoints
    def consolidate(self, opt: MBF) -> None:
        """Gather every rank's statistics and inverses (upper triangles) onto every rank."""
        buckets = [b for b in opt._buckets if b.sharded]
        if not buckets:
            return
        plan = dict(zip(map(id, opt._buckets), self.plan(opt._buckets), strict=True))
        dtype = buckets[0].fisher.dtype
        for b in buckets[1:]:
            dtype = torch.promote_types(dtype, b.fisher.dtype)
        device = _comm_device(self.group, buckets[0].fisher.device)

        def size(b: _Bucket, rank: int) -> int:
            lo, hi = plan[id(b)][rank]
            return 2 * (hi - lo) * _triangle(b.block_size)

        sizes = [sum(size(b, r) for b in buckets) for r in range(self.world_size)]
        local = torch.zeros(max(sizes), dtype=dtype, device=device)
        offset = 0
        for b in buckets:
            lo, hi = plan[id(b)][self.rank]
            for tensor in (b.fisher, b.inverse):
                packed = pack_upper(tensor[lo:hi])
                local[offset : offset + packed.numel()] = packed.to(device=device, dtype=dtype)
                offset += packed.numel()
        gathered = self._all_gather("consolidate", "gathering of the curvature", local)
        offsets = [0] * self.world_size
        for b in buckets:
            for r, (lo, hi) in enumerate(plan[id(b)]):
                for tensor in (b.fisher, b.inverse):
                    n = (hi - lo) * _triangle(b.block_size)
                    if r != self.rank and n:
                        packed = gathered[r, offsets[r] : offsets[r] + n]
                        unpacked = unpack_symmetric(packed, hi - lo, b.block_size)
                        tensor[lo:hi] = unpacked.to(device=tensor.device, dtype=tensor.dtype)
                    offsets[r] += n
            b.sharded = False

    def check_consolidated(self, opt: MBF) -> None:
        """Refuse to write a state dict that holds only this rank's share of the curvature."""
        if any(b.sharded for b in opt._buckets):
            raise RuntimeError(
                f"MBF (rank {self.rank} of {self.world_size}): each rank holds only its share of "
                "the curvature; call optimizer.consolidate_state_dict() on every rank before "
                "optimizer.state_dict() (e.g. just before rank 0 saves a checkpoint)"
            )


def setup(opt: MBF, process_group: Any, model: nn.Module | None) -> ShardedMBF | None:
    """The distributed engine for ``opt`` (after checking the ranks agree), or ``None``."""
    group = resolve_group(process_group, model)
    if group is None:
        return None
    engine = ShardedMBF(group)
    engine.check_config(opt)
    return engine
