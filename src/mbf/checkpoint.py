"""The curvature part of MBF's state dict: its schema, its versions and their migrations.

``MBF.state_dict()["mbf"]`` holds the step count, the counters and one record per unit (its
whole statistics and inverses in the saving storage's form, the queued estimates, the running
average's bookkeeping). Records carry the unit's name and are matched by name on load, so a
mismatch names the unit. Every change of the schema bumps :data:`VERSION` and adds one entry to
:data:`MIGRATIONS`, which brings an older record up to date; loading never guesses.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import Tensor

from .store import Kept
from .units import Unit

__all__ = ["MIGRATIONS", "VERSION", "kept", "migrate", "record", "saved_units"]

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
        "num_blocks": unit.layout.num_blocks,
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
    return [kept(r) for r in ordered]


def kept(record: dict[str, Any]) -> Kept:
    """A (migrated) unit record as the store restores it."""
    return Kept(
        fisher=record["fisher"],
        inverse=record["inverse"],
        stat_updates=int(record["stat_updates"]),
        stat_mass=float(record["stat_mass"]),
        inverse_scale=float(record["inverse_scale"]),
        queued=record["queued"],
        queued_weights=[float(w) for w in record["queued_weights"]],
    )
