"""Why MBF generalizes worse than Adam on the Cora GCN (issue 19, item 4): measurements.

Kipf & Welling's two-layer GCN (``planetoid-gcn``: hidden 16, dropout 0.5, their L2 penalty on
the first layer), 200 full-graph steps, every choice judged by **validation** accuracy (the 500
validation nodes); the test nodes are never read here. Phases (``--phase``):

- ``curves``: train and validation loss/accuracy every 10 steps, Adam and MBF at their registry
  (tuned) settings and at their library defaults, several seeds;
- ``coords``: the first layer's per-coordinate step of MBF against Adam's step from the same
  moments (``m_hat / (sqrt(v_hat) + eps)``, which MBF keeps for its graft), binned by how often
  the input feature is active, plus per-block statistics of the curvature and
  ``optimizer.diagnostics()``;
- ``remedies``: MBF with another preconditioner of each block (:data:`VARIANTS`), each at the
  registry setting and at the library defaults, several seeds;
- ``grid``: a small lr x damping grid for chosen variants, selection on validation accuracy;
- ``estimators``: the batch estimator against per-example statistics, block sizes;
- ``elsewhere``: whether a remedy hurts where MBF wins (mnist-ae, ResNet-8 on the CIFAR sample);
- ``cost``: the factorization's cost with ``inverse_root=2`` over the inverse.

Dropout here is applied to the nonzero input features only (the others are zero either way):
the same distribution as ``F.dropout`` on the dense features, ten times faster on CPU, so the
many runs fit on a shared machine. Everything else is the task's (``mbf_bench.tasks``).

Run (one thread): ``OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/gcn_diagnosis.py
--phase curves --seeds 0,1,2,3,4``; results are appended to ``benchmarks/gcn_diagnosis/*.jsonl``
and summarized (median [min, max] over seeds) on stdout (kept as ``*.md`` beside them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mbf
from mbf.linalg import FactorReport
from mbf.storage import FullStorage
from mbf_bench.data import Graph
from mbf_bench.models import GCN
from mbf_bench.optimizers import build_optimizer, defaults_for
from mbf_bench.tasks import get_task, load_data

OUT = Path(__file__).with_suffix("")
STEPS = 200
TASK = get_task("planetoid-gcn")


# --------------------------------------------------------------------------- the problem
class SparseDropoutGCN(GCN):
    """The task's GCN with input dropout drawn for the nonzero features only."""

    def __init__(self, graph: Graph) -> None:
        super().__init__(graph.features.shape[1], 16, graph.num_classes, dropout=0.5)
        x = graph.features
        self.index = x.nonzero(as_tuple=True)
        self.values = x[self.index]

    def forward(self, x: Tensor, adjacency: Tensor) -> Tensor:
        if self.training:
            keep = torch.rand(self.values.shape) >= self.dropout
            x = torch.zeros_like(x).index_put_(
                self.index, self.values * keep / (1.0 - self.dropout)
            )
        h = F.relu(adjacency @ self.layer1(x))
        h = F.dropout(h, self.dropout, self.training)
        return adjacency @ self.layer2(h)


class Cora:
    """The graph, the training objective and the evaluations."""

    def __init__(self, data_dir: Path) -> None:
        self.graph = load_data(TASK, data_dir)
        assert isinstance(self.graph, Graph)

    def model(self, seed: int) -> SparseDropoutGCN:
        torch.manual_seed(seed)
        return SparseDropoutGCN(self.graph)

    def objective(self, model: nn.Module) -> Tensor:
        g = self.graph
        out = model(g.features, g.adjacency)
        loss = F.cross_entropy(out[g.train_mask], g.labels[g.train_mask])
        assert TASK.penalty is not None
        return loss + TASK.penalty(model)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        g = self.graph
        model.eval()
        out = model(g.features, g.adjacency)
        model.train()
        result = {}
        for split, mask in (("train", g.train_mask), ("val", g.val_mask)):
            logits, labels = out[mask], g.labels[mask]
            result[f"{split}_loss"] = float(F.cross_entropy(logits, labels))
            result[f"{split}_acc"] = float((logits.argmax(1) == labels).float().mean())
        return result


# --------------------------------------------------------------------------- block variants
Preconditioner = Callable[[Tensor, float], Tensor]


def _diag(fisher: Tensor) -> Tensor:
    return fisher.diagonal(dim1=-2, dim2=-1)


def _mean(fisher: Tensor) -> Tensor:
    return _diag(fisher).mean(-1)


def _eye(fisher: Tensor) -> Tensor:
    return torch.eye(fisher.shape[-1], dtype=fisher.dtype)


def _inv_damped(fisher: Tensor, per_block: Tensor) -> Tensor:
    return torch.linalg.inv(fisher + per_block[:, None, None] * _eye(fisher))


def _damping(fisher: Tensor, lam: float) -> Tensor:
    """``lam tr(F)/s`` per block, ``lam`` for a block without statistics (as MBF does)."""
    mean = _mean(fisher)
    return torch.where(mean > 0, lam * mean, torch.full_like(mean, lam))


def _root(fisher: Tensor, lam: float) -> Tensor:
    w, v = torch.linalg.eigh(fisher + _damping(fisher, lam)[:, None, None] * _eye(fisher))
    w = w.clamp_min(torch.finfo(w.dtype).tiny)
    return (v * w.rsqrt().unsqueeze(-2)) @ v.mT


def _jacobi_root(fisher: Tensor, lam: float) -> Tensor:
    """``D^1/4 (F + delta I)^-1 D^1/4`` with ``D = diag(F + delta I)``: the inverse of the
    correlation matrix, between Adam's per-coordinate ``D^-1/4`` scalings."""
    delta = lam * _mean(fisher)
    d = (_diag(fisher) + delta[:, None]).clamp_min(torch.finfo(fisher.dtype).tiny)
    q = d.pow(0.25)
    return q.unsqueeze(-1) * _inv_damped(fisher, delta) * q.unsqueeze(-2)


def _lm(fisher: Tensor, lam: float) -> Tensor:
    """Levenberg-Marquardt (Jacobi) damping: ``F + lam diag(F)``, a 1e-6 floor of the mean."""
    floor = 1e-6 * _mean(fisher)
    return torch.linalg.inv(fisher + torch.diag_embed(lam * _diag(fisher) + floor[:, None]))


VARIANTS: dict[str, Preconditioner] = {
    # (F + lam tr(F)/s I)^-1: MBF as it is (the check that this harness reproduces it)
    "inverse": lambda f, lam: _inv_damped(f, lam * _mean(f)),
    "damp-max": lambda f, lam: _inv_damped(f, lam * _diag(f).amax(-1)),
    # (a floor of 1e-6 the mean where most of a block's features never occur)
    "damp-median": lambda f, lam: _inv_damped(
        f, lam * torch.maximum(_diag(f).median(-1).values, 1e-6 * _mean(f))),
    "lm": _lm,
    "root": _root,
    "jacobi-root": _jacobi_root,
    "diag-root": lambda f, lam: torch.diag_embed(
        (_diag(f) + (lam * _mean(f))[:, None]).rsqrt()),
    "diag-inverse": lambda f, lam: torch.diag_embed(
        (_diag(f) + (lam * _mean(f))[:, None]).reciprocal()),
    "identity": lambda f, lam: _eye(f).expand_as(f).clone(),
}


#: Grid labels that run the library itself: as it is, and with ``inverse_root=2``.
LIBRARY: dict[str, tuple[None, dict[str, Any]]] = {
    "library": (None, {}),
    "library-root": (None, {"inverse_root": 2}),
}


class VariantStorage(FullStorage):
    """Full storage whose "inverse" of each block is ``precondition(F, damping)`` (float64).

    With the Adam graft only the direction within each block matters, so every variant may
    ignore the statistics' bias-correction scale (all are homogeneous in ``F``).
    """

    def __init__(self, precondition: Preconditioner, lam: float) -> None:
        self.precondition, self.lam = precondition, lam

    def factor(
        self, stored: Tensor, damping: float | Tensor, out: Tensor, root: int = 1
    ) -> FactorReport:
        out.copy_(self.precondition(stored.double(), self.lam))
        return FactorReport(blocks=stored.shape[0])


# --------------------------------------------------------------------------- optimizers
def settings(name: str) -> tuple[str, dict[str, Any]]:
    """``(registry optimizer, hyperparameters)`` of a named setting: ``adam``/``mbf`` at the
    registry's GCN values (the protocol's selections), ``*-defaults`` at library defaults."""
    if name == "adam-defaults":
        return "adam", {"lr": 1e-3, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
    if name == "mbf-defaults":
        return "mbf", {**mbf.DEFAULTS}
    base = name.split(":")[0]
    return base, {**defaults_for(base, "gcn"), "weight_decay": 0.0}


def build(model: nn.Module, name: str, variant: str | None = None,
          overrides: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    optimizer, hp = settings(name)
    hp.update(overrides or {})
    opt = build_optimizer(optimizer, model, hp)
    if variant is not None:
        assert isinstance(opt, mbf.MBF)
        opt._store.storage = VariantStorage(VARIANTS[variant], float(hp["damping"]))
    return opt


def train(cora: Cora, seed: int, make: Callable[[nn.Module], torch.optim.Optimizer],
          steps: int = STEPS, every: int = 10,
          probe: Callable[[nn.Module, torch.optim.Optimizer, int], None] | None = None,
          ) -> dict[str, Any]:
    model = cora.model(seed)
    opt = make(model)
    curve = []
    start = time.process_time()
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = cora.objective(model)
        loss.backward()
        opt.step()
        if probe is not None:
            probe(model, opt, step)
        if step % every == 0 or step == steps:
            curve.append({"step": step, "objective": float(loss.detach()), **cora.evaluate(model)})
    return {"curve": curve, "final": curve[-1], "cpu_s": time.process_time() - start,
            "best_val_acc": max(c["val_acc"] for c in curve)}


# --------------------------------------------------------------------------- reporting
def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def record(phase: str, row: dict[str, Any]) -> None:
    OUT.mkdir(exist_ok=True)
    with open(OUT / f"{phase}.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def summarize(label: str, runs: list[dict[str, Any]]) -> str:
    fin = [r["final"] for r in runs]
    return (
        f"| {label} | {spread([f['val_acc'] for f in fin])} | "
        f"{spread([r['best_val_acc'] for r in runs])} | {spread([f['val_loss'] for f in fin])} | "
        f"{spread([f['train_acc'] for f in fin])} | {spread([f['train_loss'] for f in fin])} |"
    )


HEADER = ("| setting | final val acc | best val acc | final val loss | final train acc | "
          "final train loss |\n|---|---|---|---|---|---|")


# --------------------------------------------------------------------------- phases
def phase_curves(cora: Cora, seeds: list[int]) -> None:
    print(HEADER)
    for name in ("adam", "mbf", "adam-defaults", "mbf-defaults"):
        runs = []
        for seed in seeds:
            result = train(cora, seed, lambda m, n=name: build(m, n))
            record("curves", {"setting": name, "seed": seed, **result})
            runs.append(result)
        print(summarize(name, runs), flush=True)
        for step in (10, 30, 50, 100, 150, 200):
            at = [c for r in runs for c in r["curve"] if c["step"] == step]
            print(f"|   step {step} | {spread([c['val_acc'] for c in at])} | | "
                  f"{spread([c['val_loss'] for c in at])} | "
                  f"{spread([c['train_acc'] for c in at])} | "
                  f"{spread([c['train_loss'] for c in at])} |", flush=True)


def _feature_activity(cora: Cora) -> Tensor:
    """Per input feature: the fraction of nodes within two hops of a training node (those that
    give the first layer gradient) in which it is nonzero."""
    g = cora.graph
    reach = g.train_mask.float()
    a = g.adjacency
    for _ in range(2):
        reach = (a @ reach.unsqueeze(1)).squeeze(1) + reach
    near = reach > 0
    return (g.features[near] != 0).float().mean(0)


class _CoordProbe:
    """Called after every step: at the steps in ``at``, the first layer's per-coordinate step
    against Adam's from MBF's own moments, binned by feature activity, and block statistics."""

    def __init__(self, bins: Tensor, nbins: int, at: tuple[int, ...]) -> None:
        self.bins, self.nbins, self.at = bins, nbins, at
        self.before = torch.empty(0)
        self.ratios: dict[int, list[Tensor]] = {s: [] for s in at}
        self.shares: dict[int, list[tuple[float, float]]] = {s: [] for s in at}
        self.blockstats: dict[int, list[dict[str, float]]] = {s: [] for s in at}

    def start(self, model: nn.Module) -> None:
        self.before = model.layer1.weight.detach().clone()

    def __call__(self, model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
        if step in self.at:
            assert isinstance(opt, mbf.MBF)
            self.measure(model, opt, step)
        self.start(model)

    def measure(self, model: nn.Module, opt: mbf.MBF, step: int) -> None:
        w = model.layer1.weight.detach()
        st, group = opt.state[model.layer1.weight], opt.param_groups[0]
        mu, beta2 = group["momentum"], group["graft_beta2"]
        first = (1 - mu) / (1 - mu ** st["momentum_steps"])
        b = 1 - beta2 ** st["graft_steps"]
        adam = first * st["momentum_buffer"] / ((st["graft_sq"] / b).sqrt() + group["graft_eps"])
        step_vec = (w - self.before) / -group["lr"]
        ratio = step_vec.abs() / adam.abs().clamp_min(1e-30)
        nan = torch.tensor(float("nan"))
        self.ratios[step].append(torch.stack([
            ratio[:, self.bins == k].median() if (self.bins == k).any() else nan
            for k in range(self.nbins)]))
        rare = self.bins == 0
        self.shares[step].append((float(step_vec[:, rare].norm() / step_vec.norm()),
                                  float(adam[:, rare].norm() / adam.norm())))
        self.blockstats[step].append(_block_stats(opt))


def phase_coords(cora: Cora, seeds: list[int], at: tuple[int, ...] = (20, 50, 100, 200)) -> None:
    activity = _feature_activity(cora)
    edges = torch.tensor([0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 1.0])
    nbins = len(edges) - 1
    bins = torch.bucketize(activity, edges[1:-1], right=True)
    print("first layer: per-coordinate |MBF step| / |Adam step| (same moments), median over "
          "coordinates and seeds, by feature activity (fraction of nodes within 2 hops of a "
          "training node where the feature is nonzero)")
    counts = [int((bins == b).sum()) for b in range(nbins)]
    print("| setting | step | " + " | ".join(
        f"{edges[b]:.3f}-{edges[b + 1]:.3f} ({counts[b]})" for b in range(nbins))
        + " | share of step norm on the rarest bin (MBF / Adam) |")
    print("|---|---|" + "---|" * nbins + "---|")
    for name, variant in (("mbf", None), ("mbf-defaults", None), ("mbf", "root")):
        probe = _CoordProbe(bins, nbins, at)
        for seed in seeds:
            def make(m: nn.Module, n: str = name, v: str | None = variant,
                     p: _CoordProbe = probe) -> torch.optim.Optimizer:
                p.start(m)
                return build(m, n, v)
            train(cora, seed, make, probe=probe)
        label = name if variant is None else f"{name} / {variant}"
        for s in at:
            med = torch.stack(probe.ratios[s]).nanmedian(0).values
            sh = torch.tensor(probe.shares[s]).median(0).values
            print(f"| {label} | {s} | " + " | ".join(f"{float(v):.3g}" for v in med)
                  + f" | {float(sh[0]):.2f} / {float(sh[1]):.2f} |")
            record("coords", {"setting": label, "step": s, "ratio_by_bin": med.tolist(),
                              "rare_share": sh.tolist(), "edges": edges.tolist(),
                              "blocks": probe.blockstats[s]})
        for s in at:
            stats = probe.blockstats[s]
            print(f"  {label} step {s}: " + ", ".join(
                f"{k} {statistics.median(x[k] for x in stats):.3g}" for k in stats[0]))


def _block_stats(opt: mbf.MBF) -> dict[str, float]:
    """Median over the first layer's blocks of: effective rank of ``F_b`` (participation ratio
    of its eigenvalues), the fraction of its trace on the largest diagonal entry, the fraction
    of diagonal entries below ``damping * tr/s`` (damped away), plus ``optimizer.diagnostics``'s
    step-to-gradient norm ratio."""
    layer1 = opt.blocks()[0]
    f = layer1.fisher.double()
    w = torch.linalg.eigvalsh(f).clamp_min(0)
    eff_rank = w.sum(-1) ** 2 / (w.square().sum(-1) + 1e-300)
    d = _diag(f)
    tr = d.sum(-1)
    lam = opt.param_groups[0]["damping"]
    below = (d < (lam * tr / f.shape[-1])[:, None]).double().mean(-1)
    diag = opt.diagnostics()
    return {
        "eff_rank": float(eff_rank.median()),
        "top_diag_share": float((d.amax(-1) / tr.clamp_min(1e-300)).median()),
        "frac_diag_below_damping": float(below.median()),
        "step_to_grad_norm": diag.get("group0/step_to_grad_norm", float("nan")),
    }


def phase_remedies(cora: Cora, seeds: list[int], variants: list[str]) -> None:
    print(HEADER)
    for base in ("mbf", "mbf-defaults"):
        for variant in variants:
            runs = []
            for seed in seeds:
                result = train(cora, seed, lambda m, b=base, v=variant: build(m, b, v))
                record("remedies", {"setting": base, "variant": variant, "seed": seed, **result})
                runs.append(result)
            print(summarize(f"{base} / {variant}", runs), flush=True)


def phase_grid(cora: Cora, seeds: list[int], variants: list[str], lrs: list[float],
               dampings: list[float]) -> None:
    print("| variant | lr | damping | final val acc | best val acc | final train loss |")
    print("|---|---|---|---|---|---|")
    for variant in variants:
        for lr in lrs:
            for damping in dampings:
                runs = []
                for seed in seeds:
                    result = train(cora, seed, lambda m, v=variant, a=lr, d=damping: build(
                        m, "mbf", LIBRARY.get(v, (v, {}))[0],
                        {"lr": a, "damping": d, **LIBRARY.get(v, (v, {}))[1]}))
                    record("grid", {"variant": variant, "lr": lr, "damping": damping,
                                    "seed": seed, **result})
                    runs.append(result)
                fin = [r["final"] for r in runs]
                print(f"| {variant} | {lr:g} | {damping:g} | "
                      f"{spread([f['val_acc'] for f in fin])} | "
                      f"{spread([r['best_val_acc'] for r in runs])} | "
                      f"{spread([f['train_loss'] for f in fin])} |", flush=True)


def phase_estimators(cora: Cora, seeds: list[int]) -> None:
    print(HEADER)
    options: dict[str, dict[str, Any]] = {
        "batch (library)": {},
        "per_example": {"estimator": "per_example"},
        "blocks of 8": {"max_block_size": 8},
        "blocks of 128": {"max_block_size": 128},
        "graft_eps 1e-4": {"graft_eps": 1e-4},
        "stat_decay 0.99": {"stat_decay": 0.99},
    }
    for base in ("mbf", "mbf-defaults"):
        for label, extra in options.items():
            runs = []
            for seed in seeds:
                def make(m: nn.Module, b: str = base, e: dict[str, Any] = extra
                         ) -> torch.optim.Optimizer:
                    optimizer, hp = settings(b)
                    hp.update(e)
                    estimator = hp.pop("estimator", None)
                    if estimator is None:
                        return build_optimizer(optimizer, m, hp)
                    return mbf.MBF(m, estimator=estimator, **hp)
                result = train(cora, seed, make)
                record("estimators", {"setting": base, "option": label, "seed": seed, **result})
                runs.append(result)
            print(summarize(f"{base} / {label}", runs), flush=True)


def phase_elsewhere(seeds: list[int], data_dir: Path, variants: list[str],
                    budgets: dict[str, int]) -> None:
    """Whether a remedy hurts where MBF wins: the MNIST autoencoder and ResNet-8 on the CIFAR
    sample, at the registry (tuned) settings, 10 % of the training set held out (never the
    test set). Autoencoder: mean training loss over the last tenth of the steps and the held-out
    reconstruction error; classifier: held-out accuracy. ``variants``: ``adam``, ``library``
    (MBF as it is), ``library-root`` (``inverse_root=2``) or names of :data:`VARIANTS`."""
    from mbf_bench.problems import MinibatchProblem
    from mbf_bench.tasks import make_problem

    print("| task | optimizer | steps | tail train loss | held-out metric |\n|---|---|---|---|---|")
    for name, steps in budgets.items():
        task = get_task(name)
        data = load_data(task, data_dir)
        metric = "val_error" if task.family == "autoencoder" else "val_accuracy"
        for label in variants:
            tails, metrics = [], []
            for seed in seeds:
                problem = make_problem(task, data, seed=seed, device=torch.device("cpu"),
                                       holdout=0.1)
                assert isinstance(problem, MinibatchProblem)
                torch.manual_seed(seed)
                model = task.model(data)
                optimizer = "adam" if label == "adam" else "mbf"
                hp = defaults_for(optimizer, task.family)
                if label in LIBRARY:
                    hp.update(LIBRARY[label][1])
                opt = build_optimizer(optimizer, model, hp)
                if label != "adam" and label not in LIBRARY:
                    assert isinstance(opt, mbf.MBF)
                    opt._store.storage = VariantStorage(VARIANTS[label], float(hp["damping"]))
                losses, start = [], time.process_time()
                for step in range(steps):
                    epoch, index = divmod(step, problem.steps_per_epoch)
                    opt.zero_grad()
                    loss = problem.loss(model, problem.batch(epoch, index))
                    loss.backward()
                    opt.step()
                    losses.append(float(loss.detach()))
                tail = losses[-max(1, steps // 10):]
                result = problem.evaluate(model)
                row = {"task": name, "optimizer": label, "seed": seed, "steps": steps,
                       "tail_train_loss": sum(tail) / len(tail), "metric": result[metric],
                       "cpu_s": time.process_time() - start}
                record("elsewhere", row)
                tails.append(row["tail_train_loss"])
                metrics.append(row["metric"])
            print(f"| {name} | {label} | {steps} | {spread(tails)} | {metric} "
                  f"{spread(metrics)} |", flush=True)


def phase_cost(blocks: int = 4000, size: int = 32, repeats: int = 5) -> None:
    """CPU seconds of one batched factorization with ``inverse_root=2`` (eigendecomposition)
    over ``inverse_root=1`` (Cholesky inverse), float32 blocks of rank 8, alternated."""
    from mbf.linalg import damped_inverse

    g = torch.randn(blocks, size, 8, generator=torch.Generator().manual_seed(0))
    fisher = g @ g.mT
    damping = 1e-3 * _mean(fisher)
    seconds: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeats):
        for root in (1, 2):
            start = time.process_time()
            damped_inverse(fisher, damping, root=root)
            seconds[root].append(time.process_time() - start)
    one, two = (statistics.median(seconds[r]) for r in (1, 2))
    print(f"{blocks} blocks of {size}: inverse {one:.3f} s, inverse root {two:.3f} s, "
          f"ratio {two / one:.2f} (median of {repeats}, CPU time, one thread)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phase", required=True,
                        choices=["curves", "coords", "remedies", "grid", "estimators", "elsewhere",
                                 "cost"])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated names of VARIANTS ('library': MBF unpatched)")
    parser.add_argument("--budgets", default="mnist-ae:200,cifar10-resnet8:60",
                        help="phase elsewhere: task:steps,...")
    parser.add_argument("--lrs", default="3e-3,1e-2,3e-2")
    parser.add_argument("--dampings", default="1e-3,1e-2,1e-1")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.phase == "cost":
        phase_cost()
        return
    cora = Cora(args.data_dir)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    if args.phase == "curves":
        phase_curves(cora, seeds)
    elif args.phase == "coords":
        phase_coords(cora, seeds)
    elif args.phase == "remedies":
        phase_remedies(cora, seeds, variants)
    elif args.phase == "grid":
        phase_grid(cora, seeds, variants, [float(x) for x in args.lrs.split(",")],
                   [float(x) for x in args.dampings.split(",")])
    elif args.phase == "estimators":
        phase_estimators(cora, seeds)
    else:
        budgets = {k: int(v) for k, v in (item.split(":") for item in args.budgets.split(","))}
        phase_elsewhere(seeds, args.data_dir, variants, budgets)


if __name__ == "__main__":
    main()
