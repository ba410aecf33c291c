"""Reproduce Arnekvist, Carvalho, Kragic, Stork (2020), "The Effect of Target Normalization and Momentum on Dying ReLU".

The paper's claim: in regression, ReLU units die more easily as the variance of the targets shrinks, and momentum is
what carries them into the *dead cone* ``P(w·x + b > 0) < ε``. The setting here:

- inputs ``x ~ N(0, I)`` in 10 dimensions, targets ``y = γ·x_last + δ`` (``δ = 0`` unless ``--delta``), a fresh
  batch of 64 samples at every step (no finite training set), squared loss;
- two models with PyTorch's default ``nn.Linear`` initialization (weights and biases uniform in
  ``±1/sqrt(fan_in)``): a single ReLU unit ``Linear(10, 1) → ReLU → Linear(1, 1)``, and a ReLU MLP with two hidden
  layers of 32 units;
- ``γ ∈ {1, 0.1, 0.01, 0.001}`` and four optimizers: SGD without momentum, SGD with momentum 0.9 at the same
  learning rate, SGD without momentum at ten times that learning rate (the same step size, ``lr / (1 - β)``, as the
  momentum run once its velocity has built up: a control that separates momentum from step size), and Adam
  (``β₁ = 0.9``);
- after training, :class:`lightning_relu.tracker.DeadUnitTracker` counts the units over 4096 held-out samples: a
  unit is *dead* when it is 0 on all of them, *dying* when it is active on fewer than ``eps = 1%`` of them
  (Arnekvist et al.'s criterion).

Many networks are trained side by side: for one model and one optimizer, the parameters of ``seeds`` networks for
each γ are stacked along a leading dimension and each layer is one batched matrix product. The loss is the sum of
the networks' losses, so each network gets exactly its own gradient, and SGD and Adam act elementwise: the result is
the same as separate runs. Every γ and every optimizer starts from the same ``seeds`` initial networks and sees the
same input stream (a paired comparison). For the tracker, a hidden layer's output ``(networks, batch, units)`` is
laid out as ``(batch, networks × units)`` around its ``nn.ReLU`` module, so every unit of every network is one unit
of the site.

    python examples/reproduce_arnekvist2020.py           # full run (a few minutes on 2 CPU cores)
    python examples/reproduce_arnekvist2020.py --quick   # under half a minute, fewer networks and steps

It prints markdown tables; with matplotlib installed it also writes a figure (``--png``).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_relu.tracker import DeadUnitTracker

MODELS = ("single", "mlp")
MODEL_LABELS = {"single": "single ReLU unit", "mlp": "MLP 2×32"}
OPTIMIZERS = ("sgd", "sgd_momentum", "sgd_10x", "adam")


@dataclass(frozen=True)
class Config:
    gammas: tuple[float, ...]
    delta: float
    dim: int
    hidden: tuple[int, ...]
    batch: int
    steps: int
    seeds: dict[str, int]
    sgd_lr: float
    momentum: float
    adam_lr: float
    eval_samples: int
    eps: float
    seed: int


FULL = Config(
    gammas=(1.0, 0.1, 0.01, 0.001),
    delta=0.0,
    dim=10,
    hidden=(32, 32),
    batch=64,
    steps=3000,
    seeds={"single": 200, "mlp": 50},
    sgd_lr=0.03,
    momentum=0.9,
    adam_lr=0.01,
    eval_samples=4096,
    eps=0.01,
    seed=0,
)
QUICK = replace(FULL, steps=1000, seeds={"single": 64, "mlp": 8})


@dataclass(frozen=True)
class Cell:
    """What one (model, optimizer, γ) cell measured over its networks."""

    dead: float  # share of hidden units dead on the held-out samples
    dying: float  # share of hidden units active on fewer than eps of them (dead ones included)
    relative_mse: float  # median over networks of the held-out MSE divided by γ² (1.0: no better than a constant)


class StackedLinear(nn.Module):
    """Independent ``nn.Linear(fan_in, fan_out)`` layers applied to ``(networks, batch, fan_in)`` inputs.

    ``seeds`` layers are drawn with ``nn.Linear``'s default initialization (weights and biases uniform in
    ``±1/sqrt(fan_in)``) and repeated ``copies`` times: copy ``c`` of seed ``s`` is network ``c * seeds + s``.
    """

    def __init__(self, seeds: int, copies: int, fan_in: int, fan_out: int, generator: torch.Generator) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(fan_in)
        weight = (2 * torch.rand(seeds, fan_in, fan_out, generator=generator) - 1) * bound
        bias = (2 * torch.rand(seeds, 1, fan_out, generator=generator) - 1) * bound
        self.weight = nn.Parameter(weight.repeat(copies, 1, 1))
        self.bias = nn.Parameter(bias.repeat(copies, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class NetworksToUnits(nn.Module):
    """``(networks, batch, units)`` → ``(batch, networks × units)``: every unit of every network is a column."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(0, 1).flatten(1)


class UnitsToNetworks(nn.Module):
    """The inverse of :class:`NetworksToUnits`."""

    def __init__(self, networks: int) -> None:
        super().__init__()
        self.networks = networks

    def forward(self, x: Tensor) -> Tensor:
        return x.unflatten(1, (self.networks, -1)).transpose(0, 1)


def build(model: str, seeds: int, copies: int, cfg: Config, generator: torch.Generator) -> nn.Sequential:
    """``copies`` copies of ``seeds`` independently initialized networks of kind ``model``, stacked."""
    hidden = (1,) if model == "single" else cfg.hidden
    widths = (cfg.dim, *hidden, 1)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(StackedLinear(seeds, copies, widths[i], widths[i + 1], generator))
        if i < len(widths) - 2:
            layers += [NetworksToUnits(), nn.ReLU(), UnitsToNetworks(seeds * copies)]
    return nn.Sequential(*layers)


def make_optimizer(name: str, params: Iterator[nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.sgd_lr)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=cfg.sgd_lr, momentum=cfg.momentum)
    if name == "sgd_10x":
        return torch.optim.SGD(params, lr=cfg.sgd_lr / (1 - cfg.momentum))
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.adam_lr)
    raise ValueError(f"`name` can be {', '.join(OPTIMIZERS)}, got {name!r}")


def optimizer_label(name: str, cfg: Config) -> str:
    return {
        "sgd": f"SGD β=0, lr {cfg.sgd_lr:g}",
        "sgd_momentum": f"SGD β={cfg.momentum:g}, lr {cfg.sgd_lr:g}",
        "sgd_10x": f"SGD β=0, lr {cfg.sgd_lr / (1 - cfg.momentum):g}",
        "adam": f"Adam β₁=0.9, lr {cfg.adam_lr:g}",
    }[name]


def run_optimizer(model: str, optimizer: str, cfg: Config) -> dict[float, Cell]:
    """Train ``cfg.seeds[model]`` networks per γ with ``optimizer``, all γ at once; one :class:`Cell` per γ.

    Every γ gets the same initial networks and the same inputs (network ``c * seeds + s`` is seed ``s`` at γ number
    ``c``), so the cells of a row differ only by the target scale.
    """
    seeds, copies = cfg.seeds[model], len(cfg.gammas)
    net = build(model, seeds, copies, cfg, torch.Generator().manual_seed(cfg.seed))
    opt = make_optimizer(optimizer, net.parameters(), cfg)
    gamma = torch.tensor(cfg.gammas).repeat_interleave(seeds).reshape(-1, 1, 1)

    def inputs(batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(seeds, batch, cfg.dim, generator=generator).repeat(copies, 1, 1)
        return x, gamma * x[..., -1:] + cfg.delta

    data = torch.Generator().manual_seed(cfg.seed + 1)
    for _ in range(cfg.steps):
        x, y = inputs(cfg.batch, data)
        # the networks are independent: the sum of their losses gives each one its own gradient
        loss = (net(x) - y).square().mean(dim=(1, 2)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    x, y = inputs(cfg.eval_samples, torch.Generator().manual_seed(cfg.seed + 2))
    with DeadUnitTracker(net, trace=False, eps=cfg.eps) as tracker, torch.no_grad():
        relative_mse = ((net(x) - y).square().mean(dim=(1, 2)) / gamma.flatten() ** 2).reshape(copies, seeds)
    # per γ: the units of its networks, over every hidden site (the units of a site are ordered network-major)
    dead = torch.cat([layer.dead.reshape(copies, -1) for layer in tracker.report().values()], dim=1)
    dying = torch.cat([layer.dying.reshape(copies, -1) for layer in tracker.report().values()], dim=1)
    return {
        g: Cell(
            dead=float(dead[c].double().mean()),
            dying=float(dying[c].double().mean()),
            relative_mse=float(relative_mse[c].median()),
        )
        for c, g in enumerate(cfg.gammas)
    }


def run(cfg: Config) -> dict[tuple[str, str, float], Cell]:
    cells: dict[tuple[str, str, float], Cell] = {}
    for model in MODELS:
        for optimizer in OPTIMIZERS:
            for gamma, cell in run_optimizer(model, optimizer, cfg).items():
                cells[model, optimizer, gamma] = cell
    return cells


def format_tables(cells: dict[tuple[str, str, float], Cell], cfg: Config) -> str:
    gammas = " | ".join(f"γ={g:g}" for g in cfg.gammas)
    rule = "|---|---|" + "---:|" * len(cfg.gammas)
    seeds = ", ".join(f"{cfg.seeds[m]} {MODEL_LABELS[m]} networks" for m in MODELS)
    lines = [
        f"### Dead / dying hidden units after {cfg.steps} steps (batch {cfg.batch}, x ~ N(0, I_{cfg.dim}), "
        f"y = γ·x_last + {cfg.delta:g}; {seeds})",
        "",
        f"dead: 0 on all {cfg.eval_samples} held-out samples; dying: active on fewer than {cfg.eps:g} of them.",
        "",
        f"| model | optimizer | {gammas} |",
        rule,
    ]
    for model in MODELS:
        for optimizer in OPTIMIZERS:
            row = " | ".join(
                f"{cells[model, optimizer, g].dead:.2f} / {cells[model, optimizer, g].dying:.2f}" for g in cfg.gammas
            )
            lines.append(f"| {MODEL_LABELS[model]} | {optimizer_label(optimizer, cfg)} | {row} |")
    lines += [
        "",
        "### Median held-out MSE / γ² (1 = no better than predicting a constant)",
        "",
        f"| model | optimizer | {gammas} |",
        rule,
    ]
    for model in MODELS:
        for optimizer in OPTIMIZERS:
            row = " | ".join(f"{cells[model, optimizer, g].relative_mse:.3g}" for g in cfg.gammas)
            lines.append(f"| {MODEL_LABELS[model]} | {optimizer_label(optimizer, cfg)} | {row} |")
    return "\n".join(lines)


def plot(cells: dict[tuple[str, str, float], Cell], cfg: Config, path: Path) -> bool:
    """Write the dead/dying shares against γ to ``path``; ``False`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(MODELS), figsize=(5 * len(MODELS), 4), sharey=True)
    for ax, model in zip(axes, MODELS, strict=True):
        for optimizer in OPTIMIZERS:
            dead = [cells[model, optimizer, g].dead for g in cfg.gammas]
            dying = [cells[model, optimizer, g].dying for g in cfg.gammas]
            (line,) = ax.plot(cfg.gammas, dead, marker="o", label=optimizer_label(optimizer, cfg))
            ax.plot(cfg.gammas, dying, linestyle=":", color=line.get_color())
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("target scale γ")
        ax.set_title(f"{MODEL_LABELS[model]} ({cfg.seeds[model]} networks)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"dead units (solid), dying < {cfg.eps:g} (dotted)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer networks and steps (under half a minute)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initializations and of the data")
    parser.add_argument("--delta", type=float, default=0.0, help="constant offset δ of the targets")
    parser.add_argument("--png", type=Path, default=Path("arnekvist2020.png"), help="figure path (needs matplotlib)")
    args = parser.parse_args(argv)
    cfg = replace(QUICK if args.quick else FULL, seed=args.seed, delta=args.delta)
    # the matrices are tiny: one thread avoids the threading overhead of many small products
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        cells = run(cfg)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    table = format_tables(cells, cfg)
    print(table)
    print(f"\n({seconds:.1f} s, torch {torch.__version__}, 1 thread)")
    if plot(cells, cfg, args.png):
        print(f"figure written to {args.png}")
    else:
        print("matplotlib is not installed: skipping the figure")
    return {"config": cfg, "cells": cells, "table": table, "seconds": seconds}


if __name__ == "__main__":
    main()
