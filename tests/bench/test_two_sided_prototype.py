"""The two-sided prototype (``benchmarks/two_sided/prototype.py``): its control (no output-side
factor) is the tied-rows prototype step for step, its roots are the roots they claim to be, and
the output-side factor changes the step (so the screen compares different methods)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import mbf

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, folder: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / folder /
                                                  "prototype.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def modules() -> Any:
    """Both prototypes, loaded for this module's tests only: loading registers their entries
    in the benchmark's registry, which other tests list; they are removed afterwards."""
    from mbf_bench.optimizers import OPTIMIZERS

    before = dict(OPTIMIZERS)
    two = _load("two_sided_prototype", "two_sided")
    tied = _load("tied_rows_prototype_for_two_sided", "tied_rows")
    yield two, tied
    OPTIMIZERS.clear()
    OPTIMIZERS.update(before)


def _run(make: Any, steps: int = 25) -> torch.Tensor:
    torch.manual_seed(0)
    layer = nn.Linear(70, 40, bias=False).double()  # 3 column chunks, 2 row chunks of <= 32
    optimizer = make([layer.weight], [])
    for x in torch.randn(steps, 16, 70, dtype=torch.float64):
        optimizer.zero_grad()
        ((layer(x) - x[:, :40] * 2.0) ** 2).mean().backward()
        optimizer.step()
    return layer.weight.detach().clone()


def test_the_control_is_the_tied_rows_prototype(modules: Any) -> None:
    TWO, TIED = modules
    ours = _run(lambda h, o: TWO.TwoSidedMBF(h, o, left_root=0, right_root=1))
    theirs = _run(lambda h, o: TIED.TiedRowsMBF(h, o))
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(("left", "right"), [(1, 1), (2, 2), (0, 2)])
def test_other_roots_change_the_step(modules: Any, left: int, right: int) -> None:
    TWO, _ = modules
    control = _run(lambda h, o: TWO.TwoSidedMBF(h, o))
    other = _run(lambda h, o: TWO.TwoSidedMBF(h, o, left_root=left, right_root=right))
    assert torch.isfinite(other).all()
    assert (other - control).abs().max() > 1e-3


@pytest.mark.parametrize("root", [1, 2, 3])
def test_damped_power_is_that_root_of_the_damped_statistics(modules: Any, root: int) -> None:
    TWO, _ = modules
    torch.manual_seed(1)
    a = torch.randn(9, 5, dtype=torch.float64)
    stat = a @ a.T  # rank 5 of 9: the damping makes it invertible
    mass, damping = 0.5, 0.1
    power = TWO.damped_power(stat, mass, damping, root)
    damped = stat / mass + damping * (stat / mass).trace() / 9 * torch.eye(9, dtype=stat.dtype)
    torch.testing.assert_close(torch.linalg.matrix_power(power, root) @ damped,
                               torch.eye(9, dtype=stat.dtype), rtol=0, atol=1e-9)


@pytest.mark.parametrize("root", [1, 2])
def test_the_library_option_takes_the_prototype_steps(modules: Any, root: int) -> None:
    TWO, _ = modules
    # mbf.MBF(two_sided=True) is this prototype made a library option: on a bias-free Linear
    # layer whose rows and columns both cut into equal chunks (40 columns into 4 of 10, 20 rows
    # into 2 of 10), the same steps in float64, with either root on both sides.
    hp = {"lr": 3e-3, "damping": 0.01, "stat_decay": 0.9, "inv_every": 20, "max_block_size": 10}

    def run(make: Any) -> torch.Tensor:
        torch.manual_seed(0)
        layer = nn.Linear(40, 20, bias=False).double()
        optimizer = make(layer)
        gen = torch.Generator().manual_seed(1)
        for _ in range(30):
            x = torch.randn(16, 40, dtype=torch.float64, generator=gen)
            optimizer.zero_grad()
            ((layer(x) - 2.0 * x[:, :20]) ** 2).mean().backward()
            optimizer.step()
        return layer.weight.detach().clone()

    proto = run(lambda m: TWO.TwoSidedMBF([m.weight], [], **hp, left_root=root,
                                          right_root=root))
    ours = run(lambda m: mbf.MBF(m, **hp, two_sided=True, inverse_root=root))
    torch.testing.assert_close(ours, proto, rtol=0, atol=1e-12)
    one_sided = run(lambda m: mbf.MBF(m, **hp, inverse_root=root))
    assert (one_sided - proto).abs().max() > 1e-3  # the comparison can fail
