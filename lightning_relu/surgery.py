"""Revival on the observed structure: fresh incoming weights that fire, outgoing weights zeroed, output checked.

:func:`revive_observed_` is what :func:`~lightning_relu.revive_dead_units_` does when it is given an example
input (the :class:`~lightning_relu.DeadUnitReviver` always gives one: a slice of the epoch's last batch):

1. the structure of every site is observed on the example input (:func:`lightning_relu.structure.observe`);
2. each dead unit of a site with a producer and only affine readers gets a fresh row (``init``), its norm
   entries reset, and its outgoing weights zeroed through the exact unit maps, except in rows that are
   themselves being redrawn (a revived unit of the next site may read it: chains revive together);
3. **the revived units are made to fire**: on the example input, with the model in its current mode, a
   BatchNorm's running statistics for the unit are set to the batch's, and the unit's bias (the norm's, else
   the producer's) is shifted so that it is active on about half of the batch's entries (more when it has few
   entries, as a dense layer on a small batch: see `_threshold`). A unit whose pre-activation is constant on the
   batch (all its inputs are dead and not revived) cannot fire: it is left dead and reported;
4. **the output is checked**: in evaluation mode, on the example input, the model's output must equal the
   output before the surgery (relative tolerance ``rtol``); a site whose surgery changes it is rolled back and
   reported with the reason.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_relu.observation import _tensors
from lightning_relu.structure import SiteStructure, Structure, call_model, observe, preserved_state

__all__ = ["RevivalWarning", "reset_optimizer_state", "revive_observed_"]


class RevivalWarning(RuntimeWarning):
    """A revival could not be done exactly as asked (no producer, no consumer, a norm that mixes units).

    Public as :class:`lightning_relu.RevivalWarning` and ``lightning_relu.revive.RevivalWarning`` (the same class);
    defined here, with the surgery that raises it, so that the surgery never imports :mod:`lightning_relu.revive`.
    """


class _Writes:
    """The entries one site's surgery writes: (tensor, index) pairs, their old values, and their new ones."""

    def __init__(self) -> None:
        self.entries: list[tuple[Tensor, Any]] = []
        self.before: list[Tensor] = []
        self.after: list[Tensor] = []

    def write(self, tensor: Tensor, index: Any, value: Tensor | float) -> None:
        self.entries.append((tensor, index))
        self.before.append(tensor[index].detach().clone())
        tensor[index] = value
        self.after.append(tensor[index].detach().clone())

    def refresh(self) -> None:
        """Take the current values as the surgery's result (after calibration)."""
        self.after = [tensor[index].detach().clone() for tensor, index in self.entries]

    def undo(self) -> None:
        for (tensor, index), value in zip(reversed(self.entries), reversed(self.before), strict=True):
            tensor[index] = value

    def redo(self) -> None:
        for (tensor, index), value in zip(self.entries, self.after, strict=True):
            tensor[index] = value


@dataclass(eq=False)
class _Plan:
    site: SiteStructure
    units: Tensor
    writes: _Writes = field(default_factory=_Writes)
    # the units fresh rows are drawn for, in every round of `_operate_firing` (the first round's units): a unit kept
    # from one round to the next gets the same rows
    drawn: Tensor | None = None


def revive_observed_(
    model: nn.Module,
    dead: Mapping[str, Tensor],
    example_input: Any,
    optimizers: list[Optimizer],
    generator: torch.Generator | None,
    draw_rows: Any,
    *,
    init: str,
    max_fraction: float,
    excluded: Iterable[str] = (),
    check_output: bool = True,
    rtol: float = 1e-5,
    sites: Any = None,
) -> dict[str, int]:
    """Revive the ``dead`` units (bool mask per site name) of ``model``; see the module's docstring.

    Returns the number of units revived per site of ``dead`` not in ``excluded``.
    """
    if sites is None:
        from lightning_relu.sites import find_relu_sites

        sites = find_relu_sites(model)  # once: every observation below reuses them
    structure = observe(model, example_input, sites=sites)
    excluded = set(excluded)
    unknown = sorted(set(dead) - set(structure.known))
    if unknown:
        raise ValueError(
            f"The report has sites {unknown} that the model does not have; the model's sites are "
            f"{list(structure.known)}. Was the report measured on another model?"
        )
    check_excluded(excluded, structure.known)
    alive = _alive_in_eval(model, example_input, sites) if check_output else {}
    decisions = _decide(structure, dead, excluded, alive, max_fraction, generator)
    if decisions.plans:
        reference = _eval_output(model, example_input) if check_output else None
        with torch.no_grad():
            _operate_firing(model, example_input, decisions, generator, draw_rows, init, sites)
        if reference is not None:
            _keep_what_preserves(model, example_input, decisions.plans, reference, rtol, decisions.skipped)
        _reset_touched(decisions, optimizers)
    for name, reason in decisions.skipped.items():
        warnings.warn(f"Site {name!r} was not revived (or only in part): {reason}.", RevivalWarning, stacklevel=3)
    return decisions.counts


@dataclass(eq=False)
class _Decisions:
    """What the surgery does, decided per site before any tensor is touched, and what it reports: the units revived
    per site and, per site, why it was not revived (or only in part)."""

    plans: list[_Plan] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _decide(
    structure: Structure,
    dead: Mapping[str, Tensor],
    excluded: set[str],
    alive: dict[str, Tensor],
    max_fraction: float,
    generator: torch.Generator | None,
) -> _Decisions:
    """A plan for every site with dead units that can be revived; the reason for every other one."""
    decisions = _Decisions()
    for name, site in structure.sites.items():
        if name not in dead or name in excluded:
            continue
        mask = dead[name].reshape(-1)
        if mask.numel() != site.num_units:
            raise ValueError(
                f"The report of site {name!r} has {mask.numel()} units but the model's site {name!r} has "
                f"{site.num_units}. Was the report measured on another model?"
            )
        decisions.counts[name] = 0
        units = torch.nonzero(mask.cpu()).reshape(-1)
        if units.numel() == 0:
            continue
        if site.producer is None:
            decisions.skipped[name] = f"no producer: {site.producer_problem}"
            continue
        problem = site.revival_problem
        if problem is not None:
            decisions.skipped[name] = problem
            continue
        if any(norm.mixes_units for norm in site.norms):
            decisions.skipped[name] = (
                "a LayerNorm/GroupNorm normalizes its units together: a fresh unit would change the others"
            )
            continue
        if name in alive:
            firing = alive[name][units]
            if bool(firing.any()):
                # dead in the report, alive on the example input: zeroing its outgoing weights would change the output
                decisions.skipped[name] = (
                    f"{int(firing.sum())} of its dead units are active on the example input in evaluation mode: "
                    "left as they are"
                )
                units = units[~firing]
                if units.numel() == 0:
                    continue
        cap = max(1, math.floor(max_fraction * site.num_units))
        if units.numel() > cap:
            device = generator.device if generator is not None else torch.device("cpu")
            pick = torch.randperm(units.numel(), generator=generator, device=device)[:cap].cpu()
            units = units[pick].sort().values
        decisions.plans.append(_Plan(site, units))
    unreached = sorted(name for name in dead if name not in structure.sites and name not in excluded)
    for name in unreached:
        decisions.counts[name] = 0
        if bool(dead[name].any()):
            decisions.skipped[name] = "the forward on the example input does not reach it"

    return decisions


def _operate_firing(
    model: nn.Module,
    example_input: Any,
    decisions: _Decisions,
    generator: torch.Generator | None,
    draw_rows: Any,
    init: str,
    sites: Any,
) -> None:
    """Operate on every plan; when some units cannot fire, undo everything and operate on the others alone, until
    every unit operated on fires (fresh weights can leave other units of a site without a bias inactive; each round
    leaves out at least one unit, so this ends)."""
    plans, skipped = decisions.plans, decisions.skipped
    left: dict[str, list[int]] = {}  # per site, how many units were left: constant input, inactive without a bias
    for plan in plans:
        plan.drawn = plan.units.clone()
    # every round draws from the same state (a unit that fired in one round gets the same rows in the next)
    state = generator.get_state() if generator is not None else torch.get_rng_state()
    while True:
        if generator is not None:
            generator.set_state(state)
        else:
            torch.set_rng_state(state)
        silent = _operate(model, example_input, plans, generator, draw_rows, init, sites)
        if not silent:
            break
        for plan in reversed(plans):
            plan.writes.undo()
            plan.writes = _Writes()
        for plan in plans:
            if plan.site.name in silent:
                constant, stuck = silent[plan.site.name]
                counts = left.setdefault(plan.site.name, [0, 0])
                counts[0] += int(constant.sum())
                counts[1] += int(stuck.sum())
                plan.units = plan.units[~(constant | stuck)]
    for name, (constant_count, stuck_count) in left.items():
        reasons = []
        if constant_count:
            reasons.append(
                f"{constant_count} of its dead units get a constant input on the example input (every unit they read "
                "is dead and not revived): they cannot fire and were left dead"
            )
        if stuck_count:
            reasons.append(
                f"{stuck_count} of its dead units do not fire on the example input with new incoming weights, and "
                "there is no bias to shift them by (the last norm's, else the producer's): left dead"
            )
        skipped[name] = "; ".join([skipped[name], *reasons] if name in skipped else reasons)


def _reset_touched(decisions: _Decisions, optimizers: list[Optimizer]) -> None:
    """Count the units each kept plan revived and reset the optimizer state of every parameter entry it wrote."""
    touched: dict[Tensor, Tensor] = {}
    for plan in decisions.plans:
        if plan.units.numel():
            decisions.counts[plan.site.name] = int(plan.units.numel())
            for tensor, index in plan.writes.entries:
                if isinstance(tensor, nn.Parameter):
                    if tensor not in touched:
                        touched[tensor] = torch.zeros(tensor.shape, dtype=torch.bool, device=tensor.device)
                    touched[tensor][index] = True
    for optimizer in optimizers:
        reset_optimizer_state(optimizer, touched)


# ------------------------------------------------------------------------------------------------ steps
def _operate(
    model: nn.Module, example_input: Any, plans: list[_Plan], generator: Any, draw_rows: Any, init: str, sites: Any
) -> dict[str, tuple[Tensor, Tensor]]:
    """Redraw, zero the outgoing weights, calibrate; returns the units that cannot fire (see `_calibrate`)."""
    redrawn = _redraw(plans, generator, draw_rows, init)
    plans = [plan for plan in plans if plan.units.numel()]
    for plan in plans:
        _zero_outgoing(plan, redrawn)
    silent = _calibrate(model, example_input, plans, sites)
    for plan in plans:
        plan.writes.refresh()
    return silent


def _redraw(plans: list[_Plan], generator: torch.Generator | None, draw_rows: Any, init: str) -> dict[int, Tensor]:
    """Fresh rows for every plan's units; returns, per producer weight (by id), the rows redrawn. Rows are drawn for
    every unit of ``plan.drawn`` (the units of the first round), in the same order from the same generator state in
    every round, so a unit gets the same rows whichever others are left out."""
    redrawn: dict[int, Tensor] = {}
    for plan in plans:
        producer = plan.site.producer
        assert producer is not None
        weight = producer.weight.parameter
        bias = producer.bias.parameter if producer.bias is not None else None
        drawn = plan.units if plan.drawn is None else plan.drawn
        if not drawn.numel():
            continue
        new_weight, new_bias = draw_rows(int(drawn.numel()), producer.fan_in, bias is not None, init, generator)
        if not plan.units.numel():
            continue
        kept = torch.isin(drawn, plan.units)
        new_weight = new_weight[kept.to(new_weight.device)]
        new_bias = new_bias[kept.to(new_bias.device)] if new_bias is not None else None
        index = plan.units.to(weight.device)
        plan.writes.write(weight, (index,), new_weight.to(weight).reshape(-1, *weight.shape[1:]))
        if bias is not None and new_bias is not None:
            plan.writes.write(bias, (index.to(bias.device),), new_bias.to(bias))
        for norm in plan.site.norms:
            for tensor, value in ((norm.weight, 1.0), (norm.bias, 0.0)):
                if tensor is not None:
                    plan.writes.write(tensor, (plan.units.to(tensor.device),), value)
        previous = redrawn.get(id(weight))
        redrawn[id(weight)] = plan.units if previous is None else torch.cat([previous, plan.units]).unique()
    return redrawn


def _zero_outgoing(plan: _Plan, redrawn: dict[int, Tensor]) -> None:
    """Zero the weights that read the plan's units, except in rows being redrawn for another site."""
    for consumer in plan.site.consumers:
        picked = torch.isin(consumer.units, plan.units)
        if not bool(picked.any()):
            continue
        columns = consumer.columns[picked]
        weight = consumer.weight.parameter
        # input column c (linear) or channel c (conv) is read by the rows of its group, at c % (in / groups)
        in_per_group = weight.shape[1]
        out_per_group = weight.shape[0] // consumer.groups
        group = columns // in_per_group
        rows = (group[:, None] * out_per_group + torch.arange(out_per_group)).reshape(-1)
        local = (columns % in_per_group)[:, None].expand(-1, out_per_group).reshape(-1)
        keep = redrawn.get(id(weight))
        if keep is not None:
            outside = ~torch.isin(rows, keep)
            rows, local = rows[outside], local[outside]
        if rows.numel():
            plan.writes.write(weight, (rows.to(weight.device), local.to(weight.device)), 0.0)


def _unit_values(values: Tensor, unit_dim: int, units: Tensor) -> Tensor:
    """``(len(units), entries)``: each unit's entries of a site-shaped tensor."""
    moved = values.movedim(unit_dim, 0) if values.ndim > 1 else values.reshape(1, -1)
    return moved[units.to(moved.device)].reshape(len(units), -1).double()


def check_excluded(excluded: set[str], names: Sequence[str]) -> None:
    """Raise ``ValueError`` when a name of ``excluded`` is none of the model's site ``names``."""
    unknown = sorted(excluded - set(names))
    if unknown:
        raise ValueError(f"`exclude` has unknown site names {unknown}; the model's sites are {list(names)}")


def _calibrate(
    model: nn.Module, example_input: Any, plans: list[_Plan], sites: Any
) -> dict[str, tuple[Tensor, Tensor]]:
    """Make the revived units fire on about half of the example input's entries. Each pass observes the model once
    and shifts every site's revived units by what that forward shows; a site reads the sites before it, so the passes
    go on until no unit needs a shift: a chain of ``d`` revived sites settles in about ``d`` passes, ``2 d`` with
    BatchNorm in evaluation mode (its running statistics, set from one pass, normalize the next), and at most that
    many and two more are made. Returns, per site with such units, two masks of its revived units: those whose
    pre-activation is constant on the batch (every unit they read is dead: no shift makes those fire), and, where
    there is no bias to shift, those whose new weights leave them inactive on every entry."""
    silent: dict[str, tuple[Tensor, Tensor]] = {}
    for _ in range(2 * len(plans) + 2):
        seen = observe(model, example_input, keep_values=True, sites=sites)
        settled = True
        for plan in plans:
            settled = _calibrate_site(plan, seen, silent) and settled
        if settled:
            break
    return silent


def _calibrate_site(plan: _Plan, seen: Any, silent: dict[str, tuple[Tensor, Tensor]]) -> bool:
    """One pass of :func:`_calibrate` on one site, from the forward ``seen``; whether its units needed no shift."""
    site = seen.sites.get(plan.site.name)
    pre = seen.pre_activations.get(plan.site.name)
    if site is None or pre is None or not plan.units.numel():
        return True
    settled = True
    batch_norm = next((n for n in plan.site.norms if n.kind == "batch" and n.running_mean is not None), None)
    norm_input = seen.norm_inputs.get(plan.site.name)
    if batch_norm is not None and norm_input is not None and norm_input.shape == pre.shape:
        # eval mode then normalizes the fresh unit as training mode does on this batch
        x = _unit_values(norm_input, site.unit_dim, plan.units)
        mean = x.mean(1)
        var = x.var(1) if x.shape[1] > 1 else torch.ones_like(mean)
        for tensor, value in ((batch_norm.running_mean, mean), (batch_norm.running_var, var)):
            assert tensor is not None
            if not _close_to(tensor, plan.units, value):
                settled = False  # the pre-activation seen was normalized with the statistics before these
            plan.writes.write(tensor, (plan.units.to(tensor.device),), value.to(tensor))
    z = _unit_values(pre, site.unit_dim, plan.units)
    constant = (z.amax(1) - z.amin(1)) <= 1e-6 * z.abs().amax(1).clamp_min(1e-6)
    target = plan.site.shift_bias  # where a unit's pre-activation is shifted
    # with no bias to shift, what the new weights give is final: a unit inactive on every entry stays dead
    stuck = ~constant & ~(z > 0).any(1) if target is None else torch.zeros_like(constant)
    if bool(constant.any()) or bool(stuck.any()):
        silent[plan.site.name] = (constant.cpu(), stuck.cpu())
    else:
        silent.pop(plan.site.name, None)
    if target is not None:
        shift = _threshold(z)
        scale = (z.amax(1) - z.amin(1)).clamp_min(1e-12)
        moving = ~constant & (shift.abs() > 1e-4 * scale)
        if bool(moving.any()):
            settled = False
        if site.scale is not None:  # the bias reaches the pre-activation multiplied by this (`3 * fc(x)`, `-fc(x)`)
            gain = site.scale[plan.units.cpu()].to(shift)
            shift = torch.where(gain != 0, shift / gain, torch.zeros_like(shift))
        index = (plan.units.to(target.device),)
        plan.writes.write(target, index, target[index] - shift.to(target))
    return settled


def _close_to(tensor: Tensor, units: Tensor, value: Tensor) -> bool:
    held = tensor[units.to(tensor.device)].to(value)
    return bool(torch.allclose(held, value, rtol=1e-4, atol=1e-6))


def _threshold(z: Tensor) -> Tensor:
    """Per unit (row of ``z``), the value to subtract from its pre-activation so that it is active on about half of
    its entries, or on more when it has few (a dense layer on a small batch: with ``n`` entries a unit active on a
    share ``p`` of them is dead on a fresh batch of the same size with probability about ``(1 - p) ** n``, kept
    under 1% up to a share of 90%)."""
    n = z.shape[1]
    share = min(0.9, max(0.5, 1.0 - 0.01 ** (1.0 / n)))
    k = math.floor((1.0 - share) * n)  # the k smallest entries end at or below 0
    if k == 0:  # so few entries that every one must be active, with a margin below the smallest
        low, high = z.amin(1), z.amax(1)
        spread = high - low
        # two or three entries say little about one unit's spread (two close entries give a tiny one): the median
        # spread of the site's revived units is a steadier scale, and three of it keep a fresh entry above the
        # threshold with probability about 99.6% (Gaussian entries, two held)
        return low - torch.maximum(0.5 * spread, 3.0 * spread.median())
    return z.kthvalue(k, dim=1).values


def _alive_in_eval(model: nn.Module, example_input: Any, sites: Any) -> dict[str, Tensor]:
    """Per site reached, the units with an entry > 0 on the example input in evaluation mode."""
    was_training = model.training
    try:
        model.eval()
        seen = observe(model, example_input, keep_values=True, sites=sites)
    finally:
        model.train(was_training)
    alive = {}
    for name, pre in seen.pre_activations.items():
        site = seen.sites[name]
        units = torch.arange(site.num_units)
        alive[name] = (_unit_values(pre, site.unit_dim, units) > 0).any(1)
    return alive


def _eval_output(model: nn.Module, example_input: Any) -> list[Tensor]:
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), preserved_state(model):
            output = call_model(model, example_input)
        tensors = output.to_tuple() if hasattr(output, "to_tuple") else output
        return [t.detach().clone() for t in _tensors(tensors) if t.is_floating_point()]
    finally:
        model.train(was_training)


def _same(after: list[Tensor], before: list[Tensor], rtol: float) -> bool:
    if len(after) != len(before):
        return False
    for a, b in zip(after, before, strict=True):
        if a.shape != b.shape:
            return False
        scale = b.abs().max().item() if b.numel() else 0.0
        if not torch.allclose(a, b, rtol=rtol, atol=rtol * max(scale, 1e-30), equal_nan=True):
            return False
    return True


def _keep_what_preserves(
    model: nn.Module,
    example_input: Any,
    plans: list[_Plan],
    reference: list[Tensor],
    rtol: float,
    skipped: dict[str, str],
) -> None:
    """Roll back the sites whose surgery changes the output (one site at a time, in forward order)."""
    if _same(_eval_output(model, example_input), reference, rtol):
        return
    with torch.no_grad():
        for plan in reversed(plans):
            plan.writes.undo()
        for plan in plans:
            if not plan.units.numel():
                continue
            with torch.no_grad():
                plan.writes.redo()
            if not _same(_eval_output(model, example_input), reference, rtol):
                with torch.no_grad():
                    plan.writes.undo()
                skipped[plan.site.name] = (
                    "its surgery changed the model's output on the example input (a path around the rectifier or "
                    "an unseen reader of its output): rolled back"
                )
                plan.units = plan.units[:0]


# Per-parameter state that a fresh optimizer does not start at zero: (optimizer type, state key) -> the
# param-group option holding its starting value.
_FRESH_STATE: tuple[tuple[type[Optimizer], str, str], ...] = (
    (torch.optim.Rprop, "step_size", "lr"),
    (torch.optim.Adagrad, "sum", "initial_accumulator_value"),
)


def reset_optimizer_state(optimizer: Optimizer, touched: Mapping[Tensor, Tensor]) -> None:
    """Set the optimizer state of every touched entry back to what a fresh optimizer starts it at."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            mask = touched.get(param)
            state = optimizer.state.get(param)
            if mask is None or not state:
                continue
            for key, value in state.items():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    fresh: Any = 0
                    for kind, state_key, option in _FRESH_STATE:
                        if isinstance(optimizer, kind) and key == state_key and option in group:
                            fresh = group[option]
                    value.masked_fill_(mask.to(value.device), fresh)
