"""Defects a new user hit (issue 12): copies, rejected groups, empty and complex parameters,
modules the per-example hooks cannot see, hyperparameter checks, skipped-step warnings, sizes."""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from mbf import MBF
from mbf.validation import format_bytes
from reference import PAPER_FORM
from tensors import flat_params

KW = dict(lr=0.1, momentum=0.9, damping=0.1, stat_decay=0.9, stat_every=1, inv_every=2,
          **PAPER_FORM)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.LayerNorm(2)).double()


def _step(model: nn.Module, opt: MBF, x: torch.Tensor) -> None:
    opt.zero_grad()
    model(x).sin().square().mean().backward()
    opt.step()


def _pickled(obj: object) -> object:
    return pickle.loads(pickle.dumps(obj))


def _torch_saved(obj: object) -> object:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.filterwarnings("ignore:MBF. per-example statistics serve:UserWarning")
@pytest.mark.parametrize("copier", [copy.deepcopy, _pickled, _torch_saved])
@pytest.mark.parametrize("storage", ["full", "packed"])
@pytest.mark.parametrize("estimator", ["batch", "per_example"])
def test_a_copied_optimizer_takes_the_same_next_steps(
    copier: Callable[[object], object], storage: str, estimator: str
) -> None:
    model = _net()
    opt = MBF(model, estimator=estimator, storage=storage, max_block_size=3, **KW)
    xs = [torch.randn(5, 3, dtype=torch.float64) for _ in range(5)]
    for x in xs[:3]:  # mid-run: momentum, statistics, a queue and an inverse to carry over
        _step(model, opt, x)
    model2, opt2 = copier((model, opt))
    bound = zip(opt2.param_groups[0]["params"], model2.parameters(), strict=True)
    assert all(p is q for p, q in bound)  # bound to the copied model
    for x in xs[3:]:
        _step(model, opt, x)
        _step(model2, opt2, x)
        assert torch.equal(flat_params(model), flat_params(model2))
    assert opt.counters == opt2.counters


@pytest.mark.filterwarnings("ignore:MBF. per-example statistics serve:UserWarning")
def test_a_copy_of_the_optimizer_alone_is_bound_to_its_own_model() -> None:
    model = _net()
    opt = MBF(model, estimator="per_example", **KW)
    _step(model, opt, torch.randn(5, 3, dtype=torch.float64))
    alone = copy.deepcopy(opt)
    params = alone.param_groups[0]["params"]
    assert not any(p is q for p, q in zip(params, model.parameters(), strict=True))
    before = flat_params(model)
    copied = alone._model
    _step(copied, alone, torch.randn(5, 3, dtype=torch.float64))  # a working optimizer
    assert torch.equal(flat_params(model), before)  # that leaves the original model alone


@pytest.mark.parametrize(
    ("bad", "error"),
    [({"stat_decay": 1.5}, ValueError), ({"damping": -1.0}, ValueError),
     ({"lr": "0.1"}, TypeError), ({"complex": True}, ValueError)],
)
def test_a_refused_param_group_leaves_the_optimizer_as_before(bad: dict, error: type) -> None:
    model, extra = _net(), nn.Linear(2, 2).double()
    kw = {**KW, "stat_buffer": 3, "inv_every": 5}  # mid-run: queued statistics to keep as they are
    opt, twin = MBF(model, **kw), MBF(_net(), **kw)
    for _ in range(2):
        x = torch.randn(5, 3, dtype=torch.float64)
        _step(model, opt, x)
        _step(twin._model, twin, x)
    group: dict = {"params": list(extra.parameters()), **bad}
    if group.pop("complex", False):
        group["params"] = [nn.Parameter(torch.randn(3, dtype=torch.complex128))]
    with pytest.raises(error):
        opt.add_param_group(group)
    assert len(opt.param_groups) == 1 and len(opt._units) == len(twin._units)
    assert twin._units[0].queue_weights  # a queued update, which a rebuild would fold early
    assert opt._units[0].queue_weights == twin._units[0].queue_weights
    MBF(_net(), **kw).load_state_dict(opt.state_dict())  # still loads into a fresh optimizer
    for _ in range(3):
        x = torch.randn(5, 3, dtype=torch.float64)
        _step(model, opt, x)
        _step(twin._model, twin, x)
        assert torch.equal(flat_params(model), flat_params(twin._model))


@pytest.mark.parametrize("estimator", ["batch", "per_example"])
def test_empty_parameters_are_left_alone_and_the_rest_trained_as_without_them(
    estimator: str,
) -> None:
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: empty tensors are not initialized
        empties = [nn.Linear(0, 5), nn.Linear(5, 0)]
    model = nn.ModuleDict({"a": nn.Linear(3, 5), "b": empties[0], "c": empties[1]}).double()
    model.register_parameter("flat", nn.Parameter(torch.empty(0, dtype=torch.float64)))
    model.register_parameter("wide", nn.Parameter(torch.empty(3, 0, dtype=torch.float64)))
    # Units are independent: the non-empty ones alone, each with its own optimizer.
    alone_a, alone_bias = copy.deepcopy(model["a"]), copy.deepcopy(model["b"].bias)

    def loss(m: nn.Module) -> torch.Tensor:
        x = torch.ones(4, 3, dtype=torch.float64) + torch.arange(3.0, dtype=torch.float64)
        return (m["a"](x).sin().sum() + m["b"](x[:, :0]).square().sum()
                + m["c"](x.new_ones(4, 5)).sum() + m.flat.sum() + m.wide.sum())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the per-example fallback notice for the bias
        opt = MBF(model, estimator=estimator, **KW)
    ref_a, ref_bias = MBF(alone_a, estimator=estimator, **KW), MBF([alone_bias], **KW)
    for _ in range(3):
        opt.zero_grad()
        loss(model).backward()
        opt.step()
        ref_a.zero_grad()
        ref_bias.zero_grad()
        x = torch.ones(4, 3, dtype=torch.float64) + torch.arange(3.0, dtype=torch.float64)
        (alone_a(x).sin().sum() + alone_bias.square().sum() * 4).backward()
        ref_a.step()
        ref_bias.step()
    assert model.flat.shape == (0,) and model.wide.shape == (3, 0)
    torch.testing.assert_close(model["b"].bias, alone_bias, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(flat_params(model["a"]), flat_params(alone_a), rtol=1e-12,
                               atol=1e-14)


def test_complex_parameters_are_refused_at_construction() -> None:
    layer = nn.Linear(2, 2, dtype=torch.complex64)
    with pytest.raises(ValueError, match=r"complex parameters.*complex64"):
        MBF(layer, lr=0.1)


def test_a_linear_applied_functionally_falls_back_to_the_batch_estimator() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(x, self.inner.weight, self.inner.bias)

    torch.manual_seed(2)
    model = Functional().double()
    opt = MBF(model, estimator="per_example", **KW)
    model(torch.randn(6, 3, dtype=torch.float64)).sin().sum().backward()
    g = torch.cat([model.inner.weight.grad, model.inner.bias.grad[:, None]], 1)
    with pytest.warns(UserWarning, match=r"inner \(Linear\).*forward hook never ran"):
        opt.step()
    fisher = opt.blocks()[0].fisher  # the first estimate is taken as it is: g_b g_b^T
    torch.testing.assert_close(fisher, g[:, :, None] * g[:, None, :])


def test_multihead_attention_out_proj_uses_the_batch_estimator() -> None:
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0).double()
    with pytest.warns(UserWarning, match=r"self_attn.out_proj"):
        opt = MBF(layer, estimator="per_example", max_block_size=5, **KW)
    layer(torch.randn(3, 2, 4, dtype=torch.float64)).square().mean().backward()
    w, b = layer.self_attn.out_proj.weight.grad, layer.self_attn.out_proj.bias.grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no hook-miss notice: it was known at construction
        opt.step()
    unit = next(u for u in opt.blocks() if u.name.startswith("self_attn.out_proj"))
    g = unit.layout.to_blocks([w, b])
    torch.testing.assert_close(unit.fisher, g[:, :, None] * g[:, None, :])
    assert float(unit.fisher.abs().sum()) > 0


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("weight_decay", float("inf"), ValueError),
        ("lr", float("nan"), ValueError),
        ("damping", -1.0, ValueError),
        ("lr", "0.1", TypeError),
        ("momentum", [0.9], TypeError),
        ("stat_decay", None, TypeError),
        ("inv_every", 2.0, TypeError),
        ("max_block_size", True, TypeError),
        ("kl_clip", float("inf"), ValueError),
        ("decoupled_weight_decay", 1, TypeError),
    ],
)
def test_every_hyperparameter_is_checked_everywhere(key: str, value: object, error: type) -> None:
    match = rf"MBF: {key}\b"
    with pytest.raises(error, match=match):
        MBF(nn.Linear(2, 2), **{**KW, key: value})
    opt = MBF(nn.Linear(2, 2), **KW)
    with pytest.raises(error, match=match):
        opt.add_param_group({"params": nn.Linear(2, 2).parameters(), key: value})
    model = nn.Linear(2, 2)
    opt = MBF(model, **KW)
    weight = model.weight.detach().clone()
    opt.param_groups[0][key] = value  # changed after construction: caught at step()
    model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(error, match=match):
        opt.step()
    assert torch.equal(model.weight, weight) and opt.counters["steps"] == 0


def test_numpy_and_torch_integers_are_accepted() -> None:
    model = nn.Linear(10, 2)
    kw = {**KW, "inv_every": np.int32(3), "lr": np.float32(0.1)}
    opt = MBF(model, **kw, max_block_size=np.int64(4), stat_buffer=np.int64(2))
    assert opt.blocks()[0].layout.block_size == 4
    assert type(opt.param_groups[0]["max_block_size"]) is int
    model(torch.ones(1, 10)).sum().backward()
    opt.step()


def test_skipped_steps_warn_when_they_start_and_when_they_persist() -> None:
    model = nn.Linear(2, 2).double()
    opt = MBF(model, **KW)
    x = torch.ones(1, 2, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(12):
            opt.zero_grad()
            (model(x).sum() * float("nan")).backward()
            opt.step()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2, messages
    assert "skipped a step" in messages[0] and "last 10 steps were all skipped" in messages[1]
    assert [w.filename for w in caught] == [__file__] * 2  # pointed at the caller's step()
    assert opt.counters["skipped_steps"] == 12


def test_budget_errors_print_readable_sizes() -> None:
    with pytest.raises(ValueError) as info:
        MBF(nn.Linear(100, 100), lr=0.1, max_state_bytes=1000, tie_rows=False)
    text = str(info.value)
    assert "0.00" not in text and "over max_state_bytes=1,000 bytes" in text
    assert "2.26 MiB (2,370,000 bytes)" in text
    assert format_bytes(1536) == "1.5 KiB (1,536 bytes)"
    assert format_bytes(3 * 2**30) == "3 GiB (3,221,225,472 bytes)"


def test_a_linear_with_a_tied_weight_uses_the_batch_estimator() -> None:
    # Found by the property campaign: the hooks of the module that owns the unit saw only its
    # own share of the tied weight's gradient, so its per-example statistics missed the rest.
    torch.manual_seed(4)
    first, second = nn.Linear(3, 3).double(), nn.Linear(3, 3).double()
    second.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), second)
    with pytest.warns(UserWarning, match=r"'batch' estimator instead: 0 \(Linear\)"):
        opt = MBF(model, estimator="per_example", max_block_size=4, **KW)
    model(torch.randn(5, 3, dtype=torch.float64)).sin().sum().backward()
    w, b = first.weight.grad, first.bias.grad
    opt.step()
    unit = opt.blocks()[0]
    g = unit.layout.to_blocks([w, b])
    torch.testing.assert_close(unit.fisher, g[:, :, None] * g[:, None, :])


def test_an_update_that_overflows_is_not_applied() -> None:
    # Found by the long campaign: damping 0 and a stale inverse 1/g^2 of a tiny gradient (1e30
    # here), met by a large gradient before the next factorization, overflowed float32.
    layer = nn.Linear(2, 2)
    opt = MBF(layer, lr=1.0, momentum=0.0, damping=0.0, stat_decay=0.5, stat_every=1,
              inv_every=100, max_block_size=1, weight_decay=0.0, **PAPER_FORM)
    x = torch.ones(1, 2)
    for scale in (1e-15, 1e10):
        opt.zero_grad()
        (layer(x).sum() * scale).backward()
        before = layer.weight.detach().clone()
        if scale > 1:
            with pytest.warns(UserWarning, match="not finite and was not applied"):
                opt.step()
        else:
            opt.step()
    assert torch.isfinite(layer.weight).all() and torch.equal(layer.weight.detach(), before)
    assert opt.counters["overflowed_updates"] == 1 and opt.counters["steps"] == 2


def _overflowing_steps(model: nn.Linear, opt: MBF, big: int = 1) -> None:
    """The stale-inverse overflow of the test above: a tiny gradient along one input, factored,
    then ``big`` large gradients along the other before the next factorization."""
    for x, scale in [([[1.0, 0.0]], 1e-15)] + [([[0.0, 1.0]], 1e10)] * big:
        opt.zero_grad()
        (model(torch.tensor(x)).sum() * scale).backward()
        opt.step()


def test_under_grafting_a_block_whose_solve_overflows_takes_its_right_hand_side_s_direction(
) -> None:
    """What stalled MBF on the transformer tasks (rows of rare tokens, statistics decayed to
    ~1e-38, relative damping): with grafting the step is applied, each overflowing block moves
    along its momentum (here: gradient) block at Adam's length for it, and no update is lost.
    Adam's lengths do not depend on the curvature, so a run with a damping that cannot overflow
    gives the same step lengths."""
    def run(damping: float, relative: bool) -> tuple[torch.Tensor, MBF]:
        layer = nn.Linear(2, 2)
        with torch.no_grad():
            layer.weight.zero_()
            layer.bias.zero_()
        opt = MBF(layer, lr=1.0, momentum=0.0, damping=damping, stat_decay=0.5,
                  inv_every=100, max_block_size=3, early_refresh=False,
                  relative_damping=relative)  # graft="adam"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no update may be dropped
            _overflowing_steps(layer, opt)
        return torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1), opt

    moved, opt = run(1e-2, True)  # the defaults' relative damping: 1e-2 of a trace of 1e-30
    assert opt.counters["overflowed_blocks"] == 2 and opt.counters["overflowed_updates"] == 0
    assert torch.isfinite(moved).all()
    # the second gradient's blocks are each [0, 1, 1] (times 1e10): every block moves along -it
    along = torch.tensor([0.0, 1.0, 1.0]) / 2**0.5
    for row in moved:  # the first step's contribution is ~1e-15 of the second's
        torch.testing.assert_close(row / row.norm(), -along, rtol=0, atol=1e-6)
    reference, ref_opt = run(1.0, False)  # inverse ~ I: no overflow; Adam's lengths as above
    assert ref_opt.counters["overflowed_blocks"] == 0
    torch.testing.assert_close(moved.norm(dim=1), reference.norm(dim=1), rtol=1e-6, atol=0)


def test_overflowing_updates_in_a_row_warn_that_training_has_stalled() -> None:
    layer = nn.Linear(2, 2)
    opt = MBF(layer, lr=1.0, momentum=0.0, damping=0.0, stat_decay=0.5, stat_every=1,
              inv_every=100, max_block_size=1, weight_decay=0.0, **PAPER_FORM)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _overflowing_steps(layer, opt, big=10)
    messages = [str(w.message) for w in caught]
    assert opt.counters["overflowed_updates"] == 10
    assert sum("was not applied" in m for m in messages) == 1
    assert sum("last 10 preconditioned updates" in m and "stalled" in m for m in messages) == 1
