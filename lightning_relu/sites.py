"""Discovery of rectifier sites and of the layers that feed them.

A *site* is one place where a rectifier is applied. Everything else in the package (measurement,
initialization, revival) is built on the list that :func:`find_relu_sites` returns.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = [
    "NORM_TYPES",
    "PRODUCER_TYPES",
    "RECTIFIER_TYPES",
    "Consumer",
    "Site",
    "SiteTracingWarning",
    "find_relu_sites",
]


class SiteTracingWarning(UserWarning):
    """Part of a model could not be traced: functional rectifier calls in it are not seen."""


#: Rectifier modules that make a site.
RECTIFIER_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
#: Affine layers that can compute a site's pre-activation.
PRODUCER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Normalization layers that may sit between a producer and its site.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
)
# Modules that pass the pre-activation through unchanged.
_TRANSPARENT_TYPES: tuple[type[nn.Module], ...] = (nn.Identity,)
# Modules between a site and its consumer that map a zero unit to zero and keep units apart.
_PASS_THROUGH_TYPES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)


@dataclass(eq=False)
class Consumer:
    """A layer that reads a site's output.

    Attributes:
        name: qualified name of the layer.
        module: the Linear/ConvNd layer.
        through_flatten: the site's output reaches it through ``nn.Flatten``: each unit (channel) owns a
            contiguous block of ``module.in_features // num_units`` input columns.
    """

    name: str
    module: nn.Module
    through_flatten: bool = False


@dataclass(eq=False, repr=False)
class Site:
    """One place where a rectifier is applied.

    Attributes:
        name: qualified name of the rectifier module in the model (``"encoder.3"``); for a functional call,
            ``<parent>.<relu|relu6>[_<k>]``, the k-th functional call in the forward of module ``parent``.
        module: the rectifier module itself (``None`` for a functional call).
        producer: the Linear/ConvNd layer computing the pre-activation, when it can be determined.
        producer_name: qualified name of ``producer``.
        norm: a BatchNorm/LayerNorm/GroupNorm layer between ``producer`` and the rectifier, if any.
        norm_name: qualified name of ``norm``.
        consumers: the Linear/ConvNd layers that read the site's output (directly or through pooling,
            dropout or flatten), where the data flow is certain; empty otherwise.
        num_units: number of units (output features or channels), when known before the first forward.
        unit_dim: dimension of the activation that indexes units: ``1`` for convolutions (channels), ``-1``
            for dense layers and sequences (last dimension), ``None`` when it is inferred from the first
            activation (``-1`` for 2-D outputs, ``1`` otherwise).
        call_index: which call of ``module`` this site is within one run of the forward that applies it (the
            module's parent, or for one registered under several names the closest module holding them all): a
            module applied at several places of that forward is one site per place, named ``<module name>_<k>``
            for the k-th call (k >= 1); a block run several times has the same sites in every run, and their
            counts add up. For a functional site, its position among the functional rectifier calls of one run of
            ``parent``'s forward.
        kind: ``"module"`` for an ``nn.ReLU``/``nn.ReLU6`` call, ``"function"`` for ``F.relu``, ``torch.relu``,
            ``Tensor.relu``, their in-place forms and ``F.relu6``.
        parent: for a functional site, the module whose ``forward`` makes the call.
        parent_name: qualified name of ``parent``.
        callees: for a functional site, the qualified names of the modules that ``parent``'s forward calls, as
            traced (calls made inside them are theirs, not the parent's).
    """

    name: str
    module: nn.Module | None
    producer: nn.Module | None = None
    producer_name: str | None = None
    norm: nn.Module | None = None
    norm_name: str | None = None
    consumers: list[Consumer] = field(default_factory=list)
    num_units: int | None = None
    unit_dim: int | None = None
    call_index: int = 0
    kind: str = "module"
    parent: nn.Module | None = None
    parent_name: str | None = None
    callees: tuple[str, ...] = ()

    def __repr__(self) -> str:
        what = type(self.module).__name__ if self.module is not None else "function"
        parts = [f"name={self.name!r}", f"module={what}"]
        if self.producer_name is not None:
            parts.append(f"producer={self.producer_name!r}")
        if self.norm_name is not None:
            parts.append(f"norm={self.norm_name!r}")
        if self.consumers:
            parts.append(f"consumers={[c.name for c in self.consumers]!r}")
        parts.append(f"num_units={self.num_units}")
        parts.append(f"unit_dim={self.unit_dim}")
        return f"Site({', '.join(parts)})"


def find_relu_sites(model: nn.Module, trace: bool = True, *, example_input: Any = None) -> list[Site]:
    """Find every place where ``model`` applies a rectifier.

    Module sites (``nn.ReLU``, ``nn.ReLU6``) come from the module tree. With ``trace=True`` the model is
    also traced with ``torch.fx`` (where that fails, its children are, recursively), which adds:

    - functional calls in ``forward`` (``F.relu``, ``torch.relu``, ``Tensor.relu``, in-place forms,
      ``F.relu6``) as sites of kind ``"function"``;
    - one site per later call position of a module applied at several places (``<name>_<k>``);
    - producer and consumer links outside ``nn.Sequential`` (residual blocks, custom modules).

    Producers and consumers are linked only where the data flow is certain: inside ``nn.Sequential``
    containers, nested ones included, or in the traced graph where the pre-activation feeds nothing else
    and the site's output feeds only Linear/ConvNd layers (through pooling, dropout or flatten). A layer applied
    more or less often than the site runs (a layer shared with another path) is not linked: acting on it for this
    site would change its other places, and neither is a layer sharing a parameter with another. Without a
    whole-model trace, a layer counts as applied once per place it holds in the ``nn.Sequential`` chains; a ReLU
    module registered under several names gets no chain links (the trace links each of its call positions).
    A part of the model that cannot be traced gets one :class:`SiteTracingWarning` when its ``forward``
    may call a rectifier function; its module sites are still found.

    Sites come in forward order when the whole model traces, in registration order otherwise.

    With ``example_input`` (what the model's forward takes: a tensor, a tuple of positional arguments or a dict of
    keyword arguments), the links come from one real forward observed on it instead
    (:func:`lightning_relu.structure.observe`): producers through any module nesting, fused norm-activation layers
    and weights computed from a parameter; the rules above then do not apply. A site the forward does not reach, or
    one without a single producer, gets no links.

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> find_relu_sites(net)
    [Site(name='1', module=ReLU, producer='0', consumers=['2'], num_units=8, unit_dim=-1)]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a `torch.nn.Module`, got {type(model).__name__}")
    if not isinstance(trace, bool):
        raise ValueError(f"`trace` must be a bool, got {trace!r}")
    if example_input is not None:
        return _observed_sites(model, trace, example_input)
    chains = _sequential_chains(model)
    # without a trace, a layer is applied once per place it holds in the `nn.Sequential` chains (another name for
    # it, an attribute kept as a handle, is not an application)
    registrations = Counter(id(module) for chain in chains for _, module in chain)
    position: dict[int, tuple[list[tuple[str, nn.Module]], int]] = {}
    for chain in chains:
        for index, (_, module) in enumerate(chain):
            position.setdefault(id(module), (chain, index))

    # a rectifier registered under several names is applied at several places: which of its call positions a
    # chain's neighbours feed is for the trace to say, per position
    names = Counter(id(module) for _, module in model.named_modules(remove_duplicate=False))
    sites = []
    for name, module in model.named_modules():
        if not isinstance(module, RECTIFIER_TYPES):
            continue
        site = Site(name=name, module=module)
        if id(module) in position and names[id(module)] == 1:
            chain, index = position[id(module)]
            _link_backward(site, chain, index)
            _link_forward(site, chain, index)
        _fill_shape(site)
        sites.append(site)
    uses = registrations
    if trace and not _built_in_only(model):
        sites, traced_uses, complete = _add_traced(model, sites)
        # a whole-model trace counts every call; otherwise a layer counts as applied as often as the chains or the
        # traced parts say, whichever is more
        uses = traced_uses if complete else registrations | traced_uses
    places = Counter(id(site.module) for site in sites if site.module is not None)
    tied = _tied_modules(model)
    for site in sites:
        # how many times this site runs per forward: its rectifier's calls shared among its call positions
        runs = uses[id(site.module)] / places[id(site.module)] if site.module is not None else 1
        _drop_shared_links(site, uses, runs, tied)
    return sites


def _observed_sites(model: nn.Module, trace: bool, example_input: Any) -> list[Site]:
    """The sites, with producer, norm and consumer links taken from one observed forward
    (:func:`lightning_relu.structure.observe`) instead of ``nn.Sequential`` order and the trace: a site the forward
    does not reach, or one without a single producer, gets no links."""
    from lightning_relu.structure import observe

    structure = observe(model, example_input)
    modules = dict(model.named_modules())
    found = []
    for site in find_relu_sites(model, trace):
        observed = structure.sites.get(site.name)
        site.producer = site.producer_name = site.norm = site.norm_name = None
        site.consumers = []
        if observed is not None:
            site.num_units = observed.num_units
            site.unit_dim = -1 if observed.unit_dim == _observed_ndim(structure, site.name) - 1 else observed.unit_dim
            if observed.producer is not None:
                site.producer_name = observed.producer.name
                site.producer = observed.producer.weight.module
                if observed.norms:
                    site.norm_name = observed.norms[-1].name
                    site.norm = modules.get(observed.norms[-1].name)
            if not observed.reader_problems:
                site.consumers = [Consumer(name=c.name, module=c.weight.module) for c in observed.consumers]
        found.append(site)
    return found


def _observed_ndim(structure: Any, name: str) -> int:
    """The number of dimensions of a site's output in an observation (2 where it is not known)."""
    return int(structure.ndims.get(name, 2))


def _tied_modules(model: nn.Module) -> set[int]:
    """The modules (by id) holding a parameter that another module holds too (tied weights: a head sharing an
    embedding's matrix)."""
    holders: dict[int, set[int]] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for parameter in module._parameters.values():
            if parameter is not None:
                holders.setdefault(id(parameter), set()).add(id(module))
    return {
        id(module)
        for module in model.modules()
        if any(p is not None and len(holders[id(p)]) > 1 for p in module._parameters.values())
    }


def rectifier_owners(model: nn.Module) -> dict[int, str]:
    """For each rectifier module (by id), the qualified name of the closest module that holds every name it is
    registered under: the module whose forward applies it ("" for the model). A site is a call position within one
    forward of that owner."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, RECTIFIER_TYPES):
            names.setdefault(id(module), []).append(name)
    return {key: _common_prefix({name.rpartition(".")[0] for name in found}) for key, found in names.items()}


def _common_prefix(parents: set[str]) -> str:
    """The qualified name of the closest module holding every one of ``parents`` ("" for the model)."""
    split = [parent.split(".") if parent else [] for parent in parents]
    prefix: list[str] = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1:
            break
        prefix.append(parts[0])
    return ".".join(prefix)


def _drop_shared_links(site: Site, uses: Counter[int], runs: float, tied: set[int]) -> None:
    """Forget links to layers applied more (or less) often than the site runs, or sharing a parameter with another
    layer: such a layer has another place, where re-drawing its rows or zeroing its columns for this site would
    change what it computes. An ``nn.Sequential`` run several times keeps its links: its sites count every run, and
    so see a unit dead only when it is dead in every run."""

    def shared(module: nn.Module) -> bool:
        return uses[id(module)] != runs or id(module) in tied

    if any(shared(module) for module in (site.producer, site.norm) if module is not None):
        site.producer = site.producer_name = site.norm = site.norm_name = None
    if any(shared(consumer.module) for consumer in site.consumers):
        site.consumers = []


def _built_in_only(model: nn.Module) -> bool:
    """Every module is a ``torch.nn`` built-in: no custom ``forward`` can call a rectifier function, and the
    ``nn.Sequential`` chains already give every link, so tracing would add nothing."""
    if not all(type(module).__module__.startswith("torch.nn.") for module in model.modules()):
        return False
    # a rectifier registered at several places is applied at several places: tracing numbers them
    rectifiers = [id(m) for _, m in model.named_modules(remove_duplicate=False) if isinstance(m, RECTIFIER_TYPES)]
    return len(rectifiers) == len(set(rectifiers))


def _add_traced(model: nn.Module, sites: list[Site]) -> tuple[list[Site], Counter[int], bool]:
    from lightning_relu._trace import mentions_relu, trace_model
    from lightning_relu.structure import preserved_state

    # tracing may run modules for real (a traced BatchNorm counts a batch): their buffers and the RNG come back
    with preserved_state(model):
        result = trace_model(model, RECTIFIER_TYPES + PRODUCER_TYPES + NORM_TYPES, rectifier_owners(model))
    for name, module, error in result.failures:
        if not mentions_relu(module):
            continue
        where = f"submodule {name!r}" if name else "the model"
        warnings.warn(
            f"Could not trace {where} ({type(module).__name__}) with torch.fx: {type(error).__name__}: {error}. "
            "Functional rectifier calls (`F.relu`, `torch.relu`, `x.relu()`) in its forward are not counted, and "
            "its ReLU modules get no producer/consumer links; its `nn.ReLU` modules are still counted. To watch "
            "those calls, use `nn.ReLU` modules in that forward.",
            SiteTracingWarning,
            stacklevel=3,
        )
    modules = dict(model.named_modules())
    by_name = {site.name: site for site in sites}
    functional: dict[tuple[str, int], Site] = {}
    order: dict[str, int] = {}
    for call in result.calls:
        links = call.links
        if call.kind == "module":
            name = call.module_name if call.index == 0 else f"{call.module_name}_{call.index}"
            while name in by_name and by_name[name].module is not modules.get(call.module_name):
                name += "_mod"  # a functional site has the name (its parent's calls were traced first)
            site = by_name.get(name)
            if site is None:
                rectifier = modules.get(call.module_name)
                if rectifier is None:
                    continue
                site = Site(name=name, module=rectifier, call_index=call.index)
                by_name[name] = site
                sites.append(site)
        elif (call.module_name, call.index) in functional:  # the same call in another run of its parent's forward
            site = functional[call.module_name, call.index]
        else:
            parent_name = call.module_name
            local = call.base if call.name_index == 0 else f"{call.base}_{call.name_index}"
            name = f"{parent_name}.{local}" if parent_name else local
            while name in by_name:
                name += "_fn"
            site = Site(
                name=name,
                module=None,
                call_index=call.index,
                kind="function",
                parent=modules.get(parent_name, model),
                parent_name=parent_name,
                callees=tuple(sorted(result.callees.get(parent_name, ()))),
            )
            by_name[name] = site
            functional[parent_name, call.index] = site
            sites.append(site)
        order.setdefault(site.name, call.order)
        if site.producer is None and site.norm is None and not site.consumers:
            _apply_links(site, links, modules)
    if result.complete:
        sites.sort(key=lambda s: order.get(s.name, len(order)))
    return sites, result.module_uses, result.complete


def _apply_links(site: Site, links: Any, modules: dict[str, nn.Module]) -> None:
    if links.norm is not None:
        site.norm_name, site.norm = links.norm, modules[links.norm]
    if links.producer is not None:
        site.producer_name, site.producer = links.producer, modules[links.producer]
    site.consumers = [Consumer(name=n, module=modules[n], through_flatten=f) for n, f in links.consumers]
    site.num_units = site.unit_dim = None
    _fill_shape(site)
    if site.unit_dim is None:
        site.unit_dim = links.unit_dim


def _sequential_chains(model: nn.Module) -> list[list[tuple[str, nn.Module]]]:
    """Flatten every outermost ``nn.Sequential`` (and the ones nested in it) into a list of leaves."""
    chains: list[list[tuple[str, nn.Module]]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        if isinstance(module, nn.Sequential):
            chains.append(list(_flatten(prefix, module)))
            # modules inside non-Sequential children may hold their own Sequentials
            for name, child in _flatten(prefix, module):
                if not isinstance(child, nn.Sequential):
                    for sub_name, sub in child.named_children():
                        visit(_join(name, sub_name), sub)
            return
        for name, child in module.named_children():
            visit(_join(prefix, name), child)

    visit("", model)
    return chains


def _flatten(prefix: str, seq: nn.Sequential) -> Iterator[tuple[str, nn.Module]]:
    for name, child in seq.named_children():
        full = _join(prefix, name)
        if isinstance(child, nn.Sequential):
            yield from _flatten(full, child)
        else:
            yield full, child


def _join(prefix: str, name: str) -> str:
    """Qualified name of ``name`` under ``prefix`` (either may be empty, meaning the model itself)."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _link_backward(site: Site, chain: list[tuple[str, nn.Module]], index: int) -> None:
    j = index - 1
    while j >= 0 and isinstance(chain[j][1], _TRANSPARENT_TYPES):
        j -= 1
    if j >= 0 and isinstance(chain[j][1], NORM_TYPES):
        site.norm_name, site.norm = chain[j]
        j -= 1
        while j >= 0 and isinstance(chain[j][1], _TRANSPARENT_TYPES):
            j -= 1
    if j >= 0 and isinstance(chain[j][1], PRODUCER_TYPES):
        site.producer_name, site.producer = chain[j]


def _link_forward(site: Site, chain: list[tuple[str, nn.Module]], index: int) -> None:
    through_flatten = False
    for name, module in chain[index + 1 :]:
        if isinstance(module, _PASS_THROUGH_TYPES):
            continue
        if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
            through_flatten = True
            continue
        if isinstance(module, PRODUCER_TYPES):
            site.consumers.append(Consumer(name=name, module=module, through_flatten=through_flatten))
        return


def _fill_shape(site: Site) -> None:
    producer, norm = site.producer, site.norm
    if isinstance(producer, nn.Linear):
        site.num_units, site.unit_dim = producer.out_features, -1
    elif isinstance(producer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        site.num_units, site.unit_dim = producer.out_channels, 1
    if isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) > 1:
        width = int(norm.normalized_shape[0])  # over (C, ...): the channels are the units
        if site.unit_dim is None:
            site.unit_dim = 1
    elif isinstance(norm, nn.LayerNorm):
        width = int(norm.normalized_shape[-1])
        if site.unit_dim is None:
            site.unit_dim = -1
    elif isinstance(norm, nn.GroupNorm):
        width = norm.num_channels
        if site.unit_dim is None:
            site.unit_dim = 1
    elif norm is not None:
        width = int(norm.num_features)  # type: ignore[arg-type]
        if site.unit_dim is None:
            site.unit_dim = 1
    else:
        return
    if site.num_units is None:
        site.num_units = width
    elif isinstance(norm, (nn.LayerNorm,)) and len(norm.normalized_shape) > 1:
        pass  # LayerNorm over (C, H, W): the producer's channel count is the unit count
    elif width != site.num_units:
        # the layers are not what they seem (a reshape in between); do not guess
        site.producer = site.producer_name = site.norm = site.norm_name = None
        site.num_units = site.unit_dim = None
        site.consumers = []
