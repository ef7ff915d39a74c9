"""Engines: who owns which blocks, and what crosses between processes.

An engine drives the curvature store (:mod:`mbf.store`) through one interface, the same for one
process and for ``K`` ranks:

- :meth:`LocalEngine.plan`: which blocks of each bucket this process owns (the store allocates
  those only);
- :meth:`LocalEngine.update_statistics`: this step's estimates into the owned statistics;
- :meth:`LocalEngine.precondition`: factor what is due, solve the owned blocks, and return every
  bucket's whole solved right-hand side;
- :meth:`LocalEngine.whole_curvature`: every block's statistics and inverse, for checkpoints,
  introspection and rebuilding the units.

:class:`LocalEngine` owns everything and exchanges nothing. :class:`mbf.distributed.ShardedEngine`
owns a ``1/K`` slice of every bucket and adds the collectives (sums of per-example statistics,
the all-gather of directions, counters, gathering the curvature for a checkpoint). ``MBF``
always holds one of the two; a new distribution strategy is a new subclass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .linalg import FactorReport
from .store import Bucket, CurvatureStore
from .units import Unit

__all__ = ["Estimate", "LocalEngine", "Whole", "Work"]

#: ``estimate(unit, grads)``: the unit's estimate for this step (see ``CurvatureStore.absorb``).
Estimate = Callable[[Unit, list[Tensor]], Tensor]


@dataclass(eq=False)
class Work:
    """One bucket's part of a step: its ``(total, s)`` right-hand side (zero for blocks of
    units without gradients) and its units that have gradients."""

    bucket: Bucket
    rhs: Tensor
    members: list[Unit]


@dataclass(eq=False)
class Whole:
    """Every block's curvature, as one process holds it: per bucket its ``(statistics,
    inverses)``; per unit with queued estimates its whole ``(num_blocks, k, s)`` queue and the
    estimates' running-average weights."""

    buckets: dict[int, tuple[Tensor, Tensor]]
    queues: dict[int, tuple[Tensor, list[float]]]

    def of(self, bucket: Bucket, unit: Unit) -> tuple[Tensor, Tensor, Tensor | None, list[float]]:
        """The unit's whole statistics, inverses, queue (``None`` if empty) and its weights."""
        fisher, inverse = self.buckets[id(bucket)]
        view = slice(unit.offset, unit.offset + unit.curvature_blocks)
        queued, weights = self.queues.get(id(unit), (None, []))
        return fisher[view], inverse[view], queued, list(weights)


class LocalEngine:
    """One process: every block is owned here and nothing is exchanged."""

    rank = 0
    world_size = 1

    def plan(self, totals: list[int]) -> list[list[tuple[int, int]]]:
        """Every rank's ``(lo, hi)`` of every bucket: here, all of each."""
        return [[(0, total)] for total in totals]

    def check_config(self, fingerprint: dict[str, Any]) -> None:
        """Refuse a configuration the ranks disagree on (nothing to compare in one process)."""

    def update_statistics(
        self,
        store: CurvatureStore,
        due: list[tuple[Unit, list[Tensor]]],
        estimate: Estimate,
        groups: list[dict[str, Any]],
    ) -> set[int]:
        """Blend this step's estimates of the ``due`` units into the owned statistics; the
        ``id``s of the units updated."""
        self.reduce_pending(store, [u for u, _ in due if u.per_example])
        reduced = self.reduce_estimates(due, estimate)
        for unit, grads in due:  # one estimate at a time: none is kept longer than its blend
            blocks = reduced.pop(id(unit), None)
            store.absorb(unit, estimate(unit, grads) if blocks is None else blocks,
                         groups[unit.group])
        return {id(u) for u, _ in due}

    def reduce_estimates(
        self, due: list[tuple[Unit, list[Tensor]]], estimate: Estimate
    ) -> dict[int, Tensor]:
        """The estimates (by unit ``id``) that must be summed over the ranks before they are
        blended, summed: those whose rank holds only some of a block's rows (FSDP2's tied
        rows). None in one process or under DDP."""
        return {}

    def reduce_pending(self, store: CurvatureStore, units: list[Unit]) -> None:
        """Turn the units' per-example sums into those of the owned blocks over all ranks."""

    def precondition(
        self, store: CurvatureStore, work: list[Work], refreshed: set[int], step: int,
        groups: list[dict[str, Any]],
    ) -> list[Tensor]:
        """Factor the buckets that are due, solve the owned blocks, and return every bucket's
        whole ``(total, s)`` solved right-hand side, in ``work``'s order."""
        report, factorizations, solved = FactorReport(), 0, []
        for item in work:
            bucket, group = item.bucket, groups[item.bucket.group]
            if store.factor_due(bucket, item.members, refreshed, step, group):
                report.add(self.counted(bucket, store.factor(bucket, group)))
                factorizations += 1
            solved.append(store.solve(bucket, item.rhs[bucket.lo : bucket.hi]))
        self.count(store, report, factorizations)
        return self.exchange(work, solved)

    def counted(self, bucket: Bucket, report: FactorReport) -> FactorReport:
        """The part of a bucket's factorization report this rank counts (all of it)."""
        return report

    def count(self, store: CurvatureStore, report: FactorReport, factorizations: int) -> None:
        """Add a step's factorization report to the counters (summed over ranks first)."""
        store.count(report, factorizations)

    def exchange(self, work: list[Work], solved: list[Tensor]) -> list[Tensor]:
        """Every bucket's whole solved blocks from this rank's owned ones."""
        return solved

    def whole_curvature(self, store: CurvatureStore) -> Whole:
        """Every block's statistics, inverses and queued estimates: views of the store's tensors
        here, a gathered copy with several ranks (every rank must call it then)."""
        queues = {
            id(u): (u.queue[:, : len(u.queue_weights)], list(u.queue_weights))
            for u in store.units
            if u.queue is not None and u.queue_weights
        }
        return Whole({id(b): (b.fisher, b.inverse) for b in store.buckets}, queues)

    def consolidate(self, store: CurvatureStore) -> None:
        """Gather every rank's curvature for :meth:`consolidated` (nothing to gather here)."""

    def consolidated(self, store: CurvatureStore) -> Whole:
        """The whole curvature for a checkpoint: here at once; with several ranks the copy
        :meth:`consolidate` made, or an error when there is none for the current state."""
        return self.whole_curvature(store)

    def invalidate(self) -> None:
        """The state changed (a step, a load): a consolidated copy is stale."""
