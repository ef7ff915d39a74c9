"""Checks of MBF's hyperparameters and parameters, and sizes written for people.

One home for every rule, so that construction, ``add_param_group`` and ``step`` (which sees
changes made through ``param_groups`` after construction) apply the same ones, and every refusal
names the culprit: a ``TypeError`` for a value of the wrong kind, a ``ValueError`` for a value out
of range. NumPy scalars and 0-d tensors count as numbers; ``bool`` does not (``lr=True`` is a
mistake, not ``1.0``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CURVATURE_DTYPES",
    "ESTIMATORS",
    "GRAFTS",
    "INVERSE_ROOTS",
    "NONFINITE_POLICIES",
    "REDUCTIONS",
    "check_choice",
    "check_curvature_dtype",
    "check_group",
    "check_params",
    "format_bytes",
    "positive_int",
]

#: Step lengths a block's direction can be grafted onto (MBF's ``graft``): Adam's or SGD-m's.
GRAFTS = (None, "adam", "sgd")
#: MBF's ``inverse_root``: each block preconditioned by ``(F + damping I)^(-1/r)``.
INVERSE_ROOTS = (1, 2)
#: MBF's ``estimator``, ``loss_reduction`` and ``nonfinite`` choices.
ESTIMATORS = ("batch", "per_example")
REDUCTIONS = ("mean", "sum")
NONFINITE_POLICIES = ("skip", "raise")
#: MBF's ``curvature_dtype`` choices (``None``: the parameters' dtype, at least float32).
CURVATURE_DTYPES = (None, torch.float32, torch.bfloat16)
#: Why ``torch.float16`` is refused (``docs/decisions.md``, 16-bit curvature).
_FLOAT16_REFUSED = (
    "torch.float16 would need a scale per block: squared gradients underflow its range (smallest "
    "normal 6.1e-5) and the inverses of small blocks overflow it (largest 65504); use "
    "torch.bfloat16 (float32's range)"
)


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """A ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"MBF: {name} must be one of {choices}, got {value!r}")


def check_curvature_dtype(value: Any) -> torch.dtype | None:
    """MBF's ``curvature_dtype`` as a ``torch.dtype`` (or ``None``); a name such as
    ``"bfloat16"`` is accepted for configuration files. Anything else is refused, naming the
    option: a ``TypeError`` for a value that is not a dtype, a ``ValueError`` for another one."""
    if isinstance(value, str):
        named = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(named, torch.dtype):
            raise ValueError(
                f"MBF: curvature_dtype must be one of {CURVATURE_DTYPES}, got {value!r}"
            )
        value = named
    if value is not None and not isinstance(value, torch.dtype):
        raise TypeError(
            f"MBF: curvature_dtype must be a torch.dtype or None, got {value!r} "
            f"({type(value).__name__})"
        )
    if value is torch.float16:
        raise ValueError(f"MBF: curvature_dtype={value} is not supported: {_FLOAT16_REFUSED}")
    check_choice("curvature_dtype", value, CURVATURE_DTYPES)
    return value


def _real(name: str, value: Any) -> float:
    """``value`` as a float, or a ``TypeError`` naming ``name``."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = type(value).__name__
        raise TypeError(f"MBF: {name} must be a real number, got {value!r} ({kind})")
    return float(value)


def _in_range(name: str, value: Any, low: float, high: float, *, closed_high: bool) -> None:
    x = _real(name, value)
    ok = low <= x <= high if closed_high else low <= x < high
    if not (ok and math.isfinite(x)):
        bracket = "]" if closed_high else ")"
        raise ValueError(f"MBF: {name} must be in [{low:g}, {high:g}{bracket}, got {value!r}")


def _nonnegative(name: str, value: Any) -> None:
    x = _real(name, value)
    if not (x >= 0.0 and math.isfinite(x)):
        raise ValueError(f"MBF: {name} must be a finite number >= 0, got {value!r}")


def positive_int(name: str, value: Any) -> int:
    """``value`` as a positive ``int`` (NumPy and torch integers accepted), else an error."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"MBF: {name} must be a positive integer, got {value!r} ({type(value).__name__})"
        )
    if value <= 0:
        raise ValueError(f"MBF: {name} must be a positive integer, got {value!r}")
    return int(value)


def check_group(group: dict[str, Any]) -> None:
    """Refuse a param group with a hyperparameter of the wrong type or out of range.

    Integer settings given as NumPy or torch integers are stored back as ``int``.
    """
    _nonnegative("lr", group["lr"])
    _in_range("momentum", group["momentum"], 0.0, 1.0, closed_high=False)
    _nonnegative("damping", group["damping"])
    _in_range("stat_decay", group["stat_decay"], 0.0, 1.0, closed_high=False)
    for key in ("stat_every", "inv_every", "max_block_size"):
        group[key] = positive_int(key, group[key])
    _nonnegative("weight_decay", group["weight_decay"])
    clip = group["kl_clip"]
    if clip is not None:
        x = _real("kl_clip", clip)
        if not (x > 0.0 and math.isfinite(x)):
            raise ValueError(f"MBF: kl_clip must be None or a finite number > 0, got {clip!r}")
    if group["graft"] not in GRAFTS:
        raise ValueError(f"MBF: graft must be one of {GRAFTS}, got {group['graft']!r}")
    _in_range("graft_beta2", group["graft_beta2"], 0.0, 1.0, closed_high=False)
    eps = _real("graft_eps", group["graft_eps"])
    if not (eps > 0.0 and math.isfinite(eps)):
        raise ValueError(f"MBF: graft_eps must be a finite number > 0, got {group['graft_eps']!r}")
    if group["inverse_root"] not in INVERSE_ROOTS or isinstance(group["inverse_root"], bool):
        raise ValueError(
            f"MBF: inverse_root must be one of {INVERSE_ROOTS}, got {group['inverse_root']!r}"
        )
    group["inverse_root"] = int(group["inverse_root"])
    for key in ("decoupled_weight_decay", "bias_correction", "early_refresh", "relative_damping",
                "tie_rows", "two_sided"):
        if not isinstance(group[key], bool):
            raise TypeError(f"MBF: {key} must be True or False, got {group[key]!r}")
    if group["two_sided"] and not group["tie_rows"]:
        raise ValueError(
            "MBF: two_sided=True needs tie_rows=True (the output side's blocks are those of a "
            "layer's tied rows)"
        )


def check_params(groups: Iterable[dict[str, Any]]) -> None:
    """Refuse parameters MBF cannot precondition: sparse and complex tensors.

    Complex parameters would need Hermitian statistics ``g g^H`` and a complex factorization;
    rather than precondition them wrongly, MBF refuses them (split them into real and imaginary
    parts with ``torch.view_as_real`` to train them with MBF).
    """
    for g, group in enumerate(groups):
        for i, p in enumerate(group["params"]):
            where = f"param group {g}, parameter {i} ({tuple(p.shape)}, {p.dtype})"
            if p.is_sparse:
                raise ValueError(f"MBF: sparse parameters are not supported: {where}")
            if torch.is_complex(p):
                raise ValueError(
                    f"MBF: complex parameters are not supported: {where}; keep them as real "
                    "pairs (torch.view_as_real) or train them with another optimizer"
                )


def format_bytes(count: float) -> str:
    """``1536`` -> ``"1.50 KiB (1,536 bytes)"``: three significant digits and the exact count."""
    value, unit = float(count), "bytes"
    for name in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024:
            break
        value, unit = value / 1024, name
    if unit == "bytes":
        return f"{int(count):,} bytes"
    return f"{value:.3g} {unit} ({int(count):,} bytes)"
