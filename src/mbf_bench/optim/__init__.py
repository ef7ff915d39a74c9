"""Baseline optimizers written for the benchmark where no library serves the plain training loop.

``KFAC`` (Martens & Grosse 2015 / Grosse & Martens 2016) and the Kronecker-per-mode ``Shampoo``
(Gupta et al. 2018) and ``TNT`` (Ren & Goldfarb 2021); ``docs/baselines.md`` says why and how each
is verified. The registry lives in :mod:`mbf_bench.optimizers`.
"""

from .kfac import KFAC
from .kronecker import TNT, KroneckerFactored, Shampoo

__all__ = ["KFAC", "TNT", "KroneckerFactored", "Shampoo"]
