"""``MBF(compile=True)``: the step's elementwise work through ``torch.compile``.

The compiled moments must equal the eager ones (and a float64 reference) to float32 rounding,
whole steps too; where ``torch.compile`` fails, when asked for or when the compiled code runs,
the optimizer warns exactly once and steps bitwise as the eager one does.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import Tensor, nn

from mbf import MBF
from mbf.direction import Moments, adam_moments


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 3))


def _run(opt: MBF, model: nn.Module, steps: int) -> list[Tensor]:
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 7, generator=gen), torch.randn(16, 3, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _reference(d: Tensor, sq: Tensor, buf: Tensor, beta2: float, mu: float, eps: float
               ) -> tuple[Tensor, Tensor, Tensor]:
    d, sq, buf = d.double(), sq.double(), buf.double()
    sq = beta2 * sq + (1 - beta2) * d * d
    buf = mu * buf + d
    return buf / (sq.sqrt() + eps), sq, buf


@pytest.mark.slow  # one torch.compile of a small kernel: seconds to a minute on a loaded CPU
def test_compiled_step_equals_eager_to_float32_rounding() -> None:
    """Moments on their own against float64, then whole steps against the eager optimizer."""
    moments = Moments(compile=True, min_numel=0)  # these tensors are small: compile them all
    gen = torch.Generator().manual_seed(1)
    for shape in [(5, 3), (17,), (4, 2, 3)]:  # shapes vary: one dynamic compilation serves all
        d = torch.randn(shape, generator=gen)
        sq, buf = torch.rand(shape, generator=gen), torch.randn(shape, generator=gen)
        want, want_sq, want_buf = _reference(d, sq, buf, 0.99, 0.9, 1e-3)
        for eps in (1e-3, 2e-3):  # the bias-corrected eps changes every step
            sq_c, buf_c = sq.clone(), buf.clone()
            got = moments(d, sq_c, buf_c, 0.99, 0.9, eps)
            if eps == 1e-3:
                torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(sq_c.double(), want_sq, rtol=1e-6, atol=1e-7)
                torch.testing.assert_close(buf_c.double(), want_buf, rtol=1e-6, atol=1e-7)
    assert moments.compiled is not None  # it ran compiled, never fell back

    eager_model, compiled_model = _net(), _net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        opt = MBF(compiled_model, lr=0.01, compile=True)
        opt._moments = Moments(compile=True, min_numel=0)
        compiled = _run(opt, compiled_model, 6)
    eager = _run(MBF(eager_model, lr=0.01), eager_model, 6)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _compile_fails(*args: object, **kwargs: object) -> object:
    raise RuntimeError("no C++ compiler here")


def test_small_tensors_run_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``min_numel`` the compiled function is not called (its overhead would dominate)."""
    calls: list[int] = []

    def counting(fn: object, **kwargs: object) -> object:
        def run(d: Tensor, *args: Tensor) -> Tensor:
            calls.append(d.numel())
            return _moments_eagerly(d, *args)

        return run

    monkeypatch.setattr(torch, "compile", counting)
    moments = Moments(compile=True, min_numel=10)
    for n in (9, 10, 11):
        moments(torch.ones(n), torch.ones(n), torch.ones(n), 0.9, 0.9, 1e-3)
    assert calls == [10, 11]


def _moments_eagerly(d: Tensor, sq: Tensor, buf: Tensor, scalars: Tensor) -> Tensor:
    beta2, mu, eps = (float(x) for x in scalars)
    return adam_moments(d, sq, buf, beta2, mu, eps)


def _compiled_code_fails(fn: object, **kwargs: object) -> object:
    def run(*args: object) -> object:
        raise RuntimeError("the compiled kernel failed to build")

    return run


@pytest.mark.parametrize("broken", [_compile_fails, _compiled_code_fails])
def test_a_failing_compile_falls_back_to_eager_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, broken: object
) -> None:
    monkeypatch.setattr(torch, "compile", broken)
    model, eager_model = _net(), _net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = MBF(model, lr=0.01, compile=True)
        opt._moments.min_numel = 0  # the test's tensors are small: compile them all
        got = _run(opt, model, 4)
    messages = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
    assert len(messages) == 1 and "compile=True" in messages[0]
    want = _run(MBF(eager_model, lr=0.01), eager_model, 4)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_eager_moments_are_the_documented_formula() -> None:
    gen = torch.Generator().manual_seed(2)
    d, sq, buf = (torch.randn(6, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    sq = sq.abs()
    want, want_sq, want_buf = _reference(d, sq, buf, 0.9, 0.5, 1e-2)
    got = adam_moments(d, sq, buf, 0.9, 0.5, 1e-2)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(sq, want_sq)
    torch.testing.assert_close(buf, want_buf)


def test_compile_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="compile"):
        MBF(_net(), compile="yes")  # type: ignore[arg-type]


def test_an_optimizer_with_compile_copies_and_pickles(monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy keeps the option and compiles afresh (lazily: nothing is compiled here)."""
    model = _net()
    opt = MBF(model, compile=True)
    opt._moments.min_numel = 5
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.compile and clone._moments.compiled is not None
        assert clone._moments.min_numel == 5
