from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from lightning_relu import DeadUnitMonitor, EpochReport, LayerReport
from lightning_relu.dashboards import (
    HEATMAP_TAG,
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
    taller = dead_fraction_heatmap(history, sites=["a", "b", "c", "a"])
    assert taller.shape[0] > image.shape[0]


def test_summary_tables_carry_the_report_numbers():
    report = EpochReport(3, 30, {"enc.1": _layer("enc.1", 2), "enc.3": _layer("enc.3", 8)})
    md = summary_markdown(report, revived={"enc.1": 5})
    assert "**Epoch 3**: 10 of 16 units dead (62.5%)" in md
    assert "| enc.1 | 8 | 2 (25%) | 2 (25%) | 100.0% | 5 |" in md
    assert "| enc.3 | 8 | 8 (100%) | 8 (100%) | 100.0% | 0 |" in md
    text = summary_text(report)
    assert "10 of 16 units dead" in text and "revived" not in text
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
    assert "custom_scalars__config__" in events.PluginTagToContent("custom_scalars")
    (text_tag,) = events.PluginTagToContent("text")
    assert text_tag.startswith(SUMMARY_TAG)
    summary = events.Tensors(text_tag)[-1].tensor_proto.string_val[0].decode()
    for name, layer in monitor.last_report.items():
        assert f"| {name} | {layer.num_units} | {layer.num_dead} (" in summary
    out = capsys.readouterr().out
    assert f"epoch 2: {monitor.history[-1].total_dead} of 12 units dead" in out
    assert "revived" in out


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
        def __init__(self, title=""):
            self.title, self.columns, self.rows = title, [], []

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
    assert "4 of 16 units dead" in table.title
    assert table.columns == ["site", "units", "dead", "dying", "living data", "revived"]
    assert table.rows == [
        ("a", "8", "4 (50%)", "4 (50%)", "100.0%", "2"),
        ("b", "8", "0 (0%)", "0 (0%)", "100.0%", "0"),
    ]
