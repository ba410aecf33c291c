"""Reproduce Lu, Shin, Su and Karniadakis (2020), "Dying ReLU and Initialization: Theory and Numerical Examples".

Two experiments on deep, narrow ReLU networks with a 1-D input on a grid of [-1, 1] (depth 10: ten hidden ReLU layers,
then a linear output), He initialization (normal weights of variance 2 / fan_in, zero biases) against randomized
asymmetric initialization (:func:`lightning_relu.init.rai_` on the hidden layers, the output layer keeping He):

1. born dead: the share of freshly initialized networks that are a constant function on the grid (some hidden layer
   is zero at every grid point: a collapse), over thousands of networks;
2. trained collapse: the share of networks that are a constant function after a short Adam training to fit |x|.

Networks are simulated side by side: the parameters of ``trials`` networks are stacked along a leading dimension and
every layer is one batched matrix product (``torch.bmm``), no Python loop over networks. The layers of all the
networks are drawn at once by initializing one wide ``nn.Linear`` (``trials * width`` units) with ``rai_`` or
``kaiming_normal_``: every unit is drawn independently, so the slices are independent networks.

    python examples/reproduce_lu2020.py           # full run, a markdown table on stdout
    python examples/reproduce_lu2020.py --quick   # a few seconds, fewer networks
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_relu.init import rai_

INITS = ("he", "rai")


@dataclass(frozen=True)
class Config:
    widths: tuple[int, ...]
    depth: int
    grid: int
    born_dead_trials: int
    train_widths: tuple[int, ...]
    train_trials: int
    train_steps: int
    train_grid: int
    lr: float
    seed: int


FULL = Config(
    widths=(2, 3, 4, 5, 10),
    depth=10,
    grid=1001,
    born_dead_trials=10_000,
    train_widths=(2, 3, 4, 5, 10),
    train_trials=500,
    train_steps=2000,
    train_grid=101,
    lr=1e-3,
    seed=0,
)
QUICK = Config(
    widths=(2, 3, 4),
    depth=10,
    grid=201,
    born_dead_trials=2000,
    train_widths=(3,),
    train_trials=200,
    train_steps=150,
    train_grid=51,
    lr=3e-3,
    seed=0,
)


def init_layers(init: str, trials: int, fan_in: int, fan_out: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Weights ``(trials, fan_out, fan_in)`` and biases ``(trials, fan_out, 1)`` of ``trials`` independent layers."""
    layer = nn.Linear(fan_in, trials * fan_out)
    if init == "he":
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu", generator=generator)
        nn.init.zeros_(layer.bias)
    elif init == "rai":
        rai_(layer, generator=generator)
    else:
        raise ValueError(f"`init` can be {', '.join(INITS)}, got {init!r}")
    weight = layer.weight.detach().reshape(trials, fan_out, fan_in).clone()
    bias = layer.bias.detach().reshape(trials, fan_out, 1).clone()
    return weight, bias


def init_networks(
    init: str, trials: int, width: int, depth: int, generator: torch.Generator
) -> list[tuple[Tensor, Tensor]]:
    """``depth`` hidden layers with ``init``, then a He-initialized linear output layer."""
    layers = [init_layers(init, trials, 1 if i == 0 else width, width, generator) for i in range(depth)]
    layers.append(init_layers("he", trials, width, 1, generator))
    return layers


def forward(layers: list[tuple[Tensor, Tensor]], x: Tensor) -> tuple[Tensor, Tensor]:
    """Outputs ``(trials, 1, grid)`` and, per network, whether some hidden layer is zero on the whole grid."""
    trials = layers[0][0].shape[0]
    h = x.reshape(1, 1, -1).expand(trials, 1, -1)
    collapsed = torch.zeros(trials, dtype=torch.bool)
    for weight, bias in layers[:-1]:
        h = torch.relu(torch.bmm(weight, h) + bias)
        collapsed |= h.detach().reshape(trials, -1).amax(dim=1) == 0
    weight, bias = layers[-1]
    return torch.bmm(weight, h) + bias, collapsed


def born_dead_rate(init: str, width: int, cfg: Config, generator: torch.Generator) -> float:
    x = torch.linspace(-1, 1, cfg.grid)
    dead = 0
    chunk = 2000
    with torch.no_grad():
        for start in range(0, cfg.born_dead_trials, chunk):
            trials = min(chunk, cfg.born_dead_trials - start)
            _, collapsed = forward(init_networks(init, trials, width, cfg.depth, generator), x)
            dead += int(collapsed.sum())
    return dead / cfg.born_dead_trials


def trained_collapse_rate(init: str, width: int, cfg: Config, generator: torch.Generator) -> tuple[float, float]:
    """Share of networks constant after training to fit |x|, and the median final mean squared error."""
    x = torch.linspace(-1, 1, cfg.train_grid)
    target = x.abs().reshape(1, 1, -1)
    layers = init_networks(init, cfg.train_trials, width, cfg.depth, generator)
    params = [p.requires_grad_() for layer in layers for p in layer]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    for _ in range(cfg.train_steps):
        out, _ = forward(layers, x)
        # networks are independent: the sum of their losses gives each one its own gradient (Adam is elementwise)
        loss = (out - target).pow(2).mean(dim=(1, 2)).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        out, collapsed = forward(layers, x)
        mse = (out - target).pow(2).mean(dim=(1, 2))
    return float(collapsed.double().mean()), float(mse.median())


def run(cfg: Config) -> dict[str, object]:
    generator = torch.Generator().manual_seed(cfg.seed)
    born_dead = {w: {init: born_dead_rate(init, w, cfg, generator) for init in INITS} for w in cfg.widths}
    trained: dict[int, dict[str, tuple[float, float]]] = {}
    for width in cfg.train_widths:
        trained[width] = {init: trained_collapse_rate(init, width, cfg, generator) for init in INITS}
    return {"config": cfg, "born_dead": born_dead, "trained": trained}


def format_tables(results: dict[str, object]) -> str:
    cfg = results["config"]
    assert isinstance(cfg, Config)
    born_dead = results["born_dead"]
    trained = results["trained"]
    assert isinstance(born_dead, dict) and isinstance(trained, dict)
    lines = [
        f"### Born dead: depth {cfg.depth}, 1-D input on {cfg.grid} points of [-1, 1], {cfg.born_dead_trials} networks",
        "",
        "| width | He: born dead | RAI: born dead |",
        "|---:|---:|---:|",
    ]
    for width, rates in born_dead.items():
        lines.append(f"| {width} | {rates['he']:.1%} | {rates['rai']:.1%} |")
    lines += [
        "",
        f"### Collapsed after training to fit |x|: depth {cfg.depth}, {cfg.train_trials} networks, "
        f"{cfg.train_steps} Adam steps (lr {cfg.lr:g}) on {cfg.train_grid} points",
        "",
        "| width | He: collapsed | RAI: collapsed | He: median MSE | RAI: median MSE |",
        "|---:|---:|---:|---:|---:|",
    ]
    for width, rates in trained.items():
        (he, he_mse), (rai, rai_mse) = rates["he"], rates["rai"]
        lines.append(f"| {width} | {he:.1%} | {rai:.1%} | {he_mse:.4f} | {rai_mse:.4f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer networks and steps (a few seconds)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every draw")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    cfg = Config(**{**cfg.__dict__, "seed": args.seed})
    # the matrices are tiny: one thread avoids the threading overhead of many small products
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        results = run(cfg)
    finally:
        torch.set_num_threads(threads)
    results["seconds"] = time.perf_counter() - start
    print(format_tables(results))
    print(f"\n({results['seconds']:.1f} s)")
    return results


if __name__ == "__main__":
    main()
