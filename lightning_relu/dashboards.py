"""What the monitor shows: the TensorBoard custom-scalars layout, the sites × epochs heatmap, and the summaries."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from lightning_relu.monitor import EpochReport

__all__ = [
    "HEATMAP_TAG",
    "SUMMARY_TAG",
    "custom_scalars_layout",
    "dead_fraction_color",
    "dead_fraction_heatmap",
    "summary_markdown",
    "summary_rows",
    "summary_text",
]

HEATMAP_TAG = "lightning_relu/dead_heatmap"
SUMMARY_TAG = "lightning_relu/summary"

# A sequential ramp from pale yellow (no dead unit) to dark red (every unit dead).
_RAMP = np.array(
    [
        [255, 255, 204],
        [254, 217, 118],
        [253, 141, 60],
        [227, 26, 28],
        [128, 0, 38],
    ],
    dtype=np.float64,
)
_UNSEEN = (200, 200, 200)
_BACKGROUND = (255, 255, 255)
_INK = (30, 30, 30)


def custom_scalars_layout(revival: bool = False) -> dict[str, dict[str, list[Any]]]:
    """The Custom Scalars tab: one chart per metric with every site on it (``add_custom_scalars`` format)."""
    charts: dict[str, list[Any]] = {
        "dead units (share of each site's units)": ["Multiline", [r"dead_units/.*"]],
        "living data (share of samples not killed)": ["Multiline", [r"living_data/.*"]],
        "dying units (active on fewer than eps of entries)": ["Multiline", [r"dying_units/.*"]],
    }
    if revival:
        charts["revived units (count per epoch)"] = ["Multiline", [r"revived/.*"]]
    return {"lightning_relu": charts}


def dead_fraction_color(fraction: float) -> tuple[int, int, int]:
    """The heatmap colour of a dead fraction in [0, 1] (grey for NaN: the site saw nothing)."""
    if math.isnan(fraction):
        return _UNSEEN
    x = min(max(fraction, 0.0), 1.0) * (len(_RAMP) - 1)
    low = min(int(x), len(_RAMP) - 2)
    t = x - low
    rgb = (1 - t) * _RAMP[low] + t * _RAMP[low + 1]
    return (round(float(rgb[0])), round(float(rgb[1])), round(float(rgb[2])))


def dead_fraction_heatmap(history: Sequence[EpochReport], sites: Sequence[str] | None = None) -> np.ndarray:
    """An RGB image (H, W, 3, uint8): one row per site, one column per epoch, coloured by dead fraction.

    Site names label the rows, epochs the columns, and a colour bar from 0 to 1 runs along the bottom.
    """
    from PIL import Image, ImageDraw, ImageFont

    if sites is None:
        names: list[str] = []
        for report in history:
            names += [name for name in report.layers if name not in names]
        sites = names
    epochs = [report.epoch for report in history]
    try:
        font: Any = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1 has one bitmap font size
        font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_width(text: str) -> int:
        left, _, right, _ = probe.textbbox((0, 0), text, font=font)
        return int(right - left)

    row_h = 22
    col_w = max(8, min(44, 900 // max(1, len(epochs))))
    label_w = max([text_width(name) for name in sites] + [40]) + 12
    top, legend_h = 28, 76
    width = label_w + col_w * max(1, len(epochs)) + 16
    width = max(width, label_w + 360)
    height = top + row_h * max(1, len(sites)) + legend_h
    image = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), "dead share per site (rows) and epoch (columns)", fill=_INK, font=font)
    for i, name in enumerate(sites):
        y = top + i * row_h
        draw.text((label_w - 6 - text_width(name), y + 2), name, fill=_INK, font=font)
        for j, report in enumerate(history):
            layer = report.layers.get(name)
            fraction = layer.dead_fraction if layer is not None and layer.seen else math.nan
            x = label_w + j * col_w
            draw.rectangle([x, y, x + col_w - 1, y + row_h - 2], fill=dead_fraction_color(fraction))
    # epoch ticks: first, last and a few in between
    y = top + row_h * max(1, len(sites)) + 3
    if epochs:
        step = max(1, math.ceil(len(epochs) / 8))
        for j in sorted({*range(0, len(epochs), step), len(epochs) - 1}):
            draw.text((label_w + j * col_w, y), str(epochs[j]), fill=_INK, font=font)
    draw.text((4, y), "epoch", fill=_INK, font=font)
    # colour bar
    y += 24
    bar_x, bar_w = label_w, min(240, width - label_w - 40)
    for k in range(bar_w):
        draw.line([bar_x + k, y, bar_x + k, y + 12], fill=dead_fraction_color(k / max(1, bar_w - 1)))
    draw.text((bar_x, y + 14), "0", fill=_INK, font=font)
    draw.text((bar_x + bar_w - 8, y + 14), "1", fill=_INK, font=font)
    draw.text((bar_x + bar_w + 10, y - 2), "dead share", fill=_INK, font=font)
    return np.asarray(image, dtype=np.uint8)


def summary_rows(report: EpochReport, revived: Mapping[str, int] | None = None) -> list[dict[str, str]]:
    """One row per site: units, dead, dying, living data and units revived over the fit."""
    rows = []
    for layer in report.layers.values():
        row = {
            "site": layer.name,
            "units": str(layer.num_units),
            "dead": f"{layer.num_dead} ({layer.dead_fraction:.0%})" if layer.seen else "-",
            "dying": f"{layer.num_dying} ({layer.dying_fraction:.0%})" if layer.seen else "-",
            "living data": f"{layer.living_data_fraction:.1%}" if layer.seen else "-",
        }
        if revived is not None:
            row["revived"] = str(revived.get(layer.name, 0))
        rows.append(row)
    return rows


def summary_markdown(report: EpochReport, revived: Mapping[str, int] | None = None) -> str:
    """The summary as a markdown table, headed by the epoch and the total dead share."""
    rows = summary_rows(report, revived)
    head = (
        f"**Epoch {report.epoch}**: {report.total_dead} of {report.total_units} units dead "
        f"({report.dead_fraction:.1%}).\n\n"
    )
    if not rows:
        return head
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
    lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    return head + "\n".join(lines) + "\n"


def summary_text(report: EpochReport, revived: Mapping[str, int] | None = None) -> str:
    """The summary as an aligned plain-text table for the console."""
    rows = summary_rows(report, revived)
    title = (
        f"lightning_relu, epoch {report.epoch}: {report.total_dead} of {report.total_units} units dead "
        f"({report.dead_fraction:.1%})"
    )
    if not rows:
        return title
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in columns}
    header = "  ".join(c.ljust(widths[c]) if c == "site" else c.rjust(widths[c]) for c in columns)
    lines = [title, header, "-" * len(header)]
    for row in rows:
        lines.append("  ".join(row[c].ljust(widths[c]) if c == "site" else row[c].rjust(widths[c]) for c in columns))
    return "\n".join(lines)


def print_summary(report: EpochReport, revived: Mapping[str, int] | None = None) -> None:
    """Print the summary to the console, as a ``rich`` table when ``rich`` is installed."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(summary_text(report, revived))
        return
    rows = summary_rows(report, revived)
    table = Table(
        title=f"lightning_relu, epoch {report.epoch}: {report.total_dead} of {report.total_units} units dead "
        f"({report.dead_fraction:.1%})"
    )
    if rows:
        for column in rows[0]:
            table.add_column(column, justify="left" if column == "site" else "right")
        for row in rows:
            table.add_row(*row.values())
    Console().print(table)
