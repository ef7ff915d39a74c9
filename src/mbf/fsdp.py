"""MBF on models sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``) or DTensor ``Shard(0)``.

FSDP2 keeps every parameter as a DTensor cut along dim 0 into ``world_size`` pieces, the way
``torch.chunk`` cuts it: each rank holds rows ``[r c, min((r + 1) c, n))`` of a tensor of ``n``
rows, ``c = ceil(n / K)`` (the last ranks may hold fewer, or none). MBF's blocks are rows of a
unit's row matrix (a Linear's output units with their bias, a conv's ``(out, in)`` kernels, a
norm layer's channels), so under a dim-0 cut every block of such a unit lives whole on one rank:

- **Units.** The units are first built on the whole (DTensor) parameters as in one process;
  each rank then keeps, of every unit, the part made of its local rows
  (:func:`split_units`): a unit of the same block size whose blocks are blocks
  ``[first, first + n)`` of the whole unit. A Linear's bias has the weight's dim 0, so
  ``torch.chunk`` cuts it at the same rows: a rank's bias entries are those of its weight rows,
  and nothing crosses ranks. Units without row structure (a conv bias or any loose vector, one
  row cut into chunks) are cut into blocks within each rank's piece instead; they use the
  batch estimator.
- **Statistics.** The batch estimator ``g_b g_b^T`` reads the local shard of the gradient FSDP2
  has already reduced: no communication. Per-example statistics need every example: each rank
  computes them for the whole unit from its own examples (activations and output gradients are
  whole after FSDP2's all-gather), and one reduce-scatter per step (an all-reduce of disjoint
  parts on gloo, as in :mod:`mbf.distributed`) hands every rank the sums over all ranks of its
  own blocks, with the global example counts.
- **Tied rows** (``tie_rows``, :mod:`mbf.tied`): the rows that share a block are dim 0's (a
  Linear's output units, a conv's output channels), so a rank holds some of them. Every rank
  with rows of a layer keeps all of its shared blocks, each the mean over the whole layer's
  rows: the batch estimator's are the sums of the ranks' own rows' outer products, divided by
  the whole layer's row count, summed by one all-reduce per step; the per-example ones are
  reduce-scattered as above, every rank with rows receiving all of them. Each such rank
  factors them alike (rank 0, which holds rows of every layer, counts them) and writes them to
  its file only on rank 0.
- **Steps.** Every rank factors, solves and steps only its local rows, in place in the local
  shard. Nothing is gathered for the optimizer. The few decisions that must agree across ranks
  (whether the gradient was finite, whether the update was, the KL clip's ``d . m``) are one
  small all-reduce each.
- **Checkpoints.** ``MBF.sharded_state_dict`` writes the rank's blocks under their numbers in
  the whole unit and its momentum under the rows they hold (``"rows"``), so any number of ranks,
  or one process, re-cuts them (:func:`join_param_state`; ``docs/decisions.md`` says why not
  ``torch.distributed.checkpoint``).

Placements MBF cannot serve (``Shard(1)``, a replicated or 2-d mesh, tensor parallelism, a
strided shard) are refused at construction, naming the parameter and the placement.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .blocks import BlockLayout, row_layout
from .distributed import ShardedEngine, _comm_device
from .engine import Estimate, LocalEngine, Whole, Work
from .linalg import FactorReport
from .packed import SymmetricPacking
from .store import Bucket, CurvatureStore
from .tied import tied_estimate
from .units import Unit

__all__ = [
    "FSDPEngine",
    "ShardedUnit",
    "find_mesh_group",
    "join_param_state",
    "shard_rows",
    "split_units",
]


def _is_dtensor(t: object) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)


def _dt(t: Tensor) -> Any:
    """A DTensor, typed loosely (its methods are not on ``Tensor``)."""
    return t


def _check_placement(name: str, p: Any) -> None:
    """A clear error for a DTensor parameter MBF cannot serve: only a 1-d mesh and
    ``Shard(0)`` (what ``fully_shard`` makes) keep every row of a block on one rank."""
    from torch.distributed.tensor import Shard

    placements = tuple(p.placements)
    ok = (
        p.device_mesh.ndim == 1
        and len(placements) == 1
        and type(placements[0]) is Shard
        and placements[0].dim == 0
    )
    if not ok:
        raise ValueError(
            f"MBF: parameter {name} is a DTensor with placements {placements} on a "
            f"{p.device_mesh.ndim}-d mesh; MBF serves Shard(0) on a 1-d mesh only (what "
            "torch.distributed.fsdp.fully_shard makes), where every mini-block (a row) lives "
            "whole on one rank. Shard(1), Replicate (replicated DTensors), 2-d meshes (HSDP, "
            "tensor parallelism) would split blocks across ranks or hold them several times"
        )


def find_mesh_group(params: Sequence[Tensor], names: dict[int, str]) -> Any | None:
    """The process group of the DTensor parameters' mesh, ``None`` when none is a DTensor.

    Every DTensor parameter must be ``Shard(0)`` on one 1-d mesh, the same for all; anything
    else is refused with a ``ValueError`` naming the parameter and its placement.
    """
    meshes = []
    for i, p in enumerate(params):
        if _is_dtensor(p):
            _check_placement(names.get(id(p), f"#{i}"), p)
            meshes.append((p, _dt(p).device_mesh))
    if not meshes:
        return None
    first, mesh = meshes[0]
    for p, other in meshes[1:]:
        if other != mesh:
            raise ValueError(
                f"MBF: parameters {names.get(id(first), '?')} and {names.get(id(p), '?')} are "
                "sharded over different device meshes; MBF needs one mesh for all"
            )
    plain = [names.get(id(p), f"#{i}") for i, p in enumerate(params) if not _is_dtensor(p)]
    if plain and mesh.size() > 1:
        raise ValueError(
            f"MBF: parameter {plain[0]} is a plain tensor but others are sharded DTensors; "
            "under FSDP2 every parameter the optimizer steps must be sharded (apply "
            "fully_shard to the root module too)"
        )
    return mesh.get_group(0)


def shard_rows(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of dim 0 (of size ``n``) that ``rank`` holds under ``Shard(0)``:
    ``torch.chunk``'s cut, ``ceil(n / world_size)`` rows per rank, the last ranks fewer or none."""
    size = -(-n // world_size)
    start = min(rank * size, n)
    return start, min(start + size, n)


@dataclass(eq=False)
class ShardedUnit:
    """A unit of the whole (DTensor) parameters and this rank's part of it.

    Attributes:
        whole: the unit as one process would build it (DTensor parameters, whole layout); the
            per-example hooks compute its statistics, every rank for all its blocks.
        local: this rank's part (the local shards, blocks ``[first_block, first_block + n)`` of
            the whole unit), or ``None`` when the rank holds none of its rows.
        rows_per_index: rows of the whole row matrix per index of dim 0; ``0`` for a unit cut
            into blocks within each rank's piece (no row structure: its blocks are not the
            whole unit's).
    """

    whole: Unit
    local: Unit | None
    rows_per_index: int

    @property
    def row_structured(self) -> bool:
        return self.rows_per_index > 0

    def blocks_of(self, rank: int, world_size: int) -> tuple[int, int]:
        """The whole unit's curvature blocks ``[a, b)`` that ``rank`` holds (row-structured
        units): those of its rows, or with tied rows every shared block when it holds rows."""
        n = int(self.whole.params[0].shape[0])
        start, stop = shard_rows(n, world_size, rank)
        if self.whole.tied > 1:
            return (0, self.whole.curvature_blocks) if stop > start else (0, 0)
        per = self.rows_per_index * self.whole.layout.chunks
        return start * per, stop * per

    def saved_blocks(self, rank: int, world_size: int) -> tuple[int, int]:
        """The blocks ``rank`` writes to its per-rank file: its own, but shared blocks (held by
        every rank with rows) by rank 0 only, so that the files hold each block once."""
        if self.whole.tied > 1 and rank > 0:
            end = self.whole.curvature_blocks
            return end, end
        return self.blocks_of(rank, world_size)

    def bind(self) -> None:
        """Point the local unit at this step's local shards and their gradients' (FSDP2 may
        replace a parameter's local tensor; ``to_local`` gives a view of the current one)."""
        if self.local is None:
            return
        local = []
        for p in self.whole.params:
            shard = _dt(p).to_local()
            shard.grad = None if p.grad is None else _dt(p.grad).to_local()
            local.append(shard)
        self.local.params = local

    def release(self) -> None:
        """Drop the references to this step's gradients."""
        if self.local is not None:
            for shard in self.local.params:
                shard.grad = None


def split_units(
    units: list[Unit], world_size: int, rank: int, max_block_size: Sequence[int]
) -> list[ShardedUnit]:
    """Each whole unit with this rank's part of it (see the module docstring).

    A unit whose tensors share dim 0 and whose row matrix has a whole number of rows per index
    of dim 0 (Linear with bias, conv kernels, norm channels, embeddings) keeps its layout's row
    length and block size; any other unit of one sharded tensor is cut within the local piece.
    Anything else cannot be served and is refused here, at construction.
    """
    out = []
    for unit in units:
        dims = {int(p.shape[0]) if p.dim() else 0 for p in unit.params}
        layout = unit.layout
        n = dims.pop() if len(dims) == 1 else 0
        if n and layout.rows % n == 0:
            per = layout.rows // n
            if unit.tied != n:  # tied rows must be dim 0's (Linear, conv, 2-d tensors)
                unit.tied = 1
            start, stop = shard_rows(n, world_size, rank)
            local = None
            if stop > start:
                shapes = tuple(torch.Size((stop - start, *p.shape[1:])) for p in unit.params)
                local_layout = BlockLayout(
                    layout.kind, shapes, (stop - start) * per, layout.row_length, layout.chunks,
                    layout.block_size, row_sharing=stop - start if unit.tied > 1 else 1,
                )
                local = _local_unit(unit, local_layout)
                if unit.tied > 1:  # the rank's rows; the shared blocks' means are over all
                    local.tied, local.tied_whole = stop - start, unit.tied
            out.append(ShardedUnit(unit, local, per))
        elif len(unit.params) == 1 and unit.params[0].dim() == 1:
            start, stop = shard_rows(n, world_size, rank)
            local = None
            if stop > start:
                limit = max_block_size[unit.group]
                local = _local_unit(unit, row_layout([(stop - start,)], 1, limit, "flat"))
            unit.per_example = False  # its statistics are not cut like its blocks
            if local is not None:
                local.per_example = False
            out.append(ShardedUnit(unit, local, 0))
        else:
            raise ValueError(
                f"MBF: unit {unit.name} ({layout.kind} layout of shapes "
                f"{[tuple(s) for s in layout.shapes]}) has mini-blocks that a dim-0 shard would "
                "cut across ranks; MBF cannot serve it under FSDP2 (put its parameters in a "
                "module MBF knows, or register a layer rule with one row per index of dim 0)"
            )
    return out


def _local_unit(whole: Unit, layout: BlockLayout) -> Unit:
    shards = [_dt(p).to_local() for p in whole.params]
    return Unit(whole.name, shards, layout, whole.group, whole.module, whole.per_example)


class ParamState(MutableMapping[Tensor, Any]):
    """The optimizer's per-parameter state, reached through a local shard: the state of a
    sharded parameter is kept under the DTensor parameter (as ``torch.optim`` keys it), its
    tensors being local (the shard's rows)."""

    def __init__(self, state: MutableMapping[Tensor, Any]) -> None:
        self.state = state
        self.param_of: dict[int, Tensor] = {}

    def _key(self, t: Tensor) -> Tensor:
        return self.param_of.get(id(t), t)

    def __getitem__(self, t: Tensor) -> Any:
        return self.state[self._key(t)]

    def __setitem__(self, t: Tensor, value: Any) -> None:
        self.state[self._key(t)] = value

    def __delitem__(self, t: Tensor) -> None:
        del self.state[self._key(t)]

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


class FSDPEngine(ShardedEngine):
    """Ranks of an FSDP2 model: each owns the blocks of its local rows (all of them, of its
    local units); no directions are exchanged. See the module docstring."""

    def __init__(self, group: Any) -> None:
        super().__init__(group)
        self.sharded: list[ShardedUnit] = []
        self.param_state: ParamState | None = None

    def split(
        self, units: list[Unit], groups: list[dict[str, Any]], state: MutableMapping[Tensor, Any]
    ) -> list[Unit]:
        """This rank's local units of ``units`` (kept with their whole units)."""
        limits = [int(g["max_block_size"]) for g in groups]
        self.sharded = split_units(units, self.world_size, self.rank, limits)
        self.param_state = ParamState(state)
        return [s.local for s in self.sharded if s.local is not None]

    @property
    def whole_units(self) -> list[Unit]:
        return [s.whole for s in self.sharded]

    def bind(self) -> None:
        """Before a step: the local units on the current shards and gradients."""
        assert self.param_state is not None
        self.param_state.param_of.clear()
        for s in self.sharded:
            s.bind()
            if s.local is not None:
                for p, shard in zip(s.whole.params, s.local.params, strict=True):
                    self.param_state.param_of[id(shard)] = p

    def release(self) -> None:
        for s in self.sharded:
            s.release()

    # ------------------------------------------------------------------ agreement
    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (one all-reduce)."""
        device = _comm_device(self.group, torch.device("cpu"))
        value = torch.tensor([0 if flag else 1], dtype=torch.int64, device=device)
        self._run("agreement", "agreement on a finite step", dist.all_reduce, value)
        return int(value.item()) == 0

    def sum(self, values: Tensor) -> Tensor:
        """The sum over ranks of ``values`` (the KL clip's per-group ``d . m``)."""
        device = _comm_device(self.group, values.device)
        total = values.to(device=device, dtype=torch.float64).clone()
        self._run("agreement", "sum of the KL clip's terms", dist.all_reduce, total)
        return total.to(values.device)

    # ------------------------------------------------------------------ the engine
    def plan(self, totals: list[int]) -> list[list[tuple[int, int]]]:
        """Every block of the local units is this rank's (and no other rank's business)."""
        return [[(0, total)] * self.world_size for total in totals]

    def counted(self, bucket: Bucket, report: FactorReport) -> FactorReport:
        """Shared blocks (tied rows) are factored alike on every rank with rows; rank 0, which
        holds rows of every unit, counts them, so the summed counters are one process's."""
        return report if self.rank == 0 or not bucket.shared else FactorReport()

    def count(self, store: CurvatureStore, report: FactorReport, factorizations: int) -> None:
        """Sum the ranks' factorization reports, so that the counters agree on every rank (and
        checkpoint alike). Every rank calls it on every step, factored or not, so the
        all-reduce is entered by all. ``factorizations`` counts the ranks' bucket
        factorizations together."""
        device = _comm_device(self.group, torch.device("cpu"))
        fields = (report.blocks, report.retried, report.fallback, report.nonfinite,
                  factorizations)
        counts = torch.tensor(fields, dtype=torch.int64, device=device)
        self._run("counters", "sum of factorization counters", dist.all_reduce, counts)
        blocks, retried, fallback, nonfinite, factorizations = counts.tolist()
        store.count(FactorReport(blocks, retried, fallback, nonfinite), factorizations)

    def exchange(self, work: list[Work], solved: list[Tensor]) -> list[Tensor]:
        return solved

    def whole_curvature(self, store: CurvatureStore) -> Whole:
        return LocalEngine.whole_curvature(self, store)

    def consolidate(self, store: CurvatureStore) -> None:
        raise RuntimeError(self._whole_refused())

    def consolidated(self, store: CurvatureStore) -> Whole:
        raise RuntimeError(self._whole_refused())

    def invalidate(self) -> None:
        pass

    def _whole_refused(self) -> str:
        return (
            f"MBF (rank {self.rank} of {self.world_size}, FSDP2): each rank holds the curvature "
            "of its own shards only, and gathering it would need one process's memory; save "
            "optimizer.sharded_state_dict() on every rank instead (docs/distributed.md)"
        )

    def reduce_estimates(
        self, due: list[tuple[Unit, list[Tensor]]], estimate: Estimate
    ) -> dict[int, Tensor]:
        """The shared blocks' batch estimates of this rank's tied units, summed over the ranks
        (each rank's cover its own rows only): one all-reduce per dtype on every step, over the
        same whole units in the same order, a rank sending zeros for a unit it holds no rows
        of or does not update now."""
        grads_of = {id(unit): grads for unit, grads in due}
        by_dtype: dict[torch.dtype, list[ShardedUnit]] = {}
        for s in self.sharded:
            if s.whole.tied > 1 and not s.whole.per_example:
                by_dtype.setdefault(s.whole.dtype, []).append(s)
        reduced: dict[int, Tensor] = {}
        for dtype, members in by_dtype.items():
            device = _comm_device(self.group, members[0].whole.device)
            size = [s.whole.curvature_blocks * s.whole.layout.block_size ** 2 for s in members]
            flat = self._buffer("tied", dtype, device, sum(size)).zero_()
            for s, part in zip(members, flat.split(size), strict=True):
                local = s.local
                if local is None or id(local) not in grads_of:
                    continue
                blocks = estimate(local, grads_of[id(local)])
                shared = tied_estimate(blocks, local.tied, local.own, local.tied_divisor)
                part.copy_(shared.reshape(-1))
            self._run("statistics", "sum of the shared blocks' estimates", dist.all_reduce,
                      flat)
            for s, part in zip(members, flat.split(size), strict=True):
                local = s.local
                if local is not None and id(local) in grads_of:
                    width = local.layout.block_size
                    reduced[id(local)] = part.view(-1, width, width).to(local.device).clone()
        return reduced

    def reduce_pending(self, store: CurvatureStore, units: list[Unit]) -> None:
        """Sum every collecting whole unit's per-example statistics over the ranks, each rank
        receiving those of its own blocks (into its local unit's ``pending``) and the global
        example counts. Every rank enters one collective per dtype, over the same whole units
        in the same order, whether or not it holds rows of them."""
        by_dtype: dict[torch.dtype, list[ShardedUnit]] = {}
        for s in self.sharded:
            if s.whole.per_example and s.whole.collect and s.row_structured:
                by_dtype.setdefault(s.whole.dtype, []).append(s)
        for dtype, members in by_dtype.items():
            device = _comm_device(self.group, members[0].whole.device)
            spans = [[s.blocks_of(r, self.world_size) for s in members]
                     for r in range(self.world_size)]
            summed = self.sum_statistics([s.whole for s in members], spans, dtype, device)
            for s, (part, count) in zip(members, summed, strict=True):
                s.whole.clear_pending()
                if count:
                    s.whole.stat_updates += 1  # the whole unit's schedule (MBF._schedule)
                else:  # no rank's hooks saw a pass: the batch estimator from now on, as the
                    s.whole.per_example = False  # local unit's (MBF._hooks_missed), on all ranks
                if s.local is None:
                    continue
                s.local.clear_pending()
                if count:
                    packing = SymmetricPacking.of(s.whole.layout.block_size, device)
                    s.local.pending = packing.unpack(part).to(s.local.device)
                    s.local.pending_count = count


# ---------------------------------------------------------------------------- checkpoints
RecordFn = Callable[[Unit], dict[str, Any]]


def shard_records(
    engine: FSDPEngine, store: CurvatureStore, index_of: dict[int, int], record: RecordFn
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A per-rank file's unit records and its ``"fsdp"`` entry.

    Every whole row-structured unit has a record on every rank, its blocks numbered as in the
    whole unit (``"blocks"``; empty on a rank without rows of it), so that the files join like
    those of data-parallel ranks (``mbf.checkpoint.join_shards``). The ``"fsdp"`` entry holds
    per parameter index the rows ``[start, stop)`` of dim 0 this rank's state holds and the
    whole number of rows, the records of units cut within the shard (``"within"``, with the
    elements they cover) and whether each unit's bucket was factored.
    """
    records, within, factored = [], {}, {}
    factored_of = {id(u): b.factored for b in store.buckets for u in b.units}
    for s in engine.sharded:
        local, whole = s.local, s.whole
        if local is not None:
            factored[whole.name] = factored_of[id(local)]
        if not s.row_structured:
            if local is not None:
                start, stop = shard_rows(int(whole.params[0].shape[0]), engine.world_size,
                                         engine.rank)
                within[whole.name] = dict(record(local), elements=[start, stop])
            continue
        a, b = s.saved_blocks(engine.rank, engine.world_size)
        if local is not None and b > a:  # a rank's rows; shared blocks on rank 0 alone
            entry = record(local)
        else:
            size = whole.layout.block_size
            empty = torch.empty(0, *store.storage.block_shape(size), dtype=whole.dtype)
            entry = {"name": whole.name, "block_size": size, "fisher": empty,
                     "inverse": empty, "stat_updates": 0, "stat_mass": 0.0,
                     "inverse_scale": 1.0, "queued": None, "queued_weights": []}
        records.append(dict(entry, num_blocks=whole.curvature_blocks, blocks=[a, b]))
    rows: dict[int, list[int]] = {}
    for s in engine.sharded:
        for p in s.whole.params:
            n = int(p.shape[0])
            rows[index_of[id(p)]] = [*shard_rows(n, engine.world_size, engine.rank), n]
    return records, {"rows": rows, "within": within, "factored": factored}


def restore_units(
    engine: FSDPEngine, store: CurvatureStore, extra: dict[str, Any],
    fsdp: dict[str, Any],
) -> list[str]:
    """Copy this rank's blocks out of joined per-rank files (``extra``, with the ``"fsdp"``
    entries of all files merged in ``fsdp``); the names of units restarted afresh."""
    from .checkpoint import kept

    by_name = {r["name"]: r for r in extra["units"]}
    restarted = []
    for s in engine.sharded:
        local = s.local
        if local is None:
            continue
        if s.row_structured:
            record = by_name.get(local.name)
            if record is None:
                raise ValueError(
                    f"MBF: unit {local.name} of this optimizer is not in the per-rank state "
                    "dicts; were they saved for another model?"
                )
            saved = kept(record, s.blocks_of(engine.rank, engine.world_size))
            saved.first_block, saved.num_blocks = 0, None  # exactly the local unit's blocks
            store.restore(local, saved)
            continue
        start, stop = shard_rows(int(s.whole.params[0].shape[0]), engine.world_size,
                                 engine.rank)
        # A unit cut within the shard resumes only where it is cut as it was.
        same = [r for r in fsdp["within"].get(local.name, []) if r["elements"] == [start, stop]]
        if same:
            store.restore(local, kept(same[0]))
        else:
            restarted.append(local.name)
    for bucket in store.buckets:
        bucket.factored = all(
            fsdp["factored"].get(u.name, u.stat_updates > 0) and u.stat_updates > 0
            for u in bucket.units
        )
    return restarted


def merged_entry(state_dicts: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The ``"fsdp"`` entries of per-rank files merged (``None`` for files of data-parallel
    ranks): every file's units cut within the shard, and the factored flags."""
    entries = [sd["mbf"]["shard"].get("fsdp") for sd in state_dicts]
    if entries[0] is None:
        return None
    within: dict[str, list[dict[str, Any]]] = {}
    factored: dict[str, bool] = {}
    for entry in entries:
        for name, record in entry["within"].items():
            within.setdefault(name, []).append(record)
        factored.update(entry["factored"])
    return {"within": within, "factored": factored}


def join_param_state(
    state_dicts: Sequence[dict[str, Any]], wanted: dict[int, tuple[int, int]]
) -> dict[int, dict[str, Any]]:
    """The per-parameter state of a checkpoint saved as per-rank files of FSDP2 shards, for
    the rows ``wanted[index] = (start, stop)`` of each parameter (all rows in one process).

    Tensors of a parameter's state are cut along dim 0 by the saving ranks' ``"rows"``; the
    wanted rows are copied out of the pieces that hold them. Numbers (step counts) are those of
    any rank that holds rows of the parameter (every such rank counts alike).
    """
    pieces: dict[int, list[tuple[int, int, dict[str, Any]]]] = {}
    saved_rows: dict[int, int] = {}
    for sd in state_dicts:
        rows = sd["mbf"]["shard"]["fsdp"]["rows"]
        for key, (start, stop, n) in rows.items():
            index = int(key)
            saved_rows[index] = int(n)
            entry = sd.get("state", {}).get(index)
            if entry:
                pieces.setdefault(index, []).append((int(start), int(stop), entry))
    out: dict[int, dict[str, Any]] = {}
    for index, parts in pieces.items():
        parts.sort(key=lambda piece: piece[0])
        start, stop = wanted.get(index, (0, saved_rows[index]))
        state: dict[str, Any] = {}
        for key, value in parts[0][2].items():
            if not isinstance(value, Tensor) or value.dim() == 0:
                state[key] = value
                continue
            cut = [
                entry[key][max(start, a) - a : min(stop, b) - a]
                for a, b, entry in parts
                if a < stop and start < b
            ] or [value[:0]]  # no row here: an empty piece of the right shape
            covered = sum(len(c) for c in cut)
            if covered != stop - start:
                raise ValueError(
                    f"MBF: the per-rank state dicts hold {covered} of rows {start}-{stop - 1} of "
                    f"parameter {index}'s {key!r}: files of different checkpoints?"
                )
            state[key] = torch.cat(cut) if len(cut) != 1 else cut[0]
        out[index] = state
    return out


def warn_restarted(names: list[str]) -> None:
    """Units whose blocks were cut within a rank's piece restart their curvature when the
    pieces are cut differently on resume."""
    if names:
        warnings.warn(
            "MBF: the curvature of units cut into blocks within each rank's shard (no row "
            f"structure) starts afresh, the shards being cut differently now: {', '.join(names)}",
            stacklevel=5,  # the caller of load_sharded_state_dict
        )
