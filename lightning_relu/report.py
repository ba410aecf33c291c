"""``LayerReport``: what one rectifier site did over a window, computed from its counts; ``EpochReport``: every
site's, for one training epoch of the monitor (public as ``lightning_relu.EpochReport`` and
``lightning_relu.monitor.EpochReport``, the same class)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["EpochReport", "LayerReport"]


class LayerReport:
    """What one site did over a window of forward passes (an epoch for the monitor).

    All tensors are on the CPU.

    Attributes:
        name: the site's name.
        num_units: number of units (features or channels) at the site.
        active_count: per unit, the number of entries that were ``> 0`` (int64).
        entries_per_unit: number of entries each unit produced (samples × positions).
        samples: number of samples that went through the site.
        killed: number of samples whose whole output at the site was 0.
        dead: per unit, ``True`` when the unit was 0 on every entry seen (never ``True`` when nothing was seen, nor
            at a non-finite site).
        activation_rate: per unit, the share of its entries that were ``> 0`` (float64; NaN when nothing was seen).
        num_dead: number of dead units.
        dead_fraction: ``num_dead / num_units`` (0.0 when nothing was seen, NaN at a non-finite site).
        living_data_fraction: share of samples not killed at the site (NaN when nothing was seen).
        eps: the activity threshold below which a unit is *dying*.
        dying: per unit, ``True`` when its activation rate is below ``eps`` (dead units included).
        num_dying: number of dying units.
        dying_fraction: ``num_dying / num_units``.
        nonfinite_batches: number of batches whose output at the site held NaN or Inf (or a sample whose finite
            entries sum past the dtype's largest value, about 3.4e38 in float32: see :mod:`lightning_relu.functional`).
        nonfinite: whether any batch of the window was non-finite at the site. Such a site is never reported as
            dead, dying or collapsed (a NaN entry is not ``> 0``, so a diverged network would look dead): its
            ``dead`` and ``dying`` masks are all ``False`` and its ``dead_fraction`` is NaN; ``active_count`` and
            ``activation_rate`` still hold the raw counts.
        margin: per unit, ``m = mean / std`` of its pre-activation over the window (only with margin tracking,
            else ``None``). With Gaussian pre-activations the unit is active with probability ``Φ(m)``.
        predicted_rate: ``Φ(margin)``, the activation rate the margin predicts (``None`` without tracking).
        at_risk: per unit, ``margin < Φ⁻¹(eps)``: inside the dead cone of Arnekvist et al. (``None`` without
            tracking; NaN margins are not at risk).
        at_risk_fraction: share of the site's units at risk (NaN without tracking).
    """

    # A plain class, not a dataclass: torchmetrics walks dataclass results of ``compute`` and squeezes
    # one-element tensors, which would turn a one-unit site's tensors into scalars.
    def __init__(
        self,
        *,
        name: str,
        num_units: int,
        active_count: Tensor,
        entries_per_unit: int,
        samples: int,
        killed: int,
        dead: Tensor,
        activation_rate: Tensor,
        num_dead: int,
        dead_fraction: float,
        living_data_fraction: float,
        eps: float = 0.01,
        dying: Tensor | None = None,
        num_dying: int = 0,
        dying_fraction: float = 0.0,
        nonfinite_batches: int = 0,
        pre_mean: Tensor | None = None,
        pre_std: Tensor | None = None,
    ) -> None:
        self.name = name
        self.num_units = num_units
        self.active_count = active_count
        self.entries_per_unit = entries_per_unit
        self.samples = samples
        self.killed = killed
        self.dead = dead
        self.activation_rate = activation_rate
        self.num_dead = num_dead
        self.dead_fraction = dead_fraction
        self.living_data_fraction = living_data_fraction
        self.eps = eps
        self.dying = dying if dying is not None else torch.zeros_like(dead)
        self.num_dying = num_dying
        self.dying_fraction = dying_fraction
        self.nonfinite_batches = nonfinite_batches
        self.nonfinite = nonfinite_batches > 0
        self.pre_mean = pre_mean
        self.pre_std = pre_std
        self.margin: Tensor | None = None
        self.predicted_rate: Tensor | None = None
        self.at_risk: Tensor | None = None
        self.num_at_risk = 0
        self.at_risk_fraction = math.nan
        if pre_mean is not None and pre_std is not None:
            self.margin = pre_mean / pre_std
            self.predicted_rate = torch.special.ndtr(self.margin)
            threshold = torch.special.ndtri(torch.tensor(eps, dtype=torch.float64))
            self.at_risk = self.margin < threshold  # NaN compares False
            self.num_at_risk = int(self.at_risk.sum())
            self.at_risk_fraction = self.num_at_risk / num_units if num_units else 0.0

    @classmethod
    def from_counts(
        cls,
        name: str,
        active_count: Tensor,
        entries_per_unit: int,
        samples: int,
        killed: int,
        eps: float = 0.01,
        nonfinite_batches: int = 0,
        pre_sum: Tensor | None = None,
        pre_sumsq: Tensor | None = None,
        pre_entries: int = 0,
    ) -> LayerReport:
        """Build a report from raw counts (the single place where the definitions live)."""
        active_count = active_count.detach().to("cpu", torch.int64)
        num_units = int(active_count.numel())
        seen = entries_per_unit > 0
        # a site that saw NaN/Inf is not judged: NaN is not > 0, so a diverged network would look dead
        judged = seen and nonfinite_batches == 0
        dead = (active_count == 0) & judged
        if seen:
            rate = active_count.to(torch.float64) / entries_per_unit
        else:
            rate = torch.full((num_units,), math.nan, dtype=torch.float64)
        num_dead = int(dead.sum())
        dying = (rate < eps) & judged
        num_dying = int(dying.sum())
        if not judged and seen:
            dead_fraction = dying_fraction = math.nan
        else:
            dead_fraction = num_dead / num_units if num_units else 0.0
            dying_fraction = num_dying / num_units if num_units else 0.0
        pre_mean = pre_std = None
        if pre_sum is not None and pre_sumsq is not None and pre_entries > 0 and pre_sum.numel() == num_units:
            pre_mean = pre_sum.detach().to("cpu", torch.float64) / pre_entries
            second = pre_sumsq.detach().to("cpu", torch.float64) / pre_entries
            pre_std = (second - pre_mean**2).clamp_min(0.0).sqrt()
        return cls(
            name=name,
            num_units=num_units,
            active_count=active_count,
            entries_per_unit=int(entries_per_unit),
            samples=int(samples),
            killed=int(killed),
            dead=dead,
            activation_rate=rate,
            num_dead=num_dead,
            dead_fraction=dead_fraction,
            living_data_fraction=1.0 - killed / samples if samples else math.nan,
            eps=float(eps),
            dying=dying,
            num_dying=num_dying,
            dying_fraction=dying_fraction,
            nonfinite_batches=int(nonfinite_batches),
            pre_mean=pre_mean,
            pre_std=pre_std,
        )

    @property
    def seen(self) -> bool:
        """Whether any entry went through the site in the window."""
        return self.entries_per_unit > 0

    @property
    def collapsed(self) -> bool:
        """Every unit dead: everything after the site receives a constant (never at a non-finite site)."""
        return self.seen and not self.nonfinite and self.num_units > 0 and self.num_dead == self.num_units

    def state_dict(self) -> dict[str, Any]:
        """The raw counts, enough to rebuild the report (tensors and primitives only)."""
        return {
            "name": self.name,
            "active_count": self.active_count.clone(),
            "entries_per_unit": self.entries_per_unit,
            "samples": self.samples,
            "killed": self.killed,
            "eps": self.eps,
            "nonfinite_batches": self.nonfinite_batches,
            "pre_mean": None if self.pre_mean is None else self.pre_mean.clone(),
            "pre_std": None if self.pre_std is None else self.pre_std.clone(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> LayerReport:
        report = cls.from_counts(
            name=str(state["name"]),
            active_count=torch.as_tensor(state["active_count"], dtype=torch.int64),
            entries_per_unit=int(state.get("entries_per_unit", 0)),
            samples=int(state.get("samples", 0)),
            killed=int(state.get("killed", 0)),
            eps=float(state.get("eps", 0.01)),
            nonfinite_batches=int(state.get("nonfinite_batches", 0)),
        )
        if state.get("pre_mean") is not None and state.get("pre_std") is not None:
            mean = torch.as_tensor(state["pre_mean"], dtype=torch.float64)
            std = torch.as_tensor(state["pre_std"], dtype=torch.float64)
            report = cls.from_counts(
                name=report.name,
                active_count=report.active_count,
                entries_per_unit=report.entries_per_unit,
                samples=report.samples,
                killed=report.killed,
                eps=report.eps,
                nonfinite_batches=report.nonfinite_batches,
                pre_sum=mean,
                pre_sumsq=std**2 + mean**2,
                pre_entries=1,
            )
        return report

    def __repr__(self) -> str:
        return (
            f"LayerReport(name={self.name!r}, num_units={self.num_units}, num_dead={self.num_dead}, "
            f"dead_fraction={self.dead_fraction:.4g}, living_data_fraction={self.living_data_fraction:.4g}, "
            f"samples={self.samples}{', nonfinite=True' if self.nonfinite else ''})"
        )


@dataclass(eq=False)
class EpochReport:
    """The monitor's report for one training epoch.

    Attributes:
        epoch: the training epoch.
        global_step: the global step at its end.
        layers: the per-site reports, keyed by site name.
        partial: the counts cover only part of the epoch (a fit resumed from a checkpoint that could not carry
            them, or whose options differ); no remedy acts on such a report.
        partial_reason: why, when ``partial``.
        first_nonfinite_step: the global step of the first training batch in which a site produced NaN or Inf
            (``None`` when none did, or when not known).
        log_step: the step at which the monitor logged the report, Lightning's step of the epoch's epoch-level
            metrics (``None`` when not known, as in a report restored from a checkpoint: ``global_step - 1`` then).
    """

    epoch: int
    global_step: int
    layers: dict[str, LayerReport] = field(default_factory=dict)
    partial: bool = False
    partial_reason: str = ""
    first_nonfinite_step: int | None = None
    log_step: int | None = None

    @property
    def metrics_step(self) -> int:
        """The step the epoch's scalars are logged at: :attr:`log_step`, else the last batch's step as automatic
        optimization with one optimizer counts it, ``global_step - 1``."""
        return self.log_step if self.log_step is not None else max(self.global_step - 1, 0)

    @property
    def total_units(self) -> int:
        """Units of the sites that saw data and stayed finite."""
        return sum(r.num_units for r in self.layers.values() if r.seen and not r.nonfinite)

    @property
    def total_dead(self) -> int:
        return sum(r.num_dead for r in self.layers.values() if r.seen and not r.nonfinite)

    @property
    def dead_fraction(self) -> float:
        """Dead units over all units of the finite sites that saw data (0.0 when none did)."""
        total = self.total_units
        return self.total_dead / total if total else 0.0

    @property
    def nonfinite_sites(self) -> list[str]:
        """The sites that produced NaN or Inf in the epoch (never reported as dead), in report order."""
        return [name for name, report in self.layers.items() if report.nonfinite]

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "layers": [report.state_dict() for report in self.layers.values()],
            "partial": self.partial,
            "partial_reason": self.partial_reason,
            "first_nonfinite_step": self.first_nonfinite_step,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> EpochReport:
        layers = [LayerReport.from_state_dict(s) for s in state.get("layers", [])]
        first = state.get("first_nonfinite_step")
        return cls(
            epoch=int(state.get("epoch", -1)),
            global_step=int(state.get("global_step", -1)),
            layers={report.name: report for report in layers},
            partial=bool(state.get("partial", False)),
            partial_reason=str(state.get("partial_reason", "")),
            first_nonfinite_step=None if first is None else int(first),
        )
