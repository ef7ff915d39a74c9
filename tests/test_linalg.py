"""The batched damped inverse (``mbf.linalg.damped_inverse``) against float64 references.

Issue 17 measured a batched candidate (``benchmarks/factor_speed.py``) and kept the per-block
LAPACK route; these tests pin what any route must keep: accuracy across block sizes and
condition numbers, per-block damping, the retries and fallbacks and their counts, ``out=``, and
each block's result independent of the blocks factored with it (ranks and packed chunks factor
different slices of a bucket and must agree bitwise).
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

import mbf.linalg
from mbf.linalg import FactorReport, damped_inverse

EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}


def spd_blocks(count: int, size: int, condition: float, seed: int) -> Tensor:
    """float64 ``Q diag(lambda) Q^T`` with eigenvalues log-spaced from 1 to ``1/condition``."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(count, size, size, generator=gen, dtype=torch.float64))
    eig = torch.logspace(0, -math.log10(condition), size, dtype=torch.float64)
    return (q * eig) @ q.mT


def relative_error(inverse: Tensor, matrices: Tensor) -> Tensor:
    """Per block ``|X - M^-1|_F / |M^-1|_F`` against the float64 inverse of ``matrices``."""
    reference = torch.linalg.inv(matrices.double())
    return (inverse.double() - reference).norm(dim=(-2, -1)) / reference.norm(dim=(-2, -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_size_matches_the_float64_inverse(dtype: torch.dtype) -> None:
    """Sizes 1..70 (odd ones included), damping 1e-2: error within a small multiple of the
    condition number times the unit roundoff."""
    gen = torch.Generator().manual_seed(0)
    for size in range(1, 71):
        a = torch.randn(6, size, 2 * size, generator=gen, dtype=torch.float64) / (2 * size) ** 0.5
        fisher = a @ a.mT
        inverse, report = damped_inverse(fisher.to(dtype), 1e-2)
        damped = fisher + 1e-2 * torch.eye(size, dtype=torch.float64)
        bound = 10 * size * torch.linalg.cond(damped).max().item() * EPS[dtype]
        assert report == FactorReport(blocks=6), size
        assert inverse.dtype == dtype
        assert relative_error(inverse, damped.to(dtype)).max().item() < bound, size
        assert torch.equal(inverse, inverse.mT), size  # exactly symmetric


@pytest.mark.parametrize("condition", [1e2, 1e4, 1e5, 1e6])
def test_error_grows_with_the_condition_number_no_faster_than_it(condition: float) -> None:
    """float32 blocks of 32 (mnist-ae's size): relative damping makes condition numbers up to
    about 1e4-1e6. The error stays below condition x unit roundoff x a small factor."""
    matrices = spd_blocks(64, 32, condition, seed=1).float()
    inverse, report = damped_inverse(matrices, 0.0)
    assert report.retried == report.fallback == 0
    err = relative_error(inverse, matrices)
    assert err.max().item() < 4 * condition * EPS[torch.float32]


def test_per_block_damping_equals_each_block_alone() -> None:
    """A ``(B,)`` damping: each block inverted with its own, bitwise as when factored alone
    with that number."""
    matrices = spd_blocks(5, 7, 1e3, seed=2).float()
    damping = torch.tensor([0.0, 1e-3, 0.1, 1.0, 10.0])
    inverse, _ = damped_inverse(matrices, damping)
    eye = torch.eye(7, dtype=torch.float64)
    for b in range(5):
        alone, _ = damped_inverse(matrices[b : b + 1], float(damping[b]))
        assert torch.equal(inverse[b], alone[0]), b
        err = relative_error(inverse[b : b + 1], matrices[b : b + 1].double() + damping[b] * eye)
        assert err.item() < 1e-4, b


def test_each_block_does_not_depend_on_its_neighbours() -> None:
    """Slices, a permutation and the whole stack give every block the same bits."""
    matrices = spd_blocks(40, 12, 1e3, seed=3).float()
    whole, _ = damped_inverse(matrices, 1e-3)
    for lo, hi in ((0, 1), (3, 17), (17, 40)):
        part, _ = damped_inverse(matrices[lo:hi], 1e-3)
        assert torch.equal(part, whole[lo:hi])
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    shuffled, _ = damped_inverse(matrices[order], 1e-3)
    assert torch.equal(shuffled, whole[order])


def test_out_buffer_is_filled_and_returned_and_the_input_kept() -> None:
    matrices = spd_blocks(9, 6, 1e2, seed=4).float()
    before = matrices.clone()
    out = torch.full_like(matrices, float("nan"))  # e.g. last time's inverses
    inverse, _ = damped_inverse(matrices, 1e-2, out=out)
    assert inverse.data_ptr() == out.data_ptr()
    assert torch.equal(matrices, before)
    assert torch.equal(out, damped_inverse(matrices, 1e-2)[0])


def test_failing_blocks_are_retried_or_fall_back_and_counted_among_good_ones() -> None:
    """Indefinite, NaN, infinite and all-zero (with zero damping) blocks among good ones: each
    gets today's retry (10x/100x/1000x the damping in float64) or fallback ``(1/damping) I``,
    counted; the good blocks are exactly as when factored alone."""
    size = 4
    eye = torch.eye(size)
    good = spd_blocks(3, size, 10.0, seed=5).float()
    indefinite = -0.5 * eye  # positive definite with 10x the damping 0.1
    hopeless = -1e6 * eye  # indefinite even with 1000x: falls back
    nan = torch.full((size, size), float("nan"))
    inf = eye.clone()
    inf[1, 2] = inf[2, 1] = float("inf")
    fisher = torch.stack([good[0], indefinite, nan, good[1], hopeless, inf, good[2]])
    inverse, report = damped_inverse(fisher, 0.1)
    assert (report.blocks, report.retried, report.fallback, report.nonfinite) == (7, 1, 3, 2)
    assert torch.isfinite(inverse).all()
    assert torch.allclose(inverse[1], 2.0 * eye)  # (-0.5 I + 10 x 0.1 I)^-1
    for b in (2, 4, 5):  # fallbacks: (1 / damping) I
        assert torch.allclose(inverse[b], 10.0 * eye), b
    alone, _ = damped_inverse(good, 0.1)
    assert torch.equal(inverse[[0, 3, 6]], alone)

    zero = torch.zeros(2, size, size)
    inverse, report = damped_inverse(zero, 0.0)  # retried with 10x the base 1e-6
    assert (report.retried, report.fallback, report.nonfinite) == (2, 0, 0)
    assert torch.allclose(inverse, 1e5 * eye.expand(2, size, size))


@pytest.mark.parametrize("threads", [2, 3])
def test_parts_over_threads_give_one_call_s_bits_and_counts(
    threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With several torch threads the batch is cut into one part per thread, factored and
    inverted at once in a pool: every block's bits, the retries and fallbacks and their counts
    are those of one call on one thread; the parts cover the batch exactly, each once."""
    monkeypatch.setattr(mbf.linalg, "MIN_BLOCKS_PER_THREAD", 4)
    seen: list[tuple[str, int]] = []
    factor = mbf.linalg._cholesky_

    def recording(part: Tensor, info: Tensor) -> None:
        seen.append((threading.current_thread().name, part.shape[0]))
        factor(part, info)

    matrices = spd_blocks(50, 9, 1e4, seed=7).float()
    damping = torch.logspace(-4, 0, 50)
    matrices[5] = -2 * damping[5] * torch.eye(9)  # retried (positive with 10x its damping)
    matrices[31] = float("nan")  # falls back
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_report = damped_inverse(matrices, damping)
        torch.set_num_threads(threads)
        monkeypatch.setattr(mbf.linalg, "_cholesky_", recording)
        parts, parts_report = damped_inverse(matrices, damping)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(parts, one)
    assert parts_report == one_report == FactorReport(blocks=50, retried=1, fallback=1,
                                                      nonfinite=1)
    assert sorted(n for _, n in seen) == sorted(50 * (k + 1) // threads - 50 * k // threads
                                                for k in range(threads))
    assert all(name.startswith("mbf-linalg") for name, _ in seen)


def test_too_few_blocks_per_thread_stay_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below ``MIN_BLOCKS_PER_THREAD`` blocks per thread the batch is not cut."""
    seen: list[int] = []
    factor = mbf.linalg._cholesky_
    monkeypatch.setattr(mbf.linalg, "_cholesky_",
                        lambda part, info: (seen.append(part.shape[0]), factor(part, info)))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        damped_inverse(spd_blocks(mbf.linalg.MIN_BLOCKS_PER_THREAD * 2 - 1, 3, 10.0, 8).float(),
                       1e-2)
    finally:
        torch.set_num_threads(before)
    assert seen == [mbf.linalg.MIN_BLOCKS_PER_THREAD * 2 - 1]


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(1, 40),
    count=st.integers(1, 12),
    log_condition=st.floats(0.0, 5.0),
    damping=st.sampled_from([0.0, 1e-4, 1e-2, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_property_finite_symmetric_and_accurate(
    size: int, count: int, log_condition: float, damping: float, seed: int
) -> None:
    """Over sizes, batch counts, conditioning and damping: finite, exactly symmetric, no
    failures counted, within the conditioning bound of the float64 inverse."""
    matrices = spd_blocks(count, size, 10.0**log_condition, seed).float()
    inverse, report = damped_inverse(matrices, damping)
    assert report == FactorReport(blocks=count)
    assert torch.isfinite(inverse).all() and torch.equal(inverse, inverse.mT)
    damped = matrices.double() + damping * torch.eye(size, dtype=torch.float64)
    bound = 10 * size * torch.linalg.cond(damped).max().item() * EPS[torch.float32]
    assert relative_error(inverse, damped).max().item() < max(bound, 1e-6)
