"""Routes to the damped inverse of ``(B, s, s)`` blocks, and the batch cut over threads (issue 17).

``routes``: on the current thread count, LAPACK's Cholesky alone, Cholesky + inverse (the
library's route, in place on the transposed view), ``torch.linalg.inv_ex``, one Newton-Schulz
iteration (two batched products) and one batched product; best of 5, wall time.
``split``: the library's route in one call against the batch cut in two halves run in two Python
threads (what ``mbf.linalg.in_parts`` does), with the largest difference of their results.

    OMP_NUM_THREADS=1 python benchmarks/factor_threads/measure.py routes
    OMP_NUM_THREADS=2 python benchmarks/factor_threads/measure.py split
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

CASES = [(8, 20000), (16, 20000), (26, 17000), (32, 20000), (64, 5000)]


def best(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def spd(count: int, size: int) -> Tensor:
    g = torch.randn(count, size, 2 * size)
    return g @ g.mT / (2 * size) + 1e-3 * torch.eye(size)


def inverse_into(a: Tensor, out: Tensor, info: Tensor) -> None:
    out.copy_(a)
    torch.linalg.cholesky_ex(out.mT, upper=True, out=(out.mT, info))
    torch.cholesky_inverse(out.mT, upper=True, out=out.mT)


def routes() -> None:
    for size, count in CASES:
        route_case(size, count)


def route_case(size: int, count: int) -> None:
    a = spd(count, size)
    out, info = torch.empty_like(a), torch.empty(count, dtype=torch.int32)

    def cholesky() -> None:
        out.copy_(a)
        torch.linalg.cholesky_ex(out.mT, upper=True, out=(out.mT, info))

    x = torch.linalg.inv(a)
    two = 2 * torch.eye(size)
    t_chol = best(cholesky)
    t_lib = best(lambda: inverse_into(a, out, info))
    t_lu = best(lambda: torch.linalg.inv_ex(a))
    t_ns = best(lambda: torch.bmm(x, two - torch.bmm(a, x)))
    t_bmm = best(lambda: torch.bmm(a, x))
    print(f"s={size} B={count}: chol {t_chol:.4f} chol+inv {t_lib:.4f} "
          f"({t_lib / count * 1e6:.2f} us/blk, {count * size**3 / t_lib / 1e9:.2f} GF/s s^3) "
          f"inv_ex {t_lu:.4f} NS-iter {t_ns:.4f} bmm {t_bmm:.4f}")


def split() -> None:
    pool = ThreadPoolExecutor(2)
    for size, count in CASES:
        if size != 16:
            split_case(size, count, pool)


def split_case(size: int, count: int, pool: ThreadPoolExecutor) -> None:
    a = spd(count, size)
    out, info = torch.empty_like(a), torch.empty(count, dtype=torch.int32)
    half = count // 2

    def halves() -> None:
        parts = [pool.submit(inverse_into, a[:half], out[:half], info[:half]),
                 pool.submit(inverse_into, a[half:], out[half:], info[half:])]
        for part in parts:
            part.result()

    inverse_into(a, out, info)
    reference = out.clone()
    halves()
    difference = (out - reference).abs().max().item()
    t_one = best(lambda: inverse_into(a, out, info))
    t_two = best(halves)
    print(f"s={size} B={count}: {torch.get_num_threads()} intra-op threads {t_one:.4f}  "
          f"split over 2 py threads {t_two:.4f}  speedup {t_one / t_two:.2f} "
          f"maxdiff {difference}")


if __name__ == "__main__":
    {"routes": routes, "split": split}[sys.argv[1]]()
