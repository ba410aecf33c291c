"""Payoff of compaction: parameters, FLOPs and CPU inference latency before and after `compact`.

Run in the zoo's environment (torchvision): ``.venv-zoo/bin/python benchmarks/compact.py [--out docs/compaction.md]``.

Models: torchvision classifiers with random weights in which a share of the channels of every site that has a
producer is forced dead (its BatchNorm's bias, else its producer's bias, shifted to -1e4), measured by a
``DeadUnitTracker`` on one training-mode batch; and the demo's deep narrow MLP trained as ``lightning-relu demo``
trains its ``he`` variant, where units die on their own. FLOPs are counted from shapes: 2 × the multiply-adds of
every Linear/ConvNd call in one forward (norms, activations and pooling not counted). Latency: median wall time of
a forward in evaluation mode under ``torch.no_grad()``, after warm-up.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lightning_relu import DeadUnitTracker, compact  # noqa: E402
from lightning_relu.structure import observe  # noqa: E402


def flops(model: nn.Module, example: Tensor) -> int:
    """2 × multiply-adds of every Linear/ConvNd call of one forward on ``example``, per sample."""
    total = 0

    def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        elif isinstance(module, nn.modules.conv._ConvNd):
            kernel = math.prod(module.weight.shape[2:])
            total += output.numel() * (module.in_channels // module.groups) * kernel

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return 2 * total // example.shape[0]


def latencies_ms(first: nn.Module, second: nn.Module, example: Tensor, repeats: int) -> tuple[float, float]:
    """Median forward time of each model, the two timed in alternation (a load that comes and goes hits both)."""
    times: tuple[list[float], list[float]] = ([], [])
    first.eval()
    second.eval()
    with torch.no_grad():
        for model in (first, second, first, second):
            model(example)  # warm-up
        for _ in range(repeats):
            for model, kept in zip((first, second), times, strict=True):
                start = time.perf_counter()
                model(example)
                kept.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[0]), 1000 * statistics.median(times[1])


def force_dead(model: nn.Module, example: Tensor, share: float, seed: int) -> int:
    """Shift the bias of a ``share`` of the units of every site with a producer far negative; returns how many."""
    structure = observe(model, example)
    generator = torch.Generator().manual_seed(seed)
    forced = 0
    with torch.no_grad():
        for site in structure.sites.values():
            if site.producer is None:
                continue
            bias = site.norms[-1].bias if site.norms else None
            if bias is None and site.producer.bias is not None:
                bias = site.producer.bias.parameter
            if bias is None or bias.shape[0] != site.num_units:
                continue
            count = int(share * site.num_units)
            units = torch.randperm(site.num_units, generator=generator)[:count]
            bias[units] = -1e4
            forced += count
    return forced


def measure(name: str, model: nn.Module, report: Any, data: Tensor, repeats: int) -> dict:
    """Compact with ``report`` on ``data`` (the data the report saw), then compare on the same data."""
    result = compact(model, report, data)
    small = result.model.eval()
    model.eval()
    with torch.no_grad():
        before, after = model(data), small(data)
    change = float((after - before).abs().max() / before.abs().max().clamp_min(1e-30))
    return {
        "model": name,
        "dead": sum(s.dead for s in result.sites.values()),
        "removed": result.removed,
        "params": (sum(p.numel() for p in model.parameters()), sum(p.numel() for p in small.parameters())),
        "flops": (flops(model, data), flops(small, data)),
        "latency": latencies_ms(model, small, data, repeats),
        "change": change,
    }


def torchvision_rows(names: list[str], share: float, repeats: int) -> list[dict]:
    import torchvision

    rows = []
    for name in names:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).train()
        data = torch.randn(8, 3, 128, 128, generator=torch.Generator().manual_seed(1))
        force_dead(model, data, share, seed=0)
        with DeadUnitTracker(model) as tracker, torch.no_grad():
            model(data)  # one training-mode batch: the forced units and those dead on it at random init
        rows.append(measure(f"torchvision {name} ({share:.0%} forced)", model, tracker.report(), data, repeats))
        print(rows[-1], flush=True)
    return rows


def demo_row(repeats: int) -> dict:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_relu import DeadUnitMonitor
    from lightning_relu._demo import DemoRegressor, DemoTask

    pl.seed_everything(0, verbose=False)
    task = DemoTask()
    model = DemoRegressor(task.depth, task.width, task.in_features, task.lr, task.momentum)
    monitor = DeadUnitMonitor(print_summary=False)
    trainer = pl.Trainer(
        max_epochs=20, accelerator="cpu", callbacks=[monitor], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(task.data(0), batch_size=task.batch_size, shuffle=True))
    data = task.data(0).tensors[0]  # the training inputs: what the monitor's last epoch saw
    label = f"demo MLP ({task.depth}×{task.width}, he, 20 epochs, died on its own)"
    row = measure(label, model.eval(), monitor.last_report, data, repeats)
    row["batch"] = "×".join(str(size) for size in data.shape)
    print(row, flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| model | dead units | removed | parameters | MFLOPs / sample | latency (ms) | speed-up | output change |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        (p0, p1), (f0, f1), (t0, t1) = r["params"], r["flops"], r["latency"]
        lines.append(
            f"| {r['model']} | {r['dead']} | {r['removed']} | {p0:,} → {p1:,} ({1 - p1 / p0:.1%} fewer) | "
            f"{f0 / 1e6:.4g} → {f1 / 1e6:.4g} ({1 - f1 / f0:.1%} fewer) | {t0:.2f} → {t1:.2f} | {t0 / t1:.2f}× | "
            f"{r['change']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg11_bn,resnet18,mobilenet_v2,squeezenet1_1")
    parser.add_argument("--share", type=float, default=0.25, help="share of each site's units forced dead")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--out", default=None, help="write the markdown table into this file (between markers)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    rows = torchvision_rows([n for n in args.models.split(",") if n], args.share, args.repeats)
    rows.append(demo_row(args.repeats))
    load = max(load, os.getloadavg()[0])
    text = table(rows)
    stamp = (
        f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')} on the {os.cpu_count()}-core CPU sandbox "
        f"({platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} intra-op thread), images "
        f"8×3×128×128, demo batch {rows[-1]['batch']}; latency: median of {args.repeats} forwards in evaluation mode, "
        "the two models timed in "
        f"alternation, with a load average of up to {load:.1f} on the machine (latencies are noisy; the parameter "
        "and FLOP counts are exact). Output change: max |after - before| / max |before| on the data the report saw "
        "(eval mode)."
    )
    print(text)
    print(stamp)
    if args.out:
        path = Path(args.out)
        body = path.read_text() if path.exists() else ""
        start, end = "<!-- compact-benchmark -->", "<!-- /compact-benchmark -->"
        block = f"{start}\n{text}\n\n{stamp}\n{end}"
        if start in body and end in body:
            body = body[: body.index(start)] + block + body[body.index(end) + len(end) :]
        else:
            body = body + ("\n" if body else "") + block + "\n"
        path.write_text(body)


if __name__ == "__main__":
    main()
