"""What the monitor shows: the TensorBoard custom-scalars layout, the sites × epochs heatmap, and the summaries.

TensorBoard's Time Series tab (where it opens) groups cards by the tag's first path component, in alphabetical
order. The overview comes first: ``dead_units/`` (every site's dead share, the total and the heatmap image),
then ``dying_units/`` and ``living_data/``; the per-unit distributions are grouped under ``per_unit/``, out of
the way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger

    from lightning_relu.report import EpochReport

__all__ = [
    "HEATMAP_TAG",
    "PER_UNIT_PREFIX",
    "SUMMARY_COLUMNS",
    "SUMMARY_TAG",
    "activation_rate_tag",
    "custom_scalars_layout",
    "dead_fraction_color",
    "dead_fraction_heatmap",
    "log_epoch_scalars",
    "margin_tag",
    "summary_markdown",
    "summary_rows",
    "summary_text",
]

#: The heatmap image, in the overview group beside every site's ``dead_units/<site>`` chart.
HEATMAP_TAG = "dead_units/heatmap"
SUMMARY_TAG = "lightning_relu/summary"
#: The per-unit histograms' group, after the overview in TensorBoard's alphabetical order.
PER_UNIT_PREFIX = "per_unit"


def activation_rate_tag(site: str) -> str:
    """The histogram of a site's per-unit activation rates."""
    return f"{PER_UNIT_PREFIX}/activation_rate/{site}"


def margin_tag(site: str) -> str:
    """The histogram of a site's per-unit death margins (``track_margin=True``)."""
    return f"{PER_UNIT_PREFIX}/margin/{site}"


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


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap font size
        return ImageFont.load_default()


def _shorten(text: str, width: int, measure: Any) -> str:
    """``text`` cut from the left with an ellipsis until it is at most ``width`` pixels wide."""
    if measure(text) <= width:
        return text
    while len(text) > 1 and measure("…" + text) > width:
        text = text[1:]
    return "…" + text


#: Width in pixels of the heatmap image: TensorBoard's image cards are about this wide, so the image is shown at
#: (nearly) its own size and its text stays legible.
HEATMAP_WIDTH = 400


def dead_fraction_heatmap(history: Sequence[EpochReport], sites: Sequence[str] | None = None) -> np.ndarray:
    """An RGB image (H, W, 3, uint8): one row per site, one column per epoch, coloured by dead fraction.

    The image is :data:`HEATMAP_WIDTH` pixels wide whatever the number of epochs, so that TensorBoard shows it at
    its own size: site names label the rows (cut from the left when long), epochs (Lightning's numbering, from 0)
    the columns (with more epochs than the grid has pixel columns, each pixel column shows the last epoch it
    covers), each cell wide enough holds its percentage, and a colour bar from 0 to 100% dead, with the grey of a
    site that saw nothing, stands on the right.
    """
    from PIL import Image, ImageDraw

    if sites is None:
        names: list[str] = []
        for report in history:
            names += [name for name in report.layers if name not in names]
        sites = names
    epochs = [report.epoch for report in history]
    font, small = _font(14), _font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_width(text: str, f: Any = font) -> int:
        left, _, right, _ = probe.textbbox((0, 0), text, font=f)
        return int(right - left)

    width = HEATMAP_WIDTH
    bar_area = 76  # colour bar and its labels, on the right
    label_w = min(max([text_width(name) for name in sites] + [40]) + 10, 140)
    grid_x, grid_w = label_w, width - label_w - bar_area
    columns = max(1, len(epochs))
    row_h, top = 20, 30
    grid_h = row_h * max(1, len(sites))
    height = max(top + grid_h + 44, top + 170)
    image = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((4, 6), "dead units, share of each site", fill=_INK, font=font)

    def column_x(j: int) -> int:
        return grid_x + round(j * grid_w / columns)

    if columns <= grid_w:  # a column of one pixel at least per epoch
        cells = [(j, column_x(j), column_x(j + 1) - 1) for j in range(len(history))]
    else:  # more epochs than pixels: each pixel column shows the last epoch it covers
        cells = [(min(columns, (p + 1) * columns // grid_w) - 1, grid_x + p, grid_x + p) for p in range(grid_w)]
    for i, name in enumerate(sites):
        y = top + i * row_h
        label = _shorten(name, label_w - 10, text_width)
        draw.text((label_w - 6 - text_width(label), y + 2), label, fill=_INK, font=font)
        for j, x0, x1 in cells:
            layer = history[j].layers.get(name)
            fraction = layer.dead_fraction if layer is not None and layer.seen else math.nan
            color = dead_fraction_color(fraction)
            draw.rectangle([x0, y, x1, y + row_h - 2], fill=color)
            cell = "-" if math.isnan(fraction) else f"{fraction:.0%}".replace("%", "")
            if x1 - x0 >= text_width("100", small) + 4:
                ink = (255, 255, 255) if _luminance(color) < 128 else _INK
                draw.text((x0 + (x1 - x0 - text_width(cell, small)) / 2, y + 3), cell, fill=ink, font=small)
    # epoch ticks under the columns: first, last and a few in between, never overlapping
    y = top + grid_h + 4
    if epochs:
        step = max(1, math.ceil(len(epochs) / max(1, grid_w // 36)))
        for j in sorted({*range(0, len(epochs), step), len(epochs) - 1}):
            label = str(epochs[j])
            center = (column_x(j) + column_x(j + 1)) / 2
            draw.text((center - text_width(label, small) / 2, y), label, fill=_INK, font=small)
    draw.text((grid_x, y + 16), "epoch", fill=_INK, font=small)
    # colour bar: 0% at the bottom, 100% at the top, and the grey of "not seen"
    bar_x, bar_top, bar_h = width - bar_area + 8, top, 120
    for k in range(bar_h):
        fraction = 1 - k / (bar_h - 1)
        draw.line([bar_x, bar_top + k, bar_x + 14, bar_top + k], fill=dead_fraction_color(fraction))
    for fraction in (0.0, 0.5, 1.0):
        y_tick = bar_top + round((1 - fraction) * (bar_h - 1))
        draw.line([bar_x + 14, y_tick, bar_x + 18, y_tick], fill=_INK)
        draw.text((bar_x + 21, y_tick - 7), f"{fraction:.0%}", fill=_INK, font=small)
    grey_y = bar_top + bar_h + 10
    draw.rectangle([bar_x, grey_y, bar_x + 14, grey_y + 12], fill=_UNSEEN)
    draw.text((bar_x + 21, grey_y - 1), "unseen", fill=_INK, font=small)
    draw.text((bar_x - 2, bar_top - 18), "dead", fill=_INK, font=small)
    return np.asarray(image, dtype=np.uint8)


def _luminance(rgb: tuple[int, int, int]) -> float:
    return 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]


#: The summary's columns and what each means (the console and TensorBoard summaries print these headers).
SUMMARY_COLUMNS: dict[str, str] = {
    "ReLU site": "where the model applies a rectifier (module name, or <module>.relu for a functional call)",
    "units": "output features of the site",
    "dead units": "units that were 0 on every sample of the epoch",
    "dying units": "units active on fewer than a share eps (1% by default) of their entries; dead units included",
    "samples alive": "share of samples whose output at the site was not all 0 (living data)",
    "revived, whole fit": "units the reviver re-initialized, summed over the fit",
}


def summary_rows(report: EpochReport, revived: Mapping[str, int] | None = None) -> list[dict[str, str]]:
    """One row per site: units, dead, dying, living data and units revived over the fit (see
    :data:`SUMMARY_COLUMNS`)."""
    rows = []
    for layer in report.layers.values():
        row = {
            "ReLU site": layer.name,
            "units": str(layer.num_units),
            "dead units": f"{layer.num_dead} ({layer.dead_fraction:.0%})" if layer.seen else "-",
            "dying units": f"{layer.num_dying} ({layer.dying_fraction:.0%})" if layer.seen else "-",
            "samples alive": f"{layer.living_data_fraction:.1%}" if layer.seen else "-",
        }
        if revived is not None:
            row["revived, whole fit"] = str(revived.get(layer.name, 0))
        rows.append(row)
    return rows


def _title(report: EpochReport) -> str:
    return (
        f"lightning_relu, epoch {report.epoch}: {report.total_dead} of {report.total_units} ReLU units dead "
        f"({report.dead_fraction:.1%})"
    )


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
    legend = "\n".join(f"- *{c}*: {SUMMARY_COLUMNS[c]}" for c in columns)
    return head + "\n".join(lines) + "\n\n" + legend + "\n"


def summary_text(report: EpochReport, revived: Mapping[str, int] | None = None) -> str:
    """The summary as an aligned plain-text table for the console."""
    rows = summary_rows(report, revived)
    title = _title(report)
    if not rows:
        return title
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in columns}
    first = columns[0]
    header = "  ".join(c.ljust(widths[c]) if c == first else c.rjust(widths[c]) for c in columns)
    lines = [title, header, "-" * len(header)]
    for row in rows:
        lines.append("  ".join(row[c].ljust(widths[c]) if c == first else row[c].rjust(widths[c]) for c in columns))
    lines.append(_legend(report, columns))
    return "\n".join(lines)


def _legend(report: EpochReport, columns: Sequence[str]) -> str:
    """The columns that need a word: dead, dying and samples alive."""
    eps = next(iter(report.layers.values())).eps if report.layers else 0.01
    return (
        f"dead: 0 on every sample of the epoch; dying: active on under {eps:.0%} (eps) of its entries; samples "
        "alive: share of samples with a non-zero output at the site"
        + ("; revived: units re-initialized over the fit" if "revived, whole fit" in columns else "")
    )


def print_summary(report: EpochReport, revived: Mapping[str, int] | None = None) -> None:
    """Print the summary to the console, as a ``rich`` table when ``rich`` is installed."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(summary_text(report, revived))
        return
    rows = summary_rows(report, revived)
    table = Table(title=_title(report), caption=_legend(report, list(rows[0]) if rows else []))
    if rows:
        for column in rows[0]:
            table.add_column(column, justify="left" if column == "ReLU site" else "right")
        for row in rows:
            table.add_row(*row.values())
    Console().print(table)


def log_epoch_scalars(logger: Logger, report: EpochReport, metrics: Mapping[str, float]) -> None:
    """Log ``metrics`` (keys ``<group>/<name>``, the group separated as ``logger`` separates groups) at the step and
    with the ``epoch`` of Lightning's own epoch-level metrics for ``report``'s epoch: a CSV row lines up with the
    epoch's losses, and TensorBoard plots both at the same x."""
    separator = logger.group_separator
    scalars = {key.replace("/", separator, 1): value for key, value in metrics.items()}
    logger.log_metrics({**scalars, "epoch": float(report.epoch)}, step=report.metrics_step)
