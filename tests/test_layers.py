"""The layer registry: the documented example of a user's own module type, end to end against
float64 references, and the errors a bad rule gets.

The example is executed from ``docs/layers.md`` itself, so the page cannot drift from what runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import mbf
from mbf import LayerRule, UnitSpec, layers
from mbf.blocks import linear_layout, row_layout
from mbf.units import Unit, build_units
from reference import block_diagonal, dense_blocks, paper_mbf, per_example_grads, unit_vectors

PAGE = Path(__file__).resolve().parents[1] / "docs" / "layers.md"
N = 6


def _page_example() -> dict[str, Any]:
    """The code block of docs/layers.md that defines ScaledLinear and its rule, executed."""
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
    code = next(b for b in blocks if "class ScaledLinear" in b)
    namespace: dict[str, Any] = {"__name__": "layers_example"}
    exec(compile(code, str(PAGE), "exec"), namespace)
    return namespace


EXAMPLE = _page_example()
ScaledLinear = EXAMPLE["ScaledLinear"]
RULE: LayerRule = EXAMPLE["SCALED_LINEAR"]


@pytest.fixture(autouse=True)
def registry_unchanged() -> Iterator[None]:
    """Every test leaves the registry as it found it (registrations are scoped)."""
    before = dict(layers._RULES)
    yield
    assert before == layers._RULES


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(ScaledLinear(5, 4, scale=0.7), nn.Tanh(), nn.Linear(4, 3)).double()


def _loss_of_output(out: Tensor) -> Tensor:
    """A nonlinear per-example loss, so output gradients differ between examples."""
    return (out.sin() + 0.3 * out.square()).sum(-1)


@pytest.mark.parametrize("max_block_size", [32, 3])
@pytest.mark.parametrize("estimator", ["batch", "per_example"])
def test_registered_rule_gives_the_dense_block_diagonal_step(
    estimator: str, max_block_size: int
) -> None:
    model = _model()
    x = torch.randn(N, 5, dtype=torch.float64)
    damping, lr = 0.05, 0.5
    # The rule is read when the optimizer builds its units and hooks: the steps below, after
    # the registration's scope, still use it.
    with mbf.register_layer(ScaledLinear, RULE):
        opt = paper_mbf(
            model,
            lr=lr,
            momentum=0.0,
            damping=damping,
            weight_decay=0.0,
            stat_decay=0.9,
            stat_every=1,
            inv_every=1,
            max_block_size=max_block_size,
            estimator=estimator,
            loss_reduction="mean",
            kl_clip=None,
        )
    first = opt.blocks()[0]
    assert first.name == "0 (ScaledLinear)" and first.layout.kind == "scaled"
    assert [tuple(p.shape) for p in first.params] == [(4, 5), (4,)]
    assert first.layout.num_blocks == 4 * -(-6 // max_block_size)

    before = [p.detach().clone() for p in model.parameters()]
    per = per_example_grads(model, lambda out: _loss_of_output(out).sum(), x)
    _loss_of_output(model(x)).mean().backward()
    grads = {id(p): p.grad.clone() for p in model.parameters()}
    opt.step()
    moved = {id(p): p.detach() - b for p, b in zip(model.parameters(), before, strict=True)}
    by_param = {id(p): per[k] for k, p in model.named_parameters()}
    for unit in opt.blocks():
        g = torch.cat([grads[id(p)].reshape(-1) for p in unit.params])
        if estimator == "per_example":
            v = unit_vectors([by_param[id(p)] for p in unit.params])
            fisher = v.T @ v / N  # the empirical Fisher, from torch.func gradients
        else:
            fisher = torch.outer(g, g)
        blocks = dense_blocks(unit.layout, fisher)
        for got, want in zip(unit.fisher, blocks, strict=True):
            k = want.shape[0]
            torch.testing.assert_close(got[:k, :k], want, rtol=1e-10, atol=1e-13)
        dense = block_diagonal(unit.layout, unit.fisher, damping)
        step = torch.cat([moved[id(p)].reshape(-1) for p in unit.params])
        torch.testing.assert_close(step, -lr * torch.linalg.solve(dense, g), rtol=1e-8, atol=1e-11)


def _build(model: nn.Module) -> list[Unit]:
    groups = [{"params": list(model.parameters()), "max_block_size": 32}]
    return build_units(groups, model, per_example=True)


def test_without_the_rule_the_module_is_cut_by_shape_and_uses_the_batch_estimator() -> None:
    kinds = [(u.name, u.layout.kind, u.per_example) for u in _build(_model())]
    assert kinds == [  # module rules first, then the parameters no rule claimed
        ("2 (Linear)", "linear", True),
        ("0.weight", "rows", False),
        ("0.bias", "flat", False),
    ]
    with mbf.register_layer(ScaledLinear, RULE):
        units = _build(_model())
    assert [(u.name, u.layout.kind, u.per_example) for u in units] == [
        ("0 (ScaledLinear)", "scaled", True),
        ("2 (Linear)", "linear", True),
    ]
    with pytest.warns(UserWarning, match=r"0\.weight, 0\.bias"):  # the optimizer says so too
        paper_mbf(_model(), lr=0.1, estimator="per_example")


def test_rules_are_found_along_the_class_hierarchy() -> None:
    class MyLinear(nn.Linear):
        pass

    assert layers.rule_for(MyLinear) is layers.rule_for(nn.Linear) is not None
    assert layers.rule_for(nn.BatchNorm2d) is layers.rule_for(nn.GroupNorm) is not None
    assert layers.rule_for(nn.ReLU) is None

    def one_flat_unit(module: nn.Module, params: layers.ModuleParams) -> list[UnitSpec]:
        w = module.weight
        return [UnitSpec((w,), row_layout([w.shape], 1, 4, "mine"))]

    model = nn.Sequential(MyLinear(3, 2, bias=False), nn.Linear(3, 2, bias=False))
    with mbf.register_layer(MyLinear, LayerRule(one_flat_unit)):
        units = mbf.MBF(model, lr=0.1).blocks()
        assert layers.rule_for(nn.Linear) is layers.BUILTIN_RULES[nn.Linear]
    assert [(u.name, u.layout.kind) for u in units] == [
        ("0 (MyLinear)", "mine"),
        ("1 (Linear)", "linear"),
    ]


def test_replacing_needs_replace_and_removing_restores_the_old_rule() -> None:
    builtin = layers.rule_for(nn.Linear)
    with pytest.raises(ValueError, match=r"torch\.nn\.modules\.linear\.Linear has a layer rule"):
        mbf.register_layer(nn.Linear, RULE)
    handle = mbf.register_layer(nn.Linear, RULE, replace=True)
    assert layers.rule_for(nn.Linear) is RULE
    handle.remove()
    handle.remove()  # a second remove does nothing
    assert layers.rule_for(nn.Linear) is builtin
    already = pytest.raises(ValueError, match="ScaledLinear has a layer rule already")
    with mbf.register_layer(ScaledLinear, RULE), already:
        mbf.register_layer(ScaledLinear, RULE)
    assert layers.rule_for(ScaledLinear) is None


def _units(module: nn.Module, params: layers.ModuleParams) -> list[UnitSpec]:
    return []


@pytest.mark.parametrize(
    ("module_type", "rule", "match"),
    [
        ("Linear", LayerRule(_units), "nn.Module subclass, got 'Linear'"),
        (nn.Linear(2, 2), LayerRule(_units), "nn.Module subclass, got Linear"),
        (ScaledLinear, _units, "register_layer.ScaledLinear, .... needs a mbf.LayerRule"),
        (ScaledLinear, LayerRule(units=3), "units for ScaledLinear must be callable"),
        (ScaledLinear, LayerRule(lambda m: []), r"units for ScaledLinear .* \(module, params\)"),
        (
            ScaledLinear,
            LayerRule(_units, block_stats=lambda m, layouts, x: []),
            r"block_stats for ScaledLinear .* \(module, layouts, inputs, grad_outputs, context\)",
        ),
        (
            ScaledLinear,
            LayerRule(_units, applied_functionally="out_proj"),
            "applied_functionally for ScaledLinear must be callable",
        ),
    ],
)
def test_bad_registrations_are_refused_naming_the_culprit(
    module_type: Any, rule: Any, match: str
) -> None:
    with pytest.raises(TypeError, match=match):
        mbf.register_layer(module_type, rule)


def _rule_giving(make: Any) -> LayerRule:
    return LayerRule(lambda module, params: make(module), EXAMPLE["scaled_linear_stats"])


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda m: [m.weight], TypeError, "gave 0 .ScaledLinear. a Parameter, not a mbf.UnitSpec"),
        (
            lambda m: [UnitSpec((m.weight, m.extra), linear_layout(m.weight, m.extra, 8))],
            ValueError,
            "tensors that are not the module's parameters",
        ),
        (
            lambda m: [UnitSpec((m.weight,), linear_layout(m.weight, None, 8), ".w")],
            ValueError,
            r"ScaledLinear\).w parameters the optimizer does not step",  # weight left out
        ),
        (
            lambda m: [UnitSpec((m.bias,), row_layout([(2, 2)], 2, 8))],
            ValueError,
            r"a layout for shapes \[\(2, 2\)\] but parameters of shapes \[\(4,\)\]",
        ),
    ],
)
def test_bad_units_are_refused_naming_the_module_type(make: Any, error: type, match: str) -> None:
    model = _model()
    model[0].extra = torch.zeros(4, dtype=torch.float64)  # a plain tensor, not a parameter
    params = list(model.parameters())
    if "not step" in match:
        params = [p for p in params if p is not model[0].weight]
    with mbf.register_layer(ScaledLinear, _rule_giving(make)), pytest.raises(error, match=match):
        mbf.MBF(params, lr=0.1, model=model)


@pytest.mark.parametrize(
    ("stats", "match"),
    [
        (lambda *a: torch.zeros(1), "must be a list of 1 tensors"),
        (lambda *a: [torch.zeros(4, 6, 5)], r"entry 0 must have shape \(4, 6, 6\), got \(4, 6, 5"),
    ],
)
def test_statistics_of_the_wrong_shape_fail_at_the_first_backward(stats: Any, match: str) -> None:
    model = _model()
    rule = LayerRule(RULE.units, lambda module, layouts, x, g, context: stats())
    with mbf.register_layer(ScaledLinear, rule):
        paper_mbf(model, lr=0.1, estimator="per_example", max_block_size=32)
    with pytest.raises(RuntimeError, match=f"per-example statistics of ScaledLinear.*{match}"):
        model(torch.randn(N, 5, dtype=torch.float64)).sum().backward()


def test_units_built_under_a_registration_keep_their_rule_after_it_ends() -> None:
    # A load_state_dict that fails restores the old units and hooks them again, after the
    # registration's scope: they keep the per-example statistics of the rule they were built by.
    model = _model()
    with mbf.register_layer(ScaledLinear, RULE):
        opt = paper_mbf(model, lr=0.0, estimator="per_example", max_block_size=32)
    other = paper_mbf(nn.Linear(2, 2).double(), lr=0.0)
    with pytest.raises(ValueError):
        opt.load_state_dict(other.state_dict())
    x = torch.randn(N, 5, dtype=torch.float64)
    _loss_of_output(model(x)).mean().backward()
    opt.step()
    per = per_example_grads(model, lambda out: _loss_of_output(out).sum(), x)
    first = opt.blocks()[0]
    v = unit_vectors([per["0.weight"], per["0.bias"]])
    for got, want in zip(first.fisher, dense_blocks(first.layout, v.T @ v / N), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
