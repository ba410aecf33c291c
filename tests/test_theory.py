"""Tests of lightning_relu.theory against closed forms and a Monte-Carlo estimate."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import Tensor, nn

from lightning_relu.theory import (
    alive_probability_bounds,
    alive_probability_lower_bound,
    min_width,
    min_width_real,
    model_alive_lower_bound,
)


@pytest.mark.parametrize(("width", "depth"), [(1, 1), (2, 1), (2, 5), (3, 10), (4, 64), (10, 100)])
def test_bounds_closed_form(width: int, depth: int) -> None:
    lower, upper = alive_probability_bounds(width, depth)
    assert lower == pytest.approx((1 - 2.0**-width) ** depth, rel=1e-12)
    assert upper == pytest.approx((1 - 2.0 ** (-(width**2) - width)) ** (depth - 1), rel=1e-12)
    assert 0 < lower <= upper <= 1


def test_bounds_monotone() -> None:
    for depth in (1, 4, 16):
        lowers = [alive_probability_bounds(n, depth)[0] for n in range(1, 12)]
        assert lowers == sorted(lowers)
    for width in (1, 3):
        lowers = [alive_probability_bounds(width, k)[0] for k in range(1, 12)]
        assert lowers == sorted(lowers, reverse=True)


def test_bounds_contain_monte_carlo_estimate() -> None:
    # a fixed input through many random networks with iid symmetric (Gaussian) weights and biases
    generator = torch.Generator().manual_seed(0)
    trials, width, depth = 4000, 2, 6
    h: Tensor = torch.randn(trials, width, 1, generator=generator)
    alive = torch.ones(trials, dtype=torch.bool)
    for _ in range(depth):
        w = torch.randn(trials, width, width, generator=generator)
        b = torch.randn(trials, width, 1, generator=generator)
        h = torch.relu(torch.bmm(w, h) + b)
        alive &= h.ne(0).any(dim=1).squeeze(1)
    estimate = float(alive.double().mean())
    lower, upper = alive_probability_bounds(width, depth)
    se = math.sqrt(estimate * (1 - estimate) / trials)
    assert lower - 4 * se <= estimate <= upper + 4 * se


def test_lower_bound_unequal_widths() -> None:
    assert alive_probability_lower_bound([2, 3]) == pytest.approx(0.75 * 0.875)
    assert alive_probability_lower_bound([5]) == pytest.approx(1 - 1 / 32)
    assert alive_probability_lower_bound([3] * 10) == pytest.approx(alive_probability_bounds(3, 10)[0])
    assert alive_probability_lower_bound((4, 1, 2)) == pytest.approx(alive_probability_lower_bound([1, 2, 4]))


@pytest.mark.parametrize("depth", [1, 2, 10, 64, 1000])
@pytest.mark.parametrize("p", [0.01, 0.5, 0.9, 0.99, 0.999999])
def test_min_width(depth: int, p: float) -> None:
    real = min_width_real(depth, p)
    assert real == pytest.approx(-math.log2(1 - p ** (1 / depth)), rel=1e-6)  # the naive formula cancels
    n = min_width(depth, p)
    assert isinstance(n, int) and n >= 1
    assert alive_probability_bounds(n, depth)[0] >= p
    if n > 1:
        assert alive_probability_bounds(n - 1, depth)[0] < p
    assert n == max(1, math.ceil(real - 1e-9))


def test_min_width_real_inverts_the_lower_bound() -> None:
    for n in (1, 2, 3, 7):
        for k in (1, 5, 30):
            p = (1 - 2.0**-n) ** k
            assert min_width_real(k, p) == pytest.approx(n, rel=1e-9)
            assert min_width(k, p) == n


def test_model_alive_lower_bound() -> None:
    mlp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    assert model_alive_lower_bound(mlp) == pytest.approx((1 - 2**-4) * (1 - 2**-8))
    conv = nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 3, 3), nn.ReLU())
    assert model_alive_lower_bound(conv) == pytest.approx(0.75 * 0.875)
    assert model_alive_lower_bound(nn.Sequential(nn.Linear(3, 1))) is None


class _Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.fc(x) + x)


def test_model_alive_lower_bound_unknown_width() -> None:
    assert model_alive_lower_bound(_Unknown()) is None


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: alive_probability_bounds(0, 3), "`width` must be a positive integer, got 0"),
        (lambda: alive_probability_bounds(2.5, 3), "`width` must be a positive integer, got 2.5"),
        (lambda: alive_probability_bounds(True, 3), "`width` must be a positive integer, got True"),
        (lambda: alive_probability_bounds(2, -1), "`depth` must be a positive integer, got -1"),
        (lambda: min_width(0, 0.5), "`depth` must be a positive integer, got 0"),
        (lambda: min_width(3, 1.0), "`p` must be a probability strictly between 0 and 1, got 1.0"),
        (lambda: min_width_real(3, 0), "`p` must be a probability strictly between 0 and 1, got 0"),
        (lambda: min_width_real(3, "0.5"), "`p` must be a probability strictly between 0 and 1, got '0.5'"),
        (lambda: alive_probability_lower_bound([]), r"`widths` must be a non-empty sequence .*got \[\]"),
        (lambda: alive_probability_lower_bound([2, 0]), r"`widths` .*got \[2, 0\]"),
        (lambda: alive_probability_lower_bound(3), "`widths` .*got 3"),
    ],
)
def test_invalid_arguments(call: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()  # type: ignore[operator]


# --------------------------------------------------------------------------------------------------------------------
# examples/reproduce_rister2020.py
# --------------------------------------------------------------------------------------------------------------------


def _load_example(name: str) -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_reproduce_rister2020_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rister = _load_example("reproduce_rister2020")
    figure = tmp_path / "figure.png"
    results = rister.main(["--quick", "--figure", str(figure)])
    printed = capsys.readouterr().out
    assert "| width | k | iid He | BatchNorm | sign flip (min) |" in printed
    depth = results["depth"]
    assert depth == 64
    for width in (2, 3, 4):
        flipped_min = results["min"]["sign_flip"][width]
        flipped_mean = results["mean"]["sign_flip"][width]
        iid_mean = results["mean"]["iid"][width]
        for k in range(1, depth + 1):
            assert flipped_min[k - 1] >= 2.0**-k  # the sign-flip guarantee, network by network
            assert results["bounds"][width][k - 1] == alive_probability_bounds(width, k)
        # Rister and Rubin: sign flipping keeps far more data alive than iid layers, and than 2^-k
        assert flipped_mean[-1] > max(iid_mean[-1], 1000 * 2.0**-depth)
        assert flipped_mean[-1] > 0.2
    if importlib.util.find_spec("matplotlib") is None:
        assert results["figure"] is None
        assert "matplotlib is not installed: skipping the figure" in printed
    else:
        assert results["figure"] == str(figure) and figure.stat().st_size > 0


def test_bounds_take_integers_of_any_size():
    # 2^-n underflows to 0 long before n = 10**400 (the bound is 1); 0.75^k vanishes for k = 10**400
    assert alive_probability_bounds(10**400, 2) == (1.0, 1.0)
    assert alive_probability_bounds(2, 10**400) == (0.0, 0.0)
    assert alive_probability_lower_bound([10**400, 1]) == 0.5
    # (1 - 2^-n)^k = exp(-k 2^-n (1 + O(2^-n))): with k = 2^m, exp(-2^(m-n)), whatever the sizes
    for n, m in [(1000, 1000), (1080, 1082), (2000, 2001), (3000, 2990), (70, 69)]:
        expected = math.exp(-(2.0 ** (m - n)))
        assert alive_probability_bounds(n, 2**m)[0] == pytest.approx(expected, rel=1e-12), (n, m)
    assert alive_probability_bounds(1000, 10**400)[0] == 0.0  # 10**400 · 2^-1000 ≈ 10**99
    # the smallest width for such depths: the bound holds at it and fails one below
    for depth in (10**400, 2**60 + 1):
        n = min_width(depth, 0.5)
        assert alive_probability_bounds(n, depth)[0] >= 0.5 > alive_probability_bounds(n - 1, depth)[0]
        assert n - 1 < min_width_real(depth, 0.5) <= n
