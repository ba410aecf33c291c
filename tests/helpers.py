"""Shared test models, trainers and references (independent of the code under test); the brute-force oracle itself is
``tests.conftest.expected_counts``."""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import shutil
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.multiprocessing.spawn import ProcessExitedException
from torch.utils.data import DataLoader, TensorDataset

from lightning_relu import DeadUnitMonitor, LayerReport
from tests.conftest import expected_counts


def mlp(widths: list[int], seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 2):
        layers += [nn.Linear(widths[i], widths[i + 1]), nn.ReLU()]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers)


def conv_bn_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 7),
        nn.ReLU(),
        nn.Linear(7, 2),
    )


def kill_units(model: nn.Sequential, index: int, units: list[int]) -> None:
    """Make `units` of the layer at `index` (a Linear or a BatchNorm) output a large negative pre-activation."""
    with torch.no_grad():
        model[index].bias[units] = -1e4


def brute_force(model: nn.Sequential, batches: list[Tensor], prefix: str = "") -> dict[str, dict]:
    """Run `model` layer by layer and measure every ReLU output with the oracle (``tests.conftest.expected_counts``)."""
    acts: dict[str, list[Tensor]] = {}
    with torch.no_grad():
        for x in batches:
            for i, layer in enumerate(model):
                x = layer(x)
                if isinstance(layer, (nn.ReLU, nn.ReLU6)):
                    acts.setdefault(f"{prefix}{i}", []).append(x.clone())
    result = {}
    for name, outs in acts.items():
        counts = expected_counts(outs, 1)  # (N, C) or (N, C, H, W): the unit is dim 1 in both
        active, entries, samples, killed = counts["active"], counts["entries"], counts["samples"], counts["killed"]
        result[name] = {
            "active": active,
            "dead": [a == 0 for a in active],
            "rate": [a / entries for a in active],
            "killed": killed,
            "samples": samples,
            "living": 1 - killed / samples,
        }
    return result


def make_trainer(tmp_path, callbacks, **overrides) -> L.Trainer:
    """A small CPU Trainer for tests: 2 epochs of 5 batches, 2 validation batches, logging every step."""
    settings = dict(
        default_root_dir=tmp_path,
        max_epochs=2,
        limit_train_batches=5,
        limit_val_batches=2,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    settings.update(overrides)
    return L.Trainer(callbacks=callbacks, **settings)


class SpawnDDP(DDPStrategy):
    """``ddp_spawn`` on CPU whose ranks leave the process group together when the fit is torn down.

    Lightning leaves a gloo process group to interpreter exit, where gloo aborts a rank now and then ("terminate called
    without an active exception", SIGABRT) after a finished fit: 15 of 50 fits of two of our ``ddp_spawn`` tests here.
    Here both ranks free what holds gloo work, meet at a barrier and destroy the group in the strategy's teardown,
    which runs in each spawned rank after the fit and before the rank returns (Lightning sends rank 0's results back
    without a collective): 0 of 50. ``tests/faults/test_distributed.py`` ends its ranks the same way.

    Lightning calls ``on_fit_end`` and the ``teardown`` hooks after the strategy's teardown: a test callback that needs
    a collective must use an earlier hook (``on_train_end``), as the tests here do.
    """

    def __init__(self, **kwargs: Any) -> None:
        # a rank waiting in a collective the other never joins fails after the timeout instead of hanging
        kwargs.setdefault("timeout", timedelta(seconds=120))
        super().__init__(start_method="spawn", **kwargs)

    def teardown(self) -> None:
        super().teardown()
        if dist.is_available() and dist.is_initialized():
            gc.collect()  # DDP's reducer (the unwrapped wrapper) holds gloo work: freed while the group is whole
            dist.barrier()
            dist.destroy_process_group()


def retry_spawn_abort(test: Callable[..., Any]) -> Callable[..., Any]:
    """Run a ``ddp_spawn`` test again (twice at most) when a rank died of SIGABRT.

    A second guard beside :class:`SpawnDDP` (whose teardown removes the known cause): gloo's CPU process groups have
    aborted a rank while the ranks tear down after a finished fit; an error raised by Python in a rank is reported
    differently and is never retried. The test's ``tmp_path`` is emptied before a retry so that nothing a failed
    attempt wrote is read.
    """

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(3):
            try:
                return test(*args, **kwargs)
            except ProcessExitedException as err:
                if err.signal_name != "SIGABRT" or attempt == 2:
                    raise
                tmp_path = kwargs.get("tmp_path")
                if isinstance(tmp_path, Path):
                    for child in tmp_path.iterdir():
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise AssertionError("unreachable")

    return run


@contextlib.contextmanager
def counting_path(path: str) -> Iterator[None]:
    """Count CPU outputs inside the block with the CPU path (``"cpu"``: chunks of samples into reused buffers) or
    with the plain ATen operations that GPU tensors, tensor subclasses and ``torch.compile`` take (``"plain"``)."""
    import lightning_relu.functional as functional

    if path not in ("cpu", "plain"):
        raise ValueError(f"path must be 'cpu' or 'plain', got {path!r}")
    original = functional._workspace
    if path == "plain":
        functional._workspace = lambda output, axis, cached: None
    try:
        yield
    finally:
        functional._workspace = original


# ------------------------------------------------------------------------------------------------ replayed by hand
# Models whose rectifier outputs the tests replay by hand (``torch.clamp`` for the rectifier, ``F.linear``/``F.conv2d``/
# ``F.batch_norm`` for the rest) on the same data, measured by the oracle (``tests.conftest.expected_counts``). In
# Lightning fits the replay runs inside ``training_step`` with the weights of that step.


def assert_report(report: dict[str, LayerReport], expected: dict[str, dict], exact_keys: bool = True) -> None:
    if exact_keys:
        assert set(report) == set(expected)
    for name, exp in expected.items():
        layer = report[name]
        assert layer.num_units == exp["num_units"], name
        assert layer.active_count.tolist() == exp["active"], name
        assert layer.dead.tolist() == exp["dead"], name
        assert layer.entries_per_unit == exp["entries"], name
        assert layer.samples == exp["samples"], name
        assert layer.killed == exp["killed"], name
        assert layer.living_data_fraction == pytest.approx(1 - exp["killed"] / exp["samples"]), name
        assert layer.nonfinite == exp.get("nonfinite", False), name
        if exp.get("nonfinite"):
            assert math.isnan(layer.dead_fraction) and not layer.collapsed, name
        else:
            assert layer.dead_fraction == pytest.approx(sum(exp["dead"]) / exp["num_units"]), name


def clamp(x: Tensor) -> Tensor:
    return torch.clamp(x, min=0)


def bn(x: Tensor, norm: nn.BatchNorm1d | nn.BatchNorm2d) -> Tensor:
    """BatchNorm by hand, with the statistics a module in ``norm``'s mode would use (running stats not updated)."""
    if norm.training:
        return F.batch_norm(x, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
    return F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, training=False, eps=norm.eps)


def lin(x: Tensor, layer: nn.Linear) -> Tensor:
    return F.linear(x, layer.weight, layer.bias)


def conv(x: Tensor, layer: nn.Conv2d) -> Tensor:
    return F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def params_of(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_params(before: dict[str, Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert set(before) == set(after)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


# ------------------------------------------------------------------------------------------------ models


class AllFunctional(nn.Module):
    """Every functional rectifier form, one per layer, each fed by its own Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 5)
        self.fc3 = nn.Linear(5, 7)
        self.fc4 = nn.Linear(7, 4)
        self.fc5 = nn.Linear(4, 6)
        self.fc6 = nn.Linear(6, 5)
        self.fc7 = nn.Linear(5, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.fc1(x))
        h = torch.relu(self.fc2(h))
        h = torch.relu_(self.fc3(h))
        h = self.fc4(h).relu()
        h = F.relu6(self.fc5(h))
        h = self.fc6(h).relu_()
        h = F.relu(self.fc7(h), inplace=True)
        return self.head(h)

    @staticmethod
    def replay(m: AllFunctional, x: Tensor) -> dict[str, Tensor]:
        outs = {}
        h = outs["relu"] = clamp(lin(x, m.fc1))
        h = outs["relu_1"] = clamp(lin(h, m.fc2))
        h = outs["relu_2"] = clamp(lin(h, m.fc3))
        h = outs["relu_3"] = clamp(lin(h, m.fc4))
        h = outs["relu6"] = torch.clamp(lin(h, m.fc5), 0, 6)
        h = outs["relu_4"] = clamp(lin(h, m.fc6))
        outs["relu_5"] = clamp(lin(h, m.fc7))
        return outs

    def kill(self) -> None:
        with torch.no_grad():
            self.fc1.bias[[0, 3]] = -1e4
            self.fc3.bias[2] = -1e4
            self.fc5.bias[:5] = -1e4  # at most one unit left at the relu6 site
            self.fc7.bias[1] = -1e4


FUNCTIONAL_SITES = {
    # name: (producer, consumer, width)
    "relu": ("fc1", "fc2", 6),
    "relu_1": ("fc2", "fc3", 5),
    "relu_2": ("fc3", "fc4", 7),
    "relu_3": ("fc4", "fc5", 4),
    "relu6": ("fc5", "fc6", 6),
    "relu_4": ("fc6", "fc7", 5),
    "relu_5": ("fc7", "head", 3),
}


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one `nn.ReLU(inplace=True)` object applied twice, optional 1x1-conv shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(4, 4)
        self.layer2 = BasicBlock(4, 6, stride=2)
        self.layer3 = BasicBlock(6, 6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))

    @staticmethod
    def replay(m: TinyResNet, x: Tensor) -> dict[str, Tensor]:
        outs = {}
        h = outs["stem.2"] = clamp(bn(conv(x, m.stem[0]), m.stem[1]))
        for name in ("layer1", "layer2", "layer3"):
            block = getattr(m, name)
            a = outs[f"{name}.relu"] = clamp(bn(conv(h, block.conv1), block.bn1))
            b = bn(conv(a, block.conv2), block.bn2)
            identity = h if block.downsample is None else bn(conv(h, block.downsample[0]), block.downsample[1])
            h = outs[f"{name}.relu_1"] = clamp(b + identity)
        return outs


# ------------------------------------------------------------------------------------------------ Lightning


class Replayed(L.LightningModule):
    """Wraps ``net`` as ``self.net``; every training step first replays it by hand and records each site's output.

    ``recorded[epoch][site]`` lists the outputs of every training forward, measured with the weights of that step.
    """

    def __init__(
        self,
        net: nn.Module,
        replay: Callable[[nn.Module, Tensor], dict[str, Tensor]],
        train_x: Tensor,
        val_x: Tensor | None = None,
        lr: float = 0.05,
        batch_size: int = 4,
    ) -> None:
        super().__init__()
        self.net = net
        self.replay_fn = replay
        self.train_x = train_x
        self.val_x = val_x
        self.lr = lr
        self.batch_size = batch_size
        self.recorded: dict[int, dict[str, list[Tensor]]] = {}

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def record(self, x: Tensor) -> None:
        with torch.no_grad():
            outs = self.replay_fn(self.net, x)
        epoch = self.recorded.setdefault(self.current_epoch, {})
        for name, out in outs.items():
            epoch.setdefault(f"net.{name}", []).append(out.detach().clone())

    def inputs(self, batch) -> Tensor:
        return batch[0].to(next(self.parameters()).dtype)

    def training_step(self, batch, batch_idx):
        x = self.inputs(batch)
        self.record(x)
        return self(x).float().pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self(self.inputs(batch)).float().pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.train_x), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        x = self.val_x if self.val_x is not None else self.train_x
        return DataLoader(TensorDataset(x), batch_size=self.batch_size)

    def expected(self, epoch: int, unit_axis: int = -1) -> dict[str, dict]:
        return {name: expected_counts(outs, unit_axis) for name, outs in self.recorded[epoch].items()}


class MLP(nn.Sequential):
    """4 -> 8 -> 8 -> 1 with an in-place ReLU; unit 0 reads -sum(x) (dead on positive data), units 1-6 of the
    second layer are dead (so some samples are killed there)."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        super().__init__(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 1))
        with torch.no_grad():
            self[0].weight[0] = -1.0
            self[0].bias[0] = 0.0
            self[2].bias[1:7] = -1e4

    @staticmethod
    def replay(m: MLP, x: Tensor) -> dict[str, Tensor]:
        a = clamp(lin(x, m[0]))
        return {"1": a, "3": clamp(lin(a, m[2]))}


def positive_data(n: int, features: int = 4, seed: int = 0) -> Tensor:
    return torch.rand(n, features, generator=torch.Generator().manual_seed(seed)) + 0.01


def quiet_trainer(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    """``make_trainer`` without checkpoints or a logger."""
    return make_trainer(tmp_path, callbacks, **{"enable_checkpointing": False, "logger": False, **kwargs})


def assert_monitor_matches(monitor: DeadUnitMonitor, module: Replayed, unit_axis: int = -1) -> None:
    assert [h.epoch for h in monitor.history] == sorted(module.recorded)
    for epoch_report in monitor.history:
        assert_report(epoch_report.layers, module.expected(epoch_report.epoch, unit_axis))


class AutoEncoder(L.LightningModule):
    """The layout of Lightning's own first example: ``training_step`` calls ``self.decoder(self.encoder(x))``, never
    the module's forward (which is the encoder alone). Units ``dead`` of ``encoder.1`` and of ``decoder.1`` read a
    bias of -1e4 (dead on any input near 0)."""

    def __init__(self, dead: tuple[int, ...] = (1, 4), lr: float = 0.01) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        self.decoder = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 6))
        with torch.no_grad():
            for layer in (self.encoder[0], self.decoder[0]):
                layer.bias[list(dead)] = -1e4
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return F.mse_loss(self.decoder(self.encoder(x)), x)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        x = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x), batch_size=8)
