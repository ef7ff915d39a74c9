"""Hyperparameter settings as text: ``--set key=value`` values and the TOML files of ``--config``.

Values are parsed as TOML values (``1e-3`` float, ``20`` int, ``true`` bool, ``[0.9, 0.99]``
array, ``"x"`` string); a bare word that is not valid TOML (``batch``) is taken as a string, and
``none``/``null`` mean Python ``None`` (TOML has no null). The same rules serve ``--grid``.

A config file holds one table per optimizer, e.g.::

    task = "mnist-ae"      # optional: the task it was tuned for

    [mbf]
    lr = 0.001
    damping = 0.01

``mbf-bench tune`` writes such files with :func:`dump_config` (flat tables of scalars only, which
is all a hyperparameter file needs, so no TOML-writer dependency).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser from PyPI
    import tomli as tomllib

__all__ = [
    "dump_config",
    "format_value",
    "load_config",
    "parse_assignment",
    "parse_grid",
    "parse_value",
]

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def parse_value(text: str) -> Any:
    """A ``--set`` value: TOML scalar or array, ``none``/``null`` -> None, else the raw string."""
    stripped = text.strip()
    if stripped.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {stripped}")["v"]
    except tomllib.TOMLDecodeError:
        return stripped


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"lr=1e-3"`` -> ``("lr", 0.001)``; ``ValueError`` naming the text when malformed."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or not value.strip():
        raise ValueError(f"expected key=value, got {text!r} (example: --set lr=1e-3)")
    return key, parse_value(value)


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["lr=1e-4,3e-4", "damping=1e-3"]`` -> ``{"lr": [1e-4, 3e-4], "damping": [1e-3]}``."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        parts = [v for v in values.split(",") if v.strip()]
        if not sep or not key or not parts:
            raise ValueError(f"expected key=v1,v2,..., got {item!r} (example: lr=1e-4,3e-4)")
        if key in grid:
            raise ValueError(f"grid key {key!r} given twice")
        grid[key] = [parse_value(v) for v in parts]
    return grid


def load_config(path: Path) -> dict[str, Any]:
    """Read a TOML config; ``ValueError`` naming the file when it is missing or malformed."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"config file {path} is not valid TOML: {error}") from None


def format_value(value: Any) -> str:
    """A value as TOML text (inverse of :func:`parse_value` for scalars and flat arrays)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as a TOML value")


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else format_value(key)


def dump_config(
    tables: Mapping[str, Mapping[str, Any]],
    top: Mapping[str, Any] | None = None,
    comments: list[str] | None = None,
) -> str:
    """TOML text: ``comments`` as ``#`` lines, ``top`` keys, then one table per entry.

    ``None`` values are left out (TOML has no null; absent keys fall back to the defaults).
    """
    lines = [f"# {c}" for c in comments or []]
    lines += [f"{_key(k)} = {format_value(v)}" for k, v in (top or {}).items() if v is not None]
    for name, table in tables.items():
        lines += ["", f"[{_key(name)}]"]
        lines += [f"{_key(k)} = {format_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


def positive_list(kind: type[int] | type[float], example: str) -> Callable[[str], list]:
    """An argparse ``type``: a comma- or space-separated list of positive ``kind`` values."""
    noun = "integers" if kind is int else "numbers"

    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.replace(",", " ").split()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {noun} like {example}, got {text!r}"
            ) from None
        if not values or min(values) <= 0:
            raise argparse.ArgumentTypeError(f"expected positive {noun}, got {text!r}")
        return values

    return parse


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` (default 1) for commands made of many small batched operations."""
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads while the command runs (default 1: its many small batched "
        "operations gain nothing from more, and lose much on a busy machine)",
    )


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the body with ``count`` torch intra-op threads, restoring the previous number."""
    if count < 1:
        raise ValueError(f"--threads must be at least 1, got {count}")
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
