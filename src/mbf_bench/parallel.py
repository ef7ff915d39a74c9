"""Data-parallel benchmark runs on ``torch.distributed``: ``mbf-bench run --nproc K``.

``--nproc K`` re-runs the same command under ``torchrun`` with K local processes (any
``torchrun`` launch works too, multi-node included: every process sees ``WORLD_SIZE``). Each
process then runs the ordinary training loop (``train.py``) with a :class:`DataParallel`:

- the model wrapped in ``DistributedDataParallel`` (gloo on CPU, NCCL on ``cuda:LOCAL_RANK``),
  which averages gradients; MBF shards its curvature work over the ranks (``mbf.distributed``);
- every global minibatch cut into K contiguous near-equal shards, one per rank (the global
  batch size and data order are those of a single process; the gradient is exactly the global
  batch's when K divides the batch size, the mean of the shards' means otherwise);
- one small all-gather per step giving every rank the global mean loss and the same clock (the
  slowest rank's step time), so budgets, divergence checks and checkpoints agree on all ranks;
- rank 0 alone writing files and evaluating (on the unwrapped model); every rank consolidating
  MBF's sharded curvature before a checkpoint, which therefore resumes on any number of ranks.

Optimizers whose state is a function of the (averaged) gradients work unchanged; K-FAC's
activation statistics are not reduced across ranks here, so it is refused, as are full-graph
tasks (one step per epoch on one graph: nothing to shard).
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DataParallel", "check_supported", "from_env", "is_main_process", "launch"]

#: Optimizers whose state depends on more than the gradients and that do not reduce it.
UNSUPPORTED_OPTIMIZERS = ("kfac",)
#: Seconds a collective waits for the other ranks (rank 0 evaluates while the others wait).
TIMEOUT_SECONDS = float(os.environ.get("MBF_BENCH_DIST_TIMEOUT", "1800"))


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``mbf-bench <argv>`` in ``nproc`` local processes through torchrun; its exit status.

    Each process gets ``cpu_count // nproc`` OpenMP threads unless ``OMP_NUM_THREADS`` is set
    (oversubscribed threads make CPU training many times slower).
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be a positive integer, got {nproc}")
    # The processes know their number from torchrun; torchrun's own parser would also take
    # "--nproc" for an ambiguous abbreviation of its --nproc-per-node.
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--nproc":
            del argv[i : i + 2]
            break
        if arg.startswith("--nproc="):
            del argv[i]
            break
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "mbf_bench.cli",
        *argv,
    ]
    return subprocess.call(command, env=env)


def launched() -> bool:
    """Whether this process is one of several started by torchrun (or a similar launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0 of a launched job, or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def check_supported(optimizer: str, full_graph: bool) -> None:
    """``ValueError`` for a run that data parallelism cannot reproduce faithfully."""
    if optimizer in UNSUPPORTED_OPTIMIZERS:
        raise ValueError(
            f"--nproc: optimizer {optimizer} keeps per-process activation statistics that are "
            "not reduced across processes here; run it with --nproc 1"
        )
    if full_graph:
        raise ValueError(
            "--nproc: a full-graph task takes one step on the whole graph; there is no batch to "
            "shard across processes. Run it with --nproc 1"
        )


@dataclass
class DataParallel:
    """This process's place in a data-parallel run."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """``DistributedDataParallel(model)`` on this process's device."""
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def shard(self, batch: Any) -> tuple[Any, int]:
        """This rank's rows of a ``(inputs, targets)`` batch, and the global batch size."""
        inputs, targets = batch
        n = inputs.shape[0]
        rows = slice(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)
        return (inputs[rows], targets[rows]), n

    def step_summary(self, loss: float, examples: int, seconds: float) -> tuple[float, float]:
        """The global mean loss and the slowest rank's step time (one small all-gather)."""
        device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        local = torch.tensor([loss * examples, float(examples), seconds], dtype=torch.float64)
        rows = torch.empty(self.world_size, 3, dtype=torch.float64, device=device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(rows.view(-1), local.to(device))
        total, count, slowest = rows[:, 0].sum(), rows[:, 1].sum(), rows[:, 2].max()
        return float(total / count), float(slowest)

    def agree(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (decisions taken from per-rank clocks)."""
        device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def barrier(self) -> None:
        dist.barrier()


def from_env(device: torch.device) -> DataParallel | None:
    """Join the process group that torchrun set up (``WORLD_SIZE > 1``), else ``None``.

    With a CUDA ``device`` each process uses ``cuda:LOCAL_RANK`` and NCCL; otherwise gloo.
    """
    if not launched():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=TIMEOUT_SECONDS),
        )
    return DataParallel(dist.get_rank(), dist.get_world_size(), device)


def shutdown() -> None:
    """Leave the process group, if this process joined one.

    All ranks meet at a barrier first: rank 0 evaluates and writes files after the last step, and
    a rank that tore its gloo context down while another still used the group was seen to abort
    (SIGABRT, "terminate called without an active exception") in CI.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
