"""Baselines from maintained libraries: SOAP, PSGD-Kron, Muon and Shampoo from
``pytorch-optimizer``, Schedule-Free AdamW from ``schedulefree``.

These libraries are not dependencies of the benchmark; the ``baselines`` extra installs them
(``pip install 'mbf-optim[baselines]'``). Each builder imports its library only when called, and a
missing one raises :class:`MissingBaselineLibrary` naming the extra. The defaults the registry
gives them are each library's documented ones (``docs/baselines.md`` cites where);
``docs/decisions.md`` says why ``pytorch-optimizer`` and not HeavyBall.

Muon orthogonalizes the updates of the hidden weight matrices only; everything else (embeddings,
the input layer, the output head, biases and norm gains) goes to the AdamW groups of the same
optimizer, as Muon's authors and ``pytorch-optimizer`` document: see :func:`muon_split`.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

import torch
from torch import nn

__all__ = [
    "EXTRA",
    "MissingBaselineLibrary",
    "build_muon",
    "build_psgd_kron",
    "build_schedulefree_adamw",
    "build_schedulefree_mbf",
    "build_shampoo",
    "build_soap",
    "muon_split",
    "trainable",
]

#: The optional extra of ``mbf-optim`` that installs the baseline libraries.
EXTRA = "baselines"


class MissingBaselineLibrary(ImportError):
    """A library baseline was asked for but its package is not installed."""


def _library(module: str, distribution: str, optimizer: str) -> ModuleType:
    """Import ``module``, or say which package and which extra the optimizer needs."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingBaselineLibrary(
            f"optimizer {optimizer!r} needs the {distribution} package, which is not installed; "
            f"install the {EXTRA} extra: pip install 'mbf-optim[{EXTRA}]' (in a clone: "
            f"pip install -e '.[{EXTRA}]')"
        ) from None


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` that require gradients; an error if there are none."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    return params


def build_soap(model: nn.Module, hp: dict[str, Any]) -> torch.optim.Optimizer:
    """``pytorch_optimizer.SOAP`` (Vyas et al. 2024): Adam in Shampoo's eigenbasis."""
    po = _library("pytorch_optimizer", "pytorch-optimizer", "soap")
    kw = dict(hp)
    betas = (kw.pop("beta1"), kw.pop("beta2"))
    return po.SOAP(trainable(model), betas=betas, **kw)


def build_psgd_kron(model: nn.Module, hp: dict[str, Any]) -> torch.optim.Optimizer:
    """``pytorch_optimizer.Kron`` (Li 2018; PSGD with Kronecker-factored preconditioners).

    Its preconditioner update is a chain of ``torch.einsum`` calls that contracts correctly only
    with ``opt_einsum`` present (without it torch contracts left to right, and a 1000x784 layer
    asks for a 2 TB intermediate), so ``opt_einsum`` is required here too.
    """
    po = _library("pytorch_optimizer", "pytorch-optimizer", "psgd-kron")
    _library("opt_einsum", "opt-einsum", "psgd-kron")
    return po.Kron(trainable(model), **hp)


def build_shampoo(model: nn.Module, hp: dict[str, Any]) -> torch.optim.Optimizer:
    """``pytorch_optimizer.Shampoo`` (Gupta, Koren & Singer 2018), the library's plain form."""
    po = _library("pytorch_optimizer", "pytorch-optimizer", "shampoo")
    return po.Shampoo(trainable(model), **hp)


def build_schedulefree_adamw(model: nn.Module, hp: dict[str, Any]) -> torch.optim.Optimizer:
    """``schedulefree.AdamWScheduleFree`` (Defazio et al. 2024), put in training mode.

    The library wants ``optimizer.train()`` before training steps and ``optimizer.eval()`` before
    evaluation; it starts in evaluation mode and refuses to step there. Built here in training
    mode, it works in a plain loop; ``mbf-bench run`` also switches it to evaluation mode around
    every evaluation (the averaged weights ``x`` are the ones evaluated).
    """
    sf = _library("schedulefree", "schedulefree", "schedulefree-adamw")
    kw = dict(hp)
    betas = (kw.pop("beta1"), kw.pop("beta2"))
    opt: torch.optim.Optimizer = sf.AdamWScheduleFree(trainable(model), betas=betas, **kw)
    opt.train()  # type: ignore[attr-defined]
    return opt


def build_schedulefree_mbf(model: nn.Module, hp: dict[str, Any]) -> torch.optim.Optimizer:
    """MBF's direction inside Defazio et al.'s schedule-free averaging and interpolation
    (``schedulefree.ScheduleFreeWrapper`` around :class:`mbf.MBF`), in training mode.

    The wrapper keeps the base sequence ``z`` (stepped by MBF's direction, taken at the
    interpolated point ``y`` where the loop computes gradients and MBF's hooks read the
    statistics) and the average ``x`` (what ``eval()`` puts in the model). Its interpolation
    ``sf_momentum`` takes the place of MBF's momentum, so ``momentum`` defaults to 0 here, as the
    library advises for a wrapped optimizer; no learning-rate schedule, as for Schedule-Free
    AdamW. ``sf_momentum``, ``weight_lr_power`` and ``r`` are the wrapper's; everything else
    is MBF's. MBF's methods the wrapper lacks (``diagnostics``, ``consolidate_state_dict``,
    ``sharded_state_dict``) are reached through it.
    """
    sf = _library("schedulefree", "schedulefree", "schedulefree-mbf")
    import mbf  # the library itself: no extra needed

    kw = dict(hp)
    outer = {"momentum": kw.pop("sf_momentum"), "weight_lr_power": kw.pop("weight_lr_power"),
             "r": kw.pop("r")}
    if not 0.0 < outer["momentum"] < 1.0:  # the wrapper divides by it in eval()
        raise ValueError(f"schedulefree-mbf: sf_momentum must be in (0, 1), got "
                         f"{outer['momentum']}")
    opt = _schedule_free_class(sf)(mbf.MBF(model, **kw), **outer)
    opt.train()
    return opt


@functools.cache
def _schedule_free_class(sf: ModuleType) -> type:
    """``sf.ScheduleFreeWrapper`` with attribute lookups that miss passed on to the wrapped
    optimizer (made once, when the library is first asked for)."""

    def __getattr__(self: Any, name: str) -> Any:
        if name == "base":  # not set yet (copy, unpickling): no recursion through it
            raise AttributeError(name)
        return getattr(self.base, name)

    return type("ScheduleFreeMBF", (sf.ScheduleFreeWrapper,),
                {"__getattr__": __getattr__, "__doc__": build_schedulefree_mbf.__doc__})


def muon_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(hidden, other)``: the parameters Muon orthogonalizes, and those AdamW updates.

    Hidden are the weights of two or more dimensions (matrices; convolution filters, which the
    library flattens) of every layer except the input layer and the output head, and except
    embeddings. The layers are the modules that own a parameter of two or more dimensions, in
    registration order (the order of the forward pass in every model of the benchmark): the
    first is the input layer (for a transformer it is the token embedding), the last the head.
    Everything else (biases, norm gains, embeddings, input layer, head) is ``other``. A model
    with fewer than three such layers has no hidden matrix, and Muon is then AdamW.
    """
    params = trainable(model)
    wanted = {id(p) for p in params}

    def matrices(module: nn.Module) -> set[int]:
        return {id(p) for p in module.parameters(recurse=False)
                if p.ndim >= 2 and id(p) in wanted}

    layers = [m for m in model.modules() if matrices(m)]
    hidden_ids = set().union(*(matrices(m) for m in layers))
    # Subtracted wherever else they are used: a head tied to the token embedding stays AdamW's.
    not_hidden = [*layers[:1], *layers[-1:]]
    not_hidden += [m for m in layers if isinstance(m, nn.Embedding | nn.EmbeddingBag)]
    for module in not_hidden:
        hidden_ids -= matrices(module)
    hidden = [p for p in params if id(p) in hidden_ids]
    other = [p for p in params if id(p) not in hidden_ids]
    return hidden, other


def build_muon(model: nn.Module, hp: dict[str, Any]) -> torch.optim.Optimizer:
    """``pytorch_optimizer.Muon`` (Jordan et al. 2024) on :func:`muon_split`'s hidden matrices,
    with the same optimizer's AdamW groups (``adamw_*`` settings) for everything else."""
    po = _library("pytorch_optimizer", "pytorch-optimizer", "muon")
    kw = dict(hp)
    adamw_betas = (kw.pop("adamw_beta1"), kw.pop("adamw_beta2"))
    hidden, other = muon_split(model)
    groups = [
        {"params": params, "use_muon": use}
        for params, use in ((hidden, True), (other, False))
        if params
    ]
    return po.Muon(groups, adamw_betas=adamw_betas, **kw)
