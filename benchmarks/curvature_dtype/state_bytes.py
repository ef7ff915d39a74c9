"""Bytes of MBF's state per parameter on mnist-ae, by ``curvature_dtype`` and ``storage``.

For each configuration: the bytes of every tensor in ``state_dict()`` (shared storage counted
once) after 3 and after 4 steps on random batches of the task's shape, and what
``memory_report()`` says the optimizer keeps (the queue at its capacity), all divided by 4 and
by the number of parameters ("floats-equivalent per parameter"). With the default
``stat_buffer=4`` full storage's queue holds ``steps mod 4`` estimates when the state is saved:
after 3 steps the largest state dict a run ever saves, after 4 the smallest.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/curvature_dtype/state_bytes.py
"""

from __future__ import annotations

import argparse

import torch

from mbf_bench.optimizers import build_optimizer
from mbf_bench.speed import workload
from mbf_bench.train import resolve_hparams

CONFIGS = {
    "tied rows, float32 full (the default since 2026-12-08)": ("mbf", {}),
    "tied rows, bfloat16 packed": ("mbf-packed", {"curvature_dtype": "bfloat16"}),
    "untied, float32 full (the default before)": ("mbf-untied", {}),
    "untied, bfloat16 full": ("mbf-untied", {"curvature_dtype": "bfloat16"}),
    "untied, float32 packed": ("mbf-untied", {"storage": "packed"}),
    "untied, bfloat16 packed": ("mbf-untied", {"storage": "packed", "curvature_dtype": "bfloat16"}),
}


def tensor_bytes(value: object, seen: set[tuple[int, int]]) -> int:
    """Bytes of the tensors in a nested state dict, each storage once."""
    if isinstance(value, torch.Tensor):
        key = (value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
        if key in seen:
            return 0
        seen.add(key)
        return value.untyped_storage().nbytes()
    if isinstance(value, dict):
        return sum(tensor_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in value)
    return 0


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    work = workload("mnist-ae", torch.device("cpu"))
    print("| configuration | state_dict after 3 steps | after 4 steps | memory_report |")
    print("|---|---|---|---|")
    for label, (name, extra) in CONFIGS.items():
        torch.manual_seed(0)
        model = work.make_model()
        params = sum(p.numel() for p in model.parameters())
        opt = build_optimizer(name, model, resolve_hparams(name, work.task, extra))
        saved = []
        for step in range(4):
            opt.zero_grad()
            work.loss(model, work.batch).backward()
            opt.step()
            if step >= 2:
                saved.append(tensor_bytes(opt.state_dict(), set()) / 4 / params)
        kept = sum(opt.memory_report().values()) / 4 / params
        print(f"| {label} | {saved[0]:.2f} | {saved[1]:.2f} | {kept:.2f} |")


if __name__ == "__main__":
    main()
