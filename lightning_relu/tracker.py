"""``DeadUnitTracker``: forward hooks that count per-unit activity, for any PyTorch loop."""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from lightning_relu._compat import is_compiled, is_forward_redirected, on_backward_end, stops_recomputation
from lightning_relu.functional import NO_STEP
from lightning_relu.observation import AxisWatch, own_forward, record
from lightning_relu.site import (
    FUNCTIONAL_RECTIFIERS,
    MAX_POSITIONS,
    RECTIFIER_TYPES,
    Site,
    SiteKey,
    may_call_rectifiers,
    module_names,
    module_sites,
    rectifier_owners,
    site_name,
    unknown_names,
)
from lightning_relu.stats import ActivationStats, LayerReport, _check_eps

__all__ = ["DeadUnitTracker", "NoReluSitesWarning"]

_MAX_POSITIONS = MAX_POSITIONS


class NoReluSitesWarning(UserWarning):
    """The model has no rectifier site to watch."""


class DeadUnitTracker:
    """Count dead units, per-unit activation rates and living data at every ReLU site of a model.

    Entering the context registers one forward hook per site; leaving it removes them. Every forward pass
    in between is counted (call :meth:`pause`/:meth:`resume` or set :attr:`enabled` to skip some, e.g.
    evaluation passes). Counting stays on the activations' device and never synchronizes with the host;
    :meth:`report` does, once.

    One ``nn.ReLU`` object applied at several places of a forward pass (as in residual blocks that reuse
    ``self.relu``) is one site per place: the k-th call (k >= 1) since its owner's forward began is the site
    ``<module name>_<k>``, created on first sight. Units of different places are never mixed.

    Functional calls (``F.relu``, ``torch.relu``, ``x.relu()``, in-place forms, ``F.relu6``) are found on the
    first forward the hooks see (a thread-local ``TorchFunctionMode`` watches it, once) and counted from then on,
    that forward included: while the forward of a module that makes such calls runs, a ``TorchFunctionMode`` sees
    them (only that module's own calls, not its children's). The first forward is every outermost call into the
    model (or into its submodules) until the model's own forward returns or an outermost call repeats: a training
    step that calls ``self.encoder`` and ``self.head`` is one forward (one that calls ``model(x)`` and then a
    child, or a child twice, is not: ``DeadUnitMonitor`` watches its whole first training batch instead).

    Args:
        model: the network to watch.
        sites: names of the sites to watch (default: every site found by
            :func:`~lightning_relu.find_relu_sites`, and every later call position). An unknown name raises
            ``ValueError``; naming a module's site also watches its later call positions.
        trace: find functional rectifier calls on the first forward (``False``: count ``nn.ReLU``/``nn.ReLU6``
            modules only).
        eps: a unit active on fewer than this share of its entries is *dying* (``LayerReport.dying``).
        track_margin: also measure each unit's pre-activation mean and standard deviation, giving the death
            margin ``m = mean / std`` and ``LayerReport.at_risk`` (``m < Φ⁻¹(eps)``). It costs two more float
            reductions per site and step, over the pre-activation.
        unit_dims: the unit axis of sites that no known layer fixes, by site name: ``-1`` (last dimension, as in
            ``(batch, time, features)`` sequences) or ``1`` (channels). A site whose Linear/ConvNd layer (or the
            layers its pre-activation comes from, in an observed forward) is known has its axis from that layer; any
            other site takes the last dimension of 2-D outputs and dimension 1 of others, with one warning for
            3-D outputs, which could be either. Naming a site also sets the later call positions of its module (or
            parent) created at run time, and a module's later positions found by tracing whose axis nothing else
            gives.
        example_input: what the model's forward takes (a tensor, a tuple of positional arguments or a dict of
            keyword arguments): one forward is observed on it (:func:`lightning_relu.structure.observe`, no state
            changed) and every site whose axis no known layer fixes takes its producer's layout (the features of a
            Linear, the channels of a convolution) instead of a guess from the rank.
        discovered: the model's sites as :func:`~lightning_relu.find_relu_sites` returns them (another tracker's
            ``all_sites``), to skip discovering them again.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> with DeadUnitTracker(net) as tracker:
        ...     _ = net(torch.randn(32, 4))
        >>> report = tracker.report()
        >>> report["1"].num_units
        8
    """

    def __init__(
        self,
        model: nn.Module,
        sites: Sequence[str] | None = None,
        trace: bool = True,
        eps: float = 0.01,
        track_margin: bool = False,
        unit_dims: Mapping[str, int] | None = None,
        example_input: Any = None,
        discovered: Sequence[Site] | None = None,
    ) -> None:
        _check_eps(eps)
        if not isinstance(track_margin, bool):
            raise ValueError(f"`track_margin` must be a bool, got {track_margin!r}")
        check_unit_dims(unit_dims)
        self.eps = float(eps)
        self.track_margin = track_margin
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a `torch.nn.Module`, got {type(model).__name__}")
        if sites is not None and (
            isinstance(sites, str) or not isinstance(sites, Iterable) or not all(isinstance(n, str) for n in sites)
        ):
            raise ValueError(f"`sites` must be a sequence of site names or None, got {sites!r}")
        self.model = model
        if not isinstance(trace, bool):
            raise ValueError(f"`trace` must be a bool, got {trace!r}")
        found = list(discovered) if discovered is not None else module_sites(model)
        discovering = trace and may_call_rectifiers(model)
        # every qualified module name: site names are derived from site keys and these (`site_name`)
        self._module_names = module_names(model)
        # names of functional sites are known after the first forward only: checked then (`_Discovery.hand_over`)
        self._unconfirmed: dict[str, str] = {}
        # what to say when the first forward shows no site (the monitor words it for its users)
        self._no_sites_warning: tuple[str, type[Warning]] | None = None
        self._wanted: set[str] | None = None
        self._check_names(found, sites, unit_dims, discovering)
        if example_input is not None:
            for name, dim in observed_unit_dims(model, example_input, found).items():
                self._unit_dims.setdefault(name, dim)
        #: every site found, counted or not
        self.all_sites: list[Site] = found
        self.sites: list[Site] = [site for site in found if self._is_wanted(site.name)]
        self.stats: dict[str, ActivationStats] = {
            site.name: _new_stats(site, self.eps, track_margin, self._unit_dims.get(site.name)) for site in self.sites
        }
        self._axis_warned: set[str] = set()
        # called with (site, output) for every counted rectifier output while set (`lightning_relu.observation.record`)
        self._observer: Callable[[Site, Tensor], None] | None = None
        # the first forward's recording that gives open sites their producer's unit axis (`AxisWatch`)
        self._watch_axes = True
        self._axis_watch: Any = None
        self._axis_depth = 0
        self.enabled = True
        self._handles: list[RemovableHandle] = []
        self._width_warned: set[str] = set()
        self._transformed_warned = False
        self._batch_tag = NO_STEP  # what `tag_batch` set last, for sites found later
        # a backward pass that reached the model's output is running now (`_backward_began`, `_backward_ended`)
        self._backward = False
        # Call positions: a rectifier module applied at several places of one forward is one site per place,
        # and so is each functional call of a parent's forward. Position k of key m is the k-th call since the
        # forward of m's owner (or of the model) began; keys are id(module) for modules, id(parent) for calls.
        self._calls: dict[int, int] = {}
        self._positions: dict[int, list[tuple[Site, ActivationStats] | None]] = {}
        self._first_site: dict[int, Site] = {}
        self._modes: dict[int, _FunctionalCounter] = {}
        # functional calls are found on the first forward (`_Discovery`), when `trace` asks for them
        self._discovery: _Discovery | None = _Discovery(self) if discovering else None
        self._place_found(found)

    def _check_names(
        self,
        found: list[Site],
        sites: Sequence[str] | None,
        unit_dims: Mapping[str, int] | None,
        discovering: bool,
    ) -> None:
        """Check the names of ``sites`` and ``unit_dims`` against the names the model's site keys can have (those a
        forward must confirm wait for its end when it may find them) and resolve the unit axes."""
        names = [site.name for site in found]
        if sites is not None:
            unknown = unknown_names(sites, found, self._module_names)
            if unknown and not discovering:
                raise ValueError(f"`sites` has unknown site names {unknown}; the model's sites are {names}")
            self._unconfirmed.update(dict.fromkeys(unknown, "sites"))
            self._wanted = set(sites)
        later = unknown_names(unit_dims or (), found, self._module_names) if discovering else []
        self._unconfirmed.update(dict.fromkeys(later, "unit_dims"))
        self._unit_dims = _resolve_unit_dims(
            {k: v for k, v in (unit_dims or {}).items() if k not in later}, found, self._module_names
        )
        self._unit_dims.update({name: (unit_dims or {})[name] for name in later})
        # the axes given (a later call position of a module takes its first position's); `_unit_dims` also gets the
        # axes observed per site, which are that site's alone
        self._given_dims = dict(self._unit_dims)

    def _place_found(self, found: list[Site]) -> None:
        """The call positions of the sites found before any forward, by module (or functional parent)."""
        for site in sorted(found, key=lambda s: s.call_index):
            key = id(site.module if site.kind == "module" else site.parent)
            self._first_site.setdefault(key, site)
            positions = self._positions.setdefault(key, [])
            while len(positions) < site.call_index:
                positions.append(None)
            entry = (site, self.stats[site.name]) if site.name in self.stats else None
            if len(positions) == site.call_index:
                positions.append(entry)
            else:
                positions[site.call_index] = entry

    def _is_wanted(self, name: str) -> bool:
        return self._wanted is None or name in self._wanted

    # ------------------------------------------------------------------ hooks
    @property
    def discovering(self) -> bool:
        """Whether the hooks still look for functional rectifier calls (until the first forward is over): more
        sites may come."""
        return self._discovery is not None and not self._discovery.done

    def _bound_discovery(self) -> None:
        """Let the caller say where a step ends (:meth:`_step_ended`): until then, an outermost module called again
        is another call of the same step (``DeadUnitMonitor``: its training batches)."""
        if self._discovery is not None:
            self._discovery.bounded = True

    def _step_began(self) -> None:
        """A step of the caller begins (outside any forward): only a forward of this step ends a bounded watch at its
        end (not one of a validation run before it)."""
        if self._discovery is not None and not self._discovery.done:
            self._discovery.whole_call = self._discovery.failed_in_step = False

    def _step_ended(self) -> None:
        """A step of the caller is over (outside any forward): a bounded watch that saw a call return ends now."""
        discovery = self._discovery
        if discovery is None or not discovery.bounded or discovery.done or not discovery.whole_call:
            return
        if discovery.failed_in_step:
            discovery.failed_steps += 1
        if not discovery.failed_in_step or discovery.failed_steps > 1:  # a step with a failed call: watched again once
            discovery.finish()

    @property
    def attached(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    def attach(self) -> DeadUnitTracker:
        """Register the forward hooks (idempotent)."""
        if self._handles:
            return self
        if not self.all_sites and self._discovery is None:
            warnings.warn(
                f"{type(self.model).__name__} has no `nn.ReLU`/`nn.ReLU6` module or rectifier call: there is "
                "nothing to count.",
                NoReluSitesWarning,
                stacklevel=2,
            )
            return self
        modules = dict(self.model.named_modules())
        # call positions restart with the forward of the module that applies the rectifier (for one registered
        # under several names, the closest module holding every one of those names), as `find_relu_sites` numbers
        homes = rectifier_owners(self.model)
        owners: dict[int, tuple[nn.Module, list[int]]] = {}
        for key, first in self._first_site.items():
            if first.kind == "module":
                assert first.module is not None
                owner = modules.get(homes.get(key, first.name.rpartition(".")[0]), self.model)
                owners.setdefault(id(owner), (owner, []))[1].append(key)
                self._handles.append(first.module.register_forward_hook(_Hook(self._hook)))
                if self.track_margin:
                    self._handles.append(first.module.register_forward_pre_hook(_Hook(self._pre_hook)))
            else:
                self._count_functional(key, first, modules)
        owners.setdefault(id(self.model), (self.model, []))[1].extend(self._positions)
        for owner, keys in owners.values():
            reset = _Hook(self._make_reset(keys))
            self._handles.append(owner.register_forward_pre_hook(reset))
        # forwards that run inside the backward pass of the model's output (activation checkpointing's recomputations)
        # are not counted again: the model's output says when its backward begins, autograd's engine when it ends
        self._handles.append(self.model.register_forward_pre_hook(_Hook(self._forward_began)))
        self._handles.append(self.model.register_forward_hook(_Hook(self._watch_backward)))
        if self._watch_axes:
            # sites whose unit axis no known layer fixes take their producer's, seen on the first forward
            self._handles.append(
                self.model.register_forward_pre_hook(_Hook(self._start_axis_watch), with_kwargs=True)
            )
            self._handles.append(self.model.register_forward_hook(_Hook(self._stop_axis_watch), always_call=True))
        if self._discovery is not None and not self._discovery.done:
            if any(is_compiled(module) for module in self.model.modules()):
                self._discovery.warn_compiled()  # a compiled forward cannot be watched
            else:
                # its mode goes in after the axis watch's recorder (which must see an output before it is counted)
                # and comes out before it
                self._handles.extend(self._discovery.watch(self.model))
        return self

    def _count_functional(self, key: int, first: Site, modules: dict[str, nn.Module]) -> None:
        """Hooks that count the functional rectifier calls of ``first.parent``'s own forward from now on."""
        parent = first.parent if first.parent is not None else self.model
        mode = _FunctionalCounter(self, key)
        self._modes[key] = mode
        self._handles.append(parent.register_forward_pre_hook(_Hook(mode.enter_parent)))
        self._handles.append(parent.register_forward_hook(_Hook(mode.exit_parent), always_call=True))
        # the callees the first forward saw, and the children (and containers' children) it may not have run
        callees = {id(m): m for m in (*_callees(parent), *(modules[n] for n in first.callees if n in modules))}
        for child in (m for m in callees.values() if m is not parent):  # not itself, when recursive
            self._handles.append(child.register_forward_pre_hook(_Hook(mode.enter_child)))
            self._handles.append(child.register_forward_hook(_Hook(mode.exit_child), always_call=True))

    def _new_function_site(self, parent: nn.Module, parent_name: str, base: str, index: int, k: int) -> None:
        """A functional call found on the first forward: call position ``k`` of ``parent``'s forward, the
        ``index``-th call of ``base`` (``"relu"``, ``"relu6"``) in it."""
        key = id(parent)
        site_key = SiteKey(parent_name, k, base, index)
        site = Site(
            name=site_name(site_key, self._module_names),
            module=None,
            call_index=k,
            kind="function",
            parent=parent,
            parent_name=parent_name,
            key=site_key,
        )
        self.all_sites.append(site)
        positions = self._positions.setdefault(key, [])
        self._first_site.setdefault(key, site)
        while len(positions) < k:
            positions.append(None)
        wanted = self._is_wanted(site.name)
        positions.append((site, self._watch_new(site, self._unit_dims.get(site.name))) if wanted else None)

    def _confirm_names(self) -> None:
        """Check the names given in ``sites``/``unit_dims`` that only the first forward could confirm."""
        names = [site.name for site in self.all_sites]
        unconfirmed, self._unconfirmed = self._unconfirmed, {}
        unknown = unknown_names(unconfirmed, self.all_sites, self._module_names)
        for argument in dict.fromkeys(unconfirmed[name] for name in unknown):
            missing = [name for name in unknown if unconfirmed[name] == argument]
            raise ValueError(
                f"`{argument}` has unknown site names {missing}; the model's sites are {names} (after its first "
                "forward, which finds the functional rectifier calls)"
            )

    def _start_axis_watch(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if self._axis_watch is not None:
            self._axis_depth += 1  # the model's forward run inside itself (a recursive model)
        elif self._watch_axes and self.enabled:
            self._axis_watch = AxisWatch(self.model, self, (args, kwargs)).start()
            self._axis_depth = 0

    def _stop_axis_watch(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self._axis_depth > 0:
            self._axis_depth -= 1
            return
        watch, self._axis_watch = self._axis_watch, None
        if watch is not None:
            watch.stop()
            self._watch_axes = False  # once: the first forward has shown every site it reaches

    def detach(self) -> None:
        """Remove the hooks (idempotent; safe to call from error paths)."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        for mode in self._modes.values():
            mode.close()
        self._modes.clear()
        if self._discovery is not None:
            self._discovery.close()
            self._discovery.handles.clear()
        self._calls.clear()

    def __enter__(self) -> DeadUnitTracker:
        return self.attach()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.detach()

    def pause(self) -> None:
        """Stop counting without removing the hooks."""
        self.enabled = False
        self._end_watch()

    def resume(self) -> None:
        """Count again after :meth:`pause`."""
        self.enabled = True
        self._end_watch()

    def _end_watch(self) -> None:
        """Remove the first-forward watch's hooks once it is over (outside a forward, where that is safe)."""
        if self._discovery is not None and self._discovery.done and self._discovery.handles:
            self._discovery.remove()

    def new_pass(self) -> None:
        """Mark the start of a new forward pass (call positions restart; the model's own forward does this)."""
        self._calls.clear()
        self._backward = False

    def flush(self) -> None:
        """Add what the sites' counts hold back to their states (reading a state, or :meth:`report`, does it too;
        see :class:`~lightning_relu.ActivationStats`)."""
        for stats in self.stats.values():
            stats.flush()

    def _make_reset(self, keys: list[int]) -> Any:
        calls = self._calls

        def reset(module: nn.Module, inputs: Any) -> None:
            for key in keys:
                calls[key] = 0

        return reset

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._count(id(module), output)

    def _forward_began(self, module: nn.Module, inputs: Any) -> None:
        self._backward = False

    def _watch_backward(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """Hook the model's output tensors that autograd tracks: the first gradient that reaches one of them says
        that a backward pass has begun (:meth:`_backward_began`). Not while ``torch.compile`` traces: a compiled
        backward recomputes inside its own graph, without running forward hooks."""
        if torch.compiler.is_compiling() or not torch.is_grad_enabled():
            return
        for tensor in _tensors(output):
            if tensor.grad_fn is not None:  # not a leaf, whose hooks would outlive the step
                tensor.register_hook(self._backward_began)

    def _backward_began(self, grad: Tensor) -> None:
        if not self._backward:
            self._backward = True
            on_backward_end(self._backward_ended)

    def _backward_ended(self) -> None:
        self._backward = False

    def _recomputing(self) -> bool:
        """Whether a forward now runs inside the backward pass of the model's output, as activation checkpointing
        recomputes one (with autograd on, in both of its modes): from the first gradient that reaches the output to
        the end of that backward (a forward after it, in the same training step, is counted). A forward without
        autograd is never one, and says that the backward is over."""
        if self._backward and not torch.is_grad_enabled():
            self._backward = False
        return self._backward

    def _pre_hook(self, module: nn.Module, inputs: Any) -> None:
        if inputs and isinstance(inputs[0], Tensor):
            self._margin(id(module), inputs[0])

    def _entry(self, key: int, k: int) -> tuple[Site, ActivationStats] | None:
        """The site and counts of call position ``k`` of ``key`` (created on first sight), or None."""
        positions = self._positions.get(key)
        if positions is None:  # not a watched module (copies get hooks that do nothing; this is a safeguard)
            return None
        if k >= len(positions):
            if k >= _MAX_POSITIONS:
                return None
            self._add_positions(key, k)
        return positions[k]

    def _margin(self, key: int, pre_activation: Tensor) -> None:
        """Accumulate the pre-activation of the call about to happen (position = calls so far)."""
        counted = self.enabled and not self._recomputing() and (self._observer is not None or not own_forward())
        entry = self._entry(key, self._calls.get(key, 0)) if counted else None
        if entry is None:
            return
        stats = entry[1]
        if _transformed(pre_activation):
            self._warn_transformed()
            return
        with torch.no_grad():
            if stats.device != pre_activation.device:
                stats.to(pre_activation.device)
            stats.update_margin(pre_activation)

    def _count(self, key: int, output: Any) -> None:
        if self._recomputing():
            return  # a forward recomputed by activation checkpointing was counted when it first ran
        calls = self._calls
        k = calls.get(key, 0)
        calls[key] = k + 1
        if not self.enabled or not isinstance(output, Tensor) or (self._observer is None and own_forward()):
            return  # paused, or a forward the package runs itself (an observation for a remedy)
        entry = self._entry(key, k)
        if entry is None:
            return
        site, stats = entry
        if self._observer is not None:
            self._observer(site, output)
        if _transformed(output):
            self._warn_transformed()
            return
        if output.ndim == 0:
            self._warn_scalar(site)
            return
        if stats.unit_dim is None and output.ndim == 3 and site.name not in self._axis_warned:
            self._warn_axis(site, output)
        width = stats.width
        # the same unit axis the counts use; a 1-D output is one unit per sample
        if width and (output.shape[stats.unit_axis(output)] if output.ndim > 1 else 1) != width:
            self._warn_width(site, output, width)
            return
        if stats.device != output.device:
            stats.to(output.device)
        if torch.compiler.is_compiling():
            # the counting itself, traced into the model's graph; not torchmetrics' `update` wrapper, whose call count
            # (an integer attribute) would make the compiler build a new graph on every call
            stats._add(output)
        else:
            stats.update(output)  # counts the detached output: no autograd graph

    @staticmethod
    def _base_name(first: Site) -> str:
        """The name that the call positions of ``first``'s module (or parent's functional calls) share in a
        checkpoint's places and in warnings: the module's name, or ``<parent>.relu``."""
        return first.key.path if first.kind == "module" else _function_base(first.key.path)

    def _place(self, site: Site) -> tuple[str, str, int]:
        """Where a site sits, independent of its name: its kind, the base name of its module's (or parent's)
        positions, and its call position."""
        first = self._first_site[id(site.module if site.kind == "module" else site.parent)]
        return site.kind, self._base_name(first), site.call_index

    def _place_stats(self, kind: str, base: str, index: int, create: bool) -> ActivationStats | None:
        """The counts of the site at call position ``index`` of the rectifier module (or parent's functional calls)
        ``base``, creating the position when ``create`` and it is not seen yet; None when there is none."""
        if not isinstance(index, int) or not 0 <= index < _MAX_POSITIONS:
            return None
        if create and kind == "function" and not any(
            first.kind == kind and self._base_name(first) == base for first in self._first_site.values()
        ):
            self._restore_function_parent(base)
        for key, first in self._first_site.items():
            if first.kind == kind and self._base_name(first) == base:
                positions = self._positions[key]
                if index >= len(positions):
                    if not create:
                        return None
                    self._add_positions(key, index)
                entry = positions[index]
                return entry[1] if entry is not None else None
        return None

    def _restore_function_parent(self, base: str) -> None:
        """Create the first functional position of the module whose functional positions have the base ``base``
        (:meth:`_base_name`), for counts restored before the first forward has found its calls."""
        for parent_name, parent in self.model.named_modules():
            if _function_base(parent_name) == base and id(parent) not in self._positions:
                self._new_function_site(parent, parent_name, "relu", 0, 0)
                return

    def _watch_new(self, site: Site, unit_dim: int | None) -> ActivationStats:
        """Count a site created during a forward: its counts, on the device of the others, in :attr:`stats`."""
        with torch.inference_mode(False):  # the forward that creates it may run under inference mode
            stats = _new_stats(site, self.eps, self.track_margin, unit_dim)
        if self.stats:
            stats.to(next(iter(self.stats.values())).device)
        stats._batch_tag = self._batch_tag
        self.sites.append(site)
        self.stats[site.name] = stats
        return stats

    def _add_positions(self, key: int, k: int) -> None:
        positions = self._positions[key]
        first = self._first_site[key]
        base = self._base_name(first)
        while len(positions) <= k:
            index = len(positions)
            site_key = first.key.at(index)
            site = Site(
                name=site_name(site_key, self._module_names),
                module=first.module,
                call_index=index,
                kind=first.kind,
                parent=first.parent,
                parent_name=first.parent_name,
                key=site_key,
            )
            if self._is_wanted(site.name) or (self._wanted is not None and first.name in self._wanted):
                # the first position's axis, where given; where observed, too, unless this forward is watched for
                # axes (then the new position gets its own: a shared module may read other layouts at other places)
                inherited = self._given_dims if self._observer is not None else self._unit_dims
                unit_dim = self._unit_dims.get(site.name, inherited.get(first.name))
                positions.append((site, self._watch_new(site, unit_dim)))
            else:
                positions.append(None)
        if k == _MAX_POSITIONS - 1:
            warnings.warn(
                f"Site {base!r} was called {_MAX_POSITIONS} times in one forward pass; further calls are not "
                "counted. Give each place its own `nn.ReLU` module.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _position_counts(self) -> list[int]:
        """How many call positions each rectifier module (or functional parent) has, in discovery order, which is
        the same in every process."""
        return [len(positions) for positions in self._positions.values()]

    def _grow_positions(self, counts: Sequence[int]) -> None:
        """Create the positions other processes saw first (sites created on first sight, such as the third call of
        a module a loop runs a data-dependent number of times), then order the sites as every process does: the
        discovered ones first, the created ones by name. Reports reduce the sites one by one, in that order."""
        for key, count in zip(list(self._positions), counts, strict=True):
            if count > len(self._positions[key]):
                self._add_positions(key, count - 1)
        discovered = {site.name for site in self.all_sites}
        names = [name for name in self.stats if name in discovered]
        names += sorted(name for name in self.stats if name not in discovered)
        self.stats = {name: self.stats[name] for name in names}
        by_name = {site.name: site for site in self.sites}
        self.sites = [by_name[name] for name in names]

    def _warn_transformed(self) -> None:
        if self._transformed_warned:
            return
        self._transformed_warned = True
        warnings.warn(
            "Outputs computed inside torch.func transforms (vmap, grad, jacrev, ...) are not counted: they are "
            "wrappers without storage of their own, and their results could not be added to the counts outside "
            "the transform.",
            RuntimeWarning,
            stacklevel=3,
        )

    def _warn_axis(self, site: Site, output: Tensor) -> None:
        self._axis_warned.add(site.name)
        warnings.warn(
            f"Site {site.name!r} has no known Linear/ConvNd layer, so the units of its 3-D output of shape "
            f"{tuple(output.shape)} are taken along dimension 1 (channels, as after a Conv1d). If the output is a "
            f"(batch, time, features) sequence, pass `unit_dims={{{site.name!r}: -1}}`; pass "
            f"`unit_dims={{{site.name!r}: 1}}` to keep dimension 1 without this warning.",
            RuntimeWarning,
            stacklevel=3,
        )

    def _warn_scalar(self, site: Site) -> None:
        if site.name in self._width_warned:
            return
        self._width_warned.add(site.name)
        warnings.warn(
            f"Site {site.name!r} produced a 0-d output (a rectifier applied to a scalar, such as a learnable "
            "scale): it has no batch dimension and is not counted.",
            RuntimeWarning,
            stacklevel=2,
        )

    def _warn_width(self, site: Site, output: Tensor, width: int) -> None:
        if site.name in self._width_warned:
            return
        self._width_warned.add(site.name)
        warnings.warn(
            f"Site {site.name!r} expects {width} units but produced an output of shape "
            f"{tuple(output.shape)}; these outputs are not counted. Is one `nn.ReLU` module used at several "
            "places of different widths? Give each place its own module. Or, for a site without a known layer, "
            "are its units on another dimension? Say which with `unit_dims`.",
            RuntimeWarning,
            stacklevel=2,
        )

    # ---------------------------------------------------------------- results
    def report(self) -> dict[str, LayerReport]:
        """Per-site reports over everything counted since the last :meth:`reset`, keyed by site name.

        In a distributed run every process must call it: counts are summed across processes.

        Raises:
            RuntimeError: when no site has counted anything (no forward ran while the hooks were attached, or the
                tracker was read before its ``with`` block ran one): an empty report would read "0 dead".
        """
        reports = self._reports()
        if reports and not any(report.seen for report in reports.values()):
            where = (
                "its hooks are attached but no forward pass of the model ran since"
                if self.attached
                else "its hooks are not attached (its `with` block has closed, or it was never entered) and no forward "
                "pass ran while they were, since"
            )
            raise RuntimeError(
                f"`DeadUnitTracker.report()` has nothing to report: {where} it was created or last reset (or every "
                f"pass ran while it was paused), so none of its {len(reports)} sites has counted a sample. Run the "
                "forward passes inside `with DeadUnitTracker(model) as tracker:` and read `tracker.report()` after "
                "them."
            )
        return reports

    def _reports(self) -> dict[str, LayerReport]:
        """The per-site reports, empty windows included (the monitor reports epochs that may count nothing)."""
        return {name: _compute(stats) for name, stats in self.stats.items()}

    def reset(self) -> None:
        """Zero every count."""
        for stats in self.stats.values():
            stats.reset()
            stats.clear_first_nonfinite()

    def tag_batch(self, tag: int) -> None:
        """Tag the outputs counted from now on with ``tag`` (the monitor's global step), so that the first non-finite
        batch can be told when the CPU path folds its counts (:meth:`first_nonfinite_tag`)."""
        self._batch_tag = tag
        for stats in self.stats.values():
            stats._batch_tag = tag

    def nonfinite_counted(self) -> list[Tensor]:
        """Each site's count of non-finite outputs as its state holds it now, without folding what the CPU path keeps
        back (which :meth:`first_nonfinite_tag` accounts for): a per-batch read that costs no ATen call."""
        return [stats._nonfinite for stats in self.stats.values()]

    def first_nonfinite_tag(self) -> Tensor | None:
        """The smallest tag (:meth:`tag_batch`) of a non-finite output counted on the CPU path since the last
        :meth:`reset` (0-d int64, ``2**62`` when none was), or None when no tagged output was folded."""
        tags = [tag for stats in self.stats.values() if (tag := stats.first_nonfinite_tag()) is not None]
        if not tags:
            return None
        return torch.stack(tags).amin() if len(tags) > 1 else tags[0]

    def to(self, device: torch.device | str) -> DeadUnitTracker:
        """Move the counts to ``device`` (they also follow the activations automatically)."""
        for stats in self.stats.values():
            stats.to(device)
        return self


# how many failed calls have the next step watched again whole (a step that fails every time ends the watch after)
_REWATCHES = 4


class _Discovery(TorchFunctionMode):
    """Finds, on the first forward, the rectifier functions that each module's own ``forward`` calls, counts them,
    and at the end of each outermost call hands the parents found to a :class:`_FunctionalCounter` each.

    Hooks on every module keep a stack of the modules whose forward runs; while an outermost call runs, the mode
    (thread-local) sees every torch function. The watch ends when the model's own forward returns, or when an
    outermost call repeats the module of an earlier one (the next step has begun, and every call of the first one
    has been seen); a bounded watch (``DeadUnitMonitor``) ends only at the end of the caller's step. A call that
    raises hands nothing over where it fails (see :meth:`leave`): its step is watched again.
    """

    def __init__(self, tracker: DeadUnitTracker) -> None:
        super().__init__()
        self.tracker = tracker
        self.done = False
        # per running forward: module, name, functional calls so far, calls per function, redirected
        self.stack: list[tuple[nn.Module, str, list[int], dict[str, int], bool]] = []
        self.roots: set[int] = set()
        self.callees: dict[int, dict[str, None]] = {}
        self.found: dict[int, nn.Module] = {}  # parents with functional calls not yet handed over
        self.handles: list[RemovableHandle] = []
        self.compiled_warned = False
        # the depth of the stack entry whose forward returned last (see `returned`; 0: none since the outermost
        # call began)
        self._returned = 0
        # set by a caller that says where a step ends (`DeadUnitMonitor`: the end of the first training batch): an
        # outermost module called again is then another call of the same step (a siamese encoder), not a new step
        self.bounded = False
        # whether a forward of the model's own (not a training step run through it) returned in the caller's step:
        # a bounded watch ends at a step's end only then
        self.whole_call = False
        # calls that raised (not a recomputation stopped early): the first few have the next step watched again
        # whole (later ones only drop their root, so a step that fails every time ends the watch); whether one did
        # in the caller's step, and the caller's steps with one: a bounded watch ends at a step with a failed call
        # only from the second such step on
        self.failures = 0
        self.failed_in_step = False
        self.failed_steps = 0

    def watch(self, model: nn.Module) -> list[RemovableHandle]:
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(_Hook(self.enter, name)))
            self.handles.append(module.register_forward_hook(_Hook(self.leave), always_call=True, prepend=True))
            # ahead of `leave`, and only when the forward returned: on an error path torch runs `leave` alone
            self.handles.append(module.register_forward_hook(_Hook(self.returned), prepend=True))
        return self.handles

    def returned(self, module: nn.Module, args: Any, output: Any) -> None:
        if not torch.compiler.is_compiling() and self.stack and self.stack[-1][0] is module:
            self._returned = len(self.stack)

    def enter(self, name: str, module: nn.Module, args: Any) -> None:
        if self.done:
            if not torch.compiler.is_compiling():
                self.remove()  # the watch ended in a forward hook, where its hooks could not go
            return
        if torch.compiler.is_compiling():
            return  # compiled after the watch began: its graph would not hold the mode
        if not self.stack:
            self._returned = 0
            if id(module) in self.roots and not self.bounded:
                self.finish(module, args)
                return
            self.roots.add(id(module))
            self.__enter__()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        else:
            self.callees.setdefault(id(self.stack[-1][0]), {})[name] = None
        self.stack.append((module, name, [0], {}, is_forward_redirected(module)))

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.done or torch.compiler.is_compiling() or not self.stack or self.stack[-1][0] is not module:
            return
        returned = self._returned == len(self.stack)
        redirected = self.stack.pop()[4]  # as it was when the call began (Lightning restores the forward inside)
        if returned and not redirected and all(entry[4] for entry in self.stack):
            self.whole_call = True
        if self.stack:
            return
        self.__exit__(None, None, None)  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        self._returned = 0
        if not returned:
            # the forward raised: torch runs this hook while it iterates the module's forward hooks, where the
            # counters' hooks cannot be added (the user's error would become "OrderedDict mutated during
            # iteration"). The parents found are handed over by the next outermost call that returns, or when the
            # watch ends; the first failed step is watched again whole, as a first one (a recomputation that
            # checkpointing stops early is not a failed step)
            stopped = stops_recomputation(sys.exc_info()[1])
            if not stopped:
                self.failures += 1
                self.failed_in_step = True
            if stopped or self.failures > _REWATCHES:
                self.roots.discard(id(module))
            else:
                self.roots.clear()
            return
        self.hand_over()
        if module is self.tracker.model and not redirected and not self.bounded:
            self.end()  # the model's own forward ran whole: nothing else belongs to the first forward

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        base = FUNCTIONAL_RECTIFIERS.get(func) if self.stack else None
        if base is None:
            return func(*args, **(kwargs or {}))
        parent, name, calls, bases, redirected = self.stack[-1]
        tracker = self.tracker
        key = id(parent)
        own = not redirected and not isinstance(parent, RECTIFIER_TYPES) and key not in tracker._modes
        if own:
            k = calls[0]
            calls[0] += 1
            index = bases.get(base, 0)
            bases[base] = index + 1
            self.found.setdefault(key, parent)
            if k >= len(tracker._positions.get(key, ())):
                tracker._new_function_site(parent, name, base, index, k)
            tracker._calls[key] = k
            if tracker.track_margin and args and isinstance(args[0], Tensor):
                tracker._margin(key, args[0])
        out = func(*args, **(kwargs or {}))
        if own:
            tracker._calls[key] = k
            tracker._count(key, out)
        return out

    def warn_compiled(self) -> None:
        if self.compiled_warned or torch.compiler.is_compiling():
            return
        self.compiled_warned = True
        warnings.warn(
            "The model is compiled (`torch.compile`): rectifier functions its forward may call (`F.relu`, "
            "`torch.relu`, `x.relu()`) are found on an eager forward only, so they are not counted; `nn.ReLU` "
            "modules are. Attach the tracker and run one forward before compiling the model, or use `nn.ReLU` "
            "modules.",
            RuntimeWarning,
            stacklevel=3,
        )

    def hand_over(self) -> None:
        """Count the parents found so far with a :class:`_FunctionalCounter` each, from the next call on."""
        tracker = self.tracker
        modules = dict(tracker.model.named_modules())
        for key, parent in self.found.items():
            callees = tuple(self.callees.get(key, {}))
            for site in tracker.all_sites:
                if site.kind == "function" and site.parent is parent:
                    site.callees = callees
            if tracker.attached:
                tracker._count_functional(key, tracker._first_site[key], modules)
        self.found.clear()

    def end(self) -> None:
        """The watch is over (every site of the first step is known): say so when nothing is to be counted, and check
        the names given for sites only a forward finds (in a pre-hook, a forward hook that torch runs on a forward
        that returned, or between steps)."""
        self.done = True
        tracker = self.tracker
        if not tracker.all_sites:
            message, category = tracker._no_sites_warning or (
                f"{type(tracker.model).__name__} applies no `nn.ReLU`/`nn.ReLU6` module and calls no rectifier "
                "function in its first forward: there is nothing to count.",
                NoReluSitesWarning,
            )
            warnings.warn(message, category, stacklevel=3)
        try:
            tracker._confirm_names()
        except ValueError:
            # the model's later forward hooks do not run after this one raises: end the axis watch's recording here
            watch, tracker._axis_watch, tracker._axis_depth = tracker._axis_watch, None, 0
            if watch is not None:
                watch.stop()
            raise

    def finish(self, module: nn.Module | None = None, args: Any = None) -> None:
        """End the watch (in ``module``'s forward pre-hook when it starts the next step, or between steps),
        handing over the parents that a failed call found."""
        self.done = True
        self.remove()
        if self.found:
            handed = set(self.found)
            self.hand_over()
            mode = self.tracker._modes.get(id(module)) if id(module) in handed else None
            if module is not None and mode is not None:  # its counter's pre-hook, added now, would not run now
                mode.enter_parent(module, args)
        self.end()

    def remove(self) -> None:
        """Remove the watch's hooks (from a pre-hook or outside a forward: a forward hook may run while torch walks
        the dict of forward hooks, on an error path)."""
        handles, self.handles = self.handles, []
        for handle in handles:
            handle.remove()

    def close(self) -> None:
        """Leave a forward the watch is in (an error path)."""
        if self.stack:
            self.stack.clear()
            self.__exit__(None, None, None)  # type: ignore[no-untyped-call]  # torch leaves it unannotated


class _FunctionalCounter(TorchFunctionMode):
    """Sees the rectifier functions that one parent module's own ``forward`` calls (not its children's)."""

    def __init__(self, tracker: DeadUnitTracker, key: int) -> None:
        super().__init__()
        self.tracker = tracker
        self.key = key
        self.depth = 0  # > 0 while a callee of the parent runs
        self.active = False  # the mode is pushed (by the outermost run of the parent's forward)
        # per run of the parent: whether it pushed the mode, and the depth and call position it interrupted
        # (None for a run that is not the forward; see `enter_parent`)
        self.runs: list[tuple[bool, int, int] | None] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        own = self.depth == 0 and func in FUNCTIONAL_RECTIFIERS
        if own and self.tracker.track_margin and args and isinstance(args[0], Tensor):
            self.tracker._margin(self.key, args[0])
        out = func(*args, **(kwargs or {}))
        if own:
            self.tracker._count(self.key, out)
        return out

    def enter_parent(self, module: nn.Module, inputs: Any) -> None:
        if is_forward_redirected(module):
            # Lightning (and Fabric) run `training_step` through the module's call to reach DDP, with the forward
            # swapped for it; it calls `self(x)`, the real run. Its own calls (a loss) are not the forward's.
            self.runs.append(None)
            return
        # A run inside another run of the parent (a recursive module) counts its positions from 0, like any run;
        # the interrupted run's position and callee depth come back after it. One mode serves every run, or each
        # call would be counted once per pushed mode.
        calls = self.tracker._calls
        push = self.tracker.enabled and not self.active
        self.runs.append((push, self.depth, calls.get(self.key, 0)))
        calls[self.key] = 0
        self.depth = 0
        if push:
            self.active = True
            self.__enter__()  # type: ignore[no-untyped-call]  # torch leaves it unannotated

    def exit_parent(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not self.runs:
            return
        run = self.runs.pop()
        if run is None:
            return
        pushed, self.depth, self.tracker._calls[self.key] = run
        if pushed:
            self.active = False
            self.__exit__(None, None, None)  # type: ignore[no-untyped-call]  # torch leaves it unannotated

    def enter_child(self, module: nn.Module, inputs: Any) -> None:
        self.depth += 1

    def exit_child(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.depth -= 1

    def close(self) -> None:
        while self.runs:
            run = self.runs.pop()
            if run is not None and run[0]:
                self.__exit__(None, None, None)  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        self.active = False
        self.depth = 0


class _Hook(functools.partial):  # type: ignore[type-arg]
    """A hook the tracker registers. A deep copy of the module it sits on (a teacher or EMA copy made during
    training) gets a hook that does nothing instead of a copy of the tracker, and so does a pickle (the module
    saves without the tracker): only the watched model is counted."""

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return _ignore

    def __reduce__(self) -> tuple[Any, ...]:
        return (_detached_hook, ())


def _ignore(*args: Any, **kwargs: Any) -> None:
    """What a copied or unpickled tracker hook does: nothing."""


def _detached_hook() -> Any:
    return _ignore


def _callees(parent: nn.Module) -> Iterator[nn.Module]:
    """The submodules whose forward ``parent``'s own forward may call: its children, and the children of those
    that have no forward of their own (``nn.ModuleList``, ``nn.ModuleDict``, plain containers), recursively."""
    for child in parent.children():
        if type(child).forward is nn.Module.forward:
            yield from _callees(child)
        else:
            yield child


def _transformed(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a wrapper of a ``torch.func`` transform (vmap's batched tensors, grad's tracking
    tensors): a plain, strided ``Tensor`` without storage of its own. Never asked while ``torch.compile`` traces."""
    if torch.compiler.is_compiling() or type(tensor) is not Tensor or tensor.layout is not torch.strided:
        return False
    try:
        tensor.untyped_storage()
    except NotImplementedError:
        return True
    return False


def _tensors(output: Any, limit: int = 16) -> list[Tensor]:
    """Up to ``limit`` tensors of a forward's output (a tensor, or tuples, lists and dicts of them)."""
    found: list[Tensor] = []
    stack = [output]
    while stack and len(found) < limit:
        item = stack.pop()
        if isinstance(item, Tensor):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
        elif isinstance(item, Mapping):
            stack.extend(reversed(list(item.values())))
    return found


def observed_unit_dims(model: nn.Module, example_input: Any, found: Sequence[Site]) -> dict[str, int]:
    """The unit axis (1 or -1) that one observed forward gives to each site whose axis nothing else fixes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what the counting warns about is the monitor's to say
        namer = DeadUnitTracker(model)
    structure = record(model, example_input, namer)
    dims: dict[str, int] = {}
    for site in found:
        observed = structure.sites.get(site.name)
        if site.producer is not None or site.norm is not None or observed is None or observed.producer is None:
            continue
        ndim = structure.ndims.get(site.name, 2)
        if observed.producer.kind == "linear" and observed.unit_dim == ndim - 1:
            dims[site.name] = -1
        elif observed.producer.kind == "conv" and observed.unit_dim == 1:
            dims[site.name] = 1
    return dims


def _new_stats(site: Site, eps: float, track_margin: bool, unit_dim: int | None = None) -> ActivationStats:
    return ActivationStats(
        num_units=site.num_units,
        unit_dim=site.unit_dim if unit_dim is None else unit_dim,
        name=site.name,
        eps=eps,
        track_margin=track_margin,
    )


def check_unit_dims(unit_dims: Any) -> None:
    """Validate a ``unit_dims`` argument: a mapping of site names to 1 or -1, or None."""
    if unit_dims is None:
        return
    if not isinstance(unit_dims, Mapping) or not all(isinstance(name, str) for name in unit_dims):
        raise ValueError(f"`unit_dims` must map site names to 1 or -1, or be None, got {unit_dims!r}")
    bad = {name: dim for name, dim in unit_dims.items() if isinstance(dim, bool) or dim not in (1, -1)}
    if bad:
        raise ValueError(f"`unit_dims` values must be 1 (channels) or -1 (last dimension), got {bad!r}")


def _resolve_unit_dims(
    unit_dims: Mapping[str, int] | None, found: list[Site], module_names: frozenset[str]
) -> dict[str, int]:
    """``unit_dims`` checked against the model's sites: every name is a site (or a later call position of one), and
    none contradicts its layer."""
    if not unit_dims:
        return {}
    names = [site.name for site in found]
    unknown = unknown_names(unit_dims, found, module_names)
    if unknown:
        raise ValueError(f"`unit_dims` has unknown site names {unknown}; the model's sites are {names}")
    sites = {site.name: site for site in found}
    for name, dim in unit_dims.items():
        site = sites.get(name)
        fixed = site is not None and (site.producer is not None or site.norm is not None)  # not merely inferred
        if fixed and site is not None and site.unit_dim != dim:
            raise ValueError(
                f"`unit_dims` gives site {name!r} unit dimension {dim}, but its layer "
                f"{site.producer_name or site.norm_name!r} puts its units on dimension {site.unit_dim}"
            )
    resolved = dict(unit_dims)
    by_key = {site.key: site for site in found}
    for site in found:  # a module's later call positions found by a forward take its entry, where nothing else says
        first = by_key.get(site.key.at(0)) if site.kind == "module" and site.call_index > 0 else None
        if first is not None and first.name in unit_dims and site.name not in resolved and site.unit_dim is None:
            resolved[site.name] = unit_dims[first.name]
    return resolved


def _function_base(parent_name: str) -> str:
    """The base name of a parent's functional call positions in a checkpoint's places: ``<parent>.relu``."""
    return f"{parent_name}.relu" if parent_name else "relu"


def _compute(stats: ActivationStats) -> LayerReport:
    with warnings.catch_warnings():
        # a site that saw nothing this window is a normal situation, reported as such
        warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
        return stats.compute()
