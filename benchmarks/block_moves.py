"""Moving a Linear unit's tensors into its padded ``(num_blocks, block_size)`` blocks: strided
piece copies against one gather (issue 17; the two routes of ``BlockLayout.to_blocks``, chosen
by ``mbf.blocks.GATHER_BELOW``), microseconds per call, one thread.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/block_moves.py
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch

import mbf.blocks
from mbf.blocks import linear_layout

SHAPES = [(32, 32), (96, 32), (128, 128), (384, 128), (512, 128), (128, 512), (65, 128),
          (1000, 784), (100, 100)]


def per_call_us(fn: Callable[[], object], calls: int = 2000) -> float:
    for _ in range(50):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    torch.set_num_threads(1)
    for rows, columns in SHAPES:
        weight, bias = torch.randn(rows, columns), torch.randn(rows)
        layout = linear_layout(weight, bias, 32)
        out = torch.empty(layout.num_blocks, layout.block_size)
        times = {}
        for route, threshold in (("pieces", 0), ("gather", 10**12)):
            mbf.blocks.GATHER_BELOW = threshold
            times[route] = per_call_us(
                functools.partial(layout.to_blocks, [weight, bias], out=out))
        print(f"{rows}x{columns}+{rows} s={layout.block_size} chunks={layout.chunks}: "
              f"pieces {times['pieces']:.1f} us  gather {times['gather']:.1f} us")


if __name__ == "__main__":
    main()
