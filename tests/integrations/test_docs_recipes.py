"""Every recipe of ``docs/integrations.md`` runs as written (offline, on the CPU)."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"
SKIP_MARK = "<!-- not run:"
BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", re.DOTALL)


def _recipes() -> list[tuple[str, str]]:
    """``(title, code)`` of each python block not preceded by a ``<!-- not run: ... -->`` line."""
    text = DOC.read_text()
    out = []
    for match in BLOCK.finditer(text):
        if match.group("before").startswith(SKIP_MARK):
            continue
        heading = [h for h in re.findall(r"^## (.+)$", text[: match.start()], re.M)][-1]
        out.append((heading, match.group("code")))
    return out


RECIPES = _recipes()
NEEDS = {"Hugging Face": ("transformers", "accelerate"), "Lightning": ("lightning",)}


def test_the_doc_has_its_recipes() -> None:
    titles = [t for t, _ in RECIPES]
    assert len(titles) == 3 and any("Trainer" in t for t in titles), titles


@pytest.mark.parametrize(("title", "code"), RECIPES, ids=[t for t, _ in RECIPES])
def test_recipe_runs(title: str, code: str, tmp_path: Path, monkeypatch) -> None:
    for key, modules in NEEDS.items():
        if key in title:
            for name in modules:
                pytest.importorskip(name, reason="the recipe needs the 'integrations' extra")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict[str, object] = {"__name__": "recipe"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the trainers' advice about workers, log intervals, ...
        exec(compile(code, f"{DOC.name}: {title}", "exec"), namespace)  # noqa: S102
    assert os.getcwd() == str(tmp_path)
    mbf_objects = [v for v in namespace.values() if type(v).__name__ == "MBF"]
    assert mbf_objects, "a recipe builds an MBF optimizer"
    assert all(o.counters["steps"] > 0 for o in mbf_objects), "and steps it"
    if "Trainer" in title or "Lightning" in title:  # resumed at step 8, stopped at 12
        assert namespace["opt"].counters["steps"] == 12  # type: ignore[attr-defined]

