"""Discovery of rectifier sites and of the layers that feed them: :func:`find_relu_sites`.

A *site* is one place where a rectifier is applied (:class:`Site`, identified by its :class:`SiteKey`). Everything
else in the package (measurement, initialization, revival, compaction) is built on the list that
:func:`find_relu_sites` returns: from one observed forward (:func:`lightning_relu.structure.observe`) when given an
example input, else from the module tree (:func:`lightning_relu.site.module_sites`). The site's record and the
tables live in :mod:`lightning_relu.site`, below the measurement; this module sits above the observation.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_relu.site import (
    FUNCTIONAL_RECTIFIERS,
    NORM_TYPES,
    PRODUCER_TYPES,
    RECTIFIER_TYPES,
    Consumer,
    Site,
    SiteKey,
    SiteTracingWarning,
    may_call_rectifiers,
    module_sites,
)

__all__ = [
    "FUNCTIONAL_RECTIFIERS",
    "NORM_TYPES",
    "PRODUCER_TYPES",
    "RECTIFIER_TYPES",
    "Consumer",
    "Site",
    "SiteKey",
    "SiteTracingWarning",
    "find_relu_sites",
    "may_call_rectifiers",
]


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
    return module_sites(model)


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
        site.offset = observed.offset
        site.scale = observed.scale
        site.uneven_scale = observed.uneven_scale
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

