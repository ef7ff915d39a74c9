"""The tied-rows prototype (``benchmarks/tied_rows/prototype.py``) is MBF's default step except
for the tying: on a layer with one output unit there is nothing to tie, so it must equal
``mbf.MBF`` at the same settings, step for step, in float64."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mbf

ROOT = Path(__file__).resolve().parents[2]


def _prototype() -> Any:
    spec = importlib.util.spec_from_file_location(
        "tied_rows_prototype", ROOT / "benchmarks" / "tied_rows" / "prototype.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(build: Any, steps: int = 30, conv: bool = False) -> torch.Tensor:
    torch.manual_seed(0)
    layer: nn.Module = (nn.Conv2d(3, 1, 3, bias=False) if conv
                        else nn.Linear(20, 1, bias=False)).double()
    optimizer = build(layer)
    shape = (steps, 16, 3, 5, 5) if conv else (steps, 16, 20)
    for x in torch.randn(*shape, dtype=torch.float64):
        optimizer.zero_grad()
        out = layer(x).flatten(1)
        loss = ((out - x.flatten(1)[:, : out.shape[1]] * 2.0) ** 2).mean()
        loss.backward()
        optimizer.step()
    return layer.weight.detach().clone()


def test_with_one_row_the_prototype_is_mbf_step_for_step() -> None:
    proto = _prototype()
    hp = {"lr": 3e-3, "damping": 0.01, "stat_decay": 0.9, "inv_every": 20,
          "max_block_size": 10}
    tied = _run(lambda m: proto.TiedRowsMBF([m.weight], [], **hp))
    ours = _run(lambda m: mbf.MBF(m, **{**hp, "momentum": 0.9}))
    assert torch.allclose(tied, ours, rtol=0, atol=1e-12), (tied - ours).abs().max()
    # A different decay gives a different run: the comparison can fail.
    other = _run(lambda m: mbf.MBF(m, **{**hp, "stat_decay": 0.99}))
    assert not torch.allclose(tied, other, rtol=0, atol=1e-9)


def test_rows_share_one_block_per_chunk() -> None:
    proto = _prototype()
    layer = nn.Linear(10, 3, bias=False).double()
    optimizer = proto.TiedRowsMBF([layer.weight], [], max_block_size=4)
    layer(torch.randn(5, 10, dtype=torch.float64)).sum().backward()
    optimizer.step()
    state = optimizer.state[layer.weight]
    assert [s.shape for s in state["stats"]] == [(3, 3), (4, 4), (3, 3)]  # 10 = 3 + 4 + 3
    g = layer.weight.grad
    for stats, (a, b) in zip(state["stats"], [(0, 3), (3, 7), (7, 10)], strict=True):
        assert torch.allclose(stats, 0.1 * g[:, a:b].T @ g[:, a:b] / 3)  # mean over the 3 rows


def test_with_one_output_channel_the_prototype_is_mbf_s_kernel_blocks() -> None:
    # A convolution: MBF's block per kernel (3x3 here), nothing to tie with one output channel.
    proto = _prototype()
    hp = {"lr": 3e-3, "damping": 0.01, "stat_decay": 0.9, "inv_every": 20}
    tied = _run(lambda m: proto.TiedRowsMBF([m.weight], [], **hp), conv=True)
    ours = _run(lambda m: mbf.MBF(m, **hp), conv=True)
    assert torch.allclose(tied, ours, rtol=0, atol=1e-12), (tied - ours).abs().max()



def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Tanh(), nn.Flatten(),
                         nn.Linear(36, 6, bias=False), nn.Tanh(),
                         nn.Linear(6, 2, bias=False)).double()


def test_the_library_option_takes_the_prototype_steps() -> None:
    # mbf.MBF(tie_rows=True) is this prototype made a library option: on bias-free Linear and
    # convolution layers (all tied by the prototype, nothing on Adam) whose widths are cut
    # into the same chunks (36 columns into 4 of 9 by both), the same steps in float64.
    proto = _prototype()
    hp = {"lr": 3e-3, "damping": 0.01, "stat_decay": 0.9, "inv_every": 20, "max_block_size": 10}
    start = torch.cat([p.detach().reshape(-1) for p in _conv_net().parameters()])
    results = []
    for build in (
        lambda m: proto._build_tied(m, {**proto.DEFAULTS, **hp, "layers": "linear+conv"}),
        lambda m: mbf.MBF(m, **hp, tie_rows=True),
    ):
        model = _conv_net()
        optimizer = build(model)
        gen = torch.Generator().manual_seed(1)
        for _ in range(30):
            x = torch.randn(16, 3, 5, 5, dtype=torch.float64, generator=gen)
            target = torch.randn(16, 2, dtype=torch.float64, generator=gen)
            optimizer.zero_grad()
            ((model(x) - target) ** 2).mean().backward()
            optimizer.step()
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert (results[0] - start).abs().max() > 1e-3  # the runs moved
    assert torch.allclose(results[0], results[1], rtol=0, atol=1e-12), (
        results[0] - results[1]).abs().max()
