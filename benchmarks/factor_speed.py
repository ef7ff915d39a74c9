"""Seconds and GFLOP/s of MBF's batched damped inverse against a batched candidate.

``lapack`` is :func:`mbf.linalg.damped_inverse` (one ``cholesky_ex`` + ``cholesky_inverse`` per
block, in place). ``schur`` is the candidate of issue 17 measured here and not adopted
(``docs/decisions.md``, section 3): a recursive block inversion by Schur complements written as
batched products over cache-sized runs of blocks, down to 8x8 leaves that a Gauss-Jordan
elimination inverts with operations across the run; blocks with a non-positive or non-finite
pivot go back through ``damped_inverse``. ``bmm`` is one batched ``s x s`` product over the same
blocks (a Newton-Schulz iteration costs two). All run on the same float32 blocks in one process,
alternating; each keeps its best of ``--repeats`` runs (read the ratios: the machine may be
shared). GFLOP/s counts ``s^3`` per block. Sections: random SPD stacks for every ``--sizes`` x
``--counts``; the buckets of MBF on the mnist-ae model (random data of the task's shape, default
options, the optimizer's relative damping); the error of both routes against float64 across
condition numbers.

Usage: OMP_NUM_THREADS=1 python benchmarks/factor_speed.py --json benchmarks/factor_speed.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from torch import Tensor

from mbf.linalg import FactorReport, damped_inverse

ROUTES = ("lapack", "schur")
CHUNK = 512  # blocks per run of the candidate (its workspace stays in cache)
LEAF = 8  # blocks of at most this size are inverted by vectorized Gauss-Jordan


class Leaf:
    """Gauss-Jordan inversion of ``(c, n, n)`` SPD blocks on the augmented ``[M | I]``, without
    pivoting, every view made once (per-view set-up costs as much as the arithmetic here)."""

    def __init__(self, count: int, size: int, pivots: Tensor) -> None:
        self.work = pivots.new_empty(count, size, 2 * size)
        self.left, self.right = self.work[:, :, :size], self.work[:, :, size:]
        eye = torch.eye(size)
        self.identity = eye.expand(count, size, size)
        self.column, self.row = pivots.new_empty(count, size), pivots.new_empty(count, size + 1)
        self.steps = []
        for k in range(size):  # step k changes only columns k .. size + k
            window = self.work[:, :, k : size + k + 1]
            self.steps.append((pivots[:, k], self.work[:, k, k], self.work[:, :, k], eye[k],
                               pivots[:, k, None], window[:, k], window))

    def __call__(self, m: Tensor) -> None:
        self.left.copy_(m)
        self.right.copy_(self.identity)
        column, row = self.column, self.row
        for pivot, diagonal, column_k, unit, pivot_column, row_k, window in self.steps:
            pivot.copy_(diagonal)
            torch.sub(column_k, unit, out=column)
            column.div_(pivot_column)
            row.copy_(row_k)
            window.addcmul_(column[:, :, None], row[:, None, :], value=-1)
        m.copy_(self.right)


class Split:
    """``[[A, C^T], [C, D]]^-1 = [[A^-1 + E^T S^-1 E, -E^T S^-1], [-S^-1 E, S^-1]]`` with
    ``E = C A^-1``, ``S = D - E C^T``: four batched products, halves recursively."""

    def __init__(self, count: int, size: int, pivots: Tensor) -> None:
        half, rest = size // 2, size - size // 2
        self.half, new = half, pivots.new_empty
        self.a, self.d = new(count, half, half), new(count, rest, rest)
        self.c, self.ct = new(count, rest, half), new(count, half, rest)
        self.e, self.ds = new(count, rest, half), new(count, rest, rest)
        self.aa, self.upper = new(count, half, half), new(count, half, rest)
        self.first = node(count, half, pivots[:, :half])
        self.second = node(count, rest, pivots[:, half:])

    def __call__(self, m: Tensor) -> None:
        h, a, c, ct, d, e = self.half, self.a, self.c, self.ct, self.d, self.e
        a.copy_(m[:, :h, :h])
        c.copy_(m[:, h:, :h])
        ct.copy_(m[:, :h, h:])
        d.copy_(m[:, h:, h:])
        self.first(a)
        torch.bmm(c, a, out=e)
        d.sub_(torch.bmm(e, ct, out=self.ds))
        self.second(d)
        torch.bmm(d, e, out=c)
        a.add_(torch.bmm(e.mT, c, out=self.aa))
        torch.bmm(e.mT, d, out=self.upper)
        m[:, :h, :h] = a
        m[:, h:, h:] = d
        torch.neg(c, out=m[:, h:, :h])
        torch.neg(self.upper, out=m[:, :h, h:])


def node(count: int, size: int, pivots: Tensor) -> Leaf | Split:
    return Leaf(count, size, pivots) if size <= LEAF else Split(count, size, pivots)


_workspaces: dict[tuple[int, int], tuple[Tensor, Leaf | Split, Tensor, Tensor]] = {}


def schur_inverse(fisher: Tensor, damping: Tensor, out: Tensor) -> FactorReport:
    """The candidate: ``(F + damping I)^-1`` of float32 CPU blocks into contiguous ``out``."""
    count, size = fisher.shape[0], fisher.shape[-1]
    out.copy_(fisher)
    out.diagonal(dim1=-2, dim2=-1).add_(damping.unsqueeze(-1))
    failed = torch.zeros(count, dtype=torch.bool)
    for lo in range(0, count, CHUNK):
        hi = min(lo + CHUNK, count)
        if (hi - lo, size) not in _workspaces:
            pivots = torch.empty(hi - lo, size)
            rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
            upper = torch.where(rows <= cols, rows * size + cols, cols * size + rows).reshape(-1)
            _workspaces[hi - lo, size] = (pivots, node(hi - lo, size, pivots), upper,
                                          torch.empty(hi - lo, size * size))
        pivots, root, upper, flat = _workspaces[hi - lo, size]
        chunk = out[lo:hi]
        root(chunk)
        # Exactly symmetric, as LAPACK's (packed storage keeps the upper triangle only).
        rows = chunk.view(hi - lo, size * size)
        torch.index_select(rows, 1, upper, out=flat)
        rows.copy_(flat)
        failed[lo:hi] = ~(pivots.amin(-1) > 0) | ~rows.sum(-1).isfinite()
    report = FactorReport(blocks=count)
    if bool(failed.any()):
        idx = failed.nonzero().squeeze(-1)
        again, part = damped_inverse(fisher.index_select(0, idx), damping.index_select(0, idx))
        out.index_copy_(0, idx, again)
        report.retried, report.fallback, report.nonfinite = (part.retried, part.fallback,
                                                             part.nonfinite)
    return report


def invert(route: str, fisher: Tensor, damping: Tensor, out: Tensor) -> FactorReport:
    if route == "schur":
        return schur_inverse(fisher, damping, out)
    return damped_inverse(fisher, damping, out=out)[1]


def best_times(fisher: Tensor, damping: Tensor, repeats: int) -> dict[str, float]:
    """Best seconds of each route and of one batched product over ``repeats`` alternating
    runs (into a kept buffer)."""
    out = torch.empty_like(fisher)
    best = dict.fromkeys((*ROUTES, "bmm"), float("inf"))
    for _ in range(repeats):
        for route in best:
            start = time.perf_counter()
            if route == "bmm":
                torch.bmm(fisher, fisher, out=out)
            else:
                invert(route, fisher, damping, out)
            best[route] = min(best[route], time.perf_counter() - start)
    return best


def spd_stack(count: int, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random SPD float32 blocks (Gram matrices of 2s random vectors) and a relative damping
    of 1e-3 times each block's mean eigenvalue, as MBF's default damping makes."""
    fisher = torch.empty(count, size, size)
    for lo in range(0, count, 10_000):  # a chunk at a time: no (B, s, 2s) temporary
        a = torch.randn(min(10_000, count - lo), size, 2 * size, generator=generator)
        torch.bmm(a, a.mT, out=fisher[lo : lo + a.shape[0]]).div_(2 * size)
    return fisher, 1e-3 * fisher.diagonal(dim1=-2, dim2=-1).mean(-1)


def mnist_ae_buckets() -> list[tuple[Tensor, Tensor]]:
    """(statistics, damping) of each bucket of MBF on mnist-ae after two steps."""
    from mbf import MBF
    from mbf_bench.tasks import get_task, stand_in_data

    torch.manual_seed(0)
    task = get_task("mnist-ae")
    data = stand_in_data(task, torch.Generator().manual_seed(0))
    model = task.model(data)
    opt = MBF(model)
    x = data.x_train.reshape(data.x_train.shape[0], -1)  # type: ignore[union-attr]
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x).reshape(x.shape), x).backward()
        opt.step()
    store = opt._store
    group = opt.param_groups[0]
    buckets = []
    for bucket in store.buckets:
        fisher = bucket.fisher.clone()
        damping = store.relative_damping(fisher, bucket.block_size, group["damping"], 1.0)
        buckets.append((fisher, damping))
    return buckets


def gflops(count: int, size: int, seconds: float) -> float:
    return count * size**3 / seconds / 1e9


def row(label: str, count: int, size: int, times: dict[str, float], threads: int) -> dict:
    old, new = times["lapack"], times["schur"]
    return {
        "case": label, "blocks": count, "size": size, "threads": threads,
        "lapack_s": old, "schur_s": new, "bmm_s": times["bmm"],
        "lapack_gflops": gflops(count, size, old), "schur_gflops": gflops(count, size, new),
        "bmm_gflops": gflops(count, size, times["bmm"]), "schur_speedup": old / new,
    }


def accuracy(sizes: list[int], conditions: list[float], count: int) -> list[dict]:
    """Relative Frobenius error of each route's inverse against float64, per condition number
    (blocks Q diag(lambda) Q^T with eigenvalues log-spaced from 1 down to 1 / condition)."""
    gen = torch.Generator().manual_seed(1)
    rows = []
    for size in sizes:
        for cond in conditions:
            q, _ = torch.linalg.qr(torch.randn(count, size, size, generator=gen,
                                               dtype=torch.float64))
            eig = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), size,
                                 dtype=torch.float64)
            fisher = ((q * eig) @ q.mT).float()
            entry: dict = {"size": size, "condition": cond, "blocks": count}
            # Against the float64 inverse of the float32 input actually given.
            ref = torch.linalg.inv(fisher.double())
            for route in ROUTES:
                inverse = torch.empty_like(fisher)
                report = invert(route, fisher, torch.zeros(count), inverse)
                err = (inverse.double() - ref).norm(dim=(-2, -1)) / ref.norm(dim=(-2, -1))
                entry[f"{route}_median"] = err.median().item()
                entry[f"{route}_max"] = err.max().item()
                entry[f"{route}_retried"] = report.retried + report.fallback
            rows.append(entry)
    return rows


def table(rows: list[dict], columns: list[str], fmt: Callable[[str, object], str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(c, r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def fmt(column: str, value: object) -> str:
    if isinstance(value, float):
        if column.endswith("_s"):
            return f"{value:.4f}"
        if column in ("condition",) or column.endswith(("_median", "_max")):
            return f"{value:.1e}"
        return f"{value:.2f}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,16,32,64")
    parser.add_argument("--counts", default="1000,10000,100000")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-mnist", action="store_true")
    parser.add_argument("--conditions", default="1e2,1e4,1e5,1e6")
    parser.add_argument("--json", help="write the records here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    counts = [int(c) for c in args.counts.split(",")]
    gen = torch.Generator().manual_seed(0)
    speed = []
    buckets = [] if args.skip_mnist else mnist_ae_buckets()
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for size in sizes:
            for count in counts:
                fisher, damping = spd_stack(count, size, gen)
                repeats = args.repeats if count * size * size <= 1e7 else max(1, args.repeats - 1)
                speed.append(row("random", count, size, best_times(fisher, damping, repeats),
                                 threads))
                print(speed[-1], flush=True)
                del fisher, damping
        if buckets:
            total = dict.fromkeys((*ROUTES, "bmm"), 0.0)
            for fisher, damping in buckets:
                times = best_times(fisher, damping, args.repeats)
                speed.append(row("mnist-ae bucket", fisher.shape[0], fisher.shape[-1], times,
                                 threads))
                print(speed[-1], flush=True)
                for key in total:
                    total[key] += times[key]
            blocks = sum(f.shape[0] for f, _ in buckets)
            speed.append(row("mnist-ae all", blocks, buckets[0][0].shape[-1], total, threads))
    columns = ["case", "threads", "size", "blocks", "lapack_s", "schur_s", "bmm_s",
               "lapack_gflops", "schur_gflops", "bmm_gflops", "schur_speedup"]
    print()
    print(table(speed, columns, fmt))
    acc = accuracy([8, 32], [float(c) for c in args.conditions.split(",")], 1000)
    print()
    print(table(acc, ["size", "condition", "lapack_median", "lapack_max", "schur_median",
                      "schur_max", "lapack_retried", "schur_retried"], fmt))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads_env": torch.get_num_threads(), "speed": speed,
                       "accuracy": acc}, f, indent=1)


if __name__ == "__main__":
    main()
