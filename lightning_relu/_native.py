"""A fused counting kernel for CPU outputs, compiled from C when the process first counts.

Counting needs two reductions of a rectifier output: the entries ``> 0`` per unit and the output summed per
sample. With ATen operations that is three passes over the output (``sign``, a per-unit ``nansum`` and a
per-sample ``sum``) and a temporary as large as the output. The kernel below does both in one pass, without a
temporary, and is several times cheaper inside a training step (see the README's Performance section). The hooks
use :meth:`_Kernel.bind`: the call that adds an output's counts, killed samples and non-finite flag straight into a
site's states (nothing allocated, nothing left to fold), which a site keeps and reruns for the next output of the
same shape, strides and dtype; :meth:`_Kernel.accumulate` binds and runs it once, and :meth:`_Kernel.count` hands
the two reductions back. The same library sums the margin's statistics (each unit's pre-activation entries and their
squares, :meth:`_Kernel.moments`) and answers :func:`~lightning_relu.init.sign_flip_`'s question on CPU, which
samples a site kills (:meth:`_Kernel.dead_rows`), reading each sample only up to its first living entries.

It is compiled once per process with the C compiler on the machine (``$CC``, else ``cc``), for the CPU it runs on
(``-march=native``; nothing is cached on disk, so a shared home directory across different machines cannot hand a
process a library built for another CPU), and loaded with :class:`ctypes.PyDLL` (calls keep the GIL). It uses
OpenMP only when the OpenMP runtime PyTorch itself uses (``libgomp``) is already loaded and the compiler is GCC
(whose ``-fopenmp`` links that runtime), so that both share one thread pool; otherwise it runs on the calling
thread. Where no compiler is found or the build fails, counting uses the ATen operations: the counts are the same
either way (the test suite runs both).

``LIGHTNING_RELU_KERNEL`` chooses: ``auto`` (default: the kernel where it builds, else ATen), ``off`` (always ATen)
or ``require`` (raise when the kernel cannot be built).
"""

from __future__ import annotations

import ctypes
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from typing import Any

import torch
from torch import Tensor

__all__ = ["counting_kernel", "describe"]

ENV = "LIGHTNING_RELU_KERNEL"
_CHOICES = ("auto", "off", "require")
# outputs smaller than this many entries are counted on the calling thread (waking others costs more)
_PARALLEL_MIN = 1 << 16

# Two layouts cover every contiguous output: units last (batch, positions, units), e.g. Linear outputs,
# sequences and channels-last images, and units first (batch, units, positions), e.g. NCHW images. Each entry
# adds 1 to its unit's count when it is > 0 (NaN is not) and is added to its sample's sum (NaN and Inf
# propagate there, which is how non-finite batches are seen). Both read four rows (units last) or four samples
# (units first) at a time: one load and store of the counts per four entries, and four independent sums, so that
# the loop is not bound by the latency of one running sum. Counts are int32 per thread and per row block, int64
# per unit, added to double counts: exact far beyond any batch.
_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifndef LR_FOLD_EVERY
#define LR_FOLD_EVERY 0x40000000 /* entries counted in int32 before they are added to an int64 total */
#endif
#ifdef _OPENMP
#include <omp.h>
#define LR_THREAD() omp_get_thread_num()
#define LR_TEAM() omp_get_num_threads()
#else
#define LR_THREAD() 0
#define LR_TEAM() 1
#endif

/* threads for one call: the caller's count (PyTorch's), 1 for small outputs or without OpenMP, never more than
   the rows the work is split over */
static int lr_team(int wanted, int64_t entries, int64_t rows) {
#ifndef _OPENMP
    wanted = 1;
#endif
    if (entries < LR_PARALLEL_MIN || wanted < 1) wanted = 1;
    if (wanted > rows) wanted = (int)rows;
    return wanted < 1 ? 1 : wanted;
}

/* scratch of the calling thread (0: int32 counts per thread, 1: per-sample doubles per thread, 2: per-sample sums,
   3: int64 counts per unit, 4: per-unit sums and sums of squares per thread), grown when needed and kept: once
   warm, a call allocates nothing */
static __thread void *lr_scratch[5] = {NULL, NULL, NULL, NULL, NULL};
static __thread size_t lr_scratch_bytes[5] = {0, 0, 0, 0, 0};

static void *lr_buffer(int which, size_t bytes) {
    if (lr_scratch_bytes[which] < bytes) {
        free(lr_scratch[which]);
        lr_scratch[which] = malloc(bytes);
        lr_scratch_bytes[which] = lr_scratch[which] ? bytes : 0;
    }
    return lr_scratch[which];
}

/* Every function adds each unit's active entries to counts[u] (doubles holding integers) and takes the sum per
   sample: written to sums (batch,) when sums is not NULL, else into the calling thread's scratch; when killed is
   not NULL, the samples whose sum is 0 (the whole output is 0) are added to *killed, and 1 to *nonfinite when a
   sum is NaN or Inf. `wanted` is the caller's thread count. Returns 0, or -1 when out of memory (nothing was
   added then). */
#define LR_ARGUMENTS(T) double *counts, T *sums, int64_t *killed, int64_t *nonfinite, int wanted
#define LR_SUMS(T) if (!sums) sums = (T *)lr_buffer(2, (size_t)batch * sizeof(T));
#define LR_FINISH(T)                                                                                         \
    if (killed) {                                                                                            \
        int64_t zero = 0, bad = 0;                                                                           \
        for (int64_t b = 0; b < batch; b++) {                                                                \
            zero += sums[b] == 0;                                                                            \
            bad |= !isfinite(sums[b]);                                                                       \
        }                                                                                                    \
        *killed += zero;                                                                                     \
        *nonfinite += bad;                                                                                   \
    }                                                                                                        \
    return 0;

/* x: (batch, positions, units): rows of `units` entries, `positions` rows per sample. See LR_ARGUMENTS. */
#define LR_UNITS_LAST(NAME, T)                                                                                   \
int NAME(const T *x, int64_t batch, int64_t positions, int64_t units, LR_ARGUMENTS(T)) {                         \
    int threads = lr_team(wanted, batch * positions * units, batch);                                             \
    LR_SUMS(T)                                                                                                   \
    /* per thread: int32 counts of its rows; per unit: the int64 totals they fold into; per sample: its sum */   \
    int32_t *scratch = (int32_t *)lr_buffer(0, (size_t)threads * (size_t)units * sizeof(int32_t));               \
    double *sample = (double *)lr_buffer(1, (size_t)batch * sizeof(double));                                     \
    int64_t *totals = (int64_t *)lr_buffer(3, (size_t)units * sizeof(int64_t));                                  \
    if (!scratch || !sample || !totals || !sums) return -1;                                                      \
    for (int64_t i = 0; i < (int64_t)threads * units; i++) scratch[i] = 0;                                       \
    for (int64_t u = 0; u < units; u++) totals[u] = 0;                                                           \
    for (int64_t b = 0; b < batch; b++) sample[b] = 0;                                                           \
    _Pragma("omp parallel num_threads(threads) if(threads > 1)")                                                 \
    {                                                                                                            \
        /* each thread takes a range of samples and reads its rows four at a time: one load and store of its    \
           counts per four entries, and four independent sums */                                                 \
        int64_t team = LR_TEAM(), me = LR_THREAD();                                                              \
        int32_t *mine = scratch + me * units;                                                                    \
        int64_t row = batch * me / team * positions, end = batch * (me + 1) / team * positions, since = 0;       \
        while (row < end) {                                                                                      \
            const T *a = x + row * units;                                                                        \
            if (end - row >= 4 && since + 4 <= LR_FOLD_EVERY) {                                                  \
                const T *b = a + units, *c = b + units, *d = c + units;                                          \
                T sa = 0, sb = 0, sc = 0, sd = 0;                                                                \
                _Pragma("omp simd reduction(+:sa,sb,sc,sd)")                                                     \
                for (int64_t u = 0; u < units; u++) {                                                            \
                    mine[u] += (a[u] > 0) + (b[u] > 0) + (c[u] > 0) + (d[u] > 0);                                \
                    sa += a[u];                                                                                  \
                    sb += b[u];                                                                                  \
                    sc += c[u];                                                                                  \
                    sd += d[u];                                                                                  \
                }                                                                                                \
                sample[row / positions] += sa;                                                                   \
                sample[(row + 1) / positions] += sb;                                                             \
                sample[(row + 2) / positions] += sc;                                                             \
                sample[(row + 3) / positions] += sd;                                                             \
                row += 4;                                                                                        \
                since += 4;                                                                                      \
            } else {                                                                                             \
                T sa = 0;                                                                                        \
                _Pragma("omp simd reduction(+:sa)")                                                              \
                for (int64_t u = 0; u < units; u++) {                                                            \
                    mine[u] += a[u] > 0;                                                                         \
                    sa += a[u];                                                                                  \
                }                                                                                                \
                sample[row / positions] += sa;                                                                   \
                row += 1;                                                                                        \
                since += 1;                                                                                      \
            }                                                                                                    \
            if (since == LR_FOLD_EVERY) { /* int32 counts: folded long before they could overflow */             \
                _Pragma("omp critical(lr_totals)")                                                               \
                for (int64_t u = 0; u < units; u++) totals[u] += mine[u];                                        \
                for (int64_t u = 0; u < units; u++) mine[u] = 0;                                                 \
                since = 0;                                                                                       \
            }                                                                                                    \
        }                                                                                                        \
    }                                                                                                            \
    for (int64_t u = 0; u < units; u++) {                                                                        \
        int64_t total = totals[u];                                                                               \
        for (int t = 0; t < threads; t++) total += scratch[(int64_t)t * units + u];                              \
        counts[u] += (double)total;                                                                              \
    }                                                                                                            \
    for (int64_t b = 0; b < batch; b++) sums[b] = (T)sample[b];                                                  \
    LR_FINISH(T)                                                                                                 \
}

/* x: (batch, units, positions). See LR_ARGUMENTS. */
#define LR_UNITS_FIRST(NAME, T)                                                                              \
int NAME(const T *x, int64_t batch, int64_t units, int64_t positions, LR_ARGUMENTS(T)) {                     \
    int threads = lr_team(wanted, batch * positions * units, units);                                         \
    LR_SUMS(T)                                                                                               \
    /* per thread: the sum per sample of the units it counts; per unit: its count */                         \
    double *partial = (double *)lr_buffer(1, (size_t)threads * (size_t)batch * sizeof(double));              \
    int64_t *totals = (int64_t *)lr_buffer(3, (size_t)units * sizeof(int64_t));                              \
    if (!partial || !totals || !sums) return -1;                                                             \
    /* zeroed here: OpenMP may run fewer threads than asked, and their slices must still read as 0 */        \
    for (int64_t i = 0; i < (int64_t)threads * batch; i++) partial[i] = 0;                                   \
    for (int64_t u = 0; u < units; u++) totals[u] = 0;                                                       \
    _Pragma("omp parallel num_threads(threads) if(threads > 1)")                                             \
    {                                                                                                        \
        /* each thread takes a range of units and reads it four samples at a time (one contiguous stretch    \
           per sample, which the hardware prefetcher follows): four independent sums, one count per unit */  \
        int64_t team = LR_TEAM(), me = LR_THREAD();                                                          \
        int64_t first = units * me / team, last = units * (me + 1) / team, stride = units * positions;        \
        double *mine = partial + me * batch;                                                                 \
        for (int64_t b = 0; b < batch;) {                                                                    \
            int four = batch - b >= 4 && LR_FOLD_EVERY >= 4;                                                 \
            int64_t chunk = four ? LR_FOLD_EVERY / 4 : LR_FOLD_EVERY; /* positions per int32 count */         \
            double s0 = 0, s1 = 0, s2 = 0, s3 = 0; /* per sample, in double */                               \
            for (int64_t u = first; u < last; u++) {                                                         \
                const T *x0 = x + (b * units + u) * positions;                                               \
                const T *x1 = four ? x0 + stride : x0, *x2 = four ? x1 + stride : x0;                        \
                const T *x3 = four ? x2 + stride : x0;                                                       \
                T a0 = 0, a1 = 0, a2 = 0, a3 = 0; /* one unit's block per sample, in T */                    \
                for (int64_t done = 0; done < positions;) {                                                  \
                    int64_t end = positions - done > chunk ? done + chunk : positions;                       \
                    int32_t active = 0;                                                                      \
                    if (four) {                                                                              \
                        _Pragma("omp simd reduction(+:active,a0,a1,a2,a3)")                                  \
                        for (int64_t p = done; p < end; p++) {                                               \
                            active += (x0[p] > 0) + (x1[p] > 0) + (x2[p] > 0) + (x3[p] > 0);                 \
                            a0 += x0[p];                                                                     \
                            a1 += x1[p];                                                                     \
                            a2 += x2[p];                                                                     \
                            a3 += x3[p];                                                                     \
                        }                                                                                    \
                    } else {                                                                                 \
                        _Pragma("omp simd reduction(+:active,a0)")                                           \
                        for (int64_t p = done; p < end; p++) {                                               \
                            active += x0[p] > 0;                                                             \
                            a0 += x0[p];                                                                     \
                        }                                                                                    \
                    }                                                                                        \
                    totals[u] += active;                                                                     \
                    done = end;                                                                              \
                }                                                                                            \
                s0 += a0;                                                                                    \
                s1 += a1;                                                                                    \
                s2 += a2;                                                                                    \
                s3 += a3;                                                                                    \
            }                                                                                                \
            mine[b] += s0;                                                                                   \
            if (four) {                                                                                      \
                mine[b + 1] += s1;                                                                           \
                mine[b + 2] += s2;                                                                           \
                mine[b + 3] += s3;                                                                           \
            }                                                                                                \
            b += four ? 4 : 1;                                                                               \
        }                                                                                                    \
    }                                                                                                        \
    for (int64_t u = 0; u < units; u++) counts[u] += (double)totals[u];                                      \
    for (int64_t b = 0; b < batch; b++) {                                                                    \
        double sum = 0;                                                                                      \
        for (int t = 0; t < threads; t++) sum += partial[(int64_t)t * batch + b];                            \
        sums[b] = (T)sum;                                                                                    \
    }                                                                                                        \
    LR_FINISH(T)                                                                                             \
}

/* sign_flip_'s question of a pre-activation x (batch rows, one per sample, of `length` entries each, contiguous;
   row b starts at x + b * stride): is the rectifier's output of the row all zero, that is, is no entry > 0
   (flipped: no entry < 0)? A NaN entry is neither <= 0 nor >= 0: it keeps its row alive, as its output is not 0.
   Writes dead[b] (1: all zero, 0: not), reads each row only up to its first block of 16 entries that lives,
   returns how many rows are dead and writes to *killed how many of them have alive[b] != 0 (alive NULL: all). */
#define LR_DEAD_ROWS(NAME, T)                                                                                \
int64_t NAME(const T *x, int64_t batch, int64_t length, int64_t stride, int flipped, const uint8_t *alive,    \
             uint8_t *dead, int64_t *killed, int wanted) {                                                   \
    int threads = lr_team(wanted, batch * length, batch);                                                    \
    int64_t total = 0, among = 0;                                                                            \
    _Pragma("omp parallel for num_threads(threads) if(threads > 1) schedule(static) reduction(+:total,among)") \
    for (int64_t b = 0; b < batch; b++) {                                                                    \
        const T *row = x + b * stride;                                                                       \
        int lives = 0;                                                                                       \
        int64_t i = 0;                                                                                       \
        if (flipped) {                                                                                       \
            for (; i + 16 <= length && !lives; i += 16) {                                                    \
                _Pragma("omp simd reduction(|:lives)")                                                       \
                for (int j = 0; j < 16; j++) lives |= !(row[i + j] >= 0);                                    \
            }                                                                                                \
            for (; i < length && !lives; i++) lives = !(row[i] >= 0);                                       \
        } else {                                                                                             \
            for (; i + 16 <= length && !lives; i += 16) {                                                    \
                _Pragma("omp simd reduction(|:lives)")                                                       \
                for (int j = 0; j < 16; j++) lives |= !(row[i + j] <= 0);                                    \
            }                                                                                                \
            for (; i < length && !lives; i++) lives = !(row[i] <= 0);                                       \
        }                                                                                                    \
        dead[b] = !lives;                                                                                    \
        total += !lives;                                                                                     \
        among += !lives && (!alive || alive[b]);                                                             \
    }                                                                                                        \
    *killed = among;                                                                                         \
    return total;                                                                                            \
}

/* The margin's statistics of a pre-activation, in one pass: each unit's entries summed and their squares summed, in
   double, added to sum[u] and sumsq[u], and the entries per unit added to *entries. Returns 0, or -1 when out of
   memory (nothing added then). Units last: each thread sums a range of rows into its own per-unit scratch. */
#define LR_MOMENTS_LAST(NAME, T)                                                                             \
int NAME(const T *x, int64_t batch, int64_t positions, int64_t units, double *sum, double *sumsq,            \
         int64_t *entries, int wanted) {                                                                     \
    int64_t rows = batch * positions;                                                                        \
    int threads = lr_team(wanted, rows * units, rows);                                                       \
    double *scratch = (double *)lr_buffer(4, (size_t)threads * 2 * (size_t)units * sizeof(double));          \
    if (!scratch) return -1;                                                                                 \
    for (int64_t i = 0; i < (int64_t)threads * 2 * units; i++) scratch[i] = 0;                               \
    _Pragma("omp parallel num_threads(threads) if(threads > 1)")                                             \
    {                                                                                                        \
        int64_t team = LR_TEAM(), me = LR_THREAD();                                                          \
        double *s = scratch + me * 2 * units, *q = s + units;                                                \
        int64_t r = rows * me / team, end = rows * (me + 1) / team;                                          \
        for (; r + 4 <= end; r += 4) { /* four rows: one load and store of the scratch per four entries */  \
            const T *a = x + r * units, *b = a + units, *c = b + units, *d = c + units;                      \
            _Pragma("omp simd")                                                                              \
            for (int64_t u = 0; u < units; u++) {                                                            \
                double va = a[u], vb = b[u], vc = c[u], vd = d[u];                                           \
                s[u] += (va + vb) + (vc + vd);                                                               \
                q[u] += (va * va + vb * vb) + (vc * vc + vd * vd);                                           \
            }                                                                                                \
        }                                                                                                    \
        for (; r < end; r++) {                                                                               \
            const T *a = x + r * units;                                                                      \
            _Pragma("omp simd")                                                                              \
            for (int64_t u = 0; u < units; u++) {                                                            \
                double v = a[u];                                                                             \
                s[u] += v;                                                                                   \
                q[u] += v * v;                                                                               \
            }                                                                                                \
        }                                                                                                    \
    }                                                                                                        \
    for (int t = 0; t < threads; t++) {                                                                      \
        const double *s = scratch + (int64_t)t * 2 * units, *q = s + units;                                  \
        for (int64_t u = 0; u < units; u++) {                                                                \
            sum[u] += s[u];                                                                                  \
            sumsq[u] += q[u];                                                                                \
        }                                                                                                    \
    }                                                                                                        \
    *entries += rows;                                                                                        \
    return 0;                                                                                                \
}

/* Units first: each thread takes a range of units and sums each one's stretch of every sample. */
#define LR_MOMENTS_FIRST(NAME, T)                                                                            \
int NAME(const T *x, int64_t batch, int64_t units, int64_t positions, double *sum, double *sumsq,            \
         int64_t *entries, int wanted) {                                                                     \
    int threads = lr_team(wanted, batch * units * positions, units);                                         \
    _Pragma("omp parallel num_threads(threads) if(threads > 1)")                                             \
    {                                                                                                        \
        int64_t team = LR_TEAM(), me = LR_THREAD();                                                          \
        for (int64_t u = units * me / team; u < units * (me + 1) / team; u++) {                              \
            double s = 0, q = 0;                                                                             \
            for (int64_t b = 0; b < batch; b++) {                                                            \
                const T *a = x + (b * units + u) * positions;                                                \
                _Pragma("omp simd reduction(+:s,q)")                                                         \
                for (int64_t p = 0; p < positions; p++) {                                                    \
                    double v = a[p];                                                                         \
                    s += v;                                                                                  \
                    q += v * v;                                                                              \
                }                                                                                            \
            }                                                                                                \
            sum[u] += s;                                                                                     \
            sumsq[u] += q;                                                                                   \
        }                                                                                                    \
    }                                                                                                        \
    *entries += batch * positions;                                                                           \
    return 0;                                                                                                \
}

LR_UNITS_LAST(lr_units_last_f32, float)
LR_UNITS_LAST(lr_units_last_f64, double)
LR_UNITS_FIRST(lr_units_first_f32, float)
LR_UNITS_FIRST(lr_units_first_f64, double)
LR_DEAD_ROWS(lr_dead_rows_f32, float)
LR_DEAD_ROWS(lr_dead_rows_f64, double)
LR_MOMENTS_LAST(lr_moments_units_last_f32, float)
LR_MOMENTS_LAST(lr_moments_units_last_f64, double)
LR_MOMENTS_FIRST(lr_moments_units_first_f32, float)
LR_MOMENTS_FIRST(lr_moments_units_first_f64, double)
"""

_lock = threading.Lock()
_state: dict[str, Any] = {}


class _Kernel:
    """The loaded library: :meth:`count`, :meth:`bind` and :meth:`accumulate` (None / False where the output's
    layout is not one the kernel handles: the caller uses ATen then)."""

    def __init__(self, library: ctypes.CDLL, description: str) -> None:
        self.library = library  # keeps the library loaded
        self.description = description
        int64, pointer = ctypes.c_int64, ctypes.c_void_p
        args = [pointer, int64, int64, int64, pointer, pointer, pointer, pointer, ctypes.c_int]
        self.functions = {}
        for layout in ("units_last", "units_first"):
            for dtype, suffix in ((torch.float32, "f32"), (torch.float64, "f64")):
                function = getattr(library, f"lr_{layout}_{suffix}")
                function.argtypes = args
                function.restype = ctypes.c_int
                self.functions[layout, dtype] = function
        self.moment_functions = {}
        for layout in ("units_last", "units_first"):
            for dtype, suffix in ((torch.float32, "f32"), (torch.float64, "f64")):
                function = getattr(library, f"lr_moments_{layout}_{suffix}")
                function.argtypes = [pointer, int64, int64, int64, pointer, pointer, pointer, ctypes.c_int]
                function.restype = ctypes.c_int
                self.moment_functions[layout, dtype] = function
        self.dead_rows_functions = {}
        for dtype, suffix in ((torch.float32, "f32"), (torch.float64, "f64")):
            function = getattr(library, f"lr_dead_rows_{suffix}")
            function.argtypes = [pointer, int64, int64, int64, ctypes.c_int, pointer, pointer, pointer, ctypes.c_int]
            function.restype = ctypes.c_int64
            self.dead_rows_functions[dtype] = function

    def _plan(self, output: Tensor, axis: int) -> tuple[Any, int, int, int, int] | None:
        """(counting function, output address, the three sizes of its layout) for a CPU float32/64 output whose
        memory is one of the two layouts; None for anything else."""
        layout = self._layout(output, axis)
        if layout is None:
            return None
        name, *rest = layout
        return self.functions[name, output.dtype], *rest

    @staticmethod
    def _layout(output: Tensor, axis: int) -> tuple[str, int, int, int, int] | None:
        """(layout, output address, the three sizes of the layout) for a CPU float32/64 tensor whose memory is one of
        the two layouts, with units along ``axis``; None for anything else."""
        dtype = output.dtype
        if (
            dtype not in (torch.float32, torch.float64)
            or output.device.type != "cpu"
            or output.layout != torch.strided
            or output.is_neg()
        ):
            return None
        ndim = output.ndim
        batch, units = output.shape[0], output.shape[axis]
        positions = output.numel() // (batch * units) if batch and units else 0
        if not positions:
            return None
        if (axis == ndim - 1 or positions == 1) and output.is_contiguous():
            layout, first, second = "units_last", positions, units
        elif axis == 1 and output.is_contiguous():
            layout, first, second = "units_first", units, positions
        elif axis == 1 and (
            (ndim == 4 and output.is_contiguous(memory_format=torch.channels_last))
            or (ndim == 5 and output.is_contiguous(memory_format=torch.channels_last_3d))
        ):
            layout, first, second = "units_last", positions, units
        else:
            return None
        try:
            address = output.data_ptr()  # tensors without storage (functorch wrappers) raise here
        except RuntimeError:
            return None
        return layout, address, batch, first, second

    def count(self, output: Tensor, axis: int) -> tuple[Tensor, Tensor] | None:
        """Active entries per unit (float64) and the sum per sample (the output's dtype) of ``output``; None where
        the kernel does not take it."""
        plan = self._plan(output, axis)
        if plan is None:
            return None
        function, address, *sizes = plan
        counts = torch.zeros(output.shape[axis], dtype=torch.float64)
        sums = torch.empty(output.shape[0], dtype=output.dtype)
        if function(address, *sizes, counts.data_ptr(), sums.data_ptr(), None, None, torch.get_num_threads()) != 0:
            return None  # its scratch memory could not be allocated: the ATen operations count instead
        return counts, sums

    def bind(
        self, output: Tensor, axis: int, active: Tensor, killed: Tensor, nonfinite: Tensor
    ) -> tuple[Any, tuple[Any, ...]] | None:
        """The call that adds an output like ``output`` (same shape, strides and dtype, on the CPU) into these states
        (see :meth:`accumulate`): ``(function, arguments)``, run as ``function(output.data_ptr(), *arguments,
        threads)``, which returns 0 once it has added, else nothing was added. None where the kernel does not take
        the output or the states. The hooks keep it and check only that the next output is alike."""
        plan = self._plan(output, axis)
        if (
            plan is None
            or not _per_unit_state(active, output.shape[axis])
            or not _scalar_state(killed)
            or not _scalar_state(nonfinite)
        ):
            return None
        function, _, *sizes = plan
        return function, (*sizes, active.data_ptr(), None, killed.data_ptr(), nonfinite.data_ptr())

    @staticmethod
    def run(bound: tuple[Any, tuple[Any, ...]], output: Tensor) -> bool:
        """Run a call from :meth:`bind` on ``output`` (which must be alike the output it was bound for); whether it
        added (False: out of scratch memory, nothing added)."""
        function, arguments = bound
        return function(output.data_ptr(), *arguments, torch.get_num_threads()) == 0

    def accumulate(self, output: Tensor, axis: int, active: Tensor, killed: Tensor, nonfinite: Tensor) -> bool:
        """Add the output's active entries per unit to ``active`` (CPU float64, one per unit), its samples whose
        whole output is 0 to ``killed``, and 1 to ``nonfinite`` when it holds NaN or Inf (CPU int64 scalars), in
        place and in one call that allocates nothing once warm. False, with nothing added, where the kernel does
        not take the output or the states."""
        bound = self.bind(output, axis, active, killed, nonfinite)
        return bound is not None and self.run(bound, output)

    def dead_rows(self, z: Tensor, flipped: bool, alive: Tensor | None, dead: Tensor) -> tuple[int, int] | None:
        """Which samples (dimension 0) of the CPU pre-activation ``z`` a rectifier kills, that is, have no entry
        > 0 (``flipped``: no entry < 0; NaN keeps a sample alive), written to ``dead``, reading each sample only up
        to its first block of entries that lives. Returns (the killed samples, how many of them ``alive`` marks;
        None: all of them); None, with nothing written, where the kernel does not take ``z`` (another dtype, a
        negated view, a sample's entries not one dense block of memory). ``dead`` and ``alive`` must be contiguous
        CPU bool tensors of one entry per sample (the caller's buffers: not checked here, on the hot path)."""
        function = self.dead_rows_functions.get(z.dtype)
        if (
            function is None
            or z.device.type != "cpu"
            or z.layout != torch.strided
            or z.is_neg()
            or z.dim() == 0
            or not z.numel()
        ):
            return None
        batch = z.shape[0]
        if z.is_contiguous():
            length = stride = z.numel() // batch
        else:  # a sample's entries in any order, as long as they fill one block (channels last, say)
            length, stride = 1, z.stride(0)
            for step, size in sorted(zip(z.stride()[1:], z.shape[1:], strict=True)):
                if size != 1:
                    if step != length:
                        return None
                    length *= size
        try:
            address = z.data_ptr()  # tensors without storage (functorch wrappers) raise here
        except RuntimeError:
            return None
        killed = ctypes.c_int64(0)
        total = function(
            address,
            batch,
            length,
            stride,
            flipped,
            None if alive is None else alive.data_ptr(),
            dead.data_ptr(),
            ctypes.byref(killed),
            torch.get_num_threads(),
        )
        return total, killed.value

    def moments(self, pre: Tensor, axis: int, total: Tensor, squares: Tensor, entries: Tensor) -> bool:
        """Add each unit's entries of the pre-activation ``pre`` (units along ``axis``), summed, to ``total``, their
        squares summed to ``squares`` (CPU float64, one per unit; sums taken in double) and the entries per unit to
        ``entries`` (a CPU int64 scalar), in one pass. False, with nothing added, where the kernel does not take
        ``pre`` or the states."""
        bound = self.bind_moments(pre, axis, total, squares, entries)
        return bound is not None and self.run(bound, pre)

    def bind_moments(
        self, pre: Tensor, axis: int, total: Tensor, squares: Tensor, entries: Tensor
    ) -> tuple[Any, tuple[Any, ...]] | None:
        """The call that adds a pre-activation like ``pre`` into these states (see :meth:`moments`), run with
        :meth:`run` like the one :meth:`bind` returns; None where the kernel does not take ``pre`` or the states."""
        if pre.dim() == 0:
            return None
        layout = self._layout(pre, axis)
        units = pre.shape[axis]
        if (
            layout is None
            or not _per_unit_state(total, units)
            or not _per_unit_state(squares, units)
            or not _scalar_state(entries)
        ):
            return None
        name, _, *sizes = layout
        return self.moment_functions[name, pre.dtype], (
            *sizes,
            total.data_ptr(),
            squares.data_ptr(),
            entries.data_ptr(),
        )


def _per_unit_state(state: Tensor, units: int) -> bool:
    """Whether the kernel may write ``state`` as one double per unit: CPU float64, contiguous, ``units`` long."""
    return (
        state.dtype == torch.float64 and state.device.type == "cpu" and state.is_contiguous() and state.numel() == units
    )


def _scalar_state(state: Tensor) -> bool:
    """Whether the kernel may add to ``state`` as one int64: a CPU int64 tensor of one element."""
    return state.dtype == torch.int64 and state.device.type == "cpu" and state.numel() == 1


def _mode() -> str:
    mode = _state.get("mode")
    if mode is None:
        mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
        if mode not in _CHOICES:
            raise ValueError(f"environment variable {ENV} must be one of {', '.join(_CHOICES)}; got {mode!r}")
        _state["mode"] = mode
    return mode


def _reset() -> None:
    """Forget the mode and the kernel: the next count reads ``LIGHTNING_RELU_KERNEL`` and builds again."""
    with _lock:
        _state.clear()


def _openmp_shared() -> bool:
    """Whether GNU OpenMP is loaded under the name ``-fopenmp`` links (``libgomp.so.1``), as PyTorch's wheels load
    it: the kernel then shares its thread pool. A copy under another name (a renamed, bundled one) would not be
    shared: a second runtime would start, so the kernel is then built without OpenMP."""
    try:
        with open("/proc/self/maps") as maps:
            return any(line.rstrip().endswith("/libgomp.so.1") for line in maps)
    except OSError:
        return False


def _is_gcc(command: list[str]) -> bool:
    try:
        done = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return "Free Software Foundation" in done.stdout and "clang" not in done.stdout.lower()


def _compiler() -> list[str]:
    """The C compiler command: ``$CC`` (which may carry arguments, e.g. ``ccache gcc``), else ``cc``."""
    return shlex.split(os.environ.get("CC") or "") or ["cc"]


def _build(compiler: list[str], defines: dict[str, int] | None = None) -> tuple[ctypes.CDLL, str]:
    """Compile and load the kernel (tries OpenMP and -march=native first, then plainer flag sets); ``defines``
    overrides the source's constants (tests)."""
    path = shutil.which(compiler[0])
    if path is None:
        raise RuntimeError(f"no C compiler {compiler[0]!r} found (set CC)")
    command_head = [path, *compiler[1:]]
    attempts = []
    if _openmp_shared() and _is_gcc(command_head):  # GCC's -fopenmp links libgomp, the runtime PyTorch runs
        attempts += [["-march=native", "-fopenmp"], ["-fopenmp"]]
    attempts += [["-march=native"], []]
    errors = []
    with tempfile.TemporaryDirectory(prefix="lightning_relu_") as folder:
        source = os.path.join(folder, "count.c")
        with open(source, "w") as handle:
            constants = {"LR_PARALLEL_MIN": _PARALLEL_MIN, **(defines or {})}
            handle.write("".join(f"#define {name} {value}\n" for name, value in constants.items()) + _SOURCE)
        for index, flags in enumerate(attempts):
            library = os.path.join(folder, f"count{index}.so")
            command = [*command_head, "-O3", "-shared", "-fPIC", *flags, "-fopenmp-simd", source, "-o", library]
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                errors.append(f"{' '.join(command)}: {done.stderr.strip()[-500:]}")
                continue
            try:  # loaded now; the file may go with the folder (the mapping stays)
                # PyDLL: calls keep the GIL, so two Python threads never add into one state at once (the kernel's
                # own threads are OpenMP's, which never touch Python)
                return ctypes.PyDLL(library), " ".join([os.path.basename(path), *compiler[1:], "-O3", *flags])
            except OSError as error:  # e.g. a temporary folder mounted noexec
                errors.append(f"loading {library}: {error}")
    raise RuntimeError("the counting kernel could not be built:\n" + "\n".join(errors))


def counting_kernel() -> _Kernel | None:
    """The fused CPU counting kernel of this process, built on first call; None when it is switched off
    (``LIGHTNING_RELU_KERNEL=off``) or cannot be built (with ``require``, that raises instead)."""
    kernel = _state.get("kernel")
    if kernel is not None:
        return kernel
    mode = _mode()
    if mode == "off":
        return None
    if "error" not in _state:
        with _lock:
            if "kernel" not in _state and "error" not in _state:
                if platform.system() != "Linux":
                    _state["error"] = f"the counting kernel is built on Linux only (this is {platform.system()})"
                else:
                    try:
                        library, flags = _build(_compiler())
                        _state["kernel"] = _Kernel(library, flags)
                    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                        _state["error"] = str(error)
        kernel = _state.get("kernel")
    if kernel is None and mode == "require":
        raise RuntimeError(f"{ENV}=require, but {_state['error']}")
    return kernel


def describe() -> str:
    """How this process counts CPU outputs: the kernel's build flags, or why ATen operations are used."""
    try:
        kernel = counting_kernel()
    except (RuntimeError, ValueError) as error:
        return f"ATen operations ({error})"
    if kernel is not None:
        return f"fused C kernel ({kernel.description})"
    if _mode() == "off":
        return f"ATen operations ({ENV}=off)"
    return f"ATen operations ({_state.get('error', 'kernel unavailable')})"
