"""``python -m benchmarks.plasticity``: run the grid, write the raw JSON, the markdown tables and the plots."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.plasticity.report import cell, plot, replace_section, tables
from benchmarks.plasticity.runner import FULL, QUICK, Config, Setting, config_dict, run_grid

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "plasticity.md"
IMAGES = ROOT / "docs" / "images"

#: the tuning task of our revival's one hyper-parameter, the window (steps) between revivals; not reported
TUNING = Config(
    settings=(Setting("tuning", "mlp", (64, 64), tasks=8, steps_per_task=300, batch_size=16,
                      lr={"sgd": 0.1, "adam": 0.001}),),
    seeds=(100, 101, 102),
    methods=("none", "revival"),
    label="tuning",
)
TUNING_PERIODS: tuple[int, ...] = (50, 200, 1000)


def tune(processes: int) -> tuple[str, list[dict[str, Any]]]:
    """Our revival's period on the tuning task: mean accuracy over the tasks for each period, and no remedy."""
    runs: list[dict[str, Any]] = []
    for period in TUNING_PERIODS:
        config = replace(TUNING, revival_period=period, processes=processes,
                         methods=("none", "revival") if period == TUNING_PERIODS[0] else ("revival",))
        for run in run_grid(config):
            run["revival_period"] = period if run["method"] == "revival" else None
            runs.append(run)
    lines = ["| optimizer | method | period (steps) | mean accuracy over tasks | last task | units revived |",
             "|---|---|---|---|---|---|"]
    for optimizer in TUNING.optimizers:
        for method, period in [("none", None)] + [("revival", p) for p in TUNING_PERIODS]:
            group = [r for r in runs if r["optimizer"] == optimizer and r["method"] == method
                     and r["revival_period"] == period]
            mean = [sum(t["accuracy"] for t in r["tasks"]) / len(r["tasks"]) for r in group]
            last = [r["tasks"][-1]["accuracy"] for r in group]
            reset = [float(r["units_reset"]) for r in group]
            lines.append(f"| {optimizer.upper()} | {method} | {period or '–'} | {cell(mean)} | {cell(last)} "
                         f"| {cell(reset, 0)} |")
    return "\n".join(lines) + "\n", runs


def _rounded(value: Any) -> Any:
    """Floats to 6 significant digits (the raw results' precision in the JSON), recursively."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def dump(result: dict[str, Any]) -> str:
    """The results as compact JSON: one line per run."""
    rounded = _rounded(result)
    runs = rounded.pop("runs")
    head = json.dumps(rounded, separators=(",", ":"))
    lines = ",\n".join(json.dumps(run, separators=(",", ":")) for run in runs)
    return head[:-1] + ',"runs":[\n' + lines + "\n]}\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plasticity", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 seeds, fewer and shorter tasks (about 2 minutes)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "plasticity",
                        help="directory for results.json, tables.md and the plots (default: build/plasticity)")
    parser.add_argument("--docs", action="store_true",
                        help="also write the tables and plots into docs/plasticity.md and docs/images/")
    parser.add_argument("--processes", type=int, default=2, help="worker processes of one thread each (default 2)")
    parser.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    parser.add_argument("--tune", action="store_true", help="run the tuning sweep of our revival's period only")
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error(f"`--processes` must be a positive integer, got {args.processes}")
    args.out.mkdir(parents=True, exist_ok=True)
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
               f"Python {platform.python_version()}")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    start = time.perf_counter()
    if args.tune:
        table, runs = tune(args.processes)
        seconds = time.perf_counter() - start
        (args.out / "tuning.json").write_text(json.dumps({"date": date, "machine": machine, "runs": runs,
                                                          "seconds": seconds}, indent=1))
        print(table)
        print(f"tuning: {seconds:.0f} s")
        if args.docs:
            DOCS.write_text(replace_section(DOCS.read_text(), "tuning", table + f"\n_{date}, {machine}, "
                                            f"{args.processes} processes, {seconds:.0f} s._\n"))
        return {"table": table, "runs": runs}

    config = replace(QUICK if args.quick else FULL, processes=args.processes)

    def progress(done: int, total: int) -> None:
        print(f"\r{done}/{total} runs, {time.perf_counter() - start:.0f} s", end="", file=sys.stderr, flush=True)

    runs = run_grid(config, progress)
    seconds = time.perf_counter() - start
    print(file=sys.stderr)
    result = {"date": date, "machine": machine, "seconds": seconds, "config": config_dict(config), "runs": runs}
    (args.out / "results.json").write_text(dump(result))
    table = tables(runs, config.methods)
    header = (f"_{config.label} run, {date}; {machine}; {config.processes} worker processes of one thread; "
              f"{seconds / 60:.1f} min wall-clock._\n\n")
    (args.out / "tables.md").write_text(header + table)
    print(header + table)
    if not args.no_plots:
        plot(runs, config.methods, args.out)
    if args.docs:
        DOCS.write_text(replace_section(DOCS.read_text(), "results", header + table))
        if not args.no_plots:
            plot(runs, config.methods, IMAGES)
        (ROOT / "benchmarks" / "plasticity" / "results.json").write_text(dump(result))
    return result


if __name__ == "__main__":
    main()
