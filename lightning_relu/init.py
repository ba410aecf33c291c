"""Initializers that keep rectifier networks alive: :func:`rai_` and :func:`sign_flip_`.

:func:`rai_` is a data-free initializer in the style of :mod:`torch.nn.init`. :func:`sign_flip_` is data-dependent:
it only changes the signs of whole affine maps, chosen from one forward pass over a sample of the data.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_relu._compat import BATCH_NORM_TYPES, CONV_TYPES
from lightning_relu._sharded import write_through
from lightning_relu.sites import Site, find_relu_sites, may_call_rectifiers
from lightning_relu.structure import ObservationError, call_model

__all__ = ["RAI_SIGMA_SCALE", "SignFlipReport", "rai_", "sign_flip_"]

# decide with host integers when the pre-activations are on the CPU (tests switch it off to run the device path)
_HOST_DECISIONS = True

#: Lu et al.'s scale of the symmetric part of RAI: ``sigma = RAI_SIGMA_SCALE / sqrt(fan_in)``.
RAI_SIGMA_SCALE = 0.6007


# --------------------------------------------------------------------------------------------------------------------
# Randomized asymmetric initialization
# --------------------------------------------------------------------------------------------------------------------


def rai_(
    module: nn.Module, generator: torch.Generator | None = None, *, example_input: Any = None, skip_frozen: bool = False
) -> nn.Module:
    r"""Fill a layer, or every layer that feeds a rectifier in a model, with Randomized Asymmetric Initialization.

    From Lu, Shin, Su and Karniadakis, "Dying ReLU and Initialization: Theory and Numerical Examples",
    Communications in Computational Physics 28 (2020). For every output unit :math:`j` of a ``nn.Linear`` or a
    (grouped) ``nn.ConvNd``, the vector of its incoming weights and its bias is drawn as

    .. math::
        V_j = [w_j; b_j] \sim \mathcal{N}\left(0, \sigma^2 I_{n+1}\right), \quad
        \sigma = \frac{0.6007}{\sqrt{n}}, \quad V_{j,i} \leftarrow \xi_j, \;
        i \sim \mathcal{U}\{1, \dots, n+1\}, \; \xi_j \sim \mathrm{Beta}(2, 1)

    where :math:`n` is the fan-in (``in_channels / groups`` times the kernel volume for a convolution): one entry of
    :math:`V_j`, chosen uniformly among the :math:`n + 1` positions (bias included), is replaced by a positive
    ``Beta(2, 1)`` draw, not rescaled. For a layer without bias the entry is chosen among the :math:`n` weights.
    The asymmetry makes it unlikely that a unit, or a whole layer, is dead for every input from the start.

    Given a model rather than a single layer, every producer of a rectifier site (:func:`find_relu_sites`) is
    initialized this way and every other layer (the output layer, layers the discovery cannot link to a rectifier)
    keeps its values. The model is changed in place under ``torch.no_grad()``. Pass ``example_input`` to find the
    producers on one observed forward (any nesting, fused norm-activation layers, standardised weights: the draw
    goes into the parameter the weight is computed from); without it, only ``nn.Sequential`` order links them, and
    layers feeding a rectifier function (``F.relu``) or a ReLU inside a custom ``forward`` are not found. Where the
    observed forward multiplies a producer's output by a negative number before the rectifier (``relu(-fc(x))``,
    ``relu(0.5 - fc(x))``, no norm between), those units' rows are stored negated, so that the pre-activation
    itself is drawn as above.

    Under FSDP2 (``fully_shard``) and DeepSpeed (ZeRO stages 1 to 3) the change is written through the shards or the
    fp32 master weights, as one process would make it on rank 0's arguments; every rank must call it. What cannot
    be written through (FSDP1, FSDP2 mixed precision, ZeRO-3 with ``memory_efficient_linear``) raises
    ``ValueError`` before anything changes.

    Args:
        module: an ``nn.Linear``, an ``nn.Conv1d``/``Conv2d``/``Conv3d``, or a model containing rectifier sites.
        generator: the ``torch.Generator`` every draw comes from (the global one when ``None``). The draws are made
            on the generator's device and copied into the parameters, so a CPU generator gives the same values
            whatever device the model is on.
        example_input: what the model's forward takes (a tensor, a tuple of positional arguments or a dict of
            keyword arguments), to find the producers on a real forward.
        skip_frozen: leave the layers whose weight does not require grad (a frozen teacher or backbone) as they are,
            with one warning naming them (``ReluInitializer`` does).

    Returns:
        ``module``, for chaining.

    Examples:
        >>> layer = nn.Linear(16, 32)
        >>> _ = rai_(layer, generator=torch.Generator().manual_seed(0))
        >>> model = nn.Sequential(nn.Linear(1, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 1))
        >>> _ = rai_(model)  # the two hidden layers; the output layer keeps its initialization
    """
    engine = write_through(module, "rai_", "module") if isinstance(module, nn.Module) else None
    if engine is not None:  # FSDP2, DeepSpeed: on the whole model (arguments checked there), written through
        engine.run(lambda model, _: rai_(model, generator, example_input=example_input, skip_frozen=skip_frozen))
        return module
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"`generator` must be a `torch.Generator` or None, got {generator!r}")
    if _is_affine_layer(module):
        _rai_layer_(module, generator)
        return module
    if not isinstance(module, nn.Module):
        raise ValueError(f"`module` must be a `torch.nn.Module`, got {type(module).__name__}")
    if isinstance(module, CONV_TYPES):  # transposed convolutions: fan-in is not what the paper means
        raise ValueError(f"`module` must be a Linear or a (non-transposed) ConvNd layer or a model, got {module}")
    producers: dict[int, nn.Module] = {}
    negated: dict[int, Tensor] = {}  # per producer, the units whose pre-activation is its output times a negative
    for site in find_relu_sites(module, example_input=example_input):
        if site.producer is not None and _is_affine_layer(site.producer):
            producers.setdefault(id(site.producer), site.producer)
            if site.norm is None and site.scale is not None and bool((site.scale < 0).any()):
                negated[id(site.producer)] = site.scale < 0
    if example_input is not None and producers:
        _warn_unreached(module, example_input)
    if not producers:
        warnings.warn(
            f"`rai_` found no rectifier site with a known producer in {type(module).__name__}: nothing was"
            " initialized. RAI applies to the Linear/ConvNd layers that feed an `nn.ReLU`/`nn.ReLU6` directly"
            " (possibly through a norm layer) inside an `nn.Sequential`, or on a forward observed on"
            " `example_input=`; otherwise call `rai_` on such layers.",
            RuntimeWarning,
            stacklevel=2,
        )
        return module
    frozen = {key for key, producer in producers.items() if skip_frozen and not _trainable(producer)}
    if frozen:
        names = [name for name, layer in module.named_modules() if id(layer) in frozen]
        warnings.warn(
            f"`rai_` left {len(names)} frozen layer(s) as they were (their weight does not require grad): {names}.",
            RuntimeWarning,
            stacklevel=2,
        )
    for key, producer in producers.items():
        if key not in frozen:
            _rai_layer_(producer, generator, negated.get(key))
    return module


def _trainable(layer: object) -> bool:
    """Whether ``layer``'s weight trains (``requires_grad``); a layer without a weight tensor counts as trainable."""
    weight = getattr(layer, "weight", None)
    return not isinstance(weight, Tensor) or weight.requires_grad


def _warn_unreached(model: nn.Module, example_input: Any) -> None:
    """One warning naming the sites an initializer cannot act on, with the reason the observed forward gives."""
    from lightning_relu.structure import observe

    sites = observe(model, example_input).sites
    missing = {name: site.producer_problem for name, site in sites.items() if site.producer is None}
    if missing:
        listed = "; ".join(f"{name!r}: {reason}" for name, reason in list(missing.items())[:8])
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        warnings.warn(
            f"`rai_` left {len(missing)} site(s) without a single producer as they were: {listed}{more}.",
            RuntimeWarning,
            stacklevel=3,
        )


def _is_affine_layer(module: object) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, CONV_TYPES) and not module.transposed


def _rai_layer_(layer: nn.Module, generator: torch.Generator | None, negated: Tensor | None = None) -> None:
    """RAI into ``layer``; the rows of the units ``negated`` marks are stored negated (the model multiplies their
    output by a negative number before the rectifier: ``relu(-fc(x))``), so that the pre-activation is drawn as RAI
    draws it."""
    weight = cast(Tensor, layer.weight)
    bias = cast("Tensor | None", layer.bias)
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(f"`rai_` cannot initialize {layer}: its parameters are not materialized yet (lazy module)")
    if weight.numel() == 0:
        warnings.warn("Initializing zero-element tensors is a no-op", stacklevel=3)
        return
    fan_in = weight.shape[1] * math.prod(weight.shape[2:])  # as `nn.init` counts it: inputs x receptive field
    device = generator.device if generator is not None else weight.device
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    with torch.no_grad():
        rows, row_bias = rai_rows(weight.shape[0], fan_in, bias is not None, generator, device, dtype)
        if negated is not None and negated.shape == (weight.shape[0],):
            flip = torch.where(negated.to(rows.device), -1.0, 1.0).to(rows.dtype)
            rows, row_bias = rows * flip[:, None], (row_bias * flip if row_bias is not None else None)
        weight.copy_(rows.reshape(weight.shape))
        if bias is not None and row_bias is not None:
            bias.copy_(row_bias)


def rai_rows(
    count: int,
    fan_in: int,
    has_bias: bool,
    generator: torch.Generator | None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor | None]:
    """``count`` rows of Randomized Asymmetric Initialization, the one draw :func:`rai_` and revival share:
    ``V_j = [w_j; b_j] ~ N(0, (0.6007 / sqrt(fan_in))^2)`` with one uniformly chosen entry (among ``fan_in + 1``
    with a bias, ``fan_in`` without) replaced by a Beta(2, 1) draw (``sqrt(U)``, ``U ~ U(0, 1)``). Returns the
    weights ``(count, fan_in)`` and the bias ``(count,)`` (``None`` without)."""
    positions = fan_in + int(has_bias)
    values = torch.empty(count, positions, device=device, dtype=dtype)
    values.normal_(0.0, RAI_SIGMA_SCALE / math.sqrt(fan_in), generator=generator)
    replaced = torch.randint(0, positions, (count,), device=device, generator=generator)
    # Beta(2, 1) has density 2x on [0, 1]: its inverse CDF is sqrt(u)
    beta = torch.rand(count, device=device, dtype=dtype, generator=generator).sqrt_()
    values[torch.arange(count, device=device), replaced] = beta
    return values[:, :fan_in], (values[:, fan_in] if has_bias else None)


# --------------------------------------------------------------------------------------------------------------------
# Sign flipping
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignFlipReport:
    """What :func:`sign_flip_` decided at one site.

    Fractions are shares of the ``num_samples`` samples of the pass, measured with the decision applied.

    Attributes:
        site: qualified name of the rectifier module.
        flipped: whether the affine map feeding the site was negated.
        target: qualified name of the module whose parameters were (or would have been) negated: the norm layer
            between producer and rectifier when it has affine parameters, the producer otherwise; ``None`` when the
            site cannot be flipped.
        reason: why the site was or was not flipped.
        living_before: share of the samples alive when the pass reached the site (cumulative over earlier sites).
        living_after: share of the samples alive after the site (cumulative: alive before and not killed here).
        site_fraction: share of all the samples that this site, on its own, does not kill (not cumulative: samples
            killed at earlier sites count when their output here is not all zero).
        num_samples: number of samples in the pass.
        frozen: whether the site was left because ``target``'s parameters do not require grad (``skip_frozen=True``).
    """

    site: str
    flipped: bool
    target: str | None
    reason: str
    living_before: float
    living_after: float
    site_fraction: float
    num_samples: int
    frozen: bool = False

    @property
    def survival(self) -> float:
        """Share of the samples alive before the site that survive it (1.0 when none was alive)."""
        return self.living_after / self.living_before if self.living_before > 0 else 1.0


@dataclass
class _FlipTarget:
    """The parameters that negate a site's pre-activation exactly."""

    name: str
    tensors: list[Tensor]
    # running means that must be negated with them (a norm layer without affine parameters, fed by the producer)
    running_means: list[Tensor]

    def negate_(self) -> None:
        with torch.no_grad():
            for tensor in self.tensors:
                tensor.neg_()

    def negate_running_means_(self) -> None:
        with torch.no_grad():
            for tensor in self.running_means:
                tensor.neg_()

    def negate_where_(self, flip: Tensor | bool, running_means: bool = False) -> None:
        """Negate when ``flip`` (a 0-d bool tensor, read on the device, or a bool) is true."""
        if isinstance(flip, bool):
            if flip:
                self.negate_running_means_() if running_means else self.negate_()
            return
        signs: dict[torch.dtype, Tensor] = {}
        with torch.no_grad():
            for tensor in self.running_means if running_means else self.tensors:
                if tensor.dtype not in signs:
                    signs[tensor.dtype] = 1 - 2 * flip.to(tensor.dtype)
                tensor.mul_(signs[tensor.dtype])


def _flip_target(site: Site) -> _FlipTarget | str:
    """The parameters to negate to negate the site's pre-activation, or the reason why there are none."""
    if site.offset is not None:
        return (
            f"a constant is added to its pre-activation after the affine map (`{site.offset}`): negating the map "
            "does not negate the pre-activation"
        )
    norm = site.norm
    if norm is not None and getattr(norm, "weight", None) is not None:
        tensors = [cast(Tensor, norm.weight)]
        if getattr(norm, "bias", None) is not None:
            tensors.append(cast(Tensor, norm.bias))
        return _FlipTarget(str(site.norm_name), tensors, [])
    producer = site.producer
    if producer is None:
        if norm is not None:
            return "its norm layer has no affine parameters and no producer was found"
        return "no producer: the pre-activation is not the output of one affine layer (e.g. after a residual sum)"
    tensors = [cast(Tensor, producer.weight)]
    if producer.bias is not None:
        tensors.append(cast(Tensor, producer.bias))
    running_means: list[Tensor] = []
    # normalization is an odd function of its input when it has no affine parameters: negating the producer negates
    # the normalized output; a running mean must follow for the layer to stay an exact negation in eval mode
    if isinstance(norm, BATCH_NORM_TYPES) and norm.running_mean is not None:
        running_means.append(norm.running_mean)
    return _FlipTarget(str(site.producer_name), tensors, running_means)


def sign_flip_(
    model: nn.Module,
    data: Tensor | Iterable[Any],
    *,
    max_samples: int | None = 1024,
    input_fn: Callable[[Any], Tensor] | None = None,
    skip_frozen: bool = False,
) -> dict[str, SignFlipReport]:
    r"""Negate the affine maps that would kill most of the data, in one forward pass over a sample of it.

    From Rister and Rubin, "Probabilistic bounds on data sensitivity in deep rectifier networks". A sample is
    *killed* at a site when the site's whole output for that sample is zero; once killed it stays killed. Visiting
    the sites in forward order, if strictly more than half of the samples still alive would be killed at a site, the
    affine map that feeds it is negated (the producer's weight and bias, or the affine weight and bias of a norm
    layer between producer and rectifier), which keeps alive every living sample whose pre-activation is not all
    non-negative. At least half of the living samples then survive every site, so after :math:`k` sites

    .. math::
        \frac{\#\{\text{alive samples}\}}{\#\{\text{samples}\}} \geq 2^{-k}.

    Only signs change: every parameter keeps its marginal distribution when the initialization is symmetric.
    A flip is applied only when it actually kills fewer living samples (it always does, except when the living
    samples' pre-activations are exactly zero).

    Which affine map feeds each site is observed first on a forward over the first 8 samples
    (:func:`lightning_relu.structure.observe`: any module nesting, norms fused into activation modules, weights
    standardised from a parameter); the decisions then take one pass whatever the depth. Where a site's rows merge
    batch and tokens (a decoder MLP on ``(batch * tokens, features)``), its rows are grouped back into their samples,
    batch-major as ``reshape(-1, features)`` lays them: a sample is killed there when all its tokens' rows are zero.
    A forward pre-hook on each rectifier sees its pre-activation :math:`z`,
    decides, and hands :math:`-z` on when it flips (exact, since negating the map negates :math:`z`). A rectifier
    module applied at several places is one site per call (``name``, ``name_1``, ...). Sites whose pre-activation is
    not the output of one affine layer (a rectifier after a residual sum), or has a constant added after it
    (``fc(x) - 3``: negating the map would not negate :math:`z`), cannot be flipped: they still update which samples
    are alive, and their report says why they were not flipped. The in-flight :math:`-z` assumes that nothing read
    the map's output before the site (a branch computed from it earlier in the forward saw it unflipped): there the
    report describes the forward as run, not the flipped model. A functional site (``F.relu`` found by
    tracing) is watched through a forward hook on the layer computing its pre-activation when the discovery linked
    one; a functional site without such a layer cannot be seen at all: it is left out of the report, with a warning.

    The pass runs with batch-statistics normalization and everything else in eval mode: batch-norm layers are put in
    train mode (their running statistics at initialization are not the data's; batch statistics are what the first
    training steps see), dropout and other layers in eval mode (deterministic decisions). Nothing else changes:
    the train/eval mode of every module, batch-norm running statistics and ``num_batches_tracked``, and the state of
    the global random number generator and of the DataLoader's own generator, if it has one (iterating a shuffling
    DataLoader draws from them), are restored afterwards, so the loader shuffles as it would have. The model is
    flipped in place under ``torch.no_grad()``.

    Under FSDP2 (``fully_shard``) and DeepSpeed (ZeRO stages 1 to 3) the change is written through the shards or the
    fp32 master weights, as one process would make it on rank 0's arguments; every rank must call it. What cannot
    be written through (FSDP1, FSDP2 mixed precision, ZeRO-3 with ``memory_efficient_linear``) raises
    ``ValueError`` before anything changes.

    Args:
        model: the network; its rectifier sites come from :func:`find_relu_sites`.
        data: a tensor of samples (first dimension), a list/tuple of batches, a DataLoader or any iterable of
            batches. A batch that is a tuple or a list contributes its first element (the inputs), unless
            ``input_fn`` is given. Batches are concatenated into one pass, on the device of the model's parameters.
        max_samples: how many samples to take at most (the first ones); ``None`` takes all of ``data``.
        input_fn: maps a batch to the model's input tensor, e.g. ``lambda batch: batch["image"]``.
        skip_frozen: leave the affine maps whose parameters do not require grad (a frozen teacher or backbone) as
            they are; their sites still count in the living data, and their reports say why (``ReluInitializer``
            does).

    Returns:
        A :class:`SignFlipReport` per site reached by the pass, keyed by site name, in forward order.

    Raises:
        ValueError: on invalid arguments, empty data, or data the model cannot run on.

    Examples:
        >>> net = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(3, 3), nn.ReLU())])
        >>> report = sign_flip_(net, torch.randn(256, 3))
        >>> all(r.survival >= 0.5 for r in report.values())
        True
    """
    engine = write_through(model, "sign_flip_") if isinstance(model, nn.Module) else None
    if engine is not None:  # FSDP2: on the unsharded model, written back into the shards (rank 0's data decides)
        flips = lambda inner, _: sign_flip_(  # noqa: E731
            inner, data, max_samples=max_samples, input_fn=input_fn, skip_frozen=skip_frozen
        )
        return engine.run(flips, share_result=True)
    _check_sign_flip_args(model, data, max_samples, input_fn)
    sites = find_relu_sites(model)
    nothing = (
        f"`sign_flip_` found no rectifier site (`nn.ReLU`/`nn.ReLU6` module or rectifier function call) in "
        f"{type(model).__name__}: nothing to flip."
    )
    if not sites and not may_call_rectifiers(model):  # no module of its own whose forward could call `F.relu`
        warnings.warn(nothing, RuntimeWarning, stacklevel=2)
        return {}

    pass_state, sites = _run_sign_flip_pass(model, data, sites, max_samples, input_fn, skip_frozen)
    # a norm layer without affine parameters whose producer was negated: its running mean follows
    for target, flip in pass_state.applied:
        target.negate_where_(flip, running_means=True)

    if pass_state.unobservable:
        warnings.warn(
            f"`sign_flip_` cannot watch the functional rectifier calls {pass_state.unobservable}: no layer's output"
            " shows their pre-activation (no layer computing it was found, or a constant is added after it, or it is"
            " multiplied by a factor that differs between a unit's entries). They are neither flipped nor counted in"
            " the living data; use `nn.ReLU` modules there to include them.",
            RuntimeWarning,
            stacklevel=2,
        )
    pass_state.finish()
    if not sites:
        warnings.warn(nothing, RuntimeWarning, stacklevel=2)
    missed = [site.name for site in sites if site.name not in pass_state.reports]
    missed = [name for name in missed if name not in pass_state.unobservable]
    if missed:
        warnings.warn(
            f"`sign_flip_`: the forward pass did not reach the sites {missed}; they were left as they were.",
            RuntimeWarning,
            stacklevel=2,
        )
    return pass_state.reports


def _check_sign_flip_args(
    model: nn.Module, data: Any, max_samples: int | None, input_fn: Callable[[Any], Tensor] | None
) -> None:
    """Refuse what :func:`sign_flip_` cannot take, before anything is read or changed."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a `torch.nn.Module`, got {type(model).__name__}")
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise ValueError(f"`max_samples` must be a positive integer or None, got {max_samples!r}")
    if input_fn is not None and not callable(input_fn):
        raise ValueError(f"`input_fn` must be a callable or None, got {input_fn!r}")
    if data is None:
        raise ValueError("`data` must be a tensor, a list/tuple of batches or a DataLoader, got None")


@dataclass
class _PassRestore:
    """What the sign-flip pass changes besides the signs, saved to be put back after it: module modes, batch-norm
    running statistics, and the state of the data's own generators."""

    modes: dict[nn.Module, bool]
    buffers: list[tuple[Tensor, Tensor]]
    data_generators: list[tuple[torch.Generator, Tensor]]

    @classmethod
    def save(cls, model: nn.Module, data: Any) -> _PassRestore:
        modes = {module: module.training for module in model.modules()}
        buffers = [
            (tensor, tensor.clone())
            for module in model.modules()
            if isinstance(module, BATCH_NORM_TYPES)
            for tensor in (module.running_mean, module.running_var, module.num_batches_tracked)
            if tensor is not None
        ]
        # a DataLoader shuffling with a generator of its own draws from it, not from the global one forked by the pass
        data_generators = [(generator, generator.get_state()) for generator in _generators_of(data)]
        return cls(modes, buffers, data_generators)

    def restore(self, model: nn.Module) -> None:
        # one recursive `train()` from the root, then `train()` again only where a module's own mode differed (overrides
        # run either way); calling `train()` on every module would walk each subtree again: quadratic in the nesting
        model.train(self.modes[model])
        for module, training in self.modes.items():  # pre-order: a subtree set here is corrected below where it differs
            if module.training != training:
                module.train(training)
        with torch.no_grad():
            for tensor, saved in self.buffers:
                tensor.copy_(saved)
        for generator, state in self.data_generators:
            generator.set_state(state)


def _run_sign_flip_pass(
    model: nn.Module,
    data: Any,
    sites: list[Site],
    max_samples: int | None,
    input_fn: Callable[[Any], Tensor] | None,
    skip_frozen: bool = False,
) -> tuple[_SignFlipPass, list[Site]]:
    """The one forward of :func:`sign_flip_`, its hooks deciding and flipping site by site; returns the pass and the
    sites as observed on the first samples. Modes, running statistics and generators are restored whatever happens;
    a pass that fails undoes its flips."""
    device = _model_device(model)
    saved = _PassRestore.save(model, data)
    cuda_devices = [device] if device.type == "cuda" else []
    pass_state = _SignFlipPass(sites, skip_frozen)
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        with torch.random.fork_rng(devices=cuda_devices), torch.no_grad():
            inputs = _to_device(_collect_inputs(data, input_fn, max_samples), device)
            # the links come from a forward observed on a few of the samples (the pass reports a failing forward)
            with contextlib.suppress(ObservationError):
                sites = find_relu_sites(model, example_input=_first_samples(inputs, 8))
                pass_state = _SignFlipPass(sites, skip_frozen)
            model.eval()
            for module in model.modules():
                if isinstance(module, BATCH_NORM_TYPES):
                    module.train()
            pass_state.start(_first_samples(inputs, None, count=True))
            on_host = isinstance(inputs, Tensor) and inputs.device.type == "cpu"
            if on_host and _HOST_DECISIONS and isinstance(inputs, Tensor) and inputs.is_floating_point():
                pass_state._host_buffers(inputs.dtype)  # before the pass: it then allocates nothing per site
            handles = pass_state.register()
            _call_for_pass(model, inputs, pass_state)
    except BaseException:
        pass_state.undo()
        raise
    finally:
        for handle in handles:
            handle.remove()
        saved.restore(model)
    return pass_state, sites


def _call_for_pass(model: nn.Module, inputs: Tensor | dict[str, Tensor], pass_state: _SignFlipPass) -> None:
    """Run the model once on the pass's inputs; the pass's own error first, then a failing forward as a ValueError."""
    try:
        call_model(model, inputs)
    except (RuntimeError, ValueError, TypeError) as err:
        if pass_state.error is not None:
            raise pass_state.error from err
        raise ValueError(
            f"`sign_flip_` could not run the model on `data` of shape {_shape_of(inputs)}"
            f" ({_expected_input(model)}): {err}"
            + (
                "; dict batches are passed as keyword arguments: pass `input_fn` to take the input out of them"
                if isinstance(inputs, dict)
                else ""
            )
        ) from err
    if pass_state.error is not None:
        raise pass_state.error


class _SignFlipPass:
    """State of the single forward pass: the alive mask and the decisions, updated by the hooks.

    A module site is watched by a forward pre-hook on its rectifier (the k-th call of a module applied at several
    places is its site with ``call_index`` k); a functional site (``F.relu``) by a forward hook on the layer that
    computes its pre-activation (its norm layer, else its producer), when the discovery found one.
    """

    def __init__(self, sites: list[Site], skip_frozen: bool = False) -> None:
        self.skip_frozen = skip_frozen
        self.reports: dict[str, SignFlipReport] = {}
        self._pending: list[tuple[str, str | None, str | None, list[Any]]] = []
        self.applied: list[tuple[_FlipTarget, Tensor | bool]] = []  # each target with its (device) decision
        self.error: Exception | None = None
        self.unobservable: list[str] = []
        self._decided: dict[str, str] = {}  # target name -> the site that decided whether to negate it
        self._frozen: set[str] = set()  # targets left because their parameters do not require grad
        self._alive: Tensor | None = None
        self._living = 0
        self._buffers: dict[torch.dtype, tuple[Tensor, ...]] = {}  # per-pass buffers of CPU decisions
        self._num_samples = 0
        # hook module -> its sites in call order, and how many times it was called in this pass
        self._inputs: dict[nn.Module, list[Site]] = {}
        self._outputs: dict[nn.Module, list[Site]] = {}
        self._calls: dict[nn.Module, int] = {}
        # per functional site whose pre-activation is its layer's output times a negative number on some units
        # (`relu(-fc(x))`): the sign of that number per unit, which the layer's output is read with
        self._signs: dict[str, Tensor] = {}
        # functional sites whose pre-activation their layer's output does not show (a constant added after it, a
        # factor that differs between a unit's entries): kept in call order, not read
        self._unread: set[str] = set()
        for site in sites:
            if site.module is not None:
                self._inputs.setdefault(site.module, []).append(site)
            elif site.norm is not None or site.producer is not None:
                module = cast(nn.Module, site.norm if site.norm is not None else site.producer)
                self._outputs.setdefault(module, []).append(site)
                if site.offset is not None or site.uneven_scale is not None:
                    self._unread.add(site.name)
                    self.unobservable.append(site.name)
                elif site.scale is not None and bool((site.scale < 0).any()):
                    self._signs[site.name] = torch.sign(site.scale)
            else:
                self.unobservable.append(site.name)
        for watched in (*self._inputs.values(), *self._outputs.values()):
            watched.sort(key=lambda site: getattr(site, "call_index", 0))

    def register(self) -> list[torch.utils.hooks.RemovableHandle]:
        handles = [module.register_forward_pre_hook(self._pre_hook) for module in self._inputs]
        handles += [module.register_forward_hook(self._post_hook) for module in self._outputs]
        return handles

    def start(self, num_samples: int) -> None:
        self._pending.clear()
        self._num_samples = num_samples
        self._alive = None
        self._living = num_samples  # living samples so far (kept on the host by CPU passes only)
        self._buffers.clear()
        self._calls.clear()

    def finish(self) -> None:
        """Turn the decisions of the pass into reports (one host sync for all sites)."""
        if not self._pending:
            return
        n = self._num_samples
        # counts of CPU passes are host integers already; device counts are read in one go
        on_device = [counts for *_, counts in self._pending if isinstance(counts[0], Tensor)]
        read = iter(torch.stack([torch.stack(counts) for counts in on_device]).tolist() if on_device else [])
        values = [next(read) if isinstance(counts[0], Tensor) else counts for *_, counts in self._pending]
        for (name, target, reason), (living, killed, _, alive_after, site_alive, flip) in zip(
            [entry[:3] for entry in self._pending], values, strict=True
        ):
            if reason is None:
                if 2 * killed <= living:
                    reason = "at least half of the living samples survive"
                elif flip:
                    reason = "more than half of the living samples would be killed"
                else:
                    reason = "more than half of the living samples would be killed, flipping does not help"
            self.reports[name] = SignFlipReport(
                site=name,
                flipped=bool(flip),
                target=target,
                reason=reason,
                living_before=living / n,
                living_after=alive_after / n,
                site_fraction=site_alive / n,
                num_samples=n,
                frozen=target is not None and target in self._frozen,
            )
        self._pending.clear()

    def undo(self) -> None:
        for target, flip in reversed(self.applied):
            target.negate_where_(flip)
        self.applied.clear()

    def _next_site(self, module: nn.Module, table: dict[nn.Module, list[Site]]) -> Site | None:
        count = self._calls.get(module, 0)
        self._calls[module] = count + 1
        sites = table[module]
        return sites[count] if count < len(sites) else None

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        site = self._next_site(module, self._inputs)
        if site is None or self.error is not None or not args:
            return None
        sign = self._visit(site, args[0])
        if sign is not None:
            args[0].mul_(sign)  # in place: the pre-activation of a flippable site feeds nothing else
        return None

    def _post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        site = self._next_site(module, self._outputs)
        if site is None or self.error is not None or site.name in self._unread:
            return None
        signs = self._signs.get(site.name)
        if signs is not None and isinstance(output, Tensor) and output.ndim > 1:
            shape = [1] * output.ndim
            shape[(site.unit_dim if site.unit_dim is not None else 1) % output.ndim] = -1
            sign = self._visit(site, output * signs.to(output.device, output.dtype).reshape(shape))
        else:
            sign = self._visit(site, output)
        if sign is not None:
            output.mul_(sign)
        return None

    def _visit(self, site: Site, z: Any) -> Tensor | None:
        """Decide at ``site`` from its pre-activation ``z``: the sign (a 0-d tensor, -1 to flip) that ``z`` must be
        multiplied by in flight, or None when the site cannot be flipped.

        The decision stays on the device: no host synchronization during the pass, one at its end (:meth:`finish`).
        """
        n = self._num_samples
        if isinstance(z, Tensor) and z.dim() > 1 and z.shape[0] != n and n and z.shape[0] % n == 0:
            # batch and tokens merged into rows (a decoder MLP on (batch * tokens, features)): rows go back to their
            # samples, batch-major as `reshape(-1, features)` lays them
            z = z.reshape(n, -1)
        if not isinstance(z, Tensor) or z.dim() == 0 or z.shape[0] != n:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            self.error = ValueError(
                f"`sign_flip_` expects every site to see the samples along dimension 0; site {site.name!r} got a"
                f" pre-activation of shape {shape} for {n} samples"
            )
            return None
        # a sample survives when some entry is > 0, and survives the flip when some entry is < 0 (float reductions;
        # a NaN entry keeps a sample alive, as its output is not zero; two plain reductions beat one `aminmax`
        # several times over on CPU)
        if z.device.type == "cpu" and _HOST_DECISIONS:
            return self._decide_on_host(site, z.detach())
        flat = z.detach().reshape(n, -1)
        survives = flat.amax(dim=1).le(0).logical_not_()  # NaN propagates into amax/amin: not <= 0, survives
        survives_flipped = flat.amin(dim=1).ge(0).logical_not_()
        if self._alive is None:
            self._alive = torch.ones(n, dtype=torch.bool, device=z.device)
        alive = self._alive
        living = alive.sum()
        killed = (alive & ~survives).sum()
        killed_flipped = (alive & ~survives_flipped).sum()

        target, target_name, reason = self._claim(site)
        flip = torch.zeros((), dtype=torch.bool, device=z.device)
        if target is not None:
            # flip when more than half of the living samples would be killed and flipping kills fewer
            flip = (2 * killed > living) & (killed_flipped < killed)
            target.negate_where_(flip)
            self.applied.append((target, flip))
            survives = torch.where(flip, survives_flipped, survives)

        self._alive = alive & survives
        # stacked and read once, at the end of the pass
        counts = [living, killed, killed_flipped, self._alive.sum(), survives.sum(), flip.to(living.dtype)]
        self._pending.append((site.name, target_name, reason, counts))
        if reason is not None:
            return None
        return 1 - 2 * flip.to(z.dtype)

    def _claim(self, site: Site) -> tuple[_FlipTarget | None, str | None, str | None]:
        """The parameters ``site`` decides whether to negate, claimed for it, with their name; or None and the reason
        why the site cannot flip (no affine map found, or one that an earlier site already decided)."""
        target = _flip_target(site)
        if isinstance(target, str):
            return None, None, target
        if self.skip_frozen and any(not tensor.requires_grad for tensor in target.tensors):
            self._frozen.add(target.name)
            return None, target.name, f"{target.name!r} is frozen (its parameters do not require grad): left as it is"
        if target.name in self._decided:
            return None, target.name, f"{target.name!r} was already decided for site {self._decided[target.name]!r}"
        self._decided[target.name] = site.name
        return target, target.name, None

    def _host_buffers(self, dtype: torch.dtype) -> tuple[Tensor, ...]:
        """The CPU decisions' per-sample buffers for pre-activations of ``dtype``: the extreme value of each
        sample, its killed, killed-when-flipped, scratch and living masks (allocated once per pass and dtype)."""
        buffers = self._buffers.get(dtype)
        if buffers is None:
            n = self._num_samples
            buffers = self._buffers[dtype] = (torch.empty(n, dtype=dtype), *torch.empty(4, n, dtype=torch.bool))
        return buffers

    def _killed_on_host(self, z: Tensor, flipped: bool, dead: Tensor) -> tuple[int, int]:
        """Mark in ``dead`` the samples the site kills (``flipped``: would kill were it negated) and count them:
        (all of them, the living ones among them): a reduction per sample and a comparison, into the pass's buffers."""
        alive = self._alive
        peak, _, _, scratch, _ = self._host_buffers(z.dtype)
        flat = z.reshape(z.shape[0], -1)
        # NaN propagates into amax and amin and is neither <= 0 nor >= 0: the sample survives
        if flipped:
            torch.ge(torch.amin(flat, dim=1, out=peak), 0, out=dead)
        else:
            torch.le(torch.amax(flat, dim=1, out=peak), 0, out=dead)
        site_killed = int(dead.sum())
        return site_killed, site_killed if alive is None else int(torch.logical_and(alive, dead, out=scratch).sum())

    def _decide_on_host(self, site: Site, z: Tensor) -> Tensor | None:
        """:meth:`_visit` for CPU tensors, where reading a count costs nothing: the same decision, with the small
        arithmetic in Python and only the reductions it needs. The flipped survival (a second pass over ``z``) is
        measured only when more than half of the living samples would be killed, the living mask is kept only
        once a sample has been killed, and nothing is multiplied or negated at a site that does not flip. Every
        per-sample result is written into buffers allocated once per pass: the pass allocates nothing per site
        beyond what the model does, so it leaves the memory allocator in the state a plain forward pass would.
        """
        n = self._num_samples
        _, dead, dead_flipped, _, alive_buffer = self._host_buffers(z.dtype)
        alive = self._alive  # None while every sample is alive
        living = self._living
        site_killed, killed = self._killed_on_host(z, False, dead)
        killed_flipped = killed  # measured only when the site kills the majority (a flip is considered then)
        target, target_name, reason = self._claim(site)
        flip = False
        if target is not None and 2 * killed > living:
            site_killed_flipped, killed_flipped = self._killed_on_host(z, True, dead_flipped)
            flip = killed_flipped < killed
            if flip:
                target.negate_()
                self.applied.append((target, True))
                dead, site_killed = dead_flipped, site_killed_flipped
        kept = living - (killed_flipped if flip else killed)
        if kept < living:  # someone was killed here: the living mask loses them
            if alive is None:
                alive = torch.logical_not(dead, out=alive_buffer)
            else:
                alive.logical_and_(dead.logical_not_())
        self._alive = alive
        self._living = kept
        counts = [living, killed, killed_flipped, kept, n - site_killed, int(flip)]
        self._pending.append((site.name, target_name, reason, counts))
        if not flip:
            return None
        return torch.tensor(-1, dtype=z.dtype)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def _batch_input(batch: Any, input_fn: Callable[[Any], Tensor] | None) -> Tensor:
    if input_fn is not None:
        inputs = input_fn(batch)
        if not isinstance(inputs, Tensor):
            raise ValueError(f"`input_fn` must return a tensor, got {type(inputs).__name__}")
        return inputs
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("`data` holds an empty batch; expected a tensor or a tuple/list starting with one")
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise ValueError(
            f"`data` batches must be tensors or tuples/lists whose first element is the input tensor, got"
            f" {type(batch).__name__}; pass `input_fn` to extract the input from such batches"
        )
    return batch


def _generators_of(data: Any) -> list[torch.Generator]:
    """The generators of a DataLoader and of its sampler (and batch sampler's sampler), each once."""
    found: dict[int, torch.Generator] = {}
    batch_sampler = getattr(data, "batch_sampler", None)
    for holder in (data, getattr(data, "sampler", None), getattr(batch_sampler, "sampler", None)):
        generator = getattr(holder, "generator", None)
        if isinstance(generator, torch.Generator):
            found.setdefault(id(generator), generator)
    return list(found.values())


def _to_device(inputs: Tensor | dict[str, Tensor], device: torch.device) -> Tensor | dict[str, Tensor]:
    if isinstance(inputs, dict):
        return {key: value.to(device) for key, value in inputs.items()}
    return inputs.to(device)


def _first_samples(inputs: Any, size: int | None, count: bool = False) -> Any:
    """The first ``size`` samples of a tensor or a dict of tensors (keyword arguments); with ``count``, how many
    samples there are (the first dimension of the first tensor)."""
    if isinstance(inputs, dict):
        if count:
            return next(iter(inputs.values())).shape[0]
        return {key: value[:size] for key, value in inputs.items()}
    return inputs.shape[0] if count else inputs[:size]


def _shape_of(inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return {key: tuple(value.shape) for key, value in inputs.items()}
    return tuple(inputs.shape)


def _collect_keyword_inputs(batches: Iterable[Any], max_samples: int | None) -> dict[str, Tensor]:
    """Dict batches (keyword arguments of the model, a Hugging Face batch): every tensor concatenated along its
    first dimension, up to ``max_samples`` samples."""
    parts: dict[str, list[Tensor]] = {}
    count = 0
    for batch in batches:
        if not isinstance(batch, Mapping) or not all(isinstance(v, Tensor) and v.dim() for v in batch.values()):
            raise ValueError("`data` mixes dict batches with other batches, or a dict batch holds a non-tensor value")
        size = next(iter(batch.values())).shape[0]
        take = size if max_samples is None else min(size, max_samples - count)
        for key, value in batch.items():
            parts.setdefault(key, []).append(value[:take])
        count += take
        if max_samples is not None and count >= max_samples:
            break
    if count == 0:
        raise ValueError("`data` holds no samples: expected a tensor of shape (num_samples, ...) with num_samples >= 1")
    for key, values in parts.items():
        shapes = {tuple(value.shape[1:]) for value in values}
        if len(shapes) > 1:
            raise ValueError(
                f"`data` batches must share the shape of a sample: key {key!r} has samples of shapes "
                f"{sorted(shapes)} (pad the batches to one length, or pass `max_samples` that one batch holds)"
            )
    return {key: torch.cat(values) for key, values in parts.items()}


def _collect_inputs(
    data: Any, input_fn: Callable[[Any], Tensor] | None, max_samples: int | None
) -> Tensor | dict[str, Tensor]:
    if isinstance(data, Tensor):
        batches: Iterable[Any] = [data]
    elif isinstance(data, (str, bytes, dict)) or not isinstance(data, Iterable):
        raise ValueError(f"`data` must be a tensor, a list/tuple of batches or a DataLoader, got {type(data).__name__}")
    else:
        batches = data
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise ValueError("`data` holds no samples: expected a tensor of shape (num_samples, ...) with num_samples >= 1")
    batches = itertools.chain([first], iterator)
    if input_fn is None and isinstance(first, Mapping):
        return _collect_keyword_inputs(batches, max_samples)
    parts: list[Tensor] = []
    count = 0
    for batch in batches:
        inputs = _batch_input(batch, input_fn)
        if inputs.dim() == 0:
            raise ValueError("`data` must hold samples along a first dimension, got a 0-dimensional tensor")
        if parts and inputs.shape[1:] != parts[0].shape[1:]:
            sample = ", ".join(map(str, parts[0].shape[1:]))
            raise ValueError(
                f"`data` batches must share the shape of a sample: expected (*, {sample}), got {tuple(inputs.shape)}"
            )
        if max_samples is not None:
            inputs = inputs[: max_samples - count]
        if inputs.shape[0] > 0:
            parts.append(inputs)
            count += inputs.shape[0]
        if max_samples is not None and count >= max_samples:
            break
    if count == 0:
        raise ValueError("`data` holds no samples: expected a tensor of shape (num_samples, ...) with num_samples >= 1")
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _expected_input(model: nn.Module) -> str:
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return f"expected samples of shape (..., {module.in_features})"
        if isinstance(module, CONV_TYPES):
            spatial = ", ".join(["*"] * (module.weight.dim() - 2))
            return f"expected samples of shape (num_samples, {module.in_channels}, {spatial})"
    return "expected inputs the model accepts, samples along dimension 0"
