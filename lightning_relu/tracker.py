"""``DeadUnitTracker``: forward hooks that count per-unit activity, for any PyTorch loop."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_relu.sites import Site, find_relu_sites
from lightning_relu.stats import ActivationStats, LayerReport

__all__ = ["DeadUnitTracker", "NoReluSitesWarning"]


class NoReluSitesWarning(UserWarning):
    """The model has no rectifier site to watch."""


class DeadUnitTracker:
    """Count dead units, per-unit activation rates and living data at every ReLU site of a model.

    Entering the context registers one forward hook per site; leaving it removes them. Every forward pass
    in between is counted (call :meth:`pause`/:meth:`resume` or set :attr:`enabled` to skip some, e.g.
    evaluation passes). Counting stays on the activations' device and never synchronizes with the host;
    :meth:`report` does, once.

    Args:
        model: the network to watch.
        sites: names of the sites to watch (default: every site found by
            :func:`~lightning_relu.find_relu_sites`). An unknown name raises ``ValueError``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> with DeadUnitTracker(net) as tracker:
        ...     _ = net(torch.randn(32, 4))
        >>> report = tracker.report()
        >>> report["1"].num_units
        8
    """

    def __init__(self, model: nn.Module, sites: Sequence[str] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a `torch.nn.Module`, got {type(model).__name__}")
        if isinstance(sites, str):
            raise ValueError(f"`sites` must be a sequence of site names, got the string {sites!r}")
        self.model = model
        found = find_relu_sites(model)
        if sites is not None:
            names = [site.name for site in found]
            unknown = [name for name in sites if name not in names]
            if unknown:
                raise ValueError(f"`sites` has unknown site names {unknown}; the model's sites are {names}")
            wanted = set(sites)
            found = [site for site in found if site.name in wanted]
        self.sites: list[Site] = found
        self.stats: dict[str, ActivationStats] = {
            site.name: ActivationStats(num_units=site.num_units, unit_dim=site.unit_dim, name=site.name)
            for site in self.sites
        }
        self.enabled = True
        self._handles: list[RemovableHandle] = []
        self._width_warned: set[str] = set()

    # ------------------------------------------------------------------ hooks
    @property
    def attached(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    def attach(self) -> DeadUnitTracker:
        """Register the forward hooks (idempotent)."""
        if self._handles:
            return self
        if not self.sites:
            warnings.warn(
                f"{type(self.model).__name__} has no `nn.ReLU`/`nn.ReLU6` module: there is nothing to count.",
                NoReluSitesWarning,
                stacklevel=2,
            )
        for site in self.sites:
            self._handles.append(site.module.register_forward_hook(self._make_hook(site)))
        return self

    def detach(self) -> None:
        """Remove the hooks (idempotent; safe to call from error paths)."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def __enter__(self) -> DeadUnitTracker:
        return self.attach()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.detach()

    def pause(self) -> None:
        """Stop counting without removing the hooks."""
        self.enabled = False

    def resume(self) -> None:
        """Count again after :meth:`pause`."""
        self.enabled = True

    def _make_hook(self, site: Site) -> Any:
        stats = self.stats[site.name]
        axis_dim = site.unit_dim

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not self.enabled or not isinstance(output, Tensor):
                return
            if stats.num_units is not None:
                ndim = output.ndim
                axis = ndim - 1 if ndim <= 2 else (1 if axis_dim is None else axis_dim) % ndim
                if output.shape[axis] != stats.num_units:
                    self._warn_width(site, output)
                    return
            with torch.no_grad():
                if stats.device != output.device:
                    stats.to(output.device)
                stats.update(output)

        return hook

    def _warn_width(self, site: Site, output: Tensor) -> None:
        if site.name in self._width_warned:
            return
        self._width_warned.add(site.name)
        warnings.warn(
            f"Site {site.name!r} expects {site.num_units} units but produced an output of shape "
            f"{tuple(output.shape)}; these outputs are not counted. Is one `nn.ReLU` module used at several "
            "places of different widths? Give each place its own module.",
            RuntimeWarning,
            stacklevel=2,
        )

    # ---------------------------------------------------------------- results
    def report(self) -> dict[str, LayerReport]:
        """Per-site reports over everything counted since the last :meth:`reset`, keyed by site name.

        In a distributed run every process must call it: counts are summed across processes.
        """
        return {name: _compute(stats) for name, stats in self.stats.items()}

    def reset(self) -> None:
        """Zero every count."""
        for stats in self.stats.values():
            stats.reset()

    def to(self, device: torch.device | str) -> DeadUnitTracker:
        """Move the counts to ``device`` (they also follow the activations automatically)."""
        for stats in self.stats.values():
            stats.to(device)
        return self


def _compute(stats: ActivationStats) -> LayerReport:
    with warnings.catch_warnings():
        # a site that saw nothing this window is a normal situation, reported as such
        warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
        return stats.compute()
