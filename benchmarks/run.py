"""Benchmark suite: what monitoring costs, measured against the same training step without it.

    python benchmarks/run.py [--quick] [--json benchmarks/results.json] [--no-budgets] [--processes 5]
                             [--system-malloc] [--only tracker,lightning,...] [--chunk-numel-per-thread N]

Each step-overhead figure is a ratio of medians from a process in which the two variants run in interleaved
blocks (many rounds of "a block of steps with, a block without"), so that machine drift cancels; it is
measured in --processes fresh processes (5 by default) and the median is reported, with the range of the
processes' own figures. The counting keeps partial sums that are folded into the states when they are read or
fill up (see lightning_relu/functional.py); the timed steps include every fold that falls in them. Budgets (checked
unless --no-budgets; the script exits 1 when one is missed):

- monitoring with exact per-unit counts on every training step: at most 1.02x the step time, for
  `DeadUnitTracker` in a plain loop and for `DeadUnitMonitor` in `Trainer.fit`;
- `sign_flip_`: at most 1.5x one plain forward pass over the same data.

Memory allocator: glibc's malloc hands freed memory back to the kernel once enough of it sits at the top of
the heap, and the next allocation of an activation faults those pages in again (a few thousand page faults
per step, or none, depending on where small allocations happened to land). Whether a run is in that state is
close to chaotic: the same code measured 0 or 4000 page faults per pass, and timings moved by 1.5x with it.
So that the figures measure the code, the benchmark runs with glibc told to keep what it frees
(``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_THRESHOLD_``; PyTorch's CPU tuning advice, jemalloc or tcmalloc,
has the same effect); ``--system-malloc`` keeps the defaults. Minor page faults per step are reported for
each variant.

Counting uses ATen operations only (``lightning_relu.functional``; nothing is compiled). The run's date and machine
are printed and kept in the JSON.

With each tracker row comes the floor it sits on: bare forward hooks on the same sites that compute only the
counting operations (the median process's figure); and the time per step spent inside the tracker's hooks, inside
those bare counting hooks, and inside bare hooks that only read each output once (the floor of any exact count).

Reported without a budget: the optional death margin (`track_margin=True`), one `revive_dead_units_` on
the CNN relative to one training step, and the tracker's overhead on a `torch.compile`d model: the tracker's
hooks trace into the model's graph (no graph break), so the compiled counting is fused by the compiler; the
compiled tracked step is compared with the same model compiled without the tracker (a copy with the same
weights, interleaved in blocks as above), with a check that the compiled counts equal eager counts.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import WORKLOADS, batch

import lightning_relu.functional as functional
from lightning_relu import ActivationStats, DeadUnitMonitor, DeadUnitTracker, revive_dead_units_
from lightning_relu.init import sign_flip_

SECTIONS = ("tracker", "margin", "lightning", "sign_flip", "revival", "compiled")
STEP_BUDGET = 1.02
SIGN_FLIP_BUDGET = 1.5
# glibc keeps freed memory instead of returning it to the kernel (32 MiB is the largest mmap threshold it accepts)
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**40)}
# --chunk-numel-per-thread reaches the spawned measuring processes through the environment (they import this module)
CHUNK_ENV = "LIGHTNING_RELU_BENCH_CHUNK_NUMEL_PER_THREAD"
if os.environ.get(CHUNK_ENV):
    functional._CHUNK_NUMEL_PER_THREAD = int(os.environ[CHUNK_ENV])


def page_faults() -> int:
    """Minor page faults of this process so far (0 where the platform does not count them)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def cpu_model() -> str:
    """The CPU's model name where /proc/cpuinfo gives it, else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, object]:
    return {
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "counting": "ATen operations (lightning_relu.functional)",
        "chunk_numel_per_thread": functional._CHUNK_NUMEL_PER_THREAD,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def interleaved(
    variants: dict[str, tuple[Callable[[], None], Callable[[], None], Callable[[], None]]],
    rounds: int,
    block: int,
    warmup: int = 3,
) -> dict[str, Any]:
    """Median time of one call per variant, the ratio of the second variant to the first (``ratio``) and of every
    variant to the first (``ratios``), and the minor page faults per call of each variant (``faults``: the median
    over blocks; a block where the heap grew stands out alone).

    Each variant is (enter, step, exit). Every round runs a block of steps of each variant, in alternating
    order; a ratio is the median over rounds of the ratio of two block medians, so drift between rounds
    (other processes, the allocator's state) cancels within each round.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    faults: dict[str, list[float]] = {name: [] for name in variants}  # per block: page faults per step
    ratios: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for enter, step, leave in variants.values():
        enter()
        for _ in range(warmup):
            step()
        leave()
    for r in range(rounds):
        order = list(variants.items())
        if r % 2:
            order.reverse()
        block_medians: dict[str, float] = {}
        for name, (enter, step, leave) in order:
            enter()
            step()  # one untimed step after switching
            block_times = []
            f0 = page_faults()
            for _ in range(block):
                t0 = time.perf_counter()
                step()
                block_times.append(time.perf_counter() - t0)
            faults[name].append((page_faults() - f0) / block)
            leave()
            times[name] += block_times
            block_medians[name] = statistics.median(block_times)
        for name in names:
            ratios[name].append(block_medians[name] / block_medians[names[0]])
    result: dict[str, Any] = {name: statistics.median(values) for name, values in times.items()}
    result["ratios"] = {name: statistics.median(values) for name, values in ratios.items()}
    result["ratio"] = result["ratios"][names[1]]
    result["faults"] = {name: statistics.median(counts) for name, counts in faults.items()}
    return result


def _read_once(output: torch.Tensor) -> None:
    """What every exact count has to do at least: read each entry of the output once (one sum per sample)."""
    output.detach().sum(tuple(range(1, output.ndim)))


def _bare_hooks(
    tracker: DeadUnitTracker, body: str, spent: list[float] | None = None
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(attach, detach) of bare forward hooks on the tracker's module sites that do one thing and nothing else:
    ``"counting"``, the counting the tracker's hooks do (each hook adds its output to a metric of its own with the
    metric's counting body, ``ActivationStats._add``: the floor the tracker's own bookkeeping and torchmetrics'
    ``update`` wrapper sit on), or ``"read"``, one read of each output (:func:`_read_once`: the floor of any exact
    count of it). With ``spent``, each call's time is added to ``spent[0]``."""
    if body not in ("counting", "read"):
        raise ValueError(f"`body` must be 'counting' or 'read', got {body!r}")
    handles: list[Any] = []
    sites = [site for site in tracker.sites if site.module is not None]
    metrics = {id(site.module): ActivationStats(unit_dim=tracker.stats[site.name].unit_dim) for site in sites}

    def work(module: nn.Module, output: torch.Tensor) -> None:
        if body == "counting":
            metrics[id(module)]._add(output)
        else:
            _read_once(output)

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if spent is None:
            work(module, output)
            return
        t0 = time.perf_counter()
        work(module, output)
        spent[0] += time.perf_counter() - t0

    def attach() -> None:
        modules = {id(site.module): site.module for site in tracker.sites if site.module is not None}
        handles.extend(module.register_forward_hook(hook) for module in modules.values())

    def detach() -> None:
        for handle in handles:
            handle.remove()
        handles.clear()

    return attach, detach


def _median_spent(
    spent: list[float], attach: Callable[[], Any], detach: Callable[[], None], step: Callable[[], None], steps: int
) -> float:
    """Median over ``steps`` training steps of what timed hooks add to ``spent[0]`` per step, with the hooks
    attached by ``attach`` (and removed by ``detach`` at the end, whatever happens)."""
    per_step = []
    try:
        attach()
        step()  # untimed, as the first step of every block
        for _ in range(steps):
            spent[0] = 0.0
            step()
            per_step.append(spent[0])
    finally:
        detach()
    return statistics.median(per_step)


def time_in_bare_hooks(tracker: DeadUnitTracker, body: str, step: Callable[[], None], steps: int) -> float:
    """Median seconds per step spent inside bare hooks (:func:`_bare_hooks`) over ``steps`` training steps."""
    spent = [0.0]
    attach, detach = _bare_hooks(tracker, body, spent)
    return _median_spent(spent, attach, detach, step, steps)


def time_in_hooks(tracker: DeadUnitTracker, step: Callable[[], None], steps: int) -> float:
    """Median seconds per step spent inside the tracker's hooks (its per-site forward hooks and its per-pass
    pre-hook on the model), timed where they run, around each call, over ``steps`` training steps.

    A direct measurement of what the hooks cost, not subject to the step-to-step noise that the interleaved ratio
    has to average away; it leaves out what the hooks may cost the rest of the step (caches, allocations), which
    the ratio includes. Only module sites are timed (the reference workloads have no functional ones).
    """
    spent = [0.0]

    def timed(function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return function(*args)
            finally:
                spent[0] += time.perf_counter() - t0

        return wrapper

    make_reset = tracker._make_reset
    methods = ("_hook", "_forward_began", "_watch_backward")  # the per-site hook and the model's two
    for method in methods:
        setattr(tracker, method, timed(getattr(tracker, method)))
    tracker._make_reset = lambda keys: timed(make_reset(keys))  # type: ignore[method-assign]

    def detach() -> None:
        tracker.detach()
        for method in (*methods, "_make_reset"):
            delattr(tracker, method)  # the class's methods again

    return _median_spent(spent, tracker.attach, detach, step, steps)


def _tracked_vs_plain(
    name: str,
    rounds: int,
    block: int,
    compile_model: bool = False,
    track_margin: bool = False,
    floor: bool = False,
) -> tuple[Any, ...]:
    """Interleaved medians of a training step with and without `DeadUnitTracker` on one workload (and, with
    ``floor``, with bare hooks that only compute the counting operations, and the time spent inside the tracker's
    hooks)."""
    build, _ = WORKLOADS[name]
    torch.manual_seed(0)
    model = build()
    x, y = batch(name)
    loss_fn = nn.CrossEntropyLoss()

    def training_step(run: Callable[[torch.Tensor], torch.Tensor], opt: torch.optim.Optimizer) -> Callable[[], None]:
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(run(x), y).backward()
            opt.step()

        return step

    def nothing() -> None:
        pass

    tracker = DeadUnitTracker(model, track_margin=track_margin)
    if compile_model:
        # attaching and removing hooks between blocks would make dynamo compile again (its guards see the hooks):
        # the tracked model keeps its hooks, and a copy of it with the same weights, compiled alone, is the plain one
        plain_model = copy.deepcopy(model)
        tracker.attach()
        run = torch.compile(model)
        plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.01, momentum=0.9)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        step = training_step(run, opt)
        variants = {
            "plain": (nothing, training_step(torch.compile(plain_model), plain_opt), nothing),
            "tracked": (nothing, step, nothing),
        }
    else:
        run = model
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        step = training_step(run, opt)
        variants = {"plain": (nothing, step, nothing), "tracked": (tracker.attach, step, tracker.detach)}
    if floor:
        attach_bare, detach_bare = _bare_hooks(tracker, "counting")
        variants["counting_only"] = (attach_bare, step, detach_bare)
    medians = interleaved(variants, rounds, block)
    result = {
        "step_ms": medians["plain"] * 1e3,
        "tracked_step_ms": medians["tracked"] * 1e3,
        "ratio": medians["ratio"],
        "page_faults_per_step": medians["faults"],
    }
    if floor:
        result["counting_only_ratio"] = medians["ratios"]["counting_only"]
        in_hooks = time_in_hooks(tracker, step, 4 * block)
        result["hooks_ms"] = in_hooks * 1e3
        result["hooks_share"] = in_hooks / medians["plain"]  # the share of a plain step spent in the hooks
        # the same inside bare hooks that only count, and inside bare hooks that only read each output once
        result["counting_hooks_ms"] = time_in_bare_hooks(tracker, "counting", step, 4 * block) * 1e3
        result["read_once_ms"] = time_in_bare_hooks(tracker, "read", step, 4 * block) * 1e3
    return result, model, run, tracker, x


def bench_tracker(name: str, rounds: int, block: int) -> dict[str, float]:
    return _tracked_vs_plain(name, rounds, block, floor=True)[0]


def bench_margin(name: str, rounds: int, block: int) -> dict[str, float]:
    return _tracked_vs_plain(name, rounds, block, track_margin=True)[0]


def in_fresh_processes(fn: Callable[..., dict[str, Any]], args: tuple[Any, ...], processes: int) -> dict[str, Any]:
    """Run ``fn(*args)`` in ``processes`` fresh interpreters, one after the other; the median ratio of the runs.

    A step's cost on a small shared machine depends on the process (where the allocator placed the big tensors,
    which pages are huge pages): ratios measured in one process can sit a few percent away from another's. The
    figure is the median over processes; ``ratios`` lists every process's own figure.
    """
    if processes <= 1:
        return fn(*args)
    runs = []
    context = multiprocessing.get_context("spawn")
    for _ in range(processes):
        with context.Pool(1) as pool:
            runs.append(pool.apply(fn, args))
    runs.sort(key=lambda run: run["ratio"])
    result = dict(runs[len(runs) // 2])
    result["ratios"] = [run["ratio"] for run in runs]
    if "hooks_share" in result:
        result["hooks_shares"] = sorted(run["hooks_share"] for run in runs)
    return result


class _Module(L.LightningModule):
    def __init__(self, name: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = WORKLOADS[name][0]()
        self.loss = nn.CrossEntropyLoss()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class _Blocks(Callback):
    """Times every training step of one fit, switching the monitor's hooks off and on in alternating blocks.

    Registered before the monitor, with its :class:`_BlockEnd` after it, so a step's time includes the monitor's
    ``on_train_batch_start`` and ``on_train_batch_end`` (where it notes non-finite counts every step). Each round runs
    a block of steps without the hooks and one with them (in alternating order); the first step of a block is not
    timed. With the hooks removed the monitor's callbacks still run.
    """

    def __init__(self, monitor: DeadUnitMonitor, block: int) -> None:
        self.monitor, self.block = monitor, block
        self.tracker: DeadUnitTracker | None = None  # the monitor's, kept after the fit
        self.times: dict[str, list[list[float]]] = {"plain": [], "monitored": []}
        self.faults: dict[str, list[int]] = {"plain": [], "monitored": []}
        self._variant = "plain"
        self._timed = False
        self._t0 = 0.0
        self._f0 = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        round_, index = divmod(batch_idx, 2 * (self.block + 1))
        first, second = ("plain", "monitored") if round_ % 2 == 0 else ("monitored", "plain")
        variant = first if index <= self.block else second
        tracker = self.tracker = self.monitor.tracker
        assert tracker is not None
        self._timed = index not in (0, self.block + 1)
        if not self._timed:  # the first step of a block is not timed
            tracker.attach() if variant == "monitored" else tracker.detach()
            self._variant = variant
            self.times[variant].append([])
            self.faults[variant].append(0)
        self._f0 = page_faults()
        self._t0 = time.perf_counter()

    def faults_per_step(self, variant: str) -> float:
        """Minor page faults per step of ``variant``: the median over its blocks, the first one left out."""
        blocks = zip(self.faults[variant][1:], self.times[variant][1:], strict=True)
        return statistics.median(count / len(times) for count, times in blocks)

    def stop(self) -> None:
        if self._timed:
            self.times[self._variant][-1].append(time.perf_counter() - self._t0)
            self.faults[self._variant][-1] += page_faults() - self._f0


class _BlockEnd(Callback):
    """Stops :class:`_Blocks`' timer of a step; registered after the monitor, so the time includes its batch end."""

    def __init__(self, blocks: _Blocks) -> None:
        self.blocks = blocks

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.blocks.stop()


def bench_lightning(name: str, rounds: int, block: int) -> dict[str, Any]:
    """One `Trainer.fit` whose steps alternate, in blocks, between the monitor's hooks removed and attached."""
    x, y = batch(name)
    module = _Module(name)
    monitor = DeadUnitMonitor(log_histograms=False, print_summary=False)
    blocks = _Blocks(monitor, block)
    warmup = 2 * (block + 1)  # one round, not counted
    data = DataLoader(_Repeat(x, y, warmup + 2 * rounds * (block + 1)), batch_size=None)
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[blocks, monitor, _BlockEnd(blocks)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, data)
    plain_blocks, monitored_blocks = blocks.times["plain"][1:], blocks.times["monitored"][1:]
    ratios = [
        statistics.median(on) / statistics.median(off) for off, on in zip(plain_blocks, monitored_blocks, strict=True)
    ]
    plain = [t for block_times in plain_blocks for t in block_times]
    monitored = [t for block_times in monitored_blocks for t in block_times]
    result = {
        "step_ms": statistics.median(plain) * 1e3,
        "monitored_step_ms": statistics.median(monitored) * 1e3,
        "ratio": statistics.median(ratios),
        "page_faults_per_step": {variant: blocks.faults_per_step(variant) for variant in ("plain", "monitored")},
    }
    return result


class _Repeat(Dataset):
    """The same batch, `n` times (the loader is used with `batch_size=None`)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n: int) -> None:
        self.x, self.y, self.n = x, y, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


def bench_sign_flip(label: str, model: nn.Module, data: torch.Tensor, repeats: int) -> dict[str, float]:
    """`sign_flip_` over `data` against one plain forward pass over the same data, run in alternation.

    The ratio is the median over repeats of (flip / forward) within each pair.
    """
    forward, flip, ratios = [], [], []
    faults = {"forward": 0, "sign_flip": 0}
    for _ in range(repeats):
        f0, t0 = page_faults(), time.perf_counter()
        with torch.no_grad():
            model(data)
        forward.append(time.perf_counter() - t0)
        f1, t0 = page_faults(), time.perf_counter()
        sign_flip_(model, data, max_samples=None)
        flip.append(time.perf_counter() - t0)
        faults["forward"] += f1 - f0
        faults["sign_flip"] += page_faults() - f1
        ratios.append(flip[-1] / forward[-1])
    f, s = statistics.median(forward), statistics.median(flip)
    return {
        "forward_ms": f * 1e3,
        "sign_flip_ms": s * 1e3,
        "ratio": statistics.median(ratios),
        "page_faults_per_call": {name: count / repeats for name, count in faults.items()},
    }


def deep_mlp(depth: int = 32, width: int = 64, in_features: int = 64) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(in_features if i == 0 else width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def bench_sign_flip_mlp(repeats: int) -> dict[str, float]:
    data = torch.randn(8192, 64, generator=torch.Generator().manual_seed(0))
    return bench_sign_flip("mlp", deep_mlp(), data, repeats)


def bench_sign_flip_cnn(repeats: int) -> dict[str, float]:
    data = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    return bench_sign_flip("cnn", WORKLOADS["cnn"][0](), data, repeats)


def bench_revival(repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = WORKLOADS["cnn"][0]()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = batch("cnn")
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    with DeadUnitTracker(model) as tracker:
        model(x)
    report = tracker.report()
    # pretend a quarter of every layer died, so the surgery has real work to do
    for layer in report.values():
        layer.dead[: max(1, layer.num_units // 4)] = True
    steps, revivals = [], []
    generator = torch.Generator().manual_seed(0)
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        steps.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        revive_dead_units_(model, report, opt, generator)
        revivals.append(time.perf_counter() - t0)
    st, rv = statistics.median(steps), statistics.median(revivals)
    return {"step_ms": st * 1e3, "revive_ms": rv * 1e3, "ratio": rv / st}


def bench_compiled(name: str, rounds: int, block: int) -> dict[str, Any]:
    import torch._dynamo
    from torch._dynamo.utils import counters

    counters.clear()
    result, model, compiled, tracker, x = _tracked_vs_plain(name, rounds, block, compile_model=True)
    graph_breaks = sum(counters["graph_break"].values())
    # correctness: counts from the compiled model equal the counts of an eager pass with the same weights
    with torch.no_grad():
        tracker.reset()
        compiled(x)
        from_compiled = {k: v.active_count.tolist() for k, v in tracker.report().items()}
        tracker.reset()
        model(x)
        from_eager = {k: v.active_count.tolist() for k, v in tracker.report().items()}
    tracker.detach()
    # inductor's kernels round differently from eager ones (a fused BatchNorm, for one), so an entry within rounding
    # of 0 may fall on the other side of the rectifier: the share of counted entries that differ is reported too
    # (tests/test_compile.py checks exact equality with the `aot_eager` backend, which runs eager's kernels)
    differ = sum(abs(a - b) for k in from_eager for a, b in zip(from_compiled[k], from_eager[k], strict=True))
    total = sum(sum(counts) for counts in from_eager.values())
    return {
        **result,
        "graph_breaks": graph_breaks,
        "counts_match_eager": from_compiled == from_eager,
        "counts_differing_share": differ / max(total, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke run, not a measurement")
    parser.add_argument("--json", default=str(Path(__file__).resolve().parent / "results.json"))
    parser.add_argument("--no-budgets", action="store_true", help="report only, never fail")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--chunk-numel-per-thread",
        type=int,
        default=None,
        help="entries per thread in a chunk of the CPU counting path (default: the library's, "
        f"{functional._CHUNK_NUMEL_PER_THREAD}); to compare chunk sizes on the reference machine",
    )
    parser.add_argument("--skip-lightning", action="store_true", help="skip the Trainer.fit measurements")
    parser.add_argument("--skip-compile", action="store_true", help="skip the torch.compile measurements")
    parser.add_argument(
        "--processes", type=int, default=5, help="fresh processes per step-overhead figure (median of them)"
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default: all of {', '.join(SECTIONS)})",
    )
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="keep glibc's default malloc settings (by default it is told to keep freed memory; see above)",
    )
    args = parser.parse_args(argv)
    only = {section.strip() for section in args.only.split(",") if section.strip()}
    if not only or only - set(SECTIONS):
        parser.error(f"--only takes sections among {', '.join(SECTIONS)}; got {args.only!r}")
    allocator = "system"
    if not args.system_malloc and platform.system() == "Linux":
        allocator = "keeps freed memory (up to 32 MiB blocks)"
        missing = {k: v for k, v in KEEP_FREED_MEMORY.items() if os.environ.get(k) != v}
        if missing:
            # glibc reads these when the process starts: set them for the spawned measuring processes, and run
            # this one again under them when it was started from the command line (called from Python, this
            # process keeps its allocator: what it measures itself runs with the system's)
            os.environ.update(missing)
            if argv is None:
                sys.stdout.flush()
                os.execv(sys.executable, [sys.executable, *sys.argv])
            allocator += " in spawned processes; system in this one"
    if args.chunk_numel_per_thread:
        if args.chunk_numel_per_thread < 1:
            parser.error(f"--chunk-numel-per-thread must be positive, got {args.chunk_numel_per_thread}")
        os.environ[CHUNK_ENV] = str(args.chunk_numel_per_thread)
        functional._CHUNK_NUMEL_PER_THREAD = args.chunk_numel_per_thread
    if args.threads:
        torch.set_num_threads(args.threads)
    processes = 1 if args.quick else max(1, args.processes)
    rounds, block = (3, 2) if args.quick else (max(20, 100 // processes), 5)

    results: dict[str, Any] = {"machine": machine(), "quick": args.quick, "allocator": allocator}
    rows: list[tuple[str, ...]] = []
    failures: list[str] = []

    def record(section: str, key: str, r: dict[str, Any], label: str, base: str, budget: float | None) -> None:
        results.setdefault(section, {})[key] = r
        spread = f" ({min(r['ratios']):.3f}-{max(r['ratios']):.3f})" if "ratios" in r else ""
        faults = r.get("page_faults_per_step", r.get("page_faults_per_call"))
        faults_cell = " -> ".join(f"{count:.0f}" for count in faults.values()) if faults else "-"
        ratio = f"{r['ratio']:.3f}x{spread}"
        rows.append((label, f"{r[base]:.2f} ms", ratio, faults_cell, f"{budget}x" if budget else "-"))
        if budget is not None and r["ratio"] > budget:
            failures.append(f"{label}: {r['ratio']:.3f}x > {budget}x")

    if "tracker" in only:
        for name in WORKLOADS:
            r = in_fresh_processes(bench_tracker, (name, rounds, block), processes)
            record("tracker", name, r, f"DeadUnitTracker step, {name}", "step_ms", STEP_BUDGET)
            label = f"  the counting operations alone (bare hooks, same loop), {name}"
            rows.append((label, f"{r['step_ms']:.2f} ms", f"{r['counting_only_ratio']:.3f}x", "-", "-"))
            label = f"  time inside the tracker's hooks per step, {name}"
            spread = r.get("hooks_shares")
            shares = f" ({1 + min(spread):.3f}-{1 + max(spread):.3f})" if spread else ""
            share = f"{1 + r['hooks_share']:.3f}x{shares}"
            rows.append((label, f"{r['step_ms']:.2f} ms", share, f"{r['hooks_ms']:.3f} ms in hooks", "-"))
            for key, what in (("counting_hooks_ms", "the counting alone"), ("read_once_ms", "one read of each output")):
                label = f"  time inside bare hooks doing {what}, {name}"
                share = f"{1 + r[key] / r['step_ms']:.3f}x"
                rows.append((label, f"{r['step_ms']:.2f} ms", share, f"{r[key]:.3f} ms in hooks", "-"))
    if "margin" in only:
        for name in WORKLOADS:
            r = in_fresh_processes(bench_margin, (name, rounds, block), processes)
            record("margin", name, r, f"DeadUnitTracker(track_margin=True) step, {name}", "step_ms", None)
    if "lightning" in only and not args.skip_lightning:
        for name in WORKLOADS:
            r = in_fresh_processes(bench_lightning, (name, rounds, block), processes)
            record("lightning", name, r, f"Trainer.fit step with DeadUnitMonitor, {name}", "step_ms", STEP_BUDGET)
    repeats = 3 if args.quick else 21
    if "sign_flip" in only:
        r = in_fresh_processes(bench_sign_flip_mlp, (repeats,), processes)
        label = "sign_flip_ vs forward, MLP depth 32 width 64 (8192 samples)"
        record("sign_flip", "mlp_depth32_width64", r, label, "forward_ms", SIGN_FLIP_BUDGET)
        r = in_fresh_processes(bench_sign_flip_cnn, (repeats,), processes)
        record("sign_flip", "cnn", r, "sign_flip_ vs forward, CNN (256 images)", "forward_ms", SIGN_FLIP_BUDGET)
    if "revival" in only:
        r = bench_revival(repeats)
        record("revival", "cnn", r, "revive_dead_units_ vs training step, CNN", "step_ms", None)
    if "compiled" in only and not args.skip_compile:
        for name in WORKLOADS:
            r = in_fresh_processes(bench_compiled, (name, rounds, block), processes)
            record("compiled", name, r, f"DeadUnitTracker step, torch.compile, {name}", "step_ms", None)
            if r["counts_differing_share"] > 1e-4:
                failures.append(f"compiled {name}: counts differ from eager counts beyond rounding")
            if r["graph_breaks"]:
                failures.append(f"compiled {name}: {r['graph_breaks']} graph breaks")

    print("| measurement | baseline | ratio | page faults per call (without -> with [-> bare hooks]) | budget |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    m = results["machine"]
    print(f"\nmachine: {m['processor']}, {m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} threads)")
    print(f"malloc: {allocator}")
    print(f"counting: {m['counting']}; date: {m['date']}")
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.json}")
    if failures and not args.no_budgets and not args.quick:
        print("budget missed: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
