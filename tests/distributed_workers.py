"""Rank programs for ``tests/test_distributed.py`` and ``tests/test_equivalence.py`` (spawned
processes, gloo on loopback; launched by ``tests/ranks.py``).

Every scenario is a function ``(rank, world, outdir, **kw) -> dict`` run inside an initialized
process group; its result is saved to ``outdir/rank{r}.pt`` (or the traceback, on failure).
The model, data and hyperparameters live here so that one process (the test) and K ranks
(the spawned workers) train exactly the same thing.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from mbf import MBF

GLOBAL_BATCH = 12  # divisible by 2 and 3
STEPS = 6
CHECKPOINT_AT = 3
HYPER: dict[str, Any] = {
    "lr": 0.1,
    "momentum": 0.9,
    "damping": 0.05,
    "stat_decay": 0.9,
    "inv_every": 3,  # with early_refresh: factored at steps 0, 1 (2nd update), 3
    "max_block_size": 5,  # several buckets (block sizes 5, 3, 2), each split over the ranks
    "weight_decay": 1e-3,
    "kl_clip": 1e-2,
    # Bias-corrected inverses: every rank must scale every unit alike.
    "graft": None,
    "bias_correction": True,
    "early_refresh": True,
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
        nn.Tanh(),
        nn.Linear(5, 3),
        nn.LayerNorm(3),
    ).double()


def make_optimizer(model: nn.Module, estimator: str, **kw: Any) -> MBF:
    return MBF(model, estimator=estimator, **dict(HYPER, **kw))


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 2, 4, 4, dtype=torch.float64, generator=gen)
    return x, torch.randint(0, 3, (GLOBAL_BATCH,), generator=gen)


def train(model: nn.Module, opt: MBF, steps: range, rank: int = 0, world: int = 1) -> None:
    """Mean cross-entropy on this rank's contiguous shard of each global batch."""
    per = GLOBAL_BATCH // world
    for step in steps:
        x, y = global_batch(step)
        shard = slice(rank * per, (rank + 1) * per)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[shard]), y[shard]).backward()
        opt.step()


def train_accumulated(
    model: nn.Module, opt: MBF, steps: range, rank: int, world: int, micro: int = 2
) -> None:
    """As :func:`train`, but each rank's shard in ``micro`` micro-batches, each loss divided by
    ``micro`` and DDP's all-reduce only on the last (``no_sync``): the same mean gradient."""
    per = GLOBAL_BATCH // world
    for step in steps:
        x, y = global_batch(step)
        shard = slice(rank * per, (rank + 1) * per)
        opt.zero_grad()
        parts = list(zip(x[shard].chunk(micro), y[shard].chunk(micro), strict=True))
        for i, (xb, yb) in enumerate(parts):
            sync = i == len(parts) - 1 or not isinstance(model, DDP)
            with contextlib.nullcontext() if sync else model.no_sync():
                (nn.functional.cross_entropy(model(xb), yb) / len(parts)).backward()
        opt.step()


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


# ------------------------------------------------------------------------------ scenarios
def scenario_train(
    rank: int, world: int, outdir: Path, resume: str | None = None, native: bool = False
) -> dict:
    """Both estimators under DDP; with ``resume``, continue a single-process checkpoint.

    ``native``: use all_gather and reduce_scatter as on NCCL, instead of the all-reduces MBF
    prefers on gloo, so that the tests cover both.
    """
    out: dict[str, Any] = {}
    for estimator in ("batch", "per_example"):
        model = DDP(make_model())
        opt = make_optimizer(model, estimator)
        assert opt.distributed is not None
        if native:
            opt.distributed._sum_only = False
        first = 0
        if resume is not None:
            saved = torch.load(Path(resume) / f"single_{estimator}.pt")
            model.module.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            first = CHECKPOINT_AT
            train(model, opt, range(first, STEPS), rank, world)
        else:
            train(model, opt, range(CHECKPOINT_AT), rank, world)
            try:  # each rank holds only its share of the curvature until consolidation
                opt.state_dict()
                out[f"unconsolidated_{estimator}"] = None
            except RuntimeError as exc:
                out[f"unconsolidated_{estimator}"] = str(exc)
            # Each rank's own checkpoint file (no collective), then the consolidated one.
            torch.save(opt.sharded_state_dict(), outdir / f"rank{rank}_{estimator}.pt")
            opt.consolidate_state_dict()  # every rank
            if rank == 0:
                full = {"model": model.module.state_dict(), "opt": opt.state_dict()}
                torch.save(full, outdir / f"full_{estimator}.pt")
            train(model, opt, range(CHECKPOINT_AT, STEPS), rank, world)
        engine = opt.distributed
        assert engine is not None
        out[estimator] = {
            "params": flat_params(model),
            "counters": opt.counters,
            "traffic": engine.traffic,
        }
    return out


def scenario_failures(rank: int, world: int, outdir: Path) -> dict:
    """Mismatched configurations, a stalled rank and a dead rank."""
    out: dict[str, Any] = {}
    last = world - 1
    # 1. A different learning rate (or block size) on one rank is refused at construction.
    for key, value in (("lr", 0.2), ("max_block_size", 4)):
        model = make_model()
        kw = {key: value} if rank == last else {}
        try:
            make_optimizer(model, "batch", **kw)
            out[f"mismatch_{key}"] = None
        except ValueError as exc:
            out[f"mismatch_{key}"] = str(exc)

    # 2. A rank that stalls: the others give up after the group's timeout (2 s here).
    short = dist.new_group(timeout=datetime.timedelta(seconds=2))
    model = make_model()
    opt = make_optimizer(model, "batch", process_group=short)
    train(model, opt, range(1), rank, world)
    if rank == last:
        time.sleep(3.0)
        out["stall"] = None
    else:
        x, y = global_batch(1)
        nn.functional.cross_entropy(model(x), y).backward()
        start = time.monotonic()
        try:
            opt.step()
            out["stall"] = None
        except RuntimeError as exc:
            out["stall"] = (str(exc), time.monotonic() - start)
    dist.barrier()

    # 3. A rank that dies between its backward pass and its optimizer step.
    model = DDP(make_model())
    opt = make_optimizer(model, "batch")
    train(model, opt, range(2), rank, world)
    x, y = global_batch(2)
    shard = slice(rank * (GLOBAL_BATCH // world), (rank + 1) * (GLOBAL_BATCH // world))
    nn.functional.cross_entropy(model(x[shard]), y[shard]).backward()
    if rank == last:
        os._exit(17)
    start = time.monotonic()
    try:
        opt.step()
        out["dead"] = None
    except RuntimeError as exc:
        out["dead"] = (str(exc), time.monotonic() - start)
    return out


def scenario_accumulate(rank: int, world: int, outdir: Path) -> dict:
    """Per-example statistics under DDP with gradient accumulation on every rank."""
    model = DDP(make_model())
    opt = make_optimizer(model, "per_example")
    train_accumulated(model, opt, range(STEPS), rank, world)
    return {"params": flat_params(model), "counters": opt.counters}


def scenario_storage(rank: int, world: int, outdir: Path) -> dict:
    """Both storages with queued statistics on K ranks: each rank's memory, the parameters."""
    out: dict[str, Any] = {}
    for storage in ("full", "packed"):
        model = DDP(make_model())
        opt = make_optimizer(model, "batch", storage=storage, stat_buffer=2)
        out[f"memory_{storage}"] = opt.memory_report(detail=True)
        out[f"allocated_{storage}"] = sum(  # what the report counts is what is allocated
            t.numel() * t.element_size() for b in opt._store.buckets for t in (b.fisher, b.inverse)
        )
        train(model, opt, range(STEPS), rank, world)
        out[storage] = flat_params(model)
    return out


def scenario_configs(rank: int, world: int, outdir: Path, plans: list[dict]) -> dict:
    """The equivalence harness's configurations (``tests/equivalence.py``), all in this spawn.

    ``plans``: :func:`run_plan`'s plans. A segment on ``k < world`` ranks runs on ranks
    ``0 .. k-1`` in a process group of their own (the others wait at the barrier), a segment on
    one rank on rank 0 with no process group, so one spawn serves every rank count. A plan that
    raises on a rank leaves its traceback as that rank's result and the next plan runs.
    """
    groups: dict[int, Any] = {1: False, world: dist.group.WORLD}
    for k in range(2, world):  # every rank must take part in creating every group
        groups[k] = dist.new_group(list(range(k)))
    return {plan["key"]: run_plan(plan, rank, outdir, groups) for plan in plans}


def run_plan(plan: dict, rank: int, outdir: Path, groups: dict[int, Any]) -> dict | None:
    """Train one configuration of the equivalence harness; this rank's result.

    ``plan``: ``{"key", "segments", "changes"}`` with ``segments`` a list of
    ``{"options", "ranks", "start", "stop"}`` (MBF's keyword arguments, rank count, steps
    ``start .. stop-1``) and ``changes`` ``{step: {hyperparameter: value}}`` set in every param
    group before that step. Between segments the state is consolidated, saved by rank 0 with
    ``torch.save`` and loaded into a freshly built model and optimizer. ``groups[k]``: the
    process group of a ``k``-rank segment (``False``: one process). Returns ``None`` on a rank
    outside the last segment, ``{"error": traceback}`` when this rank raised.
    """
    key, segments, changes = plan["key"], plan["segments"], plan["changes"]
    failed: str | None = None
    result: dict | None = None
    saved_queues: list[list[int]] = []
    for i, seg in enumerate(segments):
        k, last = seg["ranks"], i == len(segments) - 1
        checkpoint = outdir / f"{key}_{i}.pt"
        if failed is None and rank < k:
            try:
                model = make_model()
                if i > 0:
                    saved = torch.load(outdir / f"{key}_{i - 1}.pt", weights_only=False)
                    model.load_state_dict(saved["model"])
                # find_unused_parameters: DDP then never rebuilds its buckets, so a DDP built at a
                # resume sums the gradients in the order of the uninterrupted run (on 3 ranks
                # gloo's sums depend on the bucket layout): resuming changes no bit.
                net = (
                    DDP(model, process_group=groups[k], find_unused_parameters=True)
                    if k > 1
                    else model
                )
                opt = MBF(net, process_group=groups[k], **seg["options"])
                if i > 0:
                    opt.load_state_dict(saved["opt"])
                for step in range(seg["start"], seg["stop"]):
                    for name, value in changes.get(step, {}).items():
                        for group in opt.param_groups:
                            group[name] = value
                    train(net, opt, range(step, step + 1), rank, k)
                opt.consolidate_state_dict()  # every rank of the segment
                if not last and rank == 0:
                    state = {"model": model.state_dict(), "opt": opt.state_dict()}
                    torch.save(state, checkpoint)
                    saved = state["opt"]["mbf"]["units"]  # the checkpoint's queue lengths
                    saved_queues.append([len(u.get("queued_weights", ())) for u in saved])
                if last:
                    units = opt.blocks()
                    result = {
                        "params": flat_params(model),
                        "counters": dict(opt.counters),
                        "fisher": [u.fisher.clone() for u in units],
                        "inverse": [u.inverse.clone() for u in units],
                        "saved_queues": saved_queues,
                    }
            except Exception:
                failed = traceback.format_exc()
        if dist.is_initialized():  # the next segment reads the checkpoint rank 0 wrote
            dist.barrier()
    return {"error": failed} if failed is not None else result


SCENARIOS: dict[str, Callable[..., dict]] = {
    "train": scenario_train,
    "storage": scenario_storage,
    "accumulate": scenario_accumulate,
    "failures": scenario_failures,
    "configs": scenario_configs,
}


def main(scenarios: list[tuple[str, dict]], rank: int, world: int, port: int, outdir: str) -> None:
    """One spawned rank of this module's scenarios (:func:`run_scenarios`)."""
    run_scenarios(SCENARIOS, scenarios, rank, world, port, outdir)


def run_scenarios(
    table: dict[str, Callable[..., dict]],
    scenarios: list[tuple[str, dict]],
    rank: int,
    world: int,
    port: int,
    outdir: str,
) -> None:
    """One spawned rank: join the group, run the scenarios of ``table`` in turn, save each one's
    result.

    Results go to ``outdir/rank{r}_{scenario}.pt`` as soon as a scenario ends (a scenario that
    kills its rank must come last), the traceback instead when it raises.
    """
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="MBF: per-example statistics serve")
    path = Path(outdir)
    name = "setup"
    try:
        timeout = datetime.timedelta(seconds=30)
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
        for name, kw in scenarios:
            result = table[name](rank, world, path, **kw)
            torch.save(result, path / f"rank{rank}_{name}.pt")
    except BaseException:
        torch.save({"error": traceback.format_exc()}, path / f"rank{rank}_{name}.pt")
    # Leave at once: after a failure scenario the group is broken and a clean shutdown may wait.
    os._exit(0)
