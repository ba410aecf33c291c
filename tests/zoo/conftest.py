"""Options of the zoo: ``--zoo=fast|all`` picks the models, ``--zoo-report PATH`` (or ``ZOO_REPORT=PATH``) writes the
per-model, per-check results as JSON for ``tests/zoo/coverage.py``.

The zoo runs in its own environment (``.venv-zoo``: torch with a matching torchvision, timm, transformers); the main
suite never collects it (``norecursedirs`` in ``pyproject.toml``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

CHECKS = ("count", "setup", "revive_output", "revive_fire", "rai", "sign_flip", "compact")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("zoo", "real-model conformance suite")
    group.addoption(
        "--zoo",
        choices=("fast", "all"),
        default="all",
        help="fast: the subset `make test` runs; all: every model (`make zoo`). Default: all.",
    )
    group.addoption(
        "--zoo-report",
        default=os.environ.get("ZOO_REPORT") or None,
        help="write per-model, per-check results as JSON to this path (default: $ZOO_REPORT).",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "zoo_fast: a model of the zoo's fast subset")
    config.addinivalue_line("markers", "zoo_check(name): which conformance check a zoo test is")
    config._zoo_results = {}  # type: ignore[attr-defined]
    config._zoo_started = time.time()  # type: ignore[attr-defined]
    config._zoo_commit = _commit(Path(str(config.rootpath)))  # type: ignore[attr-defined]  # what the run measures


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--zoo") != "fast":
        return
    keep, drop = [], []
    for item in items:
        (keep if item.get_closest_marker("zoo_fast") or not _zoo_item(item) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _zoo_item(item: pytest.Item) -> tuple[str, str] | None:
    check = item.get_closest_marker("zoo_check")
    callspec = getattr(item, "callspec", None)
    if check is None or callspec is None or "entry" not in callspec.params:
        return None
    return callspec.params["entry"].name, check.args[0]


def _first_line(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr or "")
    if isinstance(report.longrepr, tuple):  # a skip: (path, line, reason)
        text = str(report.longrepr[2])
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= 300 else line[:297] + "..."


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    key = _zoo_item(item)
    if key is None:
        return
    results: dict[str, Any] = item.config._zoo_results  # type: ignore[attr-defined]
    entry = results.setdefault(key[0], {}).get(key[1])
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        details = {name: value for name, value in item.user_properties}
        results[key[0]][key[1]] = {
            "outcome": "error" if report.when == "setup" and report.failed else report.outcome,
            "message": "" if report.passed else _first_line(report),
            "seconds": round(report.duration, 2),
            **({"detail": details["detail"]} if "detail" in details else {}),
        }
    elif report.when == "teardown" and report.failed and entry is not None:
        entry.update(outcome="error", message=_first_line(report))


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit(root: Path) -> str:
    """The commit measured, and whether the package's working tree differed from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "lightning_relu")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit} + uncommitted changes in lightning_relu/" if dirty else commit


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    path = config.getoption("--zoo-report", default=None)
    results = getattr(config, "_zoo_results", {})
    if not path or not results:
        return
    import torch

    from tests.zoo.models import BY_NAME

    payload = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "selection": config.getoption("--zoo"),
        "seconds": round(time.time() - config._zoo_started, 1),  # type: ignore[attr-defined]
        "commit": config._zoo_commit,  # type: ignore[attr-defined]
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            **{name: _version(name) for name in ("torchvision", "timm", "transformers", "lightning", "lightning-relu")},
        },
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": "cpu",
        },
        "checks": list(CHECKS),
        "models": {
            name: {
                "family": BY_NAME[name].family,
                "source": BY_NAME[name].source,
                "fast": BY_NAME[name].fast,
                "note": BY_NAME[name].note,
                "results": checks,
            }
            for name, checks in results.items()
            if name in BY_NAME
        },
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
