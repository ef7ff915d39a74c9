"""The optimizer registry of the benchmark: MBF and the baselines, with per-task defaults.

Every entry builds a ``torch.optim.Optimizer`` that works in the plain loop
``opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); opt.step()`` with a mean-reduced
loss. Which library or own implementation backs each entry, what was verified and what is
approximated is written down in ``docs/baselines.md``.

Hyperparameters are flat keyword values (JSON friendly): Adam's betas are ``beta1`` and
``beta2``. ``build_optimizer`` merges a spec's defaults with overrides and refuses unknown names.

The library baselines (:mod:`mbf_bench.baselines`: SOAP, PSGD-Kron, Muon, Shampoo, Schedule-Free
AdamW) carry their library's documented defaults and no per-family ones. Our own Shampoo and TNT
(``shampoo-ours``, ``tnt``) have not reproduced their published behaviour: their specs say
``validated=False`` and every listing prints them through :func:`display_name`, which marks them
"not validated". Our ``kfac`` was among them until its damping machinery (Levenberg-Marquardt
damping, KL clipping, pi-split damping: the autoencoder defaults) put it clearly ahead of SGD-m
per step on mnist-ae (``benchmarks/kfac_validation/``, ``docs/baselines.md``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import mbf

from . import baselines
from .optim.kfac import KFAC
from .optim.kronecker import TNT, Shampoo

__all__ = [
    "FAMILIES",
    "OPTIMIZERS",
    "TASK_DEFAULTS",
    "OptimizerSpec",
    "NOT_VALIDATED",
    "build_optimizer",
    "defaults_for",
    "display_name",
]

FAMILIES = ("autoencoder", "cnn", "gcn", "transformer")


@dataclass
class OptimizerSpec:
    """One registered optimizer.

    Attributes:
        name: registry key.
        description: one line for listings and reports.
        defaults: every hyperparameter the optimizer accepts, with its default value.
        build: ``build(model, hparams)`` with the full, merged hyperparameters.
        needs_model: whether it needs the module itself (hooks, module-aware blocks), not just
            its parameters.
        validated: False for an implementation that has not reproduced its published behaviour
            (our own K-FAC, Shampoo and TNT, ``docs/baselines.md``); listings and reports mark
            it through :func:`display_name`.
    """

    name: str
    description: str
    defaults: dict[str, Any]
    build: Callable[[nn.Module, dict[str, Any]], torch.optim.Optimizer]
    needs_model: bool
    validated: bool = True


#: The mark :func:`display_name` adds to an optimizer that is not validated.
NOT_VALIDATED = "(not validated)"


def display_name(name: str) -> str:
    """``name`` as every table and listing prints it: ``"kfac (not validated)"`` for an
    optimizer whose spec is not validated, the name itself otherwise (also for names that are
    not in the registry, such as the optimizers of old runs)."""
    spec = OPTIMIZERS.get(name)
    return f"{name} {NOT_VALIDATED}" if spec is not None and not spec.validated else name


def _sgdm(model: nn.Module, hp: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        baselines.trainable(model),
        lr=hp["lr"],
        momentum=hp["momentum"],
        weight_decay=hp["weight_decay"],
        nesterov=hp["nesterov"],
    )


def _adam_like(
    cls: type[torch.optim.Optimizer],
) -> Callable[[nn.Module, dict[str, Any]], torch.optim.Optimizer]:
    def build(model: nn.Module, hp: dict[str, Any]) -> torch.optim.Optimizer:
        return cls(  # type: ignore[call-arg]
            baselines.trainable(model),
            lr=hp["lr"],
            betas=(hp["beta1"], hp["beta2"]),
            eps=hp["eps"],
            weight_decay=hp["weight_decay"],
        )

    return build


def _mbf(estimator: str | None) -> Callable[[nn.Module, dict[str, Any]], torch.optim.Optimizer]:
    def build(model: nn.Module, hp: dict[str, Any]) -> torch.optim.Optimizer:
        kw = dict(hp)
        if estimator is not None:
            kw["estimator"] = estimator
        return mbf.MBF(model, **kw)

    return build


def _mbf_two_sided(model: nn.Module, hp: dict[str, Any]) -> torch.optim.Optimizer:
    """MBF with ``two_sided`` on the layers that own a hidden matrix (Muon's split: a
    transformer's attention and MLP projections, an autoencoder's inner layers), each layer's
    parameters together (its bias in its rows); the library defaults everywhere else."""
    hidden, _ = baselines.muon_split(model)
    ids = {id(p) for p in hidden}
    inner = {id(p) for m in model.modules()
             if any(id(p) in ids for p in m.parameters(recurse=False))
             for p in m.parameters(recurse=False)}
    params = baselines.trainable(model)
    groups = [{"params": [p for p in params if id(p) in inner], "two_sided": True},
              {"params": [p for p in params if id(p) not in inner], "two_sided": False}]
    return mbf.MBF([g for g in groups if g["params"]], model=model,
                   **{k: v for k, v in hp.items() if k != "two_sided"})


def _kfac(model: nn.Module, hp: dict[str, Any]) -> torch.optim.Optimizer:
    return KFAC(model, **hp)


def _shampoo(model: nn.Module, hp: dict[str, Any]) -> torch.optim.Optimizer:
    return Shampoo(baselines.trainable(model), **hp)


def _tnt(model: nn.Module, hp: dict[str, Any]) -> torch.optim.Optimizer:
    return TNT(baselines.trainable(model), **hp)


_MBF_SIGNATURE = inspect.signature(mbf.MBF).parameters
_MBF_DEFAULT_ESTIMATOR: str = _MBF_SIGNATURE["estimator"].default
# Constructor options of MBF that a run may override (`--set stat_buffer=8`), at MBF's defaults.
_MBF_OPTIONS = {
    k: _MBF_SIGNATURE[k].default for k in ("stat_buffer", "storage", "curvature_dtype")
}


def _mbf_defaults(**overrides: Any) -> dict[str, Any]:
    """An ``mbf.MBF`` entry's defaults: the library's, its default estimator and storage
    options, then ``overrides``."""
    return {**mbf.DEFAULTS, "estimator": _MBF_DEFAULT_ESTIMATOR, **_MBF_OPTIONS, **overrides}


# The schedule shared by the second-order methods (framework defaults; per task in TASK_DEFAULTS).
_CURVATURE = {"momentum": 0.9, "stat_decay": 0.9, "stat_every": 1, "inv_every": 20}
_DECAY = {"weight_decay": 0.0, "decoupled_weight_decay": False}
_ADAM = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
_KRON = {
    "invert_early": True,
    "accumulate": "ema",
    "conv_reshape": "filter",
    "max_precond_dim": 8192,
}

OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec(
            "sgdm",
            "SGD with heavy-ball momentum (torch.optim.SGD)",
            {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False},
            _sgdm,
            needs_model=False,
        ),
        OptimizerSpec(
            "adam",
            "Adam with L2 weight decay (torch.optim.Adam)",
            {"lr": 1e-3, **_ADAM, "weight_decay": 0.0},
            _adam_like(torch.optim.Adam),
            needs_model=False,
        ),
        OptimizerSpec(
            "adamw",
            "AdamW, decoupled weight decay (torch.optim.AdamW)",
            {"lr": 1e-3, **_ADAM, "weight_decay": 1e-2},
            _adam_like(torch.optim.AdamW),
            needs_model=False,
        ),
        OptimizerSpec(
            "mbf",
            f"mini-block Fisher (mbf.MBF) at the library defaults, estimator "
            f"{_MBF_DEFAULT_ESTIMATOR!r}",
            _mbf_defaults(),
            _mbf(None),
            needs_model=True,
        ),
        OptimizerSpec(
            "mbf-untied",
            "mini-block Fisher with a block per row and chunk (tie_rows=False) and stat_decay "
            "0.99: the library defaults of 2026-12-07, before tie_rows (benchmarks/tied_rows/)",
            _mbf_defaults(tie_rows=False, stat_decay=0.99),
            _mbf(None),
            needs_model=True,
        ),
        OptimizerSpec(
            "mbf-two-sided",
            "mini-block Fisher with two_sided=True on the hidden layers (Muon's split: a "
            "transformer's attention and MLP projections), the library defaults elsewhere "
            "(benchmarks/two_sided/)",
            {k: v for k, v in _mbf_defaults().items() if k != "two_sided"},  # set per group
            _mbf_two_sided,
            needs_model=True,
        ),
        OptimizerSpec(
            "mbf-batch",
            "mini-block Fisher, F_b from the minibatch gradient g_b g_b^T",
            {**mbf.DEFAULTS, **_MBF_OPTIONS},
            _mbf("batch"),
            needs_model=True,
        ),
        OptimizerSpec(
            "mbf-per_example",
            "mini-block Fisher, per-example empirical Fisher blocks from hooks",
            {**mbf.DEFAULTS, "loss_reduction": "mean", **_MBF_OPTIONS},
            _mbf("per_example"),
            needs_model=True,
        ),
        OptimizerSpec(
            "mbf-packed",
            "mini-block Fisher with storage='packed' (upper triangles: about half the memory)",
            _mbf_defaults(storage="packed"),
            _mbf(None),
            needs_model=True,
        ),
        OptimizerSpec(
            "mbf-bf16",
            "mini-block Fisher with curvature_dtype='bfloat16' (statistics and inverses in 16 "
            "bits)",
            _mbf_defaults(curvature_dtype="bfloat16"),
            _mbf(None),
            needs_model=True,
        ),
        OptimizerSpec(
            "mbf-packed-bf16",
            "mini-block Fisher with storage='packed' and curvature_dtype='bfloat16' (the least "
            "state)",
            _mbf_defaults(storage="packed", curvature_dtype="bfloat16"),
            _mbf(None),
            needs_model=True,
        ),
        OptimizerSpec(
            "mbf-sgd",
            "mini-block Fisher directions at SGD-m's block lengths (graft='sgd')",
            {**mbf.DEFAULTS, "graft": "sgd", "lr": 0.1, **_MBF_OPTIONS},
            _mbf(None),
            needs_model=True,
        ),
        OptimizerSpec(
            "mbf-paper",
            "the paper's MBF (mbf.PAPER: no grafting, first estimate as is, fixed refreshes)",
            {**mbf.DEFAULTS, **mbf.PAPER, **_MBF_OPTIONS},
            _mbf(None),
            needs_model=True,
        ),
        OptimizerSpec(
            "kfac",
            "K-FAC / KFC, empirical Fisher from hooks; LM damping and KL clip on autoencoders",
            {
                "lr": 1e-2,
                **_CURVATURE,
                "damping": 1e-1,
                **_DECAY,
                "pi_damping": False,
                "invert_early": True,
                "loss_reduction": "mean",
                "kl_clip": None,
                "adapt_damping": False,
                "adapt_every": 5,
                "adapt_omega": None,
            },
            _kfac,
            needs_model=True,
        ),
        OptimizerSpec(
            "shampoo-ours",
            "Shampoo, framework form: EMA statistics, eps damping (own, mbf_bench.optim.kronecker)",
            {"lr": 1e-2, **_CURVATURE, "damping": 1e-2, **_DECAY, **_KRON},
            _shampoo,
            needs_model=False,
            validated=False,
        ),
        OptimizerSpec(
            "tnt",
            "TNT tensor-normal training, true-label statistics (own, mbf_bench.optim.kronecker)",
            {"lr": 1e-4, **_CURVATURE, "damping": 1e-1, **_DECAY, **_KRON},
            _tnt,
            needs_model=False,
            validated=False,
        ),
        # Library baselines at their library's documented defaults (docs/baselines.md cites the
        # source of each); none has a per-family default, because no library documents one.
        OptimizerSpec(
            "schedulefree-adamw",
            "Schedule-Free AdamW (schedulefree.AdamWScheduleFree; no learning-rate schedule)",
            {"lr": 2.5e-3, **_ADAM, "weight_decay": 0.0, "warmup_steps": 0, "r": 0.0,
             "weight_lr_power": 2.0},
            baselines.build_schedulefree_adamw,
            needs_model=False,
        ),
        OptimizerSpec(
            "schedulefree-mbf",
            "MBF's direction in schedule-free averaging (schedulefree.ScheduleFreeWrapper around "
            "mbf.MBF; no learning-rate schedule)",
            _mbf_defaults(momentum=0.0, sf_momentum=0.9, weight_lr_power=2.0, r=0.0),
            baselines.build_schedulefree_mbf,
            needs_model=True,
        ),
        OptimizerSpec(
            "soap",
            "SOAP: Adam in Shampoo's eigenbasis (pytorch_optimizer.SOAP)",
            {"lr": 3e-3, "beta1": 0.95, "beta2": 0.95, "shampoo_beta": None, "eps": 1e-8,
             "weight_decay": 1e-2, "precondition_frequency": 10, "max_precondition_dim": 10000,
             "merge_dims": False, "precondition_1d": False, "correct_bias": True,
             "normalize_gradient": False},
            baselines.build_soap,
            needs_model=False,
        ),
        OptimizerSpec(
            "psgd-kron",
            "PSGD with Kronecker-factored preconditioners (pytorch_optimizer.Kron)",
            {"lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0, "weight_decouple": True,
             "pre_conditioner_update_probability": None, "max_size_triangular": 8192,
             "min_ndim_triangular": 2, "memory_save_mode": None,
             "momentum_into_precondition_update": True, "balance_prob": 0.01},
            baselines.build_psgd_kron,
            needs_model=False,
        ),
        OptimizerSpec(
            "muon",
            "Muon on the hidden weight matrices, AdamW on the rest (pytorch_optimizer.Muon)",
            {"lr": 2e-2, "momentum": 0.95, "weight_decay": 0.0, "weight_decouple": True,
             "nesterov": True, "ns_steps": 5, "use_adjusted_lr": False, "adamw_lr": 3e-4,
             "adamw_beta1": 0.9, "adamw_beta2": 0.95, "adamw_wd": 0.0, "adamw_eps": 1e-10},
            baselines.build_muon,
            needs_model=True,
        ),
        OptimizerSpec(
            "shampoo",
            "Shampoo, Gupta et al.'s form (pytorch_optimizer.Shampoo)",
            {"lr": 1e-3, "momentum": 0.0, "weight_decay": 0.0, "weight_decouple": False,
             "fixed_decay": False, "preconditioning_compute_steps": 1, "matrix_eps": 1e-6},
            baselines.build_shampoo,
            needs_model=False,
        ),
    )
}

_SCHED_AE = {"stat_every": 1, "inv_every": 20}
_SCHED_CNN = {"stat_every": 10, "inv_every": 100}
_SECOND_ORDER = (
    "mbf", "mbf-batch", "mbf-per_example", "mbf-packed", "mbf-bf16", "mbf-packed-bf16", "mbf-sgd",
    "mbf-paper", "mbf-untied", "mbf-two-sided", "kfac", "shampoo-ours", "tnt",
)

#: Per task family, per optimizer: overrides of the spec defaults. The searched values (lr,
#: damping, momentum, beta2, eps) are the settings the comparison protocol selected on the
#: family's task under an equal tuning budget (``benchmarks/protocol.sh``; records in
#: ``benchmarks/protocol/tune``, tables in ``docs/results.md``): autoencoders from mnist-ae
#: (8 trials of 40 CPU s each, training loss), the GCN from Cora (6 trials of 13 CPU s,
#: validation accuracy), CNNs from ResNet-8 on the CIFAR-10 sample (6 trials of 20 CPU s,
#: validation accuracy). Entries not in the protocol keep the source ``docs/baselines.md`` gives.
#: Rerun: ``python benchmarks/protocol.py tune --task mnist-ae --optimizers mbf --trials 8
#: --cpu-seconds 40`` (and the other lines of ``benchmarks/protocol.sh``).
_MBF_AE = {**_SCHED_AE, "lr": 6.22e-3, "damping": 9.85e-3}
_MBF_GCN = {**_SCHED_AE, "lr": 1.27e-2, "damping": 4.57e-4}
_MBF_CNN = {**_SCHED_CNN, "weight_decay": 5e-4, "lr": 1.27e-2, "damping": 4.57e-4}
TASK_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "autoencoder": {
        "sgdm": {"lr": 4.70e-3, "momentum": 0.879},
        "adam": {"lr": 3.05e-3, "beta2": 0.972, "eps": 3.19e-7},
        "mbf": _MBF_AE,
        "mbf-batch": _MBF_AE,
        "mbf-per_example": _MBF_AE,  # not tuned itself: the batch estimator's selection
        "mbf-packed": _MBF_AE,
        "mbf-bf16": _MBF_AE,  # not tuned itself: the float32 curvature's selection
        "mbf-packed-bf16": _MBF_AE,
        "mbf-sgd": {**_SCHED_AE},  # not in the protocol for this family
        "mbf-paper": {**_SCHED_AE, "lr": 6.27e-3, "damping": 0.763},
        # issue 19: the damping machinery, chosen on mnist-ae's validation loss (seed 100, 300
        # steps; benchmarks/kfac_validation/), not by the protocol
        "kfac": {**_SCHED_AE, "lr": 1.0, "damping": 1.0, "pi_damping": True, "kl_clip": 10.0,
                 "adapt_damping": True},
        "shampoo-ours": {**_SCHED_AE, "invert_early": False, "lr": 2.49e-3, "damping": 0.401},
        "tnt": {**_SCHED_AE, "lr": 0.788, "damping": 518.0},
    },
    "cnn": {
        "sgdm": {"lr": 6.27e-2, "momentum": 0.913, "weight_decay": 5e-4},
        "adam": {"lr": 6.22e-3, "beta2": 0.99, "eps": 2.01e-9, "weight_decay": 5e-4},
        **{name: {**_SCHED_CNN, "weight_decay": 5e-4} for name in _SECOND_ORDER},
        "mbf": _MBF_CNN,
        "mbf-batch": _MBF_CNN,
        "mbf-per_example": _MBF_CNN,  # not tuned itself: the batch estimator's selection
        "mbf-packed": _MBF_CNN,
        "mbf-bf16": _MBF_CNN,  # not tuned itself: the float32 curvature's selection
        "mbf-packed-bf16": _MBF_CNN,
        "mbf-sgd": {**_SCHED_CNN, "weight_decay": 5e-4, "lr": 0.149, "damping": 9.85e-3},
        "mbf-paper": {**_SCHED_CNN, "weight_decay": 5e-4, "lr": 1.12e-3, "damping": 3.54e-2},
        "kfac": {**_SCHED_CNN, "weight_decay": 5e-4, "lr": 0.249, "damping": 6.69e-2},
        "shampoo-ours": {**_SCHED_CNN, "weight_decay": 5e-4, "lr": 7.88e-3, "damping": 3.10e-2},
    },
    # The GCN's weight decay is Kipf & Welling's penalty in the task's loss (tasks.py), so no
    # optimizer gets one here (it would be reset to 0 by the task: a dead default).
    "gcn": {
        "sgdm": {"lr": 0.353, "momentum": 0.984},
        "adam": {"lr": 1.27e-2, "beta2": 0.998, "eps": 3.19e-8},
        **{name: {**_SCHED_AE} for name in _SECOND_ORDER},
        "mbf": _MBF_GCN,
        "mbf-batch": _MBF_GCN,
        "mbf-packed": _MBF_GCN,
        "mbf-bf16": _MBF_GCN,  # not tuned itself: the float32 curvature's selection
        "mbf-packed-bf16": _MBF_GCN,
        "mbf-sgd": {**_SCHED_AE, "lr": 0.353, "damping": 4.57e-4},
        "mbf-paper": {**_SCHED_AE, "lr": 3.53e-2, "damping": 4.57e-3},
        "kfac": {**_SCHED_AE, "lr": 0.249, "damping": 6.69e-2},
        "shampoo-ours": {**_SCHED_AE, "lr": 2.49e-2, "damping": 6.69e-4},
    },
    # Not in the protocol yet (issue 19): every optimizer at its own library's defaults (torch's
    # for Adam and AdamW, the library's for MBF); no library documents a value for transformers.
    "transformer": {},
}


def _spec(name: str) -> OptimizerSpec:
    spec = OPTIMIZERS.get(name)
    if spec is None:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    return spec


def defaults_for(name: str, family: str) -> dict[str, Any]:
    """The full hyperparameters of optimizer ``name`` for task family ``family``."""
    spec = _spec(name)
    if family not in TASK_DEFAULTS:
        raise ValueError(
            f"unknown task family {family!r}; choose one of: {', '.join(TASK_DEFAULTS)}"
        )
    return {**spec.defaults, **TASK_DEFAULTS[family].get(name, {})}


def build_optimizer(
    name: str, model: nn.Module, hparams: dict[str, Any] | None = None
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` for ``model``: the spec's defaults overridden by ``hparams``.

    Raises ``ValueError`` for an unknown optimizer or hyperparameter name (listing the valid
    ones); the optimizer's own checks reject bad values.
    """
    spec = _spec(name)
    hparams = dict(hparams or {})
    unknown = sorted(set(hparams) - set(spec.defaults))
    if unknown:
        raise ValueError(
            f"optimizer {name!r} has no hyperparameter(s) {', '.join(map(repr, unknown))}; "
            f"valid: {', '.join(sorted(spec.defaults))}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"build_optimizer: model must be an nn.Module, got {type(model).__name__}")
    return spec.build(model, {**spec.defaults, **hparams})
