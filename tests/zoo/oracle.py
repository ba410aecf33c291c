"""Ground truth at the dispatcher level, independent of the package's hooks, tracing and structure code.

:class:`Recorder` is a ``TorchDispatchMode``: it sees every ATen operation of one forward pass, below module hooks,
``torch.fx`` and ``__torch_function__``. For every rectifier operation (``relu``, ``relu_``, ``hardtanh(0, 6)``,
``clamp_min(0)``, ``threshold(0, 0)`` and their in-place forms) it counts, per unit, the entries of the output that
are ``> 0``. It also follows, per tensor, where the values come from (:class:`Flow`):

- the **unit axis** is taken from the operation that fixes the layout of the data on its way to the rectifier:
  ``convolution`` and batch/group norm index units along dimension 1 (channels), ``addmm``/``mm``/``matmul`` with a
  weight (a linear layer) and layer norm along the last dimension (features). Elementwise operations, dropout, views
  that keep that dimension, sums and concatenations along another dimension keep it. This is why the oracle's axis
  is not a guess from the rank; where no such operation is found (none is, in the zoo) the rank decides
  (dimension 1 of 4-D tensors, else the last) and the call says so (``Call.axis_from``);
- the **producer**: the parameters the weight of the nearest affine operation (convolution, linear) is computed from
  (the weight itself, or the parameter a standardised weight is computed from), and the **shift**: the bias
  parameter that adds a constant to each unit after it (the producer's own bias, or the bias of a norm in between).
  The flow is *clean* when the rectifier's input comes from that producer through elementwise and norm operations
  that read no other data (a residual sum is not clean).

Calls are grouped into places as the design's site key says: a rectifier module's k-th call within one run of the
module that calls it, or a module's k-th functional rectifier call within one run of its own forward (the module
stack comes from forward hooks on every module of the model, registered only while recording).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

aten = torch.ops.aten

RECTIFIER_MODULES = (nn.ReLU, nn.ReLU6)


@dataclass(frozen=True)
class Flow:
    """Where an activation tensor's values come from (see the module docstring)."""

    axis: int | None = None  # 1 (channels) or -1 (features); None when no layout-fixing operation was seen
    producer: frozenset[str] = frozenset()  # parameters the nearest affine operation's weight comes from
    producer_op: str | None = None
    shift: str | None = None  # a bias parameter adding a constant per unit since the producer
    clean: bool = False  # the values come from `producer` through ops reading no other data


DATA = Flow()


@dataclass
class Call:
    """One rectifier operation of the recorded forward."""

    index: int  # order among the rectifier calls
    place: tuple[str, str, int]  # ("module" | "function", module name, call position)
    op: str
    shape: tuple[int, ...]
    axis: int
    axis_from: str  # the operation that fixed the axis, or "rank"
    active: Tensor  # per unit: entries > 0 (int64)
    entries: int  # entries per unit
    flow: Flow  # of the rectifier's input

    @property
    def units(self) -> int:
        return self.active.numel()


@dataclass
class Place:
    """The calls of one place added up: what one site should report."""

    key: tuple[str, str, int]
    first_call: int
    units: int
    active: Tensor
    entries: int
    calls: list[Call] = field(default_factory=list)

    @property
    def dead(self) -> Tensor:
        return self.active == 0

    def describe(self) -> str:
        kind, name, position = self.key
        return f"{kind} {name or '<root>'}#{position}"


_AXIS_OPS = {  # operation -> unit axis of its output
    aten.convolution.default: 1,
    aten._convolution.default: 1,
    aten.native_batch_norm.default: 1,
    aten._native_batch_norm_legit.default: 1,
    aten._native_batch_norm_legit.no_stats: 1,
    aten._native_batch_norm_legit_no_training.default: 1,
    aten._native_batch_norm_legit_functional.default: 1,
    aten.native_group_norm.default: 1,
    aten.native_layer_norm.default: -1,
}
# (input index, weight index, bias index) of the norms
_NORMS = {
    aten.native_batch_norm.default: (0, 1, 2),
    aten._native_batch_norm_legit.default: (0, 1, 2),
    aten._native_batch_norm_legit.no_stats: (0, 1, 2),
    aten._native_batch_norm_legit_no_training.default: (0, 1, 2),
    aten._native_batch_norm_legit_functional.default: (0, 1, 2),
    aten.native_group_norm.default: (0, 1, 2),
    aten.native_layer_norm.default: (0, 2, 3),
}
_VIEWS = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.alias.default,
    aten.detach.default,
    aten.clone.default,
    aten.contiguous.default,
    aten._to_copy.default,
    aten.expand.default,
    aten.squeeze.dim,
    aten.unsqueeze.default,
    aten.flatten.using_ints,
}
_ELEMENTWISE = {  # ops with one data input that keep every unit's values apart and keep the sign of positive scalars
    aten.add.Tensor,
    aten.add_.Tensor,
    aten.add.Scalar,
    aten.add_.Scalar,
    aten.sub.Tensor,
    aten.sub_.Tensor,
    aten.mul.Tensor,
    aten.mul_.Tensor,
    aten.mul.Scalar,
    aten.mul_.Scalar,
    aten.div.Tensor,
    aten.div_.Tensor,
    aten.div.Scalar,
    aten.div_.Scalar,
    aten.native_dropout.default,
    aten.dropout.default,
    aten.bernoulli_.float,
}
_SPLITS = {  # parts of a tensor along one dimension: the unit axis stays where it was (channels are channels)
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.chunk.default,
    aten.slice.Tensor,
    aten.narrow.default,
}
_POOLS = {
    aten.max_pool2d_with_indices.default,
    aten.avg_pool2d.default,
    aten.adaptive_avg_pool2d.default,
    aten._adaptive_avg_pool2d.default,
    aten.max_pool2d.default,
    aten.mean.dim,
}


def rectifier_kind(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """``"relu"``/``"relu6"`` when the operation is a rectifier, else ``None``."""
    packet = getattr(func, "overloadpacket", None)
    if packet in (aten.relu, aten.relu_):
        return "relu"
    if packet in (aten.hardtanh, aten.hardtanh_):
        low = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
        high = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
        return "relu6" if (low, high) == (0, 6) else None
    if packet in (aten.clamp_min, aten.clamp_min_):
        low = args[1] if len(args) > 1 else kwargs.get("min")
        return "relu" if isinstance(low, (int, float)) and low == 0 else None
    if packet in (aten.threshold, aten.threshold_):
        return "relu" if tuple(args[1:3]) == (0, 0) else None
    return None


def active_per_unit(output: Tensor, axis: int) -> tuple[Tensor, int]:
    """Per unit along ``axis``: the number of entries ``> 0`` (int64), and the entries per unit."""
    moved = output.detach().movedim(axis, 0)
    units = moved.shape[0]
    flat = moved.reshape(units, -1)
    return (flat > 0).sum(dim=1, dtype=torch.int64).cpu(), flat.shape[1]


class Recorder(TorchDispatchMode):
    """Record one or more forward passes of ``model`` (see the module docstring).

    Use as ``with Recorder(model, inputs) as rec: model(...)``; ``inputs`` are the tensors the data comes from.
    """

    def __init__(self, model: nn.Module, inputs: Any = ()) -> None:
        super().__init__()
        self.model = model
        self.calls: list[Call] = []
        self.flows: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        self.derived: WeakTensorKeyDictionary = WeakTensorKeyDictionary()  # tensor -> parameter names
        self.params: dict[int, str] = {id(p): name for name, p in model.named_parameters()}
        self.param_storage: dict[tuple[int, int], str] = {
            (p.untyped_storage().data_ptr(), p.numel()): name for name, p in model.named_parameters()
        }
        self.buffers: set[int] = {id(b) for b in model.buffers()}
        self.names: dict[int, str] = {id(m): name for name, m in model.named_modules()}
        self.stack: list[dict[str, Any]] = []  # frames of the running modules' forwards
        self._handles: list[Any] = []
        for tensor in tree_flatten(inputs)[0]:
            if isinstance(tensor, Tensor):
                self.flows[tensor] = DATA

    # ----------------------------------------------------------------------------------- module stack
    def __enter__(self) -> Recorder:
        for module in self.model.modules():
            self._handles.append(module.register_forward_pre_hook(self._push))
            self._handles.append(module.register_forward_hook(self._pop, always_call=True))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    def _push(self, module: nn.Module, args: Any) -> None:
        self.stack.append({"module": module, "counts": {}})

    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:
        while self.stack:
            if self.stack.pop()["module"] is module:
                break

    def _place(self) -> tuple[str, str, int]:
        if not self.stack:
            return ("function", "", 0)
        top = self.stack[-1]
        if isinstance(top["module"], RECTIFIER_MODULES):
            owner = self.stack[-2] if len(self.stack) > 1 else top
            key: tuple[str, int] = ("module", id(top["module"]))
            position = owner["counts"].get(key, 0)
            owner["counts"][key] = position + 1
            return ("module", self.names.get(id(top["module"]), "?"), position)
        position = top["counts"].get(("function",), 0)
        top["counts"][("function",)] = position + 1
        return ("function", self.names.get(id(top["module"]), "?"), position)

    # ---------------------------------------------------------------------------------------- tensors
    def _param(self, tensor: Any) -> str | None:
        if not isinstance(tensor, Tensor):
            return None
        name = self.params.get(id(tensor))
        if name is None and not isinstance(tensor, nn.Parameter) and tensor.device.type != "meta":
            try:
                name = self.param_storage.get((tensor.untyped_storage().data_ptr(), tensor.numel()))
            except RuntimeError:
                name = None
        return name

    def _weights(self, tensor: Any) -> frozenset[str]:
        """The parameters a weight tensor is (computed from), empty for data."""
        name = self._param(tensor)
        if name is not None:
            return frozenset((name,))
        if isinstance(tensor, Tensor) and tensor in self.derived:
            return self.derived[tensor]
        return frozenset()

    def _flow(self, tensor: Any) -> Flow | None:
        return self.flows.get(tensor, DATA) if isinstance(tensor, Tensor) else None

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        kind = rectifier_kind(func, args, kwargs)
        flow_in = self._flow(args[0]) if kind and args else None
        out = func(*args, **kwargs)
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        if not isinstance(first, Tensor):
            return out
        if kind is not None:
            self._record(kind, first, flow_in or DATA)
            return out
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        # data: every tensor that is neither a parameter, a buffer nor computed from those alone
        data = [t for t in tensors if not self._weights(t) and id(t) not in self.buffers]
        if not data:
            weights = frozenset().union(*(self._weights(t) for t in tensors)) if tensors else frozenset()
            if weights:
                self.derived[first] = weights
            return out
        flow = self._next_flow(func, args, first, data)
        for tensor in tree_flatten(out)[0]:  # every output of split/chunk, batch norm's saved statistics
            if isinstance(tensor, Tensor):
                self.flows[tensor] = flow
        return out

    def _next_flow(self, func: Any, args: tuple[Any, ...], out: Tensor, data: list[Tensor]) -> Flow:
        name = str(func.overloadpacket.__name__)
        if func in (aten.convolution.default, aten._convolution.default):
            bias = self._param(args[2])
            return Flow(1, self._weights(args[1]), name, bias, clean=len(data) == 1 and data[0] is args[0])
        if func is aten.addmm.default and len(data) == 1 and data[0] is args[1]:
            weights = self._weights(args[2])
            if weights:
                return Flow(-1, weights, name, self._param(args[0]), clean=True)
        if func in (aten.mm.default, aten.matmul.default, aten.bmm.default) and len(data) == 1 and data[0] is args[0]:
            weights = self._weights(args[1])
            if weights:
                return Flow(-1, weights, name, None, clean=True)
        if func in _NORMS:
            index, _, bias_index = _NORMS[func]
            flow = self.flows.get(args[index], DATA)
            axis = _AXIS_OPS[func]
            if axis == -1 and flow.axis is not None:
                axis = flow.axis
            clean = flow.clean and len(data) == 1
            return Flow(axis, flow.producer, flow.producer_op, self._param(args[bias_index]), clean)
        flows = [self.flows.get(t, DATA) for t in data]
        if len(data) == 1:
            flow = flows[0]
            if func in _VIEWS:
                source = data[0]
                keeps_last = flow.axis == -1 and min(out.dim(), source.dim()) >= 1 and out.shape[-1] == source.shape[-1]
                keeps_channels = flow.axis == 1 and out.dim() == source.dim() and out.shape[:2] == source.shape[:2]
                keeps = keeps_last or keeps_channels
                return flow if keeps else Flow(None, flow.producer, flow.producer_op, None, False)
            if func in _ELEMENTWISE:
                others = [a for a in args[1:] if not any(a is t for t in data)]
                shift = flow.shift
                clean = flow.clean
                packet = func.overloadpacket
                if packet in (aten.add, aten.add_) and others and self._param(others[0]) is not None:
                    shift = shift or self._param(others[0])
                elif packet in (aten.mul, aten.mul_, aten.div, aten.div_):
                    factor = others[0] if others else None
                    clean = clean and isinstance(factor, (int, float)) and factor > 0
                return Flow(flow.axis, flow.producer, flow.producer_op, shift, clean)
            if func in _SPLITS:
                return Flow(flow.axis, flow.producer, flow.producer_op, None, False)
            if func in _POOLS:
                keeps = out.dim() == data[0].dim()
                return Flow(flow.axis if keeps else None)
            # any other operation that keeps the shape of its one data input (activations, gates) keeps its layout
            return Flow(flow.axis if out.shape == data[0].shape else None)
        # several data inputs (sums, gates, concatenations) keep the layout they agree on; broadcast factors whose
        # layout nothing fixed (a squeeze-excitation gate after a sigmoid) do not disagree
        axes = {f.axis for f in flows} - {None}
        axis = axes.pop() if len(axes) == 1 else None
        if func in _ELEMENTWISE or func is aten.cat.default:
            return Flow(axis)
        return Flow(None)

    def _record(self, kind: str, out: Tensor, flow: Flow) -> None:
        if flow.axis is not None:
            axis, axis_from = flow.axis, flow.producer_op or "flow"
        else:
            axis, axis_from = (1 if out.dim() == 4 else -1), "rank"
        active, entries = active_per_unit(out, axis)
        self.calls.append(
            Call(len(self.calls), self._place(), kind, tuple(out.shape), axis, axis_from, active, entries, flow)
        )
        self.flows[out] = Flow(axis)

    # ---------------------------------------------------------------------------------------- results
    def places(self) -> list[Place]:
        """The calls grouped by place, in the order of each place's first call."""
        places: dict[tuple[str, str, int], Place] = {}
        for call in self.calls:
            place = places.get(call.place)
            if place is None:
                first = Place(call.place, call.index, call.units, call.active.clone(), call.entries, [call])
                places[call.place] = first
                continue
            place.calls.append(call)
            if call.units != place.units:
                raise AssertionError(
                    f"{place.describe()} has {place.units} units on its first call, {call.units} on call {call.index}"
                )
            place.active += call.active
            place.entries += call.entries
        return list(places.values())


@contextmanager
def recording(model: nn.Module, example: Any) -> Iterator[Recorder]:
    with torch.no_grad(), Recorder(model, example) as recorder:
        yield recorder


# ------------------------------------------------------------------------------------------------- forcing
@dataclass(frozen=True)
class Kill:
    """Make ``units`` of a rectifier call dead: shift ``param`` far negative there, or zero the rows of ``param``."""

    place: tuple[str, str, int]
    param: str
    units: tuple[int, ...]
    how: str  # "shift" (a bias) or "zero" (the producer's weight rows, when nothing adds a bias)


def plan_kills(calls: list[Call], sites: int = 4, per_site: int = 2) -> list[Kill]:
    """Choose up to ``sites`` rectifier places spread over the forward and ``per_site`` units at each to kill.

    Only calls whose input comes cleanly from a producer qualify (see :class:`Flow`); a shift parameter is used where
    one exists (the producer's or the norm's bias), else the producer's weight rows are zeroed (bias-free models).
    A parameter is used for one place only.
    """
    candidates: list[tuple[Call, str, str]] = []
    seen_params: set[str] = set()
    seen_places: set[tuple[str, str, int]] = set()
    for call in calls:
        if call.place in seen_places or not call.flow.clean or call.units < 4:
            continue
        seen_places.add(call.place)
        if call.flow.shift is not None:
            param, how = call.flow.shift, "shift"
        elif len(call.flow.producer) == 1 and call.flow.producer_op in ("addmm", "mm", "matmul", "convolution"):
            param, how = next(iter(call.flow.producer)), "zero"
        else:
            continue
        if param in seen_params:
            continue
        seen_params.add(param)
        candidates.append((call, param, how))
    if not candidates:
        return []
    count = min(sites, len(candidates))
    chosen = [candidates[round(i * (len(candidates) - 1) / max(count - 1, 1))] for i in range(count)]
    kills = []
    done: set[str] = set()
    for call, param, how in chosen:
        if param in done:
            continue
        done.add(param)
        step = call.units // (per_site + 1)
        units = tuple(sorted({step * (i + 1) for i in range(per_site)}))
        kills.append(Kill(call.place, param, units, how))
    return kills


def apply_kills(model: nn.Module, kills: list[Kill]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for kill in kills:
            param = params[kill.param]
            index = list(kill.units)
            if kill.how == "shift":
                param[index] = -1e4
            else:
                param[index] = 0.0


def finite_scale(tensor: Tensor) -> float:
    value = float(tensor.detach().abs().max()) if tensor.numel() else 0.0
    return value if math.isfinite(value) else math.inf
