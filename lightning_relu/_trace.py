"""Data-flow links and functional rectifier calls, read off a ``torch.fx`` trace of the model."""

from __future__ import annotations

import inspect
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_relu.sites import _join

#: Functions and methods that apply a rectifier, as seen by ``torch.fx`` and by ``__torch_function__``.
FUNCTIONAL_RECTIFIERS: dict[Any, str] = {
    F.relu: "relu",
    F.relu_: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    torch.Tensor.relu: "relu",
    torch.Tensor.relu_: "relu",
    F.relu6: "relu6",
}
_RECTIFIER_METHODS = {"relu": "relu", "relu_": "relu"}

# Operations that keep every entry where it was (elementwise, or acting within a unit's entries): the unit axis of
# their inputs is that of their output.
_AXIS_KEEPING_FUNCTIONS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.neg,
}
_AXIS_KEEPING_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "contiguous"}

_PASS_THROUGH_FUNCTIONS = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
}


@dataclass
class Links:
    producer: str | None = None
    norm: str | None = None
    consumers: list[tuple[str, bool]] = field(default_factory=list)  # (name, through_flatten)
    unit_dim: int | None = None  # without a producer: the unit axis of the layers the pre-activation comes from


@dataclass
class TracedCall:
    """One rectifier call in a traced forward."""

    kind: str  # "module" or "function"
    module_name: str  # the rectifier module (kind "module") or the module whose forward makes the call
    index: int  # call position within that module (kind "module") or among that module's functional calls
    base: str  # "relu" or "relu6" for functional calls
    order: int  # position in the traced graph
    links: Links
    name_index: int = 0  # position among the same parent's calls of the same base (for naming)


@dataclass
class TraceResult:
    calls: list[TracedCall] = field(default_factory=list)
    failures: list[tuple[str, nn.Module, Exception]] = field(default_factory=list)
    complete: bool = False  # the whole model traced in one graph
    module_uses: Counter[int] = field(default_factory=Counter)  # calls of each leaf module (by id) in the graphs
    callees: dict[str, set[str]] = field(default_factory=dict)  # module name -> the modules its forward calls


def trace_model(model: nn.Module, leaf_types: tuple[type[nn.Module], ...], owners: dict[int, str]) -> TraceResult:
    """Trace ``model`` (or, where that fails, its children, recursively) and list every rectifier call.

    ``owners`` maps each rectifier module (by id) to the module whose forward applies it: call positions count
    from the start of each run of that forward, so a block run twice has the same sites in both runs (as at run
    time, where the positions restart with the owner's forward).
    """
    result = TraceResult()
    order = [0]

    def visit(prefix: str, module: nn.Module) -> None:
        if isinstance(module, leaf_types):
            return
        try:
            graph = fx.Tracer().trace(module)
        except Exception as error:  # any failure of user code under tracing
            result.failures.append((prefix, module, error))
            for name, child in module.named_children():
                visit(_join(prefix, name), child)
            return
        if module is model:
            result.complete = True
        _analyse(prefix, module, graph, result, order, owners)

    visit("", model)
    return result


def mentions_relu(module: nn.Module) -> bool:
    """Whether the source of ``module.forward`` may call a rectifier function (True when unknown)."""
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return True
    return "relu" in source


def _analyse(
    prefix: str, root: nn.Module, graph: fx.Graph, result: TraceResult, order: list[int], owners: dict[int, str]
) -> None:
    modules = dict(root.named_modules())
    module_calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    for target, count in module_calls.items():
        if str(target) in modules:
            result.module_uses[id(modules[str(target)])] += count

    def module_of(node: Any) -> nn.Module | None:
        if isinstance(node, fx.Node) and node.op == "call_module":
            return modules.get(str(node.target))
        return None

    def single_use(node: fx.Node) -> bool:
        return len(node.users) == 1 and module_calls[node.target] == 1

    def producer_links(node: fx.Node) -> Links:
        from lightning_relu.sites import NORM_TYPES, PRODUCER_TYPES

        links = Links()
        src = node.args[0] if node.args else node.kwargs.get("input")
        if isinstance(module_of(src), NORM_TYPES) and single_use(src):
            links.norm = _join(prefix, str(src.target))
            src = src.args[0] if src.args else None
        if isinstance(module_of(src), PRODUCER_TYPES) and single_use(src):
            links.producer = _join(prefix, str(src.target))
        if links.producer is None and links.norm is None:
            links.unit_dim = unit_axis_of(node.args[0] if node.args else node.kwargs.get("input"))
        return links

    def unit_axis_of(start: Any) -> int | None:
        """The unit axis of the layers a pre-activation comes from through elementwise operations, pooling or
        dropout (``x + fc(x)``: -1), when every such layer agrees; None when none is found."""
        from lightning_relu.sites import _PASS_THROUGH_TYPES, NORM_TYPES, PRODUCER_TYPES, RECTIFIER_TYPES

        found: set[int] = set()
        stack, seen = [start], set()
        while stack and len(seen) < 64:
            node = stack.pop()
            if not isinstance(node, fx.Node) or node in seen:
                continue
            seen.add(node)
            module = module_of(node)
            if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) > 1:
                stack.extend(arg for arg in node.args[:1] if isinstance(arg, fx.Node))  # over (C, ...): as its input
            elif isinstance(module, PRODUCER_TYPES + NORM_TYPES):
                found.add(-1 if isinstance(module, (nn.Linear, nn.LayerNorm)) else 1)
            elif (
                isinstance(module, _PASS_THROUGH_TYPES + RECTIFIER_TYPES)
                or _is_pass_through_call(node)
                or (node.op == "call_function" and node.target in _AXIS_KEEPING_FUNCTIONS)
                or (node.op == "call_function" and node.target in FUNCTIONAL_RECTIFIERS)
                or (node.op == "call_method" and node.target in _AXIS_KEEPING_METHODS | set(_RECTIFIER_METHODS))
            ):
                stack.extend(arg for arg in (*node.args, *node.kwargs.values()) if isinstance(arg, fx.Node))
        return found.pop() if len(found) == 1 else None

    def consumer_links(node: fx.Node) -> list[tuple[str, bool]]:
        from lightning_relu.sites import _PASS_THROUGH_TYPES, PRODUCER_TYPES

        found: list[tuple[str, bool]] = []
        for user in node.users:
            flattened = False
            current = user
            while True:
                module = module_of(current)
                if _is_flatten(current, module):
                    flattened = True
                elif not (isinstance(module, _PASS_THROUGH_TYPES) or _is_pass_through_call(current)):
                    break
                if len(current.users) != 1:
                    return []
                current = next(iter(current.users))
            module = module_of(current)
            if not (isinstance(module, PRODUCER_TYPES) and module_calls[current.target] == 1):
                return []
            if not current.args or current.args[0] is not _input_chain_end(node, user, current):
                return []
            found.append((_join(prefix, str(current.target)), flattened))
        return found

    from lightning_relu.sites import RECTIFIER_TYPES

    # Call positions, as the hooks count them. A rectifier module's position counts from the start of the latest
    # run of its owner's forward (the hooks reset it there, and never restore it): a call the parent makes after
    # the block ran follows the block's, and a recursive module's calls number on as its runs return. A functional
    # call's position counts within its own run of the parent's forward (the counter saves and restores it).
    module_index: Counter[str] = Counter()
    function_index: Counter[tuple[str, str | None]] = Counter()
    base_index: Counter[tuple[str, str | None, str]] = Counter()
    owned: dict[str, list[str]] = {}  # owner name -> the rectifier modules whose positions its runs reset
    for name, module in modules.items():
        if isinstance(module, RECTIFIER_TYPES):
            owned.setdefault(owners.get(id(module), ""), []).append(_join(prefix, name))
    started: set[str] = set()  # the runs (stack keys, unique per run) begun so far
    for node in graph.nodes:
        kind = base = None
        name_index = 0
        # the modules whose forward is running at this node: (key, qualified name); the key tells runs apart
        stack = [(key, _join(prefix, str(value[0]))) for key, value in (node.meta.get("nn_module_stack") or {}).items()]
        for key, name in stack:
            if key not in started:  # a run begins: the positions it owns restart
                started.add(key)
                for rectifier_name in owned.get(name, ()):
                    module_index[rectifier_name] = 0
        for caller, (_, callee) in zip([prefix] + [name for _, name in stack], stack, strict=False):
            if callee != caller:  # a recursive module is not its own callee
                result.callees.setdefault(caller, set()).add(callee)
        rectifier = modules.get(str(node.target)) if node.op == "call_module" else None
        if isinstance(rectifier, RECTIFIER_TYPES):
            kind = "module"
            owner = _join(prefix, str(node.target))
            index = module_index[owner]
            module_index[owner] += 1
        elif (node.op == "call_function" and node.target in FUNCTIONAL_RECTIFIERS) or (
            node.op == "call_method" and node.target in _RECTIFIER_METHODS
        ):
            kind = "function"
            base = FUNCTIONAL_RECTIFIERS.get(node.target) or _RECTIFIER_METHODS[str(node.target)]
            run, owner = stack[-1] if stack else (None, prefix)  # (a recursive root's inner runs have key "")
            index = function_index[owner, run]
            function_index[owner, run] += 1
            name_index = base_index[owner, run, base]
            base_index[owner, run, base] += 1
        else:
            continue
        links = producer_links(node)
        links.consumers = consumer_links(node)
        result.calls.append(TracedCall(kind, owner, index, base or "", order[0], links, name_index))
        order[0] += 1


def _is_flatten(node: fx.Node, module: nn.Module | None) -> bool:
    if isinstance(module, nn.Flatten):
        return module.start_dim == 1 and module.end_dim == -1
    if (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten"
    ):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    return False


def _is_pass_through_call(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _PASS_THROUGH_FUNCTIONS


def _input_chain_end(site_node: fx.Node, first_user: fx.Node, consumer: fx.Node) -> fx.Node:
    """The node whose output the consumer reads: the last node of the chain from the site."""
    if first_user is consumer:
        return site_node
    current = first_user
    while next(iter(current.users)) is not consumer:
        current = next(iter(current.users))
    return current
