"""Does reviving dead units help? Dead fraction per epoch and final training loss with and without revival.

The setup makes many units die: a 4×32 ReLU MLP regresses a smooth function of 16 Gaussian inputs with SGD
(momentum 0.9) at a large learning rate (0.3) for the first two epochs, then at 0.03 (a step schedule whose first
phase is too aggressive). During the large-learning-rate phase whole groups of units are pushed into the region
where they never fire again; without revival they stay dead for the rest of training, often a whole layer
(the network then computes a constant). With :class:`~lightning_relu.revive.DeadUnitReviver` they are
re-initialized after each epoch, the network's function is unchanged at that moment, and they learn again once
the learning rate is sane.

Both runs of a seed start from the same weights and see the same batches; the dead fractions come from
:class:`~lightning_relu.monitor.DeadUnitMonitor` (measured during each epoch, before that epoch's revival); the final
loss is the mean squared error over the whole training set after the fit.

A third run per seed, the *reference*, trains at the sane learning rate from the start without revival: the loss a
healthy network reaches in the same number of epochs.

Run ``python examples/revival.py`` (full: 8 seeds × 24 epochs, about a minute on 2 CPU cores) or ``--quick`` (a
smoke run of a few seconds, without the reference).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_relu.monitor import DeadUnitMonitor
from lightning_relu.revive import DeadUnitReviver


@dataclass
class Config:
    seeds: int = 8
    epochs: int = 24
    samples: int = 4096
    inputs: int = 16
    width: int = 32
    depth: int = 4
    batch_size: int = 64
    lr_high: float = 0.3
    high_epochs: int = 2
    lr: float = 0.03
    momentum: float = 0.9


ARMS = ("no revival", "revival", "reference")  # reference: no large-learning-rate phase, no revival


@dataclass
class RunResult:
    seed: int
    arm: str
    dead_fraction: list[float] = field(default_factory=list)  # per epoch, all sites together
    revived: list[int] = field(default_factory=list)  # per epoch, units revived after it
    final_loss: float = math.nan
    seconds: float = 0.0


def make_data(config: Config) -> TensorDataset:
    """``y = Σ_k sin(a_k · x / 2)`` over 4 random directions: variance ≈ 1.9, the same task for every seed."""
    generator = torch.Generator().manual_seed(1000)
    x = torch.randn(config.samples, config.inputs, generator=generator)
    directions = torch.randn(config.inputs, 4, generator=generator)
    y = torch.sin(x @ directions / 2).sum(dim=1, keepdim=True)
    return TensorDataset(x, y)


class Regressor(pl.LightningModule):
    """An MLP trained with SGD + momentum and a step schedule whose first phase is too aggressive."""

    def __init__(self, config: Config, spike: bool = True) -> None:
        super().__init__()
        self.config = config
        self.spike = spike
        layers: list[nn.Module] = []
        width = config.inputs
        for _ in range(config.depth):
            layers += [nn.Linear(width, config.width), nn.ReLU()]
            width = config.width
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> dict[str, object]:
        config = self.config
        lr_high = config.lr_high if self.spike else config.lr
        optimizer = torch.optim.SGD(self.parameters(), lr=lr_high, momentum=config.momentum)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=[config.high_epochs], gamma=config.lr / lr_high
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def run(config: Config, data: TensorDataset, seed: int, arm: str) -> RunResult:
    start = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    model = Regressor(config, spike=arm != "reference")
    monitor = DeadUnitMonitor(log_histograms=False)
    callbacks: list[pl.Callback] = [monitor]
    reviver = DeadUnitReviver(seed=seed) if arm == "revival" else None
    if reviver is not None:
        callbacks.append(reviver)
    trainer = pl.Trainer(
        max_epochs=config.epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    loader = DataLoader(data, batch_size=config.batch_size, shuffle=True)
    trainer.fit(model, loader)
    x, y = data.tensors
    with torch.no_grad():
        final_loss = nn.functional.mse_loss(model(x), y).item()
    revived = [0] * config.epochs
    for entry in reviver.history if reviver is not None else []:
        revived[entry["epoch"]] = sum(entry["revived"].values())
    return RunResult(
        seed=seed,
        arm=arm,
        dead_fraction=[report.dead_fraction for report in monitor.history],
        revived=revived,
        final_loss=final_loss,
        seconds=time.perf_counter() - start,
    )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _std(values: Sequence[float]) -> float:
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))


def markdown(config: Config, results: list[RunResult], variance: float) -> str:
    """Two markdown tables: dead fraction per epoch (mean over seeds), and final loss per seed."""
    arms = {arm: [r for r in results if r.arm == arm] for arm in ARMS}
    plain, revived, reference = arms["no revival"], arms["revival"], arms["reference"]
    ref_head, ref_rule = (" dead, reference |", "---:|") if reference else ("", "")
    lines = [
        f"Dead units (share of all {config.depth * config.width} units, mean over {len(plain)} seeds; learning rate "
        f"{config.lr_high} for epochs 0-{config.high_epochs - 1}, then {config.lr}):",
        "",
        f"| epoch | lr | dead, no revival | dead, revival | units revived after the epoch (mean) |{ref_head}",
        f"|---:|---:|---:|---:|---:|{ref_rule}",
    ]
    for epoch in range(config.epochs):
        lr = config.lr_high if epoch < config.high_epochs else config.lr
        ref = f" {_mean([r.dead_fraction[epoch] for r in reference]):.3f} |" if reference else ""
        lines.append(
            f"| {epoch} | {lr:g} | {_mean([r.dead_fraction[epoch] for r in plain]):.3f} "
            f"| {_mean([r.dead_fraction[epoch] for r in revived]):.3f} "
            f"| {_mean([r.revived[epoch] for r in revived]):.1f} |{ref}"
        )
    lines += [
        "",
        f"Final training loss (MSE over the training set; the target's variance is {variance:.3f}):",
        "",
        "| seed | loss, no revival | loss, revival | dead at last epoch, no revival | dead at last epoch, revival |"
        + (" loss, reference |" if reference else ""),
        "|---:|---:|---:|---:|---:|" + ("---:|" if reference else ""),
    ]
    for i, (a, b) in enumerate(zip(plain, revived, strict=True)):
        ref = f" {reference[i].final_loss:.4f} |" if reference else ""
        lines.append(
            f"| {a.seed} | {a.final_loss:.4f} | {b.final_loss:.4f} "
            f"| {a.dead_fraction[-1]:.3f} | {b.dead_fraction[-1]:.3f} |{ref}"
        )

    def loss(runs: list[RunResult]) -> str:
        losses = [r.final_loss for r in runs]
        return f"{_mean(losses):.4f} ± {_std(losses):.4f}"

    ref = f" {loss(reference)} |" if reference else ""
    lines.append(
        f"| mean ± std | {loss(plain)} | {loss(revived)} "
        f"| {_mean([r.dead_fraction[-1] for r in plain]):.3f} "
        f"| {_mean([r.dead_fraction[-1] for r in revived]):.3f} |{ref}"
    )
    if reference:
        lines += ["", f"Reference: the same runs with learning rate {config.lr} from the start and no revival."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[RunResult]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 seeds, 5 epochs, 1024 samples")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 8; 2 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 24; 5 with --quick)")
    args = parser.parse_args(argv)
    config = Config(seeds=2, epochs=5, samples=1024) if args.quick else Config()
    if args.seeds is not None:
        config.seeds = args.seeds
    if args.epochs is not None:
        config.epochs = args.epochs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threading costs more than it brings
    lightning_logger = logging.getLogger("lightning.pytorch")
    level = lightning_logger.level
    lightning_logger.setLevel(logging.WARNING)
    start = time.perf_counter()
    try:
        data = make_data(config)
        results = []
        with warnings.catch_warnings():
            # collapse warnings are the point of the no-revival runs; dataloader advice is irrelevant here
            warnings.simplefilter("ignore")
            for seed in range(config.seeds):
                for arm in ARMS if not args.quick else ARMS[:2]:
                    results.append(run(config, data, seed, arm))
    finally:
        torch.set_num_threads(threads)
        lightning_logger.setLevel(level)
    variance = float(data.tensors[1].var())
    print(markdown(config, results, variance))
    print(
        f"\n{config.seeds} seeds × {len(results) // config.seeds} runs × {config.epochs} epochs of "
        f"{config.samples // config.batch_size} steps "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return results


if __name__ == "__main__":
    main()
