"""Argument validation across the public API: a bad argument raises an error that names the argument and echoes the
value; a model that is not an ``nn.Module`` is rejected naming its type."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from lightning_relu import (
    ActivationStats,
    DeadUnitMonitor,
    DeadUnitReviver,
    DeadUnitTracker,
    LayerReport,
    ReluInitializer,
    find_relu_sites,
    rai_,
    revive_dead_units_,
    sign_flip_,
    theory,
)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 1))


def _monitor() -> DeadUnitMonitor:
    return DeadUnitMonitor()


def _report(n: int = 5) -> dict[str, LayerReport]:
    return {"1": LayerReport.from_counts("1", torch.zeros(n, dtype=torch.int64), 10, 10, 10)}


# (callable, kwargs, exception, argument name, echoed value or None when the value is a type name)
INVALID = [
    (DeadUnitMonitor, {"sites": "net.1"}, ValueError, "sites", "'net.1'"),
    (DeadUnitMonitor, {"sites": [1, 2]}, ValueError, "sites", "[1, 2]"),
    (DeadUnitMonitor, {"on_collapse": "explode"}, ValueError, "on_collapse", "'explode'"),
    (DeadUnitMonitor, {"log_histograms": "yes"}, ValueError, "log_histograms", "'yes'"),
    (DeadUnitMonitor, {"revive": "always"}, ValueError, "revive", "'always'"),
    (DeadUnitMonitor, {"trace": 1}, ValueError, "trace", "1"),
    (DeadUnitMonitor, {"eps": 1.5}, ValueError, "eps", "1.5"),
    (DeadUnitMonitor, {"eps": float("nan")}, ValueError, "eps", "nan"),
    (lambda **kw: DeadUnitTracker(_mlp(), **kw), {"sites": "1"}, ValueError, "sites", "'1'"),
    (lambda **kw: DeadUnitTracker(_mlp(), **kw), {"sites": ["9"]}, ValueError, "sites", "['9']"),
    (lambda **kw: DeadUnitTracker(_mlp(), **kw), {"eps": -0.1}, ValueError, "eps", "-0.1"),
    (lambda **kw: DeadUnitTracker(_mlp(), **kw), {"trace": "no"}, ValueError, "trace", "'no'"),
    (DeadUnitTracker, {"model": "net"}, TypeError, "model", None),
    (DeadUnitReviver, {"every_n_epochs": 0}, ValueError, "every_n_epochs", "0"),
    (DeadUnitReviver, {"every_n_epochs": True}, ValueError, "every_n_epochs", "True"),
    (DeadUnitReviver, {"max_fraction": 0.0}, ValueError, "max_fraction", "0.0"),
    (DeadUnitReviver, {"max_fraction": 1.5}, ValueError, "max_fraction", "1.5"),
    (DeadUnitReviver, {"exclude": "1"}, ValueError, "exclude", "'1'"),
    (DeadUnitReviver, {"init": "xavier"}, ValueError, "init", "'xavier'"),
    (DeadUnitReviver, {"seed": -3}, ValueError, "seed", "-3"),
    (DeadUnitReviver, {"seed": 1.0}, ValueError, "seed", "1.0"),
    (lambda **kw: _monitor().add_report_listener(**kw), {"listener": 3}, ValueError, "listener", "3"),
    (lambda **kw: DeadUnitReviver().attach(**kw), {"monitor": object()}, ValueError, "monitor", None),
    (lambda **kw: revive_dead_units_(_mlp(), **kw), {"report": [1, 2]}, ValueError, "report", None),
    (lambda **kw: revive_dead_units_(_mlp(), _report(), **kw), {"init": "zeros"}, ValueError, "init", "'zeros'"),
    (lambda **kw: revive_dead_units_(_mlp(), _report(), **kw), {"max_fraction": 2}, ValueError, "max_fraction", "2"),
    (lambda **kw: revive_dead_units_(_mlp(), _report(), **kw), {"exclude": "1"}, ValueError, "exclude", "'1'"),
    (lambda **kw: revive_dead_units_(_mlp(), _report(), **kw), {"exclude": ["x"]}, ValueError, "exclude", "['x']"),
    (lambda **kw: revive_dead_units_(_mlp(), _report(), **kw), {"generator": 0}, ValueError, "generator", "0"),
    (lambda **kw: revive_dead_units_(_mlp(), _report(), **kw), {"optimizer": "sgd"}, ValueError, "optimizer", None),
    (lambda **kw: revive_dead_units_(report=_report(), **kw), {"model": "net"}, TypeError, "model", None),
    (ReluInitializer, {"method": "xavier"}, ValueError, "method", "'xavier'"),
    (ReluInitializer, {"seed": "0"}, ValueError, "seed", "'0'"),
    (ReluInitializer, {"max_samples": 0}, ValueError, "max_samples", "0"),
    (ReluInitializer, {"max_samples": True}, ValueError, "max_samples", "True"),
    (ReluInitializer, {"input_fn": 5}, ValueError, "input_fn", "5"),
    (ReluInitializer, {"log_prefix": 3}, ValueError, "log_prefix", "3"),
    (rai_, {"module": nn.Linear(2, 2), "generator": 1}, ValueError, "generator", "1"),
    (rai_, {"module": nn.ConvTranspose2d(2, 2, 3)}, ValueError, "module", None),
    (lambda **kw: sign_flip_(_mlp(), torch.randn(4, 4), **kw), {"max_samples": 0}, ValueError, "max_samples", "0"),
    (lambda **kw: sign_flip_(_mlp(), torch.randn(4, 4), **kw), {"input_fn": 1}, ValueError, "input_fn", "1"),
    (lambda **kw: sign_flip_(_mlp(), **kw), {"data": None}, ValueError, "data", "None"),
    (lambda **kw: sign_flip_(_mlp(), **kw), {"data": "abc"}, ValueError, "data", None),
    (ActivationStats, {"num_units": 0}, ValueError, "num_units", "0"),
    (ActivationStats, {"num_units": 2.5}, ValueError, "num_units", "2.5"),
    (ActivationStats, {"unit_dim": 2}, ValueError, "unit_dim", "2"),
    (ActivationStats, {"eps": "0.1"}, ValueError, "eps", "'0.1'"),
    (find_relu_sites, {"model": nn.ReLU(), "trace": None}, ValueError, "trace", "None"),
    (find_relu_sites, {"model": [nn.ReLU()]}, TypeError, "model", None),
    (theory.alive_probability_bounds, {"width": 0, "depth": 2}, ValueError, "width", "0"),
    (theory.alive_probability_bounds, {"width": 2, "depth": 1.5}, ValueError, "depth", "1.5"),
    (theory.alive_probability_bounds, {"width": True, "depth": 2}, ValueError, "width", "True"),
    (theory.alive_probability_lower_bound, {"widths": []}, ValueError, "widths", "[]"),
    (theory.alive_probability_lower_bound, {"widths": [3, 0]}, ValueError, "widths", "[3, 0]"),
    (theory.min_width_real, {"depth": 0, "p": 0.5}, ValueError, "depth", "0"),
    (theory.min_width_real, {"depth": 3, "p": 1.0}, ValueError, "p", "1.0"),
    (theory.min_width, {"depth": 3, "p": 0}, ValueError, "p", "0"),
    (theory.min_width, {"depth": -1, "p": 0.5}, ValueError, "depth", "-1"),
    (theory.model_alive_lower_bound, {"model": "net"}, TypeError, "model", None),
]

# invalid arguments that once slipped through validation
INVALID_XFAIL = [
    pytest.param(
        lambda **kw: DeadUnitTracker(_mlp(), **kw),
        {"sites": [1]},
        ValueError,
        "sites",
        "1",
        id="DeadUnitTracker-sites-non-string",
    ),
    pytest.param(
        lambda **kw: DeadUnitTracker(_mlp(), **kw),
        {"sites": 5},
        ValueError,
        "sites",
        "5",
        id="DeadUnitTracker-sites-not-a-sequence",
    ),
    pytest.param(
        ActivationStats,
        {"num_units": True},
        ValueError,
        "num_units",
        "True",
        id="ActivationStats-num_units-bool",
    ),
]


def _invalid_id(case) -> str:
    func, kwargs = case[0], case[1]
    name = getattr(func, "__name__", "call")
    return f"{name}-{'-'.join(kwargs)}"


@pytest.mark.parametrize(
    ("func", "kwargs", "error", "argument", "value"),
    [pytest.param(*case, id=f"{i}-{_invalid_id(case)}") for i, case in enumerate(INVALID)] + INVALID_XFAIL,
)
def test_invalid_arguments_name_the_argument_and_echo_the_value(func, kwargs, error, argument, value):
    pattern = rf"`{re.escape(argument)}`"
    if value is not None:
        pattern += rf".*{re.escape(value)}"
    with pytest.raises(error, match=pattern):
        func(**kwargs)


@pytest.mark.parametrize("func", [rai_, sign_flip_, find_relu_sites, DeadUnitTracker], ids=lambda f: f.__name__)
def test_non_module_model_is_rejected_naming_the_type(func):
    args = ("not a model",) if func is not sign_flip_ else ("not a model", torch.randn(2, 2))
    with pytest.raises((TypeError, ValueError), match=r"`(model|module)` must be a `torch\.nn\.Module`, got str"):
        func(*args)
