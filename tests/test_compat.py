"""mbf._compat: the private torch attributes MBF reads, their fallbacks, and that no other module
of the library reads one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from mbf import _compat, curvature
from mbf.blocks import conv_layout, shape_layout

SRC = Path(__file__).resolve().parents[1] / "src" / "mbf"

CONVS = [
    nn.Conv1d(2, 3, 4, padding="same", dilation=3),
    nn.Conv1d(2, 3, 3, padding=2, padding_mode="circular"),
    nn.Conv2d(2, 3, (2, 3), padding="same"),
    nn.Conv2d(2, 3, 3, padding="valid"),
    nn.Conv2d(2, 3, 3, padding=(1, 2), padding_mode="reflect"),
    nn.Conv3d(2, 3, (1, 2, 3), padding=(0, 1, 2), padding_mode="replicate"),
]


@pytest.mark.parametrize("conv", CONVS, ids=repr)
def test_conv_padding_fallback_equals_torchs_own(conv: nn.Module) -> None:
    assert _compat._public_conv_padding(conv) == _compat.conv_padding(conv)
    assert _compat.conv_padding(conv) == list(conv._reversed_padding_repeated_twice)


def test_conv_statistics_without_the_grouped_weight_gradient_use_im2col(monkeypatch) -> None:
    conv = nn.Conv2d(2, 4, 3, padding=1, groups=2).double()
    x, g = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randn(5, 4, 6, 6).double()
    wl, bl = conv_layout(conv.weight, 32), shape_layout(conv.bias, 32)
    monkeypatch.setattr(curvature, "GROUPED_MIN_POSITIONS", 0)
    grouped = curvature.conv_block_stats(conv, wl, bl, x, g)
    monkeypatch.setattr(curvature, "conv_weight_grad", lambda nd: None)
    im2col = curvature.conv_block_stats(conv, wl, bl, x, g)
    for a, b in zip(grouped, im2col, strict=True):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_engine_callback_outside_a_pass_and_when_missing(monkeypatch) -> None:
    assert _compat.queue_engine_callback(lambda: None) is False  # not inside backward
    ran = []
    x = torch.ones(2, requires_grad=True)
    x.register_hook(lambda g: ran.append(_compat.queue_engine_callback(lambda: ran.append("end"))))
    x.sum().backward()
    assert ran == [True, "end"]
    monkeypatch.setattr(torch.autograd.Variable, "_execution_engine", None)
    with pytest.raises(_compat.TorchFeatureMissing, match="queue_callback.*estimator='batch'"):
        _compat.queue_engine_callback(lambda: None)


def test_functorch_probe_and_its_fallback(monkeypatch) -> None:
    seen = []

    def f(x: torch.Tensor) -> torch.Tensor:
        seen.append(_compat.functorch_active())
        return x

    torch.func.vmap(f)(torch.ones(3))
    assert seen == [True] and _compat.functorch_active() is False
    monkeypatch.delattr(torch._C, "_are_functorch_transforms_active")
    torch.func.vmap(f)(torch.ones(3))
    assert seen == [True, False]


def test_public_norm_fallback_lists_every_public_norm_base_subclass() -> None:
    base = nn.modules.batchnorm._NormBase
    public = {c for c in vars(nn).values() if isinstance(c, type) and issubclass(c, base)}
    assert public and public <= set(_compat.PUBLIC_NORMS)
    assert (base,) == _compat.NORM_BASES


# Private attribute access on torch names (``torch._C``, ``nn.modules.x._Y``, ``Variable._z``)
# and the private names MBF is known to need; only mbf/_compat.py may contain them.
PRIVATE = re.compile(
    r"\b(?:torch|nn|F|dist|Variable|autograd)(?:\.\w+)*\._[A-Za-z]\w*"
    r"|_reversed_padding_repeated_twice|_execution_engine|_are_functorch|_NormBase|_ConvNd"
    r"|\bnn\.grad\b|torch\.nn\.grad"
)


def test_no_module_but_compat_reads_a_private_torch_attribute() -> None:
    """Neither the library nor the benchmark (whose baselines reuse the compat module)."""
    found = {
        f"{path.relative_to(SRC.parent)}:{n}: {line.strip()}"
        for path in [*SRC.glob("*.py"), *(SRC.parent / "mbf_bench").rglob("*.py")]
        if path != SRC / "_compat.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE.search(line.split("#")[0])
    }
    assert not found, sorted(found)
    assert PRIVATE.search((SRC / "_compat.py").read_text())  # the pattern does find them


def test_foreach_operations_and_their_per_tensor_fallback_agree_bitwise() -> None:
    """``_compat.foreach`` returns torch's private ``_foreach_*`` or, without it, the same
    operations tensor by tensor: on the CPU both give the same bits (the step's moments rely on
    it, ``tests/test_step_options.py``)."""
    shapes = [(3, 4), (7,), (2, 3, 5)]

    def run(private: bool) -> list[torch.Tensor]:
        ops = {n: _compat.foreach(n, private=private)
               for n in ("mul_", "add_", "addcmul_", "sqrt", "div", "norm")}
        sqs = [torch.rand(s, generator=torch.Generator().manual_seed(1)) for s in shapes]
        bufs = [torch.randn(s, generator=torch.Generator().manual_seed(2)) for s in shapes]
        ds = [torch.randn(s, generator=torch.Generator().manual_seed(3)) for s in shapes]
        ops["mul_"](sqs, 0.999)
        ops["addcmul_"](sqs, ds, ds, value=1e-3)
        ops["mul_"](bufs, 0.9)
        ops["add_"](bufs, ds)
        denoms = ops["sqrt"](sqs)
        ops["add_"](denoms, 1e-8)
        mixed = [*ds, ds[0].double()]  # the diagnostics' norms: float32 and float64 alike
        return [*sqs, *bufs, *ops["div"](bufs, denoms), *ops["norm"](mixed)]

    assert callable(getattr(torch, "_foreach_mul_", None))  # this torch has the private ones
    for a, b in zip(run(private=True), run(private=False), strict=True):
        assert torch.equal(a, b)
