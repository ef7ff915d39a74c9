"""The optimizer registry and the baselines written for it, against dense float64 references.

Each baseline's first steps are compared with an independent dense implementation of its published
formula (explicit Kronecker products, per-example autograd, patches cut by slicing, scipy's
fractional matrix powers); K-FAC's factors are also checked against the exact empirical Fisher of a
single example, and Shampoo against the ``pytorch_optimizer`` library.
"""

from __future__ import annotations

import copy
import inspect
import io
import math
import sys
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mbf
from mbf_bench.optim import KFAC, TNT, Shampoo
from mbf_bench.optim.kronecker import ACCUMULATE, CONV_RESHAPES
from mbf_bench.optimizers import (
    OPTIMIZERS,
    TASK_DEFAULTS,
    OptimizerSpec,
    build_optimizer,
    defaults_for,
)

# ----------------------------------------------------------------------------- dense references


def _keeper(j: int, ins: dict[int, Tensor], outs: dict[int, Tensor]):
    """A forward hook that keeps layer ``j``'s input and output."""

    def hook(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
        ins[j], outs[j] = inp[0].detach(), out

    return hook


def per_example_deltas(model: nn.Module, layers: list[nn.Module], loss_one, xs: Tensor, ys: Tensor):
    """Inputs and output gradients ``dl_i/dy`` of ``layers`` for every example, one at a time."""
    inputs: list[list[Tensor]] = [[] for _ in layers]
    deltas: list[list[Tensor]] = [[] for _ in layers]
    for x, y in zip(xs, ys, strict=True):
        outs: dict[int, Tensor] = {}
        ins: dict[int, Tensor] = {}
        handles = [
            layer.register_forward_hook(_keeper(j, ins, outs)) for j, layer in enumerate(layers)
        ]
        loss = loss_one(model(x.unsqueeze(0)), y.unsqueeze(0))
        for h in handles:
            h.remove()
        grads = torch.autograd.grad(loss, [outs[j] for j in range(len(layers))])
        for j in range(len(layers)):
            inputs[j].append(ins[j][0])
            deltas[j].append(grads[j][0])
    return inputs, deltas


def conv_patches(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``(L, C*kh*kw)`` patches of one example, cut by slicing the zero-padded input."""
    ph, pw = conv.padding  # type: ignore[misc]
    xp = F.pad(x, (pw, pw, ph, ph))
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    oh = (xp.shape[1] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[2] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(oh):
        for j in range(ow):
            cols = [xp[:, i * sh + u * dh, j * sw + v * dw] for u in range(kh) for v in range(kw)]
            rows.append(torch.stack(cols, dim=1).reshape(-1))  # order (C, kh, kw)
    return torch.stack(rows)


def ref_kfac_factors(
    layer: nn.Module, inputs: list[Tensor], deltas: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """The K-FAC / KFC factors of the published formula from per-example quantities."""
    a_rows, g_rows = [], []
    for x, d in zip(inputs, deltas, strict=True):
        if isinstance(layer, nn.Conv2d):
            a = conv_patches(x, layer)
            g = d.reshape(d.shape[0], -1).T  # (L, out)
        else:
            a, g = x.unsqueeze(0), d.unsqueeze(0)
        if layer.bias is not None:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
        a_rows.append(a)
        g_rows.append(g)
    n = len(inputs)
    big_a = sum(a.T @ a for a in a_rows) / sum(a.shape[0] for a in a_rows)
    big_g = sum(g.T @ g for g in g_rows) / n
    return big_a, big_g


def layer_matrix(layer: nn.Module, grads: bool = True) -> Tensor:
    w = layer.weight.grad if grads else layer.weight
    out = w.shape[0]
    parts = [w.reshape(out, -1)]
    if layer.bias is not None:
        parts.append((layer.bias.grad if grads else layer.bias).reshape(out, 1))
    return torch.cat(parts, dim=1)


def frac_power(m: Tensor, power: float) -> Tensor:
    return torch.from_numpy(np.real(scipy.linalg.fractional_matrix_power(m.numpy(), power)))


def kron_all(mats: list[Tensor]) -> Tensor:
    out = mats[0]
    for m in mats[1:]:
        out = torch.kron(out, m)
    return out


def unfold_stats(g: Tensor) -> list[Tensor]:
    return [
        g.movedim(i, 0).reshape(g.shape[i], -1) @ g.movedim(i, 0).reshape(g.shape[i], -1).T
        for i in range(g.ndim)
    ]


def ref_shampoo_dir(stats: list[Tensor], m: Tensor, eps: float) -> Tensor:
    """``(P_1 (x) ... (x) P_k) vec(M)``, ``P_i = (H_i + eps I)^(-1/(2k))`` (Gupta et al.)."""
    k = len(stats)
    eye = [torch.eye(h.shape[0], dtype=h.dtype) for h in stats]
    ps = [frac_power(h + eps * e, -1.0 / (2 * k)) for h, e in zip(stats, eye, strict=True)]
    return (kron_all(ps) @ m.reshape(-1)).reshape(m.shape)


def ref_tnt_dir(stats: list[Tensor], m: Tensor, eps: float) -> Tensor:
    """TNT: equal-trace tensor-normal factors ``U_i``, then ``(U_1+eps I)^-1 (x) ...`` on vec(M)."""
    shape = [h.shape[0] for h in stats]
    k, total = len(shape), math.prod(shape)
    c = (float(torch.trace(stats[0])) / total) ** (1.0 / k)
    us = [h / (c ** (k - 1) * (total // n)) for h, n in zip(stats, shape, strict=True)]
    # the rescaled factors reproduce every mode statistic
    for i, h in enumerate(stats):
        others = math.prod(float(torch.trace(u)) for j, u in enumerate(us) if j != i)
        torch.testing.assert_close(us[i] * others, h)
    ps = [torch.linalg.inv(u + eps * torch.eye(u.shape[0], dtype=u.dtype)) for u in us]
    return (kron_all(ps) @ m.reshape(-1)).reshape(m.shape)


# ----------------------------------------------------------------------------- small models


def mlp(bias: bool = True) -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 3, bias=bias), nn.Tanh(), nn.Linear(3, 2))


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.Conv2d(3, 2, 2, dilation=2, bias=False),
        nn.Flatten(),
        nn.Linear(2, 3),
    )


def half_sse(out: Tensor, y: Tensor) -> Tensor:
    return 0.5 * ((out - y) ** 2).sum(dim=1).mean()


# ----------------------------------------------------------------------------- K-FAC


@pytest.mark.parametrize("pi_damping", [False, True])
def test_kfac_first_step_matches_published_formula_mlp(pi_damping: bool) -> None:
    torch.set_default_dtype(torch.float64)
    try:
        model = mlp()
        ref = copy.deepcopy(model)  # references run on a hook-free copy
        xs, ys = torch.randn(6, 4), torch.randn(6, 2)
        layers = [model[0], model[2]]
        lr, damping = 0.3, 0.05
        opt = KFAC(model, lr, momentum=0.9, damping=damping, pi_damping=pi_damping)
        before = [layer_matrix(layer, grads=False).clone() for layer in layers]
        opt.zero_grad()
        half_sse(model(xs), ys).backward()
        grads = [layer_matrix(layer).clone() for layer in layers]
        ins, dels = per_example_deltas(ref, [ref[0], ref[2]], half_sse, xs, ys)
        opt.step()
        for j, layer in enumerate(layers):
            a, g = ref_kfac_factors(layer, ins[j], dels[j])
            got_a, got_g = opt.factors(str(2 * j))
            torch.testing.assert_close(got_a, a, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got_g, g, rtol=1e-10, atol=1e-12)
            pi = (
                math.sqrt((a.trace() / a.shape[0]) / (g.trace() / g.shape[0]))
                if pi_damping
                else 1.0
            )
            ea, eg = torch.eye(a.shape[0]), torch.eye(g.shape[0])
            step = torch.linalg.solve(g + math.sqrt(damping) / pi * eg, grads[j])
            step = torch.linalg.solve((a + pi * math.sqrt(damping) * ea).T, step.T).T
            torch.testing.assert_close(
                layer_matrix(layer, grads=False), before[j] - lr * step, rtol=1e-9, atol=1e-12
            )
    finally:
        torch.set_default_dtype(torch.float32)


def test_kfac_conv_factors_and_plain_direction_for_batchnorm() -> None:
    torch.set_default_dtype(torch.float64)
    try:
        model = small_cnn()
        ref = copy.deepcopy(model)  # references run on a hook-free copy
        xs, ys = torch.randn(5, 2, 5, 5), torch.randint(0, 3, (5,))
        convs = [model[0], model[3], model[5]]
        lr, damping = 0.2, 0.1
        opt = KFAC(model, lr, momentum=0.0, damping=damping)
        assert opt.preconditioned == ["0", "3", "5"]
        bn_before = [model[1].weight.detach().clone(), model[1].bias.detach().clone()]
        opt.zero_grad()
        F.cross_entropy(model(xs), ys).backward()
        bn_grads = [model[1].weight.grad.clone(), model[1].bias.grad.clone()]
        mats = [layer_matrix(c).clone() for c in convs]
        before = [layer_matrix(c, grads=False).clone() for c in convs]
        # BatchNorm couples the examples, so the reference output gradients are those of the
        # batch loss itself: N * dL/dy is each example's share.
        outs: dict[int, Tensor] = {}
        ins: dict[int, Tensor] = {}
        refs = [ref[0], ref[3], ref[5]]
        handles = [c.register_forward_hook(_keeper(j, ins, outs)) for j, c in enumerate(refs)]
        loss = F.cross_entropy(ref(xs), ys)
        for h in handles:
            h.remove()
        grads = torch.autograd.grad(loss, [outs[j] for j in range(3)])
        opt.step()
        n = xs.shape[0]
        for j, conv in enumerate(convs):
            a, g = ref_kfac_factors(conv, list(ins[j]), list(n * grads[j]))
            got_a, got_g = opt.factors(str([0, 3, 5][j]))
            torch.testing.assert_close(got_a, a, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got_g, g, rtol=1e-10, atol=1e-12)
            root = math.sqrt(damping)
            step = torch.linalg.solve(g + root * torch.eye(g.shape[0]), mats[j])
            step = torch.linalg.solve(a + root * torch.eye(a.shape[0]), step.T).T
            torch.testing.assert_close(
                layer_matrix(conv, grads=False), before[j] - lr * step, rtol=1e-9, atol=1e-12
            )
        for p, p0, g in zip([model[1].weight, model[1].bias], bn_before, bn_grads, strict=True):
            torch.testing.assert_close(p.detach(), p0 - lr * g)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_kfac_kronecker_product_is_the_exact_empirical_fisher_of_one_example(kind: str) -> None:
    """With one example (one output location) ``G (x) A`` is exactly ``vec(grad) vec(grad)^T``."""
    torch.set_default_dtype(torch.float64)
    try:
        if kind == "linear":
            model: nn.Module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
            x = torch.randn(1, 3)
        else:
            model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3, 2))
            x = torch.randn(1, 2, 3, 3)
        y = torch.randn(1, 2)
        opt = KFAC(model, 0.1)
        opt.zero_grad()
        half_sse(model(x), y).backward()
        first = model[0]
        vec = layer_matrix(first).reshape(-1).clone()
        opt.step()
        a, g = opt.factors("0")
        torch.testing.assert_close(torch.kron(g, a), torch.outer(vec, vec), rtol=1e-10, atol=1e-14)
    finally:
        torch.set_default_dtype(torch.float32)


def test_kfac_sees_true_output_gradient_under_inplace_relu_and_ignores_eval_passes() -> None:
    torch.set_default_dtype(torch.float64)
    try:
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
        ref = nn.Sequential(copy.deepcopy(model[0]), nn.ReLU(), copy.deepcopy(model[2]))
        xs, ys = torch.randn(7, 3), torch.randn(7, 2)
        opt = KFAC(model, 0.1, stat_every=2)
        with torch.no_grad():
            model(torch.randn(9, 3))  # evaluation pass: no statistics
        model(torch.randn(5, 3))  # forward with grad but no backward: no statistics
        opt.zero_grad()
        half_sse(model(xs) - 1.0, ys).backward()  # the shift makes dL/dz nonzero where ReLU is 0
        ins, dels = per_example_deltas(
            ref, [ref[0], ref[2]], lambda o, t: half_sse(o - 1.0, t), xs, ys
        )
        opt.step()
        a, g = ref_kfac_factors(model[0], ins[0], dels[0])
        got_a, got_g = opt.factors("0")
        torch.testing.assert_close(got_a, a)
        torch.testing.assert_close(got_g, g)
        # step 1 is not a statistics step (stat_every=2): factors unchanged
        saved = [t.clone() for t in opt.factors("0")]
        opt.zero_grad()
        half_sse(model(torch.randn(7, 3)), ys).backward()
        opt.step()
        for t, s in zip(opt.factors("0"), saved, strict=True):
            torch.testing.assert_close(t, s, rtol=0, atol=0)
    finally:
        torch.set_default_dtype(torch.float32)


# ----------------------------------------------------------------------------- K-FAC damping


def _damped_fisher(a: Tensor, g: Tensor, damping: float, pi_damping: bool) -> Tensor:
    """The damped K-FAC block ``(A + pi sqrt(l) I) (x) (G + sqrt(l)/pi I)`` as a dense matrix,
    acting on the column-major vectorization of an ``out x (in+1)`` matrix."""
    pi = math.sqrt((a.trace() / a.shape[0]) / (g.trace() / g.shape[0])) if pi_damping else 1.0
    root = math.sqrt(damping)
    da = a + pi * root * torch.eye(a.shape[0])
    dg = g + root / pi * torch.eye(g.shape[0])
    return torch.kron(da, dg)  # vec(G X A) = (A^T (x) G) vec(X), column-major vec


def _vec(m: Tensor) -> Tensor:
    return m.T.reshape(-1)


def _kfac_one_step(kl_clip: float | None, pi_damping: bool) -> tuple[list[Tensor], list[Tensor],
                                                                     list[Tensor], KFAC]:
    """Parameters before and after one K-FAC step on a fixed batch, and the factors it used."""
    torch.manual_seed(3)
    model = mlp()
    xs, ys = torch.randn(6, 4), torch.randn(6, 2)
    opt = KFAC(model, 0.3, momentum=0.0, damping=0.05, pi_damping=pi_damping, kl_clip=kl_clip)
    layers = [model[0], model[2]]
    before = [layer_matrix(layer, grads=False).clone() for layer in layers]
    opt.zero_grad()
    half_sse(model(xs), ys).backward()
    opt.step()
    after = [layer_matrix(layer, grads=False).clone() for layer in layers]
    return before, after, [opt.factors(str(2 * j))[0] for j in range(2)], opt


@pytest.mark.parametrize("pi_damping", [False, True])
def test_kfac_kl_clip_scales_the_step_exactly_to_the_bound(pi_damping: bool) -> None:
    """The clipped step's quadratic form under the damped Fisher (dense Kronecker product, float64)
    equals ``kl_clip`` when the clip binds, and a loose clip leaves the step as it was."""
    torch.set_default_dtype(torch.float64)
    try:
        before, free, _, opt = _kfac_one_step(None, pi_damping)
        fishers = [
            _damped_fisher(*opt.factors(str(2 * j)), 0.05, pi_damping) for j in range(2)
        ]

        def kl(after: list[Tensor]) -> float:
            return sum(
                float(_vec(d1 - d0).detach() @ f @ _vec(d1 - d0).detach())
                for d0, d1, f in zip(before, after, fishers, strict=True)
            )

        unclipped = kl(free)
        _, clipped, _, opt = _kfac_one_step(0.25 * unclipped, pi_damping)
        assert kl(clipped) == pytest.approx(0.25 * unclipped, rel=1e-10)
        assert opt.param_groups[0]["kl_clip_nu"] == pytest.approx(0.5, rel=1e-10)
        for d0, d1, dc in zip(before, free, clipped, strict=True):
            torch.testing.assert_close(dc - d0, 0.5 * (d1 - d0), rtol=1e-10, atol=1e-14)
        _, loose, _, _ = _kfac_one_step(2.0 * unclipped, pi_damping)
        for d1, dl in zip(free, loose, strict=True):
            torch.testing.assert_close(dl, d1, rtol=0, atol=0)
    finally:
        torch.set_default_dtype(torch.float32)


def _lm_closure(opt: torch.optim.Optimizer, model: nn.Module, x: Tensor,
                y: Tensor) -> Callable[[], Tensor]:
    """The loop's minibatch loss as a closure (backward only with gradients on), for K-FAC's
    Levenberg-Marquardt adaptation, which re-evaluates it without gradients."""

    def closure() -> Tensor:
        opt.zero_grad()
        loss = half_sse(model(x), y)
        if torch.is_grad_enabled():
            loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("omega", [0.5, None])
def test_kfac_lm_rho_is_one_when_the_quadratic_model_is_the_loss(omega: float | None) -> None:
    """One example, a linear model with one output and residual 1: the loss is exactly quadratic
    and K-FAC's ``A (x) G = x x^T r^2`` is its Hessian, so ``rho = 1`` and the damping shrinks by
    ``omega`` (by default Martens & Grosse's ``(19/20)^adapt_every``)."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = nn.Linear(5, 1, bias=False)
        x = torch.randn(1, 5)
        y = (model(x) - 1.0).detach()  # residual exactly 1 at the start
        opt = KFAC(model, 0.7, momentum=0.0, damping=0.3, adapt_damping=True, adapt_every=1,
                   adapt_omega=omega)

        closure = _lm_closure(opt, model, x, y)
        opt.step(closure)
        assert opt.param_groups[0]["lm_rho"] == pytest.approx(1.0, abs=1e-12)
        factor = 0.95 if omega is None else omega  # (19/20)^1
        assert opt.param_groups[0]["damping"] == pytest.approx(0.3 * factor, rel=1e-14)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("lr", [0.3, 3.0, 30.0])
def test_kfac_lm_rho_and_damping_match_a_float64_reference(lr: float) -> None:
    """``rho = (h(theta + delta) - h(theta)) / (g . delta + 1/2 delta^T (A (x) G) delta)`` with the
    factors of the published formula, the gradient by autograd and the losses evaluated here;
    the damping moves by Martens & Grosse's rule (lr 0.3: rho near 1; lr 3: rho near 3, the model
    predicting a small decrease; lr 30: a model that predicts an increase, a failed step; the
    middle band of the rule is checked on :func:`lm_damping` below)."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(1)
        model = mlp()
        ref = copy.deepcopy(model)
        xs, ys = torch.randn(6, 4), torch.randn(6, 2)
        damping, omega = 0.05, 0.8
        opt = KFAC(model, lr, momentum=0.9, damping=damping, adapt_damping=True,
                   adapt_every=1, adapt_omega=omega)
        layers, ref_layers = [model[0], model[2]], [ref[0], ref[2]]

        closure = _lm_closure(opt, model, xs, ys)
        h_old = float(half_sse(ref(xs), ys).detach())
        grads = torch.autograd.grad(half_sse(ref(xs), ys), list(ref.parameters()))
        ins, dels = per_example_deltas(ref, ref_layers, half_sse, xs, ys)
        before = [layer_matrix(layer, grads=False).clone() for layer in layers]
        opt.step(closure)
        h_new = float(half_sse(model(xs), ys).detach())
        linear = curvature = 0.0
        for j, layer in enumerate(layers):
            delta = (layer_matrix(layer, grads=False) - before[j]).detach()
            g = torch.cat([grads[2 * j], grads[2 * j + 1].unsqueeze(1)], dim=1)
            a, gg = ref_kfac_factors(ref_layers[j], ins[j], dels[j])
            linear += float((g * delta).sum())
            curvature += float(_vec(delta) @ torch.kron(a, gg) @ _vec(delta))
        model_change = linear + 0.5 * curvature
        rho = (h_new - h_old) / model_change
        group = opt.param_groups[0]
        if model_change < 0:
            assert group["lm_rho"] == pytest.approx(rho, rel=1e-9)
        else:  # a model that predicts no decrease: a failed step
            assert math.isnan(group["lm_rho"])
            rho = math.nan
        if rho > 0.75:
            expected = damping * omega
        elif rho >= 0.25:
            expected = damping
        else:
            expected = damping / omega
        assert expected == {0.3: damping * omega, 3.0: damping * omega, 30.0: damping / omega}[lr]
        assert group["damping"] == pytest.approx(expected, rel=1e-14)
    finally:
        torch.set_default_dtype(torch.float32)


def test_kfac_lm_damping_rule_and_immediate_inversion_after_a_raise() -> None:
    """The rule's thresholds; and after a failed step the next step inverts with the raised
    damping at once, not at the next scheduled inversion."""
    from mbf_bench.optim.kfac import lm_damping

    assert lm_damping(2.0, 0.76, 0.5) == 1.0
    assert lm_damping(2.0, 0.75, 0.5) == 2.0
    assert lm_damping(2.0, 0.25, 0.5) == 2.0
    assert lm_damping(2.0, 0.24, 0.5) == 4.0
    assert lm_damping(2.0, math.nan, 0.5) == 4.0
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(1)
        model = mlp()
        xs, ys = torch.randn(6, 4), torch.randn(6, 2)
        opt = KFAC(model, 30.0, momentum=0.0, damping=0.05, adapt_damping=True, adapt_every=1,
                   adapt_omega=0.5, invert_early=False, inv_every=50)

        closure = _lm_closure(opt, model, xs, ys)
        opt.step(closure)
        assert opt.param_groups[0]["damping"] == pytest.approx(0.1)
        opt.param_groups[0]["adapt_damping"] = False
        opt.zero_grad()
        half_sse(model(xs), ys).backward()
        opt.step()
        a, _ = opt.factors("0")
        a_inv = opt.state[model[0].weight]["kfac_A_inv"]
        torch.testing.assert_close(a_inv @ (a + math.sqrt(0.1) * torch.eye(a.shape[0])),
                                   torch.eye(a.shape[0]), rtol=0, atol=1e-9)
    finally:
        torch.set_default_dtype(torch.float32)


def test_kfac_adaptation_needs_a_closure_and_checks_its_options() -> None:
    model = mlp()
    opt = KFAC(model, 0.1, adapt_damping=True, adapt_every=1)
    half_sse(model(torch.randn(3, 4)), torch.randn(3, 2)).backward()
    with pytest.raises(ValueError, match="adapt_damping needs step"):
        opt.step()
    for bad in ({"kl_clip": 0.0}, {"adapt_every": 0}, {"adapt_omega": 1.0}):
        with pytest.raises(ValueError, match="KFAC: " + next(iter(bad))):
            KFAC(mlp(), 0.1, **bad)  # type: ignore[arg-type]


def test_kfac_warns_about_layers_it_cannot_precondition() -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 3))
            self.norm = nn.LayerNorm(3)

        def forward(self, x: Tensor) -> Tensor:
            return self.norm(x @ self.weight)

    with pytest.warns(UserWarning, match=r"follow momentum SGD: weight$"):
        KFAC(Custom(), 0.1)


# ----------------------------------------------------------------------------- Shampoo and TNT


def kron_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 2), nn.Flatten(), nn.Linear(12, 2))


@pytest.mark.parametrize(("cls", "ref"), [(Shampoo, ref_shampoo_dir), (TNT, ref_tnt_dir)])
@pytest.mark.parametrize("conv_reshape", ["filter", "kfac", "none"])
def test_kronecker_two_steps_match_published_formula(cls, ref, conv_reshape: str) -> None:
    """Two steps with EMA statistics and momentum, against dense Kronecker products."""
    torch.set_default_dtype(torch.float64)
    try:
        model = kron_model()
        lr, eps, mu, beta = 0.05, 0.02, 0.9, 0.9
        opt = cls(
            model,
            lr,
            momentum=mu,
            damping=eps,
            stat_decay=beta,
            inv_every=1,
            conv_reshape=conv_reshape,
        )
        params = list(model.parameters())
        stats: dict[int, list[Tensor]] = {}
        moms: dict[int, Tensor] = {}
        for _ in range(2):
            x, y = torch.randn(4, 2, 3, 3), torch.randn(4, 2)
            opt.zero_grad()
            half_sse(model(x), y).backward()
            before = [p.detach().clone() for p in params]
            for i, p in enumerate(params):
                g = p.grad.clone()
                if p.ndim == 4 and conv_reshape == "filter":
                    g = g.reshape(g.shape[0], g.shape[1], -1)
                elif p.ndim == 4 and conv_reshape == "kfac":
                    g = g.reshape(g.shape[0], -1)
                new = unfold_stats(g)
                stats[i] = (
                    new
                    if i not in stats
                    else [beta * h + (1 - beta) * s for h, s in zip(stats[i], new, strict=True)]
                )
                moms[i] = g if i not in moms else mu * moms[i] + g
            opt.step()
            for i, p in enumerate(params):
                d = ref(stats[i], moms[i], eps).reshape(p.shape)
                torch.testing.assert_close(p.detach(), before[i] - lr * d, rtol=1e-8, atol=1e-11)
    finally:
        torch.set_default_dtype(torch.float32)


def test_shampoo_sum_form_matches_pytorch_optimizer_library() -> None:
    """``accumulate="sum"`` is Gupta et al.'s Shampoo, step for step the library's ``Shampoo``."""
    lib = pytest.importorskip("pytorch_optimizer")
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(3)
        ours_model = kron_model()
        theirs_model = kron_model()
        theirs_model.load_state_dict(ours_model.state_dict())
        ours = Shampoo(
            ours_model,
            0.1,
            momentum=0.0,
            damping=1e-3,
            accumulate="sum",
            inv_every=1,
            conv_reshape="none",
        )
        theirs = lib.Shampoo(theirs_model.parameters(), lr=0.1, momentum=0.0, matrix_eps=1e-3)
        for _ in range(3):
            x, y = torch.randn(4, 2, 3, 3), torch.randn(4, 2)
            for model, opt in ((ours_model, ours), (theirs_model, theirs)):
                opt.zero_grad()
                half_sse(model(x), y).backward()
                opt.step()
            for p, q in zip(ours_model.parameters(), theirs_model.parameters(), strict=True):
                torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)


def test_kronecker_skips_modes_over_max_precond_dim() -> None:
    model = nn.Linear(6, 2, bias=False)
    opt = Shampoo(model, 0.1, max_precond_dim=4)
    F.mse_loss(model(torch.randn(3, 6)), torch.randn(3, 2)).backward()
    opt.step()
    state = opt.state[model.weight]
    assert "stat_0" in state and "stat_1" not in state


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "name",
    ["kfac", "shampoo-ours", "tnt", "adamw", "schedulefree-adamw", "soap", "psgd-kron", "muon",
     "shampoo", "schedulefree-mbf"],
)
def test_state_dict_round_trip_continues_identically(name: str) -> None:
    """A state dict saved as the run's checkpoint is (``weights_only``) and loaded into a fresh
    optimizer continues bit for bit. Global generators reseeded per continuation: PSGD-Kron
    draws from torch's and numpy's (``mbf-bench run`` checkpoints both)."""

    def run(model: nn.Module, opt: torch.optim.Optimizer, seed: int, steps: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        np.random.seed(seed)
        for _ in range(steps):
            x = torch.randn(8, 2, 3, 3, generator=gen)
            opt.zero_grad()
            half_sse(model(x), torch.randn(8, 2, generator=gen)).backward()
            opt.step()

    def model() -> nn.Module:  # with a hidden matrix (Muon's)
        return nn.Sequential(nn.Conv2d(2, 3, 2), nn.Flatten(), nn.Linear(12, 6), nn.Tanh(),
                             nn.Linear(6, 2))

    curvature = "inv_every" in OPTIMIZERS[name].defaults
    hp = {"lr": 0.01, **({"inv_every": 2, "stat_every": 2} if curvature else {})}
    if name == "psgd-kron":
        hp["balance_prob"] = 0.5  # rebalance often: numpy's draws matter
    a = model()
    opt_a = build_optimizer(name, a, hp)
    run(a, opt_a, 0, 3)
    b = model()
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(name, b, hp)
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    buffer.seek(0)
    opt_b.load_state_dict(torch.load(buffer, weights_only=True))
    run(a, opt_a, 1, 3)
    run(b, opt_b, 1, 3)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# ----------------------------------------------------------------------------- registry


REQUIRED = {
    "sgdm", "adam", "adamw", "mbf", "mbf-batch", "mbf-per_example", "kfac", "shampoo-ours", "tnt",
    "schedulefree-adamw", "soap", "psgd-kron", "muon", "shampoo",
}


def test_registry_has_the_required_optimizers_and_consistent_specs() -> None:
    assert set(OPTIMIZERS) >= REQUIRED
    for name, spec in OPTIMIZERS.items():
        assert isinstance(spec, OptimizerSpec) and spec.name == name and "lr" in spec.defaults
    for family, table in TASK_DEFAULTS.items():
        assert set(table) <= set(OPTIMIZERS)
        for name, overrides in table.items():
            assert set(overrides) <= set(OPTIMIZERS[name].defaults), (family, name)


def test_no_layer_of_defaults_is_dead() -> None:
    """Each setting has one home per task: a spec default that a family table overrides must be
    a different value, and nothing a family table sets may be reset by the task itself (the
    GCN's weight decay lives in its loss, so no optimizer may carry one for that family)."""
    from mbf_bench.tasks import TASKS
    from mbf_bench.train import resolve_hparams

    for family, table in TASK_DEFAULTS.items():
        for name, overrides in table.items():
            spec = OPTIMIZERS[name].defaults
            for key, value in overrides.items():
                if key in ("stat_every", "inv_every"):  # the shared schedule, stated per family
                    continue
                assert spec[key] != value, f"{family}/{name}: {key}={value!r} is the default"
    for task in TASKS.values():
        for name in TASK_DEFAULTS[task.family]:
            resolved = resolve_hparams(name, task, {})
            for key, value in TASK_DEFAULTS[task.family][name].items():
                assert resolved[key] == value, (
                    f"{task.name}/{name}: the family's {key}={value!r} is reset to "
                    f"{resolved[key]!r} by the task"
                )


def test_curvature_schedule_follows_the_framework() -> None:
    # MBF's statistics keep the library's running average (0.9 with tied rows since the screen
    # of benchmarks/tied_rows/); our K-FAC, Shampoo and TNT keep the paper framework's 0.9.
    for name in ("mbf", "mbf-batch", "mbf-per_example", "kfac", "shampoo-ours", "tnt"):
        decay = mbf.DEFAULTS["stat_decay"] if name.startswith("mbf") else 0.9
        ae, cnn = defaults_for(name, "autoencoder"), defaults_for(name, "cnn")
        assert (ae["stat_every"], ae["inv_every"], ae["stat_decay"]) == (1, 20, decay)
        assert (cnn["stat_every"], cnn["inv_every"], cnn["stat_decay"]) == (10, 100, decay)
    assert mbf.DEFAULTS["stat_decay"] == 0.9 and mbf.PAPER["stat_decay"] == 0.9
    assert mbf.DEFAULTS["tie_rows"] and not mbf.PAPER["tie_rows"]
    untied = defaults_for("mbf-untied", "autoencoder")  # the defaults of 2026-12-07
    assert (untied["stat_decay"], untied["tie_rows"]) == (0.99, False)


def test_mbf_estimators_are_selectable() -> None:
    model = mlp()
    default = build_optimizer("mbf", model)
    assert default.estimator == mbf.MBF(mlp(), lr=0.1).estimator
    assert build_optimizer("mbf", mlp(), {"estimator": "per_example"}).estimator == "per_example"
    assert build_optimizer("mbf-batch", mlp()).estimator == "batch"
    assert build_optimizer("mbf-per_example", mlp()).estimator == "per_example"


_CHOICES = {"estimator": ("batch", "per_example"), "storage": ("full", "packed"),
            "loss_reduction": ("mean", "sum"), "accumulate": ACCUMULATE,
            "conv_reshape": CONV_RESHAPES, "graft": ("adam", "sgd", None),
            "memory_save_mode": (None, "one_diag"),
            "curvature_dtype": (None, torch.float32, torch.bfloat16)}
_ALIASES = {"beta1": ("betas", 0), "beta2": ("betas", 1)}  # torch's Adam keeps a pair
# Muon's AdamW settings live in its AdamW group under the plain names.
_MUON_ADAMW = {"adamw_lr": ("lr", None), "adamw_beta1": ("betas", 0),
               "adamw_beta2": ("betas", 1), "adamw_wd": ("weight_decay", None),
               "adamw_eps": ("eps", None)}


#: Settings another one needs (``two_sided`` needs tied rows, which some entries turn off).
_NEEDS: dict[str, dict[str, Any]] = {"two_sided": {"tie_rows": True}}
#: (entry, setting) pairs whose other value MBF refuses: ``mbf-two-sided`` ties rows to use
#: its output sides.
_REFUSED = {("mbf-two-sided", "tie_rows"): "two_sided=True needs tie_rows=True"}


def _another_value(key: str, value: Any) -> Any:
    """A valid value of ``key`` that differs from its default ``value``."""
    if key in _CHOICES:
        return next(c for c in _CHOICES[key] if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    return 0.0123 if not value else value * 0.5  # None, 0.0 or a positive float


def _setting(opt: torch.optim.Optimizer, key: str) -> Any:
    """Where optimizer ``opt`` keeps hyperparameter ``key`` of the registry."""
    groups = opt.param_groups
    group = groups[0]
    if key in _MUON_ADAMW:  # Muon: the AdamW group
        group = next(g for g in groups if not g["use_muon"])
        field, index = _MUON_ADAMW[key]
        return group[field] if index is None else group[field][index]
    if "use_muon" in group:  # Muon: the Muon group
        group = next(g for g in groups if g["use_muon"])
    if key in _ALIASES:
        field, index = _ALIASES[key]
        return group[field][index]
    if key == "sf_momentum":  # schedulefree-mbf: the wrapper's interpolation
        return opt.momentum  # type: ignore[attr-defined]
    # a param-group setting, or an optimizer-wide one (estimator, storage, ...)
    return group[key] if key in group else getattr(opt, key, "<absent>")


def deep_mlp() -> nn.Sequential:
    """Input layer, one hidden matrix (Muon's), head."""
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_hyperparameter_is_accepted_and_reaches_the_optimizer(name: str) -> None:
    spec = OPTIMIZERS[name]
    for key, default in spec.defaults.items():
        value = _another_value(key, default)
        if (name, key) in _REFUSED:  # a combination MBF refuses, naming it
            with pytest.raises(ValueError, match=_REFUSED[name, key]):
                build_optimizer(name, deep_mlp(), {key: value})
            continue
        extra = _NEEDS.get(key, {}) if spec.defaults.get(key) != value else {}
        opt = build_optimizer(name, deep_mlp(), {key: value, **extra})
        got = _setting(opt, key)
        assert got == value and type(got) is type(value), (key, value, got)


def test_bad_names_and_values_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'.*sgdm"):
        build_optimizer("lbfgs", mlp())
    with pytest.raises(ValueError, match="no hyperparameter.*'dampin'.*valid: .*damping"):
        build_optimizer("kfac", mlp(), {"dampin": 1.0})
    with pytest.raises(ValueError, match="unknown task family 'rnn'"):
        defaults_for("adam", "rnn")
    with pytest.raises(ValueError, match="KFAC: damping"):
        build_optimizer("kfac", mlp(), {"damping": -1.0})
    with pytest.raises(ValueError, match="TNT: inv_every"):
        build_optimizer("tnt", mlp(), {"inv_every": 0})
    with pytest.raises(ValueError, match="Shampoo: conv_reshape"):
        build_optimizer("shampoo-ours", mlp(), {"conv_reshape": "flat"})
    with pytest.raises(ValueError, match="KFAC: loss_reduction"):
        build_optimizer("kfac", mlp(), {"loss_reduction": "none"})


# ----------------------------------------------------------------------------- training smoke


class TinyGCN(nn.Module):
    """Two graph convolutions ``A relu(A X W1) W2`` from nn.Linear, called as ``model(x, adj)``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        return adj @ self.lin2(torch.relu(adj @ self.lin1(x)))


def _fixed_problem(family: str):
    gen = torch.Generator().manual_seed(0)
    if family == "autoencoder":
        model: nn.Module = nn.Sequential(
            nn.Linear(16, 12),
            nn.ReLU(),
            nn.Linear(12, 4),
            nn.Linear(4, 12),
            nn.ReLU(),
            nn.Linear(12, 16),
        )
        codes = torch.randn(64, 3, generator=gen)
        x = (codes @ torch.randn(3, 16, generator=gen) > 0).float()  # structured binary images
        return (
            model,
            (x,),
            lambda out: F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(1).mean(),
        )
    if family == "cnn":
        model = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
            nn.Linear(8 * 4 * 4, 5),
        )  # fmt: skip
        x, y = torch.randn(64, 3, 8, 8, generator=gen), torch.randint(0, 5, (64,), generator=gen)
        return model, (x,), lambda out: F.cross_entropy(out, y)
    x = torch.randn(20, 6, generator=gen)
    adj = (torch.rand(20, 20, generator=gen) < 0.2).double().float() + torch.eye(20)
    adj = adj / adj.sum(1, keepdim=True)
    y = torch.randint(0, 3, (20,), generator=gen)
    return TinyGCN(), (x, adj), lambda out: F.cross_entropy(out[:12], y[:12])


@pytest.mark.parametrize("family", ["autoencoder", "cnn", "gcn"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_trains_with_its_task_defaults(name: str, family: str) -> None:
    torch.manual_seed(0)
    model, inputs, loss_fn = _fixed_problem(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. MBF per_example: BatchNorm falls back to 'batch'
        opt = build_optimizer(name, model, defaults_for(name, family))
    losses = []

    def closure() -> Tensor:  # the trainer's form, for an optimizer that needs_closure
        opt.zero_grad()
        loss = loss_fn(model(*inputs))
        if torch.is_grad_enabled():
            loss.backward()
        return loss

    for _ in range(20):
        if getattr(opt, "needs_closure", False):
            loss = opt.step(closure)
        else:
            loss = closure()
            opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses), losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # The task defaults are scaled for the paper's problems (the autoencoders' losses sum over 784
    # pixels), so on these tiny ones some move slowly: ask for a decrease, not a rate.
    assert last < first, (name, family, first, last)


@pytest.mark.parametrize("name", ["kfac", "tnt"])
def test_invert_early_refreshes_the_preconditioner_during_the_first_inv_every_steps(
    name: str,
) -> None:
    """With ``invert_early`` step 1 already uses the curvature of steps 0 and 1, without it not."""

    def second_step_params(invert_early: bool) -> list[Tensor]:
        torch.manual_seed(0)
        model = kron_model()
        hp = {"lr": 0.01, "inv_every": 10, "invert_early": invert_early, "momentum": 0.0}
        opt = build_optimizer(name, model, hp)
        gen = torch.Generator().manual_seed(5)
        for _ in range(2):
            opt.zero_grad()
            half_sse(
                model(torch.randn(8, 2, 3, 3, generator=gen)), torch.randn(8, 2, generator=gen)
            ).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    early, late = second_step_params(True), second_step_params(False)
    assert all(torch.isfinite(p).all() for p in early)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(early, late, strict=True))


# ----------------------------------------------------------------------------- library baselines

LIBRARY = ("adamw", "schedulefree-adamw", "soap", "psgd-kron", "muon", "shampoo")


def test_display_name_marks_exactly_the_optimizers_that_are_not_validated() -> None:
    from mbf_bench.optimizers import display_name

    assert display_name("kfac") == "kfac"  # validated on mnist-ae (issue 19 item 1)
    assert display_name("shampoo-ours") == "shampoo-ours (not validated)"
    assert display_name("tnt") == "tnt (not validated)"
    assert display_name("shampoo") == "shampoo" and display_name("mbf") == "mbf"
    assert display_name("an-old-name") == "an-old-name"  # runs of a renamed optimizer


def _family_problem(family: str):
    """A task's own model on random data of its shape (a small batch of it)."""
    from mbf_bench.tasks import get_task, make_problem, stand_in_data

    task = get_task({"autoencoder": "digits-ae", "cnn": "cifar10-resnet8",
                     "gcn": "planetoid-gcn", "transformer": "text-gpt-tiny"}[family])
    data = stand_in_data(task, torch.Generator().manual_seed(0))
    problem = make_problem(task, data, seed=0, device=torch.device("cpu"), batch_size=16)
    torch.manual_seed(0)
    return task, task.model(data), problem, problem.batch(0, 0)


@pytest.mark.parametrize("family", ["autoencoder", "cnn", "gcn", "transformer"])
@pytest.mark.parametrize("name", LIBRARY)
def test_library_baselines_train_every_family_s_model(name: str, family: str) -> None:
    """On one fixed batch, at the library defaults (no family has its own), the loss falls
    (dropout and batch statistics off: a deterministic objective)."""
    task, model, problem, batch = _family_problem(family)
    model.eval()
    from mbf_bench.train import resolve_hparams

    opt = build_optimizer(name, model, resolve_hparams(name, task, {}))
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = problem.loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses), losses
    assert min(losses[-3:]) < losses[0], (name, family, losses)


def test_library_baselines_carry_their_library_s_defaults_and_no_family_ones() -> None:
    """The registry's defaults are the constructors' own (so they are the documented ones)."""
    import pytorch_optimizer as po
    import schedulefree

    def own(cls: type, **renamed: str) -> dict[str, Any]:
        sig = inspect.signature(cls.__init__).parameters
        return {renamed.get(k, k): v.default for k, v in sig.items()
                if v.default is not inspect.Parameter.empty}

    for name, cls in [("soap", po.SOAP), ("psgd-kron", po.Kron), ("muon", po.Muon),
                      ("shampoo", po.Shampoo), ("schedulefree-adamw",
                                                schedulefree.AdamWScheduleFree)]:
        defaults = dict(OPTIMIZERS[name].defaults)
        library = own(cls)
        for pair, (one, two) in (("betas", ("beta1", "beta2")),
                                 ("adamw_betas", ("adamw_beta1", "adamw_beta2"))):
            if pair in library:
                library[one], library[two] = library.pop(pair)
        for key, value in defaults.items():
            assert library[key] == value, (name, key, value, library[key])
        for table in TASK_DEFAULTS.values():
            assert name not in table, name
    assert {k: OPTIMIZERS["adamw"].defaults[k] for k in ("lr", "eps", "weight_decay")} == {
        "lr": 1e-3, "eps": 1e-8, "weight_decay": 1e-2}  # torch.optim.AdamW's
    assert all("adamw" not in table for table in TASK_DEFAULTS.values())


@pytest.mark.parametrize("module", ["pytorch_optimizer", "schedulefree", "opt_einsum"])
def test_a_missing_library_names_the_extra_that_installs_it(
    module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mbf_bench.baselines import MissingBaselineLibrary

    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    users = {"pytorch_optimizer": ["soap", "psgd-kron", "muon", "shampoo"],
             "schedulefree": ["schedulefree-adamw", "schedulefree-mbf"],
             "opt_einsum": ["psgd-kron"]}[module]
    for name in users:
        with pytest.raises(MissingBaselineLibrary, match=rf"{name!r} needs the .*pip install "
                           r"'mbf-optim\[baselines\]'"):
            build_optimizer(name, deep_mlp())
    build_optimizer("adam", deep_mlp())  # the others do not need it


def test_a_missing_library_is_one_line_from_the_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mbf_bench import cli

    monkeypatch.setitem(sys.modules, "schedulefree", None)
    code = cli.main(["run", "--task", "digits-ae", "--optimizers", "schedulefree-adamw",
                     "--max-steps", "1", "--no-progress"])
    assert code == 2
    assert "mbf-optim[baselines]" in capsys.readouterr().err


def test_schedulefree_mbf_is_defazio_s_averaging_around_mbf_s_direction() -> None:
    """Against the method written out (float64): gradients and MBF's statistics at
    ``y = (1 - beta) z + beta x``; MBF (momentum 0) steps ``z`` from them; ``x`` moves to
    ``z`` by ``c = w / sum(w)`` with ``w = lr_max ** 2``; ``eval()`` shows ``x``. The reference
    steps an MBF of its own on a second copy of the model, holding ``z`` in its parameters."""
    import mbf

    beta, lrs = 0.8, [0.02, 0.05, 0.05, 0.03, 0.04, 0.05]  # a warmup: lr_max and weights vary
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 2, 3, 3, generator=gen, dtype=torch.float64),
                torch.randn(8, 2, generator=gen, dtype=torch.float64)) for _ in lrs]

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 3, 2), nn.Flatten(), nn.Linear(12, 2)).double()

    hp = {"inv_every": 2, "stat_every": 1, "damping": 0.1}
    wrapped = model()
    opt = build_optimizer("schedulefree-mbf", wrapped, {**hp, "sf_momentum": beta})
    reference = model()
    inner = mbf.MBF(reference, **{**mbf.DEFAULTS, **hp, "momentum": 0.0})
    z = [p.detach().clone() for p in reference.parameters()]
    x = [p.detach().clone() for p in reference.parameters()]
    weight_sum, lr_max = 0.0, 0.0
    for lr, (inputs, targets) in zip(lrs, batches, strict=True):
        for group in (*opt.param_groups, *inner.param_groups):
            group["lr"] = lr
        opt.zero_grad()
        half_sse(wrapped(inputs), targets).backward()
        opt.step()

        with torch.no_grad():  # the reference: gradients at y, MBF's step applied to z
            for p, zi, xi in zip(reference.parameters(), z, x, strict=True):
                p.copy_((1 - beta) * zi + beta * xi)
        inner.zero_grad()
        half_sse(reference(inputs), targets).backward()
        with torch.no_grad():
            for p, zi in zip(reference.parameters(), z, strict=True):
                p.copy_(zi)
        inner.step()
        lr_max = max(lr_max, lr)
        weight_sum += lr_max**2
        c = lr_max**2 / weight_sum
        with torch.no_grad():
            for p, zi, xi in zip(reference.parameters(), z, x, strict=True):
                zi.copy_(p)
                xi.lerp_(zi, c)
        y = [(1 - beta) * zi + beta * xi for zi, xi in zip(z, x, strict=True)]
        for p, yi in zip(wrapped.parameters(), y, strict=True):
            torch.testing.assert_close(p.detach(), yi, rtol=1e-10, atol=1e-12)
    opt.eval()
    for p, xi in zip(wrapped.parameters(), x, strict=True):
        torch.testing.assert_close(p.detach(), xi, rtol=1e-10, atol=1e-12)
    assert opt.diagnostics()["steps"] == len(lrs)  # MBF's own methods reach through the wrapper


def test_schedulefree_mbf_refuses_an_interpolation_it_cannot_undo() -> None:
    with pytest.raises(ValueError, match="sf_momentum must be in"):
        build_optimizer("schedulefree-mbf", deep_mlp(), {"sf_momentum": 0.0})


def _gpt_like() -> nn.Module:
    """Token and position embeddings, a block (attention projections, MLP, LayerNorms) and a
    head, registered in the order of the forward pass."""

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.pos = nn.Embedding(11, 8), nn.Embedding(6, 8)
            self.ln1, self.qkv, self.proj = nn.LayerNorm(8), nn.Linear(8, 24), nn.Linear(8, 8)
            self.ln2, self.fc, self.out = nn.LayerNorm(8), nn.Linear(8, 16), nn.Linear(16, 8)
            self.ln_f, self.head = nn.LayerNorm(8), nn.Linear(8, 11, bias=False)

    return Tiny()


def _names(model: nn.Module, params: list[nn.Parameter]) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_muon_takes_exactly_the_hidden_weight_matrices() -> None:
    from mbf_bench.baselines import muon_split
    from mbf_bench.tasks import get_task, stand_in_data

    ae = get_task("digits-ae")
    model = ae.model(stand_in_data(ae, torch.Generator().manual_seed(0)))
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    hidden, other = muon_split(model)
    assert _names(model, hidden) == {f"{n}.weight" for n in linears[1:-1]}  # not input, not head
    assert _names(model, other) == {n for n, _ in model.named_parameters()} - _names(model, hidden)

    resnet = get_task("cifar10-resnet8")
    model = resnet.model(stand_in_data(resnet, torch.Generator().manual_seed(0)))
    hidden, _ = muon_split(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert _names(model, hidden) == {f"{n}.weight" for n in convs[1:]}  # the first conv: input
    assert all(p.ndim == 4 for p in hidden)

    gcn = get_task("planetoid-gcn")
    model = gcn.model(stand_in_data(gcn, torch.Generator().manual_seed(0)))
    assert muon_split(model)[0] == []  # two layers: input and head, nothing hidden

    text = get_task("text-gpt-tiny")
    model = text.model(stand_in_data(text, torch.Generator().manual_seed(0)))
    hidden, _ = muon_split(model)
    expected = {n for n, p in model.named_parameters()
                if n.startswith("blocks.") and p.ndim == 2}  # attention and MLP matrices
    assert expected and _names(model, hidden) == expected

    gpt = _gpt_like()
    hidden, _ = muon_split(gpt)
    assert _names(gpt, hidden) == {"qkv.weight", "proj.weight", "fc.weight", "out.weight"}
    gpt.head.weight = gpt.tok.weight  # a head tied to the embedding stays with AdamW
    assert _names(gpt, muon_split(gpt)[0]) == {"qkv.weight", "proj.weight", "fc.weight",
                                               "out.weight"}

    opt = build_optimizer("muon", _gpt_like())
    muon_group = next(g for g in opt.param_groups if g["use_muon"])
    assert len(muon_group["params"]) == 4 and muon_group["lr"] == 2e-2
    adamw_group = next(g for g in opt.param_groups if not g["use_muon"])
    assert adamw_group["lr"] == 3e-4 and adamw_group["betas"] == (0.9, 0.95)
