"""Locating data files: a loader accepts the folder holding its files or a parent folder.

Why: the benchmark has one ``--data-dir`` (for instance ``../shared/data``) whose subfolders hold
each dataset, while a user may point a loader straight at the folder of one dataset.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import DataError

#: What every "file not found" message ends with.
DATA_DIR_HINT = "pass that folder (or a parent of it) as data_dir (mbf-bench: --data-dir)"


def existing_dir(data_dir: str | Path, what: str) -> Path:
    """``data_dir`` as a Path, or a DataError saying it does not exist."""
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(f"{what}: data folder {path} does not exist; {DATA_DIR_HINT}")
    return path


def search_dirs(data_dir: Path, subfolders: Sequence[str]) -> list[Path]:
    """``data_dir`` itself, then those of its named subfolders that exist, in that order."""
    found = [data_dir]
    found += [data_dir / name for name in subfolders if (data_dir / name).is_dir()]
    return found


def find_first(dirs: Iterable[Path], names: Sequence[str]) -> Path | None:
    """The first existing file among ``dir / name`` (folders outer loop, names inner loop)."""
    for folder in dirs:
        for name in names:
            candidate = folder / name
            if candidate.is_file():
                return candidate
    return None


def describe(dirs: Sequence[Path]) -> str:
    """A short list of the folders searched, for error messages."""
    return ", ".join(str(d) for d in dirs)


def resolve_file(
    path: str | Path, names: Sequence[str], subfolders: Sequence[str], what: str
) -> Path:
    """``path`` if it is a file, else the first of ``names`` in it or its ``subfolders``."""
    given = Path(path).expanduser()
    if given.is_file():
        return given
    if not given.is_dir():
        raise DataError(
            f"{what}: {given} does not exist; download {names[0]} and pass its path "
            f"(or a folder holding it) (mbf-bench: --data-dir)."
        )
    dirs = search_dirs(given, subfolders)
    found = find_first(dirs, names)
    if found is None:
        raise DataError(
            f"{what}: no {' or '.join(names)} in {describe(dirs)}; put the file there or pass "
            "its path (mbf-bench: --data-dir)."
        )
    return found
