"""Short learning-rate sweeps behind the registry's default hyperparameters.

Not a benchmark: a few dozen steps per setting on real data, to find where each optimizer diverges
and which order of magnitude of ``lr`` makes progress, so that the defaults in
``mbf_bench.optimizers`` start the tuning grid somewhere sensible. Prints one line per setting.

    python benchmarks/sweep_optimizer_defaults.py --data ../shared/data --family autoencoder
    python benchmarks/sweep_optimizer_defaults.py --data ../shared/data --family cnn
"""

from __future__ import annotations

import argparse
import gzip
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mbf_bench.optimizers import OPTIMIZERS, build_optimizer, defaults_for

LRS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def mnist_images(data: Path) -> torch.Tensor:
    """The 10,000 MNIST test images as ``(N, 784)`` floats in [0, 1]."""
    path = data / "mnist" / "t10k-images-idx3-ubyte.gz"
    if not path.is_file():
        raise SystemExit(f"--data: {path} not found (pass the folder that holds mnist/)")
    raw = np.frombuffer(gzip.decompress(path.read_bytes()), dtype=np.uint8, offset=16)
    return torch.from_numpy(raw.reshape(-1, 784).astype(np.float32) / 255.0)


def cifar_sample(data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    path = data / "cifar10" / "aamirmalik-dr" / "cifar10_sample.npz"
    if not path.is_file():
        raise SystemExit(f"--data: {path} not found (pass the folder that holds cifar10/)")
    with np.load(path, allow_pickle=False) as f:
        x = torch.from_numpy(f["x_train"].astype(np.float32) / 255.0)
        y = torch.from_numpy(f["y_train"].astype(np.int64))
    return (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True), y


def mnist_autoencoder() -> nn.Module:
    """The paper's MNIST autoencoder, 784-1000-500-250-30-250-500-1000-784 (ReLU, linear code)."""
    sizes = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i not in (3, len(sizes) - 2):
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def small_cnn() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]

    return nn.Sequential(
        *block(3, 16), *block(16, 32), *block(32, 64), nn.Flatten(), nn.Linear(64 * 16, 10)
    )


def run(
    name: str, family: str, hp: dict[str, float], steps: int, batch: int, data: Path
) -> tuple[float, float]:
    torch.manual_seed(0)
    if family == "autoencoder":
        x_all = mnist_images(data)
        model = mnist_autoencoder()

        def loss_of(idx: torch.Tensor) -> torch.Tensor:
            x = x_all[idx]
            return F.binary_cross_entropy_with_logits(model(x), x, reduction="none").sum(1).mean()

        n = x_all.shape[0]
    else:
        x_all, y_all = cifar_sample(data)
        model = small_cnn()

        def loss_of(idx: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(model(x_all[idx]), y_all[idx])

        n = x_all.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = build_optimizer(name, model, {**defaults_for(name, family), **hp})
    gen = torch.Generator().manual_seed(1)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen)
        opt.zero_grad()
        loss = loss_of(idx)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
    elapsed = (time.perf_counter() - start) / len(losses)
    tail = losses[-5:]
    return (sum(tail) / len(tail) if all(map(math.isfinite, tail)) else math.nan), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, required=True, help="folder holding mnist/ and cifar10/"
    )
    parser.add_argument("--family", choices=("autoencoder", "cnn"), required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--only", nargs="*", default=None, help="optimizer names (default: all)")
    parser.add_argument("--lrs", nargs="*", type=float, default=list(LRS))
    parser.add_argument(
        "--dampings", nargs="*", type=float, default=None, help="default: the task's"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    for name in args.only or list(OPTIMIZERS):
        dampings = args.dampings or [defaults_for(name, args.family).get("damping", math.nan)]
        for damping in dampings:
            for lr in args.lrs:
                hp = {"lr": lr} if math.isnan(damping) else {"lr": lr, "damping": damping}
                final, per_step = run(name, args.family, hp, args.steps, args.batch, args.data)
                print(
                    f"{args.family:12s} {name:16s} lr={lr:8.0e} damping={damping:8.0e} "
                    f"final={final:10.4f} step={per_step * 1e3:7.1f}ms",
                    flush=True,
                )


if __name__ == "__main__":
    main()
