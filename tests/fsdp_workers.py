"""Rank programs for ``tests/test_fsdp.py``: MBF on models sharded by FSDP2 (``fully_shard``),
K gloo ranks on loopback, launched by ``tests/ranks.py`` (``run_ranks(..., main=main)``).

The models, data and hyperparameters live here, so that one process (the test) and K ranks
train exactly the same thing. Every layer's rows are cut unevenly by some K in (2, 3, 4): 5 rows
on 2 ranks are 3 + 2, on 4 ranks 2 + 2 + 1 + 0 (the last rank holds none).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distributed_workers import run_scenarios
from mbf import MBF

GLOBAL_BATCH = 12  # divisible by 2, 3 and 4
STEPS = 6
CHECKPOINT_AT = 3
HYPER: dict[str, Any] = {
    "tie_rows": False,  # a block per row (the paper's); SETTINGS ties them too
    "lr": 0.1,
    "damping": 0.05,
    "inv_every": 3,
    "max_block_size": 5,  # Linear(8, 5) rows of 9 in 2 chunks: padded blocks
    "weight_decay": 1e-3,
    "kl_clip": 1e-2,  # a sum over every rank's rows
    "graft": None,
}
CURVATURE = ("statistics", "inverse", "queue")
# (estimator, tie_rows): every run below is made in each, named by ``label``.
SETTINGS = [(e, t) for t in (False, True) for e in ("batch", "per_example")]


def label(estimator: str, tie: bool) -> str:
    return estimator + ("_tied" if tie else "")


def hyper(tie: bool) -> dict[str, Any]:
    return {**HYPER, "tie_rows": tie}


def make_model(kind: str) -> nn.Module:
    """``"mlp"``, ``"conv"`` (a conv layer in front, without bias: see ``test_fsdp``), or
    ``"wide"`` (the memory measurement: 64 rows per layer)."""
    torch.manual_seed(0)
    if kind == "mlp":
        layers: list[nn.Module] = [nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)]
    elif kind == "conv":
        layers = [nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.Tanh(), nn.Flatten(),
                  nn.Linear(48, 5), nn.Tanh(), nn.Linear(5, 3)]
    elif kind == "convbias":
        layers = [nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 3)]
    else:
        layers = [nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64)]
    return nn.Sequential(*layers).double()


def shard(model: nn.Module) -> nn.Module:
    """FSDP2's usual recipe: ``fully_shard`` on every layer with parameters, then the root."""
    from torch.distributed.fsdp import fully_shard

    for module in model:
        if any(True for _ in module.parameters()):
            fully_shard(module)
    fully_shard(model)
    return model


def global_batch(step: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 2, 4, 4, dtype=torch.float64, generator=gen)
    y = torch.randn(GLOBAL_BATCH, 3, dtype=torch.float64, generator=gen)
    if kind == "mlp":
        x = x.reshape(GLOBAL_BATCH, -1)[:, :8]
    return x, y


def train(model: nn.Module, opt: MBF, kind: str, steps: range, rank: int = 0,
          world: int = 1) -> None:
    """Mean squared error on this rank's contiguous part of each global batch."""
    per = GLOBAL_BATCH // world
    for step in steps:
        x, y = global_batch(step, kind)
        part = slice(rank * per, (rank + 1) * per)
        opt.zero_grad()
        nn.functional.mse_loss(model(x[part]), y[part]).backward()
        opt.step()


def full_params(model: nn.Module) -> torch.Tensor:
    """Every parameter whole (``full_tensor`` all-gathers a DTensor: for the test only)."""
    parts = []
    for p in model.parameters():
        whole = p.full_tensor() if hasattr(p, "full_tensor") else p
        parts.append(whole.detach().reshape(-1))
    return torch.cat(parts).clone()


def curvature_bytes(opt: MBF) -> tuple[int, int]:
    parts = opt.memory_report(detail=True).values()
    return sum(p[k] for p in parts for k in CURVATURE), sum(p["momentum"] for p in parts)


# ------------------------------------------------------------------------------ scenarios
def scenario_train(rank: int, world: int, outdir: Path) -> dict:
    """Both models and estimators; the MLP's per-rank files midway (per-example)."""
    out: dict[str, Any] = {}
    for kind in ("mlp", "conv"):
        for estimator, tie in SETTINGS:
            name = label(estimator, tie)
            model = shard(make_model(kind))
            opt = MBF(model, estimator=estimator, **hyper(tie))
            train(model, opt, kind, range(CHECKPOINT_AT), rank, world)
            if kind == "mlp":
                files = outdir / f"{name}_{world}"
                files.mkdir(exist_ok=True)
                torch.save(opt.sharded_state_dict(), files / f"opt.{rank}.pt")
                params = full_params(model)  # every rank: an all-gather
                if rank == 0:
                    torch.save(params, files / "params.pt")
            train(model, opt, kind, range(CHECKPOINT_AT, STEPS), rank, world)
            out[f"{kind}_{name}"] = full_params(model)
            out[f"{kind}_{name}_counters"] = opt.counters
    for tie in (False, True):
        model = shard(make_model("wide"))
        opt = MBF(model, estimator="per_example", stat_buffer=1, max_state_bytes=None,
                  tie_rows=tie)
        nn.functional.mse_loss(model(torch.randn(4, 64, dtype=torch.float64)),
                               torch.zeros(4, 64, dtype=torch.float64)).backward()
        opt.step()
        out[label("memory", tie)] = curvature_bytes(opt)
    return out


def scenario_resume(rank: int, world: int, outdir: Path, saved_world: int) -> dict:
    """Continue the MLP from the per-rank files of ``saved_world`` ranks; save this run's own
    files right after loading (the test compares them with the saved ones, bit for bit)."""
    out: dict[str, Any] = {}
    for estimator, tie in SETTINGS:
        name = label(estimator, tie)
        files = outdir / f"{name}_{saved_world}"
        model = make_model("mlp")
        load_params(model, torch.load(files / "params.pt"))
        shard(model)
        opt = MBF(model, estimator=estimator, **hyper(tie))
        opt.load_sharded_state_dict(
            [torch.load(files / f"opt.{r}.pt", mmap=True) for r in range(saved_world)]
        )
        again = outdir / f"{name}_{saved_world}_on_{world}"
        again.mkdir(exist_ok=True)
        torch.save(opt.sharded_state_dict(), again / f"opt.{rank}.pt")
        train(model, opt, "mlp", range(CHECKPOINT_AT, STEPS), rank, world)
        out[name] = full_params(model)
    return out


def load_params(model: nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def scenario_refusals(rank: int, world: int, outdir: Path) -> dict:
    """DTensor placements MBF cannot serve: the errors, raised at construction on every rank
    (before any collective), and a model whose conv bias is cut within each shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    out: dict[str, Any] = {}
    for label, placement in (("shard1", Shard(1)), ("replicate", Replicate())):
        model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4))
        for module in model:
            for name, p in list(module.named_parameters(recurse=False)):
                dt = distribute_tensor(p.detach(), mesh, [placement if p.dim() == 2 else Shard(0)])
                setattr(module, name, nn.Parameter(dt))
        try:
            MBF(model)
            out[label] = None
        except ValueError as exc:
            out[label] = str(exc)
    # Shard(0) DTensors without FSDP: the same state as FSDP2's, stepped alike.
    if world == 4:  # a 2-d mesh (HSDP's replicate x shard, or tensor parallelism's)
        mesh2 = init_device_mesh("cpu", (2, 2))
        model = nn.Sequential(nn.Linear(8, 6))
        for name, p in list(model[0].named_parameters(recurse=False)):
            dt = distribute_tensor(p.detach(), mesh2, [Replicate(), Shard(0)])
            setattr(model[0], name, nn.Parameter(dt))
        try:
            MBF(model)
            out["mesh2d"] = None
        except ValueError as exc:
            out["mesh2d"] = str(exc)
    # The gradient of the whole batch, computed in full on every rank and then sharded.
    model = make_model("mlp")
    x, y = global_batch(0, "mlp")
    nn.functional.mse_loss(model(x), y).backward()
    for module in model:
        for name, p in list(module.named_parameters(recurse=False)):
            sharded = nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)]))
            assert p.grad is not None
            sharded.grad = distribute_tensor(p.grad, mesh, [Shard(0)])
            setattr(module, name, sharded)
    opt = MBF(model, **HYPER)
    opt.step()
    out["dtensor"] = full_params(model)
    # A conv bias (no row structure) is cut into blocks within each rank's piece.
    model = shard(make_model("convbias"))
    opt = MBF(model, estimator="per_example", **HYPER)
    train(model, opt, "conv", range(2), rank, world)
    out["convbias"] = full_params(model)
    out["convbias_units"] = {u.name: u.layout.num_blocks for u in opt._units}
    # What FSDP2 cannot offer: refused with an error, the optimizer left as it was.
    refused = {}
    single = MBF(make_model("convbias"), process_group=False)
    for label, call in (("whole state dict", lambda: opt.load_state_dict(single.state_dict())),
                        ("state_dict", opt.state_dict),
                        ("add_param_group", lambda: opt.add_param_group({"params": []}))):
        try:
            call()
            refused[label] = None
        except (ValueError, RuntimeError, NotImplementedError) as exc:
            refused[label] = str(exc)
    train(model, opt, "conv", range(2, 3), rank, world)  # still steps, on every rank
    out["refused"] = refused
    # Tied rows: a rank's units share blocks between its own rows (the conv bias: no rows).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tied = MBF(shard(make_model("convbias")), **hyper(True))
    out["tie_warnings"] = [str(w.message) for w in caught if "tie_rows" in str(w.message)]
    out["tie_units"] = {u.name: (u.tied, u.tied_whole, u.curvature_blocks) for u in tied._units}
    try:  # the output side's blocks span rows of several ranks: refused, on every rank
        MBF(shard(make_model("mlp")), **hyper(True), two_sided=True)
        out["two_sided"] = None
    except ValueError as exc:
        out["two_sided"] = str(exc)
    return out


SCENARIOS = {"train": scenario_train, "resume": scenario_resume, "refusals": scenario_refusals}


def main(scenarios: list[tuple[str, dict]], rank: int, world: int, port: int, outdir: str) -> None:
    """One spawned rank of the FSDP2 scenarios (``distributed_workers.run_scenarios``)."""
    run_scenarios(SCENARIOS, scenarios, rank, world, port, outdir)
