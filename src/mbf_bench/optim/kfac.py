"""K-FAC with empirical-Fisher statistics taken from the training loop's own forward and backward.

Martens & Grosse (ICML 2015) for fully connected layers, Grosse & Martens (ICML 2016, "KFC") for
convolutions. For a layer with input rows ``a`` (bias: a trailing 1 appended; convolutions: one row
per output location, the unfolded input patch) and output gradients ``g``, the layer's Fisher
block is approximated by ``A (x) G`` with

    A = mean over all rows of a a^T                   (rows = examples x locations)
    G = (1/N) sum over examples and locations of (s g)(s g)^T

where ``N`` is the batch size and ``s = N`` undoes the ``1/N`` of a mean-reduced loss (so ``s g`` is
the per-example gradient; ``s = 1`` for a summed loss). For a fully connected layer this is
``E[a a^T] (x) E[delta delta^T]``; for a convolution it is Grosse & Martens' ``Omega (x) Gamma``
(the ``1/|T|`` of the spatial average sits in ``A`` instead of ``G``; the product is the same).

The update of a layer, with ``M = [momentum of dW, momentum of db]`` as an ``out x (in+1)``
matrix, is

    D = (G + gamma_G I)^-1 M (A + gamma_A I)^-1,
    gamma_A = pi sqrt(damping),  gamma_G = sqrt(damping) / pi,

with ``pi = 1`` (the authors' framework, "no-max" K-FAC) or, with ``pi_damping=True``, Martens &
Grosse's ``pi = sqrt((tr A / dim A) / (tr G / dim G))``. ``A`` and ``G`` are running averages
(``stat_decay``) refreshed every ``stat_every`` steps; inverses are recomputed every ``inv_every``
steps. Parameters of other layers (BatchNorm, LayerNorm, embeddings, custom layers) follow the
momentum-SGD direction, as the authors' K-FAC does for BatchNorm.

Statistics are captured by a forward hook on each supported layer, which (on statistics steps)
puts a tensor hook on the layer's output; the tensor hook receives ``g`` during the loop's own
``loss.backward()``. So the loop stays ``zero_grad(); loss.backward(); step()``, no extra pass is
made, and forwards without a backward (evaluation) leave no trace. The price: the Fisher is the
empirical one (true labels), not the sampled-label Fisher the authors' framework used.

Two pieces of the literature's damping machinery are options (both off by default):

* **KL clipping** (Ba, Grosse & Martens 2017; kfac-pytorch's ``kl_clip``). With ``D = P M`` the
  preconditioned direction of each K-FAC layer (``P`` the damped inverse Kronecker factors, ``M``
  the vector it preconditions: the gradient, or its momentum), ``D^T P^-1 D = D . M``, so the
  step ``lr * nu * D`` has the quadratic form ``lr^2 nu^2 sum(D . M)`` under the damped Fisher,
  the second-order estimate of twice its KL divergence. ``nu = min(1, sqrt(kl_clip /
  (lr^2 sum(D . M))))`` keeps it at most ``kl_clip``. Only the K-FAC layers' steps are scaled (as
  kfac-pytorch does); ``nu`` is the same for all of them.
* **Levenberg-Marquardt adaptation of the damping** (Martens & Grosse 2015, section 6.5). Every
  ``adapt_every`` steps the loss on the same minibatch is evaluated again after the update,
  ``h(theta + delta)``, and compared with the reduction the quadratic model predicts,
  ``M(delta) = g . delta + 1/2 sum over K-FAC layers of tr(delta^T G delta A)`` (the undamped
  K-FAC Fisher; ``g`` the gradient of the step, ``delta`` the change of the parameters):
  ``rho = (h(theta + delta) - h(theta)) / M(delta)``. ``rho > 3/4`` multiplies the damping by
  ``omega``, ``rho < 1/4`` (or a model that predicts no decrease) divides it by ``omega``, with
  Martens & Grosse's ``omega = (19/20)^adapt_every``. This needs the loss, so it needs
  ``step(closure)`` in the usual form (the closure zeroes the gradients, evaluates the minibatch
  loss and calls ``backward()``, but only when gradients are enabled); the optimizer calls it once
  with gradients (the step's own forward and backward) and, on adaptation steps, once more under
  ``torch.no_grad()``: one extra forward every ``adapt_every`` steps, counted in the step. The
  adaptation steps are the last of each ``adapt_every`` (``k + 1`` a multiple of it), so with
  ``inv_every`` a multiple of ``adapt_every`` they test the stalest inverses, not fresh ones. A
  lowered damping takes effect at the next scheduled inversion, a raised one at once (the
  factors are inverted again on the next step).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mbf._compat import NORM_BASES

from ._common import all_finite, apply_update, check_common, inverse_with_damping, momentum_of

__all__ = ["KFAC"]

# BatchNorm / InstanceNorm through mbf's one reader of torch's private base class.
_NORM_LAYERS = (*NORM_BASES, nn.LayerNorm, nn.GroupNorm)
REDUCTIONS = ("mean", "sum")


@dataclass(eq=False)
class _Layer:
    """One preconditioned layer and the statistics captured for it since the last step."""

    name: str
    module: nn.Linear | nn.Conv2d
    weight: Tensor
    bias: Tensor | None
    sum_a: Tensor | None = None
    sum_g: Tensor | None = None
    count: int = 0
    handles: list[RemovableHandle] = field(default_factory=list)

    def clear(self) -> None:
        self.sum_a = self.sum_g = None
        self.count = 0


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """Explicit zero padding of ``conv`` for ``F.unfold``, or None if it has none that fits."""
    if conv.padding_mode != "zeros":
        return None
    pad = conv.padding
    if pad == "valid":
        return (0, 0)
    if pad == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if any(t % 2 for t in totals):
            return None
        return (totals[0] // 2, totals[1] // 2)
    assert not isinstance(pad, str)
    return (int(pad[0]), int(pad[1]))


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and _conv_padding(module) is not None
    return False


def layer_rows(module: nn.Module, x: Tensor, gy: Tensor) -> tuple[Tensor, Tensor, int]:
    """``(a, g, N)``: input rows (bias 1 appended), output-gradient rows and the batch size.

    Linear: leading dimensions are flattened (an input ``(N, T, in)`` gives ``N*T`` rows).
    Conv2d: one row per example and output location, the unfolded input patch.
    """
    if isinstance(module, nn.Linear):
        batch = x.shape[0] if x.ndim > 1 else 1
        a = x.reshape(-1, x.shape[-1])
        g = gy.reshape(-1, gy.shape[-1])
    elif isinstance(module, nn.Conv2d):
        if x.ndim == 3:
            x, gy = x.unsqueeze(0), gy.unsqueeze(0)
        batch = x.shape[0]
        padding = _conv_padding(module)
        assert padding is not None
        patches = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
        a = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        g = gy.permute(0, 2, 3, 1).reshape(-1, gy.shape[1])
    else:  # pragma: no cover - guarded by _supported
        raise TypeError(f"KFAC: unsupported layer {type(module).__name__}")
    if module.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
    return a, g, batch


def _check_options(group: dict[str, Any]) -> None:
    """Raise a ``ValueError`` for a bad KL-clip or damping-adaptation setting."""
    clip = group["kl_clip"]
    if clip is not None and not (clip > 0.0 and math.isfinite(clip)):
        raise ValueError(f"KFAC: kl_clip must be None or a finite number > 0, got {clip!r}")
    every = group["adapt_every"]
    if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
        raise ValueError(f"KFAC: adapt_every must be a positive integer, got {every!r}")
    omega = group["adapt_omega"]
    if omega is not None and not (0.0 < omega < 1.0):
        raise ValueError(f"KFAC: adapt_omega must be in (0, 1), got {omega!r}")


def kl_clip_factor(quad: float, lr: float, kl_clip: float | None) -> float:
    """``nu = min(1, sqrt(kl_clip / (lr^2 quad)))`` for ``quad = sum(D . M)`` (1 without a clip).

    A non-positive or non-finite ``quad`` (rounding, or a non-finite direction) gives 1: there is
    nothing a scale could bound.
    """
    if kl_clip is None or lr == 0.0:
        return 1.0
    total = lr * lr * quad
    if not (total > 0.0 and math.isfinite(total)):
        return 1.0
    return min(1.0, math.sqrt(kl_clip / total))


def lm_damping(damping: float, rho: float, omega: float) -> float:
    """Martens & Grosse's rule: ``damping * omega`` if ``rho > 3/4``, ``/ omega`` if ``rho < 1/4``.

    A NaN ``rho`` (a non-finite loss or model) counts as a failed step: the damping grows.
    """
    if rho > 0.75:
        return damping * omega
    if not rho >= 0.25:
        return damping / omega
    return damping


class KFAC(torch.optim.Optimizer):
    """K-FAC (Martens & Grosse 2015, KFC for Conv2d) with empirical-Fisher factors from hooks.

    See the module docstring for the formulas. Preconditions ``nn.Linear`` and ``nn.Conv2d``
    (``groups=1``, zero padding); every other trainable parameter follows momentum SGD, and a
    warning names those that are not normalization layers.

    Args:
        model: the network; hooks are put on its Linear and Conv2d layers.
        lr: learning rate.
        momentum: heavy-ball momentum on the gradient, before preconditioning.
        damping: ``lambda``; each factor gets ``sqrt(lambda)`` (times ``pi`` or ``1/pi``).
        stat_decay: running-average factor of ``A`` and ``G`` (the first estimate is taken as is).
        stat_every: steps between statistics updates (hooks are idle in between).
        inv_every: steps between inversions (also inverted after the first statistics).
        weight_decay: L2 coefficient, or decoupled decay with ``decoupled_weight_decay=True``.
        pi_damping: split the damping with Martens & Grosse's ``pi`` instead of ``pi = 1``.
        invert_early: also invert after every statistics update during the first ``inv_every``
            steps (the authors' framework), so the first steps do not use stale curvature.
        loss_reduction: ``"mean"`` (the loss averages over the batch) or ``"sum"``.
        kl_clip: bound on ``lr^2 nu^2 sum(D . M)`` of the K-FAC layers' step (module docstring);
            None (the default) for no clipping.
        adapt_damping: Levenberg-Marquardt adaptation of ``damping`` (module docstring); needs
            ``step(closure)``.
        adapt_every: steps between adaptations (Martens & Grosse's ``T1 = 5``).
        adapt_omega: the factor of one adaptation; None for ``(19/20)^adapt_every``.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        *,
        momentum: float = 0.9,
        damping: float = 1e-3,
        stat_decay: float = 0.9,
        stat_every: int = 1,
        inv_every: int = 20,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        pi_damping: bool = False,
        invert_early: bool = True,
        loss_reduction: str = "mean",
        kl_clip: float | None = None,
        adapt_damping: bool = False,
        adapt_every: int = 5,
        adapt_omega: float | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"KFAC: model must be an nn.Module (hooks go on its layers), got {type(model)}"
            )
        if loss_reduction not in REDUCTIONS:
            raise ValueError(
                f"KFAC: loss_reduction must be one of {REDUCTIONS}, got {loss_reduction!r}"
            )
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("KFAC: the model has no trainable parameters")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "damping": damping,
            "stat_decay": stat_decay,
            "stat_every": stat_every,
            "inv_every": inv_every,
            "weight_decay": weight_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "pi_damping": pi_damping,
            "invert_early": invert_early,
            "kl_clip": kl_clip,
            "adapt_damping": adapt_damping,
            "adapt_every": adapt_every,
            "adapt_omega": adapt_omega,
            "step": 0,
        }
        super().__init__(params, defaults)
        check_common("KFAC", self.param_groups[0])
        _check_options(self.param_groups[0])
        self.loss_reduction = loss_reduction
        self._layers = self._find_layers(model, {id(p) for p in params})
        self._collect = True
        for layer in self._layers:
            hook = self._make_forward_hook(layer)
            layer.handles.append(layer.module.register_forward_hook(hook))

    # ------------------------------------------------------------------ construction
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_layers", None) is not None:
            raise ValueError("KFAC: parameter groups cannot be added; build a new optimizer")
        super().add_param_group(param_group)

    def _find_layers(self, model: nn.Module, trainable: set[int]) -> list[_Layer]:
        layers: list[_Layer] = []
        covered: set[int] = set()
        for name, module in model.named_modules():
            if not _supported(module) or id(module.weight) not in trainable:
                continue
            bias = module.bias if module.bias is not None and id(module.bias) in trainable else None
            if module.bias is not None and bias is None:
                continue  # frozen bias with trainable weight: not worth a special case
            layers.append(_Layer(name or type(module).__name__, module, module.weight, bias))
            covered.update({id(module.weight), id(bias)})
        plain = [
            f"{mname}.{pname}" if mname else pname
            for mname, module in model.named_modules()
            if not isinstance(module, _NORM_LAYERS)
            for pname, p in module.named_parameters(recurse=False)
            if p.requires_grad and id(p) not in covered
        ]
        if plain:
            shown = ", ".join(plain[:8]) + (f" and {len(plain) - 8} more" if len(plain) > 8 else "")
            warnings.warn(
                "KFAC: only nn.Linear and nn.Conv2d (groups=1, zero padding) are preconditioned; "
                f"these parameters follow momentum SGD: {shown}",
                stacklevel=3,
            )
        return layers

    def _make_forward_hook(self, layer: _Layer) -> Callable[..., None]:
        def forward_hook(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
            if not self._collect or not torch.is_grad_enabled() or not output.requires_grad:
                return
            x = inputs[0].detach()

            def grad_hook(gy: Tensor) -> None:
                self._accumulate(layer, x, gy.detach())

            output.register_hook(grad_hook)

        return forward_hook

    def _accumulate(self, layer: _Layer, x: Tensor, gy: Tensor) -> None:
        a, g, batch = layer_rows(layer.module, x, gy)
        scale = float(batch) if self.loss_reduction == "mean" else 1.0
        a_hat = a.T @ a / a.shape[0]
        g_hat = (g.T @ g) * (scale * scale / batch)
        if layer.sum_a is None or layer.sum_g is None:
            layer.sum_a, layer.sum_g = a_hat, g_hat
        else:
            layer.sum_a += a_hat
            layer.sum_g += g_hat
        layer.count += 1

    # ------------------------------------------------------------------ introspection
    @property
    def preconditioned(self) -> list[str]:
        """Names of the layers whose updates are Kronecker-preconditioned."""
        return [layer.name for layer in self._layers]

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """The running ``(A, G)`` of the layer called ``name``."""
        for layer in self._layers:
            if layer.name == name:
                st = self.state[layer.weight]
                if "kfac_A" not in st:
                    raise KeyError(f"KFAC: no statistics yet for layer {name}")
                return st["kfac_A"], st["kfac_G"]
        raise KeyError(f"KFAC: no preconditioned layer called {name}; have {self.preconditioned}")

    @property
    def needs_closure(self) -> bool:
        """Whether :meth:`step` needs the closure (``adapt_damping``); the benchmark's trainer
        then steps with ``step(closure)`` instead of its own backward."""
        return bool(self.param_groups[0]["adapt_damping"])

    def remove_hooks(self) -> None:
        """Detach the hooks from the model (the optimizer then keeps its last factors)."""
        for layer in self._layers:
            for handle in layer.handles:
                handle.remove()
            layer.handles.clear()

    # ------------------------------------------------------------------ stepping
    def _refresh(self, layer: _Layer, group: dict[str, Any]) -> bool:
        """Fold the captured statistics into the running averages; True if any were captured."""
        if layer.count == 0 or layer.sum_a is None or layer.sum_g is None:
            return False
        st = self.state[layer.weight]
        a_hat, g_hat = layer.sum_a / layer.count, layer.sum_g / layer.count
        layer.clear()
        if not all_finite(a_hat, g_hat):
            return False
        updates = st.get("kfac_stat_updates", 0)
        if updates == 0:
            st["kfac_A"], st["kfac_G"] = a_hat, g_hat
        else:
            decay = group["stat_decay"]
            st["kfac_A"].mul_(decay).add_(a_hat, alpha=1.0 - decay)
            st["kfac_G"].mul_(decay).add_(g_hat, alpha=1.0 - decay)
        st["kfac_stat_updates"] = updates + 1
        return True

    def _invert(self, layer: _Layer, group: dict[str, Any]) -> None:
        st = self.state[layer.weight]
        a, g = st["kfac_A"], st["kfac_G"]
        pi = 1.0
        if group["pi_damping"]:
            ta = float(a.diagonal().mean())
            tg = float(g.diagonal().mean())
            if ta > 0 and tg > 0:
                pi = (ta / tg) ** 0.5
        root = group["damping"] ** 0.5
        st["kfac_A_inv"] = inverse_with_damping(a, pi * root)
        st["kfac_G_inv"] = inverse_with_damping(g, root / pi)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One K-FAC step; ``closure`` (optional; needed by ``adapt_damping``) evaluates the
        minibatch loss, with its backward only when gradients are enabled."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        check_common("KFAC", group)
        _check_options(group)
        k = group["step"]
        adapt = bool(group["adapt_damping"]) and (k + 1) % group["adapt_every"] == 0
        if adapt and (closure is None or loss is None):
            raise ValueError(
                "KFAC: adapt_damping needs step(closure), the closure returning the minibatch loss"
            )
        due = k % group["inv_every"] == 0 or bool(group.get("kfac_reinvert", False))
        group["kfac_reinvert"] = False
        # (param, direction, scaled by the KL clip) for every parameter that takes a step
        updates: list[tuple[Tensor, Tensor, bool]] = []
        quad = 0.0
        for layer in self._layers:
            params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
            if any(p.grad is None for p in params):
                layer.clear()
                continue
            fresh = self._refresh(layer, group)
            st = self.state[layer.weight]
            early = fresh and (
                st["kfac_stat_updates"] == 1 or (group["invert_early"] and k < group["inv_every"])
            )
            if "kfac_A" in st and (due or early or "kfac_A_inv" not in st):
                self._invert(layer, group)
            moms = [momentum_of(self.state[p], p, group) for p in params]
            if "kfac_A_inv" not in st:
                updates.extend((p, m, False) for p, m in zip(params, moms, strict=True))
                continue
            out = layer.weight.shape[0]
            mom = torch.cat([m.reshape(out, -1) for m in moms], dim=1)
            mat = st["kfac_G_inv"] @ mom @ st["kfac_A_inv"]
            quad += float((mat * mom).sum())
            sizes = [m.reshape(out, -1).shape[1] for m in moms]
            for d, p in zip(mat.split(sizes, dim=1), params, strict=True):
                updates.append((p, d.reshape(p.shape), True))
        seen = {id(p) for p, _, _ in updates}
        for p in group["params"]:
            if p.grad is not None and id(p) not in seen:
                updates.append((p, momentum_of(self.state[p], p, group), False))
        nu = kl_clip_factor(quad, group["lr"], group["kl_clip"])
        group["kl_clip_nu"] = nu
        before = [p.detach().clone() for p, _, _ in updates] if adapt else []
        for p, d, clipped in updates:
            apply_update(p, d.mul(nu) if clipped and nu != 1.0 else d, group)
        if adapt:
            assert closure is not None and loss is not None
            predicted = self._model_change(updates, before, group)
            new_loss = float(closure())  # under no_grad: a forward only
            rho = (new_loss - float(loss)) / predicted if predicted < 0.0 else math.nan
            group["lm_rho"] = rho
            omega = group["adapt_omega"]
            if omega is None:  # Martens & Grosse's (19/20)^T1
                omega = (19.0 / 20.0) ** group["adapt_every"]
            damping = lm_damping(group["damping"], rho, omega)
            # a raised damping is a failed step: invert again at once rather than keep stepping
            # with the factors that failed until the next scheduled inversion
            group["kfac_reinvert"] = damping > group["damping"]
            group["damping"] = damping
        group["step"] = k + 1
        self._collect = (k + 1) % group["stat_every"] == 0 or any(
            self.state[layer.weight].get("kfac_stat_updates", 0) == 0 for layer in self._layers
        )
        return loss

    def _model_change(
        self,
        updates: list[tuple[Tensor, Tensor, bool]],
        before: list[Tensor],
        group: dict[str, Any],
    ) -> float:
        """``M(delta) = g . delta + 1/2 delta^T F delta``: the change of the loss the undamped
        K-FAC quadratic model predicts for the step just taken (``delta`` = new - old parameters;
        ``F`` block diagonal with ``A (x) G`` on the K-FAC layers, zero elsewhere, plus the L2
        coefficient when weight decay is L2)."""
        wd = group["weight_decay"] if not group["decoupled_weight_decay"] else 0.0
        deltas: dict[int, Tensor] = {}
        linear = curvature = 0.0
        for (p, _, _), old in zip(updates, before, strict=True):
            assert p.grad is not None
            delta = p.detach() - old
            deltas[id(p)] = delta
            g = p.grad if not wd else p.grad.add(old, alpha=wd)
            linear += float((g * delta).sum())
            if wd:
                curvature += wd * float((delta * delta).sum())
        for layer in self._layers:
            st = self.state[layer.weight]
            params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
            if "kfac_A" not in st or any(id(p) not in deltas for p in params):
                continue
            out = layer.weight.shape[0]
            mat = torch.cat([deltas[id(p)].reshape(out, -1) for p in params], dim=1)
            curvature += float(((st["kfac_G"] @ mat @ st["kfac_A"]) * mat).sum())
        return linear + 0.5 * curvature

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` (factors, inverses, momentum, step).

        The tensors are copied, so the optimizer that saved the state can go on independently.
        """
        super().load_state_dict(copy.deepcopy(state_dict))
        group = self.param_groups[0]
        self._collect = group["step"] % group["stat_every"] == 0 or any(
            self.state[layer.weight].get("kfac_stat_updates", 0) == 0 for layer in self._layers
        )
