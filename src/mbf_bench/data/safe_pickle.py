"""Restricted unpickling: the single place where this project reads pickled data files.

Plain ``pickle.load`` runs whatever callable a file names, so a doctored data file downloaded
from the internet could run arbitrary code. The CIFAR python batches and the Planetoid graphs
are pickles, so they are read here by an unpickler that resolves ONLY the globals a caller
allows (``find_class`` is the single door through which a pickle reaches any callable) and
refuses persistent ids. Anything else makes the load fail with a :class:`DataError`.

Allowed globals are written in one canonical spelling; the names found in files are mapped to
it first, so files written by Python 2 (``__builtin__``), by NumPy 1 (``numpy.core``) or NumPy 2
(``numpy._core``), and by old or new SciPy (``scipy.sparse.csr`` / ``scipy.sparse._csr``) all
load with the same allow-list.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import pickle
from collections.abc import Set
from pathlib import Path
from typing import Any, BinaryIO

from .errors import DataError

Global = tuple[str, str]

#: NumPy array, scalar and dtype reconstruction (pickle protocols 0-5). ``_codecs.encode`` is how
#: Python 3 writes ``bytes`` (an array's raw data) at protocol 2; it only turns a string into
#: bytes with a text codec, as PyTorch's ``weights_only`` unpickler also allows.
NUMPY_ARRAYS: frozenset[Global] = frozenset(
    {
        ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)
#: ``scipy.sparse.csr_matrix`` (its state is a dict of NumPy arrays and ints).
SCIPY_CSR: frozenset[Global] = frozenset({("scipy.sparse", "csr_matrix")})
#: Plain containers: ``collections.defaultdict(list)`` and friends.
CONTAINERS: frozenset[Global] = frozenset(
    {("collections", "defaultdict"), ("builtins", "list"), ("builtins", "dict")}
)

_NUMPY_CORE = "numpy.core"
_SCIPY_CSR_MODULES = {"scipy.sparse.csr", "scipy.sparse._csr"}


class _Refused(Exception):
    """Raised inside the unpickler; turned into a DataError by :func:`restricted_load`."""


def canonical_global(module: str, name: str) -> Global:
    """The spelling of a pickled global that allow-lists use (see the module docstring)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    if module == "numpy._core" or module.startswith("numpy._core."):
        module = _NUMPY_CORE + module[len("numpy._core") :]
    if module in _SCIPY_CSR_MODULES:
        module = "scipy.sparse"
    return module, name


def _resolve(module: str, name: str) -> Any:
    """Import an allowed global; ``numpy.core.*`` is looked up under NumPy 2's ``numpy._core``."""
    if module == _NUMPY_CORE or module.startswith(_NUMPY_CORE + "."):
        try:
            return getattr(
                importlib.import_module("numpy._core" + module[len(_NUMPY_CORE) :]), name
            )
        except ImportError:  # NumPy < 1.26 has no numpy._core
            pass
    return getattr(importlib.import_module(module), name)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, allowed: Set[Global], encoding: str) -> None:
        super().__init__(file, encoding=encoding)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        key = canonical_global(module, name)
        if key not in self._allowed:
            raise _Refused(f"the global {module}.{name}")
        return _resolve(*key)

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("a persistent id")


def restricted_load(
    file: str | Path | BinaryIO,
    allowed: Set[Global],
    encoding: str = "ASCII",
    *,
    name: str | None = None,
) -> Any:
    """Unpickle ``file`` allowing only the globals in ``allowed`` (canonical spelling).

    ``file`` is a path or a binary file object; ``name`` (default: the path) is what error
    messages call it. ``encoding`` is passed to the unpickler: ``"latin1"`` for Python-2 pickles
    holding NumPy arrays, ``"bytes"`` to keep Python-2 ``str`` as ``bytes`` (CIFAR batches).
    Raises :class:`DataError` if the file is missing, is not a complete pickle, or references
    anything outside ``allowed``.
    """
    label = name if name is not None else str(file)
    allowed = frozenset(canonical_global(m, n) for m, n in allowed)
    try:
        if isinstance(file, str | Path):
            with open(file, "rb") as handle:
                return _RestrictedUnpickler(handle, allowed, encoding).load()
        return _RestrictedUnpickler(file, allowed, encoding).load()
    except _Refused as exc:
        raise DataError(
            f"{label}: refused to unpickle it: it references {exc}, which a genuine data file of "
            "this kind never does. The file may have been tampered with; do not open it with "
            "plain pickle. Replace it with a fresh copy of the original file."
        ) from None
    except FileNotFoundError:
        raise DataError(f"{label}: file not found") from None
    except Exception as exc:  # a corrupt pickle can fail in almost any way
        raise DataError(
            f"{label}: not a readable pickle ({type(exc).__name__}: {exc}); the file is "
            "truncated or corrupt: replace it with a fresh copy of the original file."
        ) from exc
