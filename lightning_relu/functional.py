"""Counting one rectifier output: the functional twin of :class:`~lightning_relu.ActivationStats`.

As torchmetrics pairs ``MeanSquaredError`` with ``functional.mean_squared_error``, this module holds the counting
itself: :func:`_activation_stats_update` reduces one output to what the metric's states add up,
:func:`_activation_stats_compute` turns summed states into a :class:`~lightning_relu.LayerReport`, and
:func:`activation_stats` does both for one tensor. :class:`~lightning_relu.ActivationStats` calls the same code.

Definitions (the same everywhere): an entry is *active* when it is ``> 0`` (NaN is not, ``+Inf`` is); a sample is
*killed* when its whole output is 0 (a sample holding NaN is not); a batch is *non-finite* when an entry is NaN or
Inf. Both are read from each sample's sum of its entries, so a sample whose finite entries add up past the largest
value of the sum's dtype (about 3.4e38 in float32) makes its batch non-finite too: entries that large overflow the
layers that read them anyway. Rectifier outputs are never negative; an output with negative entries (``update`` takes
any tensor) can have a sample taken for killed whose entries cancel. Counts are exact: per-unit counts are float
sums of 0/1 values taken in float32 only while they stay below 2**24 and in float64 above, then added to int64 states.
An output without entries (no sample, or samples of size 0) adds nothing; a 0-d output is refused.

How it is fast with ATen alone (measured on 2 CPU cores; see ``docs/performance.md``). Inside a training step every ATen
call costs far more than in a loop on its own (tens of microseconds each on the reference machine, a view as well as a
reduction: the step's weights and activations have just evicted the dispatcher's code and data from the caches), so the
CPU path makes as few calls per output as it can, and no view it can make beforehand: per chunk of samples, one
comparison with a 0-d zero of the output's dtype (a faster kernel than a comparison with a Python number) into a reused
float32 mask buffer laid out like the output's samples; one reduction of the mask, either a matrix-vector product that
*adds* its column sums to a float32 accumulator kept per position of a sample (Linear outputs and small samples) or a
per-unit sum written into a row of its own in a buffer that keeps the per-unit sums of every chunk of the last outputs
(larger samples); and one sum per sample written into a buffer that keeps the per-sample sums of the last outputs
(``_ROWS_KEPT`` of them, fewer for outputs of many chunks). Nothing else runs per output: :class:`_Pending` holds these
partial sums and folds them into the int64 counts only when the counts are read, when a float32 sum would reach 2**24,
when the kept sums are full, or when the output's shape changes. Killed samples and non-finite batches come from the
kept per-sample sums at that point (a sum is 0 exactly when the whole sample is 0, as the entries are never negative;
NaN or Inf when an entry is). Every buffer, and every view of one that a call writes into, is made once per output shape
(a :class:`_Workspace`, and a :class:`_Pending` per metric), and every operation writes into it with ``out=`` or in
place. On other devices, for tensor subclasses, layouts whose samples are not dense, and while ``torch.compile`` traces
(where the compiler fuses them), the same quantities come from plain ATen operations added to the counts at once.
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
# CPU outputs are counted in chunks of samples of about this many entries per thread of ATen's pool, and of at least
# twice as many with one thread: small enough that a chunk and its float32 mask stay in the caches between the
# operations that read them, large enough that the number of ATen calls per output stays small (measured inside
# training steps of the benchmark's workloads; with one thread, 2**18 entries per chunk beat 2**17 on both)
_CHUNK_NUMEL_PER_THREAD = 2**17
# a sample larger than this is counted with plain operations rather than grow the kept mask buffer (4 MiB of float32)
_MAX_SAMPLE_NUMEL = 2**20
# outputs with one entry per unit in a sample (Linear outputs), and samples up to this many entries, keep one float32
# partial count per entry of a sample (one matrix-vector product per chunk adds to it); other outputs keep one per
# unit and chunk (a sum per chunk written into a kept row), which measured faster on the benchmark's convolutions
_MAX_POSITIONS_KEPT = 2**12
# outputs whose per-sample sums are kept before killed samples and non-finite batches are counted from them
_ROWS_KEPT = 64
# ... fewer where an output has many chunks: each kept output has a view per chunk (about 600 bytes each) into the kept
# per-sample sums, and another into the kept per-unit sums; this bounds their number per metric
_MAX_CHUNK_TARGETS = 2**8
# "no step": the tag of a kept output whose batch (training step) is not known (see `_Pending.add`), and the first
# non-finite tag, or step, while there is none
NO_STEP = 2**62
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


def _row_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of per-sample sums: float32 for half types (as exact as the output), the output's own for float32
    and float64, int64 for integer and bool outputs."""
    if dtype in (torch.float32, torch.float64):
        return dtype
    return torch.float32 if dtype.is_floating_point else torch.int64


class _Workspace:
    """Views and buffers that count CPU outputs of one shape, strides, dtype and unit axis, built by
    :func:`_workspace` on the first such output and reused for every later one (on the thread that built it: the
    mask buffer is the thread's).

    Everything a call needs is made here once: inside a training step every ATen call costs tens of microseconds, a
    view as well as a reduction, so the hot path makes no view it can make here (see the module's docstring).
    """

    __slots__ = (
        "entries",
        "floating",
        "key",
        "masks",
        "masks_t",
        "ones",
        "part_dims",
        "per_sample",
        "positions",
        "row_dtype",
        "row_ones",
        "sample_dims",
        "sample_shape",
        "sample_strides",
        "samples",
        "sizes",
        "step",
        "thread",
        "unit_in_sample",
        "units",
        "zero",
    )

    def __init__(self, output: Tensor, axis: int) -> None:
        self.key = _key(output, axis)
        self.thread = threading.get_ident()
        batch = output.shape[0]
        self.samples = batch
        self.per_sample = per_sample = output.numel() // batch
        self.units = output.shape[axis]
        self.entries = batch * (per_sample // self.units)  # entries per unit in one output
        self.floating = output.is_floating_point()
        self.row_dtype = _row_dtype(output.dtype)
        # a sample's entries fill memory positions 0 .. per_sample - 1 (offset by the sample's start) in some order
        self.sample_shape = sample_shape = tuple(output.shape[1:])
        self.sample_strides = sample_strides = tuple(output.stride()[1:])
        self.sample_dims = tuple(range(1, output.ndim))
        self.unit_in_sample = axis - 1
        # per entry of a sample for small samples (one matrix-vector product per chunk), else per unit
        self.positions = per_sample <= _MAX_POSITIONS_KEPT or per_sample == self.units
        chunk_numel = _CHUNK_NUMEL_PER_THREAD * max(2, torch.get_num_threads())
        # samples per chunk: fewer than 2**24 entries, so a chunk's per-unit sums are exact in float32 (a sample holds
        # at most 2**20 entries, so a chunk holds one at least)
        self.step = max(1, min(batch, chunk_numel // per_sample, (_FLOAT32_EXACT - 1) // per_sample))
        self.sizes = tuple(min(self.step, batch - start) for start in range(0, batch, self.step))
        # the dimensions a chunk's mask is summed over to count per unit (when the counts are kept per unit)
        self.part_dims = (0, *(d + 1 for d in range(len(sample_shape)) if d != self.unit_in_sample))
        with torch.inference_mode(False):  # usable in and out of inference mode
            # compared with a 0-d tensor of the output's dtype rather than a Python number: `gt` takes a faster kernel
            # (about twice as fast on 1 MiB of float32, alone, one thread)
            self.zero = torch.zeros((), dtype=output.dtype)
            mask = _scratch(self.step * per_sample)
            # each chunk's mask with the output's sample layout (so the comparison walks both alike), its samples
            # one after the other; and the same memory as a (positions, samples) matrix for the matrix-vector product
            flats = [mask[: n * per_sample] for n in self.sizes]
            self.masks = [
                flat.as_strided((flat.numel() // per_sample, *sample_shape), (per_sample, *sample_strides))
                for flat in flats
            ]
            self.masks_t = [flat.view(-1, per_sample).t() for flat in flats]
            ones = torch.ones(self.step, dtype=torch.float32)
            self.ones = [ones[:n] for n in self.sizes]
            # the per-sample sums of a float32 or float64 (samples, units) output as a matrix-vector product: measured
            # faster than a sum inside the MLP's training steps
            two_d = output.ndim == 2 and output.dtype in (torch.float32, torch.float64)
            self.row_ones = torch.ones(per_sample, dtype=output.dtype) if two_d else None

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None  # a copy of the metric builds its own buffers on its first output

    def __reduce__(self) -> tuple[Any, ...]:
        return (_nothing, ())  # nor do pickles carry them


def _nothing() -> None:
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


def _dense_samples(output: Tensor) -> bool:
    """Whether each sample's entries fill one block of memory without gaps (in any order of its dimensions)."""
    expected = 1
    for stride, size in sorted(
        (output.stride(d), output.shape[d]) for d in range(1, output.ndim) if output.shape[d] > 1
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def _workspace(output: Tensor, axis: int, cached: _Workspace | None) -> _Workspace | None:
    """``cached`` when it counts ``output`` on this thread, else a new workspace for it; None where counting uses
    plain ATen operations (not a plain CPU tensor, samples not dense in memory, or ``torch.compile`` is tracing)."""
    if type(output) is not Tensor or not output.is_cpu or torch.compiler.is_compiling() or output.is_complex():
        return None
    if cached is not None and cached.key == _key(output, axis) and cached.thread == threading.get_ident():
        return cached
    if output.numel() // output.shape[0] > _MAX_SAMPLE_NUMEL or output.shape[0] >= _FLOAT32_EXACT:
        return None  # plain operations, with temporaries (a float32 count per entry of a sample would reach 2**24)
    if not _dense_samples(output):
        return None
    return _Workspace(output, axis)


class _Targets:
    """The ``out=`` targets of :meth:`_Pending.add`, per kept output and chunk: views of the pending buffers, made once
    (a view made in the hot path costs as much as a small reduction). Left out of copies and pickles, which would
    hold each view as a tensor of its own; :meth:`_Pending.add` makes them again."""

    __slots__ = ("counts", "rows")

    def __init__(self, pending: _Pending) -> None:
        chunks = len(pending.sizes)
        self.rows = [list(row.split(pending.step)) for row in pending.rows]
        # per unit: the rows of one output's chunks (one kept output after another)
        self.counts = [] if pending.positions else [list(kept) for kept in pending.counts.unflatten(0, (-1, chunks))]

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None

    def __reduce__(self) -> tuple[Any, ...]:
        return (_nothing, ())


class _Pending:
    """Partial counts of CPU outputs not yet added to a metric's states (see the module's docstring).

    ``counts`` holds float32 sums of 0/1 values: per entry of a sample (``positions``, added to by every output), or
    per unit for each chunk of the last ``counted`` outputs (one row per chunk); ``rows`` the per-sample sums of the
    last ``filled`` outputs; ``samples`` and ``entries`` are host integers. :meth:`fold` turns them into what the
    states add and empties them. Plain attributes only: copies and pickles of a metric carry what it has not folded
    yet.
    """

    def __init__(self, ws: _Workspace) -> None:
        self.positions = ws.positions
        self.step, self.sizes = ws.step, ws.sizes
        self.kept = max(1, min(_ROWS_KEPT, _MAX_CHUNK_TARGETS // len(ws.sizes)))  # outputs kept before a fold
        with torch.inference_mode(False):
            if ws.positions:
                self.counts = torch.zeros(ws.per_sample, dtype=torch.float32)
            else:
                self.counts = torch.empty(self.kept * len(ws.sizes), ws.units, dtype=torch.float32)
            self.rows = torch.empty(self.kept, ws.samples, dtype=ws.row_dtype)
        self.tags = [NO_STEP] * self.kept  # the batch of each output whose per-sample sums are kept (a host integer)
        self.targets: _Targets | None = None
        self.sample_shape, self.sample_strides, self.unit_in_sample = (
            ws.sample_shape,
            ws.sample_strides,
            ws.unit_in_sample,
        )
        self.units = ws.units
        self.floating = ws.floating
        self.load = 0  # the largest value a float32 count per entry of a sample can hold now
        self.step_load = ws.samples  # what one output adds to it at most
        self.counted = 0  # outputs whose per-unit counts are in `counts` (per unit)
        self.filled = 0  # outputs whose per-sample sums are in `rows`
        self.samples = 0
        self.entries = 0

    def fits(self, ws: _Workspace) -> bool:
        """Whether ``ws``'s outputs can be added to these partial counts."""
        return (
            self.positions == ws.positions
            and self.rows.shape[1] == ws.samples
            and self.rows.dtype == ws.row_dtype
            and self.sizes == ws.sizes
            and (self.units, self.sample_shape, self.sample_strides, self.unit_in_sample)
            == (ws.units, ws.sample_shape, ws.sample_strides, ws.unit_in_sample)
        )

    @property
    def empty(self) -> bool:
        return self.load == 0 and self.counted == 0 and self.filled == 0 and self.samples == 0

    def full(self) -> bool:
        """Whether one more output could overflow what is kept (the float32 counts' exact range, or the kept rows)."""
        if self.filled == self.kept:
            return True
        if self.positions:
            return self.load + self.step_load >= _FLOAT32_EXACT
        return self.counted == self.kept

    def add(self, output: Tensor, ws: _Workspace, tag: int = NO_STEP) -> None:
        """Add one output (prepared, matching ``ws``): per chunk of samples, a comparison into the mask buffer, the
        mask's sums added to (per entry of a sample) or written into (per unit) ``counts``, and the chunk's per-sample
        sums written into ``rows``. ``tag`` names the output's batch (a training step): :meth:`fold_rows` tells the
        first tag among the non-finite outputs."""
        targets = self.targets
        if targets is None:
            targets = self.targets = _Targets(self)
        rows = targets.rows[self.filled]
        zero, dims = ws.zero, ws.sample_dims
        if self.positions:
            counts, row_ones = self.counts, ws.row_ones
            if len(ws.sizes) == 1:
                torch.gt(output, zero, out=ws.masks[0])
                counts.addmv_(ws.masks_t[0], ws.ones[0])
                if row_ones is None:
                    torch.sum(output, dims, out=rows[0])
                else:
                    torch.mv(output, row_ones, out=rows[0])
            else:
                for chunk, mask, mask_t, ones, chunk_rows in zip(
                    output.split(self.step), ws.masks, ws.masks_t, ws.ones, rows, strict=True
                ):
                    torch.gt(chunk, zero, out=mask)
                    counts.addmv_(mask_t, ones)
                    if row_ones is None:
                        torch.sum(chunk, dims, out=chunk_rows)
                    else:
                        torch.mv(chunk, row_ones, out=chunk_rows)
            self.load += self.step_load
        else:
            part_dims, parts = ws.part_dims, targets.counts[self.counted]
            if len(ws.sizes) == 1:
                mask = ws.masks[0]
                torch.gt(output, zero, out=mask)
                torch.sum(mask, part_dims, out=parts[0])
                torch.sum(output, dims, out=rows[0])
            else:
                for chunk, mask, part, chunk_rows in zip(output.split(self.step), ws.masks, parts, rows, strict=True):
                    torch.gt(chunk, zero, out=mask)
                    torch.sum(mask, part_dims, out=part)
                    torch.sum(chunk, dims, out=chunk_rows)
            self.counted += 1
        self.tags[self.filled] = tag
        self.filled += 1
        self.samples += ws.samples
        self.entries += ws.entries

    def fold_counts(self) -> Tensor | None:
        """The active entries per unit added since they were last folded (int64), or None when there are none; the
        float32 counts are free again."""
        counts = self.counts
        if self.positions:
            if self.load == 0:
                return None
            per_entry = counts.as_strided(self.sample_shape, self.sample_strides)
            dims = tuple(d for d in range(len(self.sample_shape)) if d != self.unit_in_sample)
            # in float64: a unit's count sums its positions' counts and may pass 2**24
            per_unit = per_entry.sum(dims, dtype=torch.float64) if dims else per_entry.to(torch.float64)
            counts.zero_()
            self.load = 0
        else:
            if self.counted == 0:
                return None
            # one row per chunk of each output (each below 2**24), summed in float64
            per_unit = counts[: self.counted * len(self.sizes)].sum(0, dtype=torch.float64)
            self.counted = 0
        return per_unit.to(torch.int64)

    def fold_rows(self) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """Killed samples and non-finite outputs (0-d int64) among the outputs whose per-sample sums are kept, and the
        smallest tag (:meth:`add`) of a non-finite one (0-d int64, ``2**62`` when none is; None when no output was
        tagged), or None when none are kept; ``rows`` is free again."""
        filled = self.filled
        if filled == 0:
            return None
        rows = self.rows[:filled]
        killed = rows.eq(0).sum()
        first = None
        if self.floating:  # NaN and Inf reach the largest sum, which is then not <= the largest finite value
            largest = torch.finfo(rows.dtype).max
            flags = rows.amax(1).le(largest).logical_not()
            nonfinite = flags.sum()
            tags = self.tags[:filled]
            if min(tags) != NO_STEP:
                first = torch.where(flags, torch.tensor(tags, dtype=torch.int64), NO_STEP).amin()
        else:
            nonfinite = torch.zeros((), dtype=torch.int64)
        self.filled = 0
        return killed, nonfinite, first

    def fold_totals(self) -> tuple[int, int]:
        """Samples and entries per unit added since they were last folded (host integers), zero again."""
        totals = self.samples, self.entries
        self.samples = self.entries = 0
        return totals

    def fold(self) -> tuple[Tensor, Tensor, Tensor, int, int]:
        """``(active, killed, nonfinite, samples, entries)`` over everything added since the last fold, and empty
        again (every part must hold something)."""
        active, rows = self.fold_counts(), self.fold_rows()
        assert active is not None and rows is not None
        return active, *rows[:2], *self.fold_totals()


def _count_plain(output: Tensor, axis: int) -> tuple[Tensor, Tensor, Tensor]:
    """Active entries per unit (int64), killed samples and whether the output is non-finite (0-d int64) with plain
    ATen operations (GPU tensors, tensor subclasses, layouts without dense samples, code that ``torch.compile``
    traces: there the compiler fuses them into one pass)."""
    others = tuple(d for d in range(1, output.ndim) if d != axis)
    sample_dims = tuple(range(1, output.ndim))
    if output.device.type == "cpu":
        # a float reduction of the comparison: bool -> int64 sums are several times slower on the CPU
        numel = output.numel() // output.shape[axis]
        dtype = torch.float32 if numel < _FLOAT32_EXACT else torch.float64
        per_unit = output.gt(0).to(dtype).sum((0, *others)).to(torch.int64)
    else:
        per_unit = output.gt(0).sum((0, *others), dtype=torch.int64)
    rows = output.sum(sample_dims, dtype=_row_dtype(output.dtype))
    killed = rows.eq(0).sum()
    if rows.is_floating_point():
        nonfinite = rows.amax().le(torch.finfo(rows.dtype).max).logical_not().to(torch.int64)
    else:
        nonfinite = torch.zeros((), dtype=torch.int64, device=rows.device)
    return per_unit, killed, nonfinite


def _prepare(output: Tensor) -> Tensor:
    """``output`` without autograd history (detached only where autograd would record: a ``detach`` inside a training
    step costs as much as a small reduction), with one unit per sample for a 1-D output."""
    if output.requires_grad and torch.is_grad_enabled():
        output = output.detach()
    return output.unsqueeze(1) if output.ndim == 1 else output


def _activation_stats_update(
    output: Tensor, unit_dim: int | None = None, workspace: _Workspace | None = None
) -> tuple[Tensor, Tensor, Tensor, int, int, _Workspace | None]:
    """What one rectifier output adds to the counts.

    Args:
        output: the rectifier's output, ``(batch, ...)`` (a 1-D output is one unit per sample); not empty.
        unit_dim: the dimension that indexes units of a 3-D or larger output (``1`` or ``-1``; ``None``: ``1``).
        workspace: the workspace of an earlier call, reused when it fits.

    Returns:
        ``(active, killed, nonfinite, samples, entries, workspace)``: active entries per unit (int64), killed
        samples and whether the output is non-finite (0-d int64, 0 or 1), the number of samples and of entries per
        unit, and the workspace that counted (None when plain operations did).
    """
    output = _prepare(output)
    axis = unit_axis(output, unit_dim)
    ws = _workspace(output, axis, workspace)
    tracing = torch.compiler.is_compiling()
    if not tracing:
        _THREAD.counting = True
    try:
        if ws is not None:
            pending = _Pending(ws)
            pending.add(output, ws)
            active, killed, nonfinite, samples, entries = pending.fold()
        else:
            active, killed, nonfinite = _count_plain(output, axis)
            samples, entries = output.shape[0], output.numel() // output.shape[axis]
    finally:
        if not tracing:
            _THREAD.counting = False
    return active, killed, nonfinite, samples, entries, ws


def _margin_update(pre_activation: Tensor, unit_dim: int | None = None) -> tuple[Tensor, Tensor, int]:
    """Per-unit sums of one pre-activation and of its square (float64), and the entries per unit they cover.

    Two read-only float reductions: a sum, and a 2-norm that gives the sum of squares without a squared copy.
    """
    tracing = torch.compiler.is_compiling()
    if not tracing:
        _THREAD.counting = True
    try:
        pre = _prepare(pre_activation)
        axis = unit_axis(pre, unit_dim)
        dims = tuple(d for d in range(pre.ndim) if d != axis)
        acc = torch.float64 if pre.dtype == torch.float64 else torch.float32  # half types are summed in float32
        total = pre.sum(dims, dtype=acc).to(torch.float64)
        squares = torch.linalg.vector_norm(pre, 2, dims, dtype=acc).to(torch.float64).square()
    finally:
        if not tracing:
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
    if prepared.numel() == 0:  # no sample, or samples without entries: nothing counted
        units = prepared.shape[unit_axis(prepared, unit_dim)]
        return _activation_stats_compute(torch.zeros(units, dtype=torch.int64), 0, 0, 0, name=name, eps=eps)
    active, killed, nonfinite, samples, entries, _ = _activation_stats_update(prepared, unit_dim)
    return _activation_stats_compute(active, entries, samples, killed, nonfinite, name=name, eps=eps)
