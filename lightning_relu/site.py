"""One rectifier site: its identity (:class:`SiteKey`), its record (:class:`Site`), the rectifier and layer tables,
and the sites a model's module tree shows before any forward runs (:func:`module_sites`).

This is the bottom of the package: the measurement (:mod:`lightning_relu.tracker`) and the observation of a forward
(:mod:`lightning_relu.observation`) build on it; :func:`lightning_relu.find_relu_sites` (in :mod:`lightning_relu.sites`)
puts the two kinds of discovery together.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_relu._compat import is_compiled

__all__ = [
    "FUNCTIONAL_RECTIFIERS",
    "MAX_POSITIONS",
    "NORM_TYPES",
    "PRODUCER_TYPES",
    "RECTIFIER_TYPES",
    "Consumer",
    "Site",
    "SiteKey",
    "SiteTracingWarning",
    "functional_names",
    "known_names",
    "later_positions",
    "may_call_rectifiers",
    "module_names",
    "module_sites",
    "rectifier_owners",
    "site_name",
    "unknown_names",
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


#: Call positions counted per rectifier module (or functional parent) and run of the forward that applies it.
MAX_POSITIONS = 64


@dataclass(frozen=True, order=True)
class SiteKey:
    """The identity of a site: where a rectifier is applied. One numbering for discovery, hooks, reports,
    checkpoints and logs; the site's display name (:attr:`Site.name`) is derived from it by :func:`site_name`.

    Attributes:
        path: qualified name of the rectifier module (``"layer1.0.relu"``); for a functional call, of the module
            whose own ``forward`` makes the call (``""`` for the model itself).
        call: call position within one run of the forward that applies it: for a module, its ``call``-th call since
            its owner's forward began (a module applied at several places is one site per place); for a functional
            call, the ``call``-th rectifier call of ``path``'s own forward (calls made inside its children are
            theirs).
        function: ``""`` for an ``nn.ReLU``/``nn.ReLU6`` module call; ``"relu"`` or ``"relu6"`` for a functional one.
        index: for a functional call, which call of ``function`` it is in ``path``'s forward, the number its display
            name shows (``-1``: the same as ``call``). Not part of the identity: it follows from the calls before.
    """

    path: str
    call: int = 0
    function: str = ""
    index: int = field(default=-1, compare=False)

    @property
    def kind(self) -> str:
        """``"module"`` or ``"function"``."""
        return "function" if self.function else "module"

    def at(self, call: int) -> SiteKey:
        """The key of call position ``call`` of the same module (or of the same parent's functional calls)."""
        return SiteKey(self.path, call, self.function)


def site_name(key: SiteKey, module_names: set[str] | frozenset[str]) -> str:
    """The display name of the site ``key`` in a model whose qualified module names are ``module_names``.

    A module's first call position is its qualified name, its ``k``-th ``<name>_<k>`` (with ``_mod`` added while
    that is another module's name); a functional call is ``<path>.<function>``, ``<path>.<function>_<k>`` for the
    ``k``-th call of ``function`` in ``path``'s forward (:attr:`SiteKey.index`), with ``_fn`` added when
    ``<path>.<function>`` names a module (an attribute ``self.relu`` beside a call of ``F.relu``) and while the name
    is a module's. The names of different keys of one model never collide, and depend on nothing but the key and
    the model's module names.
    """
    if not key.function:
        name = key.path if key.call == 0 else f"{key.path}_{key.call}"
        while key.call and name in module_names:
            name += "_mod"
        return name
    base = f"{key.path}.{key.function}" if key.path else key.function
    clash = base in module_names
    number = key.call if key.index < 0 else key.index
    name = base if number == 0 else f"{base}_{number}"
    while clash or name in module_names:
        name += "_fn"
        clash = False
    return name


def module_names(model: nn.Module) -> frozenset[str]:
    """Every qualified name a module of ``model`` is registered under."""
    return frozenset(name for name, _ in model.named_modules(remove_duplicate=False))


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
        key: the site's identity (:class:`SiteKey`); ``name`` is derived from it (:func:`site_name`). When not
            given, it is made from ``name`` (a module site) or ``parent_name`` (a functional one) and ``call_index``.
        offset: the operation that adds a constant to the pre-activation after ``producer`` (seen on an observed
            forward; ``None`` when none does, or when not observed): sign flipping cannot negate such a site.
        scale: per unit, what the output of ``norm`` (else of ``producer``) is multiplied by on its way to the
            pre-activation (``3 * fc(x)``, ``-fc(x)``, a per-channel parameter), float64 on the CPU; ``None`` for 1,
            or when not observed.
        uneven_scale: why that factor is not one per unit, when it differs between a unit's entries (seen on an
            observed forward; ``None`` otherwise): sign flipping cannot watch such a functional site.
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
    key: SiteKey = None  # type: ignore[assignment]  # set in __post_init__ when not given
    offset: str | None = None
    scale: Tensor | None = None
    uneven_scale: str | None = None

    def __post_init__(self) -> None:
        if self.key is None:
            path = (self.parent_name or "") if self.kind == "function" else self.name
            function = "relu" if self.kind == "function" else ""
            self.key = SiteKey(path, self.call_index, function)

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



def module_sites(model: nn.Module) -> list[Site]:
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


def later_positions(sites: list[Site], names: frozenset[str]) -> set[str]:
    """The display names the later call positions of ``sites`` would have (a module applied at several places of a
    forward, or a parent calling rectifier functions more often than its first forward did, has a site per place,
    created when a forward reaches it)."""
    return {site_name(site.key.at(k), names) for site in sites for k in range(1, MAX_POSITIONS)}


def known_names(sites: list[Site], names: frozenset[str], model: nn.Module | None = None) -> set[str]:
    """The display names ``sites`` have, those of their later call positions, and with ``model`` those of every
    functional site the model could have (found by a forward still to come): the names a user may give before a
    forward has created the sites."""
    known = {site.name for site in sites} | later_positions(sites, names)
    return known | functional_names(model, names) if model is not None else known


def unknown_names(
    given: Iterable[str], sites: list[Site], names: frozenset[str], model: nn.Module | None = None
) -> list[str]:
    """The names among ``given``, in order, that none of the names :func:`known_names` gives for ``sites`` (and
    ``model``) is. The sets of later positions and functional names are built only when a name is not a site's."""
    own = {site.name for site in sites}
    missing = [name for name in given if name not in own]
    if missing:
        known = known_names(sites, names, model)
        missing = [name for name in missing if name not in known]
    return missing


def functional_names(model: nn.Module, names: frozenset[str] | None = None) -> set[str]:
    """The display names every functional site of ``model`` could have: a call of each rectifier function at each
    call position of each module's forward. Such a site is only known once a forward has found it."""
    names = module_names(model) if names is None else names
    paths = dict.fromkeys(name for name, _ in model.named_modules())
    return {
        site_name(SiteKey(path, k, function), names)
        for path in paths
        for function in ("relu", "relu6")
        for k in range(MAX_POSITIONS)
    }
