"""Units: the parameters that share one block layout, and how a model is cut into them.

A unit is what one rule of the partition covers: a Linear weight with its bias, a conv weight, a
conv bias, a norm layer's affine pair, an embedding table, or any other tensor. Units are the
granularity of curvature state, per-example hooks, and the memory report. Which module type
forms which units is the layer registry's business (:mod:`mbf.layers`); this module applies it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .blocks import BlockLayout, shape_layout
from .layers import ModuleParams, UnitSpec, rule_for

__all__ = ["Unit", "build_units", "state_dtype"]


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Curvature and momentum are kept in at least float32, whatever the parameter dtype."""
    return torch.promote_types(dtype, torch.float32)


@dataclass(eq=False)
class Unit:
    """One unit's parameters, layout and (once allocated) curvature views."""

    name: str
    params: list[Tensor]
    layout: BlockLayout
    group: int
    module: nn.Module | None = None
    per_example: bool = False
    # Rows that share each block (MBF's ``tie_rows``, ``mbf.tied``): the layout's
    # ``row_sharing`` when the unit's group ties rows, else 1 (a block per row and chunk).
    tied: int = 1
    # FSDP2 (mbf.fsdp): the whole unit's ``tied`` when this unit holds one rank's part of the
    # sharing rows (its shared blocks are means over all of them); 0 when it holds them all.
    tied_whole: int = 0
    # Curvature (mbf.store): views of this rank's blocks of the unit in its bucket's tensors.
    fisher: Tensor = field(default_factory=lambda: torch.empty(0))
    inverse: Tensor = field(default_factory=lambda: torch.empty(0))
    offset: int = 0  # the unit's first block in its bucket
    own: tuple[int, int] = (0, 0)  # the unit's blocks [a, b) this rank owns (all in one process)
    stat_updates: int = 0
    # Total running-average weight in ``fisher``: 1 once the first estimate is taken as it is,
    # ``1 - stat_decay^n`` with bias correction; statistics are ``fisher / stat_mass``.
    stat_mass: float = 0.0
    # ``stat_mass`` when ``inverse`` was factored: the inverse of the corrected statistics is
    # ``inverse_scale * inverse`` (``inverse`` holds ``(fisher + stat_mass damping I)^-1``).
    inverse_scale: float = 1.0
    collect: bool = False
    pending: Tensor | None = None
    pending_count: int = 0  # rows seen by the hooks since the last step (a row per call)
    pending_examples: int = 0  # examples since the last step (one count per backward pass)
    # Batch estimator: this step's and earlier gradients' blocks not yet folded into ``fisher``,
    # ``(owned blocks, queue_capacity, block_size)``, with the running-average weight of each.
    queue_capacity: int = 0
    queue: Tensor | None = None
    queue_weights: list[float] = field(default_factory=list)

    @property
    def dtype(self) -> torch.dtype:
        return state_dtype(self.params[0].dtype)

    @property
    def curvature_blocks(self) -> int:
        """Blocks of statistics and inverses: the layout's ``num_blocks``, or its
        ``tied_blocks`` when rows are tied."""
        return self.layout.num_blocks // self.tied

    @property
    def tied_divisor(self) -> int:
        """How many rows each shared block is the mean over: every sharing row of the whole
        unit, on whichever rank it lives."""
        return self.tied_whole or self.tied

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def clear_pending(self) -> None:
        self.pending = None
        self.pending_count = 0
        self.pending_examples = 0


def _unwrap(model: nn.Module) -> nn.Module:
    """Look through DistributedDataParallel and similar wrappers that hold ``.module``."""
    inner = getattr(model, "module", None)
    if isinstance(model, nn.parallel.DistributedDataParallel) and isinstance(inner, nn.Module):
        return inner
    return model


def _type_name(module: nn.Module) -> str:
    """The module's class name; for a module FSDP2's ``fully_shard`` has wrapped (its class
    becomes ``FSDP<Name>``), the original class's, so that units are named alike with and
    without FSDP2 (checkpoints match units by name)."""
    cls: type = type(module)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return cls.__name__
    if isinstance(module, FSDPModule):
        cls = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    return cls.__name__


def _module_units(
    name: str, module: nn.Module, params: ModuleParams, per_example: bool
) -> list[Unit]:
    """Units of one module's own parameters, by the module type's rule (``mbf.layers``)."""
    rule = rule_for(type(module))
    if rule is None:
        return []
    label = f"{name or '<root>'} ({_type_name(module)})"
    served = per_example and rule.per_example
    units = []
    for spec in rule.units(module, params):
        g = _check_spec(spec, module, params, label)
        units.append(Unit(label + spec.suffix, list(spec.params), spec.layout, g, module, served))
    return units


def _check_spec(spec: object, module: nn.Module, params: ModuleParams, label: str) -> int:
    """The unit's param group; a clear error when a rule's unit is not one MBF can hold."""
    culprit = f"MBF: the layer rule for {type(module).__name__} (mbf.register_layer) gave {label}"
    if not isinstance(spec, UnitSpec):
        raise TypeError(f"{culprit} a {type(spec).__name__}, not a mbf.UnitSpec")
    # Its own parameters, or (as a parent whose property exposes a child's tensor) its children's.
    own = {id(p) for p in module.parameters()}
    if not spec.params or any(id(p) not in own for p in spec.params):
        raise ValueError(f"{culprit}{spec.suffix} tensors that are not the module's parameters")
    g = params.group(*spec.params)
    if g is None:
        raise ValueError(
            f"{culprit}{spec.suffix} parameters the optimizer does not step, or ones from "
            "different param groups"
        )
    shapes = [tuple(p.shape) for p in spec.params]
    if shapes != [tuple(s) for s in spec.layout.shapes]:
        raise ValueError(
            f"{culprit}{spec.suffix} a layout for shapes {[tuple(s) for s in spec.layout.shapes]}"
            f" but parameters of shapes {shapes}"
        )
    return g


def _functional_children(model: nn.Module) -> set[nn.Module]:
    """Modules their parent applies functionally (``F.linear(x, m.weight, m.bias)``), so a
    forward hook never sees them: ``nn.MultiheadAttention.out_proj`` (the rules'
    ``applied_functionally``). Their units use the batch estimator (the optimizer also falls
    back for any other unit whose hooks never ran)."""
    found: set[nn.Module] = set()
    for module in model.modules():
        rule = rule_for(type(module))
        if rule is not None and rule.applied_functionally is not None:
            found.update(rule.applied_functionally(module))
    return found


def _sharing_modules(model: nn.Module) -> set[nn.Module]:
    """Modules with a parameter that another module holds too (tied weights): the hooks of one
    module would see only its own share of the gradient, so their units use the batch
    estimator."""
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)
    return {m for mods in owners.values() if len(mods) > 1 for m in mods}


def build_units(
    groups: list[dict],
    model: nn.Module | None,
    per_example: bool,
) -> list[Unit]:
    """Cut the optimizer's parameters into units.

    With a model, each module whose type has a rule in the layer registry (:mod:`mbf.layers`:
    Linear, ConvNd, affine norms, Embedding, and the user's own) forms units of its own
    parameters (a unit spans parameters of one module only when they share a param group);
    every other parameter is cut by its shape (:func:`mbf.blocks.shape_layout`). Units of
    groups with ``tie_rows`` share blocks between the rows their layout declares alike
    (:mod:`mbf.tied`). Empty
    parameters (a zero in their shape) belong to no unit: there is nothing to precondition, and
    the optimizer leaves them alone.
    """
    group_of: dict[int, int] = {}
    for g, group in enumerate(groups):
        for p in group["params"]:
            if p.numel() > 0:  # an empty tensor has nothing to precondition: no unit
                group_of.setdefault(id(p), g)
    max_block_size = {g: int(group["max_block_size"]) for g, group in enumerate(groups)}
    owned = ModuleParams(group_of, max_block_size)
    units: list[Unit] = []
    claimed: set[int] = set()
    param_names: dict[int, str] = {}
    if model is not None:
        model = _unwrap(model)
        for pname, p in model.named_parameters():
            param_names.setdefault(id(p), pname)
        unhooked = _functional_children(model) | _sharing_modules(model)
        for mname, module in model.named_modules():
            served = per_example and module not in unhooked
            mine = _module_units(mname, module, owned, served)
            kept = []
            for unit in mine:
                if any(id(p) in claimed for p in unit.params):
                    continue  # a parameter shared between modules is claimed once
                claimed.update(id(p) for p in unit.params)
                kept.append(unit)
            for unit in kept:  # a rule's statistics cover all of its module's units or none
                unit.per_example = unit.per_example and len(kept) == len(mine)
            units += kept
    for g, group in enumerate(groups):
        for i, p in enumerate(group["params"]):
            if id(p) in claimed or id(p) not in group_of:
                continue
            claimed.add(id(p))
            name = param_names.get(id(p), f"group{g}.param{i}")
            units.append(Unit(name, [p], shape_layout(p, max_block_size[g]), g))
    for unit in units:
        if groups[unit.group].get("tie_rows"):
            unit.tied = unit.layout.row_sharing
    return units
