"""``lightning_relu._compat`` against the installed torch and Lightning: each stand-in for a missing public API does
what the package needs of it (run in every supported environment). These tests reach into the privates on purpose:
they are what ``_compat`` depends on."""

from __future__ import annotations

import inspect
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_relu._compat import BATCH_NORM_TYPES, CONV_TYPES, is_compiled, is_forward_redirected
from lightning_relu.stats import ActivationStats


class _Step(L.LightningModule):
    """Records, inside ``training_step`` and inside its own forward, whether it is seen as redirected."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 2)
        self.seen: list[tuple[str, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(("forward", is_forward_redirected(self)))
        return self.layer(x)

    def training_step(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(("training_step", is_forward_redirected(self)))
        return self(x).sum()


class _Wrapper(nn.Module):
    """A strategy's wrapper (DDP's role): its forward calls the wrapped module's ``forward``, as it finds it."""

    def __init__(self, inner: _Step) -> None:
        super().__init__()
        self.inner = inner
        self.before_call: list[bool] = []

    def forward(self, x: torch.Tensor) -> Any:
        self.before_call.append(is_forward_redirected(self.inner))
        return self.inner(x)


def test_lightnings_forward_redirection_is_seen_while_it_is_in_place() -> None:
    """Lightning's ``_ForwardRedirection`` (how a strategy runs ``training_step`` through its wrapper): the model is
    redirected when the wrapper calls it, and no longer once the redirection runs ``training_step``."""
    from lightning.pytorch.strategies.strategy import _ForwardRedirection

    model = _Step()
    wrapper = _Wrapper(model)
    assert not is_forward_redirected(model)
    _ForwardRedirection()(wrapper, model, "training_step", torch.ones(1, 2))
    assert wrapper.before_call == [True]
    assert model.seen == [("training_step", False), ("forward", False)]
    assert not is_forward_redirected(model)


def test_fabrics_forward_redirection_is_seen_while_it_is_in_place() -> None:
    from lightning.fabric import Fabric

    model = _Step()
    fabric = Fabric(accelerator="cpu", devices=1)
    module = fabric.setup_module(model)
    wrapper = _Wrapper(model)
    module._forward_module = wrapper  # a strategy's wrapper, as DDP's would be
    assert "wrapped_forward" in inspect.getsource(type(module)._redirection_through_forward)
    module._redirection_through_forward("training_step")(torch.ones(1, 2))
    assert wrapper.before_call == [True]
    assert model.seen == [("training_step", False), ("forward", False)]


def test_a_plain_forward_or_a_user_method_named_otherwise_is_not_redirected() -> None:
    model = nn.Linear(2, 2)
    assert not is_forward_redirected(model)
    model.forward = lambda x: x  # type: ignore[method-assign]  # an instance forward, not Lightning's
    assert not is_forward_redirected(model)


def test_every_way_of_compiling_a_module_is_seen_and_nothing_is_compiled() -> None:
    """``torch.compile(module)``, ``module.compile()``, Lightning's ``from_compiled`` and a forward replaced by a
    compiled function. ``torch.compile`` compiles on the first call: none is made here."""
    from lightning.pytorch.utilities.compile import from_compiled

    plain = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    assert not any(is_compiled(m) for m in plain.modules())
    wrapped = torch.compile(plain)
    assert is_compiled(wrapped) and not is_compiled(plain)  # the wrapper, not the model it holds
    in_place = nn.Linear(2, 2)
    in_place.compile()
    assert is_compiled(in_place)
    lightning_module = from_compiled(torch.compile(_Step()))  # type: ignore[arg-type]
    assert is_compiled(lightning_module)
    replaced = nn.Linear(2, 2)
    replaced.forward = torch.compile(replaced.forward)  # type: ignore[method-assign]
    assert is_compiled(replaced)


def _public_subclasses(base: type) -> set[type]:
    """The classes of the public ``torch.nn`` namespace that subclass ``base``."""
    return {cls for cls in vars(nn).values() if isinstance(cls, type) and issubclass(cls, base)}


def test_the_public_conv_types_are_every_convolution_of_torch_nn() -> None:
    from torch.nn.modules.conv import _ConvNd

    public = _public_subclasses(_ConvNd)
    assert nn.Conv2d in public and nn.LazyConvTranspose3d in public  # the namespace is read right
    assert all(issubclass(cls, CONV_TYPES) for cls in public), public
    assert all(issubclass(cls, _ConvNd) for cls in CONV_TYPES)


def test_the_public_batch_norm_types_are_every_batch_norm_of_torch_nn() -> None:
    from torch.nn.modules.batchnorm import _BatchNorm

    public = _public_subclasses(_BatchNorm)
    assert nn.SyncBatchNorm in public and nn.LazyBatchNorm1d in public
    assert all(issubclass(cls, BATCH_NORM_TYPES) for cls in public), public
    assert all(issubclass(cls, _BatchNorm) for cls in BATCH_NORM_TYPES)
    assert not any(issubclass(cls, BATCH_NORM_TYPES) for cls in (nn.InstanceNorm1d, nn.LayerNorm, nn.GroupNorm))


def test_the_fan_in_rai_uses_is_torchs() -> None:
    """``rai_`` counts the fan-in as ``nn.init`` does (inputs times receptive field), without its private helper."""
    for shape in [(3, 5), (4, 3, 2), (6, 2, 3, 3), (2, 4, 1, 2, 3)]:
        weight = torch.empty(shape)
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
        assert weight.shape[1] * torch.Size(weight.shape[2:]).numel() == fan_in


def test_the_metrics_public_state_is_every_state_it_adds() -> None:
    """The monitor saves and merges ``ActivationStats`` through torchmetrics' public ``metric_state``: every state
    the metric adds, as tensors, counts folded in."""
    stats = ActivationStats(track_margin=True)
    stats.update(torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]]))
    stats.update_margin(torch.tensor([[1.0, -1.0], [2.0, -1.0], [-3.0, -1.0]]))
    state = stats.metric_state
    keys = ["active", "entries", "samples", "killed", "nonfinite", "pre_sum_bits", "pre_sumsq_bits", "pre_entries"]
    assert sorted(state) == sorted(keys)
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    assert state["active"].tolist() == [2, 0] and int(state["samples"]) == 3 and int(state["killed"]) == 1
    assert state["pre_sum_bits"].view(torch.float64).tolist() == [0.0, -3.0]
    assert sorted(ActivationStats().metric_state) == sorted(keys[:5])
