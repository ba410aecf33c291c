"""Train a deep, narrow ReLU network with `DeadUnitMonitor` and watch its units die in TensorBoard.

    python examples/quickstart.py [--epochs 8] [--depth 10] [--width 16] [--out lightning_logs]

The task is a regression whose targets have a small standard deviation, trained with SGD and heavy
momentum: a set-up known to drive ReLU units into a region where they never fire again. The monitor
counts, for every ReLU layer and every epoch, the units that output 0 on every training sample.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_relu import DeadUnitMonitor


class Regressor(L.LightningModule):
    def __init__(self, depth: int, width: int, in_features: int = 8, lr: float = 0.05, momentum: float = 0.95):
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Linear(in_features, width), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.ReLU()]
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True, on_epoch=True, on_step=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


def make_data(n: int, in_features: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    y = 0.01 * x[:, -1] + 0.01  # targets with a tiny standard deviation
    return TensorDataset(x, y)


def main(argv: Sequence[str] | None = None) -> DeadUnitMonitor:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8, help="training epochs (default: 8)")
    parser.add_argument("--depth", type=int, default=10, help="number of ReLU layers (default: 10)")
    parser.add_argument("--width", type=int, default=16, help="units per layer (default: 16)")
    parser.add_argument("--samples", type=int, default=4096, help="training samples (default: 4096)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", default="lightning_logs", help="TensorBoard log directory (default: lightning_logs)")
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    model = Regressor(depth=args.depth, width=args.width)
    data = DataLoader(make_data(args.samples, 8, args.seed), batch_size=64, shuffle=True)
    monitor = DeadUnitMonitor()
    logger = TensorBoardLogger(args.out, name="quickstart")
    trainer = L.Trainer(
        max_epochs=args.epochs,
        logger=logger,
        callbacks=[monitor],
        accelerator="cpu",
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=10,
    )
    trainer.fit(model, data)

    sites = list(monitor.last_report or {})
    print("\nDead units per ReLU layer (share of the layer's units), per epoch:\n")
    print("| epoch | " + " | ".join(sites) + " | total |")
    print("|---|" + "---|" * (len(sites) + 1))
    for epoch in monitor.history:
        cells = [f"{epoch.layers[s].num_dead}/{epoch.layers[s].num_units}" for s in sites]
        print(f"| {epoch.epoch} | " + " | ".join(cells) + f" | {epoch.dead_fraction:.0%} |")
    log_dir = os.path.abspath(logger.log_dir)
    print(f"\nTensorBoard logs: {log_dir}")
    print(f"Watch them with:  tensorboard --logdir {os.path.abspath(args.out)}")
    return monitor


if __name__ == "__main__":
    main()
