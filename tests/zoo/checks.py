"""What the zoo's tests share: forced models, oracle places, comparisons of counts, parameters and buffers."""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from torch import Tensor, nn

from tests.zoo.models import BY_NAME, ZooModel, call, output_tensor
from tests.zoo.oracle import Call, Kill, Place, apply_kills, plan_kills, recording

SEED = 0


@functools.cache
def _fresh_calls(name: str) -> tuple[Call, ...]:
    model, example = BY_NAME[name].build()
    with recording(model, example) as recorder:
        torch.manual_seed(SEED)
        call(model, example)
    return tuple(recorder.calls)


def kill_plan(name: str) -> tuple[Kill, ...]:
    """Which units of which places the zoo forces dead for a model (from one recorded forward of a fresh build)."""
    return tuple(plan_kills(list(_fresh_calls(name))))


def producer_weights(name: str) -> dict[str, frozenset[str]]:
    """Per rectifier place of a fresh build whose input comes cleanly from an affine operation: the parameters that
    operation's weight is (computed from)."""
    found: dict[str, frozenset[str]] = {}
    for rectifier in _fresh_calls(name):
        if rectifier.flow.clean and rectifier.flow.producer:
            kind, module, position = rectifier.place
            found.setdefault(f"{kind} {module}#{position}", rectifier.flow.producer)
    return found


def forced(entry: ZooModel) -> tuple[nn.Module, Any, tuple[Kill, ...]]:
    """A fresh build of ``entry`` with its planned units forced dead (train mode)."""
    kills = kill_plan(entry.name)
    model, example = entry.build()
    apply_kills(model, list(kills))
    return model, example, kills


def oracle_places(model: nn.Module, example: Any, seed: int = SEED) -> list[Place]:
    """The ground truth of one forward pass of ``model`` (its mode as it is) on ``example``, global RNG seeded."""
    with recording(model, example) as recorder:
        torch.manual_seed(seed)
        call(model, example)
    return recorder.places()


def tracked(model: nn.Module, example: Any, seed: int = SEED) -> dict[str, Any]:
    """``DeadUnitTracker(model)``'s report of one forward pass on ``example``, global RNG seeded."""
    from lightning_relu import DeadUnitTracker

    tracker = DeadUnitTracker(model)
    torch.manual_seed(seed)
    with tracker, torch.no_grad():
        call(model, example)
    return tracker.report()


def site_keys(model: nn.Module, example: Any, seed: int = SEED) -> dict[str, tuple[str, str, int]]:
    """The key of every site ``DeadUnitTracker(model)`` counts on one forward pass, by display name, as the oracle
    writes a place: (kind, module path, call position)."""
    from lightning_relu import DeadUnitTracker

    tracker = DeadUnitTracker(model)
    torch.manual_seed(seed)
    with tracker, torch.no_grad():
        call(model, example)
    return {site.name: (site.key.kind, site.key.path, site.key.call) for site in tracker.sites}


def compare_keys(places: list[Place], report: dict[str, Any], keys: dict[str, tuple[str, str, int]]) -> list[str]:
    """The sites that saw data must be exactly the oracle's places, key for key (one numbering of call positions),
    and each must report its place's counts."""
    by_key = {place.key: place for place in places}
    seen = {name: key for name, key in keys.items() if report[name].entries_per_unit > 0}
    problems = [f"site {name!r} has key {key}, which is no place" for name, key in seen.items() if key not in by_key]
    missing = set(by_key) - set(seen.values())
    problems += [f"place {key} has no site" for key in sorted(missing)]
    for name, key in seen.items():
        place = by_key.get(key)
        if place is not None and not torch.equal(report[name].active_count.to(torch.int64), place.active):
            problems.append(f"site {name!r} ({key}) counts differ from its place's")
    return problems


def compare_counts(places: list[Place], report: dict[str, Any]) -> list[str]:
    """Match every oracle place with one reported site of exactly the same per-unit counts.

    Returns the problems, one line each (empty when the counts agree). A site matches a place when it has the same
    number of units, the same entries per unit and the same number of active entries per unit; places are taken in
    forward order of their first call. Reported sites that saw nothing (``entries_per_unit == 0``) are not sites seen.
    """
    seen = {name: layer for name, layer in report.items() if layer.entries_per_unit > 0}
    left = dict(seen)
    problems = []
    for place in places:
        match = next(
            (
                name
                for name, layer in left.items()
                if layer.num_units == place.units
                and layer.entries_per_unit == place.entries
                and torch.equal(layer.active_count.to(torch.int64), place.active)
            ),
            None,
        )
        if match is not None:
            del left[match]
            continue
        same_dead = [
            name
            for name, layer in left.items()
            if layer.num_units == place.units and torch.equal(layer.dead.bool(), place.dead)
        ]
        hint = (
            f"dead mask equal at {same_dead[:2]} but counts differ" if same_dead else "no site with this dead mask"
        )
        problems.append(
            f"{place.describe()} ({len(place.calls)} call(s), {place.units} units on axis {place.calls[0].axis}"
            f" [{place.calls[0].axis_from}], {place.entries} entries/unit, {int(place.dead.sum())} dead): {hint}"
        )
    for name, layer in left.items():
        problems.append(
            f"reported site {name!r} ({layer.num_units} units, {layer.entries_per_unit} entries/unit,"
            f" {int(layer.num_dead)} dead) matches no rectifier call"
        )
    if len(seen) != len(places):
        problems.insert(0, f"{len(seen)} sites seen by the tracker, {len(places)} places at the dispatcher level")
    return problems


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer by name, copied."""
    state = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters()}
    state.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return state


def same_bytes(a: Tensor, b: Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def byte_differences(before: dict[str, Tensor], after: dict[str, Tensor]) -> list[str]:
    names = sorted(set(before) | set(after))
    return [n for n in names if n not in before or n not in after or not same_bytes(before[n], after[n])]


def eval_output(model: nn.Module, example: Any) -> Tensor:
    """The model's output tensor in eval mode (the mode is restored)."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return output_tensor(call(model, example)).detach().clone()
    finally:
        model.train(training)


def relative_change(after: Tensor, before: Tensor) -> float:
    scale = float(before.abs().max())
    return float((after - before).abs().max()) / max(scale, 1e-30)


def copy_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def parameter_count(model: nn.Module) -> int:
    """Number of parameter entries (each shared parameter once)."""
    return sum(p.numel() for p in model.parameters())
