"""Reading one variable of a MATLAB ``.mat`` file (formats v4 to v7.2, through SciPy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from .errors import DataError


def read_mat_variable(path: Path, key: str) -> np.ndarray:
    """The array stored under ``key`` in ``path``; a DataError names the file otherwise.

    Only that variable is read (``variable_names``), so large files with other variables stay
    cheap. MATLAB v7.3 files are HDF5 and not readable by SciPy: the message says how to resave.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        contents = scipy.io.loadmat(str(path), variable_names=[key])
    except NotImplementedError as exc:  # SciPy's answer to v7.3 (HDF5) files
        raise DataError(
            f"{path}: MATLAB v7.3 (HDF5) files are not supported ({exc}); re-save it in MATLAB "
            f"with save(..., '-v7') or use the original file."
        ) from exc
    except Exception as exc:  # a damaged .mat fails in many ways (ValueError, OSError, ...)
        raise DataError(
            f"{path}: cannot read it as a MATLAB .mat file ({type(exc).__name__}: {exc}); the "
            "file is truncated or corrupt: replace it with a fresh copy of the original file."
        ) from exc
    if key not in contents:
        raise DataError(
            f"{path}: has no variable {key!r}; this is not the expected file "
            "(see docs/data.md for the file each dataset needs)."
        )
    value = contents[key]
    if (
        not isinstance(value, np.ndarray)
        or value.ndim != 2
        or not np.issubdtype(value.dtype, np.number)
    ):
        raise DataError(
            f"{path}: variable {key!r} is not a numeric matrix "
            f"(got {type(value).__name__} {getattr(value, 'shape', '')}); "
            "replace the file with the original one."
        )
    return value
