"""Data-parallel MBF: communication per step, and inversion / solve / step time, 1 vs K ranks.

K gloo ranks on loopback (one CPU thread each) train the model under DDP for a few steps with
each estimator; the bytes each rank hands to MBF's collectives are read from
``optimizer.distributed.traffic``. Then every rank times its own share (``mbf.distributed``'s
plan) of a full inversion (damped Cholesky + inverse) and of one solve of every bucket, between
barriers, so the time reported is the slowest rank's; one process (one thread) doing all of it
is the baseline. Per-rank CPU seconds are reported too: on a shared machine they show the split
of the work even when the wall clock cannot.

Run: ``PYTHONPATH=src python benchmarks/distributed_bench.py [--model mnist-ae] [--world 2]``.
Prints markdown tables (``docs/results.md`` keeps the numbers).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from mbf import MBF
from mbf.linalg import damped_inverse, solve_blocks
from mbf_bench.models import MNIST_AE_SIZES, autoencoder, resnet_cifar

ESTIMATORS = ("batch", "per_example")


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """The model and the shape of one input example."""
    torch.manual_seed(0)
    if name == "mnist-ae":
        return autoencoder(MNIST_AE_SIZES), (784,)
    if name == "resnet32":
        return resnet_cifar(32), (3, 32, 32)
    raise SystemExit(f"distributed_bench: unknown --model {name!r} (mnist-ae, resnet32)")


def loss_of(name: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if name == "mnist-ae":
        return nn.functional.binary_cross_entropy_with_logits(out, x)
    return nn.functional.cross_entropy(out, torch.zeros(x.shape[0], dtype=torch.long))


def measure(args: argparse.Namespace, rank: int, world: int) -> dict[str, Any]:
    """Traffic per step (if ``world > 1``) and timings of this rank's share of the work."""
    result: dict[str, Any] = {"traffic": {}, "step_s": {}}
    gen = torch.Generator().manual_seed(rank)
    opt: MBF | None = None
    for estimator in ESTIMATORS:
        model, shape = build(args.model)
        wrapped: nn.Module = DDP(model) if world > 1 else model
        opt = MBF(wrapped, lr=1e-3, estimator=estimator, max_block_size=args.max_block_size)
        if args.native and opt.distributed is not None:
            opt.distributed._sum_only = False  # all_gather / reduce_scatter, as on NCCL
        walls, cpus = [], []
        for step in range(args.steps):
            x = torch.rand(args.batch // world, *shape, generator=gen)
            opt.zero_grad()
            loss_of(args.model, wrapped, x).backward()
            if world > 1:
                dist.barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            opt.step()
            if step > 0:  # the first step inverts everything: timed separately below
                walls.append(time.perf_counter() - start)
                cpus.append(time.process_time() - cpu_start)
        result["step_s"][estimator] = (statistics.median(walls), statistics.median(cpus))
        if opt.distributed is not None:
            traffic = opt.distributed.traffic
            result["traffic"][estimator] = {
                k: v for k, v in traffic.items() if not k.startswith("config")
            }
    assert opt is not None
    buckets = opt._store.buckets  # this rank's blocks of every bucket (mbf.store)
    damping = float(opt.param_groups[0]["damping"])
    rhs = [torch.randn(b.hi - b.lo, b.block_size) for b in buckets]

    def timed(work: str) -> tuple[float, float]:
        """Median wall seconds (slowest rank) and this rank's median CPU seconds."""
        samples, cpu = [], []
        for _ in range(args.repeats):
            if world > 1:
                dist.barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            for b, r in zip(buckets, rhs, strict=True):
                if b.hi == b.lo:
                    continue
                if work == "factor":
                    damped_inverse(b.fisher, damping)
                else:
                    solve_blocks(b.inverse, r)
            cpu.append(time.process_time() - cpu_start)
            if world > 1:
                dist.barrier()  # the slowest rank sets the time
            samples.append(time.perf_counter() - start)
        return statistics.median(samples), statistics.median(cpu)

    result["factor_s"] = timed("factor")
    result["solve_s"] = timed("solve")
    result["blocks"] = {str(b.block_size): b.total for b in buckets}
    result["numel"] = sum(p.numel() for p in model.parameters())
    result["padded"] = sum(b.total * b.block_size for b in buckets)
    result["stat_elems"] = sum(
        u.layout.num_blocks * u.layout.block_size * (u.layout.block_size + 1) // 2
        for u in opt._units
        if u.per_example
    )
    return result


def collectives(args: argparse.Namespace, rank: int, world: int) -> dict[str, Any]:
    """Median seconds of gloo's all_reduce, all_gather and reduce_scatter, same output size."""
    n = args.collectives * 2**20 // 4 // world * world  # float32 entries of the output
    full, part = torch.ones(n), torch.ones(n // world)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    ops = {
        "all_reduce": lambda: dist.all_reduce(full),
        "all_gather": lambda: gather(full, part),
        "reduce_scatter": lambda: scatter(part, full),
    }
    result = {}
    for name, op in ops.items():
        samples = []
        for _ in range(args.repeats):
            dist.barrier()
            start = time.perf_counter()
            op()
            samples.append(time.perf_counter() - start)
        result[name] = statistics.median(samples)
    return result


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="MBF: per-example statistics serve")
    timeout = datetime.timedelta(seconds=300)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    result = collectives(args, rank, world) if args.collectives else measure(args, rank, world)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def run_world(args: argparse.Namespace) -> list[dict[str, Any]]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = dist.TCPStore("127.0.0.1", 0, args.world, is_master=True, wait_for_workers=False)
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as out:
        procs = [
            ctx.Process(target=rank_main, args=(r, args.world, store.port, args, out))
            for r in range(args.world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(1800)
        if any(p.exitcode != 0 for p in procs):
            raise SystemExit(f"distributed_bench: a rank failed: {[p.exitcode for p in procs]}")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(args.world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist-ae", help="mnist-ae or resnet32")
    parser.add_argument("--world", type=int, default=2, help="ranks to compare with 1 process")
    parser.add_argument("--batch", type=int, default=64, help="global batch (traffic ignores it)")
    parser.add_argument("--steps", type=int, default=6, help="training steps per estimator")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median)")
    parser.add_argument("--max-block-size", type=int, default=32)
    parser.add_argument(
        "--native",
        action="store_true",
        help="use all_gather / reduce_scatter (MBF's choice on NCCL) instead of gloo's all-reduces",
    )
    parser.add_argument(
        "--collectives",
        type=int,
        metavar="MIB",
        help="instead: time gloo's all_reduce / all_gather / reduce_scatter of MIB MiB outputs",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="MBF: per-example statistics serve")
    if args.collectives:
        times = run_world(args)[0]
        print(f"| gloo, {args.world} ranks, {args.collectives} MiB output | seconds (median) |")
        print("|---|---|")
        for name, seconds in times.items():
            print(f"| {name} | {seconds:.3f} |")
        return
    one = measure(args, 0, 1)
    ranks = run_world(args)
    many = ranks[0]
    k, mb = args.world, 2.0**20
    print(f"model {args.model}: {one['numel']:,} parameters, blocks by size {one['blocks']}")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    # Ring algorithms, per rank: an all-reduce of n bytes sends 2 (k-1)/k n, a reduce-scatter
    # of n bytes (k chunks) sends (k-1)/k n, an all-gather of p bytes per rank sends (k-1) p.
    print("| per rank per step (float32) | payload | sent by each rank (ring) |")
    print("|---|---|---|")
    grad = one["numel"] * 4
    print(
        f"| DDP gradient all-reduce (reference) | {grad / mb:.2f} MiB "
        f"| {2 * (k - 1) / k * grad / mb:.2f} MiB |"
    )
    for estimator in ESTIMATORS:
        for kind, entry in sorted(many["traffic"][estimator].items()):
            per = entry["bytes"] / args.steps
            if "all_gather" in kind:
                sent = (k - 1) * per
            elif "reduce_scatter" in kind:
                sent = (k - 1) / k * per
            else:  # all_reduce
                sent = 2 * (k - 1) / k * per
            print(
                f"| MBF {estimator}: {kind} ({entry['calls']} calls in {args.steps} steps) "
                f"| {per / mb:.3f} MiB | {sent / mb:.3f} MiB |"
            )
    print()
    print(f"| seconds (median of {args.repeats}) | 1 process | {k} ranks | ratio |")
    print("|---|---|---|---|")
    for key, label in (("factor_s", "inversion"), ("solve_s", "solves")):
        a, b = one[key][0], many[key][0]
        print(f"| {label} of all blocks, wall (slowest rank) | {a:.3f} | {b:.3f} | {a / b:.2f}x |")
        a, b = one[key][1], max(r[key][1] for r in ranks)
        cpus = ", ".join(f"{r[key][1]:.3f}" for r in ranks)
        print(f"| {label}, CPU of the busiest rank ({cpus}) | {a:.3f} | {b:.3f} | {a / b:.2f}x |")
    for estimator in ESTIMATORS:
        a, b = one["step_s"][estimator][0], many["step_s"][estimator][0]
        print(f"| optimizer.step(), {estimator}, wall | {a:.3f} | {b:.3f} | {a / b:.2f}x |")
        a, b = one["step_s"][estimator][1], max(r["step_s"][estimator][1] for r in ranks)
        print(
            f"| optimizer.step(), {estimator}, CPU of the busiest rank | {a:.3f} | {b:.3f} "
            f"| {a / b:.2f}x |"
        )


if __name__ == "__main__":
    main()
