"""The demo's training: the task, the network, the variants' fits and the printed report.

Imported by :mod:`lightning_relu.demo` when a command needs it (the command line itself imports neither torch nor
Lightning).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_relu.demo import DEFAULT_OUT, VARIANTS
from lightning_relu.initializer import ReluInitializer
from lightning_relu.monitor import CollapseWarning, DeadUnitMonitor, DyingWarning, EpochReport

__all__ = ["DemoResults", "DemoTask", "VariantResult", "format_report", "run_demo"]


@dataclass(frozen=True)
class DemoTask:
    """The synthetic regression and the network that learns it.

    Inputs are ``in_features`` standard Gaussian features; the target is a sum of sines of random projections of
    them, ``y = sum_j sin(2 (x W)_j / sqrt(d)) / sqrt(d)`` with ``W`` a fixed Gaussian ``d x d`` matrix (variance about
    0.9). The network has ``depth`` hidden layers of ``width`` ReLU units and a linear output; it is trained with SGD
    and momentum on the mean squared error.
    """

    depth: int = 12
    width: int = 8
    in_features: int = 2
    samples: int = 4096
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9

    def data(self, seed: int) -> TensorDataset:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(self.samples, self.in_features, generator=generator)
        w = torch.randn(self.in_features, self.in_features, generator=generator)
        scale = math.sqrt(self.in_features)
        y = torch.sin(2 * (x @ w) / scale).sum(dim=1) / scale
        return TensorDataset(x, y)


class DemoRegressor(pl.LightningModule):
    """A deep, narrow ReLU MLP with He-initialized layers, regressing a scalar with SGD and momentum."""

    def __init__(
        self, depth: int = 12, width: int = 8, in_features: int = 2, lr: float = 0.05, momentum: float = 0.9
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
        self.epoch_losses: list[float] = []
        self._loss_sum = torch.zeros(())
        self._loss_count = 0

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self._loss_sum = self._loss_sum.to(loss.device) + loss.detach() * len(y)
        self._loss_count += len(y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    @property
    def running_loss(self) -> float:
        """Mean training loss over the epoch so far (NaN before the first step)."""
        return float(self._loss_sum) / self._loss_count if self._loss_count else math.nan

    @override
    def on_train_epoch_start(self) -> None:
        self._loss_sum = torch.zeros((), device=self.device)
        self._loss_count = 0

    @override
    def on_train_epoch_end(self) -> None:
        self.epoch_losses.append(self.running_loss)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


@dataclass
class VariantResult:
    """What one variant's fit produced: the monitor's reports, losses and what its callbacks did."""

    name: str
    log_dir: str
    history: list[EpochReport]
    losses: list[float]
    seconds: float
    flipped_sites: int | None = None
    rai_layers: int | None = None
    revived_units: int | None = None
    collapse_epochs: dict[str, int] = field(default_factory=dict)

    @property
    def sites(self) -> list[str]:
        return list(self.history[0].layers) if self.history else []

    @property
    def dead_first(self) -> float:
        """Dead share of all units at the first epoch."""
        return self.history[0].dead_fraction

    @property
    def dead_last(self) -> float:
        """Dead share of all units at the last epoch."""
        return self.history[-1].dead_fraction

    @property
    def dead_total(self) -> list[tuple[int, float]]:
        """``(global_step, dead share of all units)`` per epoch: what ``dead_units/total`` logged."""
        return [(report.global_step, report.dead_fraction) for report in self.history]

    @property
    def collapsed_at_end(self) -> list[str]:
        """Sites whose every unit was dead in the last epoch."""
        return [name for name, layer in self.history[-1].layers.items() if layer.seen and layer.collapsed]

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else math.nan


@dataclass
class DemoResults:
    """The demo's results, one :class:`VariantResult` per variant, in training order."""

    out_dir: str
    task: DemoTask
    seed: int
    epochs: int
    target_variance: float
    variants: dict[str, VariantResult]
    seconds: float


class _Progress(pl.Callback):
    """Prints a line per reported epoch (a few per fit) and remembers when sites collapse."""

    def __init__(self, name: str, monitor: DeadUnitMonitor, epochs: int, write: Callable[[str], None]) -> None:
        self.name = name
        self.monitor = monitor
        self.epochs = epochs
        self.write = write
        self.every = max(1, math.ceil(epochs / 5))
        self.collapse_epochs: dict[str, int] = {}

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.monitor.history:
            return
        report = self.monitor.history[-1]
        new = [
            name
            for name, layer in report.layers.items()
            if layer.seen and layer.collapsed and name not in self.collapse_epochs
        ]
        for name in new:
            self.collapse_epochs[name] = report.epoch
        epoch = report.epoch
        if new or epoch % self.every == 0 or epoch == self.epochs - 1:
            loss = pl_module.running_loss if isinstance(pl_module, DemoRegressor) else math.nan
            line = (
                f"  [{self.name}] epoch {epoch + 1:>3}/{self.epochs}  loss {loss:.4f}  dead units "
                f"{report.total_dead:>3}/{report.total_units} ({report.dead_fraction:.0%})"
            )
            if new:
                line += f"  collapsed: {', '.join(new)}"
            self.write(line)


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


def _fit_variant(
    name: str, task: DemoTask, seed: int, epochs: int, out_dir: str, write: Callable[[str], None]
) -> VariantResult:
    pl.seed_everything(seed, verbose=False)
    model = DemoRegressor(task.depth, task.width, task.in_features, task.lr, task.momentum)
    loader = DataLoader(task.data(seed), batch_size=task.batch_size, shuffle=True)
    monitor, callbacks = _variant_callbacks(name, seed)
    progress = _Progress(name, monitor, epochs, write)
    logger = TensorBoardLogger(out_dir, name=name, default_hp_metric=False)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[*callbacks, progress],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=max(1, math.ceil(task.samples / task.batch_size)),
    )
    start = time.perf_counter()
    trainer.fit(model, loader)
    seconds = time.perf_counter() - start
    logger.experiment.flush()
    result = VariantResult(
        name=name,
        log_dir=os.path.abspath(logger.log_dir),
        history=list(monitor.history),
        losses=list(model.epoch_losses),
        seconds=seconds,
        collapse_epochs=dict(progress.collapse_epochs),
    )
    for callback in callbacks:
        if isinstance(callback, ReluInitializer):
            if callback.uses_sign_flip:
                result.flipped_sites = sum(report.flipped for report in callback.report.values())
            if callback.uses_rai:
                result.rai_layers = len(callback.rai_layers)
    revived = monitor.revived_totals()
    if revived is not None:
        result.revived_units = sum(revived.values())
    return result


def run_demo(
    epochs: int | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike[str] = DEFAULT_OUT,
    *,
    quick: bool = False,
    task: DemoTask | None = None,
    variants: Sequence[str] | None = None,
    write: Callable[[str], None] | None = print,
) -> DemoResults:
    """Train the demo network once per variant and return what the monitors reported.

    Args:
        epochs: training epochs per variant (default: 20, or 3 with ``quick``).
        seed: seed of the data, the He initialization, the batch order and the RAI draw; every variant uses it.
        out_dir: TensorBoard logs go to ``<out_dir>/<variant>/version_<n>``.
        quick: a smoke run of a few seconds (512 samples, 3 epochs), for tests.
        task: the regression and network (default: :class:`DemoTask`, or its quick version).
        variants: names from :data:`VARIANTS` to train (default: all, in that order).
        write: where progress lines go (``None``: nowhere).
    """
    if epochs is None:
        epochs = 3 if quick else 20
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"`epochs` must be a positive integer, got {epochs!r}")
    if task is None:
        task = DemoTask(samples=512) if quick else DemoTask()
    names = list(VARIANTS) if variants is None else list(variants)
    for name in names:
        if name not in VARIANTS:
            raise ValueError(f"`variants` can hold {', '.join(map(repr, VARIANTS))}, got {name!r}")
    emit: Callable[[str], None] = write if write is not None else (lambda line: None)
    out = os.path.abspath(os.fspath(out_dir))
    target_variance = float(task.data(seed).tensors[1].var())
    start = time.perf_counter()
    results: dict[str, VariantResult] = {}
    with _demo_environment():
        for name in names:
            emit(f"{name}: {VARIANTS[name]}")
            results[name] = _fit_variant(name, task, seed, epochs, out, emit)
    return DemoResults(
        out_dir=out,
        task=task,
        seed=seed,
        epochs=epochs,
        target_variance=target_variance,
        variants=results,
        seconds=time.perf_counter() - start,
    )


@contextlib.contextmanager
def _demo_environment() -> Iterator[None]:
    """One intra-op thread; Lightning's banner lines and the warnings the demo reports itself silenced.

    The layers are 8 units wide: a second thread only adds synchronization, and on a machine whose cores are busy
    the spin-waiting of two threads makes each step tens of times slower.
    """
    threads = torch.get_num_threads()
    loggers = ("lightning.pytorch", "lightning.fabric", "lightning_relu")
    levels = {name: logging.getLogger(name).level for name in loggers}
    try:
        torch.set_num_threads(1)
        for name in levels:
            logging.getLogger(name).setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CollapseWarning)
            warnings.simplefilter("ignore", DyingWarning)
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*GPU available but not used.*")
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated.*")
            yield
    finally:
        torch.set_num_threads(threads)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


# ------------------------------------------------------------------------------------------------------ output
def _share(layer: Any) -> str:
    return f"{layer.num_dead}/{layer.num_units}" if layer.seen else "-"


def format_layer_table(results: DemoResults) -> str:
    """Dead units per layer (rows) and variant (columns), at the first and the last epoch."""
    variants = list(results.variants.values())
    if not variants:
        return ""
    sites = variants[0].sites
    first, last = 1, results.epochs
    columns = [f"{v.name} ({first}→{last})" for v in variants]
    cells = [
        [f"{_share(v.history[0].layers[site])} → {_share(v.history[-1].layers[site])}" for v in variants]
        for site in sites
    ]
    totals = [f"{v.dead_first:.0%} → {v.dead_last:.0%}" for v in variants]
    site_w = max(len("layer"), *(len(s) for s in sites))
    widths = [max(len(c), *(len(row[i]) for row in [*cells, totals])) for i, c in enumerate(columns)]
    lines = [
        "layer".ljust(site_w) + "  " + "  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)),
    ]
    lines.append("-" * len(lines[0]))
    for site, row in zip(sites, cells, strict=True):
        lines.append(site.ljust(site_w) + "  " + "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    lines.append("-" * len(lines[0]))
    lines.append("all".ljust(site_w) + "  " + "  ".join(c.rjust(w) for c, w in zip(totals, widths, strict=True)))
    return "\n".join(lines)


def _note(result: VariantResult) -> str:
    notes = []
    if result.rai_layers is not None:
        notes.append(f"{result.rai_layers} layers RAI-initialized")
    if result.flipped_sites is not None:
        notes.append(f"{result.flipped_sites} of {len(result.sites)} sites flipped")
    if result.revived_units is not None:
        notes.append(f"{result.revived_units} units revived")
    return ", ".join(notes)


def format_summary(results: DemoResults) -> str:
    """One line per variant: dead share at the first and last epoch, collapsed sites, final loss."""
    header = ["variant", "dead, first epoch", "dead, last epoch", "collapsed (first epoch)", "final loss", "note"]
    rows = []
    for r in results.variants.values():
        if r.collapse_epochs:
            first_epoch = min(r.collapse_epochs.values())
            collapsed = f"{len(r.collapse_epochs)} sites ({first_epoch + 1})"
            if len(r.collapsed_at_end) != len(r.collapse_epochs):
                collapsed += f", {len(r.collapsed_at_end)} at end"
        else:
            collapsed = "none"
        rows.append(
            [
                r.name,
                f"{r.history[0].total_dead}/{r.history[0].total_units} ({r.dead_first:.0%})",
                f"{r.history[-1].total_dead}/{r.history[-1].total_units} ({r.dead_last:.0%})",
                collapsed,
                f"{r.final_loss:.4f}",
                _note(r),
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in (0, len(cells) - 1) else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), "-" * len(line(header)), *(line(row) for row in rows)])


def format_report(results: DemoResults) -> str:
    task = results.task
    return "\n".join(
        [
            "",
            f"Dead units per ReLU layer (dead/units), epoch 1 → epoch {results.epochs}:",
            "",
            format_layer_table(results),
            "",
            f"Per variant (final loss: mean squared error over the last epoch; a constant predictor scores "
            f"{results.target_variance:.3f}):",
            "",
            format_summary(results),
            "",
            f"{task.depth} layers × {task.width} ReLU units, {task.samples} samples, SGD lr={task.lr} "
            f"momentum={task.momentum}, seed {results.seed}; {results.seconds:.0f} s.",
            "",
            "See it in TensorBoard (one run per variant; Custom Scalars, Images: the dead-unit heatmap):",
            "",
            f"    tensorboard --logdir {results.out_dir}",
        ]
    )


