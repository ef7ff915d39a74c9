"""The solve over 16-bit inverses: widened per chunk, or one 16-bit batched product.

mnist-ae's shape (88,000 blocks of 32) on one thread: the float32 solve of today, the 16-bit
inverses widened to float32 1,024 blocks at a time (what MBF does), and one ``bmm`` in the
16-bit dtype (right-hand side rounded to it, the result rounded from float32 accumulation).
Prints the fastest of 5 runs of each, in seconds.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/curvature_dtype/solve_speed.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

BLOCKS, SIZE, CHUNK = 88_000, 32, 1024


def fastest(run: Callable[[], object], repeats: int = 5) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    torch.set_num_threads(1)
    inverse32 = torch.randn(BLOCKS, SIZE, SIZE)
    inverse32 = inverse32 + inverse32.mT
    rhs = torch.randn(BLOCKS, SIZE)
    work = torch.empty(CHUNK, SIZE, SIZE)
    out = torch.empty(BLOCKS, SIZE)
    base = fastest(lambda: torch.bmm(rhs.unsqueeze(1), inverse32))
    print(f"float32 bmm: {base:.3f} s")
    for dtype in (torch.bfloat16, torch.float16):
        inverse = inverse32.to(dtype)

        def widened(inverse: torch.Tensor = inverse) -> None:
            for lo in range(0, BLOCKS, CHUNK):
                hi = min(lo + CHUNK, BLOCKS)
                wide = work[: hi - lo].copy_(inverse[lo:hi])
                torch.bmm(rhs[lo:hi].unsqueeze(1), wide, out=out[lo:hi].unsqueeze(1))

        def direct(inverse: torch.Tensor = inverse, dtype: torch.dtype = dtype) -> torch.Tensor:
            return torch.bmm(rhs.to(dtype).unsqueeze(1), inverse).squeeze(1).float()

        print(f"{dtype}: widened per chunk {fastest(widened):.3f} s, "
              f"16-bit bmm {fastest(direct):.3f} s")


if __name__ == "__main__":
    main()
