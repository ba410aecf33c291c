"""The callbacks configured through ``LightningCLI``: YAML config files and command-line arguments."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_relu import DeadUnitMonitor, DeadUnitReviver, ReluInitializer

pytest.importorskip("jsonargparse")

pytestmark = [
    # jsonargparse >= 4.49 deprecations triggered inside Lightning's own cli.py, not by anything configured here
    pytest.mark.filterwarnings("ignore::jsonargparse._deprecated.JsonargparseDeprecationWarning"),
]


class CliRegressor(pl.LightningModule):
    """A small ReLU MLP with its own data, so the CLI needs no datamodule."""

    def __init__(self, width: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(4, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=generator)
        return DataLoader(TensorDataset(x, x[:, 0]), batch_size=16)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


TRAINER_ARGS = [
    "--trainer.max_epochs=2",
    "--trainer.accelerator=cpu",
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def _callbacks(cli: LightningCLI, kind: type) -> list:
    return [callback for callback in cli.trainer.callbacks if isinstance(callback, kind)]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when ``sys.argv`` holds arguments besides ``args``: here they would be pytest's."""
    monkeypatch.setattr("sys.argv", ["lightning"])


def _cli(args: list[str], tmp_path: Path) -> LightningCLI:
    return LightningCLI(
        CliRegressor,
        args=[*args, f"--trainer.default_root_dir={tmp_path}"],
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
    )


def test_callbacks_from_a_yaml_config_file(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        """\
trainer:
  callbacks:
    - class_path: lightning_relu.ReluInitializer
      init_args:
        method: rai+sign_flip
        seed: 3
        max_samples: 32
    - class_path: lightning_relu.DeadUnitMonitor
      init_args:
        eps: 0.05
        on_collapse: stop
        sites: [net.1]
        print_summary: false
"""
    )
    cli = _cli(["fit", f"--config={config}", *TRAINER_ARGS], tmp_path)
    (initializer,) = _callbacks(cli, ReluInitializer)
    assert (initializer.method, initializer.seed, initializer.max_samples) == ("rai+sign_flip", 3, 32)
    assert initializer.applied and initializer.seed_used == 3
    assert set(initializer.report) == {"net.1", "net.3"}
    (monitor,) = _callbacks(cli, DeadUnitMonitor)
    assert monitor.eps == 0.05 and monitor.on_collapse == "stop" and monitor.print_summary is False
    assert [report.epoch for report in monitor.history] == [0, 1]
    assert list(monitor.last_report) == ["net.1"]
    assert monitor.last_report["net.1"].eps == 0.05
    assert monitor.last_report["net.1"].samples == 64


def test_callbacks_from_the_command_line(tmp_path: Path) -> None:
    cli = _cli(
        [
            "fit",
            *TRAINER_ARGS,
            "--trainer.callbacks+=lightning_relu.DeadUnitMonitor",
            "--trainer.callbacks.init_args.eps=0.05",
            "--trainer.callbacks.init_args.print_summary=false",
            "--trainer.callbacks+=lightning_relu.ReluInitializer",
            "--trainer.callbacks.init_args.method=sign_flip",
            "--model.width=6",
        ],
        tmp_path,
    )
    (monitor,) = _callbacks(cli, DeadUnitMonitor)
    assert monitor.eps == 0.05
    assert [report.epoch for report in monitor.history] == [0, 1]
    assert {report.num_units for report in monitor.last_report.values()} == {6}
    (initializer,) = _callbacks(cli, ReluInitializer)
    assert initializer.method == "sign_flip" and initializer.applied


def test_revive_true_from_yaml(tmp_path: Path) -> None:
    """``revive: true`` (the ``bool`` branch of ``bool | DeadUnitReviver``) parses and attaches a reviver."""
    config = tmp_path / "config.yaml"
    config.write_text(
        """\
trainer:
  callbacks:
    - class_path: lightning_relu.DeadUnitMonitor
      init_args:
        revive: true
        print_summary: false
"""
    )
    cli = _cli(["fit", f"--config={config}", *TRAINER_ARGS], tmp_path)
    (monitor,) = _callbacks(cli, DeadUnitMonitor)
    assert isinstance(monitor.reviver, DeadUnitReviver)
    assert len(monitor.reviver.history) == 2


def test_revive_with_a_configured_reviver_from_yaml(tmp_path: Path) -> None:
    """``revive`` given as a nested ``class_path: lightning_relu.DeadUnitReviver`` with its own arguments."""
    config = tmp_path / "config.yaml"
    config.write_text(
        """\
trainer:
  callbacks:
    - class_path: lightning_relu.DeadUnitMonitor
      init_args:
        print_summary: false
        revive:
          class_path: lightning_relu.DeadUnitReviver
          init_args:
            max_fraction: 0.5
            init: rai
            seed: 7
"""
    )
    cli = _cli(["fit", f"--config={config}", *TRAINER_ARGS], tmp_path)
    (monitor,) = _callbacks(cli, DeadUnitMonitor)
    assert isinstance(monitor.reviver, DeadUnitReviver)
    assert (monitor.reviver.max_fraction, monitor.reviver.init, monitor.reviver.seed) == (0.5, "rai", 7)
    assert len(monitor.reviver.history) == 2


def test_print_config_round_trips_the_callbacks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--print_config`` writes a YAML that names the callbacks and their arguments (what users save and edit)."""
    with pytest.raises(SystemExit) as info:
        _cli(
            [
                "fit",
                *TRAINER_ARGS,
                "--trainer.callbacks+=lightning_relu.DeadUnitMonitor",
                "--trainer.callbacks.init_args.eps=0.05",
                "--trainer.callbacks.init_args.revive=true",
                "--trainer.callbacks+=lightning_relu.ReluInitializer",
                "--trainer.callbacks.init_args.method=rai",
                "--print_config",
            ],
            tmp_path,
        )
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: lightning_relu.DeadUnitMonitor" in printed
    assert "class_path: lightning_relu.ReluInitializer" in printed
    assert "eps: 0.05" in printed and "revive: true" in printed and "method: rai" in printed


def test_bad_callback_argument_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A value the constructor rejects stops the CLI with the constructor's message."""
    with pytest.raises((SystemExit, ValueError)) as info:
        _cli(
            [
                "fit",
                *TRAINER_ARGS,
                "--trainer.callbacks+=lightning_relu.DeadUnitMonitor",
                "--trainer.callbacks.init_args.on_collapse=explode",
            ],
            tmp_path,
        )
    message = str(info.value) + capsys.readouterr().err
    assert "on_collapse" in message


DOCS_YAML = Path(__file__).resolve().parent.parent / "docs" / "examples" / "lightning_cli.yaml"


def test_the_documented_yaml_configures_and_trains(tmp_path: Path) -> None:
    """The configuration shown on the LightningCLI docs page, as written there."""
    cli = _cli(["fit", f"--config={DOCS_YAML}", *TRAINER_ARGS], tmp_path)
    (initializer,) = _callbacks(cli, ReluInitializer)
    assert initializer.method == "rai+sign_flip" and initializer.seed == 0 and initializer.applied
    (monitor,) = _callbacks(cli, DeadUnitMonitor)
    assert monitor.on_collapse == "stop" and monitor.eps == 0.01
    assert isinstance(monitor.reviver, DeadUnitReviver)
    assert (monitor.reviver.init, monitor.reviver.max_fraction) == ("rai", 0.5)
    assert [report.epoch for report in monitor.history] == [0, 1]
    assert len(monitor.reviver.history) == 2


@pytest.mark.parametrize(
    ("key", "bad", "allowed"),
    [
        ("DeadUnitMonitor.init_args.on_collapse", "stopp", ["warn", "raise", "stop"]),
        ("ReluInitializer.init_args.method", "rai+signflip", ["rai", "sign_flip", "rai+sign_flip"]),
    ],
)
def test_a_typo_in_a_string_option_fails_at_parse_time(
    key: str, bad: str, allowed: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``Literal`` annotations: jsonargparse rejects the value while parsing, naming the values it accepts."""
    callback, _, option = key.partition(".init_args.")
    constructed: list[object] = []
    with pytest.MonkeyPatch.context() as mp:
        # a constructor that runs would record itself: a parse-time error constructs nothing
        for kind in (DeadUnitMonitor, ReluInitializer):
            original = kind.__init__

            def spy(self: object, *args: object, _original=original, **kwargs: object) -> None:
                constructed.append(self)
                _original(self, *args, **kwargs)

            mp.setattr(kind, "__init__", spy)
        with pytest.raises(SystemExit) as info:
            _cli(
                [
                    "fit",
                    *TRAINER_ARGS,
                    f"--trainer.callbacks+=lightning_relu.{callback}",
                    f"--trainer.callbacks.init_args.{option}={bad}",
                ],
                tmp_path,
            )
    assert info.value.code != 0
    assert constructed == []
    err = capsys.readouterr().err
    assert bad in err
    for value in allowed:
        assert value in err


def test_reviver_init_is_a_literal_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        """\
trainer:
  callbacks:
    - class_path: lightning_relu.DeadUnitMonitor
      init_args:
        revive:
          class_path: lightning_relu.DeadUnitReviver
          init_args:
            init: he
"""
    )
    with pytest.raises(SystemExit):
        _cli(["fit", f"--config={config}", *TRAINER_ARGS], tmp_path)
    err = capsys.readouterr().err
    assert "he" in err and "kaiming" in err
