"""Run one (setting, optimizer, method, seed) and the whole grid, in worker processes of one thread each."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.plasticity.methods import METHODS, initialize, make_remedy
from benchmarks.plasticity.metrics import dormant_scores, effective_rank
from benchmarks.plasticity.models import build_model, hidden_layers
from benchmarks.plasticity.problems import Problem, make_problem
from lightning_relu import DeadUnitTracker, find_relu_sites

__all__ = ["FULL", "QUICK", "Config", "Setting", "run_grid", "run_one"]

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")


@dataclass(frozen=True)
class Setting:
    """One problem on one architecture: how long, how wide, which learning rates."""

    problem: str
    model: str
    widths: tuple[int, ...]
    tasks: int
    steps_per_task: int
    batch_size: int
    lr: dict[str, float] = field(default_factory=lambda: {"sgd": 0.01, "adam": 0.001})

    @property
    def key(self) -> str:
        return f"{self.problem}/{self.model}"


@dataclass(frozen=True)
class Config:
    settings: tuple[Setting, ...]
    seeds: tuple[int, ...]
    optimizers: tuple[str, ...] = OPTIMIZERS
    methods: tuple[str, ...] = METHODS
    # ReDo (Sokar et al. 2023): τ = 0.1; recycling period in gradient steps
    redo_tau: float = 0.1
    redo_period: int = 1000
    # continual backprop (Dohare et al. 2024): replacement rate, utility decay, maturity threshold
    cbp_rate: float = 1e-4
    cbp_decay: float = 0.99
    cbp_maturity: int = 100
    # ours: how many steps the tracker's window covers before a revival (tuned on the tuning task, not reported)
    revival_period: int = 50
    # inputs of the current task that ReDo scores units on and that our revival calibrates revived units on
    score_batch: int = 64
    processes: int = 2
    label: str = "full"

    def options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("redo_tau", "redo_period", "cbp_rate", "cbp_decay", "cbp_maturity",
                                              "revival_period", "score_batch")}


FULL = Config(
    settings=(
        Setting("permuted", "mlp", (100, 100), tasks=12, steps_per_task=300, batch_size=16),
        Setting("random_labels", "mlp", (100, 100), tasks=12, steps_per_task=300, batch_size=16,
                lr={"sgd": 0.1, "adam": 0.001}),
        Setting("random_labels", "cnn", (8, 16, 32), tasks=10, steps_per_task=300, batch_size=16,
                lr={"sgd": 0.1, "adam": 0.001}),
        # Dohare et al.: 5 hidden units, one example per step, SGD step size 0.01; T = 400 here (10 000 in the paper)
        Setting("regression", "mlp", (5,), tasks=20, steps_per_task=400, batch_size=1),
    ),
    seeds=(0, 1, 2, 3, 4),
)

QUICK = replace(
    FULL,
    settings=tuple(replace(s, tasks=3, steps_per_task=s.steps_per_task // 4) for s in FULL.settings),
    seeds=(0, 1),
    label="quick",
)


def _evaluate(model: nn.Module, problem: Problem, sites: Any) -> dict[str, float]:
    """Dead fraction (counted by ``DeadUnitTracker``), τ-dormant fraction (τ = 0.1) over every hidden unit, and the
    effective rank of the last hidden layer, on the current task's evaluation set; accuracy for classification."""
    x, y = problem.eval_set()
    layers = hidden_layers(model)  # type: ignore[arg-type]
    outputs: list[torch.Tensor] = []
    handles = [layer.relu.register_forward_hook(lambda m, i, o: outputs.append(o.detach())) for layer in layers]
    try:
        with torch.no_grad(), DeadUnitTracker(model, discovered=sites) as tracker:
            prediction = model(x)
    finally:
        for handle in handles:
            handle.remove()
    report = tracker.report()
    units = sum(layer.num_units for layer in report.values())
    result = {
        "dead_fraction": sum(layer.num_dead for layer in report.values()) / units,
        "dormant_fraction": sum(int((dormant_scores(o) <= 0.1).sum()) for o in outputs) / units,
        "effective_rank": effective_rank(outputs[-1].reshape(outputs[-1].shape[0], -1)),
    }
    if problem.kind == "classification":
        result["accuracy"] = float((prediction.argmax(1) == y).double().mean())
    return result


def run_one(setting: Setting, optimizer_name: str, method: str, seed: int, options: dict[str, Any]) -> dict[str, Any]:
    """Train one network through every task of ``setting``; returns the per-task results and the timings."""
    torch.set_num_threads(1)
    problem = make_problem(setting.problem, seed, setting.tasks, setting.steps_per_task,
                           image=setting.model == "cnn", batch_size=setting.batch_size)
    torch.manual_seed(seed)  # same initial network for every method
    model = build_model(setting.model, problem.input_shape, problem.outputs, setting.widths)
    generator = torch.Generator().manual_seed(10_007 + seed)
    initialize(method, model, problem, generator)
    lr = setting.lr[optimizer_name]
    if optimizer_name == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    elif optimizer_name == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        raise ValueError(f"`optimizer` can be {', '.join(map(repr, OPTIMIZERS))}, got {optimizer_name!r}")
    loss_fn: Callable[..., torch.Tensor] = F.cross_entropy if problem.kind == "classification" else F.mse_loss
    sites = find_relu_sites(model)
    remedy = make_remedy(method, model, optimizer, generator, options)
    tasks = []
    cpu = wall = 0.0
    step = 0
    try:
        for task in range(setting.tasks):
            problem.start_task(task)
            online = 0.0
            for _ in range(setting.steps_per_task):
                x, y = problem.batch()
                cpu0, wall0 = time.process_time(), time.perf_counter()
                loss = loss_fn(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                remedy.after_step(step, problem)
                cpu += time.process_time() - cpu0
                wall += time.perf_counter() - wall0
                online += float(loss.detach())
            remedy.pause()
            result = _evaluate(model, problem, sites)
            remedy.resume()
            result["online_loss"] = online / setting.steps_per_task
            result["task"] = task
            tasks.append(result)
    finally:
        remedy.close()
    return {
        "setting": setting.key,
        "optimizer": optimizer_name,
        "method": method,
        "seed": seed,
        "tasks": tasks,
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "units_reset": remedy.units_reset,
        "remedy_warnings": remedy.warnings,
        "steps": step,
    }


def _job(args: tuple[Setting, str, str, int, dict[str, Any]]) -> dict[str, Any]:
    return run_one(*args)


def run_grid(config: Config, progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Every (setting, optimizer, method, seed) of ``config``, in ``config.processes`` worker processes."""
    jobs = [(s, o, m, seed, config.options()) for s in config.settings for o in config.optimizers
            for m in config.methods for seed in config.seeds]
    jobs.sort(key=lambda job: -job[0].tasks * job[0].steps_per_task)  # longest first
    results: list[dict[str, Any]] = []
    if config.processes <= 1:
        for i, job in enumerate(jobs):
            results.append(_job(job))
            if progress:
                progress(i + 1, len(jobs))
    else:
        with multiprocessing.get_context("spawn").Pool(config.processes) as pool:
            for i, result in enumerate(pool.imap_unordered(_job, jobs)):
                results.append(result)
                if progress:
                    progress(i + 1, len(jobs))
    order = {(s.key, o, m, seed): i for i, (s, o, m, seed, _) in enumerate(
        (s, o, m, seed, None) for s in config.settings for o in config.optimizers for m in config.methods
        for seed in config.seeds)}
    results.sort(key=lambda r: order[(r["setting"], r["optimizer"], r["method"], r["seed"])])
    return results


def config_dict(config: Config) -> dict[str, Any]:
    """The configuration as JSON-ready primitives."""
    data = asdict(config)
    data["settings"] = [dict(asdict(s), key=s.key) for s in config.settings]
    return data
