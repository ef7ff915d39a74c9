"""The ``mbf-bench`` console script: :func:`mbf_bench.cli.main`, with one clear message when the
``bench`` extra is not installed (``pip install mbf-optim`` brings torch only)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

# The bench extra of pyproject.toml: distribution name -> the module it provides
# (tests/test_packaging.py checks that the two lists agree).
BENCH_IMPORTS = {
    "numpy": "numpy",
    "scipy": "scipy",
    "scikit-learn": "sklearn",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "tomli": "tomli",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mbf-bench``; exit status 2, naming the missing package, without the bench extra."""
    from . import cli

    try:
        return cli.main(argv)
    except ModuleNotFoundError as err:
        top = (err.name or "").split(".")[0]
        dists = [d for d, module in BENCH_IMPORTS.items() if module == top]
        if not dists:
            raise
        print(
            f"mbf-bench: error: {dists[0]} is not installed; the benchmark needs the bench "
            "extra: pip install 'mbf-optim[bench]'",
            file=sys.stderr,
        )
        return 2
