"""Small PNGs for the documentation: figures saved with a reduced palette.

Heat maps of dense matrices compress badly as full-colour PNGs; quantizing to a few hundred
colours keeps them readable and far below the size budget of files committed under ``docs/img``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

__all__ = ["save_compact_png"]


def save_compact_png(fig: Any, path: str | Path, *, dpi: int = 100, colors: int = 64) -> None:
    """Save a matplotlib figure as a palette PNG with at most ``colors`` colours."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    with Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
        palette.save(Path(path), format="PNG", optimize=True)
