"""K data-parallel ranks as K threads of one process, for property tests of the sharding.

``ThreadedEngine`` is :class:`mbf.distributed.ShardedEngine` with its one collective (on gloo
MBF carries every exchange as an all-reduce of disjoint parts) done through memory shared by the
threads, so the engine's own plan, ownership, packing and assembly run as they do on K processes,
without spawning any. Gradients are averaged over the threads as DDP would (rank order, so every
rank gets the same bits). Spawned gloo ranks stay the reference for the real collectives
(``tests/test_distributed.py``, ``tests/test_equivalence.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import mbf.distributed as D
from mbf import MBF

TIMEOUT = 60.0  # a rank that fails leaves the others at a barrier: they give up after this


class World:
    """What K threads share: a barrier and one slot per rank."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=TIMEOUT)
        self.slots: list[Any] = [None] * size

    def all_reduce(self, rank: int, tensor: Tensor) -> None:
        """Sum ``tensor`` over the ranks in place, in rank order (identical bits on every rank)."""
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        total = self.slots[0].clone()
        for other in self.slots[1:]:
            total += other
        self.barrier.wait()
        tensor.copy_(total)

    def gather(self, rank: int, value: Any) -> list[Any]:
        self.slots[rank] = value
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()
        return values


class ThreadedEngine(D.ShardedEngine):
    """The sharded engine on a :class:`World` instead of a process group."""

    def __init__(self, world: World, rank: int) -> None:
        self._start(None, rank, world.size, sum_only=True)  # no process group to ask
        self.world = world

    def _run(self, kind: str, what: str, collective: Callable[..., Any], *args: Tensor) -> None:
        assert collective is dist.all_reduce, collective  # the sum-only path never asks more
        entry = self.traffic.setdefault(f"{kind} (all_reduce)", {"calls": 0, "bytes": 0})
        entry["calls"] += 1
        self.world.all_reduce(self.rank, args[-1])

    def check_config(self, fingerprint: dict[str, Any]) -> None:
        prints = self.world.gather(self.rank, fingerprint)
        if any(p != prints[0] for p in prints):
            raise ValueError("MBF: the ranks were given different configurations")


def threaded(opt: MBF, world: World, rank: int) -> MBF:
    """Turn a freshly built one-process ``opt`` into rank ``rank`` of ``world``."""
    opt._engine = ThreadedEngine(world, rank)
    opt._rebuild()
    opt._engine.check_config(opt._fingerprint())
    return opt


def run_threads(world: World, body: Callable[[int], Any]) -> list[Any]:
    """``body(rank)`` on every rank, each in its own thread; the results in rank order (the
    first rank's exception is raised again)."""
    results: list[Any] = [None] * world.size
    errors: list[BaseException | None] = [None] * world.size

    def target(rank: int) -> None:
        try:
            results[rank] = body(rank)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors[rank] = exc
            world.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world.size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 2)
    first = next((e for e in errors if e is not None and not isinstance(
        e, threading.BrokenBarrierError)), None) or next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results


def patch_comm_device(monkeypatch: Any) -> None:
    """Collectives' device without a process group: the tensors' own."""
    monkeypatch.setattr(D, "_comm_device", lambda group, device: device)


def data_parallel_steps(world: World, rank: int, net: nn.Module, opt: MBF,
                        batches: list[Tensor], loss: Callable[[Tensor], Tensor]) -> Tensor:
    """Rank ``rank`` of ``world`` trains ``net`` as DDP would: each batch cut into one
    contiguous share per rank, the gradients averaged over the ranks before ``opt.step()``.
    Returns the parameters afterwards, flattened (a test compares them with one process's)."""
    threaded(opt, world, rank)
    for x in batches:
        share = x.shape[0] // world.size
        opt.zero_grad()
        loss(net(x[share * rank : share * (rank + 1)])).backward()
        for p in net.parameters():
            world.all_reduce(rank, p.grad)
            p.grad /= world.size
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])

