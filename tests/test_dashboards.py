from __future__ import annotations

import itertools
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lightning_relu import DeadUnitMonitor, EpochReport, LayerReport
from lightning_relu.dashboards import (
    HEATMAP_TAG,
    HEATMAP_WIDTH,
    SUMMARY_COLUMNS,
    SUMMARY_TAG,
    custom_scalars_layout,
    dead_fraction_color,
    dead_fraction_heatmap,
    summary_markdown,
    summary_text,
)
from tests.test_monitor import _mlp_module, _trainer


def _layer(name: str, dead: int, units: int = 8, seen: bool = True) -> LayerReport:
    counts = torch.tensor([0] * dead + [3] * (units - dead))
    return LayerReport.from_counts(name, counts, entries_per_unit=5 if seen else 0, samples=5 if seen else 0, killed=0)


def _luminance(rgb) -> float:
    r, g, b = rgb
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_color_ramp_is_monotone_and_grey_for_unseen():
    colors = [dead_fraction_color(k / 100) for k in range(101)]
    lum = [_luminance(c) for c in colors]
    assert all(a > b for a, b in itertools.pairwise(lum))  # darker as more units die
    assert colors[0] == (255, 255, 204) and colors[-1] == (128, 0, 38)
    assert dead_fraction_color(math.nan) == (200, 200, 200)
    assert dead_fraction_color(-1.0) == colors[0] and dead_fraction_color(2.0) == colors[-1]


def test_heatmap_has_a_cell_for_every_site_and_epoch():
    history = [
        EpochReport(e, 10 * e, {"a": _layer("a", e), "b": _layer("b", 2 * e), "c": _layer("c", 0, seen=e > 0)})
        for e in range(4)
    ]
    image = dead_fraction_heatmap(history)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    present = {tuple(int(v) for v in px) for px in image.reshape(-1, 3)}
    for report in history:
        for layer in report.layers.values():
            expected = dead_fraction_color(layer.dead_fraction if layer.seen else math.nan)
            assert expected in present
    taller = dead_fraction_heatmap(history, sites=["a", "b", "c"] * 4)  # a row per site given
    assert taller.shape[0] > image.shape[0]


def test_a_heatmap_of_more_epochs_than_pixels_shows_the_last_epoch_each_pixel_covers():
    # a fit of 1000 epochs (Lightning's default `max_epochs`): the grid has about 250 pixel columns
    history = [EpochReport(e, e, {"a_long_site_name.layer.1": _layer("a_long_site_name.layer.1", e // 125)}) for e in
               range(1000)]  # fmt: skip
    image = dead_fraction_heatmap(history)
    assert image.shape[1] == HEATMAP_WIDTH
    row = image[30 + 10, :]  # the middle of the site's row
    colours = [tuple(int(v) for v in px) for px in row]
    expected = [dead_fraction_color(d / 8) for d in range(8)]  # every dead count of the history, none other
    shown = [c for c in dict.fromkeys(colours) if c in expected]
    assert shown == expected  # in epoch order, from the first epoch's to the last's
    assert colours[HEATMAP_WIDTH - 76 - 1] == dead_fraction_color(7 / 8)  # the last pixel column: the last epoch


@pytest.mark.parametrize("epochs", [1, 8, 60])
def test_heatmap_is_legible_at_tensorboard_size(epochs):
    """The same width whatever the number of epochs (TensorBoard's image cards show it at its own size), every
    colour of the ramp from 0 to 100% dead in the colour bar, and the grey swatch of an unseen site."""
    history = [EpochReport(e, e, {"a": _layer("a", min(e, 8))}) for e in range(epochs)]
    image = dead_fraction_heatmap(history)
    assert image.shape[1] == HEATMAP_WIDTH
    right = image[:, -76:].reshape(-1, 3)  # the colour bar's strip
    colours = {tuple(int(v) for v in px) for px in right}
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        expected = np.array(dead_fraction_color(fraction))
        assert min(np.abs(np.array(c) - expected).sum() for c in colours) <= 6, fraction
    assert dead_fraction_color(math.nan) in colours


def test_summary_tables_carry_the_report_numbers():
    report = EpochReport(3, 30, {"enc.1": _layer("enc.1", 2), "enc.3": _layer("enc.3", 8)})
    md = summary_markdown(report, revived={"enc.1": 5})
    assert "**Epoch 3**: 10 of 16 units dead (62.5%)" in md
    assert "| ReLU site | units | dead units | dying units | samples alive | revived, whole fit |" in md
    assert "| enc.1 | 8 | 2 (25%) | 2 (25%) | 100.0% | 5 |" in md
    assert "| enc.3 | 8 | 8 (100%) | 8 (100%) | 100.0% | 0 |" in md
    for column, meaning in SUMMARY_COLUMNS.items():  # every column explained under the table
        assert f"- *{column}*: {meaning}" in md
    text = summary_text(report)
    assert "epoch 3: 10 of 16 ReLU units dead" in text and "revived" not in text
    header = text.splitlines()[1].split("  ")
    columns = ["ReLU site", "units", "dead units", "dying units", "samples alive"]
    assert [h.strip() for h in header if h.strip()] == columns
    assert "dead: 0 on every sample of the epoch" in text.splitlines()[-1]
    assert (
        custom_scalars_layout(revival=True)["lightning_relu"].keys() > custom_scalars_layout()["lightning_relu"].keys()
    )


def test_monitor_writes_layout_heatmap_and_summary(tmp_path, capsys):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    monitor = DeadUnitMonitor(revive=True)
    _trainer(tmp_path, [monitor], logger=logger, max_epochs=3).fit(_mlp_module())
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert len(events.Images(HEATMAP_TAG)) == 3
    assert events.Images(HEATMAP_TAG)[-1].width == HEATMAP_WIDTH
    assert "custom_scalars__config__" in events.PluginTagToContent("custom_scalars")
    (text_tag,) = events.PluginTagToContent("text")
    assert text_tag.startswith(SUMMARY_TAG)
    summary = events.Tensors(text_tag)[-1].tensor_proto.string_val[0].decode()
    for name, layer in monitor.last_report.items():
        assert f"| {name} | {layer.num_units} | {layer.num_dead} (" in summary
    out = capsys.readouterr().out
    assert f"epoch 2: {monitor.history[-1].total_dead} of 12 ReLU units dead" in out
    assert "revived, whole fit" in out


@pytest.mark.parametrize("dashboards", [False])
def test_dashboards_and_summary_can_be_turned_off(tmp_path, capsys, dashboards):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    monitor = DeadUnitMonitor(dashboards=dashboards, print_summary=False)
    _trainer(tmp_path, [monitor], logger=logger, max_epochs=1).fit(_mlp_module())
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert events.Tags()["images"] == []
    assert "units dead" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="`dashboards` must be a bool, got 1"):
        DeadUnitMonitor(dashboards=1)


def test_console_summary_uses_rich_when_installed(monkeypatch):
    """With `rich` importable, the summary is a rich Table with one row per site (a stand-in module records it)."""
    import sys
    import types

    from lightning_relu.dashboards import print_summary

    printed = []

    class Table:
        def __init__(self, title="", caption=""):
            self.title, self.caption, self.columns, self.rows = title, caption, [], []

        def add_column(self, name, justify="left"):
            self.columns.append(name)

        def add_row(self, *cells):
            self.rows.append(cells)

    class Console:
        def print(self, table):
            printed.append(table)

    monkeypatch.setitem(sys.modules, "rich", types.ModuleType("rich"))
    monkeypatch.setitem(sys.modules, "rich.console", types.SimpleNamespace(Console=Console))
    monkeypatch.setitem(sys.modules, "rich.table", types.SimpleNamespace(Table=Table))
    report = EpochReport(1, 10, {"a": _layer("a", 4), "b": _layer("b", 0)})
    print_summary(report, revived={"a": 2})
    (table,) = printed
    assert "4 of 16 ReLU units dead" in table.title
    assert table.columns == ["ReLU site", "units", "dead units", "dying units", "samples alive", "revived, whole fit"]
    assert table.rows == [
        ("a", "8", "4 (50%)", "4 (50%)", "100.0%", "2"),
        ("b", "8", "0 (0%)", "0 (0%)", "100.0%", "0"),
    ]


class _LossModule(L.LightningModule):
    """A small ReLU MLP that logs its loss per epoch, as most LightningModules do."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = self(x).pow(2).mean()
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def train_dataloader(self):
        x = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=8)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(tmp_path, callbacks, loggers, epochs=3):
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=epochs,
        logger=loggers,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    trainer.fit(_LossModule())
    return trainer


def test_monitor_rows_line_up_with_lightning_epoch_metrics_in_csv(tmp_path):
    """Every epoch: the monitor's row and the row of Lightning's epoch-level ``train_loss`` share step and epoch."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="csv")
    monitor = DeadUnitMonitor(print_summary=False)
    _fit(tmp_path, [monitor], [logger])
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    lightning = {int(float(r["epoch"])): int(r["step"]) for r in rows if r.get("train_loss")}
    ours = {int(float(r["epoch"])): int(r["step"]) for r in rows if r.get("dead_units/total")}
    assert sorted(ours) == [0, 1, 2] == [report.epoch for report in monitor.history]
    assert ours == lightning
    # 5 batches per epoch: Lightning logs an epoch at its last step, 4, 9, 14
    assert list(ours.values()) == [4, 9, 14]
    values = {int(float(r["epoch"])): float(r["dead_units/total"]) for r in rows if r.get("dead_units/total")}
    for report in monitor.history:
        dead = sum(int(layer.dead.sum()) for layer in report.layers.values())
        units = sum(int(layer.dead.numel()) for layer in report.layers.values())
        assert values[report.epoch] == pytest.approx(dead / units)


def test_tensorboard_opens_on_the_overview(tmp_path):
    """TensorBoard's Time Series tab orders groups (tags' first component) alphabetically: the overview groups come
    first, the heatmap is among the dead-unit charts, and the per-unit histograms sit after them under per_unit/."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    _fit(tmp_path, [DeadUnitMonitor(print_summary=False, track_margin=True)], [logger], epochs=2)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert tags["histograms"] and all(tag.startswith("per_unit/") for tag in tags["histograms"])
    assert {tag.split("/")[1] for tag in tags["histograms"]} == {"activation_rate", "margin"}
    assert tags["images"] == [HEATMAP_TAG] and HEATMAP_TAG.startswith("dead_units/")
    groups = sorted({tag.split("/")[0] for kind in ("scalars", "images", "histograms") for tag in tags[kind]})
    # at_risk/ (track_margin=True only) is the early-warning share of each site: an overview chart too
    assert groups[:2] == ["at_risk", "dead_units"]
    assert groups.index("per_unit") > max(groups.index(g) for g in ("dead_units", "dying_units", "living_data"))
    # histograms and the image at the step of the epoch's scalars
    steps = [e.step for e in events.Scalars("dead_units/total")]
    assert [e.step for e in events.Images(HEATMAP_TAG)] == steps
    assert [e.step for e in events.Histograms(tags["histograms"][0])] == steps


def test_start_of_fit_advice_only_when_it_tells_something_to_do(tmp_path, caplog):
    """Narrow layers without an initializer: one plain sentence naming the remedy; none with a ReluInitializer."""
    import logging

    from lightning_relu import ReluInitializer

    with caplog.at_level(logging.INFO):
        monitor = DeadUnitMonitor(print_summary=False)
        _fit(tmp_path, [monitor], False, epochs=1)
    # two sites of width 8: 1 - (1 - 2^-8)^2 = 0.78%: under 1%, nothing to do
    assert monitor.alive_lower_bound == pytest.approx((1 - 2**-8) ** 2)
    assert "cut off" not in caplog.text
    caplog.clear()

    class Narrow(_LossModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1)
            )

    for callbacks, expected in ([[], True], [[ReluInitializer("rai", seed=0)], False]):
        trainer = L.Trainer(
            default_root_dir=tmp_path,
            max_epochs=1,
            logger=False,
            callbacks=[*callbacks, DeadUnitMonitor(print_summary=False)],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        with caplog.at_level(logging.INFO):
            trainer.fit(Narrow())
        # (7/8)^2 = 0.765625: up to 23.5% cut off (rounded up)
        assert ("up to 23.5% of inputs can be cut off" in caplog.text) is expected, caplog.text
        assert ('ReluInitializer("sign_flip")' in caplog.text) is expected
        caplog.clear()


def test_heatmap_is_shown_near_its_own_size_in_tensorboard(tmp_path):
    """A headless Chromium screenshot of TensorBoard's landing page (Time Series, 1400 × 1000 window): the heatmap's
    colour bar, 15 px wide in the image, is at least 12 px wide on screen, so the image is shown at 80% of its size
    or more and its 14 px labels stay legible. Needs Chromium (Debian's ``chromium``); skipped without it."""
    import importlib.util
    import shutil

    from lightning.pytorch.loggers import TensorBoardLogger
    from PIL import Image

    found = [shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")]
    chromium = next((path for path in found if path), None)
    if chromium is None:
        pytest.skip("needs Chromium (apt-get install chromium)")
    spec = importlib.util.spec_from_file_location("screenshot", Path(__file__).parent.parent / "docs" / "screenshot.py")
    assert spec is not None and spec.loader is not None
    screenshot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(screenshot)

    class Alive(_LossModule):  # no unit dies: the colour bar holds the only dark red on the page
        def __init__(self) -> None:
            super().__init__()
            with torch.no_grad():
                for layer in self.net[:-1:2]:
                    layer.bias.fill_(5.0)

    logger = TensorBoardLogger(tmp_path / "logs", name="run", version=0)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        logger=logger,
        callbacks=[DeadUnitMonitor(print_summary=False)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Alive())
    png = tmp_path / "timeseries.png"
    try:
        with screenshot.tensorboard(tmp_path / "logs") as url:
            screenshot.screenshot(chromium, f"{url}/#timeseries", png, "1400,1000", 15000)
    except (RuntimeError, OSError) as error:  # a sandbox that cannot run TensorBoard or Chromium
        pytest.skip(f"no screenshot: {error}")
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    darkest = np.array(dead_fraction_color(1.0))
    xs = np.nonzero((np.abs(pixels - darkest).sum(axis=2) < 40).any(axis=0))[0]
    assert xs.size, "no heatmap colour bar on TensorBoard's landing page"
    assert xs.max() - xs.min() + 1 >= 12, f"the colour bar is {xs.max() - xs.min() + 1} px wide on screen"
