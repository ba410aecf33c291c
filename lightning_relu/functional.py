"""Counting one rectifier output: the functional twin of :class:`~lightning_relu.ActivationStats`.

As torchmetrics pairs ``MeanSquaredError`` with ``functional.mean_squared_error``, this module holds the counting
itself: :func:`_activation_stats_update` reduces one output to what the metric's states add up,
:func:`_activation_stats_compute` turns summed states into a :class:`~lightning_relu.LayerReport`, and
:func:`activation_stats` does both for one tensor. :class:`~lightning_relu.ActivationStats` only calls them.

Definitions (the same everywhere): an entry is *active* when it is ``> 0`` (NaN is not, ``+Inf`` is); a sample is
*killed* when its whole output is 0 (a sample holding NaN is not); a batch is *non-finite* when an entry is NaN or
Inf. Counts are exact: per-unit counts are float sums of 0/1 values taken in float32 only below 2**24 terms and in
float64 above, then added to int64 states.

How it is fast with ATen alone (measured on 2 CPU cores; see the README's Performance section). The count of active
entries needs one elementwise comparison and one float reduction of its result (a float reduction is several times
cheaper than reducing a bool mask, and ``count_nonzero`` or ``vector_norm(ord=0)`` are slower still), and the killed
samples and the non-finite flag need one float reduction per sample. On the CPU those three operations run over
chunks of samples of about ``_CHUNK_NUMEL_PER_THREAD`` entries per thread: the comparison writes into a reused
buffer that stays in the cores' caches, and the two reductions read the chunk while it is still there, so the output
is read from memory once. Every buffer is allocated once per output shape (a :class:`_Workspace`) and every
operation writes into it with ``out=``: counting allocates nothing once warm. On other devices, for tensor
subclasses and while ``torch.compile`` traces (where the compiler fuses them), the same quantities come from plain
ATen operations.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import Tensor

from lightning_relu.report import LayerReport

__all__ = ["activation_stats", "counting"]

# float32 sums of 0/1 values are exact below 2**24 terms
_FLOAT32_EXACT = 2**24
# CPU outputs are counted in chunks of samples of about this many entries per thread of ATen's pool (512 KiB of
# float32 mask per thread): small enough that a chunk and its mask stay in the cores' caches between the three
# operations, large enough that the cost of each operation's dispatch and parallel region stays small (2**14 to
# 2**18 per thread measured on the benchmark's outputs; 2**16 to 2**17 were the fastest)
_CHUNK_NUMEL_PER_THREAD = 2**17
# a sample larger than this is counted with temporaries rather than grow the kept mask buffer (4 MiB of float32)
_MAX_SAMPLE_NUMEL = 2**20
_THREAD = threading.local()


def counting() -> bool:
    """Whether this thread is counting an output or a pre-activation right now. Code that records the operations of a
    forward (:func:`lightning_relu.structure.observe`) leaves out the reads the counting makes: they are the
    monitor's, not the model's."""
    return getattr(_THREAD, "counting", False)


def unit_axis(output: Tensor, unit_dim: int | None) -> int:
    """The dimension of ``output`` that indexes units (non-negative): the last one of 1-D and 2-D outputs, else
    ``unit_dim`` (1, channels, when None)."""
    if output.ndim <= 2:
        return max(output.ndim - 1, 0)
    return (1 if unit_dim is None else unit_dim) % output.ndim


class _Workspace:
    """Buffers and views that count outputs of one shape, strides, dtype and unit axis on the CPU without
    allocating: built by :func:`_workspace` on the first such output and reused for every later one."""

    __slots__ = (
        "counts",
        "dims",
        "entries",
        "finite",
        "flag",
        "floating",
        "key",
        "killed",
        "largest",
        "masks",
        "part_views",
        "parts",
        "peak",
        "per_unit",
        "row_parts",
        "rows",
        "sample_dims",
        "samples",
        "step",
        "thread",
        "zero_rows",
    )

    def __init__(self, output: Tensor, axis: int) -> None:
        self.key = _key(output, axis)
        self.thread = threading.get_ident()
        batch = output.shape[0]
        units = output.shape[axis]
        per_sample = output.numel() // batch
        per_block = per_sample // units  # entries per unit in one sample
        self.samples = batch
        self.entries = batch * per_block
        self.floating = output.is_floating_point()
        others = tuple(d for d in range(1, output.ndim) if d != axis)
        self.dims = (0, *others)  # reduced to count one chunk's active entries per unit
        self.sample_dims = tuple(range(1, output.ndim))  # reduced per sample
        chunk_numel = _CHUNK_NUMEL_PER_THREAD * max(1, torch.get_num_threads())
        self.step = max(1, chunk_numel // per_sample)  # samples per chunk
        chunks = -(-batch // self.step)
        # a chunk's per-unit counts are exact in float32 below 2**24 terms, the whole output's likewise
        part_dtype = torch.float32 if self.step * per_block < _FLOAT32_EXACT else torch.float64
        total_dtype = torch.float32 if self.entries < _FLOAT32_EXACT else torch.float64
        # per-sample sums: float32 for half types (as exact as the output), the output's own dtype else
        if output.dtype in (torch.float32, torch.float64):
            row_dtype = output.dtype
        elif self.floating:
            row_dtype = torch.float32
        else:
            row_dtype = torch.int64
        with torch.inference_mode(False):  # usable in and out of inference mode
            mask = _scratch(min(batch, self.step) * per_sample)
            self.parts = torch.empty(chunks, units, dtype=part_dtype)
            self.part_views = list(self.parts.unbind())
            # one chunk: its counts are the output's (when of the same dtype), else the chunks' counts are summed
            one_part = chunks == 1 and part_dtype == total_dtype
            self.per_unit = self.part_views[0] if one_part else torch.empty(units, dtype=total_dtype)
            self.counts = torch.empty(units, dtype=torch.int64)
            self.rows = torch.empty(batch, dtype=row_dtype)
            sizes = [min(self.step, batch - start) for start in range(0, batch, self.step)]
            self.masks = [mask[: n * per_sample].view(n, *output.shape[1:]) for n in sizes]
            self.row_parts = list(self.rows.split(self.step))
            # what the per-sample sums tell: killed samples, and whether the output is non-finite
            self.zero_rows = torch.empty(batch, dtype=torch.bool)
            self.killed = torch.empty((), dtype=torch.int64)
            self.peak = torch.empty((), dtype=row_dtype)
            self.finite = torch.empty((), dtype=torch.bool)
            self.flag = torch.zeros((), dtype=torch.int64)
            self.largest = torch.tensor(torch.finfo(row_dtype).max if self.floating else 0, dtype=row_dtype)

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None  # a copy of the metric builds its own buffers on its first output

    def __reduce__(self) -> tuple[Any, ...]:
        return (_no_workspace, ())  # nor do pickles carry them


def _no_workspace() -> None:
    return None


def _key(output: Tensor, axis: int) -> tuple[Any, ...]:
    return (output.shape, output.stride(), output.dtype, axis)


def _scratch(numel: int) -> Tensor:
    """This thread's reused float32 mask buffer, grown to at least ``numel`` entries."""
    buffer: Tensor | None = getattr(_THREAD, "mask", None)
    if buffer is None or buffer.numel() < numel:
        with torch.inference_mode(False):
            buffer = _THREAD.mask = torch.empty(numel, dtype=torch.float32)
    return buffer


def _workspace(output: Tensor, axis: int, cached: _Workspace | None) -> _Workspace | None:
    """``cached`` when it counts ``output`` on this thread, else a new workspace for it; None where counting uses
    plain ATen operations (not a plain CPU tensor, or ``torch.compile`` is tracing)."""
    if type(output) is not Tensor or not output.is_cpu or torch.compiler.is_compiling() or output.is_complex():
        return None
    if cached is not None and cached.key == _key(output, axis) and cached.thread == threading.get_ident():
        return cached
    if output.numel() // output.shape[0] > _MAX_SAMPLE_NUMEL:
        return None  # one sample larger than any buffer worth keeping: plain operations, with temporaries
    return _Workspace(output, axis)


def _count_with_workspace(output: Tensor, ws: _Workspace) -> tuple[Tensor, Tensor]:
    """Active entries per unit (int64, in ``ws.counts``) and per-sample sums (in ``ws.rows``) of a CPU output, chunk
    by chunk: compare into the cached mask, reduce the mask per unit, reduce the chunk per sample."""
    dims, sample_dims = ws.dims, ws.sample_dims
    if len(ws.masks) == 1:
        mask = ws.masks[0]
        torch.gt(output, 0, out=mask)
        torch.sum(mask, dims, dtype=ws.parts.dtype, out=ws.part_views[0])
        torch.sum(output, sample_dims, dtype=ws.rows.dtype, out=ws.rows)
    else:
        parts_dtype, rows_dtype = ws.parts.dtype, ws.rows.dtype
        for chunk, mask, part, rows in zip(output.split(ws.step), ws.masks, ws.part_views, ws.row_parts, strict=True):
            torch.gt(chunk, 0, out=mask)
            torch.sum(mask, dims, dtype=parts_dtype, out=part)
            torch.sum(chunk, sample_dims, dtype=rows_dtype, out=rows)
    if ws.per_unit is not ws.part_views[0]:
        torch.sum(ws.parts, 0, dtype=ws.per_unit.dtype, out=ws.per_unit)
    ws.counts.copy_(ws.per_unit)
    return ws.counts, ws.rows


def _rows_tell(rows: Tensor, ws: _Workspace | None) -> tuple[Tensor, Tensor]:
    """Killed samples (0-d int64) and whether the output is non-finite (0-d int64, 0 or 1) from its per-sample sums
    (into the workspace's buffers when there is one). A sum is 0 exactly when the sample's whole output is 0 (the
    entries are never negative), NaN or Inf when one of its entries is: NaN is not 0, so a sample holding NaN is
    not killed; NaN and Inf propagate into the largest sum, which is then not ``<=`` the largest finite value."""
    if ws is None:
        killed = rows.eq(0).sum()
        if not rows.is_floating_point():
            return killed, torch.zeros((), dtype=torch.int64, device=rows.device)
        return killed, rows.amax().le(torch.finfo(rows.dtype).max).logical_not().to(torch.int64)
    torch.sum(torch.eq(rows, 0, out=ws.zero_rows), 0, out=ws.killed)
    if ws.floating:
        torch.le(torch.amax(rows, 0, out=ws.peak), ws.largest, out=ws.finite)
        torch.logical_not(ws.finite, out=ws.flag)
    return ws.killed, ws.flag


def _count_plain(output: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    """Active entries per unit (int64) and per-sample sums with plain ATen operations (GPU tensors, tensor
    subclasses, code that ``torch.compile`` traces: there the compiler fuses them into one pass)."""
    others = tuple(d for d in range(1, output.ndim) if d != axis)
    sample_dims = tuple(range(1, output.ndim))
    if output.device.type == "cpu":
        # a float reduction of the comparison: bool -> int64 sums are several times slower on the CPU
        numel = output.numel() // output.shape[axis]
        dtype = torch.float32 if numel < _FLOAT32_EXACT else torch.float64
        per_unit = output.gt(0).to(dtype).sum((0, *others)).to(torch.int64)
    else:
        per_unit = output.gt(0).sum((0, *others), dtype=torch.int64)
    if output.dtype in (torch.float32, torch.float64) or not output.is_floating_point():
        rows = output.sum(sample_dims)
    else:
        rows = output.sum(sample_dims, dtype=torch.float32)
    return per_unit, rows


def _prepare(output: Tensor) -> Tensor:
    """``output`` without autograd history, with one unit per sample for a 1-D output."""
    output = output.detach()
    return output.unsqueeze(1) if output.ndim == 1 else output


def _activation_stats_update(
    output: Tensor, unit_dim: int | None = None, workspace: _Workspace | None = None
) -> tuple[Tensor, Tensor, Tensor, int, int, _Workspace | None]:
    """What one rectifier output adds to the counts.

    Args:
        output: the rectifier's output, ``(batch, ...)`` (a 1-D output is one unit per sample); not empty.
        unit_dim: the dimension that indexes units of a 3-D or larger output (``1`` or ``-1``; ``None``: ``1``).
        workspace: the workspace of an earlier call, reused when it fits (the metric keeps it between calls).

    Returns:
        ``(active, killed, nonfinite, samples, entries, workspace)``: active entries per unit (int64), killed
        samples and whether the output is non-finite (0-d int64, 0 or 1), the number of samples and of entries per
        unit, and the workspace that counted (None when plain operations did). The tensors may live in the
        workspace: add them before the next call with this workspace.
    """
    _THREAD.counting = True
    try:
        output = _prepare(output)
        axis = unit_axis(output, unit_dim)
        ws = _workspace(output, axis, workspace)
        if ws is not None:
            active, rows = _count_with_workspace(output, ws)
            samples, entries = ws.samples, ws.entries
        else:
            active, rows = _count_plain(output, axis)
            samples = output.shape[0]
            entries = output.numel() // output.shape[axis]
        killed, nonfinite = _rows_tell(rows, ws)
    finally:
        _THREAD.counting = False
    return active, killed, nonfinite, samples, entries, ws


def _margin_update(pre_activation: Tensor, unit_dim: int | None = None) -> tuple[Tensor, Tensor, int]:
    """Per-unit sums of one pre-activation and of its square (float64), and the entries per unit they cover.

    Two read-only float reductions: a sum, and a 2-norm that gives the sum of squares without a squared copy.
    """
    _THREAD.counting = True
    try:
        pre = _prepare(pre_activation)
        axis = unit_axis(pre, unit_dim)
        dims = tuple(d for d in range(pre.ndim) if d != axis)
        acc = torch.float64 if pre.dtype == torch.float64 else torch.float32  # half types are summed in float32
        total = pre.sum(dims, dtype=acc).to(torch.float64)
        squares = torch.linalg.vector_norm(pre, 2, dims, dtype=acc).to(torch.float64).square()
    finally:
        _THREAD.counting = False
    return total, squares, pre.numel() // pre.shape[axis]


def _activation_stats_compute(
    active: Tensor,
    entries: int | Tensor,
    samples: int | Tensor,
    killed: int | Tensor,
    nonfinite: int | Tensor = 0,
    *,
    name: str = "",
    eps: float = 0.01,
    pre_sum: Tensor | None = None,
    pre_sumsq: Tensor | None = None,
    pre_entries: int | Tensor = 0,
) -> LayerReport:
    """The report of summed counts (see :class:`~lightning_relu.LayerReport` for the definitions)."""
    return LayerReport.from_counts(
        name=name,
        active_count=active,
        entries_per_unit=int(entries),
        samples=int(samples),
        killed=int(killed),
        eps=eps,
        nonfinite_batches=int(nonfinite),
        pre_sum=pre_sum,
        pre_sumsq=pre_sumsq,
        pre_entries=int(pre_entries),
    )


def activation_stats(output: Tensor, unit_dim: int | None = None, *, eps: float = 0.01, name: str = "") -> LayerReport:
    """Count one rectifier output: which units are dead, their activation rates, the killed samples.

    Args:
        output: the output of a rectifier, ``(batch, ...)``; a 1-D output is one unit per sample.
        unit_dim: the dimension that indexes units of a 3-D or larger output: ``1`` (channels) or ``-1`` (last
            dimension); ``None`` is ``1``. 2-D outputs have their units last.
        eps: activity threshold of a *dying* unit: active on fewer than ``eps`` of its entries.
        name: copied into the report.

    Example:
        >>> import torch
        >>> report = activation_stats(torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 3.0]]))
        >>> report.dead.tolist(), report.activation_rate.tolist(), report.killed
        ([True, False, False], [0.0, 1.0, 0.5], 0)
    """
    if unit_dim not in (None, 1, -1):
        raise ValueError(f"`unit_dim` must be 1, -1 or None, got {unit_dim!r}")
    prepared = _prepare(output)
    if prepared.ndim == 0:
        raise ValueError(f"`output` must have a batch dimension, got a 0-d tensor of shape {tuple(output.shape)}")
    if prepared.shape[0] == 0:
        units = prepared.shape[unit_axis(prepared, unit_dim)]
        return _activation_stats_compute(torch.zeros(units, dtype=torch.int64), 0, 0, 0, name=name, eps=eps)
    active, killed, nonfinite, samples, entries, _ = _activation_stats_update(prepared, unit_dim)
    return _activation_stats_compute(active, entries, samples, killed, nonfinite, name=name, eps=eps)
