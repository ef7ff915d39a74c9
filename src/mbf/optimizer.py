"""The MBF optimizer: mini-block empirical Fisher preconditioning as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import amp as _amp
from . import checkpoint, fsdp
from .blocks import BlockLayout
from .diagnostics import Diagnostics
from .direction import Moments, advance_moments, finish, form_vector, kl_term
from .distributed import ShardedEngine, fingerprint, make_engine
from .engine import Work
from .fsdp import FSDPEngine, find_mesh_group
from .hooks import PerExampleHooks
from .linalg import FactorReport
from .output_side import OutputSide, output_side
from .storage import storage_named
from .store import CurvatureStore, Kept, early_refresh_due, factor_now
from .tied import by_shared_block, from_shared_blocks
from .units import Unit, build_units, state_dtype
from .validation import (
    ESTIMATORS,
    GRAFTS,
    NONFINITE_POLICIES,
    REDUCTIONS,
    check_choice,
    check_curvature_dtype,
    check_group,
    check_params,
    positive_int,
)

__all__ = ["DEFAULTS", "GRAFTS", "MBF", "PAPER", "UnitState"]


DEFAULTS: dict[str, Any] = {
    "lr": 3e-3,
    "momentum": 0.9,
    "damping": 1e-2,
    "stat_decay": 0.9,
    "stat_every": 1,
    "inv_every": 20,
    "max_block_size": 32,
    "weight_decay": 0.0,
    "decoupled_weight_decay": False,
    "kl_clip": None,
    "graft": "adam",
    "graft_beta2": 0.999,
    "graft_eps": 1e-8,
    "bias_correction": True,
    "early_refresh": True,
    "relative_damping": True,
    "inverse_root": 1,
    "tie_rows": True,
    "two_sided": False,
}
"""The library's default hyperparameters: MBF's mini-block directions at Adam's per-block step
lengths (``graft="adam"``, so ``lr`` means what it means for Adam), bias-corrected statistics,
early inverse refreshes, damping relative to each block's scale, and the blocks of a layer's
rows tied (``tie_rows``: one block per column chunk shared by a Linear layer's output units, by
a convolution's output channels). They were chosen by the comparison protocol of
``benchmarks/protocol.py``; ``tie_rows`` with ``stat_decay`` 0.9 (since 2026-12-08; untied with
0.99 the day before) by validation screens on every task (``benchmarks/tied_rows/``,
``benchmarks/stat_decay/``); ``docs/decisions.md`` gives the evidence."""

PAPER: dict[str, Any] = {
    "lr": 0.01,
    "momentum": 0.9,
    "damping": 0.3,
    "stat_decay": 0.9,
    "stat_every": 1,
    "inv_every": 20,
    "graft": None,
    "bias_correction": False,
    "early_refresh": False,
    "relative_damping": False,
    "inverse_root": 1,
    "tie_rows": False,
    "two_sided": False,
}
"""The paper's MBF (Bahamou, Goldfarb & Ren, 2023): ``m <- mu m + g``,
``d_b = (F_b + damping I)^-1 m_b``, ``theta <- theta - lr d``, with ``F_b`` a running average
whose first estimate is taken as it is and inverses refreshed every ``inv_every`` steps only, at
the hyperparameters of the authors' framework. ``MBF(model, **PAPER)`` gives exactly that form
whatever the library defaults are."""


class UnitState(NamedTuple):
    """One unit as [`MBF.blocks`][mbf.MBF.blocks] shows it.

    Attributes:
        name: the unit's name, e.g. ``"0 (Linear)"`` (module name and type) or a parameter's
            name when no module rule applies; the keys of ``memory_report()``.
        layout: how the unit's parameters are cut into mini-blocks.
        params: the unit's parameters, in the layout's order.
        fisher: the running-average statistics ``F_b``, ``(num_blocks, block_size, block_size)``
            (``tied_blocks`` of them when the unit's rows are tied).
        inverse: the damped inverses ``(F_b + damping * I)^-1`` last factored, same shape.
    """

    name: str
    layout: BlockLayout
    params: list[Tensor]
    fisher: Tensor
    inverse: Tensor


def _check_group(group: dict[str, Any]) -> None:
    check_group(group)  # mbf.validation: one home for every rule


class MBF(torch.optim.Optimizer):
    """Mini-block Fisher optimizer (Bahamou, Goldfarb & Ren, AISTATS 2023).

    Preconditions each step with a block-diagonal approximation of the empirical Fisher matrix in
    which every layer is cut into many small mini-blocks (one per output unit of a Linear layer,
    one per kernel of a convolution; see [`mbf.blocks`][mbf.blocks]), all factored in batched calls:

        m <- momentum * m + (g + weight_decay * theta)       (L2 decay, the default)
        d_b = (F_b + damping * I)^-1 m_b                     for every mini-block b
        d_b <- |a_b| d_b / |d_b|                             (graft: a = Adam's or SGD-m's step)
        theta <- theta - lr * d   [- lr * weight_decay * theta when decoupled]

    ``MBF(model, **PAPER)`` is the paper's form (no grafting, first estimate as it is, factoring
    every ``inv_every`` steps); :data:`DEFAULTS` are the library's defaults.

    ``F_b`` is a running average (``stat_decay``) of a per-step estimate refreshed every
    ``stat_every`` steps and factored every ``inv_every`` steps.

    Args:
        params: an ``nn.Module`` (module-aware blocks, per-example hooks; a
            ``DistributedDataParallel`` wrapper is looked through; a model sharded with FSDP2's
            ``fully_shard`` is stepped shard by shard, see ``mbf.fsdp``), or an iterable of
            parameters or param groups (blocks from shapes, unless ``model`` is given too).
        lr: learning rate.
        momentum: heavy-ball momentum, applied before preconditioning.
        damping: ``lambda`` added to every block's diagonal.
        stat_decay: running-average factor of the curvature statistics.
        stat_every: steps between statistics updates.
        inv_every: steps between factorizations.
        max_block_size: rows longer than this are cut into near-equal chunks.
        weight_decay: L2 coefficient (added to the gradient) or, with
            ``decoupled_weight_decay=True``, decoupled decay (AdamW style).
        decoupled_weight_decay: shrink the parameters by ``lr * weight_decay`` directly
            instead of adding the L2 term to the gradient (then it is not preconditioned).
        kl_clip: if set, scale the update so ``lr**2 * d . m <= kl_clip`` (KFAC's KL clip).
        graft: ``None`` (the paper's step), ``"adam"`` or ``"sgd"``: keep the direction
            ``d_b`` of every mini-block but give it the length of Adam's update
            ``m_hat / (sqrt(v_hat) + graft_eps)`` (or of SGD-m's, the momentum ``m_b``) for the
            same block, so that ``lr`` means what it means for that optimizer and one damping
            serves blocks of any scale (as Distributed Shampoo grafts onto Adam).
        graft_beta2: Adam's ``beta2`` for ``graft="adam"`` (its ``beta1`` is ``momentum``;
            the second moment costs one float per parameter).
        graft_eps: Adam's ``eps`` for ``graft="adam"``.
        bias_correction: start the statistics from zero with weight ``1 - stat_decay`` and
            divide by ``1 - stat_decay^n`` when factoring (Adam's bias correction), instead of
            taking the first estimate as it is.
        early_refresh: also factor after the 1st, 2nd, 4th, 8th, ... statistics update (below
            ``inv_every``), so the first inverses are not rank-one estimates kept for
            ``inv_every`` steps.
        relative_damping: add ``damping * tr(F_b) / s`` to each block (damping measured in
            units of the block's mean eigenvalue, so one value serves blocks of any scale)
            instead of ``damping`` itself.
        inverse_root: ``1`` (the paper) preconditions each block by ``(F_b + damping I)^-1``;
            ``2`` by its inverse square root ``(F_b + damping I)^-1/2``, the power Adam applies
            to its diagonal second moment and Shampoo to its factors (computed by an
            eigendecomposition, about four times the cost of a factorization). With the
            ``batch`` estimator ``F_b`` is a running second moment of the gradient, whose
            inverse steps each direction by about ``1 / |g|``: where a block mixes coordinates
            of very different gradient scale (sparse inputs such as bag-of-words features),
            the root keeps the step on the frequent coordinates (``docs/results.md``, GCN).
        tie_rows: share blocks between the rows of a layer (:mod:`mbf.tied`): one block per
            column chunk for all output units of a Linear layer (and of a 2-d parameter given
            without its module), one per input channel's kernel for all output channels of an
            ungrouped convolution, each estimated from all those rows' gradients
            (``(1/T) sum_t g_tk g_tk^T``); every row's piece keeps its own grafted length.
            Statistics, inverses and factorization shrink by the number of rows ``T``; norm
            layers, embeddings and flat tensors keep their own blocks. The default since
            2026-12-08 (``benchmarks/tied_rows/``); ``False`` gives every row its own blocks,
            as the paper does. On FSDP2 models every rank holding rows of a layer keeps its
            shared blocks whole (``mbf.fsdp``). A param group's setting is fixed when the
            optimizer is built.
        two_sided: also precondition the output side of each tied layer
            (:mod:`mbf.output_side`): one block per chunk of its rows (output units, output
            channels), estimated from every column of the minibatch gradient, applied after the
            input side's, so that the direction is ``L_r^-1 M R_c^-1`` per (row chunk, column
            chunk) before the graft. Needs ``tie_rows``; not on FSDP2 models. Off by default
            (a screen on the GPTs: ``benchmarks/two_sided/``).
        estimator: ``"batch"`` (``F_b`` estimated by ``g_b g_b^T`` of the minibatch gradient;
            any layer) or ``"per_example"`` (the empirical Fisher ``(1/N) sum_i g_ib g_ib^T`` from
            hooks on Linear, ConvNd, Embedding and LayerNorm modules, and module types
            registered with :func:`mbf.register_layer`, called through their ``forward``;
            every other parameter falls back to ``"batch"`` with a warning: batch, instance
            and group norms, ``EmbeddingBag`` and recurrent layers, ``nn.MultiheadAttention``
            (its ``out_proj`` is applied functionally), a module whose weight is tied to
            another module's, and any served module whose forward hook never runs on a
            statistics step).
        loss_reduction: how the loss combines examples, ``"mean"`` or ``"sum"``; needed by the
            ``per_example`` estimator to undo autograd's ``1/N``. With gradient accumulation it
            describes the whole accumulated batch: ``"mean"`` for micro-batch means divided by
            the number of micro-batches (Hugging Face's Trainer, Lightning), ``"sum"`` for
            micro-batch sums; the statistics are then those of all the accumulated examples
            (:mod:`mbf.hooks`).
        model: the module the parameters belong to, for module-aware blocks with param groups.
        nonfinite: ``"skip"`` (default) skips a step whose gradient is not finite, leaving every
            parameter and statistic untouched and counting it; ``"raise"`` raises
            ``FloatingPointError`` with the state untouched. Under ``torch.amp.GradScaler``
            (``scaler.step(opt)``) MBF unscales gradients and per-example statistics itself and
            skips the steps the scaler finds non-finite (:mod:`mbf.amp`,
            :meth:`use_grad_scaler`).
        max_state_bytes: refuse to build when curvature state would exceed this many bytes.
        chunk_elements: per-example gradient entries materialized at once (memory bound).
        stat_buffer: with the ``batch`` estimator, how many steps' gradient blocks are queued
            and folded into the running average together, as one batched rank-``k`` product
            (at the latest before each factorization). The result is the same running average
            (up to rounding); the statistics, the largest tensor, are then read and written once
            per ``stat_buffer`` updates instead of every update. Costs ``stat_buffer`` floats per
            parameter of untied units; ``1`` folds every update at once. Tied units
            (``tie_rows``) fold every estimate at once: it is one small block per chunk.
        storage: ``"full"`` keeps every block's statistics and inverse as ``s x s`` matrices
            (``2 s + stat_buffer + 1`` floats per parameter of untied units, fastest; tied ones
            ``2 s^2 / T + 1`` for ``T`` sharing rows); ``"packed"`` keeps their upper triangles
            (``s + 2`` floats per parameter untied: about half the memory) and unpacks
            a few thousand blocks at a time to factor and solve, which makes the step slower
            (``docs/results.md``). ``"packed"`` folds statistics at once (no queue). Both work
            on several ranks, each rank keeping only its share (``mbf.storage``).
        curvature_dtype: the dtype of the statistics and inverses. ``None`` (default): the
            parameters' dtype, at least float32 (float32 for float32, bfloat16 and float16
            parameters), as momentum. ``torch.float32``: float32 whatever the parameters.
            ``torch.bfloat16`` halves their memory (with ``storage="packed"`` about
            ``s / 2 + 3`` floats' worth per parameter): each update, fold and factorization
            widens a chunk of blocks to float32 and rounds the result once, and the solve
            widens the inverses a chunk at a time; the queue (``stat_buffer``), momentum and
            Adam's second moment stay in float32. Checkpoints hold the curvature in this dtype
            and load into an optimizer of any ``curvature_dtype``. A 16-bit factorization adds
            what rounding can hide to the damping of each block whose factorization would
            fail, and on mnist-ae bfloat16 curvature has trained measurably slower than float32
            at the protocol's damping (``docs/results.md``), hence not the default.
            ``torch.float16`` is refused (its range cannot hold the statistics and inverses
            without a scale per block; ``docs/decisions.md``), as is a dtype the device cannot
            update and factor.
        process_group: data parallelism (see ``mbf.distributed``). ``None`` (default): the
            ``DistributedDataParallel`` model's group, else the default group, when
            ``torch.distributed`` is initialized with several ranks; the curvature work and
            memory are then sharded over the ranks and per-example statistics summed over them.
            ``True``: the same, but an error when ``torch.distributed`` is not initialized.
            ``False``: a single-process optimizer even then. Or an explicit ``ProcessGroup``.
            Parameters that are ``Shard(0)`` DTensors (FSDP2) always use their mesh's group:
            each rank keeps and steps the blocks of its own rows (``docs/distributed.md``);
            other placements are refused.
        compile: run the step's elementwise work on each parameter (Adam's second moment, the
            momentum and Adam's step for the graft: six passes over the parameters) as one
            loop compiled by ``torch.compile`` (``mbf.direction.Moments``; tensors under 65,536
            entries stay eager). Equal to the eager step to float32 rounding, not bitwise.
            Compiling takes seconds to a minute at the first step (a C++ compiler on CPU);
            where it fails, MBF warns once and steps eagerly. ``docs/cost.md`` has what it
            saves (a few percent at best on CPU: off by default).
    """

    def __init__(
        self,
        params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = DEFAULTS["lr"],
        *,
        momentum: float = DEFAULTS["momentum"],
        damping: float = DEFAULTS["damping"],
        stat_decay: float = DEFAULTS["stat_decay"],
        stat_every: int = DEFAULTS["stat_every"],
        inv_every: int = DEFAULTS["inv_every"],
        max_block_size: int = DEFAULTS["max_block_size"],
        weight_decay: float = DEFAULTS["weight_decay"],
        decoupled_weight_decay: bool = DEFAULTS["decoupled_weight_decay"],
        kl_clip: float | None = DEFAULTS["kl_clip"],
        graft: str | None = DEFAULTS["graft"],
        graft_beta2: float = DEFAULTS["graft_beta2"],
        graft_eps: float = DEFAULTS["graft_eps"],
        bias_correction: bool = DEFAULTS["bias_correction"],
        early_refresh: bool = DEFAULTS["early_refresh"],
        relative_damping: bool = DEFAULTS["relative_damping"],
        inverse_root: int = DEFAULTS["inverse_root"],
        tie_rows: bool = DEFAULTS["tie_rows"],
        two_sided: bool = DEFAULTS["two_sided"],
        estimator: str = "batch",
        loss_reduction: str = "mean",
        model: nn.Module | None = None,
        nonfinite: str = "skip",
        max_state_bytes: int | None = 8 * 2**30,
        chunk_elements: int = 1 << 24,
        stat_buffer: int = 4,
        storage: str = "full",
        curvature_dtype: torch.dtype | str | None = None,
        process_group: Any = None,
        compile: bool = False,
    ) -> None:
        check_choice("estimator", estimator, ESTIMATORS)
        check_choice("loss_reduction", loss_reduction, REDUCTIONS)
        check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        chunk_elements = positive_int("chunk_elements", chunk_elements)
        stat_buffer = positive_int("stat_buffer", stat_buffer)
        if max_state_bytes is not None:
            max_state_bytes = positive_int("max_state_bytes", max_state_bytes)
        self.stat_buffer = stat_buffer
        self.storage = storage
        if not isinstance(compile, bool):
            raise TypeError(f"MBF: compile must be True or False, got {compile!r}")
        self.compile = compile
        self._moments = Moments(compile)
        self.curvature_dtype = check_curvature_dtype(curvature_dtype)
        self._diag = Diagnostics()
        self._store = CurvatureStore(storage_named(storage), stat_buffer, self._diag,
                                     self.curvature_dtype)
        self._counters = self._store.counters
        if isinstance(params, nn.Module):
            if model is not None and model is not params:
                raise ValueError("MBF: pass the model either as params or as model=, not both")
            model = params
            params = [p for p in params.parameters() if p.requires_grad]
        if estimator == "per_example" and model is None:
            raise ValueError(
                "MBF: estimator='per_example' needs the model (pass the nn.Module, or model=)"
            )
        self.estimator = estimator
        self.loss_reduction = loss_reduction
        self.nonfinite = nonfinite
        self.max_state_bytes = max_state_bytes
        self._model = model
        self._ready = False
        self._step_count = 0
        self._warned: set[str] = set()
        self._consecutive_skips = 0  # steps skipped in a row (warnings), not saved
        self._consecutive_overflows = 0  # updates not applied in a row (warnings), not saved
        defaults = dict(
            DEFAULTS,
            lr=lr,
            momentum=momentum,
            damping=damping,
            stat_decay=stat_decay,
            stat_every=stat_every,
            inv_every=inv_every,
            max_block_size=max_block_size,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            kl_clip=kl_clip,
            graft=graft,
            graft_beta2=graft_beta2,
            graft_eps=graft_eps,
            bias_correction=bias_correction,
            early_refresh=early_refresh,
            relative_damping=relative_damping,
            inverse_root=inverse_root,
            tie_rows=tie_rows,
            two_sided=two_sided,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_group(group)
        # One process or K ranks (mbf.engine, mbf.distributed): who owns which blocks.
        self._engine = _make_engine(self.param_groups, process_group, model)
        self._hooks = PerExampleHooks([], loss_reduction, chunk_elements)
        self._rebuild()
        self._ready = True
        self._engine.check_config(self._fingerprint())

    # ------------------------------------------------------------------ construction
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (as in ``torch.optim.Optimizer``) and build its mini-blocks.

        The group's hyperparameters are checked like the constructor's; the curvature of units
        already there is kept. With several ranks, every rank must add the same group.
        """
        if not getattr(self, "_ready", False):  # construction: __init__ checks every group
            super().add_param_group(param_group)
            return
        if isinstance(self._engine, FSDPEngine):
            raise NotImplementedError(
                "MBF: add_param_group is not supported on FSDP2 models (the local units are "
                "rebuilt from fresh views of the shards, so the curvature of the units already "
                "there would be lost); build MBF with every param group"
            )
        count, rebuilt = len(self.param_groups), False
        kept = self._kept()
        try:
            super().add_param_group(param_group)
            _check_group(self.param_groups[-1])
            check_params(self.param_groups)
            rebuilt = True
            self._rebuild(kept)
            self._engine.check_config(self._fingerprint())  # every rank adds the same group
        except Exception:
            # A refused group leaves the optimizer as before (no half-added group; the units
            # are rebuilt only if they were touched).
            del self.param_groups[count:]
            if rebuilt:
                self._rebuild(kept)
            raise

    def _kept(self) -> dict[tuple[int, ...], Kept]:
        """Every unit's whole curvature, keyed by its parameters, to carry across a rebuild.

        In one process these are views; with several ranks a gathered copy (a collective:
        every rank rebuilds alike). Queued estimates travel along, so nothing is folded early.
        """
        whole = self._engine.whole_curvature(self._store)
        kept = {}
        for bucket in self._store.buckets:
            for u in bucket.units:
                record = checkpoint.record(u, *whole.of(bucket, u))
                kept[tuple(id(p) for p in u.params)] = checkpoint.kept(record)
        return kept

    def _rebuild(self, kept: dict[tuple[int, ...], Kept] | None = None) -> None:
        """(Re)build units and buckets; ``kept`` curvature of unchanged units is restored."""
        check_params(self.param_groups)
        units = build_units(self.param_groups, self._model, self.estimator == "per_example")
        if isinstance(self._engine, FSDPEngine) and any(g["two_sided"] for g in self.param_groups):
            raise ValueError(
                "MBF: two_sided is not supported on FSDP2 models (a layer's output-side blocks "
                "span rows that several ranks hold); pass two_sided=False"
            )
        # FSDP2 (mbf.fsdp): the hooks see the whole units, the store this rank's parts of them.
        self._whole_units = units
        if isinstance(self._engine, FSDPEngine):
            units = self._engine.split(units, self.param_groups, self.state)
        self._warn_fallbacks(self._whole_units)
        self._store.build(
            units, self._engine.plan, self._engine.rank, kept or {}, self.max_state_bytes
        )
        self._engine.invalidate()
        self._hooks.remove()
        self._hooks.add(self._whole_units)
        self._schedule_collection()
        self._tying = [bool(group["tie_rows"]) for group in self.param_groups]

    def _check_tying(self) -> None:
        """Refuse a ``tie_rows`` changed through ``param_groups`` after the units were built
        (their blocks would no longer match the setting)."""
        for g, (group, built) in enumerate(zip(self.param_groups, self._tying, strict=True)):
            if bool(group["tie_rows"]) != built:
                raise ValueError(
                    f"MBF: tie_rows of param group {g} was changed to {group['tie_rows']!r} "
                    f"after the optimizer was built with {built}; the blocks cannot follow. "
                    "Build a new MBF with the setting you want."
                )

    def _fingerprint(self) -> dict[str, Any]:
        """What every rank must agree on (:meth:`mbf.distributed.ShardedEngine.check_config`)."""
        settings = {
            "estimator": self.estimator,
            "loss_reduction": self.loss_reduction,
            "nonfinite": self.nonfinite,
            "storage": self.storage,
            "stat_buffer": self.stat_buffer,
            "curvature_dtype": str(self.curvature_dtype),
        }
        return fingerprint(self.param_groups, self._collecting, settings)
    def _warn_fallbacks(self, units: list[Unit]) -> None:
        if self.estimator != "per_example":
            return
        names = [u.name for u in units if not u.per_example]
        if names and "fallback" not in self._warned:
            self._warned.add("fallback")
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            warnings.warn(
                "MBF: per-example statistics serve Linear, Conv1d/2d/3d, Embedding and LayerNorm "
                "layers (and types "
                "registered with mbf.register_layer) called through their forward, with weights "
                "of their own (not tied, not "
                f"MultiheadAttention's out_proj); these use the 'batch' estimator instead: {shown}",
                stacklevel=3,
            )

    # ------------------------------------------------------------------ introspection
    @property
    def _units(self) -> list[Unit]:
        return self._store.units

    @property
    def _collecting(self) -> list[Unit]:
        """The units the per-example hooks fill: the store's, or under FSDP2 the whole units
        (every rank computes the statistics of every block from its own examples)."""
        return self._whole_units if isinstance(self._engine, FSDPEngine) else self._store.units

    @property
    def distributed(self) -> ShardedEngine | None:
        """The data-parallel engine (process group, rank, traffic), or ``None`` in one process."""
        return self._engine if isinstance(self._engine, ShardedEngine) else None

    @property
    def counters(self) -> dict[str, int]:
        """Steps taken and skipped, factorizations, and blocks that needed a retry or fallback.

        ``steps``: steps taken; ``skipped_steps``: steps skipped for a non-finite gradient
        (``nonfinite="skip"``; warned at the first and at 10, 100, ... in a row);
        ``overflowed_blocks``: blocks (summed over steps) whose solve overflowed under
        grafting and which took their right-hand side's direction instead (``mbf.direction``);
        ``overflowed_updates``: steps whose statistics were updated but whose preconditioned
        update was not finite, so the parameters were left alone (warned at the first and at
        10, 100, ... in a row);
        ``factorizations``, ``factored_blocks``, ``retried_blocks`` (factored with more
        damping), ``fallback_blocks`` (preconditioned by ``(1/damping) I``) and
        ``nonfinite_blocks`` (statistics that were not finite, started afresh).
        """
        return dict(self._counters)

    def diagnostics(self) -> dict[str, float]:
        """A flat ``{name: number}`` dict for loggers: counts, fractions of blocks retried or
        fallen back, seconds in statistics and factorization, per-group damping and the ratio of
        the preconditioned direction's norm to the gradient's (:mod:`mbf.diagnostics`)."""
        return self._diag.report(self._counters, self.param_groups)

    def memory_report(self, detail: bool = False) -> dict[str, Any]:
        """Bytes of this process's state for each unit, by name: statistics, inverses and queued
        statistics of the blocks this rank owns (all of them in one process, about ``1/K`` of
        them on each of ``K`` ranks) and the momentum (every rank keeps all of it).

        ``detail=True`` gives ``{name: {"statistics", "inverse", "queue", "momentum"}}``.
        """
        parts = {u.name: self._store.unit_bytes(u) for u in self._store.units}
        if detail:
            return parts
        return {name: sum(p.values()) for name, p in parts.items()}

    def blocks(self) -> list[UnitState]:
        """Every unit's name, layout, parameters, running-average blocks and damped inverses.

        The tensors are live views of the optimizer's state (read them, do not keep them), or
        whole copies with ``storage="packed"`` (unpacked) and with several ranks (call
        [`consolidate_state_dict`][mbf.MBF.consolidate_state_dict] on every rank first);
        queued statistics (see ``stat_buffer``) are folded in first.
        """
        store = self._store
        store.fold_all()
        whole = self._engine.consolidated(store)
        states: dict[int, UnitState] = {}
        for bucket in store.buckets:
            for u in bucket.units:
                fisher, inverse, queued, weights = whole.of(bucket, u)
                size = u.layout.block_size
                fisher = store.storage.to_blocks(fisher, size)
                if queued is not None:  # the queue of a consolidated copy (several ranks)
                    fisher = fisher.clone()
                    store.storage.fold_(fisher, queued.clone(), weights)
                inverse = store.storage.to_blocks(inverse, size)
                states[id(u)] = UnitState(u.name, u.layout, list(u.params), fisher, inverse)
        return [states[id(u)] for u in store.units]

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """torch.amp.GradScaler's protocol (:mod:`mbf.amp`): ``step()`` unscales gradients and
        per-example statistics itself while hooks collect them and no scaler is attached."""
        hooks = getattr(self, "_hooks", None)
        return hooks is not None and hooks.active and hooks.grad_scaler is None

    def use_grad_scaler(self, scaler: Any) -> None:
        """Read the loss scale of this ``torch.amp.GradScaler`` during backward passes, so that
        per-example statistics are unscaled even when ``scaler.unscale_(optimizer)`` runs before
        ``step()`` (as for gradient clipping; see :mod:`mbf.amp`). ``None`` detaches it."""
        if scaler is not None and not callable(getattr(scaler, "get_scale", None)):
            raise TypeError(f"MBF: use_grad_scaler needs a torch.amp.GradScaler, got {scaler!r}")
        self._hooks.grad_scaler = scaler

    def remove_hooks(self) -> None:
        """Detach the per-example hooks from the model; the optimizer goes on as ``batch``."""
        self._hooks.remove()
        for unit in self._units + self._collecting:
            unit.per_example = False
            unit.clear_pending()

    # ------------------------------------------------------------------ stepping
    def _is_stat_step(self, unit: Unit) -> bool:
        return self._store.is_stat_step(unit, self._step_count, self.param_groups[unit.group])

    def _schedule_collection(self) -> None:
        for unit in self._units:
            unit.collect = unit.per_example and self._is_stat_step(unit)
        if isinstance(self._engine, FSDPEngine):
            for unit in self._whole_units:
                unit.collect = unit.per_example and self._is_stat_step(unit)
        self._hooks.new_step()

    def _grads(self, unit: Unit) -> list[Tensor] | None:
        grads = [p.grad for p in unit.params]
        if all(g is None for g in grads):
            return None
        for g in grads:
            if g is not None and g.is_sparse:
                raise ValueError(f"MBF: sparse gradients are not supported ({unit.name})")
        return [
            (torch.zeros_like(p) if g is None else g).to(unit.dtype)
            for p, g in zip(unit.params, grads, strict=True)
        ]

    def _all_finite(self, grads: list[list[Tensor]]) -> bool:
        # One reduction per tensor: a sum is non-finite iff an entry is (or the sum overflows
        # float32, i.e. the gradient is ~1e38: no step worth taking either).
        sums = [
            g.sum(dtype=torch.promote_types(g.dtype, torch.float32)) for gs in grads for g in gs
        ]
        return bool(torch.isfinite(torch.stack(sums)).all()) if sums else True

    def _estimate(self, unit: Unit, grads: list[Tensor]) -> Tensor:
        """This step's estimate for the unit (see ``CurvatureStore.absorb``); consumes the
        per-example sums the hooks collected."""
        if unit.per_example:
            pending, count = unit.pending, unit.pending_count
            unit.clear_pending()
            if pending is None or count == 0:
                self._hooks_missed(unit)
                return unit.layout.to_blocks(grads)
            return pending.div_(count * unit.tied_divisor)  # tied: a mean over the sharing rows
        return unit.layout.to_blocks(grads)

    def _hooks_missed(self, unit: Unit) -> None:
        """A per-example unit has a gradient but its module's hooks saw no pass: the module was
        applied functionally (its parent calls ``F.linear`` on its weight) or outside its
        ``forward``. It uses the batch estimator from now on, as unserved modules do."""
        unit.per_example = False
        unit.clear_pending()
        if f"nocapture:{unit.name}" not in self._warned:
            self._warned.add(f"nocapture:{unit.name}")
            warnings.warn(
                f"MBF: {unit.name} received a gradient but its forward hook never ran (applied "
                "functionally, outside its forward?); it uses the 'batch' estimator instead of "
                "per-example statistics.",
                stacklevel=8,  # the caller of step() (past step and _step)
            )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Take one MBF step; ``closure`` (optional) re-evaluates the loss with gradients."""
        for group in self.param_groups:  # also catches changes made through param_groups
            _check_group(group)
        self._check_tying()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not isinstance(self._engine, FSDPEngine):
            return self._step(loss)
        self._engine.bind()  # FSDP2: the local units on this step's shards and gradients
        try:
            return self._step(loss)
        finally:
            self._engine.release()

    def _step(self, loss: float | None) -> float | None:
        """The step after the closure (see :meth:`step`)."""
        self._counters["scaler_skipped_steps"] += self._hooks.scaler_skips
        self._hooks.scaler_skips = 0
        scaler = _amp.read_scaler_signal(self)  # set by torch.amp.GradScaler.step (mbf.amp)
        if scaler.found_inf:
            self._counters["scaler_skipped_steps"] += 1
            for unit in self._units + self._collecting:
                unit.clear_pending()
            self._hooks.new_step()
            return loss
        self._hooks.finish(self._collecting, scaler)  # per-example sums -> empirical Fisher scale
        if scaler.grad_scale is not None:
            _amp.unscale_grads_(self.param_groups, scaler.grad_scale)
        active = [(u, self._grads(u)) for u in self._units]
        live = [(u, g) for u, g in active if g is not None]
        if not self._agreed(self._all_finite([g for _, g in live])):
            self._counters["skipped_steps"] += 1
            self._note_skip()
            for unit in self._units + self._collecting:
                unit.clear_pending()
            self._hooks.new_step()
            if self.nonfinite == "raise":
                raise FloatingPointError(
                    "MBF: non-finite gradient; the step was not taken and no state was changed"
                )
            return loss

        self._engine.invalidate()
        store, groups = self._store, self.param_groups
        due = [(u, g) for u, g in live if self._is_stat_step(u)]
        with self._diag.timed("statistics"):
            refreshed = self._engine.update_statistics(store, due, self._estimate, groups)
            for unit, grads in due:
                if self._two_sided(unit):
                    self._output_side(unit).absorb(unit.layout.to_blocks(grads),
                                                   groups[unit.group])
        self._factor_output_sides(live, refreshed)
        # The vector to precondition, formed once: solved by the engine, and the KL clip's
        # reference vector.
        live_ids = {id(u) for u, _ in live}
        # Adam's moments of all steady-state parameters at once (compiled: one tensor at a time).
        compiled = self._moments if self._moments.compiled is not None else None
        advanced = advance_moments([u for u, _ in live], groups, self._param_state, compiled)
        work: list[Work] = []
        graft_norms: dict[int, Tensor | None] = {}
        row_vectors: dict[int, Tensor] = {}  # tied units' vectors in row order
        for bucket in store.buckets:
            members = [u for u in bucket.units if id(u) in live_ids]
            if not members:
                continue
            # In the units' dtype (float32), not the curvature's (maybe 16-bit); tied rows
            # (mbf.tied): each shared block's T rows, (total, T, s).
            tied = bucket.tied
            shape = (bucket.total, bucket.block_size)
            rhs = bucket.fisher.new_empty(shape if tied == 1 else (shape[0], tied, shape[1]),
                                          dtype=members[0].dtype)
            if len(members) < len(bucket.units):  # blocks without gradients: zero
                rhs.zero_()
            for u in members:
                if tied == 1:
                    out = rhs[u.offset : u.offset + u.layout.num_blocks]
                else:  # formed in row order, kept for the graft and the KL clip
                    out = row_vectors[id(u)] = rhs.new_empty(u.layout.num_blocks, shape[1])
                graft_norms[id(u)] = form_vector(u, groups[u.group], self._param_state, out,
                                                 advanced)
                if tied > 1:
                    rhs[u.offset : u.offset + u.curvature_blocks] = by_shared_block(out, tied)
            work.append(Work(bucket, rhs, members))
        solved = self._engine.precondition(store, work, refreshed, self._step_count, groups)
        directions: dict[int, list[Tensor]] = {}
        vectors: dict[int, Tensor] = {}
        for item, whole in zip(work, solved, strict=True):
            norms = [graft_norms[id(u)] for u in item.members]
            tied = item.bucket.tied
            at_once = (tied == 1 and _covers(item.members, whole)
                       and all(n is not None for n in norms))
            if at_once:  # grafted blocks are rescaled one by one: one call for the bucket
                whole_norms = norms[0] if len(norms) == 1 else torch.cat(norms)  # type: ignore[arg-type]
                _, overflowed = finish(whole, whole_norms, 1.0, item.rhs)
                self._counters["overflowed_blocks"] += overflowed
            for u, norm in zip(item.members, norms, strict=True):
                view = slice(u.offset, u.offset + u.curvature_blocks)
                if tied == 1:
                    vectors[id(u)], blocks = item.rhs[view], whole[view]
                else:
                    vectors[id(u)], blocks = row_vectors[id(u)], from_shared_blocks(whole[view])
                    if self._two_sided(u):
                        blocks = self._output_side(u).apply(blocks)
                if not at_once:
                    _, overflowed = finish(blocks, norm, u.inverse_scale, vectors[id(u)])
                    self._counters["overflowed_blocks"] += overflowed
                directions[id(u)] = [blocks]
        self._diag.record_step(live, directions)
        if self._agreed(self._all_finite(list(directions.values()))):
            self._apply(live, directions, vectors)
            self._consecutive_skips = self._consecutive_overflows = 0
        else:  # finite gradients, but a preconditioned update that is not (see _note_overflow)
            self._note_overflow()
        self._step_count += 1
        self._counters["steps"] += 1
        self._schedule_collection()
        return loss
    # ------------------------------------------------------------------ the output side
    def _two_sided(self, unit: Unit) -> bool:
        return unit.tied > 1 and bool(self.param_groups[unit.group]["two_sided"])

    def _output_side(self, unit: Unit) -> OutputSide:
        return output_side(unit, self.state[unit.params[0]],
                           int(self.param_groups[unit.group]["max_block_size"]))

    def _factor_output_sides(self, live: list[tuple[Unit, list[Tensor]]],
                             refreshed: set[int]) -> None:
        """Factor the output sides due: at the input side's schedule (every ``inv_every``
        steps, early refreshes, and before their first use). Every rank factors them whole:
        their counts are this process's alone (the same on every rank)."""
        report = FactorReport()
        for unit, _ in live:
            if not self._two_sided(unit):
                continue
            group = self.param_groups[unit.group]
            side = self._output_side(unit)
            updates = side.state.get("stat_updates", 0)
            early = id(unit) in refreshed and early_refresh_due(updates, group)
            if updates and factor_now(self._step_count, group, early,
                                      side.state.get("factored", False)):
                with self._diag.timed("factorization"):
                    report.add(side.factor(group))
                side.state["factored"] = True
        if report.blocks:
            self._store.count(report, 0)

    def _agreed(self, flag: bool) -> bool:
        """``flag`` on every rank of an FSDP2 model (each sees only its shards), else as is."""
        return self._engine.all_true(flag) if isinstance(self._engine, FSDPEngine) else flag

    @property
    def _param_state(self) -> MutableMapping[Tensor, Any]:
        """The per-parameter state as the units' tensors reach it (FSDP2: through the local
        shards, kept under the DTensor parameters)."""
        if isinstance(self._engine, FSDPEngine) and self._engine.param_state is not None:
            return self._engine.param_state
        return self.state

    def _note_skip(self) -> None:
        """Warn when steps start being skipped, and again at 10, 100, ... skips in a row."""
        self._consecutive_skips += 1
        run = self._consecutive_skips
        if self._counters["skipped_steps"] == 1 and self.nonfinite == "skip":
            warnings.warn(
                "MBF: skipped a step whose gradient is not finite (parameters and statistics "
                "left as they were); optimizer.counters['skipped_steps'] counts them",
                stacklevel=6,  # past the torch wrappers of step(): the caller
            )
        elif run >= 10 and math.log10(run).is_integer() and self.nonfinite == "skip":
            warnings.warn(
                f"MBF: the last {run} steps were all skipped for non-finite gradients: "
                "training has stalled (check the loss, the learning rate, the data)",
                stacklevel=6,  # past the torch wrappers of step(): the caller
            )

    def _note_overflow(self) -> None:
        """An update that overflowed (e.g. ``damping=0`` and a stale inverse ``1/g^2`` of a tiny
        gradient, met by a larger one): the parameters are left as they were, never made
        non-finite. Statistics and momentum took the step's gradient (it was finite).
        Warned at the first, and again at 10, 100, ... in a row: such a run has stopped
        training."""
        self._counters["overflowed_updates"] += 1
        self._consecutive_overflows += 1
        run = self._consecutive_overflows
        if "overflow" not in self._warned:
            self._warned.add("overflow")
            warnings.warn(
                "MBF: a preconditioned update was not finite and was not applied (parameters "
                "left as they were; counters['overflowed_updates']); raise the damping",
                stacklevel=6,  # past the torch wrappers of step(): the caller
            )
        elif run >= 10 and math.log10(run).is_integer():
            warnings.warn(
                f"MBF: the last {run} preconditioned updates were all not finite and not "
                "applied: training has stalled (raise the damping, or use graft='adam')",
                stacklevel=6,  # past the torch wrappers of step(): the caller
            )

    def _apply(
        self,
        live: list[tuple[Unit, list[Tensor]]],
        directions: dict[int, list[Tensor]],
        vectors: dict[int, Tensor],
    ) -> None:
        """``theta <- theta - lr * scale * d`` (and decoupled decay); ``scale`` is the KL clip's,
        from the directions' blocks and the ``vectors`` they preconditioned."""
        scale_of_group: dict[int, float] = {}
        terms_of_group: dict[int, float] = {}
        for g, group in enumerate(self.param_groups):
            if group["kl_clip"] is None:
                continue
            terms = [
                kl_term(directions[id(u)][0], vectors[id(u)]) for u, _ in live if u.group == g
            ]
            # One host sync per group (a model may span devices: gather the terms on one).
            vg = float(torch.stack([t.to(terms[0].device) for t in terms]).sum()) if terms else 0.0
            terms_of_group[g] = vg
        if terms_of_group and isinstance(self._engine, FSDPEngine):  # each rank has its rows
            local = torch.tensor(list(terms_of_group.values()), dtype=torch.float64)
            summed = self._engine.sum(local)
            terms_of_group = dict(zip(terms_of_group, summed.tolist(), strict=True))
        for g, vg in terms_of_group.items():
            clip, lr = self.param_groups[g]["kl_clip"], float(self.param_groups[g]["lr"])
            scale_of_group[g] = (
                min(1.0, math.sqrt(clip / (lr * lr * vg))) if vg > 0 and lr > 0 else 1.0
            )

        for unit, _ in live:
            group = self.param_groups[unit.group]
            lr = group["lr"]
            wd = group["weight_decay"]
            scale = scale_of_group.get(unit.group, 1.0)
            blocks = directions[id(unit)][0]
            for index, p in enumerate(unit.params):
                if p.grad is None:
                    continue
                if wd and group["decoupled_weight_decay"]:
                    p.mul_(1.0 - lr * wd)
                unit.layout.add_blocks_to_(index, p, blocks, alpha=-lr * scale)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The usual optimizer state plus curvature (statistics, inverses) and counters.

        With several ranks, call [`consolidate_state_dict`][mbf.MBF.consolidate_state_dict] on
        every rank first. The curvature's schema is versioned (:mod:`mbf.checkpoint`).
        """
        store = self._store
        whole = self._engine.consolidated(store)  # refuses a state dict of one rank's share
        sd = super().state_dict()
        records = {
            id(u): checkpoint.record(u, *whole.of(bucket, u))
            for bucket in store.buckets
            for u in bucket.units
        }
        sd["mbf"] = self._curvature_entry([records[id(u)] for u in store.units])
        return sd

    def _curvature_entry(self, units: list[dict[str, Any]]) -> dict[str, Any]:
        """The ``"mbf"`` entry of a state dict around the units' records (:mod:`mbf.checkpoint`)."""
        return {
            "version": checkpoint.VERSION,
            "storage": self.storage,
            "step": self._step_count,
            "counters": dict(self._counters),
            "units": units,
            "factored": [b.factored for b in self._store.buckets],
        }

    def sharded_state_dict(self) -> dict[str, Any]:
        """This rank's checkpoint file: the usual optimizer state (parameter groups and momenta,
        which every rank holds whole) and the curvature of the blocks this rank owns only.

        With ``K`` ranks each file holds about ``1/K`` of the curvature and no rank ever holds
        more (no collective, no gathered copy, unlike
        [`consolidate_state_dict`][mbf.MBF.consolidate_state_dict]): save one file per rank,
        e.g. ``torch.save(opt.sharded_state_dict(), f"opt.{rank}.pt")``, and restore with
        [`load_sharded_state_dict`][mbf.MBF.load_sharded_state_dict] on any number of ranks.
        In one process it is a single file holding everything. Like ``torch.optim``'s
        ``state_dict``, the tensors are the live ones: save it before the next step.
        """
        sd = super().state_dict()
        shard: dict[str, Any] = {"rank": self._engine.rank, "world_size": self._engine.world_size}
        if isinstance(self._engine, FSDPEngine):  # blocks and rows numbered as in whole units
            index_of = {id(p): i for i, p in enumerate(
                p for group in self.param_groups for p in group["params"])}
            records, shard["fsdp"] = fsdp.shard_records(
                self._engine, self._store, index_of, self._shard_record
            )
            sd["mbf"] = self._curvature_entry(records)
            sd["mbf"]["factored"] = []  # per unit in shard["fsdp"]: the ranks' buckets differ
        else:
            sd["mbf"] = self._curvature_entry([self._shard_record(u) for u in self._store.units])
        sd["mbf"]["shard"] = shard
        return sd

    @staticmethod
    def _shard_record(u: Unit) -> dict[str, Any]:
        """One unit's record in a per-rank file: this rank's blocks of it."""
        queued = None
        if u.queue is not None and u.queue_weights:  # the filled part only (torch.save
            queued = u.queue[:, : len(u.queue_weights)].contiguous()  # keeps a view's base)
        return checkpoint.shard_record(u, u.fisher, u.inverse, queued, u.queue_weights)

    def __getstate__(self) -> dict[str, Any]:
        """Everything, for ``copy.deepcopy`` and pickling (``torch.Optimizer`` keeps only the
        param groups and momenta, which left a copy without its units).

        The copy carries the model the units were built from (``_model`` and each unit's
        module, with the per-example hooks registered on it), so ``deepcopy((model, opt))``
        gives an optimizer bound to the copied model, and ``deepcopy(opt)`` or a pickle gives
        one bound to its own copy of the model (reach it as the parameters in
        ``param_groups``). A data-parallel optimizer holds a process group and cannot be
        copied: save its :meth:`state_dict` instead.
        """
        if isinstance(self.__dict__.get("_engine"), ShardedEngine):
            raise TypeError(
                "MBF: a data-parallel optimizer holds a process group and cannot be copied or "
                "pickled; call consolidate_state_dict() and save state_dict() instead"
            )
        state = dict(self.__dict__)
        # An LR scheduler's wrapper of ``step`` on the instance: a local function that does not
        # pickle, and that torch drops as well; the copy steps with MBF.step itself.
        state.pop("step", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # torch's fix-ups of older states (hooks dicts, defaults)
        # Units view their bucket's tensors; pickle stores each view's storage apart, so the
        # buckets are made again from the units' (equal) values.
        self._store.rebind()

    def consolidate_state_dict(self) -> None:
        """Gather every rank's share of the curvature, so that ``state_dict`` is complete.

        Data-parallel runs only (a no-op in one process). Every rank must call it, e.g. just
        before rank 0 saves; the state dict is then the one a single process would have, and
        loads on any number of ranks (see ``mbf.distributed``). The gathered copy is kept
        until the next step.
        """
        self._engine.consolidate(self._store)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by [`state_dict`][mbf.MBF.state_dict] (on any device, with
        either storage, on any number of ranks; older schema versions are migrated)."""
        sd = dict(state_dict)
        extra = sd.pop("mbf", None)
        if extra is None:
            raise ValueError(
                "MBF: this state dict holds no MBF curvature (saved by another optimizer?)"
            )
        if "shard" in extra:
            shard = extra["shard"]
            raise ValueError(
                f"MBF: this state dict is rank {shard.get('rank')}'s share of "
                f"{shard.get('world_size')} (sharded_state_dict); pass every rank's to "
                "load_sharded_state_dict"
            )
        self._load_checked(sd, checkpoint.migrate(extra))

    def load_sharded_state_dict(self, state_dicts: Sequence[dict[str, Any]]) -> None:
        """Restore from every rank's [`sharded_state_dict`][mbf.MBF.sharded_state_dict] file
        (in any order), on any number of ranks, in either storage.

        Each rank copies out only the blocks it owns now; load the files with
        ``torch.load(path, mmap=True)`` so that no rank reads more than its share of the
        curvature (on CPU). Raises ``ValueError`` naming what does not fit (a rank's file
        missing or given twice, files of different steps or models); the optimizer is then
        left as it was.
        """
        if not state_dicts:
            raise ValueError("MBF: no per-rank state dicts given (pass every rank's)")
        extra = checkpoint.join_shards([sd.get("mbf") for sd in state_dicts])
        ranked = {int(sd["mbf"]["shard"]["rank"]): sd for sd in state_dicts}
        sd = {k: v for k, v in ranked[0].items() if k != "mbf"}
        sharded = fsdp.merged_entry(state_dicts)
        if sharded is not None:  # files of FSDP2 ranks: the rows of every parameter's state
            sd["state"] = fsdp.join_param_state(state_dicts, self._wanted_rows())
        self._load_checked(sd, extra, sharded)

    def _wanted_rows(self) -> dict[int, tuple[int, int]]:
        """The rows of each parameter's state held here, by index (FSDP2: the local shard's;
        absent: all of them)."""
        if not isinstance(self._engine, FSDPEngine):
            return {}
        params = [p for group in self.param_groups for p in group["params"]]
        index_of = {id(p): i for i, p in enumerate(params)}
        engine = self._engine
        return {
            index_of[id(p)]: fsdp.shard_rows(int(p.shape[0]), engine.world_size, engine.rank)
            for s in engine.sharded
            for p in s.whole.params
        }

    def _load_checked(
        self, sd: dict[str, Any], extra: dict[str, Any], sharded: dict[str, Any] | None = None
    ) -> None:
        """Load ``sd`` (without its ``"mbf"`` entry) and the migrated ``extra``; on any error
        the optimizer is left exactly as it was."""
        store = self._store
        backup = (
            [dict(g) for g in self.param_groups],
            {p: dict(v) for p, v in self.state.items()},
            store.units,
            store.buckets,
        )
        whole_units, sharded_units = self._whole_units, getattr(self._engine, "sharded", None)
        tying = list(self._tying)
        try:
            self._load(sd, extra, sharded)
        except Exception:
            # A state dict that does not fit leaves the optimizer exactly as it was.
            groups, state, store.units, store.buckets = backup
            self._whole_units, self._tying = whole_units, tying
            if isinstance(self._engine, FSDPEngine) and sharded_units is not None:
                self._engine.sharded = sharded_units
            for group, saved in zip(self.param_groups, groups, strict=True):
                group.clear()
                group.update(saved)
            self.state.clear()
            self.state.update(state)
            self._hooks.remove()
            self._hooks.add(self._whole_units)
            self._schedule_collection()
            raise

    def _load(
        self, sd: dict[str, Any], extra: dict[str, Any], sharded: dict[str, Any] | None = None
    ) -> None:
        saved_state = sd.get("state", {})
        super().load_state_dict(sd)
        for group in self.param_groups:
            group.setdefault("inverse_root", 1)  # saved before the option: the inverse
            group.setdefault("tie_rows", False)  # saved before the option: untied
            group.setdefault("two_sided", False)
            _check_group(group)
        self._rebuild()
        # torch casts state to the parameter dtype; MBF keeps float32 state for half params.
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                for key, value in saved_state.get(index, {}).items():
                    if isinstance(value, Tensor):
                        value = value.to(device=p.device, dtype=state_dtype(p.dtype))
                        self.state[p][key] = value.clone()
                index += 1
        if isinstance(self._engine, FSDPEngine):
            if sharded is None:
                raise ValueError(
                    "MBF: an FSDP2 optimizer loads the per-rank files of FSDP2 ranks "
                    "(sharded_state_dict), not a whole state dict or data-parallel ranks' files"
                )
            fsdp.warn_restarted(fsdp.restore_units(self._engine, self._store, extra, sharded))
        else:
            units = self._store.units
            restarted = []
            if sharded is not None:  # units FSDP2 cut within each shard: not whole blocks here
                restarted = [u.name for u in units if u.name in sharded["within"]]
                units = [u for u in units if u.name not in sharded["within"]]
            for unit, saved in zip(units, checkpoint.saved_units(extra, units), strict=True):
                self._store.restore(unit, saved)
            for bucket, factored in zip(self._store.buckets, extra.get("factored", []),
                                        strict=False):
                bucket.factored = bool(factored)
            if sharded is not None:
                for bucket in self._store.buckets:
                    bucket.factored = all(
                        sharded["factored"].get(u.name, False) for u in bucket.units
                    )
            fsdp.warn_restarted(restarted)
        self._step_count = int(extra["step"])
        self._counters.update(extra["counters"])
        self._schedule_collection()


def _covers(members: list[Unit], whole: Tensor) -> bool:
    """Whether ``members``' blocks fill ``whole`` (a bucket's solved blocks) in order."""
    offset = 0
    for unit in members:
        if unit.offset != offset:
            return False
        offset += unit.curvature_blocks
    return offset == whole.shape[0]


def _make_engine(groups: list[dict[str, Any]], process_group: Any, model: nn.Module | None) -> Any:
    """An :class:`~mbf.fsdp.FSDPEngine` when the parameters are FSDP2 / ``Shard(0)`` DTensors
    (their mesh's group; other placements are refused), else :func:`mbf.distributed.make_engine`."""
    params = [p for group in groups for p in group["params"]]
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    group = find_mesh_group(params, names)
    if group is None:
        return make_engine(process_group, model)
    if process_group is False:
        raise ValueError(
            "MBF: process_group=False, but the parameters are sharded DTensors (FSDP2); "
            "a single-process optimizer cannot step shards"
        )
    return FSDPEngine(group)
