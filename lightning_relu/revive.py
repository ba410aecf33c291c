"""Revival of dead units: :func:`revive_dead_units_` (the surgery) and the :class:`DeadUnitReviver` callback.

Once a unit is dead its incoming weights receive no gradient and it stays dead. Revival re-initializes the
unit's incoming weights, resets its normalization entries, zeroes its outgoing weights (so the network computes
the same function right after the surgery) and resets the optimizer state of every touched entry, as in ReDo
(Sokar et al., 2023) and continual backprop (Dohare et al., 2021).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_relu._engines import agree_with_rank_zero
from lightning_relu._lifecycle import continued_history, restored_outside_fit, starts_afresh
from lightning_relu._sharded import write_through
from lightning_relu.dashboards import log_epoch_scalars
from lightning_relu.init import rai_rows
from lightning_relu.observation import TrainingInputWatch
from lightning_relu.site import module_names, unknown_names
from lightning_relu.sites import (
    NORM_TYPES,
    Consumer,
    Site,
    SiteTracingWarning,
    find_relu_sites,
    may_call_rectifiers,
)
from lightning_relu.stats import LayerReport
from lightning_relu.structure import ModuleCall, ObservationError, example_from_batch, observe, split_by_call
from lightning_relu.surgery import RevivalWarning, check_excluded, reset_optimizer_state, revive_observed_

if TYPE_CHECKING:
    from lightning_relu.monitor import DeadUnitMonitor
    from lightning_relu.report import EpochReport

__all__ = ["INIT_MODES", "DeadUnitReviver", "RevivalWarning", "revive_dead_units_"]

#: Initializations that :func:`revive_dead_units_` can draw revived rows from.
INIT_MODES: tuple[str, ...] = ("default", "kaiming", "rai")

_CONV_TYPES: tuple[type[nn.Conv1d] | type[nn.Conv2d] | type[nn.Conv3d], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_AFFINE = ("weight", "bias")
_BATCH_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


# ------------------------------------------------------------------------------------------------ surgery
@dataclass(eq=False)
class _Plan:
    """What to do at one site, decided before any tensor is touched."""

    site: Site
    units: Tensor  # int64 indices of the units to revive, sorted, on the CPU
    consumers: list[Consumer] = field(default_factory=list)


def revive_dead_units_(
    model: nn.Module,
    report: Mapping[str, LayerReport] | EpochReport,
    optimizer: Optimizer | Iterable[Optimizer] | None = None,
    generator: torch.Generator | None = None,
    *,
    init: Literal["default", "kaiming", "rai"] = "default",
    max_fraction: float = 1.0,
    exclude: Iterable[str] = (),
    sites: Iterable[Site] | None = None,
    example_input: Any = None,
    check_output: bool = True,
) -> dict[str, int]:
    r"""Re-initialize the dead units of ``model`` in place without changing what the network computes.

    For every site of ``report`` (keyed by site name, as returned by
    :meth:`~lightning_relu.tracker.DeadUnitTracker.report` or ``DeadUnitMonitor.last_report``; an
    ``EpochReport`` works too) and each of its dead units:

    - **producer** (the Linear/ConvNd computing the pre-activation): the unit's row (Linear) or output channel
      (ConvNd) is re-drawn from a fresh initialization, and its bias entry with it (see ``init``);
    - **norm** between producer and site: affine weight 1 and bias 0 for the unit's channel; for BatchNorm also
      running mean 0 and running variance 1;
    - **consumers** (the Linear/ConvNd layers reading the site's output): the unit's outgoing weights are zeroed
      (Linear input columns; ConvNd input channels, in the unit's group only; through ``nn.Flatten`` every
      column that comes from the unit), so the revived unit's new, non-zero output is multiplied by zero and
      the network computes the same function right after the surgery;
    - **optimizer state**: in every per-parameter state tensor shaped like its parameter (``exp_avg``,
      ``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``, ``square_avg``, ...), the entries of every
      touched row, column, bias and norm entry are set back to what a fresh optimizer starts them at: 0, except
      Rprop's ``step_size`` (the group's ``lr``) and Adagrad's ``sum`` (``initial_accumulator_value``); other
      units' state and scalar state (``step``, one per parameter) are untouched, so once the parameter has taken
      thousands of steps Adam's bias correction is about 1 for the fresh moments and a revived entry's first update
      is about ``(1 - beta1) / sqrt(1 - beta2)`` times the learning rate (3.2 with the default betas; a fresh
      Adam's is 1), as with ReDo's reference code. State of another shape (factored second moments) is left alone.

    The revived units fire again; their outgoing weights learn from the next step on and their incoming weights
    from the step after. Everything is validated before any tensor is touched: a report that does not belong to
    ``model`` raises ``ValueError`` and changes nothing.

    Caveats, each reported once per call with a :class:`RevivalWarning`: a site without a producer cannot be
    revived and is skipped (:func:`~lightning_relu.find_relu_sites` links none where the layer is also applied
    elsewhere), and so is one whose producer or norm layer computes its weight from other parameters
    (``weight_norm``, ``spectral_norm``); a site without a usable consumer (its output goes through something else
    than pooling, dropout or ``nn.Flatten``, or a consumer's weight is computed by such a parametrization) is
    revived but the network's output changes; with a LayerNorm, or a
    GroupNorm of several channels per group, between producer and site, the normalization statistics are shared
    with the other units of the group, so their outputs (and the network's) change slightly. With
    ``example_input`` (the observed structure) the output is checked and more is refused, each with its reason
    (:attr:`~lightning_relu.structure.SiteStructure.revival_problem`): readers revival cannot make blind, a factor
    that differs between a unit's entries, a constant added with no bias to shift (a frozen BatchNorm), readers that
    are all frozen; units that cannot fire are left dead. Without it (``nn.Sequential`` order) none of these is
    checked.

    .. math::
        W_{j,:} \sim \mathcal{D}_\text{init}, \quad \gamma_j = 1,\ \beta_j = 0, \quad
        W^\text{next}_{:,j} = 0, \quad s_{j} = 0 \text{ for every optimizer state } s

    Under FSDP2 (``fully_shard``) and DeepSpeed (ZeRO stages 1 to 3) the change is written through the shards or the
    fp32 master weights, and the optimizer state with it, as one process would make it on rank 0's arguments; every
    rank must call it. What cannot be written through (FSDP1, FSDP2 mixed precision, ZeRO-3 with
    ``memory_efficient_linear``) raises ``ValueError`` before anything changes.

    Args:
        model: the network the report was measured on.
        report: per-site reports keyed by site name; only their ``dead`` masks are read.
        optimizer: an optimizer or several whose state for the touched parameters is reset.
        generator: every random draw goes through it (on its device, then copied to the parameter), so two
            processes with identically seeded generators perform identical surgery.
        init: how revived rows are drawn, with ``fan_in`` the producer's fan-in: ``"default"`` as
            ``nn.Linear.reset_parameters`` (weights and bias uniform in :math:`\pm 1/\sqrt{\text{fan\_in}}`),
            ``"kaiming"`` (He normal, std :math:`\sqrt{2/\text{fan\_in}}`, bias 0) or ``"rai"`` (Randomized
            Asymmetric Initialization, Lu et al. 2020: :math:`[w_j; b_j] \sim \mathcal{N}(0, 0.6007^2/\text{fan\_in})`
            with one uniformly chosen entry, the bias included, replaced by a Beta(2, 1) draw).
        max_fraction: at most ``max(1, floor(max_fraction * num_units))`` units of a site are revived at once;
            when more are dead, which ones is drawn uniformly at random through ``generator``.
        exclude: names of sites never to revive (unknown names raise ``ValueError``).
        sites: the model's sites as :func:`~lightning_relu.find_relu_sites` returns them (e.g. a tracker's
            ``all_sites``), to skip discovering them again; default: discovered here.
        example_input: an input of the model (a tensor, a tuple of positional arguments, a dict of keyword
            arguments, or a :class:`~lightning_relu.structure.ModuleCall` of a submodule): producers, norms and
            consumers are found on a real forward of it, and each revived unit's bias is set so that it fires on it.
            Without it they are read from the order of ``nn.Sequential`` containers only, and nothing is checked
            on data.
        check_output: with ``example_input``, leave alone the units that are alive on it in evaluation mode, and
            undo (with a :class:`RevivalWarning`) the revivals of a site that change the model's output on it in
            evaluation mode. No effect without ``example_input``.

    Returns:
        The number of units revived at every site of ``report`` not in ``exclude`` (0 where none was).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_relu.tracker import DeadUnitTracker
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> with torch.no_grad():
        ...     net[0].bias[:3] = -100.0  # three dead units
        >>> x = torch.randn(64, 4)
        >>> with DeadUnitTracker(net) as tracker:
        ...     before = net(x)
        >>> revive_dead_units_(net, tracker.report(), generator=torch.Generator().manual_seed(0))
        {'1': 3}
        >>> torch.equal(net(x), before)
        True
    """
    engine = write_through(model, "revive_dead_units_", optimizer=optimizer)  # before `optimizer` must be a torch one
    if engine is not None:  # FSDP2: on the unsharded model and optimizer state, then into the shards (rank 0 decides)
        options: dict[str, Any] = dict(init=init, max_fraction=max_fraction, exclude=exclude, sites=sites)
        options.update(example_input=example_input, check_output=check_output)
        revive = lambda inner, opts: revive_dead_units_(inner, report, opts, generator, **options)  # noqa: E731
        return engine.run(revive, optimizer, share_result=True)
    layers = _as_layers(report)
    optimizers = _as_optimizers(optimizer)
    _check_optimizers_hold(model, optimizers, layers, sites)
    excluded = _check_options(init, max_fraction, exclude, generator, check_output)
    if example_input is not None:
        for name, layer in layers.items():
            _check_layer(name, layer)
        known = find_relu_sites(model) if sites is None else _as_sites(sites, model)
        _check_optimizers_hold(model, optimizers, layers, known)
        return revive_observed_(
            model,
            {name: layer.dead for name, layer in layers.items()},
            example_input,
            optimizers,
            generator,
            _draw_rows,
            init=init,
            max_fraction=max_fraction,
            excluded=excluded,
            check_output=check_output,
            sites=known,
        )
    found = find_relu_sites(model) if sites is None else _as_sites(sites, model)
    sites_by_name = _sites_of_report(found, layers, excluded)
    _check_optimizers_hold(model, optimizers, layers, found)

    # decide everything (no tensor of the model is touched before every plan is made)
    planning = _plan_revival(layers, sites_by_name, excluded, max_fraction, generator)
    planning.warn()
    if planning.plans:
        _apply_plans(planning.plans, init, generator, optimizers)
    return planning.counts


def _check_options(init: Any, max_fraction: Any, exclude: Any, generator: Any, check_output: Any) -> set[str]:
    """Refuse bad keyword arguments of :func:`revive_dead_units_`; returns the excluded site names."""
    if init not in INIT_MODES:
        raise ValueError(f"`init` can be {', '.join(map(repr, INIT_MODES))}, got {init!r}")
    _check_fraction(max_fraction)
    excluded = _as_names(exclude, "exclude")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"`generator` must be a `torch.Generator` or None, got {generator!r}")

    if not isinstance(check_output, bool):
        raise ValueError(f"`check_output` must be a bool, got {check_output!r}")
    return excluded


def _sites_of_report(found: list[Site], layers: dict[str, LayerReport], excluded: set[str]) -> dict[str, Site]:
    """The model's sites by name, once every excluded name and every site of the report is known to be one of them."""
    sites_by_name = {site.name: site for site in found}
    check_excluded(excluded, list(sites_by_name))
    for name, layer in layers.items():
        _validate_layer(name, layer, sites_by_name)
    return sites_by_name


@dataclass
class _Planning:
    """Every site's decision, made before any tensor is touched: the plans, the count of units revived per site, and
    the sites each caveat names."""

    counts: dict[str, int] = field(default_factory=dict)
    plans: list[_Plan] = field(default_factory=list)
    no_producer: list[str] = field(default_factory=list)
    no_consumer: list[str] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)
    mixing_norm: list[str] = field(default_factory=list)

    def warn(self) -> None:
        """One :class:`RevivalWarning` per caveat, naming its sites (called from :func:`revive_dead_units_`)."""
        if self.no_producer:
            warnings.warn(
                f"Sites {self.no_producer} have dead units but no known producer (Linear/ConvNd right before the "
                "rectifier, possibly through a norm layer, inside an `nn.Sequential`, and applied only there: a layer "
                "also registered or applied elsewhere is never linked): they cannot be revived and were skipped. Pass "
                "`example_input=` to find the producers on a real forward.",
                RevivalWarning,
                stacklevel=3,
            )
        if self.computed:
            warnings.warn(
                f"Sites {self.computed} have a producer or norm layer whose weights are computed from other parameters"
                " (a parametrization such as `weight_norm` or `spectral_norm`): their rows cannot be re-drawn in "
                "place, so these sites were skipped.",
                RevivalWarning,
                stacklevel=3,
            )
        if self.no_consumer:
            warnings.warn(
                f"Sites {self.no_consumer} have no known consumer (Linear/ConvNd reading their output through pooling, "
                "dropout or `nn.Flatten`) whose outgoing weights could be zeroed, or one that cannot be zeroed (its "
                "weight is computed by a parametrization, or its width does not match): their dead units were revived "
                "anyway, so the network's output changes.",
                RevivalWarning,
                stacklevel=3,
            )
        if self.mixing_norm:
            warnings.warn(
                f"Sites {self.mixing_norm} have a LayerNorm/GroupNorm that normalizes several units together: "
                "re-drawing the revived units' incoming weights changes the statistics their neighbours are normalized "
                "with, so the network's output changes slightly.",
                RevivalWarning,
                stacklevel=3,
            )


def _plan_revival(
    layers: dict[str, LayerReport],
    sites_by_name: dict[str, Site],
    excluded: set[str],
    max_fraction: float,
    generator: torch.Generator | None,
) -> _Planning:
    """Which units of which site to revive, and through which consumers, or why a site is skipped."""
    planning = _Planning()
    for name, layer in layers.items():
        if name in excluded:
            continue
        planning.counts[name] = 0
        site = sites_by_name[name]
        units = torch.nonzero(layer.dead.reshape(-1)).reshape(-1)
        if units.numel() == 0:
            continue
        if site.producer is None:
            planning.no_producer.append(name)
            continue
        if not all(_stored(module, attribute) for module in (site.producer, site.norm) for attribute in _AFFINE):
            planning.computed.append(name)
            continue
        assert site.num_units is not None
        cap = max(1, math.floor(max_fraction * site.num_units))
        if units.numel() > cap:
            pick = torch.randperm(units.numel(), generator=generator, device=_device_of(generator))[:cap]
            units = units[pick.cpu()].sort().values
        consumers = [c for c in site.consumers if _consumer_fits(site, c) and _stored(c.module, "weight")]
        if not consumers or len(consumers) < len(site.consumers):
            planning.no_consumer.append(name)
        if _norm_mixes_units(site):
            planning.mixing_norm.append(name)
        planning.plans.append(_Plan(site=site, units=units, consumers=consumers))
        planning.counts[name] = int(units.numel())
    return planning


def _apply_plans(plans: list[_Plan], init: str, generator: torch.Generator | None, optimizers: list[Optimizer]) -> None:
    """The surgery: fresh incoming rows and norm entries, zeroed outgoing weights, reset optimizer state."""
    touched: dict[Tensor, Tensor] = {}  # parameter -> bool mask of touched entries
    with torch.no_grad():
        for plan in plans:
            _redraw_producer(plan.site.producer, plan.units, init, generator, touched)  # type: ignore[arg-type]
            if plan.site.norm is not None:
                _reset_norm(plan.site, plan.units, touched)
        # outgoing weights last: a consumer may also be the producer of a later site
        for plan in plans:
            for consumer in plan.consumers:
                _zero_consumer(plan.site, consumer, plan.units, touched)
        for opt in optimizers:
            reset_optimizer_state(opt, touched)


def _as_layers(report: Any) -> dict[str, LayerReport]:
    layers = getattr(report, "layers", report)  # an EpochReport carries its per-site reports in `.layers`
    if not isinstance(layers, Mapping):
        raise ValueError(
            f"`report` must map site names to `LayerReport`s (or be an `EpochReport`), got {type(report).__name__}"
        )
    return dict(layers)


def _as_optimizers(optimizer: Any) -> list[Optimizer]:
    if optimizer is None:
        return []
    if isinstance(optimizer, Optimizer):
        return [optimizer]
    optimizers = list(optimizer) if isinstance(optimizer, Iterable) and not isinstance(optimizer, str) else [optimizer]
    if not all(isinstance(opt, Optimizer) for opt in optimizers):
        if optimizers == [optimizer]:
            given = _short_repr(optimizer)
        else:  # name the items: an optimizer's own repr spans many lines
            items = [_short_repr(o, 40) if isinstance(o, (str, int, float)) else type(o).__name__ for o in optimizers]
            items = items[:4]
            more = ", ..." if len(optimizers) > 4 else ""
            given = f"a {type(optimizer).__name__} of [{', '.join(items)}{more}]"
        raise ValueError(f"`optimizer` must be a `torch.optim.Optimizer`, a sequence of them or None, got {given}")
    return optimizers


def _check_optimizers_hold(
    model: nn.Module, optimizers: list[Optimizer], layers: Mapping[str, Any], sites: Iterable[Site] | None
) -> None:
    """Every optimizer given must train ``model`` and hold the parameters that revival rewrites (the producers and
    consumers of the sites with dead units, where known): otherwise their state could not be reset."""
    if not optimizers or not isinstance(model, nn.Module):  # not a module: a check below says so
        return
    names = {id(param): name for name, param in model.named_parameters()}
    held: set[int] = set()
    for index, opt in enumerate(optimizers):
        params = [param for group in opt.param_groups for param in group["params"]]
        if not any(id(param) in names for param in params):
            label = "`optimizer`" if len(optimizers) == 1 else f"`optimizer` number {index}"
            raise ValueError(
                f"{label} ({type(opt).__name__} of {len(params)} parameters) holds none of `model`'s parameters: it "
                "trains another model, so the state of the revived units could not be reset. Pass the optimizer "
                "that trains `model`."
            )
        held.update(id(param) for param in params)
    known = [site for site in sites if isinstance(site, Site)] if isinstance(sites, (list, tuple)) else []
    by_name = {site.name: site for site in known}
    for name, layer in layers.items():
        site, dead = by_name.get(name), getattr(layer, "dead", None)
        if site is None or not isinstance(dead, Tensor) or not bool(dead.any()):
            continue
        modules = [site.producer, site.norm, *(consumer.module for consumer in site.consumers)]
        for module in (m for m in modules if m is not None):
            for param in module.parameters(recurse=False):
                if param.requires_grad and id(param) in names and id(param) not in held:
                    raise ValueError(
                        f"`optimizer` does not hold parameter {names[id(param)]!r}, which reviving the dead units of "
                        f"site {name!r} rewrites: its optimizer state could not be reset. Pass every optimizer that "
                        "trains `model`."
                    )


def _short_repr(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _as_names(names: Any, argument: str) -> set[str]:
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise ValueError(f"`{argument}` must be a sequence of site names, got {names!r}")
    names = list(names)
    if not all(isinstance(name, str) for name in names):
        raise ValueError(f"`{argument}` must be a sequence of site names, got {names!r}")
    return set(names)


def _check_fraction(max_fraction: Any) -> None:
    if isinstance(max_fraction, bool) or not isinstance(max_fraction, (int, float)) or not 0.0 < max_fraction <= 1.0:
        raise ValueError(f"`max_fraction` must be a number in (0, 1], got {max_fraction!r}")


def _as_sites(sites: Any, model: nn.Module) -> list[Site]:
    if isinstance(sites, (str, bytes)) or not isinstance(sites, Iterable):
        raise ValueError(f"`sites` must be the model's `Site`s (from `find_relu_sites`) or None, got {sites!r}")
    found = list(sites)
    if not all(isinstance(site, Site) for site in found):
        raise ValueError(f"`sites` must be the model's `Site`s (from `find_relu_sites`) or None, got {sites!r}")
    modules = {id(module) for module in model.modules()}
    foreign = [site.name for site in found if site.producer is not None and id(site.producer) not in modules]
    if foreign:
        raise ValueError(f"`sites` has sites of another model: the producers of {foreign} are not in `model`")
    return found


def _check_layer(name: str, layer: Any) -> None:
    dead = getattr(layer, "dead", None)
    if not isinstance(dead, Tensor) or dead.dtype != torch.bool or dead.ndim != 1:
        raise ValueError(
            f"The report of site {name!r} must be a `LayerReport` with a 1-D bool `dead` mask, got {layer!r}"
        )


def _validate_layer(name: str, layer: Any, sites: dict[str, Site]) -> None:
    if name not in sites:
        raise ValueError(
            f"The report has a site {name!r} that the model does not have; the model's sites are {list(sites)}. "
            "Was the report measured on another model? (Without `example_input=`, only the model's `nn.ReLU` "
            "modules are known: pass `example_input=` to find rectifier function calls and later call positions "
            "on a real forward.)"
        )
    _check_layer(name, layer)
    dead = layer.dead
    site = sites[name]
    expected = site.num_units
    if expected is not None and (dead.numel() != expected or getattr(layer, "num_units", expected) != expected):
        raise ValueError(
            f"The report of site {name!r} has {dead.numel()} units but the model's site {name!r} has {expected} "
            f"(producer {site.producer_name!r}). Was the report measured on another model?"
        )


def _copied(example: Any, device: torch.device | None = None) -> Any:
    """``example`` with every tensor copied (a slice would save its whole batch's storage), to ``device`` if given."""
    if isinstance(example, Tensor):
        return example.detach().to(device or example.device, copy=True)
    if isinstance(example, ModuleCall):
        return ModuleCall(example.module, _copied(example.args, device), _copied(example.kwargs, device))
    if isinstance(example, tuple):
        return tuple(_copied(item, device) for item in example)
    if isinstance(example, list):
        return [_copied(item, device) for item in example]
    if isinstance(example, dict):
        return {key: _copied(value, device) for key, value in example.items()}
    return example


def _entry(entry: dict[str, Any]) -> dict[str, Any]:
    """One revival of :attr:`DeadUnitReviver.history` as plain values."""
    return {
        "epoch": int(entry.get("epoch", -1)),
        "global_step": int(entry.get("global_step", -1)),
        "revived": {str(name): int(count) for name, count in entry.get("revived", {}).items()},
    }


def _examples_state(examples: list[Any] | None) -> dict[str, Any] | None:
    """Held examples as primitives and tensors (a checkpoint loads with ``weights_only=True``)."""
    if examples is None:
        return None
    return {"examples": [_example_state(example) for example in examples]}


def _example_state(example: Any) -> dict[str, Any]:
    if isinstance(example, ModuleCall):
        return {"module": example.module, "args": _listed(example.args), "kwargs": _listed(example.kwargs)}
    return {"input": _listed(example), "tuple": isinstance(example, tuple)}


def _listed(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_listed(item) for item in value]
    if isinstance(value, dict):
        return {key: _listed(item) for key, item in value.items()}
    return value


def _examples_from_state(state: Any) -> list[Any] | None:
    """The held examples of :func:`_examples_state`, or of an older checkpoint's single example."""
    if not isinstance(state, dict):
        return None
    if isinstance(state.get("examples"), list):
        return [_example_from_state(item) for item in state["examples"] if isinstance(item, dict)]
    return [_example_from_state(state)]


def _example_from_state(state: dict[str, Any]) -> Any:
    if "module" in state:
        return ModuleCall(str(state["module"]), tuple(state.get("args", ())), dict(state.get("kwargs", {})))
    example = state.get("input")
    return tuple(example) if state.get("tuple") and isinstance(example, list) else example


def _device_of(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _consumer_fits(site: Site, consumer: Consumer) -> bool:
    """Whether zeroing the consumer's inputs from the site's units is well defined (widths agree)."""
    units, module = site.num_units, consumer.module
    if units is None:
        return False
    if isinstance(module, nn.Linear):
        if consumer.through_flatten:
            return module.in_features % units == 0
        # a Linear applied directly reads the last dimension: the units only for dense sites
        return site.unit_dim == -1 and module.in_features == units
    if isinstance(module, _CONV_TYPES):
        return site.unit_dim == 1 and not consumer.through_flatten and module.in_channels == units
    return False


def _stored(module: nn.Module | None, attribute: str) -> bool:
    """Whether ``module.<attribute>`` is absent or a parameter the module holds itself, so that writing into it
    changes the layer (not a tensor recomputed by a parametrization or a weight-norm hook)."""
    value = getattr(module, attribute, None)
    if value is None or module is None:
        return True
    own = dict(module.named_parameters(recurse=False, remove_duplicate=False))
    return isinstance(value, nn.Parameter) and own.get(attribute) is value


def _norm_mixes_units(site: Site) -> bool:
    norm = site.norm
    if isinstance(norm, nn.GroupNorm):
        return norm.num_channels // norm.num_groups > 1
    return isinstance(norm, nn.LayerNorm) and (site.num_units or 0) > 1


def _mark(touched: dict[Tensor, Tensor], tensor: Tensor | None, index: Any) -> None:
    if isinstance(tensor, nn.Parameter):
        if tensor not in touched:
            touched[tensor] = torch.zeros(tensor.shape, dtype=torch.bool, device=tensor.device)
        touched[tensor][index] = True


def _draw_rows(
    count: int, fan_in: int, has_bias: bool, init: str, generator: torch.Generator | None
) -> tuple[Tensor, Tensor | None]:
    """``count`` fresh rows of ``fan_in`` weights (and their bias entries), vectorized, in float32."""
    device = _device_of(generator)
    if init == "rai":
        return rai_rows(count, fan_in, has_bias, generator, _device_of(generator))
    if init == "kaiming":
        std = math.sqrt(2.0 / fan_in)
        weight = torch.randn(count, fan_in, generator=generator, device=device) * std
        return weight, (torch.zeros(count, device=device) if has_bias else None)
    # "default": kaiming_uniform(a=sqrt(5)) has bound gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in), like the bias
    bound = 1.0 / math.sqrt(fan_in)
    weight = (torch.rand(count, fan_in, generator=generator, device=device) * 2.0 - 1.0) * bound
    bias = (torch.rand(count, generator=generator, device=device) * 2.0 - 1.0) * bound if has_bias else None
    return weight, bias


def _redraw_producer(
    producer: nn.Module,
    units: Tensor,
    init: str,
    generator: torch.Generator | None,
    touched: dict[Tensor, Tensor],
) -> None:
    weight: Tensor = producer.weight  # type: ignore[assignment]
    bias: Tensor | None = producer.bias  # type: ignore[assignment]
    fan_in = math.prod(weight.shape[1:])
    new_weight, new_bias = _draw_rows(int(units.numel()), fan_in, bias is not None, init, generator)
    index = units.to(weight.device)
    weight[index] = new_weight.to(weight).reshape(-1, *weight.shape[1:])
    _mark(touched, weight, index)
    if bias is not None and new_bias is not None:
        bias[index] = new_bias.to(bias)
        _mark(touched, bias, index)


def _norm_index(site: Site, tensor: Tensor, units: Tensor) -> tuple[Any, ...]:
    """Index of the units' entries in a norm layer's per-element tensor."""
    index = units.to(tensor.device)
    if isinstance(site.norm, nn.LayerNorm) and site.unit_dim != 1:
        return (..., index)  # dense units are the last normalized dimension
    return (index,)  # channels: BatchNorm/GroupNorm vectors, or the first dim of a LayerNorm over (C, ...)


def _reset_norm(site: Site, units: Tensor, touched: dict[Tensor, Tensor]) -> None:
    norm = site.norm
    assert norm is not None and isinstance(norm, NORM_TYPES)
    for attribute, value in (("weight", 1.0), ("bias", 0.0)):
        tensor = getattr(norm, attribute, None)
        if isinstance(tensor, Tensor):
            index = _norm_index(site, tensor, units)
            tensor[index] = value
            _mark(touched, tensor, index)
    if isinstance(norm, _BATCH_NORM_TYPES):
        for attribute, value in (("running_mean", 0.0), ("running_var", 1.0)):
            tensor = getattr(norm, attribute, None)
            if isinstance(tensor, Tensor):
                tensor[units.to(tensor.device)] = value


def _zero_consumer(site: Site, consumer: Consumer, units: Tensor, touched: dict[Tensor, Tensor]) -> None:
    module = consumer.module
    weight: Tensor = module.weight  # type: ignore[assignment]
    units = units.to(weight.device)
    num_units = site.num_units
    assert num_units is not None
    if isinstance(module, nn.Linear):
        if consumer.through_flatten and site.unit_dim == 1:
            # (N, C, *spatial) flattened: channel c owns the contiguous columns [c * block, (c + 1) * block)
            block = module.in_features // num_units
            columns = (units[:, None] * block + torch.arange(block, device=weight.device)).reshape(-1)
        elif consumer.through_flatten:
            # (N, *positions, F) flattened: feature c sits at columns c, c + F, c + 2F, ...
            repeats = module.in_features // num_units
            columns = (units[:, None] + num_units * torch.arange(repeats, device=weight.device)).reshape(-1)
        else:
            columns = units
        index: tuple[Any, ...] = (slice(None), columns)
    else:
        # ConvNd weight: (out, in / groups, *kernel); input channel c is read only by the output channels of
        # its group, at position c % (in / groups)
        groups = int(module.groups)  # type: ignore[arg-type]
        in_per_group = weight.shape[1]
        out_per_group = weight.shape[0] // groups
        group = units // in_per_group
        rows = group[:, None] * out_per_group + torch.arange(out_per_group, device=weight.device)
        index = (rows, (units % in_per_group)[:, None])
    weight[index] = 0.0
    _mark(touched, weight, index)


# ------------------------------------------------------------------------------------------------ callback
def _publishes_reports(callback: Any) -> bool:
    """Whether ``callback`` is a :class:`~lightning_relu.DeadUnitMonitor`, told by its public interface: the monitor
    imports this module (``DeadUnitMonitor(revive=True)``), so this module never imports the monitor's."""
    return isinstance(callback, Callback) and all(
        callable(getattr(callback, name, None)) for name in ("add_report_listener", "remove_report_listener")
    )


class DeadUnitReviver(Callback):
    r"""Revive the dead units after each training epoch's dead-unit report, with :func:`revive_dead_units_`.

    It acts on the report of a :class:`~lightning_relu.monitor.DeadUnitMonitor`, so a monitor must be in the
    Trainer's callbacks (or build the pair with ``DeadUnitMonitor(revive=True)``). Every ``every_n_epochs``
    training epochs, right after the monitor has logged its report, the dead units are re-initialized, their
    norm entries reset, their outgoing weights zeroed (the network computes the same function right after) and
    the optimizer state of every touched entry zeroed, for every optimizer in ``trainer.optimizers``.

    Under DDP every rank performs the same surgery: the decisions come from the report, which is summed across
    ranks, the example from rank 0, and the random draws from a generator seeded with ``seed + epoch`` on every
    rank; afterwards every rank takes rank 0's parameters, buffers and optimizer state, as what a rank reads of its
    own state (BatchNorm statistics, dropout's generator) can make the surgery differ.

    These scalars go to every logger in ``trainer.loggers`` (at ``trainer.global_step``) and into
    ``trainer.callback_metrics``:

    - ``revived/<site>``: number of units revived at the site;
    - ``revived/total``: over all sites.

    :attr:`history` keeps ``{"epoch", "global_step", "revived": {site: count}}`` for every revival of the fit. A
    checkpoint holds the latest revival and the totals per site (:attr:`revived_per_site`), not every epoch's: a fit
    resumed from it starts its history with that latest revival (the earlier ones are in the loggers).

    Args:
        every_n_epochs: revive after every ``every_n_epochs``-th training epoch.
        max_fraction: at most ``max(1, floor(max_fraction * num_units))`` units of a site are revived at once,
            chosen at random among the dead ones when more are dead.
        exclude: names of sites never to revive.
        init: how revived incoming weights are drawn: ``"default"``, ``"kaiming"`` or ``"rai"`` (see
            :func:`revive_dead_units_`).
        seed: seed of the draws (the generator of epoch ``e`` is seeded with ``seed + e``); ``None`` takes rank
            zero's ``torch.initial_seed()`` (set by ``seed_everything``).
        input_fn: takes the model's input out of a training batch. By default the structure is observed on the
            calls the latest training step made into the model: its ``forward``, or each child it called
            (``self.net(x)``; ``self.decoder(self.encoder(x))``, each site on the call of the child that holds it).
        example_size: samples of the held example.
        check_output: keep only the revivals that leave the network's output on the example unchanged (in
            evaluation mode), and revive only units dead in evaluation mode too.

    Example::

        from lightning import Trainer
        from lightning_relu.monitor import DeadUnitMonitor
        from lightning_relu.revive import DeadUnitReviver

        trainer = Trainer(callbacks=[DeadUnitMonitor(), DeadUnitReviver(max_fraction=0.5)])
        trainer.fit(model)
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        max_fraction: float = 1.0,
        exclude: Sequence[str] = (),
        init: Literal["default", "kaiming", "rai"] = "default",
        seed: int | None = None,
        input_fn: Callable[[Any], Any] | None = None,
        example_size: int = 64,
        check_output: bool = True,
    ) -> None:
        if input_fn is not None and not callable(input_fn):
            raise ValueError(f"`input_fn` must be callable or None, got {input_fn!r}")
        if isinstance(example_size, bool) or not isinstance(example_size, int) or example_size < 1:
            raise ValueError(f"`example_size` must be a positive integer, got {example_size!r}")
        if not isinstance(check_output, bool):
            raise ValueError(f"`check_output` must be a bool, got {check_output!r}")
        self.input_fn = input_fn
        self.example_size = example_size
        self.check_output = check_output
        # a copy of the example held on an epoch's last batch, saved with a checkpoint taken there: a fit resumed from
        # it revives that epoch on the same example as the uninterrupted fit (see `DeadUnitMonitor.on_train_start`)
        self._epoch_example: Any = None
        self._inputs = TrainingInputWatch()  # the latest training batch and the step's call into the model
        self._example_checked = False
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"`every_n_epochs` must be a positive integer, got {every_n_epochs!r}")
        _check_fraction(max_fraction)
        excluded = _as_names(exclude, "exclude")
        if init not in INIT_MODES:
            raise ValueError(f"`init` can be {', '.join(map(repr, INIT_MODES))}, got {init!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"`seed` must be a non-negative integer or None, got {seed!r}")
        self.every_n_epochs = every_n_epochs
        self.max_fraction = float(max_fraction)
        self.exclude: list[str] = sorted(excluded)
        self.init = init
        self.seed = seed
        self.history: list[dict[str, Any]] = []
        self._earlier: dict[str, int] = {}  # units revived per site by revivals not in `history` (a checkpoint's)
        self._stage: str | None = None  # the stage set up last: a state loaded outside `fit` is not this fit's
        self._resolved_seed: int | None = seed
        self._monitor: DeadUnitMonitor | None = None
        self._sites: list[Site] | None = None  # the sites of `_sites_model`, found once per fit
        self._sites_model: nn.Module | None = None
        self._warned: set[str] = set()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_epochs=self.every_n_epochs, max_fraction=self.max_fraction, exclude=self.exclude, init=self.init
        )

    @property
    def last_revived(self) -> dict[str, int] | None:
        """The latest revival's counts per site (``None`` before the first)."""
        return dict(self.history[-1]["revived"]) if self.history else None

    @property
    def total_revived(self) -> int:
        """Units revived over the fit (a resumed fit: since the start of the fit it resumes)."""
        return sum(self.revived_per_site.values())

    @property
    def revived_per_site(self) -> dict[str, int]:
        """Units revived per site over the fit (a resumed fit: since the start of the fit it resumes), in the order
        the sites were first revived."""
        totals = dict(self._earlier)
        for entry in self.history:
            for name, count in entry["revived"].items():
                totals[name] = totals.get(name, 0) + int(count)
        return totals

    # --------------------------------------------------------------- wiring
    @property
    def monitor(self) -> DeadUnitMonitor | None:
        """The monitor whose reports this reviver acts on (``None`` while it follows none)."""
        return self._monitor

    def attach(self, monitor: DeadUnitMonitor, pl_module: nn.Module | None = None) -> None:
        """Act on ``monitor``'s reports from now on (idempotent; replaces a previous monitor).

        The monitor drives its reviver: after each epoch's report it calls :meth:`revive_after_report`. A reviver
        that is not itself among the Trainer's callbacks becomes the monitor's
        :attr:`~lightning_relu.DeadUnitMonitor.reviver`, as with ``DeadUnitMonitor(revive=reviver)`` (whose
        ``setup`` calls this method); ``ValueError`` when the monitor holds another reviver. A reviver in the
        Trainer's callbacks needs no call: its ``setup`` follows the monitor it finds there. With ``pl_module``,
        the ``exclude`` names are checked against the model's sites (``ValueError``).
        """
        if not _publishes_reports(monitor):
            raise ValueError(f"`monitor` must be a `DeadUnitMonitor`, got {type(monitor).__name__}")
        held = getattr(monitor, "reviver", None)
        if held is not None and held is not self:
            raise ValueError(
                f"`monitor` drives another `DeadUnitReviver` already ({held!r}): give each monitor one reviver"
            )
        self._follow(monitor, pl_module)
        if held is None:
            monitor.reviver = self

    def _follow(self, monitor: DeadUnitMonitor, pl_module: nn.Module | None) -> None:
        """Take ``monitor``'s sites and act on its reports (the monitor calls :meth:`revive_after_report`)."""
        # the monitor's tracker found the sites already (with tracing, as revival needs): one discovery per fit
        tracker: Any = getattr(monitor, "tracker", None)
        traced = getattr(monitor, "trace", False) is True and tracker is not None and tracker.model is pl_module
        self._sites = list(tracker.all_sites) if traced else None
        self._sites_model = pl_module if traced else None
        if pl_module is not None:
            self._check_exclude(pl_module)
        if self._monitor is not None and self._monitor is not monitor:
            self.detach()
        self._monitor = monitor

    def detach(self) -> None:
        """Stop following the monitor and watching the training steps (idempotent). A monitor that holds this reviver
        as its ``reviver`` has it follow again in its next fit's ``setup`` (set ``monitor.reviver = None`` to stop)."""
        self._inputs.stop()
        self._monitor = None

    # ------------------------------------------------------------ lifecycle
    def _start_afresh(self) -> None:
        """Forget what an earlier fit left (its revivals, its drawn seed)."""
        self.history = []
        self._earlier = {}
        self._epoch_example = None
        self._inputs.forget()
        self._example_checked = False
        self._warned.clear()
        self._resolved_seed = self.seed

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stage = stage
        if stage != "fit":
            return
        if starts_afresh(trainer):
            self._start_afresh()
        monitors = [cb for cb in trainer.callbacks if _publishes_reports(cb)]  # type: ignore[attr-defined]
        if self._monitor is not None and self._monitor in monitors:
            monitors = [self._monitor]
        if not monitors:
            raise MisconfigurationException(
                "`DeadUnitReviver` acts on the report of a `DeadUnitMonitor`, but the Trainer has none: add one, "
                "`Trainer(callbacks=[DeadUnitMonitor(), DeadUnitReviver()])`, or use `DeadUnitMonitor(revive=True)`."
            )
        if len(monitors) > 1:
            raise MisconfigurationException(
                f"`DeadUnitReviver` found {len(monitors)} `DeadUnitMonitor`s in the Trainer's callbacks and cannot "
                "tell which one to follow: give the reviver to one of them, "
                "`DeadUnitMonitor(revive=DeadUnitReviver())`."
            )
        self._follow(monitors[0], pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # what revival cannot write into (sharded by `configure_model`, before this hook): refused now, not at the first
        # epoch's end; FSDP2 is written through
        write_through(pl_module, "DeadUnitReviver", "pl_module", trainer=trainer)  # DeepSpeedStrategy too

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.detach()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.detach()

    @override
    def state_dict(self) -> dict[str, Any]:
        """Of a size that does not grow with the epochs: the latest revival, the totals per site, the seed drawn and
        the example held for the epoch in progress (every revival is in the loggers, ``revived/...``)."""
        last = self.history[-1] if self.history else None
        return {
            "last": None if last is None else _entry(last),
            "totals": self.revived_per_site,
            "seed": self._resolved_seed,
            "example": _examples_state(self._epoch_example),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if restored_outside_fit(self):
            return  # `validate`/`test`/`predict` from a checkpoint: the fit's history stays as it is
        entries = [_entry(e) for e in state_dict.get("history", []) or [] if isinstance(e, dict)]  # older versions
        last = state_dict.get("last")
        if isinstance(last, dict):
            entries = [_entry(last)]
        totals: dict[str, int] = {}
        for entry in entries:
            for name, count in entry["revived"].items():
                totals[name] = totals.get(name, 0) + count
        saved = state_dict.get("totals")
        if isinstance(saved, dict):
            totals = {str(name): int(count) for name, count in saved.items()}
        if getattr(self.monitor, "_training_began", False):  # restored within the fit (see the monitor's)
            self.history = continued_history(self.history, entries[-1:], lambda e: (e["epoch"], e["global_step"]))
        else:
            self.history = entries[-1:]
        self._earlier = dict(totals)
        for entry in self.history:
            for name, count in entry["revived"].items():
                self._earlier[name] = self._earlier.get(name, 0) - count
        if self.seed is None and state_dict.get("seed") is not None:
            self._resolved_seed = int(state_dict["seed"])
        self._epoch_example = _examples_from_state(state_dict.get("example"))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._inputs.batch_start(pl_module, watch_calls=self.input_fn is None)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._inputs.batch_end(batch)  # a reference; the slice is taken when a revival needs it
        if not trainer.is_last_batch and self._example_checked:
            self._epoch_example = None
            return
        examples = self._examples_of(trainer)
        # the epoch's revival acts on these examples: a copy goes into a checkpoint taken before the epoch's end
        self._epoch_example = [_copied(e) for e in examples] if trainer.is_last_batch else None
        if not self._example_checked:
            # the first batch tells whether the model can be observed on it: fail now, not after an epoch
            self._example_checked = True
            try:
                sites = self._sites if self._sites_model is pl_module else None
                if sites:  # only the calls that hold sites: not a metric or a loss module the step also calls
                    examples = [example for example, _ in split_by_call({s.name: s for s in sites}, examples)]
                with self._monitor_paused():  # whichever of the two runs its batch end first
                    for example in examples:
                        observe(pl_module, example, sites=sites)
            except ObservationError as error:
                raise MisconfigurationException(
                    f"`DeadUnitReviver` observes the model on a slice of the training batch to find each site's "
                    f"producer and consumers, and that failed: {error}. Pass `input_fn=` to take the model's input "
                    "out of a batch (a tensor, a tuple of positional arguments or a dict of keyword arguments)."
                ) from error

    def _examples_of(self, trainer: pl.Trainer) -> list[Any]:
        """The held examples: the outermost calls the latest training step made into the model (its forward, or
        each child it called, as ``self.decoder(self.encoder(x))``), else (with `input_fn`, or when no call was
        seen) the latest batch's input; cut to `example_size` samples, as the step got them."""
        calls: list[Any] = self._inputs.calls(self.example_size)
        if calls:
            return calls
        if self._inputs.batch is None:  # a fit resumed from a checkpoint taken on an epoch's last batch: its examples
            held = self._epoch_example or [None]  # none held: revival reads `nn.Sequential` order
            return [_copied(example, trainer.lightning_module.device) for example in held]
        batch = trainer.precision_plugin.convert_input(self._inputs.batch)
        return [example_from_batch(batch, self.input_fn, self.example_size)]

    @contextmanager
    def _monitor_paused(self) -> Iterator[None]:
        """The monitor's tracker paused while the reviver runs forwards of its own: they are not training data."""
        tracker: Any = getattr(self._monitor, "tracker", None)
        paused = tracker is not None and tracker.enabled
        if paused:
            tracker.pause()
        try:
            yield
        finally:
            if paused:
                tracker.resume()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_inputs"] = TrainingInputWatch()  # a batch and hooks on the model: not pickled
        state["_epoch_example"] = None
        state["_monitor"] = None  # the link is re-made in `setup`/`attach`
        state["_sites"] = state["_sites_model"] = None  # they hold the model's modules
        return state

    # --------------------------------------------------------------- acting
    def _check_exclude(self, pl_module: nn.Module) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SiteTracingWarning)  # the monitor has said it already
            if self._sites is None or self._sites_model is not pl_module:
                self._sites, self._sites_model = find_relu_sites(pl_module), pl_module
            names = [site.name for site in self._sites]
        # later call positions and functional calls show up on the first forward only: a name is checked against
        # the names the model's site keys can have
        functional = pl_module if may_call_rectifiers(pl_module) else None
        unknown = unknown_names(self.exclude, self._sites, module_names(pl_module), functional)
        if unknown:
            raise ValueError(f"`exclude` has unknown site names {unknown}; the model's sites are {names}")

    def _generator(self, trainer: pl.Trainer, epoch: int) -> torch.Generator:
        if self._resolved_seed is None:
            # every rank must draw the same numbers: take rank zero's seed
            self._resolved_seed = int(trainer.strategy.broadcast(torch.initial_seed() % 2**62, src=0))
        return torch.Generator().manual_seed((self._resolved_seed + epoch) % 2**63)

    def revive_after_report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, report: EpochReport) -> None:
        """Revive the dead units of ``report``, one epoch's report reduced across processes, after every
        ``every_n_epochs``-th epoch. The monitor the reviver follows calls it on every rank, right after it has
        logged the report (not a Lightning hook)."""
        try:
            self._revive_after(trainer, pl_module, report)
        finally:
            self._epoch_example = None  # used now, or never: the next epoch holds its own

    def _revive_after(self, trainer: pl.Trainer, pl_module: pl.LightningModule, report: EpochReport) -> None:
        if (report.epoch + 1) % self.every_n_epochs != 0:
            return
        nonfinite = list(getattr(report, "nonfinite_sites", []))
        if getattr(report, "partial", False) or nonfinite:
            why = (
                f"sites {nonfinite} produced NaN or Inf"
                if nonfinite
                else f"its counts are partial ({getattr(report, 'partial_reason', '')})"
            )
            rank_zero_warn(
                f"`DeadUnitReviver` revived nothing after epoch {report.epoch}: {why}, and no remedy acts on such a "
                "report.",
                category=RevivalWarning,
            )
            return
        generator = self._generator(trainer, report.epoch)
        layers = dict(report.layers)
        # every rank operates on rank zero's held batch, so every rank makes the same surgery
        examples = self._examples_of(trainer)
        examples = trainer.strategy.broadcast(examples, src=0) if trainer.world_size > 1 else examples
        counts: dict[str, int] = {}
        with self._monitor_paused(), warnings.catch_warnings(record=True) as caught:  # its forwards are not data
            warnings.simplefilter("always", RevivalWarning)
            warnings.simplefilter("ignore", SiteTracingWarning)
            for example, part in split_by_call(layers, examples):
                counts.update(
                    revive_dead_units_(
                        pl_module,
                        part,
                        trainer.optimizers,
                        init=self.init,
                        max_fraction=self.max_fraction,
                        exclude=self.exclude,
                        generator=generator,
                        sites=self._sites if self._sites_model is pl_module else None,
                        example_input=example,
                        check_output=self.check_output,
                    )
                )
        if trainer.world_size > 1 and write_through(pl_module, "DeadUnitReviver", "pl_module", trainer=trainer) is None:
            # replicas (DDP): every rank made the surgery on rank 0's example, but what it reads of its own state
            # (BatchNorm statistics, dropout's generator) can differ; every rank takes rank 0's result
            agree_with_rank_zero(pl_module, trainer.optimizers)
            counts = trainer.strategy.broadcast(counts, src=0)
        for warning in caught:
            message = str(warning.message)
            if not issubclass(warning.category, RevivalWarning):
                warnings.warn_explicit(message, warning.category, warning.filename, warning.lineno)
            elif message not in self._warned:
                self._warned.add(message)
                rank_zero_warn(message, category=RevivalWarning)
        entry = {"epoch": report.epoch, "global_step": trainer.global_step, "revived": counts}
        self.history.append(entry)
        metrics = {f"revived/{name}": float(count) for name, count in counts.items()}
        metrics["revived/total"] = float(sum(counts.values()))
        trainer.callback_metrics.update({key: torch.tensor(value) for key, value in metrics.items()})
        self._log(trainer, report, metrics)

    @rank_zero_only
    def _log(self, trainer: pl.Trainer, report: EpochReport, metrics: dict[str, float]) -> None:
        for logger in trainer.loggers:  # with the report the units were revived after, as the monitor logs it
            log_epoch_scalars(logger, report, metrics)
