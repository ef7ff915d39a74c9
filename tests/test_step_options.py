"""The step options beyond the paper's form: grafting, bias-corrected statistics, early refreshes.

Each is checked against an independent float64 reference of its definition (dense blocks from
``BlockLayout.dense_indices``), and through equivalences that must hold exactly: with blocks of
size one, grafting onto Adam is Adam and grafting onto SGD-m is SGD-m.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from mbf import MBF, PAPER
from mbf.diagnostics import Diagnostics
from mbf.direction import form_vector
from mbf.storage import STORAGES
from mbf.store import CurvatureStore
from tensors import flat_params

# Everything the references below depend on, spelled out (never the library defaults).
BASE = dict(
    lr=0.05,
    momentum=0.8,
    damping=1e-3,
    stat_decay=0.7,
    stat_every=1,
    inv_every=1,
    max_block_size=3,
    weight_decay=0.0,
    graft=None,
    bias_correction=False,
    early_refresh=False,
    relative_damping=False,
    inverse_root=1,
    tie_rows=False,  # the references spell out a block per row
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 4), nn.Tanh(),
        nn.Linear(4, 3),
    ).double()


def _loss(model: nn.Module, step: int) -> Tensor:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 2, 4, 4, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (8,), generator=gen)
    return nn.functional.cross_entropy(model(x), y)


def _inverse_power(matrix: Tensor, root: int) -> Tensor:
    """``matrix^(-1/root)`` of a symmetric positive definite matrix (float64)."""
    if root == 1:
        return torch.linalg.inv(matrix)
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.pow(-1.0 / root)) @ vectors.T


class Reference:
    """A float64 re-implementation of MBF's step with the batch estimator, one unit at a time.

    Each unit: the dense running average ``F`` of ``g g^T`` (bias-corrected or first-as-is),
    its blocks ``F_b`` factored on the schedule, the heavy-ball momentum ``m``, Adam's second
    moment ``v`` for grafting.
    """

    def __init__(self, opt: MBF, hp: dict) -> None:
        self.hp = hp
        self.units = [(u.layout, list(u.params)) for u in opt.blocks()]
        self.fisher = [torch.zeros(lay.numel, lay.numel, dtype=torch.float64)
                       for lay, _ in self.units]
        self.mass = [0.0] * len(self.units)
        self.updates = [0] * len(self.units)
        self.inverse: list[list[Tensor]] = [[] for _ in self.units]
        self.m = [torch.zeros(lay.numel, dtype=torch.float64) for lay, _ in self.units]
        self.v = [torch.zeros(lay.numel, dtype=torch.float64) for lay, _ in self.units]
        self.t = 0

    def _factor(self, i: int) -> None:
        layout, hp = self.units[i][0], self.hp
        fisher = self.fisher[i] / self.mass[i]
        eye = torch.eye(layout.numel, dtype=torch.float64)
        blocks = [fisher[idx][:, idx] for idx in layout.dense_indices()]
        if hp["relative_damping"]:  # in units of each block's mean eigenvalue (padded size)
            scales = [blk.trace() / layout.block_size for blk in blocks]
            dampings = [hp["damping"] * float(x) for x in scales]
        else:
            dampings = [hp["damping"]] * len(blocks)
        self.inverse[i] = [
            _inverse_power(blk + lam * eye[idx][:, idx], hp["inverse_root"])
            for blk, lam, idx in zip(blocks, dampings, layout.dense_indices(), strict=True)
        ]

    def step(self) -> None:
        hp = self.hp
        self.t += 1
        mu, beta, beta2, eps = hp["momentum"], hp["stat_decay"], 0.999, 1e-8
        for i, (layout, params) in enumerate(self.units):
            g = torch.cat([p.grad.reshape(-1) for p in params]).double()
            first = self.updates[i] == 0 and not hp["bias_correction"]
            weight = 1.0 if first else 1.0 - beta
            self.fisher[i] = (1 - weight) * self.fisher[i] + weight * torch.outer(g, g)
            self.mass[i] = (1 - weight) * self.mass[i] + weight
            self.updates[i] += 1
            n = self.updates[i]
            early = hp["early_refresh"] and n & (n - 1) == 0 and n < hp["inv_every"]
            if (self.t - 1) % hp["inv_every"] == 0 or n == 1 or early:
                self._factor(i)
            self.m[i] = mu * self.m[i] + g
            self.v[i] = beta2 * self.v[i] + (1 - beta2) * g * g
            adam = (self.m[i] * (1 - mu) / (1 - mu**self.t)) / (
                (self.v[i] / (1 - beta2**self.t)).sqrt() + eps
            )
            direction = torch.zeros_like(g)
            for inv, idx in zip(self.inverse[i], layout.dense_indices(), strict=True):
                d = inv @ self.m[i][idx]
                if hp["graft"] == "adam":
                    d = d * adam[idx].norm() / d.norm()
                elif hp["graft"] == "sgd":
                    d = d * self.m[i][idx].norm() / d.norm()
                direction[idx] = d
            with torch.no_grad():
                offset = 0
                for p in params:
                    k = p.numel()
                    p.sub_(hp["lr"] * direction[offset : offset + k].view_as(p))
                    offset += k


def _step_each(
    pairs: tuple[tuple[nn.Module, torch.optim.Optimizer], ...], step: int, scale: float = 1.0
) -> None:
    """One step of every (model, optimizer) pair on the same batch; the last pair's loss is
    multiplied by ``scale``."""
    for i, (model, opt) in enumerate(pairs):
        opt.zero_grad()
        factor = scale if i == len(pairs) - 1 else 1.0
        (factor * _loss(model, step)).backward()
        opt.step()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"bias_correction": True},
        {"bias_correction": True, "inv_every": 3},
        {"early_refresh": True, "inv_every": 6},
        {"bias_correction": True, "early_refresh": True, "inv_every": 5},
        {"graft": "adam"},
        {"graft": "sgd"},
        {"graft": "adam", "bias_correction": True, "early_refresh": True, "inv_every": 4},
        {"relative_damping": True, "damping": 0.1},
        {"relative_damping": True, "damping": 0.1, "bias_correction": True, "inv_every": 2},
        {"relative_damping": True, "damping": 1e-3, "graft": "adam", "bias_correction": True,
         "early_refresh": True, "inv_every": 5},
        {"inverse_root": 2},
        {"inverse_root": 2, "bias_correction": True, "inv_every": 3},
        {"inverse_root": 2, "relative_damping": True, "damping": 1e-3, "graft": "adam",
         "bias_correction": True, "early_refresh": True, "inv_every": 5},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "paper",
)
def test_steps_equal_the_float64_reference(options: dict) -> None:
    hp = {**BASE, **options}
    model, twin = _net(), _net()
    opt = MBF(model, **hp, stat_buffer=1)
    reference_opt = MBF(twin, **hp, stat_buffer=1)  # only for its unit layouts
    ref = Reference(reference_opt, hp)
    for step in range(9):
        for m in (model, twin):
            m.zero_grad()
            _loss(m, step).backward()
        opt.step()
        ref.step()
        torch.testing.assert_close(flat_params(model), flat_params(twin), rtol=1e-9, atol=1e-12)
        # Blocks damped by 1e-3 are ill-conditioned and the loss is chaotic in the parameters:
        # rounding would grow tenfold a step, so both go on from the same parameters.
        twin.load_state_dict(model.state_dict())


def test_early_refresh_factors_at_powers_of_two_then_on_schedule() -> None:
    model = _net()
    opt = MBF(model, **{**BASE, "inv_every": 20, "early_refresh": True})
    factored_at = []
    for step in range(45):
        before = opt.counters["factorizations"]
        model.zero_grad()
        _loss(model, step).backward()
        opt.step()
        if opt.counters["factorizations"] > before:
            factored_at.append(step)
    # Statistics update n is taken at step n - 1; the schedule factors at steps 0, 20, 40.
    assert factored_at == [0, 1, 3, 7, 15, 20, 40]


def test_bias_corrected_statistics_are_the_normalized_running_average() -> None:
    layer = nn.Linear(3, 2).double()
    opt = MBF(
        layer, **{**BASE, "bias_correction": True, "inv_every": 100, "max_block_size": 4},
        stat_buffer=1,
    )
    total, mass = torch.zeros(2, 4, 4, dtype=torch.float64), 0.0
    for step in range(5):
        layer.zero_grad()
        gen = torch.Generator().manual_seed(step)
        layer(torch.randn(4, 3, dtype=torch.float64, generator=gen)).sin().sum().backward()
        g = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
        total = 0.7 * total + 0.3 * g[:, :, None] * g[:, None, :]
        mass = 0.7 * mass + 0.3
        opt.step()
    unit = opt.blocks()[0]
    torch.testing.assert_close(unit.fisher, total)  # the raw running average, from zero
    torch.testing.assert_close(mass, 1 - 0.7**5)
    # Factored once, at the first update: the inverse of g_0 g_0^T + damping I (mass 0.3).
    first = torch.load(io.BytesIO(_saved(opt)), weights_only=False)["mbf"]["units"][0]
    assert first["stat_mass"] == pytest.approx(1 - 0.7**5)
    assert first["inverse_scale"] == pytest.approx(0.3)


def _saved(opt: MBF) -> bytes:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("graft", "lr", "first_order"),
    [
        ("adam", 0.01, lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.999), eps=1e-8)),
        ("sgd", 0.1, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.8)),
    ],
    ids=["adam", "sgd"],
)
def test_graft_with_blocks_of_one_is_the_first_order_method(
    graft: str, lr: float, first_order: Callable[..., torch.optim.Optimizer]
) -> None:
    """A size-one block's direction has the sign of its momentum, so grafting onto Adam's
    (SGD-m's) step lengths is Adam (SGD-m) exactly."""
    model, twin = _net(), _net()
    opt = MBF(model, **{**BASE, "max_block_size": 1, "graft": graft, "lr": lr})
    reference = first_order(twin.parameters())
    for step in range(6):
        _step_each(((model, opt), (twin, reference)), step)
        torch.testing.assert_close(flat_params(model), flat_params(twin), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bias_steps", [5, 2])  # steps the bias counted (5: all did)
def test_grafted_lengths_follow_each_parameters_own_adam_counters(bias_steps: int) -> None:
    """The grafted block lengths are Adam's ``m_hat / (sqrt(v_hat) + eps)`` with each parameter's
    own bias corrections, also in a unit whose weight and bias counted different steps (a state
    edited or migrated by hand); 5: counters equal, the scale applied to the lengths at once."""

    model = _net()
    hp = {**BASE, "graft": "adam", "graft_beta2": 0.99, "graft_eps": 1e-3}
    opt = MBF(model, **hp)
    for step in range(5):
        model.zero_grad()
        _loss(model, step).backward()
        opt.step()
    unit = opt._units[-1]  # the last Linear: blocks mix its weight and bias
    weight, bias = unit.params
    opt.state[bias]["graft_steps"] = opt.state[bias]["momentum_steps"] = bias_steps
    model.zero_grad()
    _loss(model, 5).backward()
    group = dict(opt.param_groups[unit.group])
    expected = []
    for p in (weight, bias):
        st = opt.state[p]
        m = hp["momentum"] * st["momentum_buffer"] + p.grad
        v = 0.99 * st["graft_sq"] + 0.01 * p.grad**2
        t_m, t_v = st["momentum_steps"] + 1, st["graft_steps"] + 1
        m_hat = m * (1 - hp["momentum"]) / (1 - hp["momentum"] ** t_m)
        expected.append(m_hat / ((v / (1 - 0.99**t_v)).sqrt() + 1e-3))
    lengths = form_vector(unit, group, opt.state, torch.empty_like(unit.layout.to_blocks(
        [weight, bias])))
    assert lengths is not None
    torch.testing.assert_close(
        lengths, torch.linalg.vector_norm(unit.layout.to_blocks(expected), dim=1),
        rtol=1e-12, atol=0.0)


def test_graft_makes_the_step_invariant_to_the_loss_scale() -> None:
    """Adam's step does not change when the loss is multiplied by c; nor does grafted MBF's
    (with damping scaled by c^2, the preconditioned direction is unchanged too)."""
    model, twin = _net(), _net()
    c = 1e3
    opt = MBF(model, **{**BASE, "graft": "adam", "graft_eps": 1e-30})
    opt2 = MBF(twin, **{**BASE, "graft": "adam", "graft_eps": 1e-30, "damping": 1e-3 * c * c})
    for step in range(4):
        _step_each(((model, opt), (twin, opt2)), step, scale=c)
    torch.testing.assert_close(flat_params(model), flat_params(twin), rtol=1e-7, atol=1e-10)


def test_relative_damping_scales_with_the_loss() -> None:
    """With damping relative to each block's scale, multiplying the loss by c divides the
    preconditioned step by c (as a natural-gradient step should): lr * c gives the same run."""
    model, twin = _net(), _net()
    c = 30.0
    hp = {**BASE, "relative_damping": True, "damping": 0.1, "bias_correction": True}
    opt = MBF(model, **hp)
    opt2 = MBF(twin, **{**hp, "lr": BASE["lr"] * c})
    for step in range(4):
        _step_each(((model, opt), (twin, opt2)), step, scale=c)
        torch.testing.assert_close(flat_params(model), flat_params(twin), rtol=1e-8, atol=1e-11)
        twin.load_state_dict(model.state_dict())


@pytest.mark.parametrize("relative_damping", [False, True])
def test_packed_storage_takes_the_same_steps(relative_damping: bool) -> None:
    hp = {**BASE, "graft": "adam", "bias_correction": True, "early_refresh": True,
          "inv_every": 4, "relative_damping": relative_damping, "damping": 0.01}
    model, twin = _net(), _net()
    opt, opt2 = MBF(model, **hp), MBF(twin, **hp, storage="packed")
    for step in range(7):
        _step_each(((model, opt), (twin, opt2)), step)
        torch.testing.assert_close(flat_params(model), flat_params(twin), rtol=1e-9, atol=1e-12)


def test_new_options_resume_bitwise() -> None:
    hp = {**BASE, "graft": "adam", "bias_correction": True, "early_refresh": True,
          "inv_every": 6}
    model, twin = _net(), _net()
    opt = MBF(model, **hp)
    for step in range(5):
        model.zero_grad()
        _loss(model, step).backward()
        opt.step()
    twin.load_state_dict(model.state_dict())
    opt2 = MBF(twin, **hp)
    opt2.load_state_dict(torch.load(io.BytesIO(_saved(opt)), weights_only=False))
    for step in range(5, 12):
        _step_each(((model, opt), (twin, opt2)), step)
    assert torch.equal(flat_params(model), flat_params(twin))


def test_paper_configuration_is_the_paper_form() -> None:
    """``PAPER`` switches every new option off: the update is ``(F_b + damping I)^-1 m_b``."""
    assert PAPER["graft"] is None and not PAPER["bias_correction"]
    assert not PAPER["early_refresh"]
    layer = nn.Linear(3, 2).double()
    opt = MBF(layer, **{**PAPER, "inv_every": 1, "momentum": 0.0})
    w0 = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1).clone()
    layer(torch.randn(5, 3, dtype=torch.float64)).square().sum().backward()
    g = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
    opt.step()
    eye = torch.eye(4, dtype=torch.float64)
    expected = torch.stack([torch.linalg.solve(torch.outer(r, r) + PAPER["damping"] * eye, r)
                            for r in g])
    moved = w0 - torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1)
    torch.testing.assert_close(moved, PAPER["lr"] * expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"graft": "lamb"}, "graft"),
        ({"graft_beta2": 1.0}, "graft_beta2"),
        ({"graft_eps": 0.0}, "graft_eps"),
        ({"bias_correction": 1}, "bias_correction"),
        ({"early_refresh": "yes"}, "early_refresh"),
        ({"relative_damping": None}, "relative_damping"),
    ],
)
def test_invalid_options_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        MBF(nn.Linear(2, 2), **kwargs)


def test_per_block_damping_in_the_batched_inverse_and_its_retries() -> None:
    """A ``(B,)`` damping tensor: each block gets its own; a zero damping on a singular block
    takes the retry path with that block's own base, the others are untouched."""
    from mbf.linalg import damped_inverse

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(4, 5, 5, dtype=torch.float64, generator=gen)
    fisher = a @ a.mT
    fisher[2] = torch.outer(a[2, 0], a[2, 0])  # rank one: singular without damping
    damping = torch.tensor([0.1, 2.0, 0.0, 1e-3], dtype=torch.float64)
    inverse, report = damped_inverse(fisher, damping)
    eye = torch.eye(5, dtype=torch.float64)
    for b in (0, 1, 3):
        torch.testing.assert_close(inverse[b], torch.linalg.inv(fisher[b] + damping[b] * eye))
    assert report.retried == 1 and report.fallback == 0
    product = inverse[2] @ fisher[2]
    assert torch.isfinite(product).all()


def test_relative_damping_of_a_block_does_not_depend_on_its_neighbours() -> None:
    """damping * tr(F_b) / s per block; a block without statistics gets damping on the
    corrected scale. Factoring blocks in any split (one run, or a rank's slice) gives each
    block the same damping."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 4, 7, dtype=torch.float64, generator=gen)
    fisher = a @ a.mT
    fisher[2] = 0.0  # no statistics yet (e.g. a unit that has had no gradient)
    for name, storage in STORAGES.items():
        store = CurvatureStore(storage, 1, Diagnostics())
        stored = storage.from_blocks(fisher.clone())
        whole = store.relative_damping(stored, 4, 0.1, scale=0.3)
        want = 0.1 * fisher.diagonal(dim1=-2, dim2=-1).sum(-1) / 4
        want[2] = 0.1 * 0.3
        torch.testing.assert_close(whole, want, rtol=1e-14, atol=0.0, msg=name)
        for lo, hi in ((0, 3), (2, 3), (3, 6)):
            part = store.relative_damping(stored[lo:hi], 4, 0.1, scale=0.3)
            assert torch.equal(part, whole[lo:hi]), (name, lo, hi)


@pytest.mark.parametrize("storage", ["full", "packed"])
def test_inverse_root_blocks_are_the_inverse_square_roots(storage: str) -> None:
    """``inverse_root=2`` keeps ``(F_b + damping I)^-1/2`` of the statistics (in either
    storage): symmetric, and its square is the damped inverse."""
    model = _net()
    opt = MBF(model, **{**BASE, "damping": 0.05, "inverse_root": 2}, storage=storage)
    for step in range(3):
        _step_each(((model, opt),), step)
    eye = torch.eye(BASE["max_block_size"], dtype=torch.float64)
    for unit in opt.blocks():  # factored at every step (inv_every=1)
        expected = torch.stack([_inverse_power(f + 0.05 * eye, 2) for f in unit.fisher])
        torch.testing.assert_close(unit.inverse, expected, rtol=1e-9, atol=1e-12)
        inverse = torch.linalg.inv(unit.fisher + 0.05 * eye)
        torch.testing.assert_close(unit.inverse @ unit.inverse, inverse, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("value", [0, 3, 1.5, True, "2"])
def test_inverse_root_other_than_one_or_two_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="inverse_root"):
        MBF(_net(), inverse_root=value)


def test_moments_of_all_parameters_at_once_equal_them_one_by_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The eager step advances Adam's moments of every parameter with ``_foreach`` operations
    (``mbf.direction.advance_moments``); bit for bit what ``form_vector`` does one parameter at
    a time: two groups with different momentum, ``graft_eps``, coupled and decoupled weight
    decay, a parameter that misses its gradient for a step (and then restarts its counters
    later than the others), float32."""
    import mbf.optimizer
    from tensors import state_tensors

    def run(batched: bool) -> tuple[Tensor, list[tuple[str, Tensor]], int]:
        calls = []
        if not batched:
            monkeypatch.setattr(mbf.optimizer, "advance_moments", lambda *args: {})
        else:
            original = mbf.direction.advance_moments

            def counting(*args: object) -> object:
                out = original(*args)  # type: ignore[arg-type]
                calls.append(len(out))
                return out

            monkeypatch.setattr(mbf.optimizer, "advance_moments", counting)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(),
                              nn.Linear(5, 3, bias=False))
        head = list(model[3].parameters())
        rest = [p for p in model.parameters() if all(p is not q for q in head)]
        opt = MBF([{"params": rest, "weight_decay": 0.1, "graft_eps": 1e-6},
                   {"params": head, "momentum": 0.8, "weight_decay": 0.05,
                    "decoupled_weight_decay": True}], lr=0.02, max_block_size=4, inv_every=2)
        x, y = torch.randn(16, 6), torch.randn(16, 3)
        for step in range(7):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            if step == 2:
                model[0].bias.grad = None  # no gradient this step
            opt.step()
        monkeypatch.undo()
        return flat_params(model), state_tensors(opt.state_dict()), sum(calls)

    one_by_one, state_one, _ = run(batched=False)
    at_once, state_all, batched_parameters = run(batched=True)
    assert batched_parameters > 0  # the batched path did run
    assert torch.equal(at_once, one_by_one)
    assert [k for k, _ in state_all] == [k for k, _ in state_one]
    for (key, a), (_, b) in zip(state_all, state_one, strict=True):
        assert torch.equal(a, b), key
