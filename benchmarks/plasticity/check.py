"""Check the shape of a results.json the benchmark wrote (the CI smoke test of the quick run; not the results).

    python -m benchmarks.plasticity.check build/plasticity-quick/results.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

RUN_KEYS = {"setting", "optimizer", "method", "seed", "steps", "tasks", "units_reset", "cpu_seconds", "wall_seconds"}
TASK_KEYS = {"dead_fraction", "dormant_fraction", "effective_rank", "online_loss"}


def check(result: dict[str, Any]) -> list[str]:
    """What is wrong with ``result`` (empty when its shape is right)."""
    problems = [f"missing top-level key {key!r}" for key in ("date", "machine", "seconds", "config", "runs")
                if key not in result]
    runs = result.get("runs") or []
    if not runs:
        problems.append("no runs")
    config = result.get("config", {})
    expected = 1
    for key in ("settings", "optimizers", "methods", "seeds"):
        expected *= len(config.get(key, ()))
    if runs and expected and len(runs) != expected:
        problems.append(f"{len(runs)} runs, the config asks for {expected}")
    for index, run in enumerate(runs):
        missing = RUN_KEYS - run.keys()
        if missing:
            problems.append(f"run {index}: missing {sorted(missing)}")
            continue
        for task in run["tasks"]:
            if TASK_KEYS - task.keys():
                problems.append(f"run {index}: a task lacks {sorted(TASK_KEYS - task.keys())}")
            elif not all(math.isfinite(task[key]) for key in ("dead_fraction", "dormant_fraction", "effective_rank")):
                problems.append(f"run {index}: a task has a non-finite measurement")
    return problems


def main(argv: list[str] | None = None) -> int:
    path = Path((argv if argv is not None else sys.argv[1:])[0])
    result = json.loads(path.read_text())
    problems = check(result)
    for problem in problems:
        print(f"{path}: {problem}", file=sys.stderr)
    if not problems:
        print(f"{path}: {len(result['runs'])} runs, shape ok ({result['seconds']:.0f} s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
