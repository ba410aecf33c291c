"""Discovery of rectifier sites and of the layers that feed them.

A *site* is one place where a rectifier is applied. Everything else in the package (measurement,
initialization, revival) is built on the list that :func:`find_relu_sites` returns.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

__all__ = ["NORM_TYPES", "PRODUCER_TYPES", "RECTIFIER_TYPES", "Consumer", "Site", "find_relu_sites"]

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
        name: qualified name of the rectifier module in the model (``"encoder.3"``).
        module: the rectifier module itself.
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
        call_index: which call of ``module`` in one forward pass this site is: a module applied at several
            places is one site per place, named ``<module name>_<k>`` for the k-th call (k >= 1).
    """

    name: str
    module: nn.Module
    producer: nn.Module | None = None
    producer_name: str | None = None
    norm: nn.Module | None = None
    norm_name: str | None = None
    consumers: list[Consumer] = field(default_factory=list)
    num_units: int | None = None
    unit_dim: int | None = None
    call_index: int = 0

    def __repr__(self) -> str:
        parts = [f"name={self.name!r}", f"module={type(self.module).__name__}"]
        if self.producer_name is not None:
            parts.append(f"producer={self.producer_name!r}")
        if self.norm_name is not None:
            parts.append(f"norm={self.norm_name!r}")
        if self.consumers:
            parts.append(f"consumers={[c.name for c in self.consumers]!r}")
        parts.append(f"num_units={self.num_units}")
        parts.append(f"unit_dim={self.unit_dim}")
        return f"Site({', '.join(parts)})"


def find_relu_sites(model: nn.Module) -> list[Site]:
    """Find every rectifier module (``nn.ReLU``, ``nn.ReLU6``) in ``model``, in registration order.

    The producer of a site (and a normalization layer in between) and its consumer are found where the
    data flow is certain: inside ``nn.Sequential`` containers, nested ones included, the layers just before
    and just after the rectifier. Elsewhere ``producer`` is ``None`` and ``consumers`` is empty.

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> find_relu_sites(net)
    [Site(name='1', module=ReLU, producer='0', consumers=['2'], num_units=8, unit_dim=-1)]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a `torch.nn.Module`, got {type(model).__name__}")
    chains = _sequential_chains(model)
    position: dict[int, tuple[list[tuple[str, nn.Module]], int]] = {}
    for chain in chains:
        for index, (_, module) in enumerate(chain):
            position.setdefault(id(module), (chain, index))

    sites = []
    for name, module in model.named_modules():
        if not isinstance(module, RECTIFIER_TYPES):
            continue
        site = Site(name=name, module=module)
        if id(module) in position:
            chain, index = position[id(module)]
            _link_backward(site, chain, index)
            _link_forward(site, chain, index)
        _fill_shape(site)
        sites.append(site)
    return sites


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
    return f"{prefix}.{name}" if prefix else name


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
    if isinstance(norm, nn.LayerNorm):
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
