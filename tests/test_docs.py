"""Every public name of ``mbf`` is documented, and shown in the API reference.

``mkdocs build --strict`` (``make docs``) fails on a docstring that disagrees with its
signature or a cross-reference that does not resolve, but mkdocstrings silently leaves out a
member without a docstring; this test closes that gap. It reads the sources with griffe (the
parser mkdocstrings uses), as the site does.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

import mbf

griffe = pytest.importorskip("griffe", reason="griffe (the dev extra's mkdocstrings) is missing")

ROOT = Path(__file__).resolve().parents[1]
API_PAGE = ROOT / "docs" / "api.md"
# Public types that ``mbf`` does not export but its public methods return.
RETURNED = ("optimizer.UnitState",)


def _section_names(obj: Any, kind: str) -> set[str]:
    sections = obj.docstring.parse("google") if obj.docstring else []
    return {item.name for s in sections if s.kind.value == kind for item in s.value}


def _undocumented(obj: Any) -> list[str]:
    """Public members of a class (its own: griffe lists no inherited ones here) left undescribed."""
    params = _section_names(obj, "parameters")
    attrs = _section_names(obj, "attributes")
    missing = []
    if "__init__" in obj.members:
        # A dataclass's fields are its constructor's arguments, described as Attributes.
        signature = [p.name for p in obj["__init__"].parameters if p.name != "self"]
        public = [p for p in signature if not p.startswith("_")]
        missing += [f"{obj.name}({p}=...)" for p in public if p not in params | attrs]
    for name, member in obj.members.items():
        if name.startswith("_"):
            continue
        # Fields are described in the class's Attributes section; attributes that keep a
        # constructor argument, by that argument.
        described = member.is_attribute and (name in attrs or name in params)
        if not (member.docstring and member.docstring.value.strip()) and not described:
            missing.append(f"{obj.name}.{name}")
    return missing


def test_every_public_name_has_a_docstring() -> None:
    package = griffe.load("mbf", search_paths=[str(ROOT / "src")], docstring_parser="google")
    assert package.docstring is not None
    assert set(package.exports or []) == set(mbf.__all__)
    missing = []
    for path in [*mbf.__all__, "__version__", *RETURNED]:
        obj = package[path]
        if not (obj.docstring and obj.docstring.value.strip()):
            missing.append(path)
        if obj.is_class:
            missing += _undocumented(obj)
    assert not missing, f"public names without documentation: {missing}"


def test_api_page_shows_every_public_name() -> None:
    shown = set(re.findall(r"^::: (\S+)", API_PAGE.read_text(), re.M))
    wanted = {f"mbf.{name}" for name in [*mbf.__all__, "__version__", *RETURNED]}
    assert not wanted - shown, f"not in docs/api.md: {sorted(wanted - shown)}"
