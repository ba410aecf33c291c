"""Tests of the ReluInitializer callback: applied once, never on resume, identical on every rank."""

from __future__ import annotations

import copy
import gc
import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_relu.init import rai_, sign_flip_
from lightning_relu.initializer import ReluInitializer
from tests.helpers import SpawnDDP, retry_spawn_abort


def _data(n: int = 64, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=generator), torch.randn(n, generator=generator)


class _Net(LightningModule):
    def __init__(self, widths: tuple[int, ...] = (3,) * 8) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = 4
        for width in widths:
            layers += [nn.Linear(previous, width), nn.ReLU()]
            previous = width
        layers.append(nn.Linear(previous, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*_data()), batch_size=16)


class _DictDataset(Dataset):
    def __init__(self) -> None:
        self.x, self.y = _data()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"inputs": self.x[index], "target": self.y[index]}


class _DictNet(_Net):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.mse_loss(self(batch["inputs"]), batch["target"])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_DictDataset(), batch_size=16)


def _inputs(batch: dict[str, Tensor]) -> Tensor:
    return batch["inputs"]


class _Snapshot(Callback):
    """Records the weights the first training step will see (it runs after ReluInitializer)."""

    def __init__(self) -> None:
        self.states: list[dict[str, Tensor]] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


class _RecordingLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[dict[str, float], int | None]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((dict(metrics), step))


def _trainer(tmp_path: Path, callbacks: list[Callback], max_epochs: int = 1, **kwargs: Any) -> Trainer:
    kwargs.setdefault("logger", False)
    return Trainer(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        limit_train_batches=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )


def _assert_state_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _brute_force_alive(net: nn.Sequential, x: Tensor) -> list[tuple[int, int]]:
    alive = torch.ones(x.shape[0], dtype=torch.bool)
    out = []
    with torch.no_grad():
        for layer in net:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                before = int(alive.sum())
                alive &= x.ne(0).any(dim=1)
                out.append((before, int(alive.sum())))
    return out


def test_rai_applied_before_first_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Net()
    expected = copy.deepcopy(model)
    rai_(expected.net, generator=torch.Generator().manual_seed(3))
    initializer, snapshot = ReluInitializer("rai", seed=3), _Snapshot()
    _trainer(tmp_path, [initializer, snapshot]).fit(model)
    _assert_state_equal(snapshot.states[0], expected.state_dict())
    assert initializer.applied
    assert initializer.seed_used == 3
    assert initializer.rai_layers == [f"net.{2 * i}" for i in range(8)]
    assert initializer.metrics == {"relu_init/rai_layers": 8.0}
    assert initializer.report == {}


def test_applied_once_per_instance(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = _Net()
    initializer, snapshot = ReluInitializer("rai", seed=0), _Snapshot()
    _trainer(tmp_path / "first", [initializer, snapshot]).fit(model)
    after_first = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _trainer(tmp_path / "second", [initializer, snapshot]).fit(model)
    _assert_state_equal(snapshot.states[1], after_first)


def test_an_initializer_restored_from_a_checkpoint_initializes_another_model(tmp_path: Path) -> None:
    torch.manual_seed(1)
    first = ReluInitializer("rai", seed=0)
    trainer = _trainer(tmp_path / "a", [first], max_epochs=1)
    trainer.fit(_Net())
    ckpt_path = trainer.checkpoint_callback.best_model_path
    restored = ReluInitializer("rai", seed=0)
    resumed_model, snapshot = _Net(), _Snapshot()
    _trainer(tmp_path / "b", [restored, snapshot], max_epochs=2).fit(resumed_model, ckpt_path=ckpt_path)
    assert restored.applied
    # the same model again: its trained weights are kept; another model: initialized
    kept = {k: v.detach().clone() for k, v in resumed_model.state_dict().items()}
    _trainer(tmp_path / "c", [restored, snapshot], max_epochs=1).fit(resumed_model)
    _assert_state_equal(snapshot.states[-1], kept)
    torch.manual_seed(2)
    other = _Net()
    expected = copy.deepcopy(other)
    rai_(expected.net, generator=torch.Generator().manual_seed(0))
    _trainer(tmp_path / "d", [restored, snapshot], max_epochs=1).fit(other)
    _assert_state_equal(snapshot.states[-1], expected.state_dict())
    # the initializer that initialized the first model, resuming a second one: that one's weights are done too
    second = _Net()
    _trainer(tmp_path / "e", [first, snapshot], max_epochs=2).fit(second, ckpt_path=ckpt_path)
    kept = {k: v.detach().clone() for k, v in second.state_dict().items()}
    _trainer(tmp_path / "f", [first, snapshot], max_epochs=1).fit(second)
    _assert_state_equal(snapshot.states[-1], kept)


def test_a_new_model_is_initialized_by_a_used_initializer_or_its_copy(tmp_path: Path) -> None:
    """Once per model: another model (while the first lives, after it is gone, or through a copy of the
    initializer) gets its own initialization, equal to a fresh initializer's."""
    torch.manual_seed(1)
    first = _Net()
    initializer = ReluInitializer("rai", seed=0)
    _trainer(tmp_path / "a", [initializer]).fit(first)

    def fresh_result(make: Any) -> dict[str, Tensor]:
        torch.manual_seed(2)
        model = make()
        expected = copy.deepcopy(model)
        rai_(expected.net, generator=torch.Generator().manual_seed(0))
        return model, expected.state_dict()

    for case in ("first alive", "copy", "first gone"):
        if case == "first gone":
            del first
            gc.collect()
        used = copy.deepcopy(initializer) if case == "copy" else initializer
        model, expected = fresh_result(_Net)
        snapshot = _Snapshot()
        _trainer(tmp_path / case.replace(" ", "_"), [used, snapshot]).fit(model)
        _assert_state_equal(snapshot.states[0], expected)


class _TunedNet(_Net):
    """A model Lightning's learning-rate finder can tune (it sets ``lr``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lr = 0.05

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


@pytest.mark.parametrize("finder", ["lr", "batch size"])
def test_a_finder_callback_at_the_fit_start_leaves_the_initialization_to_do(tmp_path: Path, finder: str) -> None:
    """A learning-rate or batch-size finder among the callbacks saves a checkpoint, runs trial steps and restores the
    checkpoint at the start of the fit, which leaves `trainer.ckpt_path` set: the initializer took the fresh fit for
    a resumed one and initialized nothing."""
    from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder

    torch.manual_seed(0)
    model = _TunedNet()
    model.batch_size = 16
    expected = copy.deepcopy(model)
    rai_(expected.net, generator=torch.Generator().manual_seed(0))
    tuner: Callback = (
        LearningRateFinder(num_training_steps=3, early_stop_threshold=None)
        if finder == "lr"
        else BatchSizeFinder(steps_per_trial=1, max_trials=1)
    )
    initializer, snapshot = ReluInitializer("rai", seed=0), _Snapshot()
    trainer = _trainer(tmp_path, [tuner, initializer, snapshot])
    trainer.fit(model)
    assert trainer.ckpt_path is not None  # the finder's restore: what the initializer sees
    assert initializer.applied and initializer.rai_layers == [f"net.{2 * i}" for i in range(8)]
    _assert_state_equal(snapshot.states[0], expected.state_dict())


def test_resumed_fits_keep_their_weights_with_or_without_a_finder(tmp_path: Path) -> None:
    """Resuming keeps the checkpoint's weights: a checkpoint saved by a fit whose initializer kept its resumed weights
    (its state says `applied=False`), and a checkpoint without the initializer's state resumed with a finder among the
    callbacks (the finder's own checkpoint then holds an undecided initializer). A first version of the finder fix
    re-drew both."""
    from lightning.pytorch.callbacks import LearningRateFinder

    def fit(callbacks: list[Callback], epochs: int, ckpt_path: str | None = None) -> Trainer:
        trainer = _trainer(tmp_path, callbacks, max_epochs=epochs, enable_checkpointing=False)
        trainer.fit(_TunedNet(), ckpt_path=ckpt_path)
        return trainer

    def weights(path: Path) -> dict[str, Tensor]:
        return torch.load(path, weights_only=False)["state_dict"]

    torch.manual_seed(0)
    fit([], 1).save_checkpoint(tmp_path / "a.ckpt")  # a fit without the initializer
    snapshot = _Snapshot()
    fit([ReluInitializer("rai", seed=0), snapshot], 2, str(tmp_path / "a.ckpt")).save_checkpoint(tmp_path / "b.ckpt")
    _assert_state_equal(snapshot.states[-1], weights(tmp_path / "a.ckpt"))
    for ckpt, finder in (("b.ckpt", False), ("a.ckpt", True)):
        initializer, snapshot = ReluInitializer("rai", seed=0), _Snapshot()
        tuner = [LearningRateFinder(num_training_steps=3, early_stop_threshold=None)] if finder else []
        fit([*tuner, initializer, snapshot], 3, str(tmp_path / ckpt))
        _assert_state_equal(snapshot.states[-1], weights(tmp_path / ckpt))
        assert not initializer.applied and initializer.rai_layers == []


def test_a_validation_from_a_checkpoint_does_not_stand_for_a_fit(tmp_path: Path) -> None:
    """`validate(ckpt_path=...)` loaded the checkpoint's `applied=True` into the initializer: a fresh fit of another
    model after it was left uninitialized."""
    torch.manual_seed(0)
    trainer = _trainer(tmp_path, [ReluInitializer("rai", seed=0)], enable_checkpointing=False)
    trainer.fit(_Net())
    trainer.save_checkpoint(tmp_path / "done.ckpt")
    initializer, snapshot = ReluInitializer("rai", seed=0), _Snapshot()
    validating = _trainer(tmp_path, [initializer, snapshot], limit_val_batches=1, enable_checkpointing=False)
    model = _Net()
    model.validation_step = lambda batch, batch_idx: None  # type: ignore[method-assign]
    model.val_dataloader = model.train_dataloader  # type: ignore[method-assign]
    validating.validate(model, ckpt_path=str(tmp_path / "done.ckpt"), verbose=False)
    assert not initializer.applied
    other = _Net()
    expected = copy.deepcopy(other)
    rai_(expected.net, generator=torch.Generator().manual_seed(0))
    _trainer(tmp_path, [initializer, snapshot], enable_checkpointing=False).fit(other)
    _assert_state_equal(snapshot.states[-1], expected.state_dict())


def test_another_model_fitted_on_the_same_trainer_is_initialized(tmp_path: Path) -> None:
    """A second `fit` of another model on the same Trainer (global step > 0) kept the first model's `applied`."""
    torch.manual_seed(0)
    initializer, snapshot = ReluInitializer("rai", seed=0), _Snapshot()
    trainer = _trainer(tmp_path, [initializer, snapshot])
    trainer.fit(_Net())
    other = _Net()
    expected = copy.deepcopy(other)
    rai_(expected.net, generator=torch.Generator().manual_seed(0))
    trainer.fit_loop.max_epochs = 2
    trainer.fit(other)
    _assert_state_equal(snapshot.states[-1], expected.state_dict())
    trainer.fit_loop.max_epochs = 3  # the same model again: its trained weights are kept
    kept = {k: v.detach().clone() for k, v in other.state_dict().items()}
    trainer.fit(other)
    _assert_state_equal(snapshot.states[-1], kept)


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_resume_does_not_reinitialize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(2)
    first = ReluInitializer("rai+sign_flip", seed=0)
    trainer = _trainer(tmp_path, [first], max_epochs=1)
    trainer.fit(_Net())
    ckpt_path = trainer.checkpoint_callback.best_model_path
    checkpoint = torch.load(ckpt_path, weights_only=False)
    assert checkpoint["callbacks"][first.state_key]["applied"] is True

    calls: list[str] = []
    monkeypatch.setattr("lightning_relu.initializer.rai_", lambda *args, **kwargs: calls.append("rai"))
    monkeypatch.setattr("lightning_relu.initializer.sign_flip_", lambda *args, **kwargs: calls.append("flip") or {})
    second, snapshot = ReluInitializer("rai+sign_flip", seed=0), _Snapshot()
    _trainer(tmp_path / "resumed", [second, snapshot], max_epochs=2).fit(_Net(), ckpt_path=ckpt_path)
    assert calls == []
    assert second.applied  # restored from the checkpoint
    _assert_state_equal(snapshot.states[0], checkpoint["state_dict"])


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_resume_from_checkpoint_saved_without_it(tmp_path: Path) -> None:
    torch.manual_seed(3)
    trainer = _trainer(tmp_path, [], max_epochs=1)
    trainer.fit(_Net())
    ckpt_path = trainer.checkpoint_callback.best_model_path
    checkpoint = torch.load(ckpt_path, weights_only=False)
    initializer, snapshot = ReluInitializer("rai"), _Snapshot()
    _trainer(tmp_path / "resumed", [initializer, snapshot], max_epochs=2).fit(_Net(), ckpt_path=ckpt_path)
    assert not initializer.applied
    _assert_state_equal(snapshot.states[0], checkpoint["state_dict"])


def test_sign_flip_from_training_data(tmp_path: Path) -> None:
    torch.manual_seed(4)
    model = _Net((2,) * 12)
    before = copy.deepcopy(model)
    initializer, snapshot, logger = ReluInitializer("sign_flip", max_samples=40), _Snapshot(), _RecordingLogger()
    trainer = _trainer(tmp_path, [initializer, snapshot], logger=logger)
    trainer.fit(model)
    report = initializer.report
    assert list(report) == [f"net.{2 * i + 1}" for i in range(12)]
    assert any(r.flipped for r in report.values())  # 12 layers of 2 units: flips are certain in practice
    # brute force on the first 40 training samples with the weights the first step saw
    flipped = copy.deepcopy(before)
    flipped.load_state_dict(snapshot.states[0])
    x = _data()[0][:40]
    for (alive_before, alive_after), r in zip(_brute_force_alive(flipped.net, x), report.values(), strict=True):
        assert 2 * alive_after >= alive_before
        assert (r.living_before, r.living_after) == (alive_before / 40, alive_after / 40)
        assert r.num_samples == 40
    # only signs changed, layer by layer
    for i in range(13):
        sign = -1 if i < 12 and report[f"net.{2 * i + 1}"].flipped else 1
        assert torch.equal(flipped.net[2 * i].weight, sign * before.net[2 * i].weight)
    # logged once, to the logger, with the report's values
    logged = [metrics for metrics, step in logger.logged if "relu_init/flipped_sites" in metrics]
    assert len(logged) == 1
    metrics = logged[0]
    assert metrics["relu_init/flipped_sites"] == sum(r.flipped for r in report.values())
    assert metrics["relu_init/living_data"] == list(report.values())[-1].living_after
    for name, r in report.items():
        assert metrics[f"relu_init/{name}/flipped"] == float(r.flipped)
        assert metrics[f"relu_init/{name}/living_before"] == r.living_before
        assert metrics[f"relu_init/{name}/living_after"] == r.living_after
    assert metrics == initializer.metrics
    assert float(trainer.callback_metrics["relu_init/flipped_sites"]) == metrics["relu_init/flipped_sites"]


def test_sign_flip_sees_the_batches_in_the_trainers_precision(tmp_path: Path) -> None:
    """Under `precision="64-true"` the weights are float64: the batches are cast as a training step gets them."""
    torch.manual_seed(4)
    model = _Net((2,) * 12)
    expected = copy.deepcopy(model).double()
    reference = sign_flip_(expected, _data()[0][:40].double())
    initializer, snapshot = ReluInitializer("sign_flip", max_samples=40), _Snapshot()
    _trainer(tmp_path, [initializer, snapshot], precision="64-true").fit(model)
    assert any(r.flipped for r in reference.values())
    assert {k: r.flipped for k, r in initializer.report.items()} == {k: r.flipped for k, r in reference.items()}
    _assert_state_equal(snapshot.states[0], expected.state_dict())


def test_rai_then_sign_flip_with_input_fn(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = _DictNet((2,) * 10)
    initializer, snapshot = ReluInitializer("rai+sign_flip", seed=1, input_fn=_inputs), _Snapshot()
    _trainer(tmp_path, [initializer, snapshot]).fit(model)
    expected = copy.deepcopy(model)
    expected.load_state_dict(snapshot.states[0])
    assert len(initializer.rai_layers) == 10 and len(initializer.report) == 10
    x = _data()[0]
    brute = _brute_force_alive(expected.net, x)
    for (alive_before, alive_after), r in zip(brute, initializer.report.values(), strict=True):
        assert 2 * alive_after >= alive_before
        assert r.living_after == alive_after / 64
    # RAI first, then flips: |W| is what the seeded RAI gives
    reference = _DictNet((2,) * 10)
    rai_(reference.net, generator=torch.Generator().manual_seed(1))
    for i in range(10):
        assert torch.equal(expected.net[2 * i].weight.abs(), reference.net[2 * i].weight.abs())


def test_dict_batches_without_input_fn_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pass `input_fn`"):
        _trainer(tmp_path, [ReluInitializer("sign_flip")]).fit(_DictNet())


@pytest.mark.parametrize("method", ["rai", "sign_flip"])
def test_warns_without_sites(tmp_path: Path, method: str) -> None:
    with pytest.warns(RuntimeWarning, match=f"`ReluInitializer\\('{method}'\\)` .* no rectifier site"):
        _trainer(tmp_path, [ReluInitializer(method)]).fit(BoringModel())


class _FunctionalNet(_Net):
    """A functional rectifier between two layers that no `nn.Sequential` holds: found on a forward only."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 8), nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(F.relu(self.l1(x))).squeeze(-1)


def test_rai_on_rectifiers_only_a_forward_shows_warns_nothing(tmp_path: Path) -> None:
    net = _FunctionalNet()
    before = net.l1.weight.detach().clone()
    init, snapshot = ReluInitializer("rai", seed=0), _Snapshot()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [init, snapshot]).fit(net)
    assert not [str(w.message) for w in caught if "ReluInitializer" in str(w.message)]
    assert init.rai_layers == ["l1"]
    assert not torch.equal(before, snapshot.states[0]["l1.weight"])  # initialized before the first step


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "he"}, r"`method` can be 'rai', 'sign_flip', 'rai\+sign_flip', got 'he'"),
        ({"max_samples": 0}, "`max_samples` must be a positive integer, got 0"),
        ({"seed": "a"}, "`seed` must be an integer in \\[0, 2\\*\\*64\\) or None, got 'a'"),
        ({"seed": 2**70}, "`seed` must be an integer in \\[0, 2\\*\\*64\\) or None, got 1180591620717411303424"),
        ({"seed": -1}, "`seed` must be an integer in \\[0, 2\\*\\*64\\) or None, got -1"),
        ({"log_prefix": ""}, "`log_prefix` must be a non-empty string, got ''"),
        ({"input_fn": 3}, "`input_fn` must be a callable or None, got 3"),
        ({"log_prefix": None}, "`log_prefix` must be a non-empty string, got None"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ReluInitializer(**kwargs)


def test_pickle_and_state_dict_roundtrip() -> None:
    initializer = ReluInitializer("rai+sign_flip", seed=5, max_samples=10, input_fn=_inputs)
    clone = pickle.loads(pickle.dumps(initializer))
    assert (clone.method, clone.seed, clone.max_samples, clone.input_fn) == ("rai+sign_flip", 5, 10, _inputs)
    initializer.applied, initializer.seed_used, initializer.rai_layers = True, 5, ["net.0"]
    other = ReluInitializer("rai+sign_flip")
    other.load_state_dict(initializer.state_dict())
    assert (other.applied, other.seed_used, other.rai_layers) == (True, 5, ["net.0"])
    other.load_state_dict({})  # an older or foreign state
    assert not other.applied
    assert ReluInitializer("rai").state_key != ReluInitializer("sign_flip").state_key


# --------------------------------------------------------------------------------------------------------------------
# DDP
# --------------------------------------------------------------------------------------------------------------------


class _ShardedNet(_Net):
    """Rank 0 and rank 1 see opposite data (the DistributedSampler interleaves indices) and different global seeds."""

    def setup(self, stage: str) -> None:
        torch.manual_seed(100 + self.trainer.global_rank)

    def train_dataloader(self) -> DataLoader:
        x = 20 * torch.ones(64, 4) + 0.1 * torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
        x[1::2] *= -1
        return DataLoader(TensorDataset(x, torch.zeros(64)), batch_size=16)


class _SaveWeights(Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        initializer = next(cb for cb in trainer.callbacks if isinstance(cb, ReluInitializer))
        torch.save(
            {
                "state": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
                "flipped": [name for name, r in initializer.report.items() if r.flipped],
                "seed": initializer.seed_used,
            },
            Path(self.out_dir) / f"rank{trainer.global_rank}.pt",
        )


@retry_spawn_abort
def test_ddp_ranks_end_identical(tmp_path: Path) -> None:
    model = _ShardedNet((1, 3, 3, 3, 3, 3))
    trainer = Trainer(
        default_root_dir=tmp_path,
        strategy=SpawnDDP(),
        accelerator="cpu",
        devices=2,
        max_epochs=1,
        limit_train_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ReluInitializer("rai+sign_flip"), _SaveWeights(str(tmp_path))],
    )
    trainer.fit(model)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    assert rank0["seed"] == rank1["seed"]
    assert rank0["flipped"] == rank1["flipped"]
    _assert_state_equal(rank0["state"], rank1["state"])


class _Distilled(LightningModule):
    """A student and a frozen, pretrained teacher (`requires_grad=False`), as in knowledge distillation."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.student = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
        self.teacher = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
        with torch.no_grad():
            self.teacher[0].bias.fill_(-1.0)  # most samples killed at the teacher's first site: a flip would be tried
        self.teacher.requires_grad_(False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.student(x), self.teacher(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        with torch.no_grad():
            target = self.teacher(batch[0])
        return F.mse_loss(self.student(batch[0]), target)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.student.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:
        x = torch.rand(64, 4, generator=torch.Generator().manual_seed(1))
        return DataLoader(TensorDataset(x), batch_size=16)


def test_frozen_layers_are_left_as_they_are(tmp_path: Path) -> None:
    """RAI and sign flipping re-drew and negated a frozen teacher's layers: its pretrained weights were lost."""
    model = _Distilled()
    teacher = copy.deepcopy(model.teacher.state_dict())
    student = copy.deepcopy(model.student.state_dict())
    initializer = ReluInitializer("rai+sign_flip", seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [initializer]).fit(model)
    said = [str(w.message) for w in caught]
    assert any("left 2 frozen layer(s) as they were" in m and "'teacher.0', 'teacher.2'" in m for m in said), said
    assert any("frozen layer(s) unflipped" in m and "teacher.0" in m for m in said), said
    assert all(torch.equal(teacher[k], v) for k, v in model.teacher.state_dict().items())
    assert not torch.equal(student["0.weight"], model.student[0].weight)  # the student got RAI
    assert initializer.rai_layers == ["student.0"]
    assert not initializer.report["teacher.1"].flipped and "frozen" in initializer.report["teacher.1"].reason
    assert sorted(name for name, r in initializer.report.items() if r.frozen) == ["teacher.1", "teacher.3"]
