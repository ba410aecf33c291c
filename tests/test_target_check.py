"""Tests of TargetScaleCheck: exact target statistics, warnings only with momentum, resume, DDP."""

from __future__ import annotations

import math
import pickle
import warnings
from argparse import Namespace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_relu.target_check import TargetScaleCheck, TargetScaleWarning, optimizer_momentum
from tests.helpers import SpawnDDP, retry_spawn_abort

BATCH = 16


def _data(gamma: float = 1.0, offset: float = 0.0, n: int = 128, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    return x, gamma * x[:, -1] + offset


def _optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.01)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    raise ValueError(name)


class _Regressor(LightningModule):
    def __init__(self, gamma: float = 1.0, offset: float = 0.0, optimizer: str = "adam", seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        self.x, self.y = _data(gamma, offset)
        self.optimizer = optimizer

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y.float())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return _optimizer(self.optimizer, self.parameters())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=BATCH)


class _DictDataset(Dataset):
    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"inputs": self.x[index], "target": self.y[index]}


class _DictRegressor(_Regressor):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.mse_loss(self(batch["inputs"]), batch["target"])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_DictDataset(self.x, self.y), batch_size=BATCH)


class _Classifier(_Regressor):
    """Integer class labels in ``batch[1]``: not regression targets."""

    def __init__(self) -> None:
        super().__init__(optimizer="adam")
        self.y = (self.x[:, 0] > 0).long()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(torch.stack([self(x), -self(x)], dim=1), y)


def _target_of(batch: dict[str, Tensor]) -> Tensor:
    return batch["target"]


class _MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[dict[str, float], int | None]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((dict(metrics), step))


def _trainer(tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> Trainer:
    options: dict[str, Any] = dict(
        default_root_dir=tmp_path,
        max_epochs=2,
        limit_train_batches=5,
        log_every_n_steps=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(kwargs)
    return Trainer(callbacks=callbacks, **options)


def _scale_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, TargetScaleWarning)]


def _fit_recording(
    tmp_path: Path, check: TargetScaleCheck, model: LightningModule, ckpt_path: str | None = None, **kwargs: Any
) -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _trainer(tmp_path, [check], **kwargs).fit(model, ckpt_path=ckpt_path)
    return _scale_warnings(record)


# --------------------------------------------------------------------------------------------------------------------
# warnings
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_warns_on_small_targets_with_momentum(tmp_path: Path, optimizer: str) -> None:
    check = TargetScaleCheck()
    messages = _fit_recording(tmp_path, check, _Regressor(gamma=0.01, optimizer=optimizer))
    assert len(messages) == 1  # once, at the end of the first epoch only
    assert check.warned and check.momentum_found == pytest.approx(0.9)
    assert check.target_std is not None and check.target_std < 0.1
    message = messages[0]
    assert "`std_range`" in message and f"{check.target_std:.4g}" in message
    assert "Arnekvist" in message and "dead cone" in message
    assert "zero mean and unit variance" in message and "momentum" in message


def test_silent_on_normalized_targets_with_momentum(tmp_path: Path) -> None:
    check = TargetScaleCheck()
    assert _fit_recording(tmp_path, check, _Regressor(gamma=1.0, optimizer="sgd_momentum")) == []
    assert check.measured and not check.warned and check.momentum_found == pytest.approx(0.9)
    assert 0.5 < check.target_std < 2.0


def test_silent_without_momentum(tmp_path: Path) -> None:
    check = TargetScaleCheck()
    assert _fit_recording(tmp_path, check, _Regressor(gamma=0.01, optimizer="sgd")) == []
    assert check.momentum_found == 0.0 and not check.warned
    assert check.target_std is not None and check.target_std < 0.1  # measured all the same


def test_warns_on_large_offset(tmp_path: Path) -> None:
    check = TargetScaleCheck(max_abs_mean=3.0)
    messages = _fit_recording(tmp_path, check, _Regressor(gamma=1.0, offset=10.0, optimizer="adam"))
    assert len(messages) == 1 and "`max_abs_mean`" in messages[0] and "`std_range`" not in messages[0]
    # the mean check can be switched off
    assert _fit_recording(tmp_path, TargetScaleCheck(max_abs_mean=math.inf), _Regressor(1.0, 10.0)) == []


def test_custom_std_range(tmp_path: Path) -> None:
    assert _fit_recording(tmp_path, TargetScaleCheck(std_range=(1e-3, 10.0)), _Regressor(gamma=0.01)) == []
    assert len(_fit_recording(tmp_path, TargetScaleCheck(std_range=(2.0, 3.0)), _Regressor(gamma=1.0))) == 1


def test_classification_labels_are_skipped(tmp_path: Path) -> None:
    check = TargetScaleCheck()
    assert _fit_recording(tmp_path, check, _Classifier()) == []
    assert check.skipped and check.measured and check.target_mean is None and check.target_std is None


# --------------------------------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("gamma", "offset"), [(0.01, 0.0), (3.0, -2.0), (1e-3, 1e6)])
def test_statistics_match_brute_force(tmp_path: Path, gamma: float, offset: float) -> None:
    check = TargetScaleCheck()
    model = _Regressor(gamma=gamma, offset=offset, optimizer="sgd")
    _fit_recording(tmp_path, check, model, limit_train_batches=5)
    seen = model.y[: 5 * BATCH].double()  # the first epoch's batches (no shuffling); epoch 2 is not counted
    assert check.target_count == seen.numel()
    assert check.target_mean == pytest.approx(float(seen.mean()), rel=1e-9, abs=1e-12)
    assert check.target_std == pytest.approx(float(seen.std()), rel=1e-6)


def test_nonfinite_entries_are_left_out(tmp_path: Path) -> None:
    model = _Regressor(gamma=0.5, optimizer="sgd")
    model.y[3] = math.nan
    model.y[20] = math.inf
    check = TargetScaleCheck()
    _fit_recording(tmp_path, check, model, limit_train_batches=4)
    seen = model.y[: 4 * BATCH].double()
    seen = seen[torch.isfinite(seen)]
    assert check.target_count == seen.numel() == 4 * BATCH - 2
    assert check.target_mean == pytest.approx(float(seen.mean()), rel=1e-9)
    assert check.target_std == pytest.approx(float(seen.std()), rel=1e-9)


def test_target_fn(tmp_path: Path) -> None:
    check = TargetScaleCheck(target_fn=_target_of)
    model = _DictRegressor(gamma=0.01, optimizer="sgd_momentum")
    assert len(_fit_recording(tmp_path, check, model)) == 1
    seen = model.y[: 5 * BATCH].double()
    assert check.target_mean == pytest.approx(float(seen.mean()), rel=1e-9, abs=1e-12)
    assert check.target_std == pytest.approx(float(seen.std()), rel=1e-6)
    # without it, a dict batch has no `batch[1]`: skipped, no warning
    default = TargetScaleCheck()
    assert _fit_recording(tmp_path, default, _DictRegressor(gamma=0.01, optimizer="sgd_momentum")) == []
    assert default.skipped


def test_logs_to_every_logger_and_callback_metrics(tmp_path: Path) -> None:
    loggers = [_MemoryLogger(), _MemoryLogger()]
    check = TargetScaleCheck()
    trainer = _trainer(tmp_path, [check], logger=loggers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TargetScaleWarning)
        trainer.fit(_Regressor(gamma=0.01, optimizer="adam"))
    for logger in loggers:
        entries = [(m, step) for m, step in logger.logged if "target_scale/mean" in m]
        assert len(entries) == 1
        metrics, step = entries[0]
        assert metrics == {"target_scale/mean": check.target_mean, "target_scale/std": check.target_std}
        assert step == 5  # the global step at the end of the first epoch
    assert float(trainer.callback_metrics["target_scale/std"]) == pytest.approx(check.target_std)


# --------------------------------------------------------------------------------------------------------------------
# momentum detection
# --------------------------------------------------------------------------------------------------------------------


def test_optimizer_momentum_reads_every_param_group() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    assert optimizer_momentum(torch.optim.SGD([a], lr=0.1)) == 0.0
    mixed = torch.optim.SGD([{"params": [a]}, {"params": [b], "momentum": 0.5}], lr=0.1)
    assert optimizer_momentum(mixed) == 0.5
    assert optimizer_momentum(torch.optim.RMSprop([a], momentum=0.3)) == pytest.approx(0.3)
    assert optimizer_momentum(torch.optim.RMSprop([a])) == 0.0
    assert optimizer_momentum(torch.optim.AdamW([a], betas=(0.8, 0.99))) == pytest.approx(0.8)
    assert optimizer_momentum(torch.optim.Adam([a], betas=(0.0, 0.99))) == 0.0
    assert optimizer_momentum(torch.optim.Adagrad([a])) == 0.0


# --------------------------------------------------------------------------------------------------------------------
# arguments, pickling, checkpoints
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"std_range": (1.0, 0.5)}, r"`std_range` must be a pair .* got \(1.0, 0.5\)"),
        ({"std_range": (0.0, 1.0)}, r"`std_range` must be a pair .* got \(0.0, 1.0\)"),
        ({"std_range": (0.1,)}, r"`std_range` must be a pair .* got \(0.1,\)"),
        ({"std_range": (0.1, math.inf)}, "`std_range` must be a pair .* got"),
        ({"std_range": "ab"}, "`std_range` must be a pair .* got 'ab'"),
        ({"max_abs_mean": 0}, "`max_abs_mean` must be a positive number .* got 0"),
        ({"max_abs_mean": math.nan}, "`max_abs_mean` must be a positive number .* got nan"),
        ({"max_abs_mean": True}, "`max_abs_mean` must be a positive number .* got True"),
        ({"target_fn": 3}, "`target_fn` must be a callable or None, got 3"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TargetScaleCheck(**kwargs)


def test_pickles_before_and_after_fit(tmp_path: Path) -> None:
    check = TargetScaleCheck(std_range=(0.5, 2.0), max_abs_mean=2.0, target_fn=_target_of)
    clone = pickle.loads(pickle.dumps(check))
    assert (clone.std_range, clone.max_abs_mean, clone.target_fn) == ((0.5, 2.0), 2.0, _target_of)
    assert clone.state_key == check.state_key
    _fit_recording(tmp_path, check, _DictRegressor(gamma=1.0, optimizer="sgd"))
    clone = pickle.loads(pickle.dumps(check))
    assert clone.state_dict() == check.state_dict() and clone.measured
    assert TargetScaleCheck().state_key != TargetScaleCheck(max_abs_mean=1.0).state_key


def test_state_dict_roundtrip_and_defaults() -> None:
    check = TargetScaleCheck()
    check.load_state_dict(
        {"measured": True, "target_mean": 0.5, "target_std": 0.01, "target_count": 7, "momentum_found": 0.9}
    )
    assert (check.measured, check.target_mean, check.target_std, check.target_count) == (True, 0.5, 0.01, 7)
    other = TargetScaleCheck()
    other.load_state_dict(check.state_dict())
    assert other.state_dict() == check.state_dict()
    other.load_state_dict({})  # an older or foreign state
    assert not other.measured and other.target_mean is None and other.momentum_found is None


def test_resumed_fit_does_not_measure_again(tmp_path: Path) -> None:
    first = TargetScaleCheck()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TargetScaleWarning)
        _trainer(tmp_path, [first, checkpoint], max_epochs=1, enable_checkpointing=True).fit(
            _Regressor(gamma=0.01, optimizer="adam")
        )
    assert first.warned
    resumed = TargetScaleCheck()
    # other targets on resume: a re-measurement would change the numbers, and would not warn
    model = _Regressor(gamma=1.0, optimizer="adam")
    messages = _fit_recording(tmp_path, resumed, model, max_epochs=2, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert messages == []
    assert resumed.state_dict() == first.state_dict()


def test_measures_once_per_fit(tmp_path: Path) -> None:
    check = TargetScaleCheck()
    trainer = _trainer(tmp_path, [check], max_epochs=1)
    trainer.fit(_Regressor(gamma=0.01, optimizer="sgd"))
    state = check.state_dict()
    # the same Trainer fitting on: the fit goes on, nothing is measured again
    trainer.fit_loop.max_epochs = 2
    trainer.fit(_Regressor(gamma=5.0, optimizer="sgd"))
    assert trainer.current_epoch == 2 and check.state_dict() == state
    # a new fit with the same callback: its own targets
    model = _Regressor(gamma=5.0, optimizer="sgd", seed=1)
    _fit_recording(tmp_path, check, model, max_epochs=1)
    seen = model.y[: 5 * BATCH].double()
    assert check.target_count == seen.numel()
    assert check.target_std == pytest.approx(float(seen.std()), rel=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# DDP
# --------------------------------------------------------------------------------------------------------------------


class _ShardedRegressor(_Regressor):
    """The two ranks see different halves of the data (DistributedSampler interleaves indices)."""

    def __init__(self) -> None:
        super().__init__(gamma=1.0, optimizer="sgd")
        self.y = self.y + 1000.0 * (torch.arange(len(self.y)) % 2)  # rank 1's targets are shifted by 1000


class _SaveCheckState(Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        check = next(cb for cb in trainer.callbacks if isinstance(cb, TargetScaleCheck))
        torch.save(check.state_dict(), Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


@retry_spawn_abort
def test_ddp_statistics_cover_every_rank(tmp_path: Path) -> None:
    model = _ShardedRegressor()
    callbacks = [TargetScaleCheck(), _SaveCheckState(str(tmp_path))]
    trainer = _trainer(tmp_path, callbacks, strategy=SpawnDDP(), devices=2, max_epochs=1, limit_train_batches=None)
    trainer.fit(model)
    states = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert states[0] == states[1]  # every rank holds the reduced numbers
    everything = model.y.double()
    assert states[0]["target_count"] == everything.numel()
    assert states[0]["target_mean"] == pytest.approx(float(everything.mean()), rel=1e-9)
    assert states[0]["target_std"] == pytest.approx(float(everything.std()), rel=1e-9)
