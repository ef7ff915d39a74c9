"""Data-parallel MBF on ``torch.distributed``: statistics reduction and sharded preconditioning.

Under data parallelism every rank holds the whole model and sees its own shard of the global
batch. MBF then runs as follows (``docs/distributed.md`` has the user's view):

- **Gradients** are the ones ``DistributedDataParallel`` has already averaged, so they are the
  same on every rank. The ``batch`` estimator (``g_b g_b^T``) therefore needs no communication.
- **Per-example statistics** are local sums ``sum_i grad l_i grad l_i^T`` over a rank's examples
  (see :mod:`mbf.hooks`: for a mean-reduced loss the hook's ``N^2`` factor undoes autograd's
  ``1/N_local``, whatever DDP later does to the parameter gradients). On statistics steps they are
  summed over ranks together with the example counts, upper triangles only, in one
  ``all_reduce`` per dtype; dividing by the global count gives the empirical Fisher of the global
  batch. The running-average statistics are thus replicated (identical) on every rank.
- **Inversion and solves** are sharded: every bucket of equal-size blocks is cut into
  ``world_size`` contiguous block ranges whose sizes differ by at most one (:func:`shard_plan`).
  Rank ``r`` computes the damped inverses of its ranges (every ``inv_every`` steps) and applies
  them to the momentum (every step); the preconditioned directions are exchanged with one
  ``all_gather`` per step. Every rank then applies the same directions to the same parameters and
  momentum, so parameters stay bit-identical across ranks.
- **Inverses** live on their owner only (a bucket's ``sharded`` flag says so).
  :meth:`ShardedMBF.consolidate` (exposed as ``MBF.consolidate_state_dict``) gathers them so that
  any rank's ``state_dict`` is complete, and loadable on any number of ranks. A state dict saved
  without consolidation records which inverses are missing; loading it recomputes those buckets'
  inverses at the next step (from the saved statistics).

A single process never reaches this module's collectives: :func:`resolve_group` returns ``None``
unless a process group with more than one rank is initialized (or given).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .linalg import FactorReport, damped_inverse, solve_blocks

if TYPE_CHECKING:  # pragma: no cover
    from .optimizer import MBF, _Bucket
    from .units import Unit

__all__ = ["ShardedMBF", "apply_saved_inverse_masks", "resolve_group", "shard_plan"]

#: ``FactorReport`` fields summed over ranks after a sharded factorization, in this order.
_REPORT_FIELDS = ("blocks", "retried", "fallback", "nonfinite")


# ---------------------------------------------------------------------------------- the group
def resolve_group(process_group: Any, model: nn.Module | None) -> Any | None:
    """The process group MBF shards over, or ``None`` for a single process.

    ``process_group=None`` (the default) means: the group of a ``DistributedDataParallel`` model,
    else the default group, when ``torch.distributed`` is initialized with more than one rank.
    ``False`` forces a single-process optimizer (e.g. independent runs launched together). An
    explicit group is used as given.
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
    costs = [{"factor": 0.0, "solve": 0.0, "blocks": 0.0} for _ in range(world)]
    for ranges, s in zip(plan, block_sizes, strict=True):
        for rank, (lo, hi) in enumerate(ranges):
            costs[rank]["factor"] += (hi - lo) * s**3
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
    torch.index_select(blocks.reshape(b, s * s), 1, index, out=out.view(b, -1))
    return out


def unpack_symmetric(
    packed: Tensor, num_blocks: int, size: int, out: Tensor | None = None
) -> Tensor:
    """Inverse of :func:`pack_upper`: ``(B, s, s)`` symmetric blocks (into ``out`` if given)."""
    tri = packed.reshape(num_blocks, -1)
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
@dataclass
class _Piece:
    """One bucket's part in this step's exchange of directions."""

    bucket: _Bucket
    ranges: list[tuple[int, int]]
    members: list[Unit]
    factored: bool


class ShardedMBF:
    """The distributed side of one :class:`~mbf.optimizer.MBF`: collectives and ownership.

    Attributes:
        group: the process group; ``rank`` and ``world_size`` within it.
        traffic: per kind of exchange (``"statistics"``, ``"directions"``, ``"counters"``,
            ``"consolidate"``, ``"config"``), the number of collective calls and the bytes this
            rank handed to them (its payload; see ``docs/distributed.md`` for bytes on the wire).
    """

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.traffic: dict[str, dict[str, int]] = {}
        self._plan_key: tuple = ()
        self._plan: list[list[tuple[int, int]]] = []
        self._buffers: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    # -------------------------------------------------------------- collectives
    def _run(self, kind: str, what: str, collective: Callable[..., Any], *args: Any) -> None:
        """Run one collective with a clear error when another rank died or stalled."""
        entry = self.traffic.setdefault(kind, {"calls": 0, "bytes": 0})
        entry["calls"] += 1
        entry["bytes"] += sum(a.numel() * a.element_size() for a in args[-1:])
        try:
            work = collective(*args, group=self.group, async_op=True)
            work.wait()
        except RuntimeError as exc:
            raise RuntimeError(
                f"MBF (rank {self.rank} of {self.world_size}): the {what} with the other ranks "
                f"failed: {exc}\nAnother rank has probably died or stalled; MBF stops rather "
                "than continue with parameters that would no longer match. (Collectives give up "
                "after the timeout passed to torch.distributed.init_process_group.)"
            ) from exc

    def _all_reduce(self, kind: str, what: str, tensor: Tensor) -> None:
        self._run(kind, what, dist.all_reduce, tensor)

    def _all_gather(self, kind: str, what: str, local: Tensor) -> Tensor:
        """``(world_size, n)`` from every rank's ``(n,)`` tensor."""
        out = local.new_empty(self.world_size, local.numel())
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self._run(kind, what, gather, out.view(-1), local)
        return out

    # -------------------------------------------------------------- construction
    def check_config(self, opt: MBF) -> None:
        """Raise ``ValueError`` on every rank unless all ranks built the same optimizer."""
        mine = _fingerprint(opt)
        text = json.dumps(mine, sort_keys=True).encode()
        digest = int.from_bytes(hashlib.sha256(text).digest()[:8], "little", signed=True)
        first = opt._units[0].device if opt._units else torch.device("cpu")
        device = _comm_device(self.group, first)
        local = torch.tensor([digest], dtype=torch.int64, device=device)
        digests = self._all_gather("config", "configuration check", local).view(-1).tolist()
        if len(set(digests)) == 1:
            return
        every: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(every, mine, group=self.group)
        except RuntimeError as exc:  # pragma: no cover - the digests already disagreed
            raise ValueError("MBF: the ranks were given different configurations") from exc
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

    def rebuilt(self, old: list[_Bucket], new: list[_Bucket]) -> None:
        """After the buckets are rebuilt: inverses that were only partly here must be redone."""
        if any(b.sharded for b in old):
            for bucket in new:
                bucket.factored = False

    # -------------------------------------------------------------- per-example statistics
    def reduce_statistics(self, units: list[Unit]) -> None:
        """Sum the units' pending per-example statistics and example counts over the ranks."""
        by_dtype: dict[torch.dtype, list[Unit]] = {}
        for unit in units:
            by_dtype.setdefault(unit.dtype, []).append(unit)
        for dtype, members in by_dtype.items():
            device = _comm_device(self.group, members[0].device)
            sizes = [u.layout.num_blocks * _triangle(u.layout.block_size) for u in members]
            total = sum(sizes)
            buffer = self._buffer(dtype, device, total + len(members))
            parts = list(torch.split(buffer[:total], sizes))
            for u, part in zip(members, parts, strict=True):
                if u.pending is None:
                    part.zero_()
                elif u.pending.device == device:
                    pack_upper(u.pending, out=part)
                else:
                    part.copy_(pack_upper(u.pending))
            counts = [float(u.pending_count) for u in members]
            buffer[total:] = torch.tensor(counts, dtype=dtype)
            self._all_reduce("statistics", "sum of per-example statistics", buffer)
            totals = buffer[total:].tolist()
            for u, part, count in zip(members, parts, totals, strict=True):
                u.pending_count = int(round(count))
                nb, s = u.layout.num_blocks, u.layout.block_size
                if u.pending_count == 0:
                    u.clear_pending()
                elif u.pending is not None and u.pending.device == device:
                    unpack_symmetric(part, nb, s, out=u.pending)  # in place: no new memory
                else:
                    u.pending = unpack_symmetric(part, nb, s).to(u.device)

    def _buffer(self, dtype: torch.dtype, device: torch.device, numel: int) -> Tensor:
        """A reusable flat buffer (fresh memory every step costs page faults on large models)."""
        key = (dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel]

    # -------------------------------------------------------------- factor, solve, share
    def precondition(
        self, opt: MBF, live_ids: set[int], refreshed: set[int]
    ) -> dict[int, list[Tensor]]:
        """Factor and solve this rank's blocks, exchange the directions; ``{id(unit): [d, ...]}``.

        Every live unit's momentum is updated on every rank (it is cheap, elementwise, and keeps
        the optimizer state complete everywhere); only the owner of a block range factors and
        solves it.
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
            due = opt._factor_due(bucket, members, refreshed)
            if due:
                self._factor(opt, bucket, lo, hi, report)
                factored += 1
            pieces.append(_Piece(bucket, ranges, members, due))
            rhs_of.append(full)
            if hi > lo:
                sends.append(solve_blocks(bucket.inverse[lo:hi], full[lo:hi]))
        if factored:
            self._sync_report(opt, pieces, report, factored)
        return self._exchange(pieces, sends, rhs_of)

    def _factor(self, opt: MBF, bucket: _Bucket, lo: int, hi: int, report: FactorReport) -> None:
        if hi > lo:
            damping = opt.param_groups[bucket.group]["damping"]
            inverse, part = damped_inverse(bucket.fisher[lo:hi], damping)
            bucket.inverse[lo:hi].copy_(inverse)
            for name in _REPORT_FIELDS:
                setattr(report, name, getattr(report, name) + getattr(part, name))
        bucket.factored = True
        bucket.sharded = True  # the other ranks' parts of this bucket's inverses are stale here

    def _sync_report(
        self, opt: MBF, pieces: list[_Piece], report: FactorReport, factored: int
    ) -> None:
        """Sum the ranks' factorization reports into the (rank-independent) counters."""
        device = _comm_device(self.group, pieces[0].bucket.fisher.device)
        counts = torch.tensor(
            [getattr(report, f) for f in _REPORT_FIELDS], dtype=torch.int64, device=device
        )
        self._all_reduce("counters", "sum of factorization counters", counts)
        blocks, retried, fallback, nonfinite = counts.tolist()
        c = opt._counters
        c["factorizations"] += factored
        c["factored_blocks"] += blocks
        c["retried_blocks"] += retried
        c["fallback_blocks"] += fallback
        c["nonfinite_blocks"] += nonfinite
        if nonfinite:
            # A poisoned statistic would poison every later factorization: every rank starts
            # such blocks afresh, so the replicated statistics stay identical.
            for piece in (p for p in pieces if p.factored):
                fisher = piece.bucket.fisher
                bad = ~torch.isfinite(fisher).all(dim=(-2, -1))
                if bool(bad.any()):
                    fisher[bad] = 0.0

    def _exchange(
        self, pieces: list[_Piece], sends: list[Tensor], rhs_of: list[Tensor]
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
        length = max(sizes)
        local = torch.zeros(length, dtype=dtype, device=device)
        if sends:
            flat = torch.cat([s.reshape(-1).to(device=device, dtype=dtype) for s in sends])
            local[: flat.numel()] = flat
        gathered = self._all_gather("directions", "exchange of preconditioned directions", local)
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
                directions[id(unit)] = unit.layout.from_blocks(part)
        return directions

    # -------------------------------------------------------------- checkpoints
    def consolidate(self, opt: MBF) -> None:
        """Gather every rank's inverses (upper triangles), so that every rank holds them all."""
        buckets = [b for b in opt._buckets if b.sharded]
        if not buckets:
            return
        plan = dict(zip(map(id, opt._buckets), self.plan(opt._buckets), strict=True))
        dtype = buckets[0].inverse.dtype
        for b in buckets[1:]:
            dtype = torch.promote_types(dtype, b.inverse.dtype)
        device = _comm_device(self.group, buckets[0].inverse.device)
        sizes = [
            sum((plan[id(b)][r][1] - plan[id(b)][r][0]) * _triangle(b.block_size) for b in buckets)
            for r in range(self.world_size)
        ]
        local = torch.zeros(max(sizes), dtype=dtype, device=device)
        mine = []
        for b in buckets:
            lo, hi = plan[id(b)][self.rank]
            if hi > lo:
                mine.append(pack_upper(b.inverse[lo:hi]).to(device=device, dtype=dtype))
        if mine:
            flat = torch.cat(mine)
            local[: flat.numel()] = flat
        gathered = self._all_gather("consolidate", "gathering of the inverses", local)
        offsets = [0] * self.world_size
        for b in buckets:
            for r, (lo, hi) in enumerate(plan[id(b)]):
                n = (hi - lo) * _triangle(b.block_size)
                if r != self.rank and n:
                    packed = gathered[r, offsets[r] : offsets[r] + n]
                    b.inverse[lo:hi] = unpack_symmetric(packed, hi - lo, b.block_size).to(
                        device=b.inverse.device, dtype=b.inverse.dtype
                    )
                offsets[r] += n
            b.sharded = False

    def annotate_state_dict(self, opt: MBF, sd: dict[str, Any]) -> None:
        """Mark, per unit, the blocks whose inverses this rank's state dict really holds."""
        if not any(b.sharded for b in opt._buckets):
            return
        plan = dict(zip(map(id, opt._buckets), self.plan(opt._buckets), strict=True))
        bucket_of = {id(u): b for b in opt._buckets for u in b.units}
        for unit, saved in zip(opt._units, sd["mbf"]["units"], strict=True):
            bucket = bucket_of[id(unit)]
            if not bucket.sharded:
                continue
            lo, hi = plan[id(bucket)][self.rank]
            blocks = torch.arange(unit.offset, unit.offset + unit.layout.num_blocks)
            saved["inverse_valid"] = (blocks >= lo) & (blocks < hi)


def apply_saved_inverse_masks(opt: MBF, saved_units: list[dict[str, Any]]) -> None:
    """After a load: buckets with inverses missing from the state dict are refactored next step."""
    bucket_of = {id(u): b for b in opt._buckets for u in b.units}
    stale = 0
    for unit, saved in zip(opt._units, saved_units, strict=True):
        valid = saved.get("inverse_valid")
        if valid is not None and not bool(torch.as_tensor(valid).all()):
            bucket_of[id(unit)].factored = False
            stale += 1
    if stale:
        warnings.warn(
            f"MBF: the state dict lacks some inverses of {stale} unit(s) (it was saved on one rank "
            "of a sharded run without consolidation); they are recomputed from the saved "
            "statistics at the next step. Call optimizer.consolidate_state_dict() on every rank "
            "before saving for an exact resume.",
            stacklevel=3,
        )
    for bucket in opt._buckets:
        bucket.sharded = False  # what the state dict holds is now all there is


def setup(opt: MBF, process_group: Any, model: nn.Module | None) -> ShardedMBF | None:
    """The distributed engine for ``opt`` (after checking the ranks agree), or ``None``."""
    group = resolve_group(process_group, model)
    if group is None:
        return None
    engine = ShardedMBF(group)
    engine.check_config(opt)
    return engine
