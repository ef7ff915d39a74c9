"""One benchmark run: (task, optimizer, seed, hyperparameters, budget) -> metrics on disk.

Layout of a run, ``OUT/<task>/<optimizer>/<seed>/``:

- ``config.json``: everything needed to rerun (task, optimizer, merged hyperparameters, seed,
  budget, data directory, versions, a ``rerun`` command line) and ``status`` (``running``,
  ``finished``, ``diverged``, ``failed``, ``interrupted``).
- ``metrics.jsonl``: one JSON object a line. Every line has ``step``, ``epoch`` (steps done /
  steps per epoch, a float), ``seconds`` (training time: the sum of step times, evaluation and
  checkpointing excluded) and ``train_loss`` (that step's minibatch loss). Evaluation lines, after
  each epoch and at the end, add ``lr`` and ``test_loss`` plus ``test_accuracy`` (classification)
  or ``test_error`` (autoencoders), or, for text tasks, ``val_loss`` (and ``test_loss`` in the
  last line only), and their ``train_loss`` is the mean of the minibatch losses
  since the previous evaluation; with an optimizer that has ``diagnostics()`` (MBF), they also
  hold its figures as ``diag/<name>`` (:mod:`mbf.diagnostics`; its ``diag/seconds/...`` count
  from the start of the process, so they restart when a run is resumed). A diverged run ends
  with a line whose ``train_loss`` is null and ``status`` is ``"diverged"``.
- ``checkpoint.pt``: model, optimizer state, RNG states (torch's and numpy's global ones: PSGD-Kron
  draws from numpy's) and position, written atomically (a
  temporary file flushed to the disk, then renamed) every ``checkpoint_every`` seconds and at the
  end; ``resume=True`` continues from it. Because the data order is a function of (seed, epoch),
  a resumed run repeats exactly what the uninterrupted run would have done (bitwise on the CPU).
- ``checkpoint.prev.pt``: the checkpoint before, resumed from when the newest does not load.

A write that fails (disk full) raises :class:`StorageError` and leaves the files as they were.

Optimizers with an evaluation point of their own (Schedule-Free AdamW: ``optimizer.eval()`` moves
the weights to the averaged iterate ``x``, ``optimizer.train()`` back to the point where gradients
are taken) are switched to ``eval()`` for every evaluation and back to ``train()`` after it, on
every process, by :func:`optimizer_evaluation`; the checkpoint holds them in training mode, so a
resumed run continues bitwise (a checkpoint taken in evaluation mode would round the weights
through ``x`` and back, at wall-clock moments).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import shlex
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mbf_bench import parallel
from mbf_bench.data import DataError
from mbf_bench.optimizers import OPTIMIZERS, build_optimizer, defaults_for
from mbf_bench.problems import Problem
from mbf_bench.schedule import lr_factor
from mbf_bench.settings import format_value, parse_value
from mbf_bench.tasks import Task, default_data_dir, get_task, load_data, make_problem

__all__ = [
    "ExistingRunError",
    "ResumeError",
    "StorageError",
    "RunResult",
    "RunSpec",
    "resolve_hparams",
    "run",
    "run_directory",
    "check_new_runs",
    "optimizer_evaluation",
    "run_many",
    "validate",
]

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"  # the one before, kept in case the newest is damaged
CONFIG = "config.json"
METRICS = "metrics.jsonl"

# Settings that define a run's trajectory: resuming with different ones would not continue it.
_TRAJECTORY_KEYS = (
    "task", "optimizer", "seed", "hparams", "batch_size", "subset", "holdout", "task_options",
    "lr_milestone_epochs", "schedule", "warmup_fraction", "clock",
)
_ADDED_KEY_DEFAULTS = {"schedule": "constant", "warmup_fraction": 0.0, "clock": "wall"}
CLOCKS = ("wall", "cpu")


class ResumeError(ValueError):
    """A run directory cannot be resumed (other settings, or an unreadable checkpoint)."""


class ExistingRunError(ValueError):
    """A run would overwrite an earlier run's results without ``overwrite=True``."""


class StorageError(OSError):
    """A result file could not be written (disk full, permissions); what was on disk before is
    intact."""


@dataclass
class RunSpec:
    """What to run. ``hparams`` are overrides on top of the optimizer's defaults for the task's
    family; without ``epochs``, ``budget_seconds`` and ``max_steps`` a run lasts the task's
    default number of epochs. ``checkpoint_every`` is in wall-clock seconds (0: every step);
    ``checkpoint_every_steps``, when set, checkpoints every that many steps instead.

    ``schedule`` (:data:`mbf_bench.schedule.SCHEDULES`) scales the learning rate by the
    fraction of the budget spent (seconds under ``budget_seconds``, else steps of
    ``max_steps`` or of the epochs; the largest when several are set), so that a decay ends
    with the budget; any schedule but ``"constant"`` replaces the task's step decay
    (``lr_milestones``). ``warmup_fraction``: the fraction of the budget warmed up linearly.
    ``clock``: ``"wall"`` (``time.perf_counter``) or ``"cpu"`` (``time.process_time``: CPU
    seconds of this process, immune to other work on a shared machine; the comparison
    protocol's clock). Under ``"cpu"`` the optimizer's construction also counts against the
    budget, with the start-up work of its first steps, which every clock counts."""

    task: str
    optimizer: str
    seed: int = 0
    hparams: dict[str, Any] = field(default_factory=dict)
    epochs: int | None = None
    budget_seconds: float | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    subset: int | None = None
    holdout: float | None = None
    task_options: dict[str, str] = field(default_factory=dict)
    data_dir: str | None = None
    device: str = "cpu"
    checkpoint_every: float = 120.0
    checkpoint_every_steps: int | None = None
    schedule: str = "constant"
    warmup_fraction: float = 0.0
    clock: str = "wall"


@dataclass
class RunResult:
    """How a run ended, and its last evaluation (empty if it never evaluated)."""

    spec: RunSpec
    directory: Path
    status: str
    steps: int = 0
    seconds: float = 0.0
    last_eval: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class _Position:
    """Where a run stands; saved in checkpoints."""

    step: int = 0
    epoch: int = 0
    index: int = 0
    seconds: float = 0.0
    loss_sum: float = 0.0
    loss_count: int = 0
    last_eval_step: int = -1
    metrics_bytes: int = 0


def run_directory(out: Path, spec: RunSpec) -> Path:
    """``out/<task>/<optimizer>/<seed>``."""
    return Path(out) / spec.task / spec.optimizer / str(spec.seed)


def resolve_hparams(optimizer: str, task: Task, overrides: dict[str, Any]) -> dict[str, Any]:
    """The optimizer's defaults for the task's family, then the settings the task fixes
    (:attr:`Task.hparam_defaults`, where the optimizer has them), then ``overrides``.

    Raises:
        ValueError: unknown optimizer, or an override the optimizer does not take.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; optimizers: {', '.join(OPTIMIZERS)}")
    merged = dict(defaults_for(optimizer, task.family))
    merged.update({k: v for k, v in task.hparam_defaults.items() if k in merged})
    known = set(merged) | set(OPTIMIZERS[optimizer].defaults)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"optimizer {optimizer} has no hyperparameter {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(sorted(known))})"
        )
    merged.update(overrides)
    return merged


def validate(spec: RunSpec) -> Task:
    """Check names, options and numbers of ``spec`` before any work; ``ValueError`` if bad."""
    try:
        task = get_task(spec.task)
    except KeyError as error:
        raise ValueError(error.args[0]) from None
    task.resolve_options(spec.task_options)
    resolve_hparams(spec.optimizer, task, spec.hparams)
    if spec.seed < 0:
        raise ValueError(f"seeds must be non-negative, got {spec.seed}")
    for name in ("epochs", "max_steps", "batch_size", "subset", "checkpoint_every_steps"):
        value = getattr(spec, name)
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if spec.budget_seconds is not None and spec.budget_seconds <= 0:
        raise ValueError(f"budget_seconds must be positive, got {spec.budget_seconds}")
    lr_factor(spec.schedule, 0.0, spec.warmup_fraction)  # checks both
    if spec.clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {spec.clock!r}")
    if spec.holdout is not None and not 0.0 < spec.holdout < 1.0:
        raise ValueError(f"--holdout must be a fraction in (0, 1), got {spec.holdout}")
    _device(spec.device)
    _check_values(spec.optimizer, resolve_hparams(spec.optimizer, task, spec.hparams))
    return task


def optimizer_diagnostics(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The optimizer's ``diagnostics()`` (MBF's, :mod:`mbf.diagnostics`) as ``diag/<name>``
    entries of an evaluation line; ``{}`` for optimizers without it."""
    report = getattr(optimizer, "diagnostics", None)
    if not callable(report):
        return {}
    return {f"diag/{name}": float(value) for name, value in report().items()}


@contextlib.contextmanager
def optimizer_evaluation(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Inside: the optimizer in evaluation mode, if it has one (``eval()`` and ``train()``, as
    schedule-free optimizers do); back in training mode after. Other optimizers: nothing."""
    to_eval, to_train = getattr(optimizer, "eval", None), getattr(optimizer, "train", None)
    if not (callable(to_eval) and callable(to_train)):
        yield
        return
    to_eval()
    try:
        yield
    finally:
        to_train()


def _training_mode(optimizer: torch.optim.Optimizer) -> None:
    """Put an optimizer that has modes (:func:`optimizer_evaluation`) in training mode."""
    to_train = getattr(optimizer, "train", None)
    if callable(to_train):
        to_train()


def _check_values(optimizer: str, hparams: dict[str, Any]) -> None:
    """Let the optimizer's own checks judge the values (``damping=-1``, ``estimator=foo``) on a
    tiny model, so that a bad ``--set`` is one message before any run, not a failed run."""
    probe = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            build_optimizer(optimizer, probe, hparams)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{optimizer}: {error}") from None


def check_new_runs(
    specs: Iterable[RunSpec], out: Path, *, resume: bool = False, overwrite: bool = False
) -> None:
    """Refuse, before any work, two specs with one run directory (``--seeds 0,0``) and a run
    that would replace an earlier one's results: a directory with a ``config.json`` is only
    continued (``resume`` with a checkpoint) or, with ``overwrite``, started over."""
    seen: set[Path] = set()
    for spec in specs:
        directory = run_directory(out, spec)
        if directory in seen:
            raise ValueError(
                f"{spec.task}/{spec.optimizer}/seed {spec.seed} is listed twice "
                "(duplicate seeds or optimizers)"
            )
        seen.add(directory)
        if overwrite or not (directory / CONFIG).exists():
            continue
        if resume and _checkpoints(directory):
            continue
        try:
            status = json.loads((directory / CONFIG).read_text()).get("status", "unknown")
        except (OSError, ValueError, AttributeError):
            status = "unreadable"
        raise ExistingRunError(
            f"{directory} already holds a run ({status}); pass --resume to continue it, "
            "--overwrite to start it over, or another --out"
        )


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: mbf-bench runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available to this PyTorch; use cpu")
    return device


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_atomic(path: Path, write: Callable[[IO[bytes]], object],
                  keep: Path | None = None) -> None:
    """Write through a temporary file, flushed to the disk, then ``os.replace``: a kill or a
    full disk never leaves half a file at ``path``. ``keep``: move the file being replaced there
    first (the previous checkpoint).

    Raises:
        StorageError: the write failed (the temporary file is removed; ``path`` is as before).
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle, _Detaching(handle) as sink:
            write(cast(IO[bytes], sink))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        tmp.unlink(missing_ok=True)
        reason = error.strerror or str(error)
        raise StorageError(error.errno, f"cannot write {path}: {reason}; the files already "
                           "there are intact (free some space, then --resume)") from None
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        # Ctrl-C inside torch.save surfaces as torch's own error about the half-written zip
        # (the KeyboardInterrupt is only its context): it is still an interruption.
        if _interrupted(error):
            raise KeyboardInterrupt from None
        raise
    if keep is not None and path.exists():
        os.replace(path, keep)
    os.replace(tmp, path)


class _Detaching:
    """The file handed to a writer, cut off from the real one when the write ends.

    ``torch.save`` keeps a C++ zip writer that still holds this object when a Ctrl-C lands while
    the zip is being finished; the writer's destructor, run later when the interrupted frames are
    freed, writes the zip's end once more. Had it held the real file, closed by then, that write
    would raise inside a destructor and abort the process (``terminate called after throwing
    pybind11::error_already_set``) instead of exiting 130. Detached, late writes go nowhere.
    """

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle: IO[bytes] | None = handle

    def __enter__(self) -> _Detaching:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle = None

    def write(self, data: Any) -> int:
        if self._handle is None:
            return len(memoryview(data))
        return self._handle.write(data)

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.flush()


def _interrupted(error: BaseException) -> bool:
    """Whether ``error`` is, or was raised while handling, a ``KeyboardInterrupt``."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__context__
    return False


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    text = json.dumps(obj, indent=2, default=str) + "\n"
    _write_atomic(path, lambda handle: handle.write(text.encode()))


def _checkpoints(directory: Path) -> list[Path]:
    """The run's checkpoints that exist, newest first."""
    return [p for p in (directory / CHECKPOINT, directory / PREVIOUS_CHECKPOINT) if p.exists()]


def versions() -> dict[str, str]:
    """Versions of what a run's numbers depend on."""
    import numpy

    import mbf

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "mbf": getattr(mbf, "__version__", "unknown"),
        "platform": platform.platform(),
        "torch_threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def rerun_command(spec: RunSpec, out: Path, hparams: dict[str, Any]) -> str:
    """A command line that reproduces the run (all merged hyperparameters spelled out)."""
    parts = ["mbf-bench", "run", "--task", spec.task, "--optimizers", spec.optimizer,
             "--seeds", str(spec.seed), "--out", str(out), "--device", spec.device,
             "--threads", str(torch.get_num_threads())]
    for flag, value in (("--epochs", spec.epochs), ("--budget-seconds", spec.budget_seconds),
                        ("--max-steps", spec.max_steps), ("--batch-size", spec.batch_size),
                        ("--subset", spec.subset), ("--holdout", spec.holdout),
                        ("--data-dir", spec.data_dir)):
        if value is not None:
            parts += [flag, str(value)]
    if spec.schedule != "constant":
        parts += ["--schedule", spec.schedule, "--warmup-fraction", str(spec.warmup_fraction)]
    if spec.clock != "wall":
        parts += ["--clock", spec.clock]
    for key, value in spec.task_options.items():
        parts += [f"--{key}", value]
    for key, value in hparams.items():
        text = value if isinstance(value, str) and parse_value(value) == value else None
        parts += ["--set", f"{key}={text or format_value(value)}"]
    return shlex.join(parts)


def _milestones(task: Task, spec: RunSpec) -> list[int]:
    if spec.schedule != "constant":
        return []
    planned = spec.epochs or task.epochs
    return [max(1, round(f * planned)) for f in task.lr_milestones]


def _clock(spec: RunSpec) -> Callable[[], float]:
    return time.process_time if spec.clock == "cpu" else time.perf_counter


def _progress(spec: RunSpec, task: Task, pos: _Position, steps_per_epoch: int) -> float:
    """The fraction of the run's budget spent: the largest over the limits it has."""
    fractions = []
    if spec.budget_seconds is not None:
        fractions.append(pos.seconds / spec.budget_seconds)
    if spec.max_steps is not None:
        fractions.append(pos.step / spec.max_steps)
    epochs = spec.epochs
    if epochs is None and spec.budget_seconds is None and spec.max_steps is None:
        epochs = task.epochs
    if epochs is not None:
        fractions.append(pos.step / (epochs * steps_per_epoch))
    return max(fractions)


def _stopped(spec: RunSpec, task: Task, pos: _Position) -> bool:
    if spec.max_steps is not None and pos.step >= spec.max_steps:
        return True
    if spec.budget_seconds is not None and pos.seconds >= spec.budget_seconds:
        return True
    epochs = spec.epochs
    if epochs is None and spec.budget_seconds is None and spec.max_steps is None:
        epochs = task.epochs
    return epochs is not None and pos.epoch >= epochs


def _check_resumable(directory: Path, config: dict[str, Any]) -> dict[str, Any]:
    try:
        saved: dict[str, Any] = json.loads((directory / CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise ResumeError(f"cannot resume {directory}: {CONFIG} unreadable ({error})") from None
    for key in _TRAJECTORY_KEYS:
        # Runs saved before a key existed had its default (the schedule options, the clock).
        if saved.get(key, _ADDED_KEY_DEFAULTS.get(key)) != config[key]:
            raise ResumeError(
                f"cannot resume {directory}: it was started with {key}={saved.get(key)!r}, "
                f"now {config[key]!r}; use another --out or drop --resume to start over"
            )
    return saved


class _Progress:
    """A tqdm bar on stderr counting steps (epoch budgets) or training seconds (time budgets)."""

    def __init__(self, spec: RunSpec, task: Task, steps_per_epoch: int, pos: _Position,
                 enabled: bool) -> None:
        epochs = spec.epochs or (None if spec.budget_seconds or spec.max_steps else task.epochs)
        totals = [t for t in (spec.max_steps, epochs and epochs * steps_per_epoch) if t]
        self.by_steps = bool(totals) or spec.budget_seconds is None
        total = min(totals) if totals else spec.budget_seconds
        initial: float = pos.step if self.by_steps else pos.seconds
        # Seconds: one decimal, and never past the budget (the last step overshoots it, which
        # tqdm showed as 2.0071316599999136/2.0 with a negative time left).
        seconds_format = ("{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s "
                          "[{elapsed}<{remaining}{postfix}]")
        self.bar = tqdm(total=total, initial=min(initial, total or initial), file=sys.stderr,
                        disable=not enabled, desc=f"{spec.task}/{spec.optimizer}/{spec.seed}",
                        dynamic_ncols=True, unit="step" if self.by_steps else "s",
                        bar_format=None if self.by_steps else seconds_format)

    def update(self, seconds: float, loss: float) -> None:
        if self.by_steps:
            self.bar.update(1)
        else:
            self.bar.update(max(0.0, min(seconds, self.bar.total - self.bar.n)))
        self.bar.set_postfix(loss=f"{loss:.4g}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def run(
    spec: RunSpec,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> RunResult:
    """Train one run to its budget, writing metrics, config and checkpoints under ``out``.

    Args:
        spec: what to run.
        out: root of the results; the run lives in :func:`run_directory`.
        resume: continue from the run's checkpoint when there is one (else start afresh).
        overwrite: start an existing run directory over; without it (and without a checkpoint
            to resume) an existing run is an :class:`ExistingRunError`.
        progress: show a progress bar on stderr.
        on_step: called with the step number after each step's bookkeeping (tests use it to
            interrupt a run).

    Returns:
        The run's status (``finished`` or ``diverged``) and last evaluation.

    Raises:
        DataError: the task's data is missing or unreadable.
        ValueError: bad settings.
        ResumeError: a resume whose settings differ from the saved run's, or a bad checkpoint.
        ExistingRunError: the run directory holds a run, and neither ``resume`` nor
            ``overwrite`` says what to do with it.
    """
    task = validate(spec)
    device = _device(spec.device)
    if not parallel.launched():  # several processes: checked once, before the launch
        check_new_runs([spec], out, resume=resume, overwrite=overwrite)
    dp = parallel.from_env(device)  # several processes (mbf-bench run --nproc K), else None
    if dp is not None:
        parallel.check_supported(spec.optimizer, full_graph=task.batch_size is None)
        device = dp.device
    main = dp is None or dp.main  # the process that writes files and evaluates
    hparams = resolve_hparams(spec.optimizer, task, spec.hparams)
    directory = run_directory(out, spec)
    data_dir = Path(spec.data_dir) if spec.data_dir is not None else default_data_dir()
    data = load_data(task, data_dir, spec.task_options, spec.subset)
    problem = make_problem(task, data, seed=spec.seed, device=device,
                           batch_size=spec.batch_size, holdout=spec.holdout)
    milestones = _milestones(task, spec)

    torch.manual_seed(spec.seed)
    _numpy_random().seed(spec.seed)  # numpy's global generator, which PSGD-Kron draws from
    module = task.model(data).to(device)
    model = module if dp is None else dp.wrap(module)
    started = _clock(spec)()
    optimizer = build_optimizer(spec.optimizer, model, hparams)
    setup_seconds = _clock(spec)() - started
    # Before any restore: a checkpoint holds the scheduled (decayed) rates, not the base ones.
    base_lrs = [group["lr"] for group in optimizer.param_groups]

    config: dict[str, Any] = {
        **dataclasses.asdict(spec),
        "hparams": hparams,
        "hparam_overrides": spec.hparams,
        "task_options": task.resolve_options(spec.task_options),
        "data_dir": str(data_dir),
        "family": task.family,
        "loss": task.loss,
        "test_metric": task.test_metric.replace("test", problem.eval_prefix),
        "batch_size": spec.batch_size or task.batch_size,
        "steps_per_epoch": problem.steps_per_epoch,
        "lr_milestone_epochs": milestones,
        "lr_gamma": task.lr_gamma,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "setup_seconds": setup_seconds,
        "versions": versions(),
        "rerun": rerun_command(spec, out, hparams),
        "status": "running",
    }
    if dp is not None:
        config["processes"] = dp.world_size
        config["rerun"] += f" --nproc {dp.world_size}"
    # Under the CPU clock (the protocol's), the optimizer's construction is inside the budget.
    pos = _Position(seconds=setup_seconds if spec.clock == "cpu" else 0.0)
    metrics_path, checkpoint_path = directory / METRICS, directory / CHECKPOINT
    if resume and _checkpoints(directory):
        saved = _check_resumable(directory, config)
        if saved.get("status") == "diverged":
            return RunResult(spec, directory, "diverged", error="diverged before; not resumed")
        pos = _restore_newest(_checkpoints(directory), module, optimizer)
        if not metrics_path.exists() or metrics_path.stat().st_size < pos.metrics_bytes:
            raise ResumeError(f"cannot resume {directory}: {METRICS} is missing or shorter than "
                              "its checkpoint says; drop --resume to start over")
        if main:
            with open(metrics_path, "r+b") as handle:
                handle.truncate(pos.metrics_bytes)
    elif main:
        directory.mkdir(parents=True, exist_ok=True)
        metrics_path.unlink(missing_ok=True)
        for old in _checkpoints(directory):
            old.unlink()
    if main:
        _write_json(directory / CONFIG, config)
    if dp is not None:
        dp.barrier()

    bar = _Progress(spec, task, problem.steps_per_epoch, pos, progress and main)
    try:
        with open(metrics_path if main else os.devnull, "a") as metrics:
            _training_mode(optimizer)
            loop = _Loop(spec, task, problem, model, optimizer, base_lrs, pos, metrics,
                         checkpoint_path, dp)
            status, last_eval = loop.train(bar, on_step)
    except Exception as error:
        config.update(status="failed", error=f"{type(error).__name__}: {error}")
        raise
    except BaseException:
        config.update(status="interrupted")
        raise
    else:
        config.update(status=status, steps=pos.step, seconds=pos.seconds)
    finally:
        bar.close()
        if main:
            try:
                _write_json(directory / CONFIG, config)
            except StorageError as error:  # keep the error that ended the run, if any
                print(f"warning: {error.strerror}", file=sys.stderr)
    return RunResult(spec, directory, status, pos.step, pos.seconds, last_eval)


class _Loop:
    """The training loop of one run, writing to its open metrics file."""

    def __init__(self, spec: RunSpec, task: Task, problem: Problem, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, base_lrs: list[float], pos: _Position,
                 metrics: IO[str], checkpoint_path: Path,
                 dp: parallel.DataParallel | None = None) -> None:
        self.spec, self.task, self.problem = spec, task, problem
        self.model, self.optimizer, self.pos = model, optimizer, pos
        # With several processes: ``model`` is the DDP wrapper, ``module`` the model itself.
        self.dp = dp
        inner = model.module if isinstance(model, DistributedDataParallel) else model
        self.module: torch.nn.Module = inner
        self.metrics, self.checkpoint_path = metrics, checkpoint_path
        self.milestones = _milestones(task, spec)
        self.base_lrs = base_lrs

    def write(self, line: dict[str, Any]) -> None:
        self.metrics.write(json.dumps({k: _finite(v) for k, v in line.items()}) + "\n")
        self.metrics.flush()

    def evaluate(self, final: bool = False) -> dict[str, Any]:
        """Write an evaluation line; its train_loss is the mean since the last evaluation.
        ``final``: the run's last evaluation (a text task adds its test loss there). Every
        process switches the optimizer to its evaluation mode around it (the replicas' weights
        stay equal)."""
        with optimizer_evaluation(self.optimizer):
            return self._evaluate(final)

    def _evaluate(self, final: bool) -> dict[str, Any]:
        pos = self.pos
        if self.dp is not None and not self.dp.main:  # rank 0 evaluates and writes
            pos.loss_sum, pos.loss_count, pos.last_eval_step = 0.0, 0, pos.step
            return {}
        line: dict[str, Any] = {
            "step": pos.step,
            "epoch": pos.epoch + pos.index / self.problem.steps_per_epoch,
            "seconds": pos.seconds,
            "train_loss": pos.loss_sum / max(pos.loss_count, 1),
            "lr": self.optimizer.param_groups[0]["lr"],
            **self.problem.evaluate(self.module, final=final),
            **optimizer_diagnostics(self.optimizer),
        }
        self.write(line)
        pos.loss_sum, pos.loss_count, pos.last_eval_step = 0.0, 0, pos.step
        return line

    def previous_eval(self) -> dict[str, Any]:
        """The last evaluation line already written (a resumed run), else {}."""
        if self.dp is not None and not self.dp.main:
            return {}
        self.metrics.flush()
        path = self.checkpoint_path.with_name(METRICS)
        for text in reversed(path.read_text().splitlines()):
            line: dict[str, Any] = json.loads(text)
            if any(k.endswith("_loss") and k != "train_loss" for k in line):
                return line
        return {}

    def checkpoint(self) -> None:
        if self.dp is not None:  # every rank: gather sharded optimizer state; rank 0 writes
            consolidate = getattr(self.optimizer, "consolidate_state_dict", None)
            if consolidate is not None:
                consolidate()
            if not self.dp.main:
                return
        self.pos.metrics_bytes = self.metrics.tell()
        _save(self.checkpoint_path, self.module, self.optimizer, self.pos)

    def _closure(self, batch: Any) -> Callable[[], torch.Tensor]:
        """The minibatch loss as a closure, for an optimizer that evaluates it itself
        (``needs_closure``: K-FAC's damping adaptation re-evaluates it, without gradients, after
        its update); the backward runs only when gradients are enabled."""

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.problem.loss(self.model, batch)
            if torch.is_grad_enabled():
                loss.backward()
            return loss

        return closure

    def step(self) -> tuple[float, float]:
        """One optimizer step at the current position; returns (loss, seconds it took)."""
        pos = self.pos
        factor = self.task.lr_gamma ** sum(pos.epoch >= m for m in self.milestones)
        if self.spec.schedule != "constant":
            progress = _progress(self.spec, self.task, pos, self.problem.steps_per_epoch)
            factor *= lr_factor(self.spec.schedule, progress, self.spec.warmup_fraction)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        clock = _clock(self.spec)
        start = clock()
        batch = self.problem.batch(pos.epoch, pos.index)
        if self.dp is not None:
            batch, _ = self.dp.shard(batch)
        loss: torch.Tensor
        if getattr(self.optimizer, "needs_closure", False):
            # torch types the closure as returning a float; ours returns the loss tensor
            loss = cast(torch.Tensor, self.optimizer.step(self._closure(batch)))  # type: ignore[arg-type]
        else:
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.problem.loss(self.model, batch)
            loss.backward()
            self.optimizer.step()
        value = float(loss.detach())  # waits for the step's kernels on an accelerator
        elapsed = clock() - start
        if self.dp is not None:  # the global mean loss and the slowest rank's time
            value, elapsed = self.dp.step_summary(value, batch[0].shape[0], elapsed)
        pos.seconds += elapsed
        pos.step += 1
        pos.index += 1
        return value, elapsed

    def train(self, bar: _Progress,
              on_step: Callable[[int], None] | None) -> tuple[str, dict[str, Any]]:
        """Step until the budget is spent or the loss turns non-finite."""
        spec, pos = self.spec, self.pos
        last_eval = self.previous_eval()
        last_checkpoint = time.monotonic()
        while not _stopped(spec, self.task, pos):
            value, elapsed = self.step()
            line = {"step": pos.step, "epoch": pos.epoch + pos.index / self.problem.steps_per_epoch,
                    "seconds": pos.seconds, "train_loss": value}
            if not math.isfinite(value):
                self.write({**line, "train_loss": None, "status": "diverged"})
                return "diverged", last_eval
            self.write(line)
            pos.loss_sum += value
            pos.loss_count += 1
            if pos.index == self.problem.steps_per_epoch:
                pos.epoch, pos.index = pos.epoch + 1, 0
            bar.update(elapsed, value)
            stopping = _stopped(spec, self.task, pos)
            if pos.index == 0 or stopping:
                last_eval = self.evaluate(final=stopping)
            due = (
                pos.step % spec.checkpoint_every_steps == 0
                if spec.checkpoint_every_steps
                else time.monotonic() - last_checkpoint >= spec.checkpoint_every
            )
            if self.dp is not None:  # clocks differ between processes: checkpoint together
                due = self.dp.agree(due)
            if due or stopping:
                self.checkpoint()
                last_checkpoint = time.monotonic()
            if on_step is not None:
                on_step(pos.step)
        if pos.last_eval_step != pos.step:  # resumed a run that had stopped before evaluating
            last_eval = self.evaluate(final=True)
            self.checkpoint()
        return "finished", last_eval


def _save(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
          pos: _Position) -> None:
    rng: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    payload = {
        "format": 1,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng,
        "position": dataclasses.asdict(pos),
    }
    _write_atomic(path, lambda handle: torch.save(payload, handle),
                  keep=path.with_name(PREVIOUS_CHECKPOINT))


def _numpy_random() -> Any:
    import numpy  # a dependency of the bench extra, imported where needed

    return numpy.random


def _numpy_rng_state() -> dict[str, Any]:
    """numpy's global generator state as tensors and numbers (a ``weights_only`` checkpoint
    holds no numpy arrays)."""
    kind, keys, pos, has_gauss, gauss = _numpy_random().get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_numpy_rng_state(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype("uint32")
    _numpy_random().set_state(
        (state["kind"], keys, state["pos"], state["has_gauss"], state["gauss"]))


def _restore(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> _Position:
    """Load a checkpoint into ``model`` and ``optimizer``; ``ResumeError`` with a short reason
    naming the file when it is damaged or does not fit."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ResumeError(f"cannot resume from {path}: the file is damaged or not a checkpoint "
                          f"({type(error).__name__})") from None
    try:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["rng"]["torch"])
        if "numpy" in payload["rng"]:  # checkpoints before 2026-12-07 lack it
            _set_numpy_rng_state(payload["rng"]["numpy"])
        if "cuda" in payload["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
        return _Position(**payload["position"])
    except Exception as error:
        first_line = (str(error).splitlines() or [""])[0]
        raise ResumeError(
            f"cannot resume from {path}: {type(error).__name__}: {first_line}"
        ) from None


def _restore_newest(paths: list[Path], model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> _Position:
    """Restore the newest checkpoint that loads; one that does not is named on stderr and the
    previous one is tried (the run then repeats the steps in between, exactly)."""
    errors = []
    for path in paths:
        try:
            return _restore(path, model, optimizer)
        except ResumeError as error:
            errors.append(str(error))
            if path is not paths[-1]:
                print(f"warning: {error}; trying the previous checkpoint", file=sys.stderr)
    raise ResumeError("; ".join(errors) + "; delete the run directory (or drop --resume) to "
                      "start over")


def run_many(
    specs: Iterable[RunSpec], out: Path, *, resume: bool = False, overwrite: bool = False,
    progress: bool = True,
) -> list[RunResult]:
    """Run each spec in turn. A diverged or crashed run is recorded and the others go on;
    missing data (:class:`DataError`), a run that cannot be resumed (:class:`ResumeError`) or
    would be overwritten (:class:`ExistingRunError`, checked for every spec before the first
    starts) stops everything with its message, since they need the user's attention."""
    specs = list(specs)
    if not parallel.launched():
        check_new_runs(specs, out, resume=resume, overwrite=overwrite)
    results = []
    for spec in specs:
        try:
            result = run(spec, out, resume=resume, overwrite=overwrite, progress=progress)
        except (DataError, ResumeError, ExistingRunError, StorageError):
            raise
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            result = RunResult(spec, run_directory(out, spec), "failed",
                               error=f"{type(error).__name__}: {error}")
        if result.status != "finished":
            print(f"{spec.task}/{spec.optimizer}/seed {spec.seed}: {result.status}"
                  + (f" ({result.error})" if result.error else ""), file=sys.stderr)
        results.append(result)
    return results
