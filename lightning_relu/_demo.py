"""The demo's training: the task, the network, the fits of every variant and seed, and the printed report.

Imported by :mod:`lightning_relu.demo` when a command needs it (the command line itself imports neither torch nor
Lightning).

The setting is the one where death measurably hurts (Lu et al. 2020): a deep (10 layers), narrow (4 units) ReLU
network on a one-dimensional regression. With He initialization such a network is often born with a layer whose
every unit is dead, or loses one while training; then it outputs a constant. Each variant trains the same
networks (same seeds: same He weights before any remedy, same batches), so the table compares like with like.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_relu._demo_options import DEFAULT_OUT, VARIANTS
from lightning_relu.initializer import ReluInitializer
from lightning_relu.monitor import CollapseWarning, DeadUnitMonitor, DyingWarning, EpochReport
from lightning_relu.revive import RevivalWarning

__all__ = ["DemoRegressor", "DemoResults", "DemoTask", "VariantResult", "format_report", "run_demo"]

#: Seeds of the full run and of ``--quick``.
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
QUICK_SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class DemoTask:
    """The regression and the network that learns it.

    Inputs are ``in_features`` features uniform in [-1, 1]; with ``u = x·v`` for a fixed unit vector ``v`` (``u = ±x``
    in one dimension) the target is ``sin(3u) + |u|``, standardized to mean 0 and variance 1, so a constant predictor
    scores a mean squared error of 1. The data are drawn from ``data_seed``: every seed of the demo sees the same
    data. The network has ``depth`` hidden layers of ``width`` ReLU units and a linear output, trained with Adam
    (``momentum`` is its β₁) on the mean squared error.
    """

    depth: int = 10
    width: int = 4
    in_features: int = 1
    samples: int = 1024
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    data_seed: int = 1234

    def data(self, seed: int | None = None) -> TensorDataset:
        """The task's ``(x, y)`` pairs (drawn from ``seed`` instead of ``data_seed`` when given)."""
        generator = torch.Generator().manual_seed(self.data_seed if seed is None else seed)
        x = torch.rand(self.samples, self.in_features, generator=generator) * 2 - 1
        direction = torch.randn(self.in_features, generator=generator)
        u = x @ (direction / direction.norm())
        y = torch.sin(3 * u) + u.abs()
        return TensorDataset(x, (y - y.mean()) / y.std())


class DemoRegressor(pl.LightningModule):
    """A deep, narrow ReLU MLP with He-initialized layers (zero biases), regressing a scalar with Adam."""

    def __init__(
        self, depth: int = 10, width: int = 4, in_features: int = 1, lr: float = 0.01, momentum: float = 0.9
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        fan_in = in_features
        for _ in range(depth):
            linear = nn.Linear(fan_in, width)
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
            layers += [linear, nn.ReLU()]
            fan_in = width
        layers.append(nn.Linear(fan_in, 1))
        self.net = nn.Sequential(*layers)

    @override
    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x).squeeze(-1)
        return out

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"], betas=(self.hparams["momentum"], 0.999))


@dataclass
class VariantResult:
    """What one fit (one variant, one seed) produced: the monitor's reports, the loss, what the callbacks did."""

    name: str
    seed: int
    log_dir: str
    history: list[EpochReport]
    final_loss: float
    seconds: float
    flipped_sites: int | None = None
    revived_units: int | None = None

    @property
    def sites(self) -> list[str]:
        return list(self.history[0].layers) if self.history else []

    @property
    def dead_first(self) -> float:
        """Dead share of all units in the first epoch (epoch 0)."""
        return self.history[0].dead_fraction

    @property
    def dead_last(self) -> float:
        """Dead share of all units in the last epoch."""
        return self.history[-1].dead_fraction

    @property
    def dead_total(self) -> list[tuple[int, float]]:
        """``(epoch, dead share of all units)`` per epoch: what ``dead_units/total`` logged."""
        return [(report.epoch, report.dead_fraction) for report in self.history]

    @staticmethod
    def _collapsed(report: EpochReport) -> list[str]:
        return [name for name, layer in report.layers.items() if layer.seen and layer.collapsed]

    @property
    def collapsed_first(self) -> list[str]:
        """Sites whose every unit was dead in the first epoch: the network was born (or soon) constant."""
        return self._collapsed(self.history[0])

    @property
    def collapsed_at_end(self) -> list[str]:
        """Sites whose every unit was dead in the last epoch: the network ends as a constant function."""
        return self._collapsed(self.history[-1])


@dataclass
class DemoResults:
    """The demo's results: for each variant, one :class:`VariantResult` per seed."""

    out_dir: str
    task: DemoTask
    seeds: list[int]
    epochs: int
    target_variance: float
    variants: dict[str, list[VariantResult]]
    seconds: float
    load_average: float | None = None
    cpus: int | None = None


def _variant_callbacks(name: str, seed: int) -> tuple[DeadUnitMonitor, list[pl.Callback]]:
    if name == "he":
        monitor = DeadUnitMonitor(print_summary=False)
        return monitor, [monitor]
    if name == "rai":
        monitor = DeadUnitMonitor(print_summary=False)
        return monitor, [ReluInitializer("rai", seed=seed), monitor]
    if name == "sign_flip":
        monitor = DeadUnitMonitor(print_summary=False)
        return monitor, [ReluInitializer("sign_flip"), monitor]
    if name == "he_revival":
        monitor = DeadUnitMonitor(revive=True, print_summary=False)
        return monitor, [monitor]
    raise ValueError(f"`variants` can hold {', '.join(map(repr, VARIANTS))}, got {name!r}")


def _fit_variant(name: str, task: DemoTask, seed: int, epochs: int, out_dir: str) -> VariantResult:
    data = task.data()
    pl.seed_everything(seed, verbose=False)
    model = DemoRegressor(task.depth, task.width, task.in_features, task.lr, task.momentum)
    loader = DataLoader(data, batch_size=task.batch_size, shuffle=True)
    monitor, callbacks = _variant_callbacks(name, seed)
    logger = TensorBoardLogger(out_dir, name=name, version=f"seed_{seed}", default_hp_metric=False)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=True,  # the last epoch's checkpoint, for `lightning-relu compact`
        log_every_n_steps=max(1, math.ceil(task.samples / task.batch_size)),
    )
    start = time.perf_counter()
    trainer.fit(model, loader)
    seconds = time.perf_counter() - start
    logger.experiment.flush()
    x, y = data.tensors
    model.eval()
    with torch.no_grad():
        final_loss = float(nn.functional.mse_loss(model(x), y))
    result = VariantResult(
        name=name,
        seed=seed,
        log_dir=os.path.abspath(logger.log_dir),
        history=list(monitor.history),
        final_loss=final_loss,
        seconds=seconds,
    )
    for callback in callbacks:
        if isinstance(callback, ReluInitializer) and callback.uses_sign_flip:
            result.flipped_sites = sum(report.flipped for report in callback.report.values())
    revived = monitor.revived_totals()
    if revived is not None:
        result.revived_units = sum(revived.values())
    return result


class _ProgressBar:
    """One bar over all the fits, redrawn in place on a terminal, a line per fit elsewhere."""

    def __init__(self, total: int, write: Callable[[str], None]) -> None:
        self.total = total
        self.done = 0
        self.write = write
        self.start = time.perf_counter()
        self.tty = write is print and bool(getattr(sys.stdout, "isatty", lambda: False)())

    def step(self, result: VariantResult) -> None:
        self.done += 1
        width = 24
        filled = round(width * self.done / self.total)
        collapsed = "  collapsed" if result.collapsed_at_end else ""
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {self.done:>2}/{self.total} fits, "
            f"{time.perf_counter() - self.start:4.0f} s  {result.name:<10} seed {result.seed}: dead units "
            f"{result.dead_first:4.0%} → {result.dead_last:4.0%}, loss {result.final_loss:.3f}{collapsed}"
        )
        if self.tty:
            end = "\n" if self.done == self.total else ""
            print("\r" + line.ljust(110), end=end, flush=True)
        else:
            self.write(line)


def run_demo(
    epochs: int | None = None,
    seeds: Sequence[int] | None = None,
    out_dir: str | os.PathLike[str] = DEFAULT_OUT,
    *,
    quick: bool = False,
    task: DemoTask | None = None,
    variants: Sequence[str] | None = None,
    write: Callable[[str], None] | None = print,
) -> DemoResults:
    """Train the demo network once per variant and seed, and return what the monitors reported.

    Args:
        epochs: training epochs per fit (default: 8, or 4 with ``quick``); epochs are numbered from 0, as in
            Lightning.
        seeds: seeds of the He initialization, the batch order and the RAI draw (default: 0–4, or 0–2 with
            ``quick``); every variant trains every seed.
        out_dir: TensorBoard logs go to ``<out_dir>/<variant>/seed_<seed>``.
        quick: a shorter run telling the same story (512 samples, 4 epochs, 3 seeds).
        task: the regression and network (default: :class:`DemoTask`, or its quick version).
        variants: names from :data:`~lightning_relu.demo.VARIANTS` to train (default: all, in that order).
        write: where progress lines go (``None``: nowhere).
    """
    if epochs is None:
        epochs = 4 if quick else 8
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"`epochs` must be a positive integer, got {epochs!r}")
    seed_list = list(QUICK_SEEDS if quick else DEFAULT_SEEDS) if seeds is None else list(seeds)
    if not seed_list or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seed_list):
        raise ValueError(f"`seeds` must be non-negative integers, at least one, got {seeds!r}")
    if task is None:
        task = DemoTask(samples=512) if quick else DemoTask()
    names = list(VARIANTS) if variants is None else list(variants)
    for name in names:
        if name not in VARIANTS:
            raise ValueError(f"`variants` can hold {', '.join(map(repr, VARIANTS))}, got {name!r}")
    out = os.path.abspath(os.fspath(out_dir))
    target_variance = float(task.data().tensors[1].var())
    start = time.perf_counter()
    results: dict[str, list[VariantResult]] = {name: [] for name in names}
    progress = _ProgressBar(len(names) * len(seed_list), write) if write is not None else None
    with _demo_environment():
        for seed in seed_list:
            for name in names:
                result = _fit_variant(name, task, seed, epochs, out)
                results[name].append(result)
                if progress is not None:
                    progress.step(result)
    load = os.getloadavg()[1] if hasattr(os, "getloadavg") else None
    return DemoResults(
        out_dir=out,
        task=task,
        seeds=seed_list,
        epochs=epochs,
        target_variance=target_variance,
        variants=results,
        seconds=time.perf_counter() - start,
        load_average=load,
        cpus=os.cpu_count(),
    )


@contextlib.contextmanager
def _demo_environment() -> Iterator[None]:
    """One intra-op thread; Lightning's banner lines and the warnings the demo reports itself silenced.

    The layers are 4 units wide: a second thread only adds synchronization, and on a machine whose cores are busy
    the spin-waiting of two threads makes each step much slower.
    """
    threads = torch.get_num_threads()
    loggers = ("lightning.pytorch", "lightning.fabric", "lightning_relu")
    levels = {name: logging.getLogger(name).level for name in loggers}
    try:
        torch.set_num_threads(1)
        for name in levels:
            logging.getLogger(name).setLevel(logging.WARNING)
        with warnings.catch_warnings():
            for category in (CollapseWarning, DyingWarning, RevivalWarning):
                warnings.simplefilter("ignore", category)
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*GPU available but not used.*")
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated.*")
            yield
    finally:
        torch.set_num_threads(threads)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


# ------------------------------------------------------------------------------------------------------ output
def _range(values: Sequence[float], text: Callable[[float], str]) -> str:
    return f"{text(min(values))}–{text(max(values))}" if len(values) > 1 else text(values[0])


def _verdict(runs: list[VariantResult], baseline: list[VariantResult], tolerance: float) -> str:
    """Plain words: did the variant end with fewer collapsed networks or a lower loss than the baseline?"""
    collapsed, base_collapsed = (sum(bool(r.collapsed_at_end) for r in rs) for rs in (runs, baseline))
    loss, base_loss = (statistics.fmean(r.final_loss for r in rs) for rs in (runs, baseline))
    better = collapsed < base_collapsed or loss < base_loss - tolerance
    worse = collapsed > base_collapsed or loss > base_loss + tolerance
    if better and not worse:
        return "helped"
    if worse and not better:
        return "did worse than He"
    if better and worse:
        return "mixed: fewer collapses but a higher loss, or the reverse"
    return "no clear difference from He in this run"


def format_summary(results: DemoResults) -> str:
    """One row per variant over the seeds: collapsed networks, dead share, final loss (mean and range)."""
    n = len(results.seeds)
    header = [
        "variant",
        "collapsed, epoch 0",
        "collapsed, last epoch",
        "dead units, last epoch",
        "final loss: mean (range)",
        "what the remedy did",
    ]
    rows = []
    for name, runs in results.variants.items():
        notes = []
        flips = [r.flipped_sites for r in runs if r.flipped_sites is not None]
        if flips:
            notes.append(f"flipped {sum(flips) / len(flips):.1f} layers per net")
        revived = [r.revived_units for r in runs if r.revived_units is not None]
        if revived:
            notes.append(f"revived {sum(revived) / len(revived):.0f} units per net")
        if name == "rai":
            notes.append("re-drew every layer feeding a ReLU")
        dead = [r.dead_last for r in runs]
        losses = [r.final_loss for r in runs]
        rows.append(
            [
                name,
                f"{sum(bool(r.collapsed_first) for r in runs)} of {n}",
                f"{sum(bool(r.collapsed_at_end) for r in runs)} of {n}",
                f"{statistics.fmean(dead):.0%} ({_range(dead, lambda v: f'{v:.0%}')})",
                f"{statistics.fmean(losses):.3f} ({_range(losses, lambda v: f'{v:.3f}')})",
                ", ".join(notes) or "-",
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in (0, len(cells) - 1) else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), "-" * len(line(header)), *(line(row) for row in rows)])


def format_story(results: DemoResults) -> str:
    """What happened, in plain words: one sentence per variant, each remedy compared with He."""
    n = len(results.seeds)
    variance = results.target_variance
    lines = []
    baseline = results.variants.get("he")
    for name, runs in results.variants.items():
        at_end = sum(bool(r.collapsed_at_end) for r in runs)
        at_start = sum(bool(r.collapsed_first) for r in runs)
        loss = statistics.fmean(r.final_loss for r in runs)
        if name == "he":
            lines.append(
                f"- he: {at_end} of {n} networks ended collapsed ({at_start} of {n} already in epoch 0); "
                f"mean final loss {loss:.3f}."
            )
            continue
        sentence = f"- {name}: {at_end} of {n} ended collapsed, mean final loss {loss:.3f}"
        if baseline is not None:
            base_end = sum(bool(r.collapsed_at_end) for r in baseline)
            base_start = sum(bool(r.collapsed_first) for r in baseline)
            base_loss = statistics.fmean(r.final_loss for r in baseline)
            verdict = _verdict(runs, baseline, tolerance=0.1 * variance)
            sentence += f" (He: {base_end} of {n}, {base_loss:.3f}): {verdict}."
            if at_start < base_start and at_end >= base_end:
                sentence += (
                    f" It kept the networks alive at the start ({at_start} of {n} collapsed in epoch 0, He "
                    f"{base_start}), but training killed whole layers later."
                )
        else:
            sentence += "."
        lines.append(sentence)
    lines.append(
        f"Collapsed: some layer had every unit dead for a whole epoch, so the network output a constant, which scores "
        f"a loss of {variance:.2f} (the variance of the targets); a loss near 0 is a network that learned the curve."
    )
    return "\n".join(lines)


def format_report(results: DemoResults) -> str:
    task = results.task
    machine = f"{results.cpus} CPU cores" if results.cpus else "this machine"
    load = (
        f"; load average {results.load_average:.1f} while it ran"
        + (" (other processes shared the CPU)" if results.cpus and results.load_average > results.cpus else "")
        if results.load_average is not None
        else ""
    )
    return "\n".join(
        [
            "",
            f"{task.depth} ReLU layers × {task.width} units, {task.samples} samples, Adam lr={task.lr}, "
            f"{results.epochs} epochs (0–{results.epochs - 1}), seeds {', '.join(map(str, results.seeds))}: "
            f"{len(results.seeds)} networks per variant, the same He weights and batches for every variant.",
            "",
            format_summary(results),
            "",
            "What happened:",
            format_story(results),
            "",
            f"{results.seconds:.0f} s on {machine}{load}.",
            "",
            "See it in TensorBoard (one run per variant and seed: dead units per layer over the epochs, the heatmap):",
            "",
            f"    tensorboard --logdir {results.out_dir}",
        ]
    )
