"""Tables (markdown) and plots (matplotlib PNG) from the raw results."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.plasticity.metrics import interval

__all__ = ["METRIC", "cell", "plot", "replace_section", "tables"]

#: the task metric of each problem: (key in a task's results, label, higher is better)
METRIC: dict[str, tuple[str, str, bool]] = {
    "permuted": ("accuracy", "test accuracy", True),
    "random_labels": ("accuracy", "accuracy on the relabelled pool", True),
    "regression": ("online_loss", "online squared error", False),
    "tuning": ("accuracy", "accuracy on the relabelled pool", True),
}

_LABELS = {"none": "no remedy", "revival": "revival (ours)", "redo": "ReDo", "cbp": "continual backprop",
           "rai": "RAI init", "sign_flip": "sign-flip init"}


def cell(values: Sequence[float], digits: int = 3) -> str:
    mean, half = interval(values)
    if math.isnan(mean):
        return "n/a"
    if math.isnan(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def _group(runs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, list[dict[str, Any]]]]:
    grouped: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        grouped[(run["setting"], run["optimizer"])][run["method"]].append(run)
    return grouped


def tables(runs: list[dict[str, Any]], methods: Sequence[str]) -> str:
    """One markdown table per (setting, optimizer): rows are methods, cells mean ± 95% interval over seeds."""
    lines: list[str] = []
    for (setting, optimizer), by_method in _group(runs).items():
        problem = setting.split("/")[0]
        key, label, higher = METRIC[problem]
        seeds = len(next(iter(by_method.values())))
        tasks = len(next(iter(by_method.values()))[0]["tasks"])
        better = "higher" if higher else "lower"
        lines += [
            f"#### {setting}, {optimizer.upper()} ({seeds} seeds, {tasks} tasks; {label}, {better} is better)",
            "",
            f"| method | {label}, task 1 | last task | mean over tasks | dead fraction, last | τ-dormant, last "
            "| effective rank, last | units reset | CPU time vs none |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        base = {run["seed"]: run["cpu_seconds"] for run in by_method.get("none", [])}
        for method in methods:
            group = by_method.get(method)
            if not group:
                continue
            first = [run["tasks"][0][key] for run in group]
            last = [run["tasks"][-1][key] for run in group]
            mean = [sum(t[key] for t in run["tasks"]) / len(run["tasks"]) for run in group]
            dead = [run["tasks"][-1]["dead_fraction"] for run in group]
            dormant = [run["tasks"][-1]["dormant_fraction"] for run in group]
            rank = [run["tasks"][-1]["effective_rank"] for run in group]
            reset = [float(run["units_reset"]) for run in group]
            ratio = [run["cpu_seconds"] / base[run["seed"]] for run in group if base.get(run["seed"])]
            lines.append(
                f"| {_LABELS.get(method, method)} | {cell(first)} | {cell(last)} | {cell(mean)} | {cell(dead)} "
                f"| {cell(dormant)} | {cell(rank, 1)} | {cell(reset, 0)} | {cell(ratio, 2)}× |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(
    runs: list[dict[str, Any]], methods: Sequence[str], directory: Path, prefix: str = "plasticity_"
) -> list[Path]:
    """One PNG per setting: rows are optimizers; columns the task metric, dead and τ-dormant fractions and the
    effective rank of the last hidden layer against the task, mean over seeds with the 95% interval shaded."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The plasticity benchmark's plots need matplotlib: install the project's `plots` extra "
            "(`pip install -e '.[plots]'`), or pass --no-plots."
        ) from error
    directory.mkdir(parents=True, exist_ok=True)
    by_setting: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = defaultdict(dict)
    for (setting, optimizer), by_method in _group(runs).items():
        by_setting[setting][optimizer] = by_method
    written = []
    for setting, by_optimizer in by_setting.items():
        key, label, _ = METRIC[setting.split("/")[0]]
        columns = [(key, label), ("dead_fraction", "dead fraction"), ("dormant_fraction", "τ-dormant fraction (τ=0.1)"),
                   ("effective_rank", "effective rank, last hidden layer")]
        figure, axes = plt.subplots(len(by_optimizer), len(columns), figsize=(4 * len(columns), 3 * len(by_optimizer)),
                                    squeeze=False)
        for row, (optimizer, by_method) in enumerate(by_optimizer.items()):
            for col, (metric, title) in enumerate(columns):
                axis = axes[row][col]
                for method in methods:
                    group = by_method.get(method)
                    if not group:
                        continue
                    tasks = range(1, len(group[0]["tasks"]) + 1)
                    stats = [interval([run["tasks"][t - 1][metric] for run in group]) for t in tasks]
                    mean = [m for m, _ in stats]
                    half = [0.0 if math.isnan(h) else h for _, h in stats]
                    axis.plot(list(tasks), mean, label=_LABELS.get(method, method))
                    axis.fill_between(list(tasks), [m - h for m, h in zip(mean, half, strict=True)],
                                      [m + h for m, h in zip(mean, half, strict=True)], alpha=0.15)
                axis.set_title(f"{optimizer.upper()}: {title}", fontsize=9)
                axis.set_xlabel("task")
                axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0][0].legend(fontsize=7)
        figure.suptitle(f"{setting} (mean and 95% interval over seeds)")
        figure.tight_layout()
        path = directory / f"{prefix}{setting.replace('/', '_')}.png"
        figure.savefig(path, dpi=80)
        plt.close(figure)
        written.append(path)
    return written


def replace_section(text: str, name: str, body: str) -> str:
    """Replace what lies between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``text`` by ``body``."""
    pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"the markers <!-- {name}:begin --> and <!-- {name}:end --> are missing")
    return pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text)
