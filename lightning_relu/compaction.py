r"""Compaction: a new, smaller model with the dead units removed and the same output.

A dead unit's output is 0 on every entry the report saw, so everything that only computes it (its producer's row
or output channel, its bias, its norm entries) and everything that only reads it (its consumers' input columns or
channels) can go: the consumers' outputs do not change, because a zero input contributes nothing to a weighted sum
(a consumer's own bias and any norm after it are untouched). :func:`compact` does this surgery on a deep copy of the
model, site by site, through the structure observed on one real forward (:func:`lightning_relu.structure.observe`):

- **producer**: the unit's row (``Linear.out_features``) or output channel (``ConvNd.out_channels``) and its bias;
- **norms** between producer and site: BatchNorm/InstanceNorm entries (affine parameters and running statistics);
  GroupNorm only where whole groups are dead (its statistics are per group); never a LayerNorm (its statistics mix
  every unit: a dead unit's *pre-norm* value enters the others' normalization);
- **consumers**, through the exact unit maps (flatten, view, permute, ``cat``/``split``, pooling, dropout):
  ``Linear.in_features`` columns, ``ConvNd.in_channels``; a grouped or depthwise convolution loses whole groups
  only (its input channels of the group *and* its output channels, the latter being dead units of the next site),
  so that every group keeps the same width.

Where a removal cannot keep the output the units stay and the result says why, per site: no single producer,
a reader that is not an affine layer (a residual ``add`` of the site's output, a norm, the model's output), a layer
shared with another part of the forward, a computed weight, a grouped convolution whose group would be split, a
unit active on the example input in evaluation mode. Finally the compacted model's output is compared with the
original's on the example input in evaluation mode (relative tolerance ``rtol``); when it differs (or the
compacted forward fails, as where a hard-coded shape or a gate of the full width meets the narrower tensor) the
sites are taken back one at a time, in forward order, keeping each whose removal keeps the output.

**Dead on the data seen, or dead on every input.** A report's dead units were 0 on the data it measured; on other
inputs they may fire, and there the compacted model differs from the original. With ``certify=(low, high)`` a unit
is removed only where interval bound propagation (IBP) from the input box ``low <= x <= high`` through the layers
before the site (evaluation mode: BatchNorm with its running statistics) proves its pre-activation ``<= 0`` for
every input in the box: then the compacted model equals the original on the whole box (up to rounding). The bounds
are sound but loose (they grow with depth), so fewer units are certified than the data shows dead, and an operation
the propagation does not cover (attention, LayerNorm, a product of two computed tensors) leaves every site after it
uncertified.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from typing_extensions import override

from lightning_relu._compat import CONV_TYPES
from lightning_relu.functional import counting
from lightning_relu.observation import (
    _CAST_OPS,
    _MOVE_OPS,
    _POOL_OPS,
    ModuleCall,
    TrainingInputWatch,
    WriteLog,
    _op_name,
    _tensors,
    split_by_call,
    written_tensors,
)
from lightning_relu.site import module_names, unknown_names
from lightning_relu.structure import SiteStructure, Structure, observe
from lightning_relu.surgery import _eval_output, _same, _unit_values

__all__ = [
    "CHECKPOINT_KEY",
    "CompactOnFitEnd",
    "Compaction",
    "SiteCompaction",
    "certified_dead",
    "compact",
    "layer_widths",
    "resize_like_",
]


@dataclass(frozen=True)
class SiteCompaction:
    """What :func:`compact` did at one site.

    Attributes:
        name: the site's name.
        units: its number of units before.
        dead: units marked dead (by the report; in certified mode, dead in the report and certified).
        removed: units removed.
        reason: why ``dead - removed`` dead units stay (``None`` when every dead unit was removed).
    """

    name: str
    units: int
    dead: int
    removed: int
    reason: str | None = None

    @property
    def kept(self) -> int:
        """Dead units that stay in the model."""
        return self.dead - self.removed


class Compaction(NamedTuple):
    """The result of :func:`compact`: the new model and, per site of the report, what was removed and why not.

    Unpacks as ``model, sites = compact(...)``.
    """

    model: nn.Module
    sites: dict[str, SiteCompaction]

    @property
    def removed(self) -> int:
        return sum(site.removed for site in self.sites.values())

    def table(self) -> str:
        """A printable table: per site its units, dead units, removed units and the reason for the others."""
        rows = [("site", "units", "dead", "removed", "why dead units stay")]
        for site in self.sites.values():
            rows.append((site.name, str(site.units), str(site.dead), str(site.removed), site.reason or "-"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def compact(
    model: nn.Module,
    report: Any,
    example_input: Any,
    *,
    certify: tuple[Any, Any] | None = None,
    rtol: float = 1e-5,
) -> Compaction:
    r"""A new model with the dead units of ``report`` removed; ``model`` itself is not changed.

    See the module's documentation for what is removed, what is refused and why, and the certified mode.

    Args:
        model: the network the report was measured on.
        report: per-site reports keyed by site name (:meth:`~lightning_relu.DeadUnitTracker.report`,
            ``DeadUnitMonitor.last_report`` or an ``EpochReport``; only their ``dead`` masks are read; a bool
            tensor per site works too). ``None`` with ``certify``: every certified unit is a candidate.
        example_input: what the model's forward takes (as for :func:`~lightning_relu.structure.observe`): the
            structure is observed on it and the compacted model's output is checked against the original's on it,
            in evaluation mode.
        certify: ``(low, high)``, an input box (tensors broadcastable to ``example_input``, or numbers): a unit is
            removed only if interval bound propagation proves its pre-activation ``<= 0`` for every input in the box.
        rtol: relative tolerance of the output check (on the largest absolute output).

    Returns:
        ``Compaction(model, sites)``: the compacted copy, in the mode ``model`` was in, and a
        :class:`SiteCompaction` per site of the report.

    Raises:
        ValueError: a site of the report that the model does not have, or with another number of units (nothing
            is changed), or a bad argument.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_relu import DeadUnitTracker
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> with torch.no_grad():
        ...     net[0].bias[:3] = -100.0  # three dead units
        >>> x = torch.randn(64, 4)
        >>> with DeadUnitTracker(net) as tracker, torch.no_grad():
        ...     before = net(x)
        >>> small, sites = compact(net, tracker.report(), x)
        >>> small[0], small[2]
        (Linear(in_features=4, out_features=5, bias=True), Linear(in_features=5, out_features=1, bias=True))
        >>> torch.allclose(small(x), before, rtol=1e-5, atol=1e-6)
        True
    """
    masks, box = _check_compact_args(model, report, example_input, certify, rtol)
    reference = copy.deepcopy(model).eval()
    structure = observe(reference, example_input, keep_values=True)
    if masks is not None:
        _validate(masks, structure, model)
    found = _candidates(reference, structure, masks, box, _called(example_input))
    planner = _Planner(reference, structure)
    wanted = _wanted(structure, found)

    # what the structure allows, then what keeps the output
    plan = planner.plan(wanted, found.reasons)
    result_model, accepted = _keep_output(reference, planner, plan, example_input, rtol, found.reasons)
    result_model.train(model.training)
    return Compaction(result_model, _site_compactions(structure, found, accepted))


def _check_compact_args(
    model: Any, report: Any, example_input: Any, certify: Any, rtol: Any
) -> tuple[dict[str, Tensor] | None, tuple[Tensor, Tensor] | None]:
    """Refuse bad arguments of :func:`compact`; returns the report's dead masks and the certified box (or None)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a `torch.nn.Module`, got {type(model).__name__}")
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not (rtol > 0 and math.isfinite(rtol)):
        raise ValueError(f"`rtol` must be a positive number, got {rtol!r}")
    if report is None and certify is None:
        raise ValueError(
            "`report` is None: pass a report of dead units, or `certify=(low, high)` to remove the "
            "units certified dead on an input box"
        )
    masks = _masks(report) if report is not None else None
    box = _box(certify, example_input) if certify is not None else None
    return masks, box


@dataclass(eq=False)
class _Candidates:
    """What :func:`compact` may remove, per site of the report (of the structure, when only certifying): the dead
    units (and certified, with a box), the certification's notes, and the reasons collected for what stays."""

    masks: dict[str, Tensor]
    certifying: bool
    certify_notes: dict[str, str]
    reasons: dict[str, list[str]]


def _candidates(
    reference: nn.Module,
    structure: Structure,
    masks: dict[str, Tensor] | None,
    box: tuple[Tensor, Tensor] | None,
    module: str = "",
) -> _Candidates:
    """Per site, the units the report calls dead, and with a box (over the input of ``module``, the one the example
    calls) only those also certified dead on it."""
    certified: dict[str, Tensor] = {}
    certify_notes: dict[str, str] = {}
    if box is not None:
        certified, certify_notes = certified_dead(reference, box, structure, module)
    candidates: dict[str, Tensor] = {}
    names = list(masks) if masks is not None else list(structure.sites)
    for name in names:
        site = structure.sites.get(name)
        if site is None:
            mask = masks[name].reshape(-1) if masks is not None else torch.zeros(0, dtype=torch.bool)
            candidates[name] = mask.cpu()
            continue
        mask = masks[name].reshape(-1).cpu() if masks is not None else torch.ones(site.num_units, dtype=torch.bool)
        if box is not None:
            mask = mask & certified.get(name, torch.zeros(site.num_units, dtype=torch.bool))
        candidates[name] = mask
    return _Candidates(candidates, box is not None, certify_notes, {name: [] for name in candidates})


def _wanted(structure: Structure, found: _Candidates) -> dict[str, Tensor]:
    """The candidate units that the site itself lets go (before the layers are planned together)."""
    reasons = found.reasons
    wanted: dict[str, Tensor] = {}
    for name, mask in found.masks.items():
        units = torch.nonzero(mask).reshape(-1)
        if units.numel() == 0:
            if found.certifying and name in found.certify_notes:
                reasons[name].append(found.certify_notes[name])
            continue
        site = structure.sites.get(name)
        if site is None:
            reasons[name].append("the forward on the example input does not reach it")
            continue
        why = _refusal(site)
        if why is not None:
            reasons[name].append(why)
            continue
        pre = structure.pre_activations.get(name)
        if pre is not None:
            firing = (_unit_values(pre, site.unit_dim, units) > 0).any(1)
            if bool(firing.any()):
                reasons[name].append(
                    f"{int(firing.sum())} of its dead units are active on the example input in evaluation mode"
                )
                units = units[~firing]
        if units.numel() == site.num_units:
            reasons[name].append("every unit is dead (a collapsed site): one is kept so that the layers keep a width")
            units = units[1:]
        if units.numel():
            wanted[name] = units
    return wanted


def _keep_output(
    reference: nn.Module,
    planner: _Planner,
    plan: dict[str, Tensor],
    example_input: Any,
    rtol: float,
    reasons: dict[str, list[str]],
) -> tuple[nn.Module, dict[str, Tensor]]:
    """The model built from ``plan`` when it keeps the output; else, site by site in forward order, the sites whose
    removal keeps it. Returns the model and the units it removed."""
    expected = _eval_output(reference, example_input)
    accepted = plan
    result_model, _ = _build_checked(reference, planner, accepted, example_input, expected, rtol)
    if result_model is None:
        accepted = {}
        for name in [n for n in planner.structure.sites if n in plan]:
            trial = planner.plan({**accepted, name: plan[name]}, {})
            trial_model, trial_failure = _build_checked(reference, planner, trial, example_input, expected, rtol)
            if trial_model is None:
                reasons[name].append(f"removing its dead units {trial_failure}: they stay")
                continue
            accepted = {**accepted, name: plan[name]}
            result_model = trial_model
        if result_model is None:
            result_model = copy.deepcopy(reference)
        accepted = planner.plan(accepted, {})
    return result_model, accepted


def _site_compactions(
    structure: Structure, found: _Candidates, accepted: dict[str, Tensor]
) -> dict[str, SiteCompaction]:
    """A :class:`SiteCompaction` per candidate site: units, dead, removed, and why the others stay."""
    sites: dict[str, SiteCompaction] = {}
    for name, mask in found.masks.items():
        num_units = structure.sites[name].num_units if name in structure.sites else int(mask.numel())
        removed = int(accepted[name].numel()) if name in accepted else 0
        dead = int(mask.sum())
        why = "; ".join(dict.fromkeys(found.reasons[name])) or None
        if removed == dead and not (found.certifying and name in found.certify_notes and removed == 0):
            why = None
        elif why is None:
            why = "kept so that the units removed at other sites keep the output"
        sites[name] = SiteCompaction(name, num_units, dead, removed, why)
    return sites


# ------------------------------------------------------------------------------------------------ validation
def _masks(report: Any) -> dict[str, Tensor]:
    layers = getattr(report, "layers", report)
    if not isinstance(layers, Mapping):
        raise ValueError(
            f"`report` must map site names to `LayerReport`s (or be an `EpochReport`), got {type(report).__name__}"
        )
    masks = {}
    for name, layer in layers.items():
        dead = layer if isinstance(layer, Tensor) else getattr(layer, "dead", None)
        if not isinstance(dead, Tensor) or dead.dtype != torch.bool or dead.ndim != 1:
            raise ValueError(
                f"The report of site {name!r} must be a `LayerReport` with a 1-D bool `dead` mask (or such a mask), "
                f"got {type(layer).__name__}"
            )
        masks[str(name)] = dead.detach().cpu()
    return masks


def _validate(masks: dict[str, Tensor], structure: Structure, model: nn.Module) -> None:
    # a functional call or later call position the observed forward did not reach (an auxiliary head that runs in
    # training only) is the model's all the same: its units stay, as for any site the forward does not reach
    given = [name for name in masks if name not in structure.known]
    unknown = unknown_names(given, list(structure.found), module_names(model), model)
    if unknown:
        raise ValueError(
            f"The report has site {unknown[0]!r} that the model does not have (the model's sites are "
            f"{list(structure.known)}). Was the report measured on another model?"
        )
    for name, mask in masks.items():
        site = structure.sites.get(name)
        if site is not None and mask.numel() != site.num_units:
            raise ValueError(
                f"The report of site {name!r} has {mask.numel()} units but the model's site {name!r} has "
                f"{site.num_units}. Was the report measured on another model?"
            )


def _called(example_input: Any) -> str:
    """The module path an example calls ("" for the model)."""
    return example_input.module if isinstance(example_input, ModuleCall) else ""


def _box(certify: Any, example_input: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(certify, (tuple, list)) or len(certify) != 2:
        raise ValueError(f"`certify` must be a pair `(low, high)`, got {certify!r}")
    if isinstance(example_input, ModuleCall) and len(example_input.args) == 1 and not example_input.kwargs:
        example_input = example_input.args[0]  # a call with one input, as a training step makes (`self.net(x)`)
    if not isinstance(example_input, Tensor) or not example_input.is_floating_point():
        raise ValueError(
            "`certify` needs a floating-point tensor `example_input` (the box is over the model's one input), got "
            f"{type(example_input).__name__}"
        )
    try:
        low, high = (
            torch.as_tensor(v, dtype=example_input.dtype, device=example_input.device).expand(example_input.shape)
            for v in certify
        )
    except RuntimeError as error:
        raise ValueError(
            f"`certify` bounds must broadcast to the example input's shape {tuple(example_input.shape)}: {error}"
        ) from error
    if not bool((low <= high).all()):
        raise ValueError("`certify` must have `low <= high` everywhere, got a box with low > high")
    if not bool(torch.isfinite(low).all() and torch.isfinite(high).all()):
        raise ValueError("`certify` bounds must be finite")
    return low.clone(), high.clone()


def _refusal(site: SiteStructure) -> str | None:
    """Why the structure forbids removing any unit of the site (``None``: it allows it)."""
    if site.producer is None:
        return f"no producer: {site.producer_problem}"
    if site.reader_problems:
        return "; ".join(site.reader_problems)
    if site.producer.weight.computed:
        return "its producer computes its weight from a parameter (weight standardisation): its rows cannot be cut"
    if any(norm.kind == "layer" for norm in site.norms):
        return "a LayerNorm normalizes its units together: a dead unit's pre-norm value enters the others' statistics"
    return None


# ------------------------------------------------------------------------------------------------ planning
@dataclass(eq=False)
class _Affine:
    """One Linear/ConvNd to cut: rows (output side) and columns/channels (input side), by parameter name."""

    module: str
    weight: str
    kind: str
    groups: int
    bias: str | None = None
    rows: set[int] | None = None
    columns: set[int] | None = None


@dataclass(eq=False)
class _Cut:
    """The edits of one build: per Linear/ConvNd its cuts, per norm module the channels, per grouped conv the
    groups removed."""

    affine: dict[str, _Affine]
    norms: dict[str, set[int]]
    groups: dict[str, set[int]]
    #: per norm module, the channels removed (a norm without per-channel tensors only changes its width)
    norm_modules: dict[str, set[int]] = field(default_factory=dict)


class _Blocked:
    """The units that cannot go, per site, with the first reason found for each site."""

    def __init__(self) -> None:
        self.units: dict[str, tuple[Tensor, str]] = {}

    def block(self, name: str, units: Tensor, why: str) -> None:
        if units.numel() == 0:
            return
        previous = self.units.get(name)
        merged = units if previous is None else torch.cat([previous[0], units]).unique()
        self.units[name] = (merged, why if previous is None else previous[1])

    def within(self, current: dict[str, Tensor]) -> dict[str, tuple[Tensor, str]]:
        """The blocked units that ``current`` still removes, per site that has any."""
        return {
            name: (units[torch.isin(units, current[name])], why)
            for name, (units, why) in self.units.items()
            if bool(torch.isin(units, current[name]).any())
        }


@dataclass(eq=False)
class _GroupedCuts:
    """Per grouped convolution (by weight name), the channels removed on each side, with the sites they come from."""

    rows: dict[str, tuple[int, int, set[int]]] = field(default_factory=dict)  # weight name -> (groups, out, rows)
    columns: dict[str, set[int]] = field(default_factory=dict)
    origin_rows: dict[str, str] = field(default_factory=dict)
    origin_columns: dict[str, list[tuple[str, Tensor, Tensor]]] = field(default_factory=dict)

    def record(self, name: str, site: SiteStructure, units: Tensor, names: dict[int, str]) -> None:
        """The rows of the site's producer and the columns of its consumers that removing ``units`` takes."""
        producer = site.producer
        assert producer is not None
        weight_name = names[id(producer.weight.parameter)]
        if producer.groups > 1:
            out = producer.weight.parameter.shape[0]
            self.rows[weight_name] = (producer.groups, out, set(units.tolist()))
            self.origin_rows[weight_name] = name
        for consumer in site.consumers:
            picked = torch.isin(consumer.units, units)
            if consumer.groups > 1 and bool(picked.any()):
                cname = names[id(consumer.weight.parameter)]
                self.columns.setdefault(cname, set()).update(consumer.columns[picked].tolist())
                self.origin_columns.setdefault(cname, []).append((name, consumer.columns, consumer.units))


class _Planner:
    def __init__(self, reference: nn.Module, structure: Structure) -> None:
        self.reference = reference
        self.structure = structure
        self.names: dict[int, str] = {}
        for name, tensor in [
            *reference.named_parameters(remove_duplicate=False),
            *reference.named_buffers(remove_duplicate=False),
        ]:
            self.names.setdefault(id(tensor), name)

    def plan(self, wanted: dict[str, Tensor], reasons: dict[str, list[str]]) -> dict[str, Tensor]:
        """The units of ``wanted`` that the layers allow to remove together (grouped convolutions lose whole
        groups; GroupNorm whole groups); the others are taken out with a reason, until nothing changes."""
        current = {name: units.clone() for name, units in wanted.items()}
        for _ in range(64):
            blocked = self._blocked(current)
            if not blocked:
                break
            for name, (units, why) in blocked.items():
                keep = ~torch.isin(current[name], units)
                current[name] = current[name][keep]
                if name in reasons:
                    reasons[name].append(why)
        return {name: units for name, units in current.items() if units.numel()}

    def _blocked(self, current: dict[str, Tensor]) -> dict[str, tuple[Tensor, str]]:
        """Units that cannot go: a GroupNorm group or a convolution group would be split."""
        blocked = _Blocked()
        cuts = _GroupedCuts()
        for name, units in current.items():
            site = self.structure.sites[name]
            assert site.producer is not None
            self._block_group_norms(name, site, units, blocked)
            cuts.record(name, site, units, self.names)
        self._block_split_groups(cuts, blocked)
        return blocked.within(current)

    def _block_group_norms(self, name: str, site: SiteStructure, units: Tensor, blocked: _Blocked) -> None:
        """Block the units whose removal would leave part of a GroupNorm group (all of them, when it cannot be cut)."""
        for norm in site.norms:
            if norm.kind == "group" and norm.mixes_units:
                groups = self._group_norm_groups(norm)
                if groups is None:
                    blocked.block(name, units, f"its GroupNorm `{norm.name}` cannot be cut")
                    continue
                per = site.num_units // groups
                chosen = torch.zeros(site.num_units, dtype=torch.bool)
                chosen[units] = True
                whole = chosen.reshape(groups, per).all(1).repeat_interleave(per)
                blocked.block(name, units[~whole[units]], f"its GroupNorm `{norm.name}` would lose part of a group")

    def _block_split_groups(self, cuts: _GroupedCuts, blocked: _Blocked) -> None:
        """Block the rows and columns of grouped convolutions that would leave part of a group."""
        grouped = {
            self.names[id(c.weight.parameter)]: c
            for s in self.structure.sites.values()
            for c in s.consumers
            if c.groups > 1
        }
        producers = {
            self.names[id(s.producer.weight.parameter)]: s.producer
            for s in self.structure.sites.values()
            if s.producer is not None and s.producer.groups > 1
        }
        rows, columns = cuts.rows, cuts.columns
        for weight_name in set(rows) | set(columns):
            parameter = (
                grouped[weight_name].weight.parameter
                if weight_name in grouped
                else producers[weight_name].weight.parameter
            )
            groups = grouped[weight_name].groups if weight_name in grouped else producers[weight_name].groups
            out_per = parameter.shape[0] // groups
            in_per = parameter.shape[1]
            removed_rows = rows.get(weight_name, (groups, 0, set()))[2]
            removed_columns = columns.get(weight_name, set())
            whole_groups = {
                g
                for g in range(groups)
                if all(r in removed_rows for r in range(g * out_per, (g + 1) * out_per))
                and all(c in removed_columns for c in range(g * in_per, (g + 1) * in_per))
            }
            why = f"the grouped convolution `{weight_name.rsplit('.', 1)[0]}` would lose part of a group"
            bad_rows = sorted(r for r in removed_rows if r // out_per not in whole_groups)
            if bad_rows and weight_name in cuts.origin_rows:
                blocked.block(cuts.origin_rows[weight_name], torch.tensor(bad_rows, dtype=torch.long), why)
            bad_columns = torch.tensor(
                sorted(c for c in removed_columns if c // in_per not in whole_groups), dtype=torch.long
            )
            if bad_columns.numel():
                for site_name, site_columns, site_units in cuts.origin_columns.get(weight_name, []):
                    hit = torch.isin(site_columns, bad_columns)
                    if bool(hit.any()):
                        blocked.block(site_name, site_units[hit].unique(), why)

    def _group_norm_groups(self, norm: Any) -> int | None:
        try:
            module = self.reference.get_submodule(norm.name)
        except AttributeError:
            return None
        return int(module.num_groups) if isinstance(module, nn.GroupNorm) else None

    def cut(self, plan: dict[str, Tensor]) -> _Cut:
        affine: dict[str, _Affine] = {}
        norms: dict[str, set[int]] = {}
        groups: dict[str, set[int]] = {}
        norm_modules: dict[str, set[int]] = {}

        def entry(ref: Any, kind: str, groups_: int) -> _Affine:
            name = self.names[id(ref.parameter)]
            if name not in affine:
                affine[name] = _Affine(ref.module_name, name, kind, groups_)
            return affine[name]

        for name, units in plan.items():
            site = self.structure.sites[name]
            producer = site.producer
            assert producer is not None
            chosen = set(units.tolist())
            item = entry(producer.weight, producer.kind, producer.groups)
            item.rows = (item.rows or set()) | chosen
            if producer.bias is not None:
                item.bias = self.names[id(producer.bias.parameter)]
            for norm in site.norms:
                norm_modules.setdefault(norm.name, set()).update(chosen)
                for tensor in (norm.weight, norm.bias, norm.running_mean, norm.running_var):
                    if tensor is not None:
                        norms.setdefault(self.names[id(tensor)], set()).update(chosen)
            for consumer in site.consumers:
                picked = torch.isin(consumer.units, units)
                if bool(picked.any()):
                    item = entry(consumer.weight, consumer.kind, consumer.groups)
                    item.columns = (item.columns or set()) | set(consumer.columns[picked].tolist())
        for name, item in affine.items():
            if item.groups > 1:
                parameter = self.reference.get_parameter(name)
                out_per = parameter.shape[0] // item.groups
                if item.rows:
                    groups[name] = {r // out_per for r in item.rows}
                elif item.columns:
                    groups[name] = {c // parameter.shape[1] for c in item.columns}
        return _Cut(affine, norms, groups, norm_modules)


# ------------------------------------------------------------------------------------------------ building
def _keep(size: int, removed: set[int] | None) -> Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    if removed:
        mask[sorted(removed)] = False
    return torch.nonzero(mask).reshape(-1)


def _set(model: nn.Module, name: str, value: Tensor) -> None:
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, attribute)
    if isinstance(old, nn.Parameter):
        setattr(module, attribute, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))
    else:
        setattr(module, attribute, value.detach().clone())  # a buffer stays one, persistent or not


def _set_norm_width(module: nn.Module, width: int) -> None:
    """Set a norm module's width attributes to ``width`` channels (GroupNorm keeps its channels per group)."""
    if isinstance(module, nn.GroupNorm):
        per = module.num_channels // module.num_groups
        module.num_channels, module.num_groups = width, width // per
    elif hasattr(module, "num_features"):
        cast(Any, module).num_features = width


def _apply(model: nn.Module, cut: _Cut) -> None:
    """Cut ``model`` (a copy with the reference's names) as ``cut`` says."""
    with torch.no_grad():
        for name, item in cut.affine.items():
            weight = model.get_parameter(name)
            module = model.get_submodule(item.module)
            if item.groups > 1:
                gone = cut.groups.get(name, set())
                kept_groups = [g for g in range(item.groups) if g not in gone]
                out_per = weight.shape[0] // item.groups
                rows = torch.tensor([g * out_per + i for g in kept_groups for i in range(out_per)], dtype=torch.long)
                new = weight[rows.to(weight.device)]
                _set(model, name, new)
                if item.bias is not None:
                    bias = model.get_parameter(item.bias)
                    _set(model, item.bias, bias[rows.to(bias.device)])
                if isinstance(module, CONV_TYPES):
                    module.groups = len(kept_groups)
                    module.out_channels = new.shape[0]
                    module.in_channels = weight.shape[1] * len(kept_groups)
                continue
            rows = _keep(weight.shape[0], item.rows)
            columns = _keep(weight.shape[1], item.columns)
            new = weight[rows.to(weight.device)][:, columns.to(weight.device)]
            _set(model, name, new)
            if item.bias is not None and item.rows:
                bias = model.get_parameter(item.bias)
                _set(model, item.bias, bias[rows.to(bias.device)])
            if isinstance(module, nn.Linear):
                module.out_features, module.in_features = new.shape[0], new.shape[1]
            elif isinstance(module, CONV_TYPES):
                module.out_channels, module.in_channels = new.shape[0], new.shape[1]
        touched: set[str] = set()
        for name, channels in cut.norms.items():
            tensor = _get(model, name)
            keep = _keep(tensor.shape[0], channels)
            _set(model, name, tensor[keep.to(tensor.device)])
            touched.add(name.rpartition(".")[0])
        for module_name in touched:
            module = model.get_submodule(module_name)
            width = next(
                (
                    t.shape[0]
                    for n, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
                    if t.ndim == 1
                ),
                None,
            )
            if width is None:
                continue
            _set_norm_width(module, width)
        for module_name, channels in cut.norm_modules.items():
            if module_name not in touched:  # no per-channel tensor to cut: its width alone follows the producer's
                module = model.get_submodule(module_name)
                width = getattr(module, "num_channels", getattr(module, "num_features", None))
                if isinstance(width, int):
                    _set_norm_width(module, width - len(channels))


def _get(model: nn.Module, name: str) -> Tensor:
    module_name, _, attribute = name.rpartition(".")
    tensor: Tensor = getattr(model.get_submodule(module_name), attribute)
    return tensor


def _build_checked(
    reference: nn.Module,
    planner: _Planner,
    plan: dict[str, Tensor],
    example_input: Any,
    expected: list[Tensor],
    rtol: float,
) -> tuple[nn.Module | None, str]:
    """A copy of ``reference`` cut by ``plan`` if its eval output equals ``expected``, else ``(None, why)``."""
    candidate = copy.deepcopy(reference)
    if not plan:
        return candidate, ""
    try:
        _apply(candidate, planner.cut(plan))
        output = _eval_output(candidate, example_input)
    except Exception as error:  # a layer that does not take the narrower tensor: the removal is refused
        first = str(error).splitlines()[0] if str(error) else ""
        return None, f"makes the forward fail ({type(error).__name__}: {first[:160]})"
    if not _same(output, expected, rtol):
        return None, "changes the output on the example input in evaluation mode (a reader the structure cannot see)"
    return candidate, ""


# ------------------------------------------------------------------------------------------------ certification
_MONOTONE = (
    _MOVE_OPS | _CAST_OPS | {op for op in _POOL_OPS if "with_indices" not in op and not op.startswith("_")}
    | {
        "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "clamp", "clamp_", "clamp_min", "clamp_min_", "leaky_relu",
        "leaky_relu_", "sigmoid", "tanh", "elu", "add", "__add__", "__radd__", "__iadd__", "add_", "sum", "mean",
        "amax", "amin", "pad", "dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout", "identity",
    }
)  # fmt: skip
_SUB = {"sub", "sub_", "__sub__", "__isub__", "__rsub__"}
_MUL = {"mul", "mul_", "__mul__", "__rmul__", "__imul__"}
_DIV = {"div", "div_", "__truediv__", "__itruediv__", "__div__"}


class _Intervals(TorchFunctionMode):
    """Interval bounds of every tensor computed from the input box, next to the real forward (run on the box's
    centre, for the shapes and the model's control flow)."""

    def __init__(self, data: Tensor, low: Tensor, high: Tensor) -> None:
        super().__init__()
        self.bounds: dict[int, tuple[Tensor, Tensor] | None] = {id(data): (low, high)}
        self.keep: list[Tensor] = [data]
        self.unsupported: dict[str, None] = {}
        self.writes = WriteLog()
        self.step = 0  # operations seen: when each bound was set, when each write happened
        self.set_at: dict[int, int] = {id(data): 0}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if counting():
            return func(*args, **kwargs)
        self.step += 1
        step = self.step
        inputs = list(_tensors((args, kwargs)))
        data = [t for t in inputs if id(t) in self.bounds]
        op = _op_name(func)
        written = written_tensors(op, args, kwargs, func)
        if not data:
            out = func(*args, **kwargs)
            for tensor in written:  # constants written into a tensor with bounds: its values are not those bounds
                if id(tensor) in self.bounds:
                    self.bounds[id(tensor)], self.set_at[id(tensor)] = None, step
            return out
        for tensor in data:  # written in place through another view since its bounds were set: not known any more
            if self.bounds[id(tensor)] is not None:
                writer = self.writes.between(tensor, self.set_at.get(id(tensor), 0), step)
                if writer is not None:
                    self.bounds[id(tensor)] = None
                    self.unsupported.setdefault(f"{writer} through another view", None)
        known = [self.bounds[id(t)] for t in data]
        bounds: list[tuple[Tensor, Tensor]] | None = None
        # a write into `out=` or into a tensor without bounds (a buffer the forward made): the bounds of what is
        # written are not computed (the two sides would write into the same tensor, or into the real one)
        unbounded_write = "out" in kwargs or any(id(t) not in self.bounds for t in written)
        if not unbounded_write and all(b is not None for b in known) and all(t.is_floating_point() for t in data):
            try:
                bounds = self._propagate(op, func, args, kwargs)
            except (RuntimeError, TypeError, ValueError, IndexError, KeyError):
                bounds = None
        out = func(*args, **kwargs)
        outputs = list(_tensors(out)) if isinstance(out, (Tensor, tuple, list)) else []
        if bounds is None and (outputs or written):
            self.unsupported.setdefault(op, None)
        if written:
            self.writes.add(step, written, op)
        for position, tensor in enumerate(outputs):
            self.bounds[id(tensor)] = bounds[position] if bounds is not None and position < len(bounds) else None
            self.set_at[id(tensor)] = step
        for tensor in written:  # written from bounded inputs without bounds of its own (`__setitem__` into a buffer)
            if not any(tensor is output for output in outputs):
                self.bounds[id(tensor)], self.set_at[id(tensor)] = None, step
        self.keep.extend(inputs)
        self.keep.extend(outputs)
        return out

    def _value(self, value: Any, side: int, inplace: bool) -> Any:
        if isinstance(value, Tensor) and id(value) in self.bounds:
            bound = self.bounds[id(value)]
            assert bound is not None
            return bound[side].clone() if inplace else bound[side]
        if isinstance(value, (list, tuple)):
            return type(value)(self._value(v, side, inplace) for v in value)
        return value

    def _side(self, func: Any, args: Any, kwargs: Any, side: int, inplace: bool) -> list[Tensor]:
        out = func(*self._value(args, side, inplace), **{k: self._value(v, side, inplace) for k, v in kwargs.items()})
        return list(_tensors(out))

    def _interval(self, value: Any) -> tuple[Any, Any]:
        if isinstance(value, Tensor) and id(value) in self.bounds:
            bound = self.bounds[id(value)]
            assert bound is not None
            return bound
        return value, value

    def _propagate(self, op: str, func: Any, args: Any, kwargs: Any) -> list[tuple[Tensor, Tensor]] | None:
        inplace = (op.endswith("_") and not op.endswith("__")) or op.startswith("__i")
        if op in ("linear", "conv1d", "conv2d", "conv3d"):
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            if id(weight) in self.bounds or id(x) not in self.bounds:
                return None
            low, high = self._interval(x)
            centre, radius = (low + high) / 2, (high - low) / 2
            rest = list(args[2:])
            kw = dict(kwargs)
            kw.pop("weight", None)
            mid = func(centre, weight, *rest, **kw)
            if rest:
                rest[0] = None
            else:
                kw["bias"] = None
            spread = func(radius, weight.abs(), *rest, **kw)
            return [(mid - spread, mid + spread)]
        if op == "batch_norm":
            x = args[0]
            training = args[5] if len(args) > 5 else kwargs.get("training", False)
            if training or id(x) not in self.bounds:
                return None
            running_var = args[2] if len(args) > 2 else kwargs["running_var"]
            weight = args[3] if len(args) > 3 else kwargs.get("weight")
            eps = args[7] if len(args) > 7 else kwargs.get("eps", 1e-5)
            low, high = self._interval(x)
            centre, radius = (low + high) / 2, (high - low) / 2
            mid = func(centre, *args[1:], **kwargs)
            scale = 1.0 / torch.sqrt(running_var + eps)
            if weight is not None:
                scale = scale * weight
            shape = [1] * x.ndim
            shape[1] = -1
            spread = radius * scale.abs().reshape(shape)
            return [(mid - spread, mid + spread)]
        if kwargs.get("alpha", 1) != 1:  # add/sub with a scaled second operand
            return None
        if op in _MONOTONE:
            if op.startswith("dropout") or op == "feature_dropout":
                training = args[2] if len(args) > 2 else kwargs.get("training", True)
                if training:
                    return None
            lows = self._side(func, args, kwargs, 0, inplace)
            highs = self._side(func, args, kwargs, 1, inplace)
            if any(not t.is_floating_point() for t in lows):
                return None
            return list(zip(lows, highs, strict=True))
        if op in ("neg", "__neg__"):
            low, high = self._interval(args[0])
            return [(-high, -low)]
        if op in _SUB and len(args) == 2:
            (a_low, a_high), (b_low, b_high) = self._interval(args[0]), self._interval(args[1])
            if op == "__rsub__":
                (a_low, a_high), (b_low, b_high) = (b_low, b_high), (a_low, a_high)
            return [(torch.as_tensor(a_low - b_high), torch.as_tensor(a_high - b_low))]
        if (op in _MUL or op in _DIV) and len(args) == 2 and not kwargs:
            if op in _DIV and isinstance(args[1], Tensor) and id(args[1]) in self.bounds:
                return None  # a division by a computed tensor
            (a_low, a_high), (b_low, b_high) = self._interval(args[0]), self._interval(args[1])
            if op in _DIV:
                products = [a_low / b_low, a_low / b_high, a_high / b_low, a_high / b_high]
            else:
                products = [a_low * b_low, a_low * b_high, a_high * b_low, a_high * b_high]
            products = [torch.as_tensor(p) for p in products]
            low = torch.stack(torch.broadcast_tensors(*products)).amin(0)
            high = torch.stack(torch.broadcast_tensors(*products)).amax(0)
            return [(low, high)]
        return None


def certified_dead(
    model: nn.Module, box: tuple[Tensor, Tensor], structure: Structure, module: str = ""
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Per site reached, the units whose pre-activation interval bounds over ``box`` are ``<= 0`` (the model in
    evaluation mode, on its centre; with ``module``, the box is over the input of that submodule, which is called);
    and per site that no bound reaches, why.

    ``model`` is run once on the box's centre under a thread-local mode (nothing is patched, no state is kept:
    buffers and the random number generators are restored).
    """
    from lightning_relu.structure import preserved_state
    from lightning_relu.tracker import DeadUnitTracker

    low, high = box
    centre = (low + high) / 2
    dead: dict[str, Tensor] = {}
    notes: dict[str, str] = {}
    mode = _Intervals(centre, low, high)

    def seen(site: Any, output: Tensor) -> None:
        name = site.name
        info = structure.sites.get(name)
        if info is None:
            return
        bound = mode.bounds.get(id(output))
        if bound is None or output.ndim == 0:
            dead[name] = torch.zeros(info.num_units, dtype=torch.bool)
            ops = ", ".join(f"`{op}`" for op in list(mode.unsupported)[:3]) or "an operation it does not cover"
            notes.setdefault(name, f"no unit certified: the interval bounds do not reach it (through {ops})")
            return
        upper = bound[1].detach()
        units = upper.movedim(info.unit_dim, 0).reshape(info.num_units, -1) if upper.ndim > 1 else upper.reshape(-1, 1)
        this = (units <= 0).all(1).cpu()
        dead[name] = this if name not in dead else dead[name] & this
        if not bool(dead[name].any()):
            notes.setdefault(name, "no unit certified dead over the box")

    was_training = model.training
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what the counting warns about is the monitor's to say
        tracker = DeadUnitTracker(model)
    tracker._watch_axes = False
    tracker._observer = seen
    try:
        with preserved_state(model), torch.no_grad():
            tracker.attach()
            with mode:
                model.get_submodule(module)(centre)
    finally:
        tracker._observer = None
        tracker.detach()
        model.train(was_training)
    return dead, notes


# ------------------------------------------------------------------------------------------------ checkpoints
#: the key under which a compacted checkpoint records its layers' new widths (see :func:`resize_like_`)
CHECKPOINT_KEY = "lightning_relu_compaction"
_WIDTHS = (
    "in_features", "out_features", "in_channels", "out_channels", "groups", "num_features", "num_groups",
    "num_channels",
)  # fmt: skip


def layer_widths(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per Linear/ConvNd/norm module of ``model``, its width attributes (what :func:`resize_like_` restores)."""
    widths: dict[str, dict[str, int]] = {}
    for name, module in model.named_modules():
        found = {attribute: int(getattr(module, attribute)) for attribute in _WIDTHS if hasattr(module, attribute)}
        if found:
            widths[name] = found
    return widths


def resize_like_(model: nn.Module, checkpoint: Mapping[str, Any]) -> nn.Module:
    """Give ``model`` (a fresh build of the original architecture) the layer widths of a compacted checkpoint, so
    that its ``state_dict`` loads; returns ``model``.

    ``checkpoint`` is what ``lightning-relu compact`` writes (a Lightning checkpoint with ``state_dict`` and the
    widths under :data:`CHECKPOINT_KEY`). In a LightningModule, call it from ``on_load_checkpoint`` and
    ``load_from_checkpoint`` loads the compacted weights::

        def on_load_checkpoint(self, checkpoint):
            lightning_relu.compaction.resize_like_(self, checkpoint)
    """
    widths = checkpoint.get(CHECKPOINT_KEY)
    state = checkpoint.get("state_dict")
    if not isinstance(widths, Mapping) or not isinstance(state, Mapping):
        return model  # not a compacted checkpoint: nothing to resize
    for module_name, attributes in widths.items():
        try:
            module = model.get_submodule(module_name)
        except AttributeError as error:
            raise ValueError(
                f"The compacted checkpoint has layer {module_name!r} that the model does not have: was it written "
                "for another architecture?"
            ) from error
        for attribute, value in attributes.items():
            setattr(module, attribute, int(value))
        prefix = f"{module_name}." if module_name else ""
        for attribute, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            saved = state.get(prefix + attribute)
            if isinstance(saved, Tensor) and saved.shape != tensor.shape:
                _set(model, prefix + attribute, torch.zeros(saved.shape, dtype=tensor.dtype, device=tensor.device))
    return model


_DEMO_MODEL = "lightning_relu._demo:DemoRegressor"


def _compact_checkpoint(
    path: str, out: str | None, model_spec: str | None, input_shape: tuple[int, ...] | None, seed: int
) -> tuple[Compaction, str]:
    """What ``lightning-relu compact`` does: load a Lightning checkpoint holding a ``DeadUnitMonitor``'s history,
    rebuild the LightningModule from its hyperparameters, compact it with the last epoch's report and write a
    checkpoint of the compacted model (widths recorded, optimizer state dropped)."""
    import importlib
    import os

    from lightning_relu.monitor import EpochReport, _saved_reports

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise ValueError(f"{path!r} is not a Lightning checkpoint (no `state_dict`)")
    # the monitor's latest report (a checkpoint of an older version holds every epoch's: the latest is taken)
    reports = [
        _saved_reports(dict(state))
        for key, state in dict(checkpoint.get("callbacks", {})).items()
        if str(key).startswith("DeadUnitMonitor") and isinstance(state, Mapping)
    ]
    reports = [found for found in reports if found]
    if not reports:
        raise ValueError(
            f"{path!r} holds no `DeadUnitMonitor` report: train with `DeadUnitMonitor()` among the callbacks (its "
            "latest epoch's report is saved in the checkpoint)"
        )
    report = EpochReport.from_state_dict(reports[0][-1])
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    if model_spec is None:
        model_spec = _DEMO_MODEL
    module_name, _, attribute = model_spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"`--model` must be MODULE:NAME, got {model_spec!r}")
    factory = getattr(importlib.import_module(module_name), attribute)
    model = factory(**hparams)
    resize_like_(model, checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    if input_shape is not None:
        example = torch.randn(input_shape, generator=torch.Generator().manual_seed(seed))
    elif model_spec == _DEMO_MODEL and "in_features" in hparams:
        from lightning_relu._demo import DemoTask  # the demo's own inputs, as it trained on them

        example = DemoTask(in_features=int(hparams["in_features"]), samples=1024).data(seed).tensors[0]
    else:
        raise ValueError("the model's input shape is not known: pass `--input-shape`")
    result = compact(model, report, example)
    written = dict(checkpoint)
    written["state_dict"] = result.model.state_dict()
    written[CHECKPOINT_KEY] = layer_widths(result.model)
    for key in ("optimizer_states", "lr_schedulers"):
        written.pop(key, None)  # shaped for the layers before: a resumed fit starts them afresh
    if out is None:
        root, extension = os.path.splitext(path)
        out = f"{root}.compact{extension or '.ckpt'}"
    torch.save(written, out)
    return result, out


# ------------------------------------------------------------------------------------------------ end of fit
def _call_name(example: Any) -> str:
    """How a warning names an example: the module a :class:`ModuleCall` calls, else the model."""
    return f"`{example.module}`" if isinstance(example, ModuleCall) and example.module else "the model"


class CompactOnFitEnd(Callback):
    """At the end of a fit, compact the LightningModule with the last report of the ``DeadUnitMonitor`` among the
    Trainer's callbacks, keep the result in :attr:`result` and (with ``dirpath``) save it as a checkpoint that
    :func:`resize_like_` loads (and ``load_from_checkpoint`` of a LightningModule that calls it in its
    ``on_load_checkpoint``).

    The example input is the last call the training step made into the model (its forward, or ``self.net(x)``),
    cut to ``example_size`` samples; with ``input_fn``, ``input_fn(batch)`` of the last training batch. A step that
    calls several children (``self.decoder(self.encoder(x))``) is compacted one child after the other, each on its
    call; with ``certify`` only the sites under the step's first call are (the box bounds its input alone). The
    trained model itself is not changed.

    Args:
        dirpath: directory to write ``filename`` into (``None``: nothing is written).
        filename: name of the checkpoint written.
        input_fn: takes the model's input out of a training batch (default: the call the step made).
        example_size: samples of the example input.
        certify: passed to :func:`compact`.

    Example::

        trainer = L.Trainer(callbacks=[DeadUnitMonitor(), CompactOnFitEnd(dirpath="compacted")])
        trainer.fit(model, loader)
        print(trainer.callbacks[-1].result.table())
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "compacted.ckpt",
        input_fn: Any = None,
        example_size: int = 64,
        certify: tuple[Any, Any] | None = None,
    ) -> None:
        if input_fn is not None and not callable(input_fn):
            raise ValueError(f"`input_fn` must be callable or None, got {input_fn!r}")
        if isinstance(example_size, bool) or not isinstance(example_size, int) or example_size < 1:
            raise ValueError(f"`example_size` must be a positive integer, got {example_size!r}")
        if not isinstance(filename, str) or not filename:
            raise ValueError(f"`filename` must be a non-empty string, got {filename!r}")
        self.dirpath = dirpath
        self.filename = filename
        self.input_fn = input_fn
        self.example_size = example_size
        self.certify = certify
        self.result: Compaction | None = None
        self.path: str | None = None
        self._inputs = TrainingInputWatch()  # the latest training batch and the step's call into the model

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._monitor(trainer) is None:
            raise ValueError("`CompactOnFitEnd` needs a `DeadUnitMonitor` among the Trainer's callbacks")

    @staticmethod
    def _monitor(trainer: pl.Trainer) -> Any:
        from lightning_relu.monitor import DeadUnitMonitor

        callbacks: list[pl.Callback] = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning, undeclared
        return next((c for c in callbacks if isinstance(c, DeadUnitMonitor)), None)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._inputs.batch_start(pl_module, watch_calls=self.input_fn is None)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._inputs.batch_end(batch)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_relu.structure import example_from_batch

        monitor = self._monitor(trainer)
        report = monitor.last_report if monitor is not None else None
        examples: list[Any] = self._inputs.calls(self.example_size)
        if not examples and self._inputs.batch is not None:
            examples = [example_from_batch(self._inputs.batch, self.input_fn, self.example_size)]
        self._inputs.stop()
        if report is None or not examples:
            return  # no epoch ended: nothing measured
        # one compaction per outermost call of the training step (`self.decoder(self.encoder(x))`), each on the sites
        # under the module it calls, one after the other on the model the last one made
        parts = split_by_call(report, examples)
        later = [example for example, _ in parts if example is not examples[0]]
        if self.certify is not None and later:
            # the box bounds what the step passes to its first call; what the later calls get is not bounded by it
            rank_zero_warn(
                f"`CompactOnFitEnd(certify=...)` certifies over a box of the input of the training step's first call "
                f"({_call_name(examples[0])}); the sites under its later calls "
                f"({', '.join(_call_name(example) for example in later)}) are not compacted."
            )
            parts = [(example, part) for example, part in parts if example is examples[0]]
        model: nn.Module = pl_module
        sites: dict[str, SiteCompaction] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for example, part in parts:
                model, found = compact(model, part, example, certify=self.certify)
                sites.update(found)
        self.result = Compaction(model, sites)
        if self.dirpath is not None and trainer.is_global_zero:
            import os

            os.makedirs(self.dirpath, exist_ok=True)
            self.path = os.path.join(self.dirpath, self.filename)
            torch.save(
                {
                    # what `LightningModule.load_from_checkpoint` reads (it migrates by the version), with the widths
                    # that `resize_like_` in the module's `on_load_checkpoint` gives its layers first
                    "pytorch-lightning_version": pl.__version__,
                    "epoch": trainer.current_epoch,
                    "global_step": trainer.global_step,
                    "state_dict": self.result.model.state_dict(),
                    "hyper_parameters": dict(getattr(pl_module, "hparams", {})),
                    CHECKPOINT_KEY: layer_widths(self.result.model),
                },
                self.path,
            )

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._inputs.stop()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._inputs.stop()
