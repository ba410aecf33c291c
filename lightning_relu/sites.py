"""Discovery of rectifier sites and of the layers that feed them.

A *site* is one place where a rectifier is applied. Everything else in the package (measurement,
initialization, revival) is built on the list that :func:`find_relu_sites` returns.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_relu._compat import is_compiled

__all__ = [
    "FUNCTIONAL_RECTIFIERS",
    "NORM_TYPES",
    "PRODUCER_TYPES",
    "RECTIFIER_TYPES",
    "Consumer",
    "Site",
    "SiteTracingWarning",
    "find_relu_sites",
]


class SiteTracingWarning(UserWarning):
    """Kept for compatibility: the ``torch.fx`` trace that raised it is gone (sites are found on a real forward)."""


#: Functions and methods that apply a rectifier, as ``__torch_function__`` sees them: each call is a site of kind
#: ``"function"``.
FUNCTIONAL_RECTIFIERS: dict[Any, str] = {
    F.relu: "relu",
    F.relu_: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    torch.Tensor.relu: "relu",
    torch.Tensor.relu_: "relu",
    F.relu6: "relu6",
}

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
        callees: for a functional site, the qualified names of the modules that ``parent``'s forward called in the
            forward that found it (calls made inside them are theirs, not the parent's).
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

    With ``example_input`` (what the model's forward takes: a tensor, a tuple of positional arguments or a dict of
    keyword arguments), one real forward is observed on it (:func:`lightning_relu.structure.observe`, no state
    changed) and the sites are the rectifier calls it makes, in the order it first reaches them: ``nn.ReLU`` and
    ``nn.ReLU6`` modules (a module applied at several places of one forward is one site per place,
    ``<name>_<k>`` for its k-th call), then functional calls (``F.relu``, ``torch.relu``, ``Tensor.relu``, their
    in-place forms, ``F.relu6``) as sites of kind ``"function"`` named ``<parent>.relu[_<k>]`` after the module
    whose own ``forward`` makes them, and last the rectifier modules the forward does not reach. Producer, norm and
    consumer links come from the observed data flow, through any module nesting, fused norm-activation layers and
    weights computed from a parameter; a site without a single producer, or whose output has a reader other than
    an affine layer, gets no producer (or consumer) link.

    Without ``example_input`` nothing runs: the sites are the rectifier modules of the module tree, in registration
    order, and links come from ``nn.Sequential`` order only (a Linear/ConvNd, optionally through a norm layer,
    right before the rectifier in the same container, nested ones included; the next Linear/ConvNd through
    pooling, dropout or flatten). Functional calls and later call positions of a module are found by a
    :class:`~lightning_relu.DeadUnitTracker` on the first forward it sees. A layer applied at several places of
    the chains, or sharing a parameter with another, is not linked.

    Args:
        model: the network.
        trace: kept for compatibility (the ``torch.fx`` trace it switched on is gone): a bool, with no effect here.
        example_input: what the model's forward takes, to observe one forward on it.

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
        return _observed_sites(model, example_input)
    return _module_sites(model)


def _module_sites(model: nn.Module) -> list[Site]:
    """The rectifier modules of the module tree, linked by ``nn.Sequential`` order."""
    chains = _sequential_chains(model)
    # a layer is applied once per place it holds in the `nn.Sequential` chains (another name for it, an attribute
    # kept as a handle, is not an application)
    uses = Counter(id(module) for chain in chains for _, module in chain)
    position: dict[int, tuple[list[tuple[str, nn.Module]], int]] = {}
    for chain in chains:
        for index, (_, module) in enumerate(chain):
            position.setdefault(id(module), (chain, index))
    # a rectifier registered under several names is applied at several places: which of its call positions a
    # chain's neighbours feed only a forward can say
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
    tied = _tied_modules(model)
    for site in sites:
        _drop_shared_links(site, uses, uses[id(site.module)], tied)
    return sites


def _observed_sites(model: nn.Module, example_input: Any) -> list[Site]:
    """The sites one observed forward (:func:`lightning_relu.structure.observe`) finds, with producer, norm and
    consumer links from its data flow."""
    from lightning_relu.structure import observe

    structure = observe(model, example_input)
    modules = dict(model.named_modules())
    reached = {name: index for index, name in enumerate(structure.sites)}
    found = sorted(structure.found, key=lambda site: reached.get(site.name, len(reached)))
    for site in found:
        observed = structure.sites.get(site.name)
        site.producer = site.producer_name = site.norm = site.norm_name = None
        site.consumers = []
        if observed is None:
            continue
        site.num_units = observed.num_units
        site.unit_dim = -1 if observed.unit_dim == _observed_ndim(structure, site.name) - 1 else observed.unit_dim
        if observed.producer is not None:
            site.producer_name = observed.producer.name
            site.producer = observed.producer.weight.module
            if observed.norms:
                site.norm_name = observed.norms[-1].name
                site.norm = modules.get(observed.norms[-1].name)
        if not observed.reader_problems:
            # a dense layer reading more columns than the site has units reads them flattened (each unit's positions)
            site.consumers = [
                Consumer(
                    name=c.name,
                    module=c.weight.module,
                    through_flatten=c.kind == "linear" and c.columns.numel() > c.units.unique().numel(),
                )
                for c in observed.consumers
            ]
    return found


def _observed_ndim(structure: Any, name: str) -> int:
    """The number of dimensions of a site's output in an observation (2 where it is not known)."""
    return int(structure.ndims.get(name, 2))


def _tied_modules(model: nn.Module) -> set[int]:
    """The modules (by id) holding a parameter that another module holds too (tied weights: a head sharing an
    embedding's matrix)."""
    holders: dict[int, set[int]] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for _, parameter in module.named_parameters(recurse=False, remove_duplicate=False):
            holders.setdefault(id(parameter), set()).add(id(module))
    return {
        id(module)
        for module in model.modules()
        if any(len(holders[id(p)]) > 1 for _, p in module.named_parameters(recurse=False, remove_duplicate=False))
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


def may_call_rectifiers(model: nn.Module) -> bool:
    """Whether a forward of ``model`` may call a rectifier function outside an ``nn.ReLU``/``nn.ReLU6``: some
    module has a ``forward`` of its own (not a ``torch.nn`` built-in), or is a built-in transformer layer."""
    return any(
        not (type(module).__module__.startswith("torch.nn.") or is_compiled(module))
        or type(module).__name__.startswith("Transformer")
        for module in model.modules()
    )


def matches_site(name: str, names: list[str]) -> bool:
    """``name`` is a site, or a later call position ``<site>_<k>`` of one."""
    if name in names:
        return True
    base, _, index = name.rpartition("_")
    return index.isdigit() and int(index) > 0 and base in names


def could_be_functional(name: str, model: nn.Module) -> bool:
    """Whether ``name`` has the form of a functional site of ``model`` (``<module>.relu``, ``relu6_2``, with the
    ``_fn`` suffixes a name collision adds): such a site is only known once a forward has found it."""
    while name.endswith("_fn"):
        name = name[: -len("_fn")]
    parent, _, local = name.rpartition(".")
    base, _, index = local.partition("_")
    if base not in ("relu", "relu6") or (index and not index.isdigit()):
        return False
    try:
        model.get_submodule(parent)
    except AttributeError:
        return False
    return True
