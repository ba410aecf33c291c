"""Exact resume under DDP (2 CPU processes, gloo): from the middle of an epoch and from its last batch, every rank
gets the uninterrupted fit's reports and revivals (issue 20)."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_relu import DeadUnitMonitor, DeadUnitReviver
from tests.faults.models import Dump, Net, alike_batches, trainer
from tests.helpers import retry_spawn_abort


def _fit(root: Path, name: str, ckpt_path: str | None = None) -> list[dict]:
    monitor = DeadUnitMonitor(revive=DeadUnitReviver(seed=0))
    callbacks: list = [monitor, Dump(str(root / name), monitor)]
    if ckpt_path is None:
        callbacks.append(
            ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
        )
    fit = trainer(
        root,
        callbacks,
        strategy="ddp_spawn",
        devices=2,
        limit_train_batches=4,
        enable_checkpointing=ckpt_path is None,
        use_distributed_sampler=False,  # each rank reads the alike batches in order (a sampler would shuffle them)
    )
    # lr = 0 and alike batches: the weights change only by revival, and which batches a resumed fit replays on which
    # rank does not matter
    fit.fit(Net(alike_batches(8), lr=0.0), ckpt_path=ckpt_path)
    return [torch.load(root / f"{name}_rank{rank}.pt", weights_only=False) for rank in (0, 1)]


@retry_spawn_abort
def test_ddp_resume_mid_epoch_and_from_the_last_batch_is_exact_on_every_rank(tmp_path: Path) -> None:
    whole = _fit(tmp_path, "whole")
    # checkpoints at steps 2 (the middle of epoch 0), 4 (its last batch), 6, 8
    mid = _fit(tmp_path, "mid", str(tmp_path / "ckpt" / "step=2.ckpt"))
    last = _fit(tmp_path, "last", str(tmp_path / "ckpt" / "step=4.ckpt"))
    reference = whole[0]
    assert [epoch for epoch, _, _ in reference["history"]] == [0, 1]
    # brute force of epoch 0: every sample of both ranks' 4 batches meets the initial weights
    x = alike_batches(8)
    with torch.no_grad():
        out = Net(x).net[:4](x[:4]).repeat(8, 1)  # 2 ranks x 4 batches of the same 4 samples
    _, _, sites = reference["history"][0]
    assert sites["net.3"][0] == [int((out[:, u] > 0).sum()) for u in range(6)] and sites["net.3"][1] == 32
    assert sum(reference["revived"][0].values()) > 0
    for run in (*whole, *mid, *last):
        assert run["history"] == reference["history"]
        assert run["revived"] == reference["revived"]
        assert run["partial"] == [False, False]
        for key, value in reference["params"].items():
            assert torch.equal(run["params"][key], value), key
