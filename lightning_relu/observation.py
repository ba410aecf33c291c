"""Structure observed on one real forward: which layer feeds each rectifier site and which layers read it.

:func:`lightning_relu.structure.observe` runs the model once on an example input under a thread-local
:class:`~torch.overrides.TorchFunctionMode` that records every torch operation with the tensors it reads and
writes (nothing is patched process-wide); :func:`record` here does it with a tracker given to it. A temporary
:class:`~lightning_relu.tracker.DeadUnitTracker` names the rectifier calls, so the sites have exactly the names
(site keys) the counting uses. This module sits below the tracker, which records the first forward with its
:class:`AxisWatch`: it never imports the tracker. From the recording:

- the **producer** of a site is the affine operation (``linear``, ``conv1d/2d/3d``) whose output reaches the
  rectifier through norm operations (``batch_norm``, ``layer_norm``, ``group_norm``, ``instance_norm``, also
  inside fused norm-activation modules) and elementwise operations with constants (a bias added by hand, a
  scale, dropout). Its weight may be computed from a parameter (weight standardisation): the remedies act on
  that parameter, row for row.
- the **consumers** are the affine operations that read the site's output, through moves (view, reshape,
  flatten, permute, transpose, ``cat``/``split``/``chunk``, indexing), pooling, reductions over positions,
  dropout and scaling by other tensors. Each comes with its **unit map**: for every input column (``linear``)
  or channel (``conv``) the unit of the site it carries. The map is found by pushing a label tensor (each
  entry: the global index of its unit) through the same operations.
- anything else that reads a site's output (a residual ``add``, a norm, an attention ``matmul``, the model's
  output) is a **reader** that revival cannot make blind to a revived unit: it is named in the site's
  ``problems``.

The observation restores every buffer (BatchNorm statistics included) and the random number generators after
the forward, and runs under ``torch.no_grad()``; parameters are never written.
"""

from __future__ import annotations

import bisect
import contextlib
import inspect
import math
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_relu._compat import is_forward_redirected
from lightning_relu.functional import counting

__all__ = [
    "AxisWatch",
    "Consumer",
    "ModuleCall",
    "Norm",
    "ObservationError",
    "ParamRef",
    "Producer",
    "RootCallWatch",
    "SiteStructure",
    "Structure",
    "TrainingInputWatch",
    "call_model",
    "example_from_batch",
    "preserved_state",
    "record",
    "split_by_call",
]

_AFFINE_OPS = {"linear": 0, "conv1d": 1, "conv2d": 2, "conv3d": 3}
_NORM_OPS = {"batch_norm", "layer_norm", "group_norm", "instance_norm"}
# between a producer and its site: operations that keep each unit's values apart
_CHAIN_OPS = {
    "attr:data", "dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout", "contiguous", "clone", "to",
    "float",
    "double", "half", "bfloat16", "type", "type_as", "detach", "identity",
}  # fmt: skip
_ARITH_OPS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "__add__", "__radd__", "__iadd__", "__sub__",
    "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__", "__truediv__", "__itruediv__", "__div__",
}  # fmt: skip
_SCALE_OPS = {"mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__", "__itruediv__"}
_DIV_OPS = {"div", "div_", "__truediv__", "__itruediv__", "__div__"}
_SUB_OPS = {"sub", "sub_", "__sub__", "__isub__"}
# negation between a producer and its site: a scale of -1
_NEG_OPS = {"neg", "neg_", "negative", "negative_", "__neg__"}
# what a walk from a pre-activation back towards the layers it comes from goes through
_WALKED_OPS = _NORM_OPS | _CHAIN_OPS | _ARITH_OPS | _NEG_OPS
# operations that move entries without computing with them: the labels follow by running the same operation
_MOVE_OPS = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "contiguous", "clone", "squeeze",
    "unsqueeze", "__getitem__", "narrow", "select", "expand", "expand_as", "cat", "concat", "concatenate", "stack",
    "split", "chunk", "unbind", "tensor_split", "movedim", "moveaxis", "swapaxes", "swapdims", "reshape_as",
    "view_as", "repeat", "flip", "roll", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "split_with_sizes",
    "tile", "hsplit", "vsplit", "dsplit", "broadcast_to", "attr:T", "attr:mT", "attr:H", "attr:mH",
}  # fmt: skip
# operations that change the dtype only: the labels pass unchanged
_CAST_OPS = {"attr:data", "to", "float", "double", "half", "bfloat16", "type", "type_as", "detach", "cpu", "cuda"}
# elementwise functions that map 0 to 0: a dead unit's zeros stay zeros, each entry keeps its unit
_ZERO_PRESERVING = {
    "dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout", "relu", "relu_", "relu6", "hardtanh",
    "hardtanh_", "leaky_relu", "leaky_relu_", "gelu", "silu", "silu_", "tanh", "tanh_", "neg", "__neg__", "abs",
    "clamp", "clamp_", "clamp_min", "clip", "mish", "hardswish", "hardswish_", "elu", "elu_", "selu", "celu",
    "softsign", "tanhshrink", "softshrink", "hardshrink", "sin", "sqrt", "square", "pow",
}  # fmt: skip
_POOL_OPS = {
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d_with_indices",
    "max_pool2d_with_indices", "max_pool3d_with_indices", "_max_pool1d", "_max_pool2d", "_max_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "_adaptive_max_pool1d", "_adaptive_max_pool2d",
    "_adaptive_max_pool3d", "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices",
    "adaptive_max_pool3d_with_indices", "lp_pool1d", "lp_pool2d",
}  # fmt: skip
_REDUCE_OPS = {"mean", "sum", "amax", "nansum", "nanmean", "max", "logsumexp", "std", "var", "norm"}
# reads that do not carry a unit's value further (shape and value inspection, tensors made "like" another)
_INSPECT_OPS = {
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "new_zeros", "new_ones",
    "new_empty", "new_full", "new_tensor", "isnan", "isinf", "isfinite", "isneginf", "isposinf", "any", "all",
    "eq", "ne", "gt", "ge", "lt", "le", "__eq__", "__ne__", "__gt__", "__ge__", "__lt__", "__le__", "numel",
    "item", "tolist", "__bool__", "__len__", "equal", "allclose", "is_nonzero", "data_ptr", "__get__", "size",
    "dim", "stride", "is_contiguous", "element_size", "nelement", "__format__", "__repr__", "__hash__",
    "storage_offset", "untyped_storage", "__contains__", "__index__", "nonzero", "argmax", "argmin",
}  # fmt: skip
_RECTIFIER_OPS = {"relu", "relu_", "relu6", "hardtanh", "hardtanh_", "threshold", "threshold_", "clamp_min"}


class ObservationError(RuntimeError):
    """The model could not be run on the example input (it needs other inputs)."""


@dataclass(frozen=True, eq=False)
class ParamRef:
    """A parameter that a remedy writes into.

    Attributes:
        name: qualified name of the parameter (``"features.0.weight"``).
        module_name: qualified name of the module holding it.
        module: that module.
        parameter: the parameter itself.
        computed: the operation reads a tensor computed from the parameter, row for row (weight
            standardisation), not the parameter itself.
    """

    name: str
    module_name: str
    module: nn.Module
    parameter: nn.Parameter
    computed: bool = False


@dataclass(eq=False)
class Producer:
    """The affine operation whose output reaches a site.

    Attributes:
        name: qualified name of the module holding the weight.
        kind: ``"linear"`` or ``"conv"``.
        weight: the weight (rows = the site's units).
        bias: the bias, if any.
        groups: convolution groups (1 for linear).
    """

    name: str
    kind: str
    weight: ParamRef
    bias: ParamRef | None
    groups: int = 1

    @property
    def fan_in(self) -> int:
        return math.prod(self.weight.parameter.shape[1:])


@dataclass(eq=False)
class Norm:
    """A normalization between a producer and its site (a module or the norm inside a fused module).

    Attributes:
        name: qualified name of the module holding its parameters or buffers.
        kind: ``"batch"``, ``"layer"``, ``"group"`` or ``"instance"``.
        weight, bias: affine parameters (``None`` without).
        running_mean, running_var: running statistics (BatchNorm, InstanceNorm with tracking).
        mixes_units: the statistics are shared between several units (LayerNorm, GroupNorm of several channels
            per group): changing one unit changes the others' outputs.
    """

    name: str
    kind: str
    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    mixes_units: bool


@dataclass(eq=False)
class Consumer:
    """An affine operation reading a site's output, with its unit map.

    Attributes:
        name: qualified name of the module holding the weight.
        kind: ``"linear"`` (columns are the last dimension of ``weight``) or ``"conv"`` (input channels).
        weight: the weight.
        groups: convolution groups.
        columns: input columns (linear) or input channels (conv) that carry the site's units.
        units: for each of ``columns``, the unit it carries.
    """

    name: str
    kind: str
    weight: ParamRef
    groups: int
    columns: Tensor
    units: Tensor


@dataclass(eq=False)
class SiteStructure:
    """What one forward showed about one site.

    Attributes:
        name: the site's name (as the tracker and the reports name it).
        calls: how many times the site ran in the observed forward.
        unit_dim: dimension of the site's output that indexes units.
        num_units: number of units.
        producer: the affine layer computing the pre-activation (``None`` when there is no single one).
        norms: normalizations between producer and site, from the producer to the site.
        consumers: affine layers reading the output, with unit maps.
        producer_problem: why there is no usable producer (``None`` when there is).
        reader_problems: readers of the output that revival cannot make blind to a revived unit.
        offset: the operation (``add``, ``sub``, ...) that adds a constant to the pre-activation between the
            producer and the site (``None`` when none does): the pre-activation is then not an odd function of the
            producer's output, so negating the producer does not negate it (sign flipping cannot act there).
        scale: per unit, what a change of the bias that revival shifts (the last norm's, else the producer's) is
            multiplied by on its way to the pre-activation (``3 * fc(x)``, ``-fc(x)``, a per-channel parameter times
            the norm's output; the mean over the unit's entries where it varies along them), float64 on the CPU;
            ``None`` for 1.
        uneven_scale: why that factor is not one per unit, when it differs between a unit's entries (a fixed
            mask over positions): revival cannot account for it, nor sign flipping at a functional call (``None``
            otherwise).
    """

    name: str
    calls: int
    unit_dim: int
    num_units: int
    producer: Producer | None = None
    norms: list[Norm] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    producer_problem: str | None = None
    reader_problems: list[str] = field(default_factory=list)
    offset: str | None = None
    scale: Tensor | None = None
    uneven_scale: str | None = None

    @property
    def shift_bias(self) -> Tensor | None:
        """The bias revival shifts to make a revived unit fire: the last norm's, else the producer's (``None``
        when that layer has none)."""
        if self.norms:
            return self.norms[-1].bias
        return self.producer.bias.parameter if self.producer is not None and self.producer.bias is not None else None

    @property
    def revival_problem(self) -> str | None:
        """Why revival cannot act on this site although it has a producer (``None`` when it can): a reader that
        revival cannot make blind to a revived unit, a factor that differs between a unit's entries (no shift makes
        its units fire on about half of them), a constant added with no bias to shift (a frozen BatchNorm after a
        bias-free convolution: new weights alone need not make such a unit fire), or readers that are all frozen
        (the revived unit's outgoing weights would stay 0). Read when asked: ``requires_grad`` set later counts."""
        if self.reader_problems:
            return "; ".join(self.reader_problems)
        if self.uneven_scale is not None:
            return f"{self.uneven_scale}: no shift of a bias makes its units fire on about half of their entries"
        if self.offset is not None and self.shift_bias is None:
            return (
                f"a constant is added to its pre-activation (`{self.offset}`, as a frozen BatchNorm does) and there is "
                "no bias to shift: new incoming weights alone need not make its units fire"
            )
        if self.consumers and not any(consumer.weight.parameter.requires_grad for consumer in self.consumers):
            return (
                "every layer reading it is frozen (its weight does not require grad, as a distillation teacher's or a "
                "fixed classifier's): a revived unit's outgoing weights would stay 0, and the frozen layers are left "
                "as they are"
            )
        return None

    @property
    def remedies(self) -> tuple[str, ...]:
        """The remedies that can act on this site: ``"rai"`` needs a producer; ``"sign_flip"`` also needs no constant
        added after it (:attr:`offset`; at a functional call with an :attr:`uneven_scale`, :func:`sign_flip_` still
        leaves the site out, as it reads the pre-activation from the layer's output there, and warns); ``"revive"``
        needs no :attr:`revival_problem`."""
        if self.producer is None:
            return ()
        remedies = ["rai"]
        if self.offset is None:
            remedies.append("sign_flip")
        if self.revival_problem is None:
            remedies.append("revive")
        return tuple(remedies)


@dataclass(eq=False)
class Structure:
    """Every site's structure, in the order the forward first reached them.

    Attributes:
        sites: per site name.
        pre_activations: per site, its input on the observed batch (first call), when kept.
        norm_inputs: per site, the input of its first norm on the observed batch (first call), when kept.
        known: every site name of the model, reached by the observed forward or not.
    """

    sites: dict[str, SiteStructure]
    pre_activations: dict[str, Tensor] = field(default_factory=dict)
    norm_inputs: dict[str, Tensor] = field(default_factory=dict)
    #: every site name the model has, reached by the observed forward or not
    known: tuple[str, ...] = ()
    #: per site reached, the number of dimensions of its output
    ndims: dict[str, int] = field(default_factory=dict)
    #: every site of the model (:class:`~lightning_relu.Site`, without links), reached by the forward or not
    found: tuple[Any, ...] = ()

    def table(self) -> str:
        """A printable table: per site its units, producer, norms, consumers and the remedies that apply."""
        rows = [("site", "units", "producer", "norm", "consumers", "remedies", "notes")]
        for site in self.sites.values():
            producer = site.producer.name if site.producer else "-"
            if site.producer is not None and site.producer.weight.computed:
                producer += " (computed weight)"
            norms = ", ".join(f"{n.name} ({n.kind})" for n in site.norms) or "-"
            consumers = ", ".join(dict.fromkeys(c.name for c in site.consumers)) or "-"
            notes = "; ".join(p for p in (site.producer_problem, *site.reader_problems) if p)
            remedies = ", ".join(("count", *site.remedies))
            rows.append((site.name, str(site.num_units), producer, norms, consumers, remedies, notes))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ------------------------------------------------------------------------------------------------ recording
@dataclass(eq=False)
class _Node:
    index: int
    op: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    sources: list[tuple[int, int] | None]  # per tensor input (in `_tensors(args, kwargs)` order): (node, output)
    inputs: list[Tensor]
    outputs: list[Tensor]
    data: bool  # computed from the example input (not only from parameters and constants)
    module: str


# tensor attributes that are views of the data: ``x.T`` is recorded as the operation ``attr:T``
_VIEW_ATTRIBUTES = {"T", "mT", "H", "mH", "data"}


def _op_name(func: Any) -> str:
    name = getattr(func, "__name__", None)
    if name is None:
        name = getattr(getattr(func, "__func__", None), "__name__", "")
    if name == "__get__":
        attribute = getattr(getattr(func, "__self__", None), "__name__", "")
        if attribute in _VIEW_ATTRIBUTES:
            return f"attr:{attribute}"
    return str(name)


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, ModuleCall):
        yield from _tensors((value.args, value.kwargs))
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)


def _frozen(value: Any) -> Any:
    if isinstance(value, list):
        return [_frozen(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return {k: _frozen(v) for k, v in value.items()}
    return value


# in-place methods that change no value (metadata, autograd flags, sharing): not writes
_NOT_WRITES = {
    "detach_", "requires_grad_", "share_memory_", "retain_grad", "squeeze_", "unsqueeze_", "t_", "transpose_",
    "swapdims_", "swapaxes_", "as_strided_", "rename_", "refine_names", "align_to", "record_stream", "pin_memory",
}  # fmt: skip
# Python's in-place operators, and the setters that write into their first argument (`h[i] = v`, `h.data = v`)
_WRITING_DUNDERS = {
    "__iadd__", "__isub__", "__imul__", "__imatmul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
    "__ilshift__", "__irshift__", "__iand__", "__ixor__", "__ior__", "__setitem__", "__set__",
}  # fmt: skip
_SIGNATURES: dict[Any, inspect.Signature | None] = {}


def _inplace_argument(func: Any, args: Any, kwargs: Mapping[str, Any]) -> bool:
    """Whether a call passes ``inplace=True`` (``F.threshold(h, 0.0, 1.0, True)``, ``F.dropout(h, inplace=True)``)."""
    if kwargs.get("inplace") is True:
        return True
    try:
        known = func in _SIGNATURES
    except TypeError:  # not hashable
        return False
    if not known:
        try:
            signature: inspect.Signature | None = inspect.signature(func)
        except (TypeError, ValueError):
            signature = None
        _SIGNATURES[func] = signature if signature is not None and "inplace" in signature.parameters else None
    signature = _SIGNATURES[func]
    if signature is None:
        return False
    try:
        return signature.bind_partial(*args, **kwargs).arguments.get("inplace") is True
    except TypeError:
        return False


def written_tensors(op: str, args: Any, kwargs: Mapping[str, Any], func: Any = None) -> list[Tensor]:
    """The tensors whose values the operation ``op`` writes in place: its first argument for an in-place method
    (``add_``, ``__imul__``, ``__setitem__``, ``h.data = v``) or a function called with ``inplace=True``, the ``out=``
    tensors of any operation."""
    written = list(_tensors(kwargs.get("out"))) if "out" in kwargs else []
    in_place = (op.endswith("_") and not op.endswith("__") and op not in _NOT_WRITES) or op in _WRITING_DUNDERS
    if not in_place and func is not None and (args or kwargs):
        in_place = _inplace_argument(func, args, kwargs)
    first = args[0] if args else kwargs.get("input")
    if in_place and isinstance(first, Tensor):
        written.append(first)
    return written


def _storage_key(tensor: Tensor) -> int:
    try:
        return int(tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError, TypeError):  # tensors without storage of their own
        return 0


def _extent(view: tuple[Any, ...]) -> tuple[int, int]:
    """The first and last element offsets a view ``(size, stride, offset, ...)`` can reach."""
    low = high = view[2]
    for size, stride in zip(view[0], view[1], strict=True):
        if stride >= 0:
            high += (size - 1) * stride
        else:
            low += (size - 1) * stride
    return low, high


def _overlap(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Whether two views ``(size, stride, offset, element size, storage bytes)`` of one storage share an element."""
    if a[3] != b[3]:
        return True  # views of other dtypes: taken to overlap
    if 0 in a[0] or 0 in b[0]:
        return False
    (a_low, a_high), (b_low, b_high) = _extent(a), _extent(b)
    if a_high < b_low or b_high < a_low:
        return False
    elements = max(a[4], b[4]) // a[3]
    if elements == 0:
        return False
    marks = torch.zeros(elements, dtype=torch.bool)
    marks.as_strided(a[0], a[1], a[2]).fill_(True)
    return bool(marks.as_strided(b[0], b[1], b[2]).any())


class WriteLog:
    """In-place writes seen in a forward, by the memory they write into: whether a tensor read at some point was
    written in place through another tensor sharing its memory since it was made (``h[:, :4].neg_()`` writes into
    ``h``; ``h[:, 0] += 5`` too). Checked only for the tensors asked about. Not seen: writes that bypass
    ``__torch_function__`` (``Tensor.set_``, ``torch.ops.aten`` calls, a NumPy view of the memory)."""

    def __init__(self) -> None:
        # per storage: when each write happened (non-decreasing), and what it wrote
        self._times: dict[int, list[float]] = {}
        self._writes: dict[int, list[tuple[tuple[Any, ...], str]]] = {}

    @staticmethod
    def _view(tensor: Tensor) -> tuple[Any, ...]:
        storage = tensor.untyped_storage()
        return (tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset(), tensor.element_size(),
                storage.nbytes())  # fmt: skip

    def add(self, when: float, tensors: Iterable[Tensor], op: str) -> None:
        for tensor in tensors:
            key = _storage_key(tensor)
            if key:
                try:
                    view = self._view(tensor)
                except (RuntimeError, NotImplementedError, TypeError):
                    continue
                self._times.setdefault(key, []).append(when)
                self._writes.setdefault(key, []).append((view, op))

    def between(self, tensor: Tensor, after: float, before: float) -> str | None:
        """The operation that wrote into ``tensor``'s elements through another view strictly between ``after`` and
        ``before`` (indices of the forward's operations), or None."""
        key = _storage_key(tensor)
        times = self._times.get(key)
        if not times:
            return None
        writes = self._writes[key]
        view = None
        for index in range(bisect.bisect_right(times, after), len(times)):
            if times[index] >= before:
                break
            view = view or self._view(tensor)
            written, op = writes[index]
            if _overlap(written, view):
                return op
        return None


class _Recorder(TorchFunctionMode):
    def __init__(self, inputs: list[Tensor], keep_rectifier_inputs: bool) -> None:
        super().__init__()
        self.nodes: list[_Node] = []
        self.origin: dict[int, tuple[int, int]] = {}
        self.data_ids = {id(t) for t in inputs}
        self.keep = list(inputs)
        self.writes = WriteLog()
        self.module_stack: list[str] = [""]
        self.keep_rectifier_inputs = keep_rectifier_inputs
        self.rectifier_inputs: dict[int, Tensor] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if counting():  # a tracker's hook counting a site's output: not the model's data flow
            return func(*args, **kwargs)
        op = _op_name(func)
        if op in _INSPECT_OPS and op not in ("nonzero",):
            return func(*args, **kwargs)
        inputs = list(_tensors((args, kwargs)))
        sources = [self.origin.get(id(t)) for t in inputs]
        data = any(id(t) in self.data_ids for t in inputs)
        before = None
        if self.keep_rectifier_inputs and op in _RECTIFIER_OPS and inputs:
            before = inputs[0].detach().clone()
        out = func(*args, **kwargs)
        outputs = list(_tensors(out)) if isinstance(out, (Tensor, tuple, list)) else []
        written = written_tensors(op, args, kwargs, func)
        if written:
            # a write without a result (`__setitem__`) happens before the next operation, one with a result as it
            self.writes.add(len(self.nodes) - (0.5 if not outputs else 0), written, op)
            self.keep.extend(written)
        if not outputs:
            return out
        # containers copied: a list passed to `cat` may grow after the call (DenseNet's feature list)
        node = _Node(
            len(self.nodes), op, _frozen(args), _frozen(kwargs), sources, inputs, outputs, data, self.module_stack[-1]
        )
        self.nodes.append(node)
        for position, tensor in enumerate(outputs):
            self.origin[id(tensor)] = (node.index, position)
            if data:
                self.data_ids.add(id(tensor))
            elif id(tensor) in self.data_ids:  # an in-place write of constants into a data tensor
                self.data_ids.discard(id(tensor))
        self.keep.extend(inputs)
        self.keep.extend(outputs)
        if before is not None:
            self.rectifier_inputs[node.index] = before
        return out

# ------------------------------------------------------------------------------------------------ observe
@dataclass(frozen=True, eq=False)
class ModuleCall:
    """An example input that calls a submodule of the model: ``model.get_submodule(module)(*args, **kwargs)``.

    A training step often calls the network held by the LightningModule (``self.net(x)``), not the
    LightningModule's own forward; :class:`RootCallWatch` records that call on a real step.
    """

    module: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


_OWN = threading.local()


def own_forward() -> bool:
    """Whether the package runs a forward of its own on this thread (:func:`call_model`: an observation, revival's
    checks, a sign-flipping pass). Trackers do not count it (but the one an observation names the sites with): it
    is not training data, whatever other monitor watches the model."""
    return getattr(_OWN, "depth", 0) > 0


def call_model(model: nn.Module, example_input: Any) -> Any:
    """Run ``model`` on an example input: a tensor (one positional argument), a tuple or list (positional
    arguments), a dict (keyword arguments) or a :class:`ModuleCall`; a forward of the package's own
    (:func:`own_forward`)."""
    _OWN.depth = getattr(_OWN, "depth", 0) + 1
    try:
        if isinstance(example_input, ModuleCall):
            return model.get_submodule(example_input.module)(*example_input.args, **example_input.kwargs)
        if isinstance(example_input, Mapping):
            return model(**example_input)
        if isinstance(example_input, (tuple, list)):
            return model(*example_input)
        return model(example_input)
    finally:
        _OWN.depth -= 1


def example_from_batch(batch: Any, input_fn: Callable[[Any], Any] | None = None, size: int | None = None) -> Any:
    """The model's input in a training batch, as :func:`observe` takes it: ``input_fn(batch)``, else the batch
    itself when it is a tensor or a dict (keyword arguments), else its first element; cut to its first ``size``
    samples (every tensor in it) and detached."""
    example = input_fn(batch) if input_fn is not None else batch
    if input_fn is None and isinstance(batch, (tuple, list)) and batch:
        example = batch[0]
    return _cut(example, size)


class RootCallWatch:
    """Watch the training steps for the outermost calls into ``model`` (the model's forward, or those of its direct
    children, as ``self.net(x)`` or ``self.decoder(self.encoder(x))`` in a ``training_step``) and keep a reference
    to the latest arguments of each, for the latest step that made one.

    Lightning's and Fabric's forward redirection (``training_step`` run through the model's call) is not a
    forward and is skipped. :meth:`examples` cuts the latest arguments to their first samples.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        #: the outermost calls of the latest step that made one: module path ("" for the model) -> (args, kwargs),
        #: in the order of their first call
        self.calls: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self._depth = 0
        self._handles: list[Any] = []
        self._fresh = True  # the next outermost call starts a new step's calls
        self._active = True

    @property
    def active(self) -> bool:
        """Calls are recorded only while true (a training step, not validation)."""
        return self._active

    @active.setter
    def active(self, value: bool) -> None:
        if value and not self._active:
            self._fresh = True  # a new step: its calls replace the last step's
        self._active = value

    @property
    def root(self) -> str | None:
        """The module path of the first outermost call of the latest step ("" for the model), or None before one."""
        return next(iter(self.calls), None)

    def start(self) -> RootCallWatch:
        """Watch the model and its direct children (idempotent)."""
        if self._handles:
            return self
        for name, module in [("", self.model), *self.model.named_children()]:
            self._handles.append(module.register_forward_pre_hook(self._enter(name), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._leave, always_call=True))
        return self

    def settle(self) -> None:
        """Kept for callers of earlier versions: the watch keeps watching the model and its children."""

    def stop(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        self._depth = 0

    def _enter(self, name: str) -> Callable[..., None]:
        def enter(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            redirected = is_forward_redirected(module)
            if self._active and self._depth == 0 and not redirected:
                if self._fresh:
                    self.calls, self._fresh = {}, False
                self.calls[name] = (args, kwargs)
            if not redirected:
                self._depth += 1

        return enter

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._depth > 0 and not is_forward_redirected(module):
            self._depth -= 1

    def examples(self, size: int | None) -> list[ModuleCall]:
        """The latest step's outermost calls, every batch-major tensor cut to its first ``size`` samples: the model's
        own call alone when the step made one (it reaches every site), else one per child called, in the order of
        their first call (empty before any)."""
        names = [""] if "" in self.calls else list(self.calls)
        return [self._example(name, size) for name in names]

    def example(self, size: int | None) -> ModuleCall | None:
        """The first of :meth:`examples` (None before a call)."""
        examples = self.examples(size)
        return examples[0] if examples else None

    def _example(self, name: str, size: int | None) -> ModuleCall:
        args, kwargs = self.calls[name]
        first = next(_tensors((args, kwargs)), None)
        batch = first.shape[0] if first is not None and first.ndim else None
        return ModuleCall(name, _cut(args, size, batch), _cut(kwargs, size, batch))


def split_by_call(reports: Mapping[str, Any], examples: Sequence[Any]) -> list[tuple[Any, dict[str, Any]]]:
    """``reports`` (per site name) split among ``examples``: each site goes with the first example that calls a
    module holding it (a :class:`ModuleCall` of a child holds the sites named under its path; any other example,
    or the model's own call, holds them all), the sites that none holds with the first example (which says that
    its forward does not reach them). Examples that hold no site are left out; no examples, no parts."""
    parts: list[dict[str, Any]] = [{} for _ in examples]
    for name, report in reports.items():
        index = next((i for i, example in enumerate(examples) if _holds(example, name)), 0)
        if parts:
            parts[index][name] = report
    return [(example, part) for example, part in zip(examples, parts, strict=True) if part]


def _holds(example: Any, site: str) -> bool:
    if not isinstance(example, ModuleCall) or not example.module:
        return True
    return site == example.module or site.startswith(example.module + ".")


class TrainingInputWatch:
    """What a callback keeps of the training steps to hold an example input: the latest training batch (a
    reference) and, through a :class:`RootCallWatch`, the latest call a step made into the model.

    Call :meth:`batch_start` and :meth:`batch_end` from the callback's ``on_train_batch_start`` and
    ``on_train_batch_end``, and :meth:`stop` from its ``teardown`` and ``on_exception``. Neither the batch nor the
    watch is pickled (the watch holds hooks on the model).
    """

    def __init__(self) -> None:
        self.batch: Any = None  # the latest training batch (a reference)
        self.watch: RootCallWatch | None = None  # the call the training step makes into the model

    def batch_start(self, model: nn.Module, watch_calls: bool = True) -> None:
        """Record the calls of the step about to run; with ``watch_calls`` a watch is started on ``model`` first
        when none watches it yet (without, only the batch is kept: the callback takes its input from it)."""
        if watch_calls and (self.watch is None or self.watch.model is not model):
            # the call the training step makes into the model (its forward, or `self.net(x)`), with its arguments
            self.stop()
            self.watch = RootCallWatch(model).start()
        if self.watch is not None:
            self.watch.active = True

    def batch_end(self, batch: Any) -> None:
        """Keep ``batch`` (a reference) and stop recording: validation and other calls between steps are not
        training inputs."""
        self.batch = batch
        if self.watch is not None:
            self.watch.active = False

    def call(self, size: int | None) -> ModuleCall | None:
        """The first outermost call of the latest step that made one, cut to ``size`` samples (None before one, or
        unwatched)."""
        return self.watch.example(size) if self.watch is not None else None

    def calls(self, size: int | None) -> list[ModuleCall]:
        """The outermost calls of the latest step that made one (:meth:`RootCallWatch.examples`), cut to ``size``
        samples (empty before one, or unwatched)."""
        return self.watch.examples(size) if self.watch is not None else []

    def stop(self) -> None:
        """Remove the watch's hooks (idempotent); the batch is kept."""
        watch, self.watch = self.watch, None
        if watch is not None:
            watch.stop()

    def forget(self) -> None:
        """Stop watching and drop the batch (a fit starting afresh)."""
        self.batch = None
        self.stop()

    def __getstate__(self) -> dict[str, Any]:
        return {"batch": None, "watch": None}


def _cut(example: Any, size: int | None, batch: int | None = None) -> Any:
    """``example`` detached, its tensors cut to their first ``size`` samples (only those whose first dimension is
    ``batch``, when given)."""
    if isinstance(example, Tensor):
        cuts = size is not None and example.ndim and (batch is None or example.shape[0] == batch)
        return (example[:size] if cuts else example).detach().clone()
    if isinstance(example, Mapping):
        return {key: _cut(value, size, batch) for key, value in example.items()}
    if isinstance(example, tuple):
        return tuple(_cut(value, size, batch) for value in example)
    if isinstance(example, list):
        return [_cut(value, size, batch) for value in example]
    return example


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore every buffer of ``model`` and the random number generators when the block ends."""
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def record(model: nn.Module, example_input: Any, tracker: Any, *, keep_values: bool = False) -> Structure:
    """Run one forward of ``model`` on ``example_input`` with ``tracker`` (a fresh, detached
    :class:`~lightning_relu.tracker.DeadUnitTracker` of ``model``, which names the rectifier calls) and derive every
    site's structure: the work of :func:`lightning_relu.structure.observe`, which documents the arguments.

    Raises:
        ObservationError: the forward failed on ``example_input``.
    """
    tracker._watch_axes = False  # the analysis below finds every producer
    calls: list[tuple[str, int, int, bool]] = []  # (site name, node index, unit axis, whether that axis is a guess)
    recorder = _Recorder(list(_tensors(example_input)), keep_values)

    def seen(site: Any, output: Tensor) -> None:
        origin = recorder.origin.get(id(output))
        if origin is not None:
            stats = tracker.stats[site.name]
            guessed = stats.unit_dim is None and site.name not in tracker._unit_dims
            calls.append((site.name, origin[0], stats.unit_axis(output), guessed))

    tracker._observer = seen
    try:
        with preserved_state(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tracker.attach()
            handles = _track_modules(model, recorder.module_stack)
            try:
                with recorder:
                    output = call_model(model, example_input)
            except Exception as error:  # the model's own error, re-raised with what to do
                raise ObservationError(
                    f"Could not run {type(model).__name__} on the example input ({_describe(example_input)}): "
                    f"{type(error).__name__}: {error}. Pass `example_input=` with what the model's forward takes: a "
                    "tensor, a tuple of positional arguments or a dict of keyword arguments."
                ) from error
            finally:
                for handle in handles:
                    handle.remove()
    finally:
        tracker._observer = None
        tracker.detach()
    structure = _Analysis(model, recorder, calls, output).run()
    found = {site.name: site for site in (*tracker.all_sites, *tracker.sites)}
    structure.found = tuple(found.values())
    structure.known = tuple(dict.fromkeys([*found, *structure.sites]))
    return structure


def _track_modules(model: nn.Module, stack: list[str]) -> list[Any]:
    """Hooks that keep ``stack`` at the qualified name of the module whose forward runs (removed after)."""
    handles = []
    for name, module in model.named_modules():

        def enter(module: nn.Module, args: Any, name: str = name) -> None:
            stack.append(name)

        def leave(module: nn.Module, args: Any, output: Any) -> None:
            if len(stack) > 1:
                stack.pop()

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave, always_call=True))
    return handles


class AxisWatch:
    """Give every site whose unit axis nothing fixes its producer's layout, on the site's first call in a real
    forward (a training step), before that call is counted.

    While :meth:`start`/:meth:`stop` bracket the forward, the operations are recorded (a thread-local
    :class:`~torch.overrides.TorchFunctionMode`) and ``tracker``'s observer walks back from each open site's
    rectifier to its Linear/ConvNd: the features of a Linear (last dimension), the channels of a convolution
    (dimension 1). Nothing of the model changes; the recording is dropped at :meth:`stop`.
    """

    def __init__(self, model: nn.Module, tracker: Any, inputs: Any) -> None:
        self.tracker = tracker
        self.open = {
            name for name, stats in tracker.stats.items() if stats.unit_dim is None and name not in tracker._unit_dims
        }
        self.adopted: dict[str, int] = {}
        self.checked: set[str] = set()  # sites seen (functional ones found in this forward are open too)
        self._recorder: _Recorder | None = None
        self._analysis: _Analysis | None = None
        self._model = model
        self._inputs = list(_tensors(inputs))

    def start(self) -> AxisWatch:
        discovering = self.tracker._discovery is not None and not self.tracker._discovery.done
        if (not self.open and not discovering) or self._recorder is not None:
            return self
        self._recorder = _Recorder(self._inputs, keep_rectifier_inputs=False)
        self._analysis = _Analysis(self._model, self._recorder, [], None)
        self.tracker._observer = self._seen
        self._recorder.__enter__()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        return self

    def stop(self) -> dict[str, int]:
        """End the recording (idempotent); returns the axes adopted, by site name."""
        recorder, self._recorder = self._recorder, None
        if recorder is not None:
            self.tracker._observer = None
            recorder.__exit__(None, None, None)  # type: ignore[no-untyped-call]  # torch leaves it unannotated
            self._analysis = None
        return self.adopted

    def _seen(self, site: Any, output: Tensor) -> None:
        if site.name in self.checked or self._recorder is None or self._analysis is None:
            return
        self.checked.add(site.name)
        stats = self.tracker.stats.get(site.name)
        if stats is None or stats.unit_dim is not None or site.name in self.tracker._unit_dims:
            return
        origin = self._recorder.origin.get(id(output))
        if origin is None or output.ndim < 3:
            return
        node = self._recorder.nodes[origin[0]]
        producer = self._analysis._producer(node)[0]
        if producer is not None:
            if producer.kind == "conv" and producer.weight.parameter.ndim != output.ndim:
                return  # an unbatched convolution: its channels are dimension 0
            kinds = {producer.kind: producer.weight.parameter.shape[0]}
        else:  # no single producer (a residual sum): the layers the pre-activation comes from, where they agree
            kinds = self._analysis.ancestor_layouts(node)
        dim = _layout_axis(kinds, output)
        if dim is None:
            return
        self.tracker.stats[site.name].unit_dim = dim
        self.tracker._unit_dims[site.name] = dim
        self.adopted[site.name] = dim


def _layout_axis(kinds: dict[str, int], output: Tensor) -> int | None:
    """The unit axis of ``output`` that the layers it comes from lay out (``kinds``, from
    :meth:`_Analysis.ancestor_layouts`): the last dimension after a Linear, dimension 1 after a convolution, where they
    agree and the width matches (else ``None``)."""
    if len(kinds) != 1:
        return None
    ((kind, width),) = kinds.items()
    dim = 1 if kind == "conv" else -1
    return dim if output.shape[dim] == width else None


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a dict with keys {list(value)}"
    if isinstance(value, ModuleCall):
        return f"a call of `{value.module or 'the model'}`"
    return type(value).__name__


# ------------------------------------------------------------------------------------------------ analysis
def _arg(node: _Node, position: int, name: str, default: Any = None) -> Any:
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _factor(node: _Node, data: Tensor) -> float | Tensor | None:
    """What an arithmetic operation with one computed operand ``data`` multiplies it by (a number, or a tensor that
    broadcasts into it): the rest is a constant added. ``None`` where the result is not an affine function of
    ``data`` (``data`` as a divisor, a rounding division)."""
    op, args, kwargs = node.op, node.args, node.kwargs
    first = args[0] if args else kwargs.get("input", kwargs.get("self"))
    second = args[1] if len(args) > 1 else kwargs.get("other")
    is_first = first is data
    other = second if is_first else first
    if op in _SCALE_OPS or op in _DIV_OPS:
        factor = _as_factor(other)
        if op not in _DIV_OPS or factor is None:
            return factor
        if not is_first or kwargs.get("rounding_mode") is not None or (isinstance(factor, float) and factor == 0):
            return None
        return 1.0 / factor
    if op == "__rsub__":  # other - data
        return -1.0
    if is_first:  # data plus or minus a constant (``alpha`` scales the constant)
        return 1.0
    alpha = _as_factor(kwargs.get("alpha", 1))
    return None if alpha is None else -alpha if op in _SUB_OPS else alpha


def _as_factor(value: Any) -> float | Tensor | None:
    if isinstance(value, Tensor):
        return value.detach().to("cpu", torch.float64) if not value.is_complex() else None
    return float(value) if isinstance(value, (int, float)) else None


def _unit_scale(scale: float | Tensor, shape: torch.Size, axis: int, units: int) -> tuple[Tensor | None, bool]:
    """Per unit, the mean of ``scale`` (a number, or a tensor that broadcasts into ``shape``) over the unit's entries
    (float64, CPU; ``None`` for a scale of exactly 1), and whether it varies among a unit's entries."""
    if not isinstance(scale, Tensor):
        return (None if scale == 1.0 else torch.full((units,), scale, dtype=torch.float64)), False
    if scale.numel() == 1:
        return torch.full((units,), float(scale.reshape(())), dtype=torch.float64), False
    full = scale.broadcast_to(shape)
    moved = (full.movedim(axis, 0) if len(shape) > 1 else full.reshape(1, -1)).reshape(units, -1)
    return moved.mean(1), bool((moved != moved[:, :1]).any())


class _Analysis:
    def __init__(
        self, model: nn.Module, recorder: _Recorder, calls: list[tuple[str, int, int, bool]], output: Any
    ) -> None:
        self.nodes = recorder.nodes
        self.recorder = recorder
        self.calls = calls
        self.offset: str | None = None  # set by each walk of `_producer`
        self.scale: float | Tensor = 1.0  # set by each walk of `_producer`
        shown = output.to_tuple() if hasattr(output, "to_tuple") else output
        self.output_ids = {id(t) for t in _tensors(shown)}
        self.params: dict[int, tuple[str, str, nn.Module]] = {}
        for module_name, module in model.named_modules():
            for attribute, parameter in module.named_parameters(prefix="", recurse=False):
                key = id(parameter)
                if key not in self.params:
                    full = f"{module_name}.{attribute}" if module_name else attribute
                    self.params[key] = (full, module_name, module)
        self.buffer_owner: dict[int, str] = {}
        for module_name, module in model.named_modules():
            for _, buffer in module.named_buffers(prefix="", recurse=False):
                self.buffer_owner.setdefault(id(buffer), module_name)
        # per parameter: the affine and norm nodes that use it (directly or through a computed weight)
        self.uses: dict[int, set[int]] = {}
        for node in self.nodes:
            if node.op in _AFFINE_OPS or node.op in _NORM_OPS:
                for tensor in node.inputs[1:]:
                    ref = self._param_ref(tensor)
                    if ref is not None:
                        self.uses.setdefault(id(ref.parameter), set()).add(node.index)

    # ---- parameters
    def _param_ref(self, tensor: Tensor | None) -> ParamRef | None:
        """The parameter ``tensor`` is, or is computed from row for row (one parameter of the same shape reached
        through operations on parameters and constants only)."""
        if tensor is None or not isinstance(tensor, Tensor):
            return None
        found = self.params.get(id(tensor))
        if found is not None:
            return ParamRef(found[0], found[1], found[2], tensor, computed=False)  # type: ignore[arg-type]
        origin = self.recorder.origin.get(id(tensor))
        if origin is None or self.nodes[origin[0]].data:
            return None
        reached: dict[int, Tensor] = {}
        stack, visited = [origin[0]], set()
        while stack:
            index = stack.pop()
            if index in visited:
                continue
            visited.add(index)
            node = self.nodes[index]
            for source, value in zip(node.sources, node.inputs, strict=True):
                if id(value) in self.params:
                    reached[id(value)] = value
                elif source is not None:
                    stack.append(source[0])
        shaped = [p for p in reached.values() if p.shape[0] == tensor.shape[0] and p.numel() == tensor.numel()]
        if len(shaped) != 1:
            return None
        name, module_name, module = self.params[id(shaped[0])]
        return ParamRef(name, module_name, module, shaped[0], computed=True)  # type: ignore[arg-type]

    def ancestor_layouts(self, node: _Node, limit: int = 256) -> dict[str, int]:
        """The affine operations a node's data input comes from through elementwise, norm and chain operations and
        other rectifiers (``relu(relu(fc(x)))``; no moves): their kinds (``"linear"``, ``"conv"``) with each one's
        output width, as far as they agree."""
        kinds: dict[str, int] = {}
        seen: set[int] = set()
        stack = [s[0] for s, t in zip(node.sources, node.inputs, strict=True) if s is not None and id(t) in self._data]
        while stack and len(seen) < limit:
            index = stack.pop()
            if index in seen:
                continue
            seen.add(index)
            current = self.nodes[index]
            if current.op in _AFFINE_OPS:
                kind = "linear" if current.op == "linear" else "conv"
                width = int(current.inputs[1].shape[0]) if len(current.inputs) > 1 else -1
                if kind == "conv" and (len(current.inputs) < 2 or current.outputs[0].ndim != current.inputs[1].ndim):
                    return {}  # an unbatched convolution: its channels are dimension 0, not a unit axis to adopt
                if kinds.setdefault(kind, width) != width:
                    return {}
                continue
            if current.op in _WALKED_OPS or current.op in _RECTIFIER_OPS:
                stack.extend(
                    s[0]
                    for s, t in zip(current.sources, current.inputs, strict=True)
                    if s is not None and id(t) in self._data
                )
        return kinds

    # ---- producers
    def _producer(self, node: _Node) -> tuple[Producer | None, list[Norm], str | None, Tensor | None]:
        """Walk back from a rectifier node to its producer: (producer, norms from producer to site, problem, first
        norm's input)."""
        norms: list[Norm] = []
        norm_input: Tensor | None = None
        self.offset = None  # the last walk's addition of a constant, if any (read by the caller)
        self.scale = 1.0  # the last walk's factor from the shift target (the last norm, else the producer) to the site
        source = node.sources[0] if node.sources else None
        reader, read = node, (node.inputs[0] if node.inputs else None)  # the operation reading `read` from `source`
        while True:
            if source is None:
                return None, norms, "its input is not computed in the forward (a model input or a constant)", None
            current = self.nodes[source[0]]
            written = self.recorder.writes.between(read, source[0], reader.index) if read is not None else None
            if written is not None:  # what `current` computed was changed in place before `reader` read it
                where = reader.module or "the model"
                why = f"its pre-activation is written in place through another view (`{written}` in `{where}`)"
                return None, norms, why, None
            op = current.op
            if op in _AFFINE_OPS:
                producer, problem = self._as_producer(current)
                return producer, norms[::-1], problem, norm_input
            reader = current
            if op in _NORM_OPS:
                norms.append(self._as_norm(current))
                norm_input = read = current.inputs[0]
                source = current.sources[0]
                continue
            if op in _CHAIN_OPS or op in _NEG_OPS:
                if op in _NEG_OPS and not norms:
                    self.scale = -self.scale
                source, read = current.sources[0], current.inputs[0]
                continue
            if op in _ARITH_OPS:
                data = [(s, t) for s, t in zip(current.sources, current.inputs, strict=True) if id(t) in self._data]
                factor = _factor(current, data[0][1]) if len(data) == 1 else None
                if factor is not None and data[0][0] is not None and self._broadcasts_into(current, data[0][1]):
                    if op not in _SCALE_OPS and op not in _DIV_OPS:
                        self.offset = op  # a constant added: odd functions of the producer's output stop here
                    if not norms:  # what scales the pre-activation after the last norm (the shift target)
                        self.scale = self.scale * factor
                    source, read = data[0]
                    continue
                what = f"combines several computed tensors (`{op}`)" if len(data) > 1 else f"comes from `{op}`"
                if len(data) == 1 and factor is None:
                    what = f"is not an affine function of its input (`{op}`)"
                return None, norms, f"its pre-activation {what} (in `{current.module or 'the model'}`)", None
            where = current.module or "the model"
            return None, norms, f"its pre-activation comes from `{op}` (in `{where}`), not from a Linear/ConvNd", None

    @property
    def _data(self) -> set[int]:
        return self.recorder.data_ids

    @staticmethod
    def _broadcasts_into(node: _Node, data: Tensor) -> bool:
        """The data operand keeps its shape (the other operand is a scalar or broadcasts into it)."""
        return bool(node.outputs) and tuple(node.outputs[0].shape) == tuple(data.shape)

    def _as_producer(self, node: _Node) -> tuple[Producer | None, str | None]:
        weight = self._param_ref(_arg(node, 1, "weight"))
        if weight is None:
            return None, f"the weight of its `{node.op}` (in `{node.module or 'the model'}`) is not a parameter"
        bias_tensor = _arg(node, 2, "bias")
        bias = self._param_ref(bias_tensor) if isinstance(bias_tensor, Tensor) else None
        if isinstance(bias_tensor, Tensor) and bias is None:
            return None, f"the bias of its `{node.op}` (in `{node.module or 'the model'}`) is not a parameter"
        groups = 1 if node.op == "linear" else int(_arg(node, 6, "groups", 1))
        kind = "linear" if node.op == "linear" else "conv"
        return Producer(weight.module_name, kind, weight, bias, groups), None

    def _as_norm(self, node: _Node) -> Norm:
        op = node.op
        if op == "batch_norm":
            running_mean, running_var = _arg(node, 1, "running_mean"), _arg(node, 2, "running_var")
            weight, bias = _arg(node, 3, "weight"), _arg(node, 4, "bias")
            kind, mixes = "batch", False
        elif op == "instance_norm":
            running_mean, running_var = _arg(node, 1, "running_mean"), _arg(node, 2, "running_var")
            weight, bias = _arg(node, 3, "weight"), _arg(node, 4, "bias")
            kind, mixes = "instance", False
        elif op == "layer_norm":
            running_mean = running_var = None
            weight, bias = _arg(node, 2, "weight"), _arg(node, 3, "bias")
            kind, mixes = "layer", True
        else:
            running_mean = running_var = None
            weight, bias = _arg(node, 2, "weight"), _arg(node, 3, "bias")
            groups = int(_arg(node, 1, "num_groups"))
            channels = node.inputs[0].shape[1] if node.inputs[0].ndim > 1 else 1
            kind, mixes = "group", channels // max(groups, 1) > 1
        name = node.module
        for tensor in (weight, bias):
            ref = self._param_ref(tensor) if isinstance(tensor, Tensor) else None
            if ref is not None:
                name = ref.module_name
                break
        else:
            if isinstance(running_mean, Tensor) and id(running_mean) in self.buffer_owner:
                name = self.buffer_owner[id(running_mean)]
        weight, bias, running_mean, running_var = (
            t if isinstance(t, Tensor) else None for t in (weight, bias, running_mean, running_var)
        )
        return Norm(name, kind, weight, bias, running_mean, running_var, mixes)

    # ---- run
    def run(self) -> Structure:
        sites: dict[str, SiteStructure] = {}
        producer_nodes: dict[str, set[int]] = {}
        pre_activations: dict[str, Tensor] = {}
        norm_inputs: dict[str, Tensor] = {}
        ndims: dict[str, int] = {}
        for name, index, axis, guessed in self.calls:
            node = self.nodes[index]
            output = node.outputs[0]
            producer, norms, problem, norm_input = self._producer(node)
            if producer is None and guessed and output.ndim >= 3:  # the layers it comes from, as a tracker's watch
                layout = _layout_axis(self.ancestor_layouts(node), output)
                axis = axis if layout is None else layout % output.ndim
            if producer is not None:
                dim = output.ndim - 1 if producer.kind == "linear" else 1
                if output.ndim < 2 or output.shape[dim] != producer.weight.parameter.shape[0]:
                    producer, problem = None, "the rectifier's input is not laid out as its producer's output"
                else:
                    axis = dim
            units = int(output.shape[axis]) if output.ndim > 1 else 1
            site = sites.get(name)
            if site is None:
                ndims[name] = output.ndim
                site = sites[name] = SiteStructure(name, 0, axis, units, producer, norms, producer_problem=problem)
                site.offset = self.offset
                site.scale, uneven = _unit_scale(self.scale, output.shape, axis, units)
                if uneven:
                    shape = tuple(self.scale.shape) if isinstance(self.scale, Tensor) else ()
                    site.uneven_scale = (
                        f"its pre-activation is multiplied by a factor that differs between a unit's entries (of shape "
                        f"{shape}, as a fixed mask over positions)"
                    )
                producer_nodes[name] = set()
                if index in self.recorder.rectifier_inputs:
                    pre_activations[name] = self.recorder.rectifier_inputs[index]
                if norm_input is not None:
                    norm_inputs[name] = norm_input
            elif site.producer is not None and (
                producer is None or producer.weight.parameter is not site.producer.weight.parameter
            ):
                site.producer, site.norms = None, []
                site.producer_problem = problem or "its calls are fed by different layers"
            site.calls += 1
            if producer is not None and site.producer is not None:
                source = node.sources[0]
                producer_nodes[name].update(self._chain_affine(source))
        for name, site in sites.items():
            self._check_shared(site, producer_nodes[name])
        self._consumers(sites)
        return Structure(sites, pre_activations, norm_inputs, ndims=ndims)

    def _chain_affine(self, source: tuple[int, int] | None) -> set[int]:
        """The affine and norm nodes of the chain from a rectifier back to its producer."""
        found: set[int] = set()
        while source is not None:
            node = self.nodes[source[0]]
            if node.op in _NORM_OPS:
                found.add(node.index)
            if node.op in _AFFINE_OPS:
                found.add(node.index)
                break
            data = [s for s, t in zip(node.sources, node.inputs, strict=True) if id(t) in self._data]
            source = data[0] if data else None
        return found

    def _check_shared(self, site: SiteStructure, own: set[int]) -> None:
        if site.producer is None:
            return
        tensors: list[Tensor | None] = [
            site.producer.weight.parameter,
            site.producer.bias.parameter if site.producer.bias else None,
        ]
        tensors += [t for norm in site.norms for t in (norm.weight, norm.bias)]
        for tensor in tensors:
            if tensor is None:
                continue
            others = self.uses.get(id(tensor), set()) - own
            if others:
                site.producer, site.norms = None, []
                site.producer_problem = (
                    f"its producer's parameters are also used elsewhere in the forward (`{self.nodes[min(others)].op}`"
                    f" in `{self.nodes[min(others)].module or 'the model'}`): acting on them would change that too"
                )
                return

    # ---- consumers: labels pushed through the recorded operations
    def _consumers(self, sites: dict[str, SiteStructure]) -> None:
        offsets: dict[str, int] = {}
        total = 0
        for name, site in sites.items():
            offsets[name] = total
            total += site.num_units
        owner = [""] * total
        for name, site in sites.items():
            for unit in range(site.num_units):
                owner[offsets[name] + unit] = name
        starts: dict[int, str] = {index: name for name, index, *_ in self.calls}
        labels: dict[tuple[int, int], Tensor] = {}
        consumer_nodes: dict[str, set[int]] = {name: set() for name in sites}
        problems: dict[str, dict[str, None]] = {name: {} for name in sites}

        def fail(label: Tensor, why: str) -> None:
            for value in torch.unique(label).tolist():
                if value >= 0:
                    problems[owner[int(value)]].setdefault(why, None)

        # what `_read` and `_consume` work with, for this pass
        self._sites, self._owner, self._offsets, self._consumer_nodes, self._fail = (
            sites, owner, offsets, consumer_nodes, fail
        )

        writes = self.recorder.writes
        for node in self.nodes:
            labeled = [(i, labels[s]) for i, s in enumerate(node.sources) if s is not None and s in labels]
            for i, label in list(labeled):  # a site's output changed in place through another view since it was made
                source = node.sources[i]
                written = writes.between(node.inputs[i], source[0], node.index) if source is not None else None
                if written is not None:
                    fail(label, f"its output is written in place through another view (`{written}`) before "
                         f"`{node.op}` in `{node.module or 'the model'}` reads it")  # fmt: skip
                    labeled.remove((i, label))
            if labeled:
                self._read(node, labeled, labels)
            if node.index in starts:
                name = starts[node.index]
                site = sites[name]
                out = node.outputs[0]
                shape = [1] * out.ndim
                if out.ndim > 1:
                    shape[site.unit_dim] = site.num_units
                    label = torch.arange(site.num_units, device="cpu").reshape(shape) + offsets[name]
                else:
                    label = torch.full((1,), offsets[name], dtype=torch.long)
                labels[node.index, 0] = label.expand(tuple(out.shape)) if out.ndim > 1 else label.expand(out.shape)
        for key, label in labels.items():
            tensor = self.nodes[key[0]].outputs[key[1]]
            if id(tensor) in self.output_ids and self.recorder.origin.get(id(tensor)) == key:
                fail(label, "its output reaches the model's output")
        for name, site in sites.items():
            for consumer in site.consumers:
                others = self.uses.get(id(consumer.weight.parameter), set()) - consumer_nodes[name]
                if others:
                    problems[name].setdefault(
                        f"its consumer `{consumer.name}` is also applied to other inputs: zeroing its columns would "
                        "change those",
                        None,
                    )
                if consumer.weight.computed:
                    problems[name].setdefault(
                        f"its consumer `{consumer.name}` computes its weight from a parameter (weight "
                        "standardisation): the outgoing weights cannot be zeroed",
                        None,
                    )
            site.reader_problems = list(problems[name])

    def _read(self, node: _Node, labeled: list[tuple[int, Tensor]], labels: dict[tuple[int, int], Tensor]) -> None:
        """Push the labels of ``node``'s labeled inputs to its outputs, record it as a consumer, or name it as a
        reader that blocks revival."""
        fail = self._fail
        op = node.op
        where = f"`{op}` in `{node.module or 'the model'}`"
        first_position, first = labeled[0]
        if op in _AFFINE_OPS:
            if first_position != 0 or len(labeled) > 1:
                fail(first, f"it is used as a weight by {where}")
                return
            self._consume(node, first)
            return
        if op in _INSPECT_OPS:
            return
        out = node.outputs[0]
        try:
            if op in _CAST_OPS:
                result: list[Tensor] | None = [first]
            elif op in _MOVE_OPS:
                result = self._move(node, dict(labeled))
            elif op in _POOL_OPS:
                result = self._pool(node, first)
            elif op in _REDUCE_OPS:
                result = self._reduce(node, first)
            elif op in _ZERO_PRESERVING or (op in _SCALE_OPS and len(labeled) == 1):
                result = self._elementwise(node, labeled)
            else:
                result = None
        except (RuntimeError, TypeError, ValueError, IndexError):
            result = None
        if result is None:
            for _, label in labeled:
                fail(label, f"it is read by {where}")
            return
        for position, (tensor, label) in enumerate(zip(node.outputs, result, strict=False)):
            if label is None:
                continue
            if tuple(label.shape) != tuple(tensor.shape):
                fail(label, f"it is read by {where}")
                continue
            if bool((label >= 0).any()):
                labels[node.index, position] = label
        del out

    def _move(self, node: _Node, labeled: dict[int, Tensor]) -> list[Tensor] | None:
        joins = node.op in ("cat", "concat", "concatenate", "stack")
        position = iter(range(len(node.inputs)))

        def swap(value: Any) -> Any:
            if isinstance(value, Tensor):
                i = next(position)
                if i in labeled:
                    return labeled[i]
                # entries of other tensors joined with the site's carry no unit; index tensors stay as they are
                return torch.full(value.shape, -1, dtype=torch.long) if joins else value
            if isinstance(value, (list, tuple)):
                return type(value)(swap(v) for v in value)
            return value

        args = tuple(swap(a) for a in node.args)
        kwargs = {k: swap(v) for k, v in node.kwargs.items()}
        if node.op.startswith("attr:"):
            return [getattr(args[0], node.op[5:])]
        if joins:
            func: Any = getattr(torch, node.op)
        elif node.op in ("pixel_shuffle", "pixel_unshuffle", "channel_shuffle"):
            func = getattr(torch, node.op, None) or getattr(nn.functional, node.op)
        else:
            func = getattr(Tensor, node.op, None)
        if func is None:
            return None
        return list(_tensors(func(*args, **kwargs)))

    def _pool(self, node: _Node, label: Tensor) -> list[Tensor] | None:
        op = node.op.lstrip("_").replace("_with_indices", "")
        values = label.double()
        dims = int(op[-2])
        functional = nn.functional
        if op.startswith("adaptive"):
            size = _arg(node, 1, "output_size")
            pool = getattr(functional, f"adaptive_max_pool{dims}d")
            high, low = pool(values, size), -pool(-values, size)
        else:
            kernel = _arg(node, 1, "kernel_size")
            stride = _arg(node, 2, "stride") or kernel
            padding = _arg(node, 3, "padding", 0)
            ceil = bool(node.kwargs.get("ceil_mode", False))
            if op.startswith("max"):
                dilation = _arg(node, 4, "dilation", 1)
                ceil = bool(_arg(node, 5, "ceil_mode", False))
            else:
                dilation = 1
                ceil = bool(_arg(node, 4, "ceil_mode", False))
            pool = getattr(functional, f"max_pool{dims}d")
            high = pool(values, kernel, stride, padding, dilation, ceil_mode=ceil)
            low = -pool(-values, kernel, stride, padding, dilation, ceil_mode=ceil)
        if not torch.equal(high, low):
            return None
        result = [high.long()]
        return result * len(node.outputs) if len(node.outputs) > 1 else result

    def _reduce(self, node: _Node, label: Tensor) -> list[Tensor] | None:
        dim = _arg(node, 1, "dim")
        if dim is None or isinstance(dim, Tensor):
            return None
        keepdim = bool(_arg(node, 2, "keepdim", False)) if node.op not in ("std", "var", "norm") else bool(
            node.kwargs.get("keepdim", False)
        )
        dims = tuple(dim) if isinstance(dim, (list, tuple)) else (dim,)
        values = label.double()
        high, low = values.amax(dims, keepdim), values.amin(dims, keepdim)
        if not torch.equal(high, low):
            return None
        return [high.long()] * len(node.outputs)

    @staticmethod
    def _elementwise(node: _Node, labeled: list[tuple[int, Tensor]]) -> list[Tensor] | None:
        out = node.outputs[0]
        result: Tensor | None = None
        for _, label in labeled:
            try:
                spread = label.expand(out.shape) if tuple(label.shape) != tuple(out.shape) else label
            except RuntimeError:
                return None
            if result is not None and not torch.equal(result, spread):
                return None
            result = spread
        return [result] if result is not None else None

    def _consume(self, node: _Node, label: Tensor) -> None:
        """Record an affine operation reading labeled entries, with the unit map of each site it reads."""
        sites, owner, offsets, fail = self._sites, self._owner, self._offsets, self._fail
        where = f"`{node.op}` in `{node.module or 'the model'}`"
        if node.op == "linear":
            flat = label.reshape(-1, label.shape[-1]) if label.ndim > 1 else label.reshape(1, -1)
            high, low = flat.amax(0), flat.amin(0)
        else:
            moved = label.movedim(1, 0).reshape(label.shape[1], -1) if label.ndim > 2 else label.t()
            high, low = moved.amax(1), moved.amin(1)
        if not torch.equal(high, low):
            fail(label, f"{where} reads entries of several units in one column")
            return
        weight = self._param_ref(_arg(node, 1, "weight"))
        if weight is None:
            fail(label, f"{where} has a weight that is not a parameter")
            return
        groups = 1 if node.op == "linear" else int(_arg(node, 6, "groups", 1))
        kind = "linear" if node.op == "linear" else "conv"
        columns = torch.nonzero(high >= 0).reshape(-1)
        for name in dict.fromkeys(owner[int(v)] for v in high[columns].tolist()):
            mine = columns[(high[columns] >= offsets[name]) & (high[columns] < offsets[name] + sites[name].num_units)]
            units = high[mine] - offsets[name]
            sites[name].consumers.append(Consumer(weight.module_name, kind, weight, groups, mine, units))
            self._consumer_nodes[name].add(node.index)
