"""Reproduce Rister and Rubin, "Probabilistic bounds on data sensitivity in deep rectifier networks".

The living-data fraction (the share of samples whose output is not all zero at every rectifier so far) after k
layers of deep, narrow ReLU networks (width 2, 3, 4; up to 64 layers; 1024 standard Gaussian points in as many
dimensions as the width), for three initializations of the same He-normal layers (zero biases):

- iid: the layers as drawn;
- BatchNorm: a ``BatchNorm1d`` (batch statistics over the 1024 points) between each layer and its rectifier;
- sign flip: the iid layers after :func:`lightning_relu.init.sign_flip_` on the same points.

The living fractions are measured by a separate forward pass (not taken from the sign-flip report) and compared with
the bounds of :mod:`lightning_relu.theory` for iid symmetric layers, :math:`(1-2^{-n})^k \\leq P(alive) \\leq
(1-2^{-n^2-n})^{k-1}`, and with the sign-flip guarantee :math:`2^{-k}`. A figure is written when matplotlib is
installed (it is optional).

    python examples/reproduce_rister2020.py           # full run: a markdown table, and the figure
    python examples/reproduce_rister2020.py --quick   # a few seconds, fewer networks
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_relu.init import sign_flip_
from lightning_relu.theory import alive_probability_bounds

METHODS = ("iid", "batchnorm", "sign_flip")
LABELS = {"iid": "iid He", "batchnorm": "BatchNorm", "sign_flip": "sign flip"}
TABLE_DEPTHS = (1, 2, 4, 8, 16, 32, 64)


def build(method: str, width: int, depth: int, generator: torch.Generator) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(width, width)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu", generator=generator)
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if method == "batchnorm":
            layers.append(nn.BatchNorm1d(width))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def living_fractions(model: nn.Sequential, x: Tensor) -> list[float]:
    """Cumulative living-data fraction after each rectifier, running the layers one by one (batch statistics)."""
    alive = torch.ones(x.shape[0], dtype=torch.bool)
    fractions = []
    model.train()
    with torch.no_grad():
        h = x
        for layer in model:
            h = layer(h)
            if isinstance(layer, nn.ReLU):
                alive &= h.ne(0).any(dim=1)
                fractions.append(float(alive.double().mean()))
    return fractions


def run(widths: Sequence[int], depth: int, samples: int, networks: int, seed: int) -> dict[str, object]:
    generator = torch.Generator().manual_seed(seed)
    mean: dict[str, dict[int, list[float]]] = {m: {} for m in METHODS}
    low: dict[str, dict[int, list[float]]] = {m: {} for m in METHODS}
    for width in widths:
        curves: dict[str, list[list[float]]] = {m: [] for m in METHODS}
        for _ in range(networks):
            x = torch.randn(samples, width, generator=generator)
            iid = build("iid", width, depth, generator)
            flipped = build("iid", width, depth, generator)
            flipped.load_state_dict(iid.state_dict())
            sign_flip_(flipped, x, max_samples=None)
            curves["iid"].append(living_fractions(iid, x))
            curves["sign_flip"].append(living_fractions(flipped, x))
            curves["batchnorm"].append(living_fractions(build("batchnorm", width, depth, generator), x))
        for method, runs in curves.items():
            table = torch.tensor(runs, dtype=torch.float64)
            mean[method][width] = table.mean(dim=0).tolist()
            low[method][width] = table.min(dim=0).values.tolist()
    bounds = {w: [alive_probability_bounds(w, k) for k in range(1, depth + 1)] for w in widths}
    return {
        "widths": list(widths),
        "depth": depth,
        "samples": samples,
        "networks": networks,
        "mean": mean,
        "min": low,
        "bounds": bounds,
    }


def format_table(results: dict[str, object]) -> str:
    mean, low, bounds = results["mean"], results["min"], results["bounds"]
    assert isinstance(mean, dict) and isinstance(low, dict) and isinstance(bounds, dict)
    depth = results["depth"]
    assert isinstance(depth, int)
    lines = [
        f"### Living-data fraction after k layers: {results['samples']} Gaussian points, mean over"
        f" {results['networks']} networks (min over networks for sign flip)",
        "",
        "| width | k | iid He | BatchNorm | sign flip (min) | iid lower bound | iid upper bound | 2^-k |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for width in results["widths"]:  # type: ignore[attr-defined]
        for k in (k for k in TABLE_DEPTHS if k <= depth):
            lower, upper = bounds[width][k - 1]
            lines.append(
                f"| {width} | {k} | {mean['iid'][width][k - 1]:.3f} | {mean['batchnorm'][width][k - 1]:.3f}"
                f" | {mean['sign_flip'][width][k - 1]:.3f} ({low['sign_flip'][width][k - 1]:.3f})"
                f" | {lower:.3f} | {upper:.3f} | {2.0**-k:.2g} |"
            )
    return "\n".join(lines)


def save_figure(results: dict[str, object], path: Path) -> bool:
    """Write the figure; ``False`` (and a message) when matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: skipping the figure (pip install matplotlib to get it).")
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, bounds, widths = results["mean"], results["bounds"], results["widths"]
    assert isinstance(mean, dict) and isinstance(bounds, dict) and isinstance(widths, list)
    depth = results["depth"]
    assert isinstance(depth, int)
    ks = list(range(1, depth + 1))
    fig, axes = plt.subplots(1, len(widths), figsize=(4.5 * len(widths), 3.8), sharey=True, squeeze=False)
    for ax, width in zip(axes[0], widths, strict=True):
        for method in METHODS:
            ax.plot(ks, mean[method][width], label=LABELS[method])
        ax.plot(ks, [b[0] for b in bounds[width]], "k--", linewidth=1, label="iid lower bound")
        ax.plot(ks, [b[1] for b in bounds[width]], "k:", linewidth=1, label="iid upper bound")
        ax.plot(ks, [2.0**-k for k in ks], color="grey", linewidth=1, label="$2^{-k}$")
        ax.set_yscale("log")
        ax.set_ylim(1e-3, 1.1)
        ax.set_xlabel("layers k")
        ax.set_title(f"width {width}")
    axes[0][0].set_ylabel("living-data fraction")
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"figure written to {path}")
    return True


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer networks (a few seconds)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every draw")
    parser.add_argument(
        "--figure", type=Path, default=Path("rister2020_living_data.png"), help="where to write the figure"
    )
    parser.add_argument("--no-figure", action="store_true", help="do not write the figure")
    args = parser.parse_args(argv)
    networks = 10 if args.quick else 500
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny layers: threads only add overhead
    start = time.perf_counter()
    try:
        results = run(widths=(2, 3, 4), depth=64, samples=1024, networks=networks, seed=args.seed)
    finally:
        torch.set_num_threads(threads)
    results["seconds"] = time.perf_counter() - start
    print(format_table(results))
    print(f"\n({results['seconds']:.1f} s)")
    results["figure"] = None if args.no_figure or not save_figure(results, args.figure) else str(args.figure)
    return results


if __name__ == "__main__":
    main()
