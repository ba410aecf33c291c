from __future__ import annotations

import csv
import math
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_relu import CollapseError, CollapseWarning, DeadUnitMonitor, LayerReport
from tests.helpers import SpawnDDP, brute_force, conv_bn_net, kill_units, make_trainer, mlp, retry_spawn_abort


class SeqModule(L.LightningModule):
    """Wraps an `nn.Sequential` as `self.net`; `lr=0` keeps the weights fixed so a brute-force pass can follow."""

    def __init__(self, net: nn.Module, train_x: torch.Tensor, val_x: torch.Tensor | None = None, lr: float = 0.0):
        super().__init__()
        self.net = net
        self.train_x = train_x
        self.val_x = val_x
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return self(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.train_x), batch_size=4, shuffle=False)

    def val_dataloader(self):
        x = self.val_x if self.val_x is not None else self.train_x
        return DataLoader(TensorDataset(x), batch_size=4)


_trainer = make_trainer


def _mlp_module(val_negative: bool = True) -> SeqModule:
    net = mlp([4, 6, 6, 1], seed=1)
    with torch.no_grad():
        # unit 0 of the first layer reads -sum(x): dead on the (positive) training data, alive on validation data
        net[0].weight[0] = -1.0
        net[0].bias[0] = 0.0
    kill_units(net, 2, [1, 2, 3, 4, 5])  # second layer: only unit 0 can fire, so some samples are killed
    g = torch.Generator().manual_seed(3)
    train_x = torch.rand(20, 4, generator=g) + 0.01
    val_x = -train_x if val_negative else train_x
    return SeqModule(net, train_x, val_x)


def _check_report(report: dict[str, LayerReport], expected: dict[str, dict]) -> None:
    assert set(report) == set(expected)
    for name, exp in expected.items():
        assert report[name].active_count.tolist() == exp["active"]
        assert report[name].dead.tolist() == exp["dead"]
        assert report[name].samples == exp["samples"]
        assert report[name].killed == exp["killed"]


def test_monitor_matches_brute_force_and_ignores_validation(tmp_path):
    module = _mlp_module()
    monitor = DeadUnitMonitor()
    trainer = _trainer(tmp_path, [monitor], limit_train_batches=4)
    trainer.fit(module)
    expected = brute_force(module.net, [module.train_x[i : i + 4] for i in range(0, 16, 4)], prefix="net.")
    assert expected["net.1"]["dead"][0]  # dead on training data although alive on validation data
    assert 0 < expected["net.3"]["killed"] < 16
    assert len(monitor.history) == 2
    assert [h.epoch for h in monitor.history] == [0, 1]
    for epoch_report in monitor.history:
        _check_report(epoch_report.layers, expected)
    assert monitor.last_report is monitor.history[-1].layers
    metrics = trainer.callback_metrics
    for name, exp in expected.items():
        assert float(metrics[f"dead_units/{name}"]) == pytest.approx(sum(exp["dead"]) / len(exp["dead"]))
        assert float(metrics[f"living_data/{name}"]) == pytest.approx(exp["living"])
    total_dead = sum(sum(e["dead"]) for e in expected.values())
    total_units = sum(len(e["dead"]) for e in expected.values())
    assert float(metrics["dead_units/total"]) == pytest.approx(total_dead / total_units)


def test_monitor_conv_bn_matches_brute_force(tmp_path):
    net = conv_bn_net(seed=2)
    kill_units(net, 1, [0, 4])
    x = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    module = SeqModule(net, x)
    monitor = DeadUnitMonitor()
    _trainer(tmp_path, [monitor], max_epochs=1, limit_train_batches=3).fit(module)
    net.train()  # BatchNorm in training mode, as during the fit
    expected = brute_force(net, [x[i : i + 4] for i in range(0, 12, 4)], prefix="net.")
    assert expected["net.2"]["dead"] == [True, False, False, False, True, False]
    _check_report(monitor.last_report, expected)


def test_tensorboard_event_file_has_scalars_and_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = _mlp_module()
    monitor = DeadUnitMonitor()
    logger = TensorBoardLogger(tmp_path, name="tb")
    _trainer(tmp_path, [monitor], logger=logger).fit(module)
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    for site in ("net.1", "net.3"):
        assert f"dead_units/{site}" in tags["scalars"]
        assert f"living_data/{site}" in tags["scalars"]
        assert f"per_unit/activation_rate/{site}" in tags["histograms"]
        values = [e.value for e in events.Scalars(f"dead_units/{site}")]
        assert values == pytest.approx([r.layers[site].dead_fraction for r in monitor.history])
        histos = events.Histograms(f"per_unit/activation_rate/{site}")
        assert len(histos) == 2
        assert histos[-1].histogram_value.num == monitor.last_report[site].num_units
    assert "dead_units/total" in tags["scalars"]
    steps = [e.step for e in events.Scalars("dead_units/total")]
    assert steps == [r.global_step - 1 for r in monitor.history]  # the epoch's last step, as Lightning logs epochs


class _TwoOptimizers(SeqModule):
    """Manual optimization with two optimizers (a GAN's shape): ``global_step`` counts two steps per batch, and
    only every other batch steps; Lightning logs epoch-level metrics by the batches that stepped."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        loss = self(batch[0]).pow(2).mean()
        self.manual_backward(loss)
        if batch_idx % 2 == 1:
            for optimizer in self.optimizers():
                optimizer.step()
                optimizer.zero_grad()
        self.log("train_loss", loss, on_step=False, on_epoch=True)

    def configure_optimizers(self):
        first, second = list(self.net.parameters())[:2], list(self.net.parameters())[2:]
        return torch.optim.SGD(first, lr=0.0), torch.optim.SGD(second, lr=0.0)


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual-two-optimizers"])
def test_the_report_is_logged_at_the_step_of_lightnings_epoch_metrics(tmp_path, manual):
    base = _mlp_module()
    module = _TwoOptimizers(base.net, base.train_x) if manual else SeqModule(base.net, base.train_x)
    if not manual:
        module.training_step = lambda batch, batch_idx: _logged(module, module(batch[0]).pow(2).mean())
    logger = CSVLogger(tmp_path, name="csv", version=0)
    _trainer(tmp_path, [DeadUnitMonitor(print_summary=False)], logger=logger, limit_val_batches=0).fit(module)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [int(r["step"]) for r in rows if r.get("train_loss")]
    reports = [int(r["step"]) for r in rows if r.get("dead_units/total")]
    assert len(losses) == 2 and reports == losses


def _logged(module, loss):
    module.log("train_loss", loss, on_step=False, on_epoch=True)
    return loss


def test_every_logger_gets_the_scalars(tmp_path):
    module = _mlp_module()
    csv_logger = CSVLogger(tmp_path, name="csv")
    _trainer(tmp_path, [DeadUnitMonitor()], logger=[csv_logger, TensorBoardLogger(tmp_path)]).fit(module)
    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [row for row in rows if row.get("dead_units/total")]
    assert len(logged) == 2
    assert float(logged[-1]["dead_units/net.1"]) == pytest.approx(1 / 6)


def test_fit_without_logger(tmp_path):
    module = _mlp_module()
    monitor = DeadUnitMonitor()
    _trainer(tmp_path, [monitor], logger=False, max_epochs=1).fit(module)
    assert monitor.last_report["net.1"].dead.tolist()[0]


def test_checkpoint_round_trip_keeps_the_last_report(tmp_path):
    """A checkpoint holds the latest epoch's report, not the history (that lives in the loggers): a resumed fit's
    history starts with it."""
    module = _mlp_module()
    monitor = DeadUnitMonitor()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, [monitor, ckpt]).fit(module)
    before = [(r.epoch, {k: v.active_count.tolist() for k, v in r.layers.items()}) for r in monitor.history]

    resumed = DeadUnitMonitor()
    trainer = _trainer(tmp_path, [resumed], max_epochs=3)
    trainer.fit(_mlp_module(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    after = [(r.epoch, {k: v.active_count.tolist() for k, v in r.layers.items()}) for r in resumed.history]
    assert len(before) == 2 and len(after) == 2
    assert after[0] == before[-1]
    assert after[1][0] == 2

    # direct round trip, and old checkpoints without the keys still load
    copy = DeadUnitMonitor()
    copy.load_state_dict(monitor.state_dict())
    assert [r.layers["net.3"].killed for r in copy.history] == [monitor.history[-1].layers["net.3"].killed]
    empty = DeadUnitMonitor()
    empty.load_state_dict({})
    assert empty.history == [] and empty.last_report is None


def test_a_callback_reused_for_a_new_fit_starts_afresh(tmp_path):
    """One monitor (with a reviver) and one initializer for two fresh fits of different models: the second fit's
    history, revivals and initialization are its own; a resumed fit gets its checkpoint's back."""
    from lightning_relu import ReluInitializer

    monitor = DeadUnitMonitor(revive=True)
    init = ReluInitializer("rai", seed=0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = _mlp_module()
    first.lr = 0.05
    _trainer(tmp_path, [init, monitor, ckpt], max_epochs=2).fit(first)
    assert [r.epoch for r in monitor.history] == [0, 1] and monitor.reviver.history
    assert init.rai_layers == ["net.0", "net.2"]
    saved = [(r.epoch, sorted(r.layers)) for r in monitor.history]

    torch.manual_seed(0)
    second = SeqModule(mlp([4, 3, 1], seed=5), torch.rand(8, 4))
    _trainer(tmp_path, [init, monitor], max_epochs=1).fit(second)
    assert [(r.epoch, sorted(r.layers)) for r in monitor.history] == [(0, ["net.1"])]
    assert [sorted(entry["revived"]) for entry in monitor.reviver.history] == [["net.1"]]
    assert init.applied and init.rai_layers == ["net.0"]  # another model: initialized (its own model: see
    # test_initializer's test_applied_once_per_instance, where a second stage keeps the trained weights)

    # resuming the first run: the checkpoint's last report, not the second run's
    _trainer(tmp_path, [monitor], max_epochs=3).fit(_mlp_module(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [(r.epoch, sorted(r.layers)) for r in monitor.history][:1] == saved[-1:]
    assert [r.epoch for r in monitor.history] == [1, 2]


def test_a_fit_resumed_mid_epoch_reports_the_whole_epoch(tmp_path):
    """A checkpoint saved in the middle of an epoch carries that epoch's counts so far: the resumed fit's report
    of the epoch equals an uninterrupted fit's. Every batch holds the same samples, so which batches Lightning runs
    after the resume does not matter; lr = 0 keeps the weights fixed."""
    block = torch.rand(4, 4, generator=torch.Generator().manual_seed(0)) - 0.3
    x = block.repeat(5, 1)  # 5 batches of 4, all alike

    def module():
        net = mlp([4, 6, 6, 1], seed=1)
        kill_units(net, 2, [1, 2])
        return SeqModule(net, x)

    whole = DeadUnitMonitor()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    _trainer(tmp_path, [whole, ckpt], max_epochs=1).fit(module())
    expected = brute_force(module().net, [x[i : i + 4] for i in range(0, 20, 4)], prefix="net.")
    _check_report(whole.history[0].layers, expected)

    resumed = DeadUnitMonitor()
    _trainer(tmp_path, [resumed], max_epochs=1).fit(module(), ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"))
    assert len(resumed.history) == 1
    _check_report(resumed.history[0].layers, expected)


class _TwiceModule(SeqModule):
    """One ReLU module applied twice: without tracing, its second position is a site created at run time."""

    def forward(self, x):
        return self.net[2](self.net[1](self.net[1](self.net[0](x)) - 0.3))


def test_a_mid_epoch_resume_restores_sites_created_at_run_time(tmp_path):
    block = torch.rand(4, 4, generator=torch.Generator().manual_seed(1)) - 0.3
    x = block.repeat(5, 1)

    def module():
        torch.manual_seed(2)
        return _TwiceModule(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1)), x)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    whole = DeadUnitMonitor(trace=False)
    _trainer(tmp_path, [whole, ckpt], max_epochs=1).fit(module())
    resumed = DeadUnitMonitor(trace=False)
    _trainer(tmp_path, [resumed], max_epochs=1).fit(module(), ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"))
    net = module().net
    with torch.no_grad():  # brute force over the 5 alike batches
        first = torch.relu(net[0](x))
        second = torch.relu(first - 0.3)
    for report in (whole.history[0].layers, resumed.history[0].layers):
        assert set(report) == {"net.1", "net.1_1"}
        assert report["net.1"].active_count.tolist() == (first > 0).sum(0).tolist()
        assert report["net.1_1"].active_count.tolist() == (second > 0).sum(0).tolist()
        assert report["net.1_1"].samples == 20


def test_state_key_differs_per_site_selection():
    assert DeadUnitMonitor().state_key != DeadUnitMonitor(sites=["net.1"]).state_key


def test_callback_pickles_before_and_after_fit(tmp_path):
    monitor = DeadUnitMonitor(sites=["net.1"], on_collapse="stop")
    clone = pickle.loads(pickle.dumps(monitor))
    assert clone.on_collapse == "stop" and clone.state_key == monitor.state_key
    _trainer(tmp_path, [monitor], max_epochs=1).fit(_mlp_module())
    clone = pickle.loads(pickle.dumps(monitor))
    assert clone.last_report["net.1"].dead.tolist() == monitor.last_report["net.1"].dead.tolist()
    assert monitor.tracker is None  # hooks removed at teardown
    assert all(len(m._forward_hooks) == 0 for m in _mlp_module().net.modules())


def test_hooks_removed_when_training_fails(tmp_path):
    class Failing(SeqModule):
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    base = _mlp_module()
    module = Failing(base.net, base.train_x)
    monitor = DeadUnitMonitor()
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(tmp_path, [monitor]).fit(module)
    assert all(len(m._forward_hooks) == 0 for m in module.modules())


def test_no_relu_warns_once_and_trains(tmp_path):
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    module = SeqModule(net, torch.rand(20, 4), lr=0.1)
    w0 = net[0].weight.detach().clone()
    monitor = DeadUnitMonitor()
    with pytest.warns(RuntimeWarning, match="found no `nn.ReLU`") as record:
        trainer = _trainer(tmp_path, [monitor])
        trainer.fit(module)
    assert sum("found no" in str(w.message) for w in record) == 1
    assert trainer.global_step == 10
    assert not torch.equal(w0, net[0].weight)
    assert monitor.history == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"on_collapse": "explode"}, r"`on_collapse` can be 'warn', 'raise', 'stop', got 'explode'"),
        ({"sites": "1"}, r"`sites` must be a sequence of site names or None, got '1'"),
        ({"sites": [1]}, r"`sites` must be a sequence of site names or None, got \[1\]"),
        ({"log_histograms": "yes"}, r"`log_histograms` must be a bool, got 'yes'"),
        ({"unit_dims": {"net.1": 2}}, r"`unit_dims` values must be 1 \(channels\) or -1 \(last dimension\)"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeadUnitMonitor(**kwargs)


def test_unknown_site_names_raise_at_setup(tmp_path):
    with pytest.raises(ValueError, match=r"unknown site names \['net.9'\].*\['net.1', 'net.3'\]"):
        _trainer(tmp_path, [DeadUnitMonitor(sites=["net.9"])]).fit(_mlp_module())


def test_unit_dims_reach_the_tracker(tmp_path):
    with pytest.raises(ValueError, match=r"`unit_dims` has unknown site names \['net.9'\]"):
        _trainer(tmp_path, [DeadUnitMonitor(unit_dims={"net.9": -1})]).fit(_mlp_module())
    # the Tanh hides the Linear from the ReLU: on (batch, time, features) inputs only `unit_dims` tells the axis
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.ReLU(), nn.Linear(5, 1))
    x = torch.randn(8, 7, 3)
    monitor = DeadUnitMonitor(unit_dims={"net.2": -1})
    _trainer(tmp_path, [monitor], max_epochs=1).fit(SeqModule(net, x))
    with torch.no_grad():
        out = torch.relu(torch.tanh(net[0](x))).reshape(-1, 5)
    report = monitor.last_report["net.2"]
    assert report.num_units == 5 and report.active_count.tolist() == (out > 0).sum(0).tolist()


def test_restricted_sites(tmp_path):
    monitor = DeadUnitMonitor(sites=["net.3"])
    trainer = _trainer(tmp_path, [monitor], max_epochs=1)
    trainer.fit(_mlp_module())
    assert list(monitor.last_report) == ["net.3"]
    assert "dead_units/net.1" not in trainer.callback_metrics


def _collapsing_module() -> SeqModule:
    module = _mlp_module()
    kill_units(module.net, 2, [0, 1, 2, 3, 4, 5])
    return module


def test_collapse_warns_once(tmp_path):
    monitor = DeadUnitMonitor()
    with pytest.warns(CollapseWarning, match=r"Site 'net.3' collapsed at epoch 0: all 6 units are dead") as record:
        _trainer(tmp_path, [monitor], max_epochs=3).fit(_collapsing_module())
    assert sum(issubclass(w.category, CollapseWarning) for w in record) == 1
    assert len(monitor.history) == 3
    assert monitor.last_report["net.3"].living_data_fraction == 0.0


def test_collapse_raise(tmp_path):
    with pytest.raises(CollapseError, match=r"Site 'net\.3' collapsed at epoch 0"):
        _trainer(tmp_path, [DeadUnitMonitor(on_collapse="raise")]).fit(_collapsing_module())


def test_collapse_stop(tmp_path):
    monitor = DeadUnitMonitor(on_collapse="stop")
    with pytest.warns(CollapseWarning, match="Stopping the fit"):
        trainer = _trainer(tmp_path, [monitor], max_epochs=5)
        trainer.fit(_collapsing_module())
    assert len(monitor.history) == 1
    assert trainer.current_epoch == 1


def test_early_stopping_can_watch_dead_units(tmp_path):
    monitor = DeadUnitMonitor()
    early = EarlyStopping(monitor="dead_units/total", mode="min", patience=1)
    trainer = _trainer(tmp_path, [monitor, early], max_epochs=6)
    trainer.fit(_mlp_module())  # lr=0: the dead share never improves, so it stops after patience + 1 epochs
    assert len(monitor.history) == 2
    assert early.stopped_epoch == 1


# --------------------------------------------------------------------- DDP
class _SplitModule(L.LightningModule):
    """Unit 0 fires only on x = +1 (rank 0's samples), unit 1 only on x = -1 (rank 1's), unit 2 never."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 3), nn.ReLU(), nn.Linear(3, 1))
        with torch.no_grad():
            self.net[0].weight.copy_(torch.tensor([[1.0], [-1.0], [0.0]]))
            self.net[0].bias.copy_(torch.tensor([0.0, 0.0, -1.0]))
        self.net[0].requires_grad_(False)
        self.extra = nn.ReLU()  # no producer in sight: sized by its first output, and only rank 0 calls it

    def forward(self, x):
        # a functional site in the LightningModule's own forward, which DDP runs inside `training_step` run as
        # the forward: counted once all the same. Unit 0 fires on rank 0's samples, unit 1 on rank 1's.
        return torch.nn.functional.relu(torch.cat([x, -x], dim=1))

    def training_step(self, batch, batch_idx):
        x = batch[0]
        if bool(x[0, 0] > 0):
            self.extra(x.expand(-1, 4))
            self.extra(x.expand(-1, 2) * 2)  # a second call only rank 0 makes: site `extra_1`, created there
        # after `self(x)`, a rectifier in `training_step` (run as the forward under DDP): not a call of the forward
        return self.net(x).pow(2).mean() + torch.nn.functional.relu(self(x) - 1.0).mean() * 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.net[2].parameters(), lr=0.01)

    def train_dataloader(self):
        # the Trainer runs with use_distributed_sampler=False: each rank gets only its own samples
        sign = 1.0 if self.global_rank == 0 else -1.0
        return DataLoader(TensorDataset(torch.full((8, 1), sign)), batch_size=2, shuffle=False)


class _DumpingMonitor(DeadUnitMonitor):
    def __init__(self, out_dir: str):
        super().__init__(track_margin=True)
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        states = [r.state_dict() for r in self.history]
        torch.save(states, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


@retry_spawn_abort
def test_ddp_reduces_across_ranks(tmp_path):
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        strategy=SpawnDDP(),
        accelerator="cpu",
        devices=2,
        max_epochs=1,
        callbacks=[_DumpingMonitor(str(tmp_path))],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
    )
    trainer.fit(_SplitModule())
    reports = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert len(reports[0]) == len(reports[1]) == 1
    layers = [{state["name"]: LayerReport.from_state_dict(state) for state in r[-1]["layers"]} for r in reports]
    # the same sites, in the same order, on both ranks
    assert list(layers[0]) == list(layers[1]) and sorted(layers[0]) == ["extra", "extra_1", "net.1", "relu"]
    layer = layers[0]["net.1"]
    # 16 samples: 8 with x = +1 (all on rank 0), 8 with x = -1 (all on rank 1)
    assert layer.samples == 16
    assert layer.active_count.tolist() == [8, 8, 0]
    assert layer.dead.tolist() == [False, False, True]
    assert layer.killed == 0
    for rank in (0, 1):
        other = layers[rank]["net.1"]
        assert other.active_count.tolist() == [8, 8, 0] and other.samples == 16
        extra = layers[rank]["extra"]
        assert extra.active_count.tolist() == [8, 8, 8, 8]
        assert extra.samples == 8
        assert extra.pre_mean.tolist() == [1.0, 1.0, 1.0, 1.0]  # only rank 0 fed it, with ones
        second = layers[rank]["extra_1"]
        assert second.active_count.tolist() == [8, 8] and second.samples == 8
        assert second.pre_mean.tolist() == [2.0, 2.0]
        functional = layers[rank]["relu"]  # each sample once: 8 per rank
        assert functional.samples == 16 and functional.active_count.tolist() == [8, 8]
    # the margin of net.1 sums both ranks: unit 0 sees +1 (rank 0) and -1 (rank 1), so its mean is 0
    assert layer.pre_mean.tolist() == [0.0, 0.0, -1.0]


def test_revive_flag_attaches_a_reviver_and_checkpoints_it(tmp_path):
    from lightning_relu import DeadUnitReviver

    with pytest.raises(ValueError, match="`revive` must be a bool or a `DeadUnitReviver`, got 'yes'"):
        DeadUnitMonitor(revive="yes")
    module = _mlp_module()
    module.lr = 0.05
    monitor = DeadUnitMonitor(revive=True)
    assert isinstance(monitor.reviver, DeadUnitReviver)
    trainer = _trainer(tmp_path, [monitor], max_epochs=2)
    trainer.fit(module)
    first = monitor.reviver.history[0]["revived"]
    assert first["net.1"] == monitor.history[0].layers["net.1"].num_dead > 0
    assert float(trainer.callback_metrics["revived/total"]) == sum(monitor.reviver.history[-1]["revived"].values())
    copy = DeadUnitMonitor(revive=True)
    copy.load_state_dict(monitor.state_dict())
    assert copy.reviver.history == monitor.reviver.history[-1:]  # the latest revival, and the totals
    assert copy.reviver.total_revived == sum(sum(e["revived"].values()) for e in monitor.reviver.history)
    assert pickle.loads(pickle.dumps(monitor)).reviver.history == monitor.reviver.history


def test_dying_units_are_logged(tmp_path):
    module = _mlp_module()
    monitor = DeadUnitMonitor(eps=0.3)
    trainer = _trainer(tmp_path, [monitor], max_epochs=1, limit_train_batches=4)
    trainer.fit(module)
    expected = brute_force(module.net, [module.train_x[i : i + 4] for i in range(0, 16, 4)], prefix="net.")
    for name, exp in expected.items():
        dying = [rate < 0.3 for rate in exp["rate"]]
        assert monitor.last_report[name].dying.tolist() == dying
        assert float(trainer.callback_metrics[f"dying_units/{name}"]) == pytest.approx(sum(dying) / len(dying))
    with pytest.raises(ValueError, match=r"`eps` must be a number in \[0, 1\], got 2"):
        DeadUnitMonitor(eps=2)


def test_nan_activations_warn_once_naming_site_and_epoch(tmp_path):
    class NaNModule(SeqModule):
        def training_step(self, batch, batch_idx):
            if self.current_epoch == 1 and batch_idx == 1:
                x = batch[0].clone()
                x[0, 0] = float("nan")
                with torch.no_grad():
                    self(x)  # an extra forward whose first sample is NaN at every site
            return super().training_step(batch, batch_idx)

    base = _mlp_module()
    module = NaNModule(base.net, base.train_x)
    monitor = DeadUnitMonitor()
    with pytest.warns(
        RuntimeWarning, match=r"Site 'net.1' produced NaN or Inf activations in 1 training batches of epoch 1"
    ) as record:
        _trainer(tmp_path, [monitor], max_epochs=3, limit_train_batches=3).fit(module)
    assert sum("produced NaN" in str(w.message) and "'net.1'" in str(w.message) for w in record) == 1
    assert [r.layers["net.1"].nonfinite_batches for r in monitor.history] == [0, 1, 0]
    layer = monitor.history[1].layers["net.1"]
    assert layer.samples == 16
    # brute force: the NaN sample's entries are not active, and it is not killed (its output is not all 0)
    x = module.train_x[:12].clone()
    extra = module.train_x[4:8].clone()
    extra[0, 0] = float("nan")
    with torch.no_grad():
        out = torch.cat([module.net[:2](x), module.net[:2](extra)])
    assert layer.active_count.tolist() == [int((out[:, u] > 0).sum()) for u in range(6)]
    assert layer.killed == sum(1 for row in out if bool((row == 0).all()))
    assert any(bool(row.isnan().all()) for row in out)  # the NaN sample's whole output is NaN: not killed


def test_states_the_alive_lower_bound_at_fit_start(tmp_path, caplog):
    import logging

    monitor = DeadUnitMonitor()
    with caplog.at_level(logging.INFO):
        _trainer(tmp_path, [monitor], max_epochs=1).fit(_mlp_module())
    assert monitor.alive_lower_bound == pytest.approx((1 - 2**-6) ** 2)  # two sites of width 6
    # 1 - (63/64)^2 = 0.03101...: at most 3.2% of inputs cut off (rounded up), and what prevents it
    assert "up to 3.2% of inputs can be cut off" in caplog.text and 'ReluInitializer("sign_flip")' in caplog.text


def test_alive_bound_text_is_a_lower_bound():
    from lightning_relu.monitor import _probability_text
    from lightning_relu.theory import alive_probability_lower_bound

    # (63/64)^2 = 3969/4096 = 0.96899...: rounded down to 4 significant digits
    assert _probability_text(alive_probability_lower_bound([6, 6]), [6, 6]) == "0.9689"
    assert _probability_text(alive_probability_lower_bound([14, 14]), [14, 14]) == "0.9998"  # 0.999878
    assert _probability_text(0.5**30, [1] * 30) == "9.313e-10"  # 9.3132257e-10
    # four sites of width 1024: the union bound is 4 * 2^-1024 = 2^-1022 (the product rounds to 1.0 in floats)
    assert _probability_text(alive_probability_lower_bound([1024] * 4), [1024] * 4) == "1 - 2^-1022"
    # five of width 16384: 2^-m = 5 * 2^-16384, m = 16381.678...: rounded down, never up
    assert _probability_text(1.0, [16384] * 5) == "1 - 2^-16381.67"
    widths = [20, 21]  # representable: the stated bound must not exceed the product
    text = _probability_text(alive_probability_lower_bound(widths), widths)
    exponent = float(text.removeprefix("1 - 2^-"))
    assert -math.log2(2**-20 + 2**-21) - 0.01 <= exponent <= -math.log2(2**-20 + 2**-21)
    assert 1 - 2**-exponent <= (1 - 2**-20) * (1 - 2**-21)


class _DriftingModule(SeqModule):
    """Unit-norm rows on Gaussian inputs, so z ~ N(bias, 1); from epoch 1 on, unit 0's bias sits at -3."""

    def on_train_epoch_start(self):
        if self.current_epoch >= 1:
            with torch.no_grad():
                self.net[0].bias[0] = -3.0


def _drifting_module() -> _DriftingModule:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 1))
    with torch.no_grad():
        net[0].weight.div_(net[0].weight.norm(dim=1, keepdim=True))
        net[0].bias.zero_()
    x = torch.randn(400, 10, generator=torch.Generator().manual_seed(1))
    return _DriftingModule(net, x)


def test_margin_at_risk_and_early_warning(tmp_path):
    from lightning_relu import DyingWarning

    module = _drifting_module()
    monitor = DeadUnitMonitor(track_margin=True)
    with pytest.warns(DyingWarning, match=r"Site 'net.1' is heading for death: at epoch 1 1 of its 20 units") as rec:
        trainer = _trainer(tmp_path, [monitor], max_epochs=3, limit_train_batches=100)
        trainer.fit(module)
    assert sum(issubclass(w.category, DyingWarning) for w in rec) == 1
    # brute force over the last epoch's data (weights fixed: lr = 0)
    with torch.no_grad():
        z = module.net[0](module.train_x).double()
    margin = z.mean(0) / z.std(0, unbiased=False)
    threshold = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.01)).item()
    layer = monitor.last_report["net.1"]
    torch.testing.assert_close(layer.margin, margin, rtol=1e-4, atol=1e-5)
    assert layer.at_risk.tolist() == (margin < threshold).tolist()
    assert float(trainer.callback_metrics["at_risk/net.1"]) == pytest.approx(
        float((margin < threshold).double().mean())
    )
    assert monitor.history[0].layers["net.1"].num_at_risk == 0


class _OrderModule(L.LightningModule):
    """Applies one ReLU module (`m`) and `F.relu` (`f`) in an order that changes at step 2, so the run-time
    positions are created in one order before a checkpoint at step 2 and in another after the resume."""

    def __init__(self, x):
        super().__init__()
        torch.manual_seed(3)
        self.fc, self.relu, self.x = nn.Linear(4, 4), nn.ReLU(), x
        self.orders = ("mf", "mf", "mf")  # discovery, steps < 2, steps >= 2

    def forward(self, x):
        order = self.orders[0] if not self.trainer_running else self.orders[1 if self.global_step < 2 else 2]
        for i, kind in enumerate(order):
            h = self.fc(x) - 0.2 * i
            x = self.relu(h) if kind == "m" else torch.nn.functional.relu(h)
        return x

    trainer_running = False

    def on_train_start(self):
        self.trainer_running = True

    def training_step(self, batch, batch_idx):
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x), batch_size=4)


def test_a_mid_epoch_resume_restores_run_time_positions_by_place_not_name(tmp_path):
    x = (torch.rand(4, 4, generator=torch.Generator().manual_seed(0)) - 0.3).repeat(5, 1)

    def module():
        m = _OrderModule(x)
        m.orders = ("mf", "mffmmf", "mfmm")
        return m

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    _trainer(tmp_path, [DeadUnitMonitor(), ckpt], max_epochs=1).fit(module())
    resumed = DeadUnitMonitor()
    _trainer(tmp_path, [resumed], max_epochs=1).fit(module(), ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"))
    expected, model = {}, module()
    with torch.no_grad():  # brute force per (kind, position)
        for step in range(5):
            h, seen = x[:4], {"m": 0, "f": 0}
            for i, kind in enumerate(model.orders[1 if step < 2 else 2]):
                h = torch.relu(model.fc(h) - 0.2 * i)
                place = (kind, seen[kind])
                seen[kind] += 1
                expected[place] = expected.get(place, 0) + (h > 0).sum(0)
    counted = sorted(r.active_count.tolist() for r in resumed.history[0].layers.values() if r.samples)
    assert counted == sorted(v.tolist() for v in expected.values())


class _SharedRelu(L.LightningModule):
    """One `nn.ReLU` after a Conv1d (units on dim 1) and again after a Linear on (batch, 20, 6) (units last), as
    torchvision's BasicBlock reuses its `relu`; 3 of the Linear's 10 features dead. The step calls `self.body`."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.ModuleDict({"conv": nn.Conv1d(3, 6, 3, padding=1), "relu": nn.ReLU(), "fc": nn.Linear(6, 10)})
        self.head = nn.Linear(10, 1)
        with torch.no_grad():
            self.body["fc"].bias[:3] = -100.0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        body = self.body
        return body["relu"](body["fc"](body["relu"](body["conv"](x)).transpose(1, 2)))

    def training_step(self, batch, batch_idx):
        return self.head(self.features(batch[0]).mean(1)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        x = torch.randn(32, 3, 20, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x), batch_size=8)


def _second_position(monitor: DeadUnitMonitor) -> tuple[int, int]:
    layer = monitor.history[-1].layers["body.relu_1"]
    return layer.num_units, layer.num_dead


def test_a_shared_relu_takes_each_call_positions_own_unit_axis_in_every_fit(tmp_path: Path) -> None:
    """The axis observed for the first call (channels) was given to the later one, whose units are the Linear's
    last dimension (20 positions counted as units, none dead); and a resumed or second fit lost the observed axes."""
    model = _SharedRelu()
    with torch.no_grad():  # brute force: the Linear's features that are never > 0
        seen = model.features(torch.randn(32, 3, 20, generator=torch.Generator().manual_seed(0)))
    truth = (10, int((seen.reshape(-1, 10) > 0).sum(0).eq(0).sum()))
    assert truth[1] >= 3  # the 3 killed, and any the data leaves dead
    monitor = DeadUnitMonitor()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = make_trainer(tmp_path, [monitor, checkpoint], max_epochs=1, limit_train_batches=4, logger=False)
    trainer.fit(model)
    assert _second_position(monitor) == truth
    trainer.fit_loop.max_epochs = 2  # a second fit on the same Trainer: a new tracker, the same axes
    trainer.fit(model)
    assert _second_position(monitor) == truth
    resumed = DeadUnitMonitor()  # from the middle of epoch 0: the whole epoch, with the axes of the step
    make_trainer(tmp_path, [resumed], max_epochs=1, limit_train_batches=4, logger=False).fit(
        _SharedRelu(), ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt")
    )
    assert _second_position(resumed) == truth and not resumed.history[-1].partial
    assert resumed.history[-1].layers["body.relu_1"].samples == 32
