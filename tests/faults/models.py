"""The small Lightning modules the fault tests train (module level: ``ddp_spawn`` pickles them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import kill_units, mlp


def alike_batches(batches: int, seed: int = 0) -> torch.Tensor:
    """``batches`` batches of 4 samples, all the same: which batches a resumed fit replays does not matter."""
    block = torch.rand(4, 4, generator=torch.Generator().manual_seed(seed)) - 0.3
    return block.repeat(batches, 1)


def random_batches(batches: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(4 * batches, 4, generator=torch.Generator().manual_seed(seed)) - 0.3


class Net(L.LightningModule):
    """4 -> 6 -> 6 -> 1 with two dead units in the second layer, trained by SGD with momentum (so a resume must
    restore the optimizer state, and revival must reset it)."""

    def __init__(self, x: torch.Tensor, lr: float = 0.0) -> None:
        super().__init__()
        self.net = mlp([4, 6, 6, 1], seed=1)
        kill_units(self.net, 2, [1, 2])
        self.x = x
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return (self(batch[0]) - 1.0).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x), batch_size=4, shuffle=False)


def trainer(root: Path, callbacks: list[Any], **overrides: Any) -> L.Trainer:
    settings: dict[str, Any] = dict(
        default_root_dir=root,
        max_epochs=2,
        limit_train_batches=5,
        limit_val_batches=0,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
    )
    settings.update(overrides)
    return L.Trainer(callbacks=callbacks, **settings)


def summary(history: list[Any]) -> list[tuple[Any, ...]]:
    """What a monitor's history says, as plain values: epoch, step, per site the active counts and samples."""
    return [
        (
            report.epoch,
            report.global_step,
            {
                name: (layer.active_count.tolist(), layer.samples, layer.dead.tolist())
                for name, layer in report.layers.items()
            },
        )
        for report in history
    ]


class Dump(Callback):
    """Writes each rank's monitor history and revivals at the end of the fit (spawned ranks keep their own)."""

    def __init__(self, path: str, monitor: Any) -> None:
        self.path = path
        self.monitor = monitor

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {
            "history": summary(self.monitor.history),
            "partial": [getattr(report, "partial", False) for report in self.monitor.history],
            "nonfinite": [
                (list(getattr(report, "nonfinite_sites", [])), getattr(report, "first_nonfinite_step", None))
                for report in self.monitor.history
            ],
            "nonfinite_batches": [
                {name: layer.nonfinite_batches for name, layer in report.layers.items()}
                for report in self.monitor.history
            ],
            "revived": [dict(entry["revived"]) for entry in self.monitor.reviver.history],
            "params": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
        }
        torch.save(state, f"{self.path}_rank{trainer.global_rank}.pt")
