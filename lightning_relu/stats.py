"""``ActivationStats``: per-site activity counts, a torchmetrics ``Metric`` over :mod:`lightning_relu.functional`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

import lightning_relu.functional as functional
from lightning_relu.functional import (
    NO_STEP,
    _activation_stats_compute,
    _count_plain,
    _margin_update,
    _Pending,
    _prepare,
    _Workspace,
    unit_axis,
)
from lightning_relu.report import LayerReport

__all__ = ["ActivationStats", "LayerReport"]


def _state(name: str, part: str, doc: str) -> property:
    """A count state of :class:`ActivationStats`, held in ``_<name>``: a read folds the pending ``part`` of the counts
    that it is made of first (``"counts"``, ``"rows"`` or ``"totals"``, see ``_Pending``), a write folds everything."""
    key = "_" + name

    def get(self: ActivationStats) -> Tensor:
        self._fold(part)
        value: Tensor = self.__dict__[key]
        return value

    def set(self: ActivationStats, value: Tensor) -> None:
        self._fold()
        if isinstance(value, Tensor) and value.is_inference():
            # set under inference mode (a `reset` in an evaluation loop): a state the next update adds to in place
            with torch.inference_mode(False):
                value = value.clone()
        self.__dict__[key] = value

    return property(get, set, doc=doc)


class ActivationStats(Metric):
    """Exact per-unit activity counts of one rectifier site, reduced across processes by summation.

    ``update`` takes the site's output and adds, per unit, the number of entries ``> 0`` and, per batch,
    the number of samples whose whole output is 0. It runs on the output's device without any
    host-device synchronization; on the CPU it allocates nothing once it has seen an output of the same shape
    and makes three ATen calls per chunk of samples, keeping partial sums that are added to the states when a state
    is read (any read: ``compute``, ``state_dict``, a sync across processes, an attribute access) or set (``reset``,
    a load), so the states always read exact (see :mod:`lightning_relu.functional`, which does the counting). NaN
    entries count as not active.

    States (all summed across processes): ``active`` (int64 per unit), ``entries`` (entries per unit),
    ``samples``, ``killed``, ``nonfinite`` (batches holding NaN or Inf); with ``track_margin``, the per-unit sums
    ``pre_sum`` and ``pre_sumsq`` (float64, held bit for bit in the int64 states ``pre_sum_bits`` and
    ``pre_sumsq_bits`` so that moving a model that holds the metric to another dtype never rounds them) and
    ``pre_entries``. Integer states are never cast by ``.to(dtype)``, so a model in bf16-true precision keeps
    exact counts.

    Args:
        num_units: number of units; ``None`` to size the state from the first output.
        unit_dim: dimension that indexes units: ``1`` (channels) or ``-1`` (last dimension); ``None`` infers
            ``-1`` for 2-D outputs and ``1`` otherwise.
        name: the site's name, copied into the report.
        eps: activity threshold of a *dying* unit (Arnekvist et al.): active on fewer than ``eps`` of its entries.
        track_margin: also accumulate per-unit sums of the pre-activation and of its square
            (:meth:`update_margin`), for the death margin ``mean / std`` in the report.
        kwargs: passed on to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> stats = ActivationStats(num_units=3)
        >>> stats.update(torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 3.0]]))
        >>> report = stats.compute()
        >>> report.dead.tolist(), report.activation_rate.tolist()
        ([True, False, False], [0.0, 1.0, 0.5])
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    pre_sum_bits: Tensor
    pre_sumsq_bits: Tensor
    pre_entries: Tensor
    # the count states as stored (the properties `active`, `entries`, ... fold pending counts into them first)
    _active: Tensor
    _entries: Tensor
    _samples: Tensor
    _killed: Tensor
    _nonfinite: Tensor

    def __init__(
        self,
        num_units: int | None = None,
        unit_dim: int | None = None,
        name: str = "",
        eps: float = 0.01,
        track_margin: bool = False,
        **kwargs: Any,
    ) -> None:
        # `update_margin` adds to states outside `update`: a cached result could miss it
        kwargs.setdefault("compute_with_cache", False)
        super().__init__(**kwargs)
        _check_eps(eps)
        if not isinstance(track_margin, bool):
            raise ValueError(f"`track_margin` must be a bool, got {track_margin!r}")
        if num_units is not None and (isinstance(num_units, bool) or not isinstance(num_units, int) or num_units < 1):
            raise ValueError(f"`num_units` must be a positive integer or None, got {num_units!r}")
        if unit_dim not in (None, 1, -1):
            raise ValueError(f"`unit_dim` must be 1, -1 or None, got {unit_dim!r}")
        self.eps = float(eps)
        self.track_margin = track_margin
        self.num_units = num_units
        self.unit_dim = unit_dim
        self.name = name
        self._workspace: _Workspace | None = None  # buffers of the last output's shape (CPU; see `functional`)
        self._pending: _Pending | None = None  # partial counts not yet in the states (CPU; see `functional`)
        # the batch (a training step) that the outputs counted now belong to, set by whoever drives the counting (the
        # monitor, through the tracker), and the smallest one among the non-finite outputs the CPU path has folded:
        # the CPU path tells a non-finite batch only when it folds, not after every batch
        self._batch_tag = NO_STEP
        self._first_nonfinite: Tensor | None = None
        width = num_units or 0
        self.add_state("active", default=torch.zeros(width, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("entries", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("samples", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("killed", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("nonfinite", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        if track_margin:
            zeros = torch.zeros(width, dtype=torch.float64).view(torch.int64)
            self.add_state("pre_sum_bits", default=zeros.clone(), dist_reduce_fx=_sum_float64_bits)
            self.add_state("pre_sumsq_bits", default=zeros.clone(), dist_reduce_fx=_sum_float64_bits)
            self.add_state("pre_entries", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    @property
    def width(self) -> int:
        """The number of units: ``num_units``, or the width of the first output seen (0 before one)."""
        return self.num_units if self.num_units is not None else self._active.numel()

    def unit_axis(self, output: Tensor) -> int:
        """The dimension of ``output`` that indexes units (non-negative)."""
        return unit_axis(output, self.unit_dim)

    def update(self, output: Tensor) -> None:
        """Count the active entries of one output of the site (shape ``(batch, ...)``)."""
        self._add(output)

    def forward(self, output: Tensor) -> LayerReport:
        """As torchmetrics' ``forward`` (``metric(output)``): add ``output`` to the states and return the report of
        that output alone. The per-unit state is sized from ``output`` first when no width is known yet (torchmetrics
        adds the states of the output to those held, which must have its width)."""
        self._size_like(output)
        report: LayerReport = super().forward(output)
        return report

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """As torchmetrics' ``merge_state``: add another metric's states (or a dict of them) to these; a metric that
        has not seen an output yet (no width) takes the other's width, and one that has not seen an output adds
        nothing."""
        incoming = incoming_state.active if isinstance(incoming_state, ActivationStats) else None
        if isinstance(incoming_state, dict) and isinstance(incoming_state.get("active"), Tensor):
            incoming = incoming_state["active"]
        if isinstance(incoming, Tensor) and incoming.ndim == 1:
            if incoming.numel() == 0 and self.active.numel() > 0:
                return  # nothing seen there: nothing to add
            if self.active.numel() == 0 and incoming.numel() > 0:
                with torch.inference_mode(False):
                    self.active = torch.zeros(incoming.numel(), dtype=torch.int64, device=self.active.device)
        super().merge_state(incoming_state)

    def _size_like(self, output: Tensor) -> None:
        prepared = _prepare(output) if isinstance(output, Tensor) else None
        if prepared is not None and prepared.ndim > 0 and self.active.numel() == 0:
            units = prepared.shape[unit_axis(prepared, self.unit_dim)]
            if units:
                self._shaped(prepared, units)

    def _add(self, output: Tensor) -> None:
        """What ``update`` does, without torchmetrics' bookkeeping around it (the tracker's hooks call it while
        ``torch.compile`` traces them)."""
        output = _prepare(output)
        if output.ndim == 0:
            raise ValueError(f"`output` must have a batch dimension, got a 0-d tensor of shape {tuple(output.shape)}")
        axis = unit_axis(output, self.unit_dim)
        active = self._active
        if active.numel() != output.shape[axis] or active.dtype is not torch.int64:
            self._shaped(output, output.shape[axis])
        if output.numel() == 0:
            return  # no sample, or samples without entries (a sequence of length 0): nothing to count
        ws = functional._workspace(output, axis, self._workspace)
        tracing = torch.compiler.is_compiling()
        if not tracing:
            functional._THREAD.counting = True
        try:
            if ws is None:
                self._add_plain(output, axis)
            else:
                self._add_pending(output, ws)
        finally:
            if not tracing:
                functional._THREAD.counting = False

    def _add_plain(self, output: Tensor, axis: int) -> None:
        counts, killed, nonfinite = _count_plain(output, axis)
        self._active.add_(counts)
        self._killed.add_(killed)
        self._nonfinite.add_(nonfinite)
        self._samples.add_(output.shape[0])
        self._entries.add_(output.numel() // output.shape[axis])

    def _add_pending(self, output: Tensor, ws: _Workspace) -> None:
        pending = self._pending
        if ws is not self._workspace:
            self._workspace = ws
            if pending is None or not pending.fits(ws):
                self._fold()
                pending = self._pending = _Pending(ws)
        assert pending is not None
        if pending.full():
            self._fold()
        pending.add(output, ws, self._batch_tag)

    def _fold(self, part: str | None = None) -> None:
        """Add the partial counts of the CPU path to the states: all of them, or one ``part`` (a read of ``nonfinite``
        folds only the per-sample sums), keeping the smallest batch tag of a non-finite output."""
        pending = self.__dict__.get("_pending")
        if pending is None or pending.empty:
            return
        if part in (None, "counts"):
            active = pending.fold_counts()
            if active is not None:
                self._active.add_(active)
        if part in (None, "rows"):
            rows = pending.fold_rows()
            if rows is not None:
                self._killed.add_(rows[0])
                self._nonfinite.add_(rows[1])
                first, earlier = rows[2], self._first_nonfinite
                if first is not None:
                    self._first_nonfinite = first if earlier is None else torch.minimum(earlier, first)
        if part in (None, "totals"):
            samples, entries = pending.fold_totals()
            if samples:
                self._samples.add_(samples)
                self._entries.add_(entries)

    def flush(self) -> None:
        """Add what the CPU path holds back to the states (reading or setting a state does it too)."""
        self._fold()

    def first_nonfinite_tag(self) -> Tensor | None:
        """The smallest batch tag (``_batch_tag`` when the output was counted) among the non-finite outputs that the
        CPU path counted since :meth:`clear_first_nonfinite` (0-d int64, ``2**62`` when none was; None when no
        tagged output was folded). Outputs counted with plain operations add to ``nonfinite`` at once instead: the
        monitor reads it after every batch."""
        self._fold("rows")
        return self._first_nonfinite

    def clear_first_nonfinite(self) -> None:
        """Forget the non-finite tags folded so far (a new epoch); folds what is kept first."""
        self._fold("rows")
        self._first_nonfinite = None

    def _shaped(self, output: Tensor, num_units: int) -> Tensor:
        """The per-unit state sized from the first output (or converted from the float64 counts of an older
        checkpoint); raises when it has another width."""
        active = self.active
        if active.numel() not in (0, num_units):
            axis = unit_axis(output, self.unit_dim) if output.ndim > 1 else 1
            raise ValueError(
                f"site {self.name!r} has {active.numel()} units but got an output of shape "
                f"{tuple(output.shape)} with {num_units} along dim {axis}"
            )
        with torch.inference_mode(False):  # a state born in inference mode could not be updated later
            if active.numel() == 0:
                self.active = torch.zeros(num_units, dtype=torch.int64, device=output.device)
            else:
                self.active = active.to(torch.int64)
        shaped: Tensor = self.active
        return shaped

    def update_margin(self, pre_activation: Tensor) -> None:
        """Accumulate per-unit sums of one pre-activation and of its square (with ``track_margin=True``; a no-op
        otherwise): two float reductions (:func:`lightning_relu.functional._margin_update`)."""
        if not self.track_margin:
            return
        pre = pre_activation.unsqueeze(1) if pre_activation.ndim == 1 else pre_activation
        if pre.shape[0] == 0 or not pre.is_floating_point():
            return
        num_units = pre.shape[unit_axis(pre, self.unit_dim)]
        names = ("pre_sum_bits", "pre_sumsq_bits", "pre_entries")
        # states reset under inference mode (in an evaluation loop) are added to in place below: normal tensors again
        stale = [] if torch.compiler.is_compiling() else [name for name in names if getattr(self, name).is_inference()]
        if stale or self.pre_sum_bits.numel() == 0:
            with torch.inference_mode(False):
                for name in stale:
                    setattr(self, name, getattr(self, name).clone())
                if self.pre_sum_bits.numel() == 0:
                    zeros = torch.zeros(num_units, dtype=torch.float64, device=pre.device).view(torch.int64)
                    self.pre_sum_bits, self.pre_sumsq_bits = zeros, zeros.clone()
        if self.pre_sum_bits.numel() != num_units:
            return  # the output's width check reports the mismatch
        total, squares, entries = _margin_update(pre, self.unit_dim)
        self.pre_sum.add_(total)
        self.pre_sumsq.add_(squares)
        self.pre_entries.add_(entries)

    # The count states read and write through properties: a read adds what the CPU path holds back first (so every
    # reader, torchmetrics' sync and state_dict included, sees exact counts), and a write (reset, load, sync) replaces
    # the state after that. The hot path adds to the underlying tensors directly.
    active = _state("active", "counts", "Active entries per unit (int64).")
    entries = _state("entries", "totals", "Entries per unit seen (0-d int64).")
    samples = _state("samples", "totals", "Samples seen (0-d int64).")
    killed = _state("killed", "rows", "Samples whose whole output was 0 (0-d int64).")
    nonfinite = _state("nonfinite", "rows", "Batches whose output held NaN or Inf (0-d int64).")

    @property
    def pre_sum(self) -> Tensor:
        """Per-unit sum of the pre-activations (float64, a view of the state ``pre_sum_bits``)."""
        return self.pre_sum_bits.view(torch.float64)

    @pre_sum.setter
    def pre_sum(self, value: Tensor) -> None:
        self.pre_sum_bits = value.to(torch.float64).view(torch.int64)

    @property
    def pre_sumsq(self) -> Tensor:
        """Per-unit sum of the squared pre-activations (float64, a view of the state ``pre_sumsq_bits``)."""
        return self.pre_sumsq_bits.view(torch.float64)

    @pre_sumsq.setter
    def pre_sumsq(self, value: Tensor) -> None:
        self.pre_sumsq_bits = value.to(torch.float64).view(torch.int64)

    def compute(self) -> LayerReport:
        """The report over everything seen since the last ``reset`` (summed over processes)."""
        margin: dict[str, Any] = {}
        if self.track_margin:
            margin = {"pre_sum": self.pre_sum, "pre_sumsq": self.pre_sumsq, "pre_entries": self.pre_entries}
        return _activation_stats_compute(
            self.active,
            self.entries,
            self.samples,
            self.killed,
            self.nonfinite,
            name=self.name,
            eps=self.eps,
            **margin,
        )


def _sum_float64_bits(states: Tensor) -> Tensor:
    """Reduce float64 sums held bit for bit in int64 states, stacked along dim 0 (``dist_reduce_fx``)."""
    return states.contiguous().view(torch.float64).sum(0).view(torch.int64)


def _check_eps(eps: object) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= eps <= 1.0:
        raise ValueError(f"`eps` must be a number in [0, 1], got {eps!r}")
