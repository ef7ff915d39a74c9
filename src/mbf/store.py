"""The curvature store: units in buckets, their statistics and inverses, and what is done to them.

Blocks of equal size from the units of one param group form a *bucket*, factored in one batched
call. A bucket's blocks are numbered ``0 .. total``; an engine (:mod:`mbf.engine`) decides which
range of them this process owns (all of them in one process; a ``1/K`` slice on each of ``K``
ranks) and the store allocates statistics and inverses for that range only. Everything here
works on the owned range: the running-average update and the fold of queued estimates, the
schedules, factorization (bias correction, relative damping, failure counting) and the solve.
How blocks are stored is the storage strategy's business (:mod:`mbf.storage`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .diagnostics import Diagnostics
from .linalg import FactorReport
from .storage import Storage
from .tied import tied_estimate
from .units import Unit
from .validation import format_bytes

__all__ = ["Bucket", "CurvatureStore", "Kept", "Plan", "early_refresh_due"]

#: ``plan(totals) -> ranges``: for every bucket's number of blocks, every rank's ``(lo, hi)``.
Plan = Callable[[list[int]], list[list[tuple[int, int]]]]

COUNTERS = (
    "steps",
    "skipped_steps",
    "scaler_skipped_steps",
    "factorizations",
    "factored_blocks",
    "retried_blocks",
    "fallback_blocks",
    "nonfinite_blocks",
    "overflowed_updates",
    "overflowed_blocks",
)


@dataclass(eq=False)
class Bucket:
    """Blocks of equal size from the units of one param group; this rank's share of them.

    ``ranges[r]`` are rank ``r``'s blocks ``[lo, hi)`` (bucket numbering); ``fisher`` and
    ``inverse`` hold this rank's blocks only, in the storage's form.
    """

    group: int
    block_size: int
    units: list[Unit]
    ranges: list[tuple[int, int]]
    rank: int
    fisher: Tensor
    inverse: Tensor
    factored: bool = False

    @property
    def tied(self) -> int:
        """Rows that share each of the bucket's blocks (its units' ``tied``; 1: untied)."""
        return self.units[0].tied

    @property
    def shared(self) -> bool:
        """Whether the bucket's blocks are shared between rows (some of which may live on
        other FSDP2 ranks)."""
        return self.units[0].tied_divisor > 1

    @property
    def total(self) -> int:
        """Blocks of the bucket on all ranks together."""
        return self.ranges[-1][1]

    @property
    def lo(self) -> int:
        return self.ranges[self.rank][0]

    @property
    def hi(self) -> int:
        return self.ranges[self.rank][1]

    def local(self, unit: Unit) -> slice:
        """Where this rank's blocks of ``unit`` (``unit.own``) sit in ``fisher`` / ``inverse``."""
        a, b = unit.own
        return slice(unit.offset + a - self.lo, unit.offset + b - self.lo)


@dataclass
class Kept:
    """One unit's saved curvature (the storage's form, or either on load), carried across a
    rebuild of the units or out of a checkpoint: blocks ``[first_block, first_block + len)`` of
    the unit's ``num_blocks`` (every block, or the part one rank loads from per-rank files)."""

    fisher: Tensor
    inverse: Tensor
    stat_updates: int
    stat_mass: float
    inverse_scale: float
    queued: Tensor | None = None
    queued_weights: list[float] = field(default_factory=list)
    first_block: int = 0
    num_blocks: int | None = None  # None: the tensors hold every block

    @property
    def total_blocks(self) -> int:
        """How many blocks the saved unit has."""
        return int(self.fisher.shape[0]) if self.num_blocks is None else self.num_blocks


def span(unit: Unit, lo: int, hi: int) -> tuple[int, int]:
    """The part of bucket blocks ``[lo, hi)`` that falls in ``unit``, in its own numbering."""
    nb = unit.curvature_blocks
    a = min(max(lo - unit.offset, 0), nb)
    b = min(max(hi - unit.offset, 0), nb)
    return a, max(a, b)


def early_refresh_due(updates: int, group: dict[str, Any]) -> bool:
    """Whether a unit's ``updates``-th statistics update calls for a factorization now: the
    first always; with ``early_refresh`` the 2nd, 4th, 8th, ... below ``inv_every``."""
    if updates == 1:
        return True
    power_of_two = updates & (updates - 1) == 0
    return bool(group["early_refresh"]) and power_of_two and updates < group["inv_every"]


def running_weight(updates: int, mass: float, group: dict[str, Any]) -> tuple[float, float]:
    """The weight of a statistics update in its running average, and the average's total weight
    after it: the first estimate is taken as it is (weight 1), unless ``bias_correction`` makes
    the average start from zero; later ones get ``1 - stat_decay``."""
    first = updates == 0 and not group["bias_correction"]
    weight = 1.0 if first else 1.0 - group["stat_decay"]
    return weight, (1.0 - weight) * mass + weight


def factor_now(step: int, group: dict[str, Any], early: bool, factored: bool) -> bool:
    """Whether blocks are factored this step: every ``inv_every`` steps, when a statistics
    update asks for an early refresh (:func:`early_refresh_due`), or when never factored."""
    return step % group["inv_every"] == 0 or early or not factored


def relative_damping(trace: Tensor, size: int, damping: float, scale: float) -> Tensor:
    """Per block ``damping * tr(F_b) / s``, from the blocks' traces: damping in units of the
    block's mean eigenvalue.

    Scale-free: the same for statistics ``F`` and ``c F`` (bias correction's ``c`` included).
    A block with no statistics (zero trace) gets ``damping`` on the corrected scale,
    ``scale * damping``: a rule of the block alone, so that the damping of a block does not
    depend on which other blocks are factored with it (on one rank or K).
    """
    per_block = trace.abs() / size
    return damping * torch.where(per_block > 0, per_block, per_block.new_tensor(scale))


class CurvatureStore:
    """Units, buckets and counters; fold, factor and solve over this rank's blocks."""

    def __init__(
        self,
        storage: Storage,
        stat_buffer: int,
        diag: Diagnostics,
        curvature_dtype: torch.dtype | None = None,
    ) -> None:
        self.storage = storage
        self.stat_buffer = stat_buffer
        # The dtype of statistics and inverses (MBF's ``curvature_dtype``); ``None``: each
        # unit's own (its parameters' dtype, at least float32), like momentum.
        self.curvature_dtype = curvature_dtype
        self.diag = diag
        self.units: list[Unit] = []
        self.buckets: list[Bucket] = []
        self.counters = dict.fromkeys(COUNTERS, 0)

    # ---------------------------------------------------------------- building
    def build(
        self,
        units: list[Unit],
        plan: Plan,
        rank: int,
        kept: dict[tuple[int, ...], Kept],
        max_bytes: int | None,
    ) -> None:
        """Bucket ``units``, allocate this rank's share (refused over ``max_bytes``), and copy
        ``kept`` curvature (keyed by the units' parameter ids) into units of the same blocks."""
        for unit in units:
            queued = (self.storage.queues and not unit.per_example and unit.tied_divisor == 1
                      and self.stat_buffer > 1)  # tied estimates are whole blocks: no queue
            unit.queue_capacity = self.stat_buffer if queued else 0
        keyed: dict[tuple, list[Unit]] = {}
        for unit in units:
            # Tied units of one sharing share a bucket: its right-hand side is (total, T, s)
            # (an FSDP2 rank's part of a tied unit may hold T = 1 of its rows: still shared).
            key = (unit.group, unit.layout.block_size, unit.device, unit.dtype, unit.tied,
                   unit.tied_divisor > 1)
            keyed.setdefault(key, []).append(unit)
        members_of = list(keyed.values())
        totals = [sum(u.curvature_blocks for u in members) for members in members_of]
        ranges_of = plan(totals)
        for members, ranges in zip(members_of, ranges_of, strict=True):
            offset = 0
            for unit in members:
                unit.offset = offset
                unit.own = span(unit, *ranges[rank])
                offset += unit.curvature_blocks
        self._check_budget(units, max_bytes)
        for members in members_of:
            self.storage.check_dtype(self.dtype_of(members[0]), members[0].device,
                                     members[0].dtype)
        buckets = []
        for members, ranges in zip(members_of, ranges_of, strict=True):
            first = members[0]
            lo, hi = ranges[rank]
            fisher = self.storage.allocate(hi - lo, first.layout.block_size,
                                           self.dtype_of(first), first.device)
            bucket = Bucket(first.group, first.layout.block_size, members, ranges, rank, fisher,
                            torch.zeros_like(fisher))
            for unit in members:
                unit.fisher = bucket.fisher[bucket.local(unit)]
                unit.inverse = bucket.inverse[bucket.local(unit)]
                unit.queue, unit.queue_weights = None, []
                unit.stat_updates, unit.stat_mass, unit.inverse_scale = 0, 0.0, 1.0
                saved = kept.get(tuple(id(p) for p in unit.params))
                shape = (unit.curvature_blocks, *self.storage.block_shape(bucket.block_size))
                if saved is not None and tuple(saved.fisher.shape) == shape:
                    self.restore(unit, saved)  # the same blocks as before the rebuild
            bucket.factored = all(u.stat_updates > 0 for u in members)
            buckets.append(bucket)
        self.units, self.buckets = units, buckets

    def restore(self, unit: Unit, saved: Kept) -> None:
        """Put a unit's saved curvature in place (this rank's blocks of it, which ``saved`` must
        hold). A queue this unit cannot keep (longer than its capacity) is folded into the
        statistics first."""
        size = unit.layout.block_size
        block = tuple(self.storage.block_shape(size))
        first, held = saved.first_block, len(saved.fisher)
        a, b = unit.own
        if saved.total_blocks == unit.curvature_blocks and a != b and not (
            first <= a and b <= first + held
        ):  # the part one rank was given lacks some of its blocks
            raise ValueError(
                f"MBF: unit {unit.name}: blocks {a}-{b - 1} are to be restored here but the saved "
                f"part holds blocks {first}-{first + held - 1}"
            )
        rows = slice(a - first, b - first) if a != b else slice(0, 0)
        fisher = self.storage.convert(saved.fisher[rows], size)
        inverse = self.storage.convert(saved.inverse[rows], size)
        if (
            saved.total_blocks != unit.curvature_blocks
            or tuple(fisher.shape[1:]) != block
            or tuple(inverse.shape[1:]) != block
        ):
            raise ValueError(
                f"MBF: unit {unit.name} was saved with blocks "
                f"{(saved.total_blocks, *saved.fisher.shape[1:])} but has "
                f"{(unit.curvature_blocks, *block)} here (saved for another model, or with "
                "another tie_rows?)"
            )
        queued, weights = saved.queued, list(saved.queued_weights)
        if queued is not None:
            queued = queued[rows]
        if queued is not None and len(weights) > unit.queue_capacity:
            fisher = fisher.clone()
            self.storage.fold_(fisher, queued.clone(), weights)
            queued, weights = None, []
        unit.fisher.copy_(fisher)
        unit.inverse.copy_(inverse)
        unit.stat_updates = int(saved.stat_updates)
        unit.stat_mass = float(saved.stat_mass)
        unit.inverse_scale = float(saved.inverse_scale)
        unit.queue, unit.queue_weights = None, []
        if queued is not None and weights:
            unit.queue = unit.fisher.new_empty(b - a, unit.queue_capacity, size,
                                               dtype=unit.dtype)
            unit.queue[:, : len(weights)].copy_(queued)
            unit.queue_weights = weights

    def rebind(self) -> None:
        """Make every bucket's tensors again from its units' views (after unpickling, which
        stores each view's storage apart), and the units' views of them."""
        for bucket in self.buckets:
            fisher, inverse = torch.empty_like(bucket.fisher), torch.empty_like(bucket.inverse)
            for unit in bucket.units:
                view = bucket.local(unit)
                fisher[view].copy_(unit.fisher)
                inverse[view].copy_(unit.inverse)
                unit.fisher, unit.inverse = fisher[view], inverse[view]
            bucket.fisher, bucket.inverse = fisher, inverse

    def dtype_of(self, unit: Unit) -> torch.dtype:
        """The dtype of the unit's statistics and inverses."""
        return self.curvature_dtype or unit.dtype

    def unit_bytes(self, unit: Unit) -> dict[str, int]:
        """This rank's bytes of the unit's statistics, inverses, queue and momentum."""
        item = torch.empty((), dtype=unit.dtype).element_size()
        owned = unit.own[1] - unit.own[0]
        size = unit.layout.block_size
        block = self.storage.block_bytes(size, self.dtype_of(unit).itemsize)
        return {
            "statistics": owned * block,
            "inverse": owned * block,
            "queue": owned * unit.queue_capacity * size * item,
            "momentum": unit.layout.numel * item,
        }

    def _check_budget(self, units: list[Unit], max_bytes: int | None) -> None:
        if max_bytes is None:
            return
        sizes = [sum(self.unit_bytes(u).values()) for u in units]
        total = sum(sizes)
        if total <= max_bytes:
            return
        worst, worst_bytes = max(zip(units, sizes, strict=True), key=lambda x: x[1])
        raise ValueError(
            f"MBF: curvature state would take {format_bytes(total)}, over max_state_bytes="
            f"{format_bytes(max_bytes)}; the largest unit is {worst.name} "
            f"({format_bytes(worst_bytes)} in blocks of {worst.layout.block_size}). "
            "Lower max_block_size (state grows linearly with it) or raise max_state_bytes."
        )

    # ---------------------------------------------------------------- statistics
    def absorb(self, unit: Unit, estimate: Tensor, group: dict[str, Any]) -> None:
        """Blend one estimate into the unit's statistics (this rank's blocks).

        ``estimate``: ``(num_blocks, s)`` minibatch-gradient blocks ``g_b`` (the estimate
        ``g_b g_b^T``; with tied rows ``(1/T) sum_t g_tk g_tk^T`` per shared block, see
        :mod:`mbf.tied`), or ``(owned, s, s)`` per-example sums already for this rank's blocks.
        The first estimate is taken as it is, or with ``bias_correction`` enters a running
        average that starts from zero (``stat_mass`` is the average's total weight).
        """
        weight, unit.stat_mass = running_weight(unit.stat_updates, unit.stat_mass, group)
        if estimate.dim() == 2 and unit.tied > 1:
            estimate = tied_estimate(estimate, unit.tied, unit.own, unit.tied_divisor)
        if estimate.dim() == 2:
            vectors = estimate[unit.own[0] : unit.own[1]]
            if unit.queue_capacity:
                self._enqueue(unit, vectors, weight)
            else:
                self.storage.add_outer_(unit.fisher, vectors, weight)
        else:
            self.storage.lerp_(unit.fisher, estimate, weight)
        unit.stat_updates += 1

    def _enqueue(self, unit: Unit, vectors: Tensor, weight: float) -> None:
        """Queue one batch estimate; fold the queue into the statistics when it is full."""
        if unit.queue is None:
            unit.queue = vectors.new_empty(vectors.shape[0], unit.queue_capacity, vectors.shape[1])
        unit.queue[:, len(unit.queue_weights)].copy_(vectors)
        unit.queue_weights.append(weight)
        if len(unit.queue_weights) == unit.queue_capacity:
            self.fold(unit)

    def fold(self, unit: Unit) -> None:
        """Fold the unit's queued estimates into its statistics."""
        if unit.queue_weights and unit.queue is not None:
            rows = unit.queue[:, : len(unit.queue_weights)]
            self.storage.fold_(unit.fisher, rows, unit.queue_weights)
            unit.queue_weights = []

    def fold_all(self) -> None:
        for unit in self.units:
            self.fold(unit)

    # ---------------------------------------------------------------- schedules
    @staticmethod
    def is_stat_step(unit: Unit, step: int, group: dict[str, Any]) -> bool:
        """Statistics are updated every ``stat_every`` steps, and at a unit's first gradient."""
        return step % group["stat_every"] == 0 or unit.stat_updates == 0

    @staticmethod
    def factor_due(
        bucket: Bucket, members: list[Unit], refreshed: set[int], step: int,
        group: dict[str, Any],
    ) -> bool:
        """Whether the bucket is factored this step: on schedule, after a unit's first (or,
        with ``early_refresh``, 2nd, 4th, ...) statistics update, or never factored yet."""
        early = any(
            id(u) in refreshed and early_refresh_due(u.stat_updates, group) for u in members
        )
        return factor_now(step, group, early, bucket.factored)

    # ---------------------------------------------------------------- factor and solve
    def factor(self, bucket: Bucket, group: dict[str, Any]) -> FactorReport:
        """Factor this rank's blocks of the bucket into its inverses.

        The inverse of the corrected statistics ``(F / c + damping I)^-1`` is
        ``c (F + c damping I)^-1``, with ``c`` the unit's ``stat_mass``: blocks are factored
        with damping ``c * damping`` in runs of units of equal ``c`` (one run as a rule), and
        ``c`` is kept as the unit's ``inverse_scale`` for the solve (``c^(1/2)`` for the
        inverse square root of ``inverse_root=2``). Every rank sets every unit's scale, since
        every rank applies every direction.
        """
        with self.diag.timed("factorization"):
            report = FactorReport()
            damping, root = group["damping"], group["inverse_root"]
            runs: list[tuple[int, int, float]] = []
            for unit in bucket.units:
                scale = unit.stat_mass if unit.stat_mass > 0 else 1.0
                unit.inverse_scale = scale ** (1.0 / root)
                self.fold(unit)  # also where this rank owns none of it: one queue depth everywhere
                view = bucket.local(unit)
                if view.start >= view.stop:
                    continue
                if runs and runs[-1][1] == view.start and runs[-1][2] == scale:
                    runs[-1] = (runs[-1][0], view.stop, scale)
                else:
                    runs.append((view.start, view.stop, scale))
            for a, b, scale in runs:
                fisher = bucket.fisher[a:b]
                block_damping: float | Tensor = damping * scale
                if group["relative_damping"]:
                    block_damping = self.relative_damping(fisher, bucket.block_size, damping,
                                                          scale)
                report.add(self.storage.factor(fisher, block_damping, out=bucket.inverse[a:b],
                                               root=root))
        bucket.factored = True
        return report

    def relative_damping(
        self, fisher: Tensor, size: int, damping: float, scale: float
    ) -> Tensor:
        """:func:`relative_damping` of blocks kept in this store's storage."""
        return relative_damping(self.storage.trace(fisher), size, damping, scale)

    def count(self, report: FactorReport, factorizations: int) -> None:
        c = self.counters
        c["factorizations"] += factorizations
        c["factored_blocks"] += report.blocks
        c["retried_blocks"] += report.retried
        c["fallback_blocks"] += report.fallback
        c["nonfinite_blocks"] += report.nonfinite

    def solve(self, bucket: Bucket, rhs: Tensor) -> Tensor:
        """This rank's inverses applied to its ``(hi - lo, s)`` right-hand sides (tied rows:
        ``(hi - lo, T, s)``, every shared inverse applied to its ``T`` rows)."""
        return self.storage.solve(bucket.inverse, rhs)
