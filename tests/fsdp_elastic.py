"""A training script for ``torchrun --max-restarts``: FSDP2 + MBF that checkpoints every
``EVERY`` steps and resumes from the last complete checkpoint (``tests/test_fsdp.py``).

    torchrun --standalone --nproc-per-node 2 --max-restarts 3 tests/fsdp_elastic.py OUT [KILL]

``KILL`` = ``"step:phase"``: on the first attempt, rank 1 SIGKILLs itself at that step, in that
phase (``forward``, ``step``: inside ``MBF.step``'s statistics, or ``save``: after writing its
own file of that step's checkpoint, before the checkpoint is complete). A checkpoint is
complete once its ``COMPLETE`` marker exists: written by rank 0, atomically, after every rank
has written its files (a barrier); a directory without it is never resumed. With ``--from S``
the run starts from checkpoint ``S`` and is never killed (the uninterrupted reference).
At the end rank 0 writes the whole parameters and the step resumed from to ``OUT/final.pt``.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import fsdp_workers as F
from mbf import MBF

STEPS = 8
EVERY = 2


def complete(out: Path) -> list[int]:
    """Steps of the complete checkpoints in ``out``."""
    done = [d for d in out.glob("ckpt-*") if (d / "COMPLETE").exists()]
    return sorted(int(d.name.split("-")[1]) for d in done)


def save(out: Path, step: int, model: nn.Module, opt: MBF, rank: int, kill: str) -> None:
    folder = out / f"ckpt-{step}"
    folder.mkdir(exist_ok=True)
    params = F.full_params(model)  # every rank (an all-gather)
    torch.save(opt.sharded_state_dict(), folder / f"opt.{rank}.pt")
    if rank == 0:
        torch.save(params, folder / "params.pt")
    if kill == f"{step}:save":
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    if rank == 0:
        tmp = folder / "COMPLETE.tmp"
        tmp.write_text("ok")
        os.replace(tmp, folder / "COMPLETE")
    dist.barrier()


def _init_group(timeout: datetime.timedelta) -> None:
    """The gloo group, on keys of this attempt only.

    torchrun's agent store outlives a restart, so a restarted rank could read the address its
    peer published in the attempt before, connect to a dead socket and wait for ever (seen: both
    ranks of a restarted job stuck in gloo's connectFullMesh). A prefix per restart keeps every
    attempt's rendezvous to itself.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt-{attempt}", store),
                            rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)


def main() -> None:
    out = Path(sys.argv[1])
    args = sys.argv[2:]
    start_from = int(args[1]) if args[:1] == ["--from"] else None
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    kill = args[0] if args and start_from is None and first_attempt else ""
    torch.set_num_threads(1)
    _init_group(datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    model = F.make_model("mlp")
    saved = complete(out) if start_from is None else [start_from]
    first = saved[-1] if saved else 0
    if rank == 0 and start_from is None:  # every attempt's starting point, for the test
        with open(out / "resumes.txt", "a") as log:
            log.write(f"{first}\n")
    files = out / f"ckpt-{first}"
    if first:
        F.load_params(model, torch.load(files / "params.pt"))
    F.shard(model)
    opt = MBF(model, estimator="per_example", **F.HYPER)
    if first:
        opt.load_sharded_state_dict(
            [torch.load(files / f"opt.{r}.pt", mmap=True) for r in range(world)]
        )
    if start_from is not None:
        out = out / "reference"
        out.mkdir(exist_ok=True)
    per = F.GLOBAL_BATCH // world
    for step in range(first, STEPS):
        x, y = F.global_batch(step, "mlp")
        part = slice(rank * per, (rank + 1) * per)
        opt.zero_grad()
        if rank == 1 and kill == f"{step}:forward":
            os.kill(os.getpid(), signal.SIGKILL)
        nn.functional.mse_loss(model(x[part]), y[part]).backward()
        if rank == 1 and kill == f"{step}:step":

            def dying(*a: object) -> torch.Tensor:  # with the statistics, after their reduce
                os.kill(os.getpid(), signal.SIGKILL)
                raise AssertionError("unreachable")

            opt._estimate = dying  # type: ignore[method-assign]
        opt.step()
        if (step + 1) % EVERY == 0 and start_from is None:
            save(out, step + 1, model, opt, rank, kill if rank == 1 else "")
    params = F.full_params(model)
    if rank == 0:
        torch.save({"params": params, "resumed_from": first}, out / "final.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
