"""Spawning K gloo ranks on loopback for the tests (``test_distributed``, ``test_equivalence``).

The rank programs are the scenarios of ``distributed_workers.py``. Each launch is bounded by a
join timeout, so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import distributed_workers as W

LAUNCH_TIMEOUT = 120.0


def run_ranks(
    scenarios: list[tuple[str, dict]],
    world: int,
    outdir: Path,
    dies: tuple[tuple[int, str], ...] = (),
    timeout: float = LAUNCH_TIMEOUT,
    main: Callable[..., None] = W.main,
) -> list[dict[str, dict]]:
    """Spawn ``world`` ranks running ``scenarios``; ``results[rank][scenario]``.

    ``dies`` lists ``(rank, scenario)`` pairs that must end their process (no result);
    ``timeout`` bounds the whole launch in seconds; ``main`` is the rank program
    (``distributed_workers.main`` unless another workers module is meant).
    """
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # 2 cores: oversubscription is 100x
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    # Port 0: the system picks a free port, so parallel test runs cannot collide.
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=main, args=(scenarios, r, world, store.port, str(outdir)), daemon=True)
        for r in range(world)
    ]
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)  # the children inherit the environment at start
        for p in procs:
            p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    del store
    if hung:
        pytest.fail(f"ranks {hung} did not finish in {timeout} s")
    results: list[dict[str, dict]] = []
    for r, p in enumerate(procs):
        results.append({})
        for name, _ in scenarios:
            path = outdir / f"rank{r}_{name}.pt"
            if (r, name) in dies:
                assert not path.exists(), f"rank {r} should have died in {name}"
                continue
            if not path.exists():
                pytest.fail(f"rank {r} left no result for {name} (exit code {p.exitcode})")
            result = torch.load(path, weights_only=False)
            if "error" in result:
                pytest.fail(f"rank {r} failed in {name}:\n{result['error']}")
            results[r][name] = result
    return results
