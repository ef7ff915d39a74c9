"""The cost model of MBF's step (``docs/cost.md``): bytes and flops per parameter, this machine's
floor, and where the measured step stands against it.

1. The machine: streaming bandwidth (``copy``, ``triad`` and a read-only ``sum`` over buffers
   larger than the curvature) and batched ``s x s`` product GFLOP/s in float32, bfloat16 and
   float16, at each thread count asked for (best of ``--repeats``, so a briefly quiet moment of a
   shared machine counts).
2. The model: ``mbf.MBF`` built on the task's real model (``mbf_bench.tasks``, the benchmark's
   hyperparameters for it); per phase the bytes each step moves and the flops it does, divided by
   the number of parameters, for full and packed storage and a 4- or 2-byte curvature dtype,
   amortized over ``stat_every``, ``stat_buffer`` and ``inv_every``.
3. The measured step (one thread): the same phases timed inside real steps (``time.process_time``
   by default: CPU time, which a loaded machine disturbs less than wall time), Adam's step and the
   forward and backward pass, against the floor ``bytes / triad bandwidth`` (or
   ``flops / product rate`` where that is larger).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/step_cost.py --task mnist-ae \
        --threads 1,2 > benchmarks/step_cost/mnist-ae.md
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

import mbf.direction
import mbf.optimizer
from mbf import MBF
from mbf.engine import LocalEngine
from mbf.store import CurvatureStore
from mbf_bench.speed import HUGE, _Runner, workload
from mbf_bench.tasks import TASKS

# ---------------------------------------------------------------------------------- the machine


def _best(fn: Callable[[], object], repeats: int, clock: Callable[[], float]) -> float:
    """Shortest time of ``fn`` on ``clock`` over ``repeats`` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


@dataclass
class Machine:
    threads: int
    read: float  # GB/s of a read-only pass (sum)
    copy: float  # GB/s counting read + write
    triad: float  # GB/s of a = b + 2 c, counting 2 reads + 1 write
    product: dict[str, float]  # GFLOP/s of one batched (B, s, s) @ (B, s, s) per dtype


def measure_machine(
    threads: int, megabytes: int, blocks: int, size: int, repeats: int, cpu_clock: bool
) -> Machine:
    """Bandwidth over buffers of ``megabytes`` and batched products of ``blocks`` blocks.

    With ``cpu_clock`` the process's CPU time divided by ``threads`` stands for wall time (all
    threads busy), the same clock as the step's phases."""
    torch.set_num_threads(threads)
    if cpu_clock:
        def clock() -> float:
            return time.process_time() / threads
    else:
        clock = time.perf_counter
    n = megabytes * 2**20 // 4
    a, b, c = torch.rand(n), torch.empty(n), torch.rand(n)
    gb = n * 4 / 1e9
    read = gb / _best(lambda: a.sum(), repeats, clock)
    copy = 2 * gb / _best(lambda: b.copy_(a), repeats, clock)
    triad = 3 * gb / _best(lambda: torch.add(a, c, alpha=2.0, out=b), repeats, clock)
    a = b = c = torch.empty(0)  # free the buffers before the products
    product = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16),
                        ("float16", torch.float16)):
        x = torch.rand(blocks, size, size).to(dtype)
        out = torch.empty_like(x)
        seconds = _best(lambda x=x, out=out: torch.bmm(x, x, out=out), max(2, repeats // 2),
                        clock)
        product[name] = 2 * blocks * size**3 / seconds / 1e9
    return Machine(threads, read, copy, triad, product)


# ------------------------------------------------------------------------------------ the model


@dataclass
class Shape:
    """What the model needs of an optimizer: parameters, padded block entries and block size."""

    params: int  # N
    entries: int  # P = sum over blocks of s (padding included)
    size: int  # s of the largest bucket (the model uses one s; mnist-ae's buckets are 32 and 31)
    stat_every: int
    stat_buffer: int
    inv_every: int


def shape_of(opt: MBF, stat_every: int, inv_every: int) -> Shape:
    params = sum(p.numel() for g in opt.param_groups for p in g["params"])
    buckets = opt._store.buckets
    entries = sum(b.total * b.block_size for b in buckets)
    size = max(buckets, key=lambda b: b.total * b.block_size).block_size
    return Shape(params, entries, size, stat_every, opt.stat_buffer, inv_every)


@dataclass
class Phase:
    name: str
    bytes: float  # per step, amortized
    flops: float  # per step, amortized


def model_phases(shape: Shape, storage: str, item: int) -> list[Phase]:
    """Bytes and flops per step of every phase; ``item``: bytes of one curvature entry.

    Vectors (gradients, momentum, Adam's second moment, parameters, right-hand sides) are float32.
    Each phase is counted at its least traffic: every tensor it must read read once, every
    tensor it must write written once (the floor, not today's code).
    """
    n, p, s = shape.params, shape.entries, shape.size
    k = shape.stat_buffer if storage == "full" else 1
    block = s if storage == "full" else (s + 1) / 2  # stored entries per parameter-entry
    stat_rate = 1 / shape.stat_every
    phases = []
    # Statistics: the estimate g_b into the queue (read the gradient, write P entries), and
    # every k updates the fold: read and write the statistics, read the queue; 2 s^2 k per block.
    queue = (4 * n + item * p) if k > 1 else 0
    fold = (2 * block * item * p + k * item * p) / k
    phases.append(Phase("statistics (queue + fold)", stat_rate * (queue + fold),
                        stat_rate * 2 * p * s))
    # Factorization: read the statistics, write the inverses (a Cholesky and inverse: about
    # s^3 flops per block, i.e. s^2 per entry), once per inv_every steps.
    phases.append(Phase("factorization", 2 * block * item * p / shape.inv_every,
                        p * s**2 / shape.inv_every))
    # The vector: read the gradient, read and write momentum and Adam's second moment, write
    # the right-hand side (blocks); graft lengths are a reduction on the way.
    phases.append(Phase("vector (momentum, Adam graft)", 4 * (5 * n + p), 6 * n))
    # The solve: read every inverse and the right-hand side, write the solved blocks.
    phases.append(Phase("solve", block * item * p + 4 * 2 * p, 2 * p * s))
    # Rescale to the graft lengths and update: read the solved blocks, read and write theta.
    phases.append(Phase("graft rescale + update", 4 * (p + 2 * n), 3 * n))
    return phases


# ------------------------------------------------------------------------------- the real step

PHASES: dict[str, list[tuple[object, str]]] = {
    "statistics (queue + fold)": [(LocalEngine, "update_statistics")],
    "factorization": [(CurvatureStore, "factor")],
    "vector (momentum, Adam graft)": [(mbf.optimizer, "form_vector"),
                                      (mbf.optimizer, "advance_moments")],
    "solve": [(CurvatureStore, "solve")],
    "graft rescale": [(mbf.optimizer, "finish")],
    "update": [(MBF, "_apply")],
}


class Timers:
    """Wraps the step's phase functions to add up their time (``clock``) per name (functions
    that the code being measured does not have are left out: older versions, for comparison)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.calls: dict[str, int] = dict.fromkeys(PHASES, 0)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        present = [(name, owner, attr) for name, places in PHASES.items()
                   for owner, attr in places if hasattr(owner, attr)]
        saved = [(owner, attr, getattr(owner, attr)) for _, owner, attr in present]
        for name, owner, attr in present:
            setattr(owner, attr, self._wrap(name, getattr(owner, attr)))
        try:
            yield
        finally:
            for owner, attr, fn in saved:
                setattr(owner, attr, fn)

    def _wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args: object, **kwargs: object) -> object:
            start = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += self.clock() - start
                self.calls[name] += 1

        return timed


def measure_step(task: str, steps: int, factorizations: int, clock: Callable[[], float]
                 ) -> tuple[MBF, dict[str, float], dict[str, float]]:
    """Seconds per step of each phase at the benchmark's frequencies for the task, and of
    Adam's step and the forward and backward pass, all on ``clock``."""
    cpu = torch.device("cpu")
    work = workload(task, cpu)
    torch.manual_seed(0)
    state = work.make_model().state_dict()
    adam, mbf_run = _Runner("adam", work, state, cpu), _Runner("mbf", work, state, cpu)
    opt = mbf_run.optimizer
    assert isinstance(opt, MBF)
    batch = work.batch
    for group in opt.param_groups:  # statistics every step, no factorization: timed apart
        group["stat_every"], group["inv_every"] = 1, HUGE

    def backward(runner: _Runner) -> float:
        start = clock()
        runner.optimizer.zero_grad()
        work.loss(runner.model, batch).backward()
        return clock() - start

    def step(runner: _Runner) -> float:
        start = clock()
        runner.optimizer.step()
        return clock() - start

    for _ in range(2 * opt.stat_buffer):  # warm-up: first statistics, first factorization
        backward(mbf_run)
        step(mbf_run)
        backward(adam)
        step(adam)
    timers = Timers(clock)
    totals: dict[str, list[float]] = {"mbf": [], "adam": [], "fb": []}
    with timers.installed():
        for _ in range(steps):  # a multiple of stat_buffer: whole fold cycles
            totals["fb"].append(backward(mbf_run))
            totals["mbf"].append(step(mbf_run))
            totals["fb"].append(backward(adam))
            totals["adam"].append(step(adam))
        factor_seconds = []
        for _ in range(factorizations):
            start = clock()
            for bucket in opt._store.buckets:
                opt._store.factor(bucket, opt.param_groups[bucket.group])
            factor_seconds.append(clock() - start)
    per_step = {name: timers.seconds[name] / steps for name in PHASES}
    stat_every = mbf_run.freq.get("stat_every", 1)
    inv_every = mbf_run.freq.get("inv_every", 1)
    per_step["statistics (queue + fold)"] /= stat_every
    per_step["factorization"] = statistics.median(factor_seconds) / inv_every
    mean_step = statistics.mean(totals["mbf"])
    timed_in_step = sum(timers.seconds[n] for n in PHASES if n != "factorization") / steps
    per_step["other (finite checks, diagnostics, blocks)"] = mean_step - timed_in_step
    reference = {
        "forward+backward": statistics.median(totals["fb"]),
        "adam step": statistics.median(totals["adam"]),
        "stat_every": float(stat_every),
        "inv_every": float(inv_every),
    }
    return opt, per_step, reference


# -------------------------------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist-ae", choices=sorted(TASKS))
    parser.add_argument("--threads", default="1,2", help="thread counts for the machine table")
    parser.add_argument("--megabytes", type=int, default=1024, help="streaming buffer size")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=16, help="timed steps (x stat_buffer)")
    parser.add_argument("--factorizations", type=int, default=3)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    torch.set_num_threads(1)
    opt, measured, ref = measure_step(args.task, args.steps, args.factorizations, clock)
    shape = shape_of(opt, int(ref["stat_every"]), int(ref["inv_every"]))
    machines = [
        measure_machine(int(t), args.megabytes, shape.entries // shape.size, shape.size,
                        args.repeats, args.clock == "cpu")
        for t in args.threads.split(",")
    ]
    one = machines[0]
    torch.set_num_threads(1)

    print(f"## {args.task}: N = {shape.params:,} parameters, P = {shape.entries:,} block "
          f"entries (padding included), s = {shape.size}, statistics every {shape.stat_every}, "
          f"stat_buffer {shape.stat_buffer}, factorization every {shape.inv_every}\n")
    print(f"### The machine (best of repeats, {args.clock} clock)\n")
    print("| threads | read GB/s | copy GB/s | triad GB/s | batched product GFLOP/s "
          "(float32 / bfloat16 / float16) |")
    print("|---|---|---|---|---|")
    for m in machines:
        prods = " / ".join(f"{m.product[d]:.1f}" for d in ("float32", "bfloat16", "float16"))
        print(f"| {m.threads} | {m.read:.1f} | {m.copy:.1f} | {m.triad:.1f} | {prods} |")

    print("\n### The model: bytes and flops per parameter per step (amortized)\n")
    configs = [("full", 4, "float32"), ("full", 2, "bf16/fp16"), ("packed", 4, "float32"),
               ("packed", 2, "bf16/fp16")]
    names = [ph.name for ph in model_phases(shape, "full", 4)]
    print("| phase | " + " | ".join(f"{s} {d} B/param" for s, _, d in configs)
          + " | flops/param |")
    print("|---|" + "---|" * (len(configs) + 1))
    models = {(s, i): model_phases(shape, s, i) for s, i, _ in configs}
    n = shape.params
    for index, name in enumerate(names):
        row = [f"{models[(s, i)][index].bytes / n:.1f}" for s, i, _ in configs]
        print(f"| {name} | " + " | ".join(row)
              + f" | {models[('full', 4)][index].flops / n:.1f} |")
    totals = [sum(ph.bytes for ph in models[(s, i)]) / n for s, i, _ in configs]
    print("| **total** | " + " | ".join(f"**{t:.1f}**" for t in totals)
          + f" | {sum(ph.flops for ph in models[('full', 4)]) / n:.1f} |")
    print(f"| Adam (read g, read+write m, v, theta) | {28:.1f} | | | | 10 |")

    print(f"\n### Measured (one thread, {args.clock} clock) against the floor "
          f"(bytes / {one.triad:.1f} GB/s triad, or flops / "
          f"{one.product['float32']:.1f} GFLOP/s where larger)\n")
    print("| phase | measured ms/step | floor ms/step (full float32) | measured / floor | "
          "floor bf16 ms |")
    print("|---|---|---|---|---|")
    floors = {}
    for index, name in enumerate(names):
        f32, f16 = models[("full", 4)][index], models[("full", 2)][index]

        def floor(ph: Phase, dtype: str) -> float:
            return max(ph.bytes / (one.triad * 1e9), ph.flops / (one.product[dtype] * 1e9))

        floors[name] = (floor(f32, "float32"), floor(f16, "bfloat16"))
    rows = [
        ("statistics (queue + fold)", ["statistics (queue + fold)"]),
        ("factorization", ["factorization"]),
        ("vector (momentum, Adam graft)", ["vector (momentum, Adam graft)"]),
        ("solve", ["solve"]),
        ("graft rescale + update", ["graft rescale + update"]),
    ]
    measured_of = {
        "graft rescale + update": measured["graft rescale"] + measured["update"],
    }
    total_measured = sum(measured.values())
    for label, keys in rows:
        value = measured_of.get(label, measured.get(label, 0.0))
        f32 = sum(floors[k][0] for k in keys)
        f16 = sum(floors[k][1] for k in keys)
        print(f"| {label} | {1e3 * value:.1f} | {1e3 * f32:.1f} | {value / f32:.1f} | "
              f"{1e3 * f16:.1f} |")
    other = measured["other (finite checks, diagnostics, blocks)"]
    print(f"| other (finite checks, diagnostics, blocks) | {1e3 * other:.1f} | 0 | - | 0 |")
    floor32 = sum(f[0] for f in floors.values())
    floor16 = sum(f[1] for f in floors.values())
    print(f"| **MBF's step** | **{1e3 * total_measured:.1f}** | **{1e3 * floor32:.1f}** | "
          f"**{total_measured / floor32:.1f}** | **{1e3 * floor16:.1f}** |")
    fb, adam = ref["forward+backward"], ref["adam step"]
    adam_floor = 28 * n / (one.triad * 1e9)
    print(f"| Adam's step | {1e3 * adam:.1f} | {1e3 * adam_floor:.1f} | "
          f"{adam / adam_floor:.1f} | |")
    print(f"| forward+backward | {1e3 * fb:.1f} | | | |")
    whole = (fb + total_measured) / (fb + adam)
    at_floor = (fb + floor32) / (fb + adam)
    at_floor16 = (fb + floor16) / (fb + adam)
    print(f"\nMBF's training step x Adam's: measured **{whole:.2f}**; with every MBF phase at "
          f"the float32 floor {at_floor:.2f}, at the 16-bit floor {at_floor16:.2f} "
          "(forward+backward and Adam's step as measured).")


if __name__ == "__main__":
    main()
