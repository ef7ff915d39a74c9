"""Per-rank curvature memory of MBF on 1, 2 and 4 gloo ranks (issues 10 and 18).

Every rank builds ``MBF`` on the paper's mnist-ae autoencoder and CIFAR ResNet-32 (random
weights: the allocation does not depend on data) and reports ``memory_report(detail=True)``;
curvature bytes are statistics + inverses + queued statistics (momentum is kept in full on every
rank, as are parameters and gradients). The target: each rank's curvature bytes are at most
``1/K`` of one process's plus 5 %. Each rank also writes its per-rank checkpoint file
(``sharded_state_dict``) and reports its size: the checkpoint of one rank, against one process's.

    python benchmarks/memory_ranks.py --json benchmarks/memory_ranks.json

prints a table and writes the records. Runs on CPU in about a minute (allocation only).
``--fsdp`` wraps the models with FSDP2 (``fully_shard`` on every module holding parameters,
then the root) instead of replicating them: momentum and parameters are then cut too.
``--tie-rows`` measures MBF's default, tied rows (one block per column chunk shared by a layer's
rows); without it every row has its own blocks (``tie_rows=False``, the tables of
``docs/distributed.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mbf import MBF
from mbf_bench.models import MNIST_AE_SIZES, autoencoder, resnet_cifar

MODELS = {
    "mnist-ae": lambda: autoencoder(MNIST_AE_SIZES),
    "cifar10-resnet32": lambda: resnet_cifar(32, 10),
}
CURVATURE = ("statistics", "inverse", "queue")


def _fully_shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules())[1:]:
        if any(True for _ in module.parameters(recurse=False)):
            fully_shard(module)
    return fully_shard(model)


def _local_bytes(p: torch.Tensor) -> int:
    local = p.to_local() if hasattr(p, "to_local") else p
    return local.numel() * local.element_size()


def measure(scratch: Path, fsdp: bool = False, tie_rows: bool = False) -> dict[str, Any]:
    """``{model: {storage: (curvature bytes, momentum bytes, per-rank file bytes, parameter
    bytes)}}`` on this rank (the file is written into ``scratch`` and removed)."""
    out: dict[str, Any] = {}
    for name, build in MODELS.items():
        torch.manual_seed(0)
        model = build()
        if fsdp and dist.is_initialized():
            model = _fully_shard(model)
        params = sum(_local_bytes(p) for p in model.parameters())
        for p in model.parameters():  # a momentum to save, as after a first step
            p.grad = torch.zeros_like(p)
        out[name] = {}
        for storage in ("full", "packed"):
            opt = MBF(model, storage=storage, max_state_bytes=None, stat_every=10**9,
                      tie_rows=tie_rows)
            opt.step()
            parts = opt.memory_report(detail=True).values()
            curvature = sum(p[k] for p in parts for k in CURVATURE)
            file = scratch / f"{name}-{storage}-{os.getpid()}.pt"
            torch.save(opt.sharded_state_dict(), file)
            out[name][storage] = (curvature, sum(p["momentum"] for p in parts),
                                  file.stat().st_size, params)
            file.unlink()
            del opt
    return out


def _rank(rank: int, world: int, init: str, results: str, fsdp: bool, tie_rows: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.save(measure(Path(results), fsdp, tie_rows), Path(results) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def run(world: int, fsdp: bool = False, tie_rows: bool = False) -> list[dict[str, Any]]:
    """Every rank's :func:`measure` with ``world`` ranks (one process: no process group)."""
    with tempfile.TemporaryDirectory() as tmp:
        if world == 1:
            return [measure(Path(tmp), tie_rows=tie_rows)]
        init = f"file://{os.path.join(tmp, 'store')}"
        mp.spawn(_rank, args=(world, init, tmp, fsdp, tie_rows), nprocs=world, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--fsdp", action="store_true", help="shard the models with FSDP2")
    parser.add_argument("--tie-rows", action="store_true", help="MBF's default tied rows")
    args = parser.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    per_world = {w: run(w, args.fsdp, args.tie_rows) for w in worlds}
    single = per_world[1][0] if 1 in per_world else run(1, tie_rows=args.tie_rows)[0]
    records = []
    print("| model | storage | ranks | largest rank's curvature (MB) | one process's / K (MB) "
          "| ratio to 1/K | momentum per rank (MB) | largest rank's file (MB) | one process's "
          "file / K (MB) | parameters per rank (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in MODELS:
        for storage in ("full", "packed"):
            alone = single[name][storage][0]
            for world, ranks in per_world.items():
                largest = max(r[name][storage][0] for r in ranks)
                momentum = max(r[name][storage][1] for r in ranks)
                params = max(r[name][storage][3] for r in ranks)
                ratio = largest / (alone / world)
                file = max(r[name][storage][2] for r in ranks)
                alone_file = single[name][storage][2]
                records.append({"model": name, "storage": storage, "ranks": world,
                                "largest_rank_bytes": largest, "single_process_bytes": alone,
                                "ratio_to_1_over_k": ratio, "momentum_bytes": momentum,
                                "total_over_ranks": sum(r[name][storage][0] for r in ranks),
                                "largest_rank_file_bytes": file, "fsdp": args.fsdp,
                                "tie_rows": args.tie_rows,
                                "largest_rank_parameter_bytes": params,
                                "single_process_file_bytes": alone_file})
                print(f"| {name} | {storage} | {world} | {largest / 1e6:.2f} | "
                      f"{alone / world / 1e6:.2f} | {ratio:.4f} | {momentum / 1e6:.2f} | "
                      f"{file / 1e6:.2f} | {alone_file / world / 1e6:.2f} | "
                      f"{params / 1e6:.2f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
