"""Rules per layer type: how a module's own parameters become units, and their statistics.

One [`LayerRule`][mbf.LayerRule] per module type says

- which units the module's own parameters form (their tensors and block layout),
- optionally, how to compute the per-example statistics of those units from the module's input
  and output gradient (the ``estimator="per_example"`` path; without it the units use the batch
  estimator),
- optionally, which of its submodules the module applies functionally (their forward hooks never
  fire, so their units use the batch estimator: ``nn.MultiheadAttention.out_proj``).

Rules are looked up along the module's method resolution order, so a subclass of ``nn.Linear``
gets the Linear rule unless it has a rule of its own. Built in: ``nn.Linear``, ``nn.Conv1d/2d/3d``,
the affine norms (BatchNorm*, InstanceNorm*, LayerNorm, GroupNorm), ``nn.Embedding`` /
``nn.EmbeddingBag`` and ``nn.MultiheadAttention``. Parameters no rule claims are cut by their
shape ([`shape_layout`][mbf.blocks.shape_layout]). Users add rules with
[`register_layer`][mbf.register_layer].
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ._compat import NORM_BASES
from .blocks import BlockLayout, conv_layout, embedding_layout, linear_layout, norm_layout
from .blocks import shape_layout as _shape_layout
from .curvature import (
    CONV_TYPES,
    Workspace,
    conv_block_stats,
    embedding_block_stats,
    layer_norm_block_stats,
    linear_block_stats,
)

__all__ = [
    "LayerRegistration",
    "LayerRule",
    "ModuleParams",
    "StatsContext",
    "UnitSpec",
    "register_layer",
    "rule_for",
]


@dataclass(frozen=True, eq=False)
class UnitSpec:
    """One unit that a rule cuts from its module's own parameters.

    Attributes:
        params: the unit's tensors, in the order of ``layout.shapes``: parameters of the module
            (normally its own), stepped by the optimizer, all in one param group.
        layout: how the tensors form mini-blocks (built with the functions of
            [`mbf.blocks`][mbf.blocks], e.g. [`row_layout`][mbf.blocks.row_layout]).
        suffix: appended to the module's label to name the unit (``".bias"`` for a conv bias).
    """

    params: tuple[Tensor, ...]
    layout: BlockLayout
    suffix: str = ""


class ModuleParams:
    """What the optimizer steps of one module's parameters, and in which param group.

    A rule calls it to decide which units to form: a unit may only hold tensors the optimizer
    steps, all from one param group (whose ``max_block_size`` then applies).
    """

    def __init__(self, group_of: dict[int, int], max_block_size: dict[int, int]) -> None:
        self._group_of = group_of
        self._max_block_size = max_block_size

    def group(self, *tensors: Tensor | None) -> int | None:
        """The param group that holds all ``tensors``; ``None`` when one of them is ``None``, is
        not stepped by the optimizer (or is empty), or they sit in different groups."""
        groups = {
            self._group_of.get(id(t)) if isinstance(t, Tensor) else None for t in tensors
        }
        if len(groups) != 1:
            return None
        return groups.pop()

    def max_block_size(self, tensor: Tensor) -> int:
        """The ``max_block_size`` of the param group that holds ``tensor``."""
        g = self.group(tensor)
        if g is None:
            raise ValueError("MBF: max_block_size asked for a tensor the optimizer does not step")
        return self._max_block_size[g]


@dataclass(frozen=True)
class StatsContext:
    """What a per-example statistics function may use besides the module's tensors.

    Attributes:
        chunk_elements: bound on the per-example gradient entries to hold at once (MBF's
            ``chunk_elements``); process the batch in slices that respect it.
        workspace: scratch memory reused across calls (``workspace.get(name, shape, like)``).
        tied: per layout, how many rows share each block (MBF's ``tie_rows``: the layout's
            ``row_sharing``; 1 or absent: none). For a tied layout a rule may return the
            shared blocks' sums, ``(tied_blocks, s, s)``, summed over the sharing rows as well,
            instead of every row's ``(num_blocks, s, s)`` (which MBF then sums itself): the
            built-in Linear and convolution rules do, so that a tied layer never holds every
            row's blocks.
    """

    chunk_elements: int
    workspace: Workspace
    tied: tuple[int, ...] = ()

    def tied_rows(self, index: int) -> int:
        """Rows sharing each block of layout ``index`` (1: untied)."""
        return self.tied[index] if index < len(self.tied) else 1


UnitsFn = Callable[[nn.Module, ModuleParams], Sequence[UnitSpec]]
StatsFn = Callable[
    [nn.Module, Sequence[BlockLayout], Tensor, Tensor, StatsContext], Sequence[Tensor]
]


@dataclass(frozen=True)
class LayerRule:
    """How MBF treats one module type.

    Attributes:
        units: ``units(module, params)`` returns the [`UnitSpec`][mbf.UnitSpec]s of the module's
            own parameters (none when the rule does not apply, e.g. a norm layer without affine
            parameters); ``params`` is a [`ModuleParams`][mbf.layers.ModuleParams].
        block_stats: ``block_stats(module, layouts, inputs, grad_outputs, context)`` returns, for
            each of the module's units (``layouts`` in the order ``units`` gave them), the
            ``(num_blocks, block_size, block_size)`` sum over examples ``i`` of
            ``blocks(G_i) blocks(G_i)^T``, where ``G_i`` is example ``i``'s part of the gradient
            that autograd computes from ``grad_outputs`` (the gradient of the module's output).
            ``inputs`` is the module's first positional input, batch first, detached and cast to
            the statistics dtype. Scaling by the loss reduction is MBF's job. ``None``: the
            module's units use the batch estimator.
        applied_functionally: ``applied_functionally(module)`` lists submodules whose parameters
            the module uses without calling them (their hooks never fire, so their units use
            the batch estimator).
    """

    units: UnitsFn
    block_stats: StatsFn | None = None
    applied_functionally: Callable[[nn.Module], Iterable[nn.Module]] | None = None

    @property
    def per_example(self) -> bool:
        """Whether the rule computes per-example statistics."""
        return self.block_stats is not None


_RULES: dict[type[nn.Module], LayerRule] = {}


def rule_for(module_type: type[nn.Module]) -> LayerRule | None:
    """The rule of ``module_type`` or of its nearest registered base class (``None``: none)."""
    for cls in module_type.__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            return rule
    return None


def _check_callable(module_type: type, field: str, fn: Any, arity: int, args: str) -> None:
    where = f"LayerRule.{field} for {module_type.__name__}"
    if not callable(fn):
        raise TypeError(f"MBF: {where} must be callable, got {fn!r}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: trust it
        return
    try:
        signature.bind(*([None] * arity))
    except TypeError as err:
        raise TypeError(f"MBF: {where} ({fn!r}) must accept {args}: {err}") from None


def _check_rule(module_type: Any, rule: Any) -> None:
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"MBF: register_layer needs an nn.Module subclass, got {module_type!r}")
    if not isinstance(rule, LayerRule):
        raise TypeError(
            f"MBF: register_layer({module_type.__name__}, ...) needs a mbf.LayerRule, "
            f"got {type(rule).__name__}"
        )
    _check_callable(module_type, "units", rule.units, 2, "(module, params)")
    if rule.block_stats is not None:
        args = "(module, layouts, inputs, grad_outputs, context)"
        _check_callable(module_type, "block_stats", rule.block_stats, 5, args)
    if rule.applied_functionally is not None:
        fn = rule.applied_functionally
        _check_callable(module_type, "applied_functionally", fn, 1, "(module)")


class LayerRegistration:
    """The handle [`register_layer`][mbf.register_layer] returns: ``remove()`` undoes it.

    Also a context manager, so a registration can be scoped (``with mbf.register_layer(...):``);
    removing restores the rule it replaced, if any. Remove handles in the reverse order of
    registration; a handle whose rule was since replaced by another registration does nothing.
    """

    def __init__(self, module_type: type[nn.Module], rule: LayerRule, previous: LayerRule | None):
        self.module_type = module_type
        """The registered module type."""
        self.rule = rule
        """The registered rule."""
        self._previous = previous

    def remove(self) -> None:
        """Unregister the rule (restoring the one it replaced); a second call does nothing."""
        if _RULES.get(self.module_type) is not self.rule:
            return
        if self._previous is None:
            del _RULES[self.module_type]
        else:
            _RULES[self.module_type] = self._previous

    def __enter__(self) -> LayerRegistration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def register_layer(
    module_type: type[nn.Module], rule: LayerRule, *, replace: bool = False
) -> LayerRegistration:
    """Tell MBF how to cut a module type's parameters into mini-blocks (and, optionally, how to
    compute their per-example statistics).

    The rule applies to ``module_type`` and its subclasses without a rule of their own. It is
    read when an ``MBF`` builds its units (at construction, and again at ``add_param_group``), so
    keep it registered while optimizers that use it may add param groups. See the example in
    [Layer types](layers.md) (docs/layers.md).

    Args:
        module_type: an ``nn.Module`` subclass.
        rule: its [`LayerRule`][mbf.LayerRule].
        replace: needed to replace a rule registered for exactly this type (a built-in one or
            your own): a silent replacement would hide two libraries fighting over one type.

    Returns:
        A handle whose ``remove()`` (or the end of a ``with`` block) unregisters the rule.

    Raises:
        TypeError: ``module_type`` is not an ``nn.Module`` subclass, ``rule`` not a
            ``LayerRule``, or one of its functions cannot take the documented arguments.
        ValueError: ``module_type`` has a rule already and ``replace`` is false.
    """
    _check_rule(module_type, rule)
    previous = _RULES.get(module_type)
    if previous is not None and not replace:
        raise ValueError(
            f"MBF: {module_type.__module__}.{module_type.__qualname__} has a layer rule already; "
            "pass replace=True to replace it"
        )
    _RULES[module_type] = rule
    return LayerRegistration(module_type, rule, previous)


# --- the built-in rules ---------------------------------------------------------------------
def _weight_bias(module: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return (
        weight if isinstance(weight, Tensor) else None,
        bias if isinstance(bias, Tensor) else None,
    )


def _linear_units(module: nn.Module, params: ModuleParams) -> list[UnitSpec]:
    """Row ``W[j, :]`` with ``b[j]`` appended when the bias shares the weight's group."""
    weight, bias = _weight_bias(module)
    if weight is None or params.group(weight) is None:
        return []
    b = bias if params.group(weight, bias) is not None else None
    tensors = (weight,) if b is None else (weight, b)
    return [UnitSpec(tensors, linear_layout(weight, b, params.max_block_size(weight)))]


def _linear_stats(
    module: nn.Module,
    layouts: Sequence[BlockLayout],
    inputs: Tensor,
    grad_outputs: Tensor,
    context: StatsContext,
) -> list[Tensor]:
    (layout,) = layouts
    chunk, workspace = context.chunk_elements, context.workspace
    return [linear_block_stats(layout, inputs, grad_outputs, chunk, workspace,
                               tied=context.tied_rows(0))]


def _conv_units(module: nn.Module, params: ModuleParams) -> list[UnitSpec]:
    """One block per kernel of the weight; the bias (same group) chunked as a vector."""
    weight, bias = _weight_bias(module)
    if weight is None or params.group(weight) is None:
        return []
    mbs = params.max_block_size(weight)
    units = [UnitSpec((weight,), conv_layout(weight, mbs, int(getattr(module, "groups", 1))))]
    if bias is not None and params.group(weight, bias) is not None:
        units.append(UnitSpec((bias,), _shape_layout(bias, mbs), ".bias"))
    return units


def _conv_stats(
    module: nn.Module,
    layouts: Sequence[BlockLayout],
    inputs: Tensor,
    grad_outputs: Tensor,
    context: StatsContext,
) -> list[Tensor]:
    weight_layout, bias_layout = layouts[0], (layouts[1] if len(layouts) > 1 else None)
    w, b = conv_block_stats(
        module,
        weight_layout,
        bias_layout,
        inputs,
        grad_outputs,
        context.chunk_elements,
        context.workspace,
        tied=context.tied_rows(0),
    )
    return [w] if b is None else [w, b]


def _norm_units(module: nn.Module, params: ModuleParams) -> list[UnitSpec]:
    """One 2x2 block ``(gamma_c, beta_c)`` per channel, when both are stepped in one group."""
    weight, bias = _weight_bias(module)
    if weight is None or bias is None or params.group(weight, bias) is None:
        return []
    return [UnitSpec((weight, bias), norm_layout(weight, bias))]


def _embedding_units(module: nn.Module, params: ModuleParams) -> list[UnitSpec]:
    """One block per embedding row."""
    weight, _ = _weight_bias(module)
    if weight is None or weight.dim() != 2 or params.group(weight) is None:
        return []
    return [UnitSpec((weight,), embedding_layout(weight, params.max_block_size(weight)))]


@dataclass(frozen=True)
class _ModuleStats:
    """The stats rule of a one-unit layer whose statistics need the module, the unit's layout,
    the layer's inputs and output gradients and the chunk size (embeddings, LayerNorm). A class
    rather than a closure, so that the rules, and an ``MBF`` holding them, pickle."""

    block_stats: Callable[[nn.Module, BlockLayout, Tensor, Tensor, int], Tensor]

    def __call__(
        self,
        module: nn.Module,
        layouts: Sequence[BlockLayout],
        inputs: Tensor,
        grad_outputs: Tensor,
        context: StatsContext,
    ) -> list[Tensor]:
        (layout,) = layouts
        return [self.block_stats(module, layout, inputs, grad_outputs, context.chunk_elements)]


def _no_units(module: nn.Module, params: ModuleParams) -> list[UnitSpec]:
    return []


def _out_proj(module: nn.Module) -> list[nn.Module]:
    """``nn.MultiheadAttention`` calls ``F.multi_head_attention_forward`` with ``out_proj``'s
    weight and bias: ``out_proj``'s own forward (and hooks) never run."""
    out_proj = getattr(module, "out_proj", None)
    return [out_proj] if isinstance(out_proj, nn.Module) else []


_LINEAR = LayerRule(_linear_units, _linear_stats)
_CONV = LayerRule(_conv_units, _conv_stats)
_NORM = LayerRule(_norm_units)  # batch norms: an example's output depends on the others
_LAYER_NORM = LayerRule(_norm_units, _ModuleStats(layer_norm_block_stats))
_EMBEDDING = LayerRule(_embedding_units, _ModuleStats(embedding_block_stats))
_EMBEDDING_BAG = LayerRule(_embedding_units)  # bags (offsets, mean/max modes): batch estimator
# Its own in_proj tensors are cut by shape, as any parameter without a rule.
_ATTENTION = LayerRule(_no_units, applied_functionally=_out_proj)

BUILTIN_RULES: dict[type[nn.Module], LayerRule] = {
    nn.Linear: _LINEAR,
    **{t: _CONV for t in CONV_TYPES},
    **{t: _NORM for t in (*NORM_BASES, nn.GroupNorm)},
    nn.LayerNorm: _LAYER_NORM,
    nn.Embedding: _EMBEDDING,
    nn.EmbeddingBag: _EMBEDDING_BAG,
    nn.MultiheadAttention: _ATTENTION,
}
"""The rules every process starts with."""

_RULES.update(BUILTIN_RULES)
