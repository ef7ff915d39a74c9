"""The curvature part of MBF's state dict: its schema, its versions and their migrations.

``MBF.state_dict()["mbf"]`` holds the step count, the counters and one record per unit (its
whole statistics and inverses in the saving storage's form, the queued estimates, the running
average's bookkeeping). Records carry the unit's name and are matched by name on load, so a
mismatch names the unit. A per-rank file (``MBF.sharded_state_dict()``) has the same schema with
only the blocks that rank owns (``"blocks": [start, stop)`` per record, ``"shard"``: the rank and
the number of ranks); :func:`join_shards` makes one entry of every rank's, whose records list
their ``"pieces"``, and each rank then copies only the blocks it owns out of them. Every change
of the schema bumps :data:`VERSION` and adds one entry to :data:`MIGRATIONS`, which brings an
older record up to date; loading never guesses.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .store import Kept
from .units import Unit

__all__ = [
    "MIGRATIONS",
    "VERSION",
    "join_shards",
    "kept",
    "migrate",
    "record",
    "saved_units",
    "shard_record",
]

#: The schema written by this version of mbf.
VERSION = 3


def _v1_to_v2(extra: dict[str, Any]) -> dict[str, Any]:
    """Version 2 added queued statistics (``stat_buffer``) and the storage's name."""
    extra.setdefault("storage", "full")
    for unit in extra["units"]:
        unit.setdefault("queued", None)
        unit.setdefault("queued_weights", [])
    return extra


def _v2_to_v3(extra: dict[str, Any]) -> dict[str, Any]:
    """Version 3 added the running average's total weight and the inverse's scale (bias
    correction); before it the first estimate was taken as it is: weight 1 once updated."""
    for unit in extra["units"]:
        unit.setdefault("stat_mass", 1.0 if int(unit["stat_updates"]) else 0.0)
        unit.setdefault("inverse_scale", 1.0)
    return extra


#: ``MIGRATIONS[v]`` turns a version ``v`` record into a version ``v + 1`` one.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2, 2: _v2_to_v3}


def migrate(extra: dict[str, Any]) -> dict[str, Any]:
    """A copy of a saved ``"mbf"`` entry brought to :data:`VERSION` (tensors are shared)."""
    version = extra.get("version", 1)
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"MBF: the state dict's curvature has an invalid version {version!r}")
    if version > VERSION:
        raise ValueError(
            f"MBF: the state dict was saved by a newer mbf (curvature version {version}; this "
            f"one reads versions 1 to {VERSION}); upgrade mbf to load it"
        )
    extra = dict(extra, units=[dict(u) for u in extra.get("units", [])])
    extra = {k: (v if isinstance(v, Tensor) else copy.copy(v)) for k, v in extra.items()}
    while version < VERSION:
        extra = MIGRATIONS[version](extra)
        version += 1
    extra["version"] = VERSION
    return extra


def record(
    unit: Unit, fisher: Tensor, inverse: Tensor, queued: Tensor | None, weights: list[float]
) -> dict[str, Any]:
    """One unit's record: its whole ``fisher``, ``inverse``, queued estimates and their
    running-average weights (see ``mbf.engine.Whole.of``)."""
    return {
        "name": unit.name,
        "num_blocks": unit.curvature_blocks,
        "block_size": unit.layout.block_size,
        "fisher": fisher,
        "inverse": inverse,
        "stat_updates": unit.stat_updates,
        "stat_mass": unit.stat_mass,
        "inverse_scale": unit.inverse_scale,
        "queued": queued,
        "queued_weights": list(weights) if queued is not None else [],
    }


def saved_units(extra: dict[str, Any], units: list[Unit]) -> list[Kept]:
    """The migrated records of ``extra`` for ``units``, in their order, matched by name.

    Raises ``ValueError`` naming the first unit that has no record, or the first record that
    has no unit. (Models whose unit names repeat are matched by position.)
    """
    records = extra["units"]
    names = [u.name for u in units]
    saved_names = [r.get("name") for r in records]
    if len(set(names)) == len(names) and len(set(saved_names)) == len(saved_names):
        by_name = {r["name"]: r for r in records}
        for name in names:
            if name not in by_name:
                raise ValueError(
                    f"MBF: unit {name} of this optimizer is not in the state dict (it holds "
                    f"{len(records)} units: {', '.join(map(str, saved_names[:4]))}"
                    f"{' ...' if len(records) > 4 else ''}); was it saved for another model or "
                    "param grouping?"
                )
        extra_names = [n for n in saved_names if n not in set(names)]
        if extra_names:
            raise ValueError(
                f"MBF: the state dict holds unit {extra_names[0]}, which this optimizer does "
                "not have; was it saved for another model or param grouping?"
            )
        ordered = [by_name[n] for n in names]
    elif len(records) != len(units):
        raise ValueError(
            f"MBF: the state dict has {len(records)} units, this optimizer {len(units)}: was it "
            "saved for another model or param grouping?"
        )
    else:
        ordered = list(records)
    return [kept(r, u.own) for r, u in zip(ordered, units, strict=True)]


def kept(record: dict[str, Any], blocks: tuple[int, int] | None = None) -> Kept:
    """A (migrated) unit record as the store restores it. From joined per-rank files, only
    ``blocks`` ``[start, stop)`` of it are copied out of the pieces (every block if ``None``)."""
    pieces = record.get("pieces")
    if pieces is None:
        fisher, inverse, queued = record["fisher"], record["inverse"], record["queued"]
        first, total = 0, None
    else:
        total = int(record["num_blocks"])
        first, stop = blocks if blocks is not None else (0, total)
        fisher, inverse, queued = _rows(record["name"], pieces, first, stop)
    return Kept(
        fisher=fisher,
        inverse=inverse,
        stat_updates=int(record["stat_updates"]),
        stat_mass=float(record["stat_mass"]),
        inverse_scale=float(record["inverse_scale"]),
        queued=queued,
        queued_weights=[float(w) for w in record["queued_weights"]],
        first_block=first,
        num_blocks=total,
    )


def shard_record(
    unit: Unit, fisher: Tensor, inverse: Tensor, queued: Tensor | None, weights: list[float]
) -> dict[str, Any]:
    """One unit's record in a per-rank file: the blocks ``unit.own`` of this rank only."""
    return dict(record(unit, fisher, inverse, queued, weights), blocks=list(unit.own))


def join_shards(extras: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """One ``"mbf"`` entry from every rank's per-rank entry (migrated; any order), whose unit
    records list the ranks' ``pieces``. Raises ``ValueError`` naming what does not fit: a file
    that is not a per-rank one, a rank missing or given twice, files of different steps, a
    unit whose blocks the files do not cover exactly once."""
    if not extras:
        raise ValueError("MBF: no per-rank state dicts given (pass every rank's, in any order)")
    joined = []
    for i, extra in enumerate(extras):
        if extra is None:
            raise ValueError(f"MBF: per-rank state dict {i} holds no MBF curvature")
        extra = migrate(extra)
        if "shard" not in extra:
            raise ValueError(
                f"MBF: state dict {i} holds the whole curvature, not one rank's share; load it "
                "with load_state_dict"
            )
        joined.append(extra)
    world = {int(e["shard"]["world_size"]) for e in joined}
    ranks = sorted(int(e["shard"]["rank"]) for e in joined)
    if len(world) != 1 or ranks != list(range(len(joined))) or world != {len(joined)}:
        raise ValueError(
            f"MBF: the per-rank state dicts are of ranks {ranks} of {sorted(world)} ranks; "
            "pass every rank's file of one checkpoint, each once"
        )
    joined.sort(key=lambda e: int(e["shard"]["rank"]))
    first = joined[0]
    for e in joined[1:]:
        for key in ("step", "storage", "counters", "factored"):
            if e.get(key) != first.get(key):
                raise ValueError(
                    f"MBF: the per-rank state dicts of ranks 0 and {e['shard']['rank']} differ "
                    f"in {key!r} ({first.get(key)!r} vs {e.get(key)!r}): files of different "
                    "checkpoints?"
                )
        if len(e["units"]) != len(first["units"]):
            raise ValueError(
                f"MBF: the per-rank state dicts of ranks 0 and {e['shard']['rank']} hold "
                f"{len(first['units'])} and {len(e['units'])} units: files of different models?"
            )
    units = []
    for position, records in enumerate(zip(*(e["units"] for e in joined), strict=True)):
        units.append(_join_unit(position, records))
    out = {k: v for k, v in first.items() if k not in ("shard", "units")}
    out["units"] = units
    return out


_SHARED = ("name", "num_blocks", "block_size", "stat_updates", "stat_mass", "inverse_scale",
           "queued_weights")


def _join_unit(position: int, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One unit's record from the ranks' records of it: the shared fields, checked equal, and
    the pieces sorted by their first block, checked to cover every block once."""
    # Ranks that hold no block of the unit (FSDP2 ranks past its last row) know nothing of its
    # statistics' bookkeeping: only the ranks holding blocks must agree on it.
    holding = [(rank, r) for rank, r in enumerate(records) if _held(r)] or [(0, records[0])]
    first, head = holding[0]
    name = head.get("name", f"#{position}")
    for rank, r in enumerate(records):
        keys = _SHARED if _held(r) else ("name", "num_blocks", "block_size")
        for key in keys:
            if r.get(key) != head.get(key):
                raise ValueError(
                    f"MBF: unit {name}: ranks {first} and {rank} saved different {key!r} "
                    f"({head.get(key)!r} vs {r.get(key)!r}): files of different checkpoints?"
                )
    pieces = sorted(
        ((int(r["blocks"][0]), int(r["blocks"][1]), r["fisher"], r["inverse"], r["queued"])
         for r in records),
        key=lambda piece: piece[:2],
    )
    covered = 0
    for start, stop, fisher, _, _ in pieces:
        if start > covered or (stop > start and start < covered) or stop - start != len(fisher):
            raise ValueError(
                f"MBF: unit {name}: the per-rank state dicts do not hold its blocks once each "
                f"(a piece of blocks {start}-{stop - 1} after block {covered - 1})"
            )
        covered = max(covered, stop)
    if covered != int(head["num_blocks"]):
        raise ValueError(
            f"MBF: unit {name}: the per-rank state dicts hold blocks 0-{covered - 1} of "
            f"{head['num_blocks']}"
        )
    return {**{k: head[k] for k in head if k not in ("fisher", "inverse", "queued", "blocks")},
            "pieces": [p for p in pieces if p[1] > p[0]] or pieces[:1]}


def _held(record: dict[str, Any]) -> bool:
    """Whether a per-rank record holds blocks of its unit."""
    start, stop = record.get("blocks", (0, 1))
    return int(stop) > int(start)


def _rows(
    name: str, pieces: Sequence[tuple[int, int, Tensor, Tensor, Tensor | None]],
    start: int, stop: int,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Blocks ``[start, stop)`` of a unit out of its pieces (views when one piece holds them)."""
    cuts = [
        (slice(max(start, a) - a, min(stop, b) - a), f, i, q)
        for a, b, f, i, q in pieces
        if a < stop and start < b
    ]
    if not cuts:  # no block of this unit here: an empty slice of the right shape
        _, _, f, i, q = pieces[0]
        cuts = [(slice(0, 0), f, i, q)]
    parts = [(f[cut], i[cut], None if q is None else q[cut]) for cut, f, i, q in cuts]
    if len(parts) == 1:
        return parts[0]
    queued = [q for _, _, q in parts if q is not None]
    if queued and len(queued) != len(parts):
        raise ValueError(f"MBF: unit {name}: some ranks saved queued estimates, others none")
    return (
        torch.cat([f for f, _, _ in parts]),
        torch.cat([i for _, i, _ in parts]),
        torch.cat(queued) if queued else None,
    )
