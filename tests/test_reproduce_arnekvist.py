"""The Arnekvist et al. (2020) reproduction in quick mode: the shape of its output, and the direction of the effect."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "reproduce_arnekvist2020.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_reproduce_arnekvist2020", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, dict[str, object], str, Path]:
    example = _load()
    png = tmp_path_factory.mktemp("figure") / "arnekvist.png"
    results = example.main(["--quick", "--png", str(png)])
    return example, results, str(results["table"]), png


def test_quick_table_shape(quick: tuple[ModuleType, dict[str, object], str, Path]) -> None:
    example, results, table, _ = quick
    cfg = results["config"]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    # two tables (dead/dying and relative MSE), one row per model and optimizer, one column per γ
    assert len(rows) == 2 * len(example.MODELS) * len(example.OPTIMIZERS)
    for row in rows:
        assert row.count("|") == 3 + len(cfg.gammas)
    headers = [line for line in table.splitlines() if line.startswith("| model")]
    assert len(headers) == 2 and all(f"γ={g:g}" in h for h in headers for g in cfg.gammas)
    # every dead / dying cell is a pair of shares, dead <= dying
    for row in rows[: len(rows) // 2]:
        for cell in row.strip("| ").split(" | ")[2:]:
            dead, dying = (float(v) for v in re.fullmatch(r"(\d\.\d\d) / (\d\.\d\d)", cell).groups())
            assert 0.0 <= dead <= dying <= 1.0


def test_quick_cells_are_shares(quick: tuple[ModuleType, dict[str, object], str, Path]) -> None:
    example, results, _, _ = quick
    cfg = results["config"]
    cells = results["cells"]
    assert set(cells) == {(m, o, g) for m in example.MODELS for o in example.OPTIMIZERS for g in cfg.gammas}
    for cell in cells.values():
        assert 0.0 <= cell.dead <= cell.dying <= 1.0
        assert math.isfinite(cell.relative_mse) and cell.relative_mse >= 0.0
    for model in example.MODELS:
        # a share of units over the model's networks: a multiple of one unit
        units = cfg.seeds[model] * (1 if model == "single" else sum(cfg.hidden))
        for optimizer in example.OPTIMIZERS:
            for gamma in cfg.gammas:
                count = cells[model, optimizer, gamma].dead * units
                assert count == pytest.approx(round(count), abs=1e-6)


def test_quick_direction_at_the_extremes(quick: tuple[ModuleType, dict[str, object], str, Path]) -> None:
    """As γ shrinks from 1 to 0.001, more units die with momentum, not without.

    Quick mode is deterministic (fixed seeds); the margins hold for every ``--seed`` in 0..5 (the smallest gap seen is
    0.09 for the single unit, and the MLP under Adam is above at γ=0.001 for all six).
    """
    _, results, _, _ = quick
    cells = results["cells"]
    small, unit = min(results["config"].gammas), 1.0
    for optimizer in ("sgd_momentum", "adam"):
        assert cells["single", optimizer, small].dead >= cells["single", optimizer, unit].dead + 0.05
    # without momentum, at the same learning rate, no single unit dies at the smallest γ
    assert cells["single", "sgd", small].dead == 0.0
    assert cells["single", "sgd_momentum", small].dead >= cells["single", "sgd", small].dead + 0.05
    assert cells["mlp", "adam", small].dead > cells["mlp", "adam", unit].dead


def test_figure_only_with_matplotlib(
    quick: tuple[ModuleType, dict[str, object], str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    example, results, _, png = quick
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert png.exists() == has_matplotlib
    if not has_matplotlib:
        assert example.plot(results["cells"], results["config"], png) is False


def test_stacked_networks_are_independent() -> None:
    """Training networks side by side gives each network the gradient of its own loss (no coupling)."""
    example = _load()
    cfg = example.QUICK
    net = example.build("mlp", 3, 2, cfg, torch.Generator().manual_seed(0))
    x = torch.randn(6, 5, cfg.dim)
    x[4] = x[1]  # network 4 is the second copy of seed 1: same parameters, same inputs
    out = net(x)
    assert torch.equal(out[4], out[1])
    out[2].sum().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(torch.count_nonzero(g[[0, 1, 3, 4, 5]]) == 0 for g in grads)
    assert any(torch.count_nonzero(g[2]) > 0 for g in grads)
