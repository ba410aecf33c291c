"""Per-site activity counts (a torchmetrics ``Metric``) and the report computed from them."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_relu import _native

__all__ = ["ActivationStats", "LayerReport"]

# Sums of 0/1 values are exact in float32 up to 2**24 terms.
_FLOAT32_EXACT = 2**24
# elements of the per-thread CPU scratch buffer that counting writes signs into (4 MiB in float32)
_SCRATCH_NUMEL = 2**20
_THREAD_LOCAL = threading.local()
# states holding counts in float64: moved with the metric, never cast to another dtype
_FLOAT64_STATES = ("active", "pre_sum", "pre_sumsq")
# accumulated outputs that may wait per site before they are folded into the states
_MAX_PENDING = 32


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
        dead: per unit, ``True`` when the unit was 0 on every entry seen (never ``True`` when nothing was seen).
        activation_rate: per unit, the share of its entries that were ``> 0`` (float64; NaN when nothing was seen).
        num_dead: number of dead units.
        dead_fraction: ``num_dead / num_units`` (0.0 when nothing was seen).
        living_data_fraction: share of samples not killed at the site (NaN when nothing was seen).
        eps: the activity threshold below which a unit is *dying*.
        dying: per unit, ``True`` when its activation rate is below ``eps`` (dead units included).
        num_dying: number of dying units.
        dying_fraction: ``num_dying / num_units``.
        nonfinite_batches: number of batches whose output at the site held NaN or Inf.
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
        dead = (active_count == 0) & seen
        if seen:
            rate = active_count.to(torch.float64) / entries_per_unit
        else:
            rate = torch.full((num_units,), math.nan, dtype=torch.float64)
        num_dead = int(dead.sum())
        dying = (rate < eps) & seen
        num_dying = int(dying.sum())
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
            dead_fraction=num_dead / num_units if num_units else 0.0,
            living_data_fraction=1.0 - killed / samples if samples else math.nan,
            eps=float(eps),
            dying=dying,
            num_dying=num_dying,
            dying_fraction=num_dying / num_units if num_units else 0.0,
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
        """Every unit dead: everything after the site receives a constant."""
        return self.seen and self.num_units > 0 and self.num_dead == self.num_units

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
            f"samples={self.samples})"
        )


class ActivationStats(Metric):
    """Exact per-unit activity counts of one rectifier site, reduced across processes by summation.

    ``update`` takes the site's output and adds, per unit, the number of entries ``> 0`` and, per batch,
    the number of samples whose whole output is 0. It runs on the output's device without any
    host-device synchronization. NaN entries count as not active.

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

    active: Tensor
    entries: Tensor
    samples: Tensor
    killed: Tensor
    nonfinite: Tensor

    def __init__(
        self,
        num_units: int | None = None,
        unit_dim: int | None = None,
        name: str = "",
        eps: float = 0.01,
        track_margin: bool = False,
        **kwargs: Any,
    ) -> None:
        # the hot path updates states in place, outside torchmetrics' update wrapper: never serve a cached result
        kwargs.setdefault("compute_with_cache", False)
        super().__init__(**kwargs)
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._host = [0, 0]  # samples and entries per unit counted since the last fold into the states
        _check_eps(eps)
        if not isinstance(track_margin, bool):
            raise ValueError(f"`track_margin` must be a bool, got {track_margin!r}")
        self.eps = float(eps)
        self.track_margin = track_margin
        if num_units is not None and (isinstance(num_units, bool) or not isinstance(num_units, int) or num_units < 1):
            raise ValueError(f"`num_units` must be a positive integer or None, got {num_units!r}")
        if unit_dim not in (None, 1, -1):
            raise ValueError(f"`unit_dim` must be 1, -1 or None, got {unit_dim!r}")
        self.num_units = num_units
        self.unit_dim = unit_dim
        self.name = name
        # active entries per unit: float64 counts are exact up to 2**53, and take float32 batch sums in one op
        self.add_state("active", default=torch.zeros(num_units or 0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("entries", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("samples", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("killed", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("nonfinite", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        if track_margin:
            width = num_units or 0
            self.add_state("pre_sum", default=torch.zeros(width, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("pre_sumsq", default=torch.zeros(width, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("pre_entries", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def unit_axis(self, output: Tensor) -> int:
        """The dimension of ``output`` that indexes units (non-negative)."""
        if output.ndim <= 2:
            return output.ndim - 1
        unit_dim = 1 if self.unit_dim is None else self.unit_dim
        return unit_dim % output.ndim

    def update(self, output: Tensor) -> None:
        """Count the active entries of one output of the site (shape ``(batch, ...)``)."""
        self.accumulate(output)
        self.flush()

    def accumulate(self, output: Tensor) -> bool:
        """What :meth:`update` does, in the fewest tensor operations: the hooks' hot path. Returns whether results
        wait to be folded (see below).

        A CPU output the fused C kernel takes (:mod:`lightning_relu._native`) is counted straight into the states,
        in one call that allocates nothing. Otherwise the two reductions of the output (active entries per unit,
        output sum per sample) are computed here and adding them to the states is left pending, so that
        :func:`flush_stats` can fold the results of every site of a forward pass with a few batched
        (``torch._foreach_*``) operations instead of several per site. The sample and entry counts, known from the
        shape, wait as host integers either way. Everything pending is folded by :meth:`flush`, which
        :meth:`compute`, :meth:`sync`, :meth:`merge_state`, :meth:`update` and moving the metric call
        (:meth:`reset` drops it); at most ``_MAX_PENDING`` outputs wait per site. Nothing is assigned to the module
        (attribute assignment costs microseconds on a ``Module``) and nothing synchronizes with the host.
        """
        output = output.detach()
        if output.ndim == 1:
            output = output.unsqueeze(1)  # (batch,): one unit per sample
        axis = self.unit_axis(output)
        num_units = output.shape[axis]
        if self.active.numel() != num_units:
            if self.active.numel() != 0:
                raise ValueError(
                    f"site {self.name!r} has {self.active.numel()} units but got an output of shape "
                    f"{tuple(output.shape)} with {num_units} along dim {axis}"
                )
            with torch.inference_mode(False):  # a state born in inference mode could not be updated later
                self.active = torch.zeros(num_units, dtype=torch.float64, device=output.device)
        batch = output.shape[0]
        if batch == 0:
            return False
        per_block = output.numel() // (batch * num_units)
        host = self._host
        host[0] += batch
        host[1] += batch * per_block
        # what torchmetrics' update wrapper would count, without its per-call attribute assignments
        self.__dict__["_update_count"] = self.__dict__.get("_update_count", 0) + 1
        kernel = _kernel_for(output)
        if kernel is not None:
            bound = kernel.bind(output, axis, self.active, self.killed, self.nonfinite)
            if bound is not None and kernel.run(bound, output):
                # added to the states in place: nothing waits. Kept for `accumulate_again`, which counts the next
                # output like this one without repeating the checks above
                states = (self.active, self.killed, self.nonfinite)
                again = (output.shape, output.stride(), output.dtype, bound, kernel, states, (batch, batch * per_block))
                self.__dict__["_again"] = again
                return False
        pending = self._pending
        pending.append(_reductions(output, axis, per_block))
        if len(pending) >= _MAX_PENDING:
            self.flush()
            return False
        return True

    def accumulate_again(self, output: Tensor) -> bool:
        """Count ``output`` with the kernel call that :meth:`accumulate` made for the last output it counted with
        the kernel, when ``output`` is alike (a plain CPU tensor of the same shape, strides and dtype, the same
        states and kernel, not inside ``torch.compile`` tracing); True once counted. False, with nothing counted,
        for anything else: :meth:`accumulate` then.

        The hooks' hot path: a few attribute reads instead of the dozens :meth:`accumulate` makes. Inside a
        training step, where each one runs with cold caches, those cost about as much as reading the output.
        """
        again = self.__dict__.get("_again")
        if again is None:
            return False
        *call, states, (samples, entries) = again
        # states are replaced, never moved in place, by reset, to, load...: the bound addresses are theirs
        if self.active is not states[0] or self.killed is not states[1] or self.nonfinite is not states[2]:
            return False
        if not _run_again(output, *call):
            return False
        host = self._host
        host[0] += samples
        host[1] += entries
        attributes = self.__dict__
        attributes["_update_count"] = attributes.get("_update_count", 0) + 1
        return True

    def flush(self) -> None:
        """Fold the pending results of :meth:`accumulate` into the states (a no-op when none wait)."""
        if self.__dict__.get("_pending"):
            flush_stats([self])
        host = self.__dict__.get("_host")
        if host and host[0]:
            self.samples.add_(host[0])
            self.entries.add_(host[1])
            host[0] = host[1] = 0

    @property
    def pending(self) -> int:
        """How many accumulated outputs wait to be folded into the states."""
        return len(self._pending)

    def sync(self, *args: Any, **kwargs: Any) -> None:
        self.flush()
        super().sync(*args, **kwargs)

    def merge_state(self, incoming_state: Any) -> None:
        if isinstance(incoming_state, ActivationStats):
            incoming_state.flush()
        self.flush()
        super().merge_state(incoming_state)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_again", None)  # holds the kernel's C function, which does not pickle
        state.pop("_margin_again", None)
        return state

    def reset(self) -> None:
        self._pending.clear()
        self._host[0] = self._host[1] = 0
        super().reset()

    def _apply(self, fn: Any, exclude_state: Sequence[str] = ()) -> ActivationStats:
        self.flush()  # pending results live where the outputs were: fold them before the states move
        # the float64 counts follow the device only: `.to(dtype)` (bf16-true / 16-true precision) would round them
        exact = tuple(key for key in _FLOAT64_STATES if key in self._defaults)
        this = super()._apply(fn, exclude_state=(*exact, *exclude_state))
        device = this.samples.device  # an integer state: moved, never cast
        for key in exact:
            this._defaults[key] = this._defaults[key].to(device)
            setattr(this, key, getattr(this, key).to(device))
        return this

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.flush()  # torchmetrics' forward copies the states and resets: fold what waits first
        return super().forward(*args, **kwargs)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.active.dtype != torch.float64:  # saved by an older version with int64 counts
            self.active = self.active.to(torch.float64)

    def update_margin(self, pre_activation: Tensor) -> None:
        """Accumulate per-unit sums of one pre-activation and of its square (with ``track_margin=True``): on CPU
        in one pass of the C kernel (sums in double) where it takes the layout, else with two float reductions."""
        if not self.track_margin:
            return
        pre = pre_activation.detach()
        if pre.ndim == 1:
            pre = pre.unsqueeze(1)
        if pre.shape[0] == 0 or not pre.is_floating_point():
            return
        axis = self.unit_axis(pre)
        num_units = pre.shape[axis]
        if self.pre_sum.numel() == 0:
            with torch.inference_mode(False):
                self.pre_sum = torch.zeros(num_units, dtype=torch.float64, device=pre.device)
                self.pre_sumsq = torch.zeros(num_units, dtype=torch.float64, device=pre.device)
        elif self.pre_sum.numel() != num_units:
            return  # the output's width check reports the mismatch
        kernel = _kernel_for(pre)
        states = (self.pre_sum, self.pre_sumsq, self.pre_entries)
        bound = None if kernel is None else kernel.bind_moments(pre, axis, *states)
        if bound is not None and kernel.run(bound, pre):
            # both sums in one pass of the C kernel, in double, straight into the states; the call is kept for
            # `update_margin_again`, which reruns it for the next pre-activation alike
            self.__dict__["_margin_again"] = (pre.shape, pre.stride(), pre.dtype, bound, kernel, states)
            return
        dims = tuple(d for d in range(pre.ndim) if d != axis)
        # two read-only float reductions; the 2-norm gives the sum of squares without a squared copy
        self.pre_sum.add_(pre.sum(dims, dtype=torch.float32))
        self.pre_sumsq.add_(torch.linalg.vector_norm(pre, 2, dims, dtype=torch.float32).to(torch.float64).square())
        self.pre_entries.add_(pre.numel() // num_units)

    def update_margin_again(self, pre_activation: Tensor) -> bool:
        """:meth:`update_margin` with the kernel call it made for the last pre-activation it summed with the
        kernel, when ``pre_activation`` is alike (as :meth:`accumulate_again` checks its output); True once added.
        False, with nothing added, for anything else: :meth:`update_margin` then."""
        again = self.__dict__.get("_margin_again")
        if again is None:
            return False
        *call, states = again
        if self.pre_sum is not states[0] or self.pre_sumsq is not states[1] or self.pre_entries is not states[2]:
            return False  # replaced states (see `accumulate_again`)
        return _run_again(pre_activation, *call)

    def compute(self) -> LayerReport:
        """The report over everything seen since the last ``reset`` (summed over processes)."""
        self.flush()
        margin: dict[str, Any] = {}
        if self.track_margin:
            margin = {"pre_sum": self.pre_sum, "pre_sumsq": self.pre_sumsq, "pre_entries": int(self.pre_entries)}
        return LayerReport.from_counts(
            name=self.name,
            active_count=self.active,
            entries_per_unit=int(self.entries),
            samples=int(self.samples),
            killed=int(self.killed),
            eps=self.eps,
            nonfinite_batches=int(self.nonfinite),
            **margin,
        )


def _run_again(
    tensor: Tensor, shape: torch.Size, stride: tuple[int, ...], dtype: torch.dtype, bound: Any, kernel: Any
) -> bool:
    """Run the kernel call ``bound`` for a tensor of this shape, strides and dtype on ``tensor`` when it is alike
    (a plain CPU tensor, not negated, with storage) and the process still counts with ``kernel``, outside
    ``torch.compile`` tracing; whether it ran and added. The caller has checked that the call's states are still
    its own. Inline rather than through `_Kernel.run`: the hooks' hot path, where every Python call costs."""
    if (
        torch.compiler.is_compiling()
        or type(tensor) is not Tensor
        or not tensor.is_cpu
        or tensor.dtype is not dtype
        or tensor.shape != shape
        or _native._state.get("kernel") is not kernel  # the counting path was switched
    ):
        return False
    try:
        if tensor.stride() != stride or tensor.is_neg():
            return False
        address = tensor.data_ptr()
    except RuntimeError:  # a layout without strides, a tensor without storage (torch.func's wrappers)
        return False
    function, arguments = bound
    return function(address, *arguments, torch.get_num_threads()) == 0


def _check_eps(eps: object) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= eps <= 1.0:
        raise ValueError(f"`eps` must be a number in [0, 1], got {eps!r}")


def _kernel_for(output: Tensor) -> _native._Kernel | None:
    """The fused C kernel where it may count ``output`` (a plain CPU tensor, outside ``torch.compile`` tracing), else
    None. The kernel itself still declines layouts and dtypes it does not take."""
    if output.device.type == "cpu" and type(output) is Tensor and not torch.compiler.is_compiling():
        return _native.counting_kernel()
    return None


def _reductions(output: Tensor, axis: int, per_block: int) -> tuple[Tensor, Tensor]:
    """The two reductions of a (non-empty, at least 2-D) rectifier output that counting needs: active entries per
    unit, and the output summed per sample (0 exactly when the sample's whole output is 0, since the entries are
    never negative; NaN or Inf when one of its entries is). On CPU both come from one pass of the fused C kernel
    (:mod:`lightning_relu._native`) where it is built and takes the output's layout, else from ATen operations."""
    others = tuple(d for d in range(1, output.ndim) if d != axis)  # reduced per sample and unit
    if not output.is_floating_point():
        return output.gt(0).sum((0, *others)), output.sum(tuple(range(1, output.ndim)))
    kernel = _kernel_for(output)
    if kernel is not None:
        done = kernel.count(output, axis)
        if done is not None:
            return done
    half = output.dtype not in (torch.float32, torch.float64)
    rows = output.sum(tuple(range(1, output.ndim)), dtype=torch.float32 if half else None)
    return _active_per_unit(output, axis, others, per_block), rows


def _active_per_unit(output: Tensor, axis: int, others: tuple[int, ...], per_block: int) -> Tensor:
    """The number of entries > 0 per unit of a float rectifier output (NaN entries are not counted).

    ``sign()`` is 1 for entries > 0 and 0 for zeros (rectifier outputs are never negative); a float reduction of it
    is several times cheaper than reducing a bool mask, and ``nansum`` leaves NaN out. Float32 sums of 0/1 are exact
    below 2**24 terms; larger sums accumulate in float64. A CPU output larger than the scratch buffer has its sign
    written into that reused buffer a few samples at a time: a fresh temporary of several MiB costs more in page
    faults than the arithmetic itself, and slows the allocations of the training step around it.
    """
    batch = output.shape[0]
    half = output.dtype not in (torch.float32, torch.float64)
    exact = batch * per_block < _FLOAT32_EXACT
    per_sample = output.numel() // batch  # not output[0]: indexing costs an op
    if output.device.type != "cpu" or output.numel() <= _SCRATCH_NUMEL or per_sample > _SCRATCH_NUMEL:
        sign = output.sign()
        if not others:
            return sign.nansum(0, dtype=torch.float32 if half and exact else None if exact else torch.float64)
        acc = torch.float32 if per_block < _FLOAT32_EXACT else torch.float64
        return sign.nansum(others, dtype=acc).sum(0, dtype=None if exact else torch.float64)
    scratch = _scratch(output.dtype)
    step = _SCRATCH_NUMEL // per_sample  # samples per chunk: every chunk sum has fewer than 2**24 terms
    if not others:  # (batch, units): per-chunk counts, summed
        parts = []
        for start in range(0, batch, step):
            chunk = output[start : start + step]
            sign = torch.sign(chunk, out=scratch[: chunk.numel()].view(chunk.shape))
            parts.append(sign.nansum(0, dtype=torch.float32))
        return torch.stack(parts).sum(0, dtype=None if exact else torch.float64)
    per_sample_unit = output.new_empty((batch, output.shape[axis]), dtype=torch.float32)
    for start in range(0, batch, step):
        chunk = output[start : start + step]
        sign = torch.sign(chunk, out=scratch[: chunk.numel()].view(chunk.shape))
        torch.nansum(sign, others, dtype=torch.float32, out=per_sample_unit[start : start + step])
    return per_sample_unit.sum(0, dtype=None if exact else torch.float64)


def _scratch(dtype: torch.dtype) -> Tensor:
    """This thread's reusable scratch buffer of ``_SCRATCH_NUMEL`` CPU elements of ``dtype``."""
    buffers: dict[torch.dtype, Tensor] = _THREAD_LOCAL.__dict__.setdefault("scratch", {})
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < _SCRATCH_NUMEL:
        with torch.inference_mode(False):  # usable in and out of inference mode
            buffer = buffers[dtype] = torch.empty(_SCRATCH_NUMEL, dtype=dtype)
    return buffer


def flush_stats(stats: Iterable[ActivationStats]) -> None:
    """Fold the pending results of several :class:`ActivationStats` into their states with batched operations.

    Everything that waits is folded at once: the per-unit counts of sites of one width are stacked and summed per
    site (in float64, exact), then added with one ``torch._foreach_add_``; the per-sample sums of batches of one
    size are stacked and reduced per site, with one ``torch._foreach_add_`` per state and batch size. When every
    site waits with as many results (a model whose sites all run at every pass) that is about a dozen tensor
    operations whatever the number of sites and passes; sites with uneven numbers of results of one batch size
    get one stack each. It never synchronizes with the host.
    """
    waiting = list({id(s): s for s in stats if s._pending}.values())
    if not waiting:
        return
    pending = [s._pending for s in waiting]
    for s in waiting:
        s._pending = []
    # per-unit counts: sites grouped by the shape of their counts and how many wait
    by_width: dict[tuple[Any, ...], list[tuple[ActivationStats, list[Tensor]]]] = {}
    for s, results in zip(waiting, pending, strict=True):
        counts = [per_unit for per_unit, _ in results]
        by_width.setdefault((len(counts), counts[0].shape, counts[0].device), []).append((s, counts))
    targets, sums = [], []
    for (waits, shape, _), members in by_width.items():
        targets += [s.active for s, _ in members]
        if waits == 1:
            sums += [counts[0] for _, counts in members]
        else:  # (sites, waits, units) summed over the waits; float64 keeps the sums exact
            parts = [c for _, counts in members for c in counts]
            if len({c.dtype for c in parts}) > 1 and any(not c.is_floating_point() for c in parts):
                parts = [c.to(torch.float64) for c in parts]  # stacked beside float32, int64 would become float32
            table = torch.stack(parts).view(len(members), waits, *shape)
            sums += table.sum(1, dtype=torch.float64).unbind()
    torch._foreach_add_(targets, sums)
    # per-sample sums: every site's results for batches of one size, stacked; a site appears at most once per
    # `_foreach_` list (one list per batch size)
    by_batch: dict[tuple[Any, ...], dict[int, tuple[ActivationStats, list[Tensor]]]] = {}
    for s, results in zip(waiting, pending, strict=True):
        for _, rows in results:
            by_batch.setdefault((rows.shape, rows.dtype, rows.device), {}).setdefault(id(s), (s, []))[1].append(rows)
    for members in by_batch.values():
        sites = list(members.values())
        even = len({len(rows) for _, rows in sites}) == 1
        groups = [sites] if even else [[site] for site in sites]  # uneven numbers of such batches: one per site
        for group in groups:
            waits = len(group[0][1])
            table = torch.stack([r for _, rows in group for r in rows]).view(len(group), waits, -1)
            torch._foreach_add_([s.killed for s, _ in group], table.eq(0).sum((1, 2)).unbind())
            if table.is_floating_point():
                # NaN and Inf propagate into a batch's sum: the batch is flagged
                flagged = table.sum(2).isfinite().logical_not_().sum(1)
                torch._foreach_add_([s.nonfinite for s, _ in group], flagged.unbind())
