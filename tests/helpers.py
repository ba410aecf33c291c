"""Shared test models and brute-force references (independent of the code under test)."""

from __future__ import annotations

import contextlib
import functools
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.multiprocessing.spawn import ProcessExitedException


def mlp(widths: list[int], seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 2):
        layers += [nn.Linear(widths[i], widths[i + 1]), nn.ReLU()]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers)


def conv_bn_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 7),
        nn.ReLU(),
        nn.Linear(7, 2),
    )


def kill_units(model: nn.Sequential, index: int, units: list[int]) -> None:
    """Make `units` of the layer at `index` (a Linear or a BatchNorm) output a large negative pre-activation."""
    with torch.no_grad():
        model[index].bias[units] = -1e4


def brute_force(model: nn.Sequential, batches: list[Tensor], prefix: str = "") -> dict[str, dict]:
    """Run `model` layer by layer and measure every ReLU output with plain boolean logic and Python loops."""
    acts: dict[str, list[Tensor]] = {}
    with torch.no_grad():
        for x in batches:
            for i, layer in enumerate(model):
                x = layer(x)
                if isinstance(layer, (nn.ReLU, nn.ReLU6)):
                    acts.setdefault(f"{prefix}{i}", []).append(x.clone())
    result = {}
    for name, outs in acts.items():
        out = torch.cat(outs)
        units = out.shape[1]  # (N, C) or (N, C, H, W): the unit is dim 1 in both
        per_unit = out.transpose(0, 1).reshape(units, -1)
        active = [int(sum(1 for v in per_unit[u].tolist() if v > 0)) for u in range(units)]
        entries = per_unit.shape[1]
        killed = sum(1 for n in range(out.shape[0]) if bool((out[n] == 0).all()))  # the whole output is 0
        result[name] = {
            "active": active,
            "dead": [a == 0 for a in active],
            "rate": [a / entries for a in active],
            "killed": killed,
            "samples": out.shape[0],
            "living": 1 - killed / out.shape[0],
        }
    return result


def make_trainer(tmp_path, callbacks, **overrides) -> L.Trainer:
    """A small CPU Trainer for tests: 2 epochs of 5 batches, 2 validation batches, logging every step."""
    settings = dict(
        default_root_dir=tmp_path,
        max_epochs=2,
        limit_train_batches=5,
        limit_val_batches=2,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    settings.update(overrides)
    return L.Trainer(callbacks=callbacks, **settings)


def retry_spawn_abort(test: Callable[..., Any]) -> Callable[..., Any]:
    """Run a ``ddp_spawn`` test again (twice at most) when a rank died of SIGABRT.

    Gloo's CPU process groups sometimes abort a rank while the ranks tear down after a finished fit (a known
    intermittent failure of spawned CPU DDP); an error raised by Python in a rank is reported differently and is
    never retried. The test's ``tmp_path`` is emptied before a retry so that nothing a failed attempt wrote is read.
    """

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(3):
            try:
                return test(*args, **kwargs)
            except ProcessExitedException as err:
                if err.signal_name != "SIGABRT" or attempt == 2:
                    raise
                tmp_path = kwargs.get("tmp_path")
                if isinstance(tmp_path, Path):
                    for child in tmp_path.iterdir():
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise AssertionError("unreachable")

    return run


@contextlib.contextmanager
def counting_path(path: str) -> Iterator[None]:
    """Count CPU outputs inside the block with the CPU path (``"cpu"``: chunks of samples into reused buffers) or
    with the plain ATen operations that GPU tensors, tensor subclasses and ``torch.compile`` take (``"plain"``)."""
    import lightning_relu.functional as functional

    if path not in ("cpu", "plain"):
        raise ValueError(f"path must be 'cpu' or 'plain', got {path!r}")
    original = functional._workspace
    if path == "plain":
        functional._workspace = lambda output, axis, cached: None
    try:
        yield
    finally:
        functional._workspace = original
