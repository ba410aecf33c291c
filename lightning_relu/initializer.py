"""ReluInitializer: keep a rectifier network alive from its first training step.

Applies randomized asymmetric initialization (:func:`lightning_relu.init.rai_`), data-dependent sign flipping
(:func:`lightning_relu.init.sign_flip_`), or both, once, before the first training step of a fresh fit.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_relu._lifecycle import restored_outside_fit
from lightning_relu._sharded import write_through
from lightning_relu.init import (
    SignFlipReport,
    _batch_input,
    _flip_target,
    _generators_of,
    _trainable,
    rai_,
    sign_flip_,
)
from lightning_relu.sites import find_relu_sites
from lightning_relu.structure import ObservationError

__all__ = ["ReluInitializer"]

_METHODS = ("rai", "sign_flip", "rai+sign_flip")


class ReluInitializer(Callback):
    r"""Initialize the layers that feed rectifiers so that the network, and the data through it, stay alive.

    ``method`` selects what runs, once, before the first training step of a fresh fit:

    - ``"rai"``: randomized asymmetric initialization (Lu et al. 2020) of every Linear/ConvNd feeding a rectifier
      site, :func:`~lightning_relu.init.rai_`; other layers keep their initialization.
    - ``"sign_flip"``: sign flipping (Rister and Rubin), :func:`~lightning_relu.init.sign_flip_`, on up to
      ``max_samples`` samples of the training dataloader, so at least half of the living samples survive every site.
    - ``"rai+sign_flip"``: RAI, then sign flipping. A layer that sign flipping negates has its RAI rows negated,
      the positive Beta(2, 1) entry included: it keeps more data alive but loses RAI's asymmetry.

    Layers that do not train (RAI: the weight does not require grad; sign flipping: a parameter of the negated map
    does not) are left as they are by both (a frozen teacher for distillation, a frozen backbone), and a warning
    names them: a pretrained layer that cannot train would be replaced for good.

    It runs in ``on_train_start``: by then the model is on its device (and wrapped for distributed training), a
    checkpoint being resumed has been restored, and the training dataloader exists (it does not in
    ``on_fit_start``). It never runs when the fit resumes from a checkpoint (``trainer.ckpt_path`` is set): its
    ``state_dict`` records that it ran, and a fit resumed from a checkpoint saved without it is left alone as well.
    A checkpoint saved before it ran says so: the one that Lightning's learning-rate and batch-size finders save and
    restore at the start of a fit leaves it to run. It runs once per model: a second ``fit`` of the model it
    initialized (a second training stage) keeps the trained weights, while a fit of another model with the same
    callback (on a new Trainer or on the same one) initializes that model.

    Under distributed training every rank ends with the same weights: RAI draws from a generator seeded
    identically on every rank (``seed``, or a seed drawn on rank 0 and broadcast), and the sign-flip decisions of
    rank 0, made on its shard of the data, are broadcast and applied on every rank.

    What it did is logged once to every logger in ``trainer.loggers`` (rank zero), under ``{log_prefix}/``: per site
    ``{site}/flipped`` (0 or 1), ``{site}/living_before`` and ``{site}/living_after`` (living-data fractions), and
    ``rai_layers``, ``flipped_sites``, ``living_data`` (the fraction alive after the last site). The same values are
    kept in :attr:`metrics`, the per-site reports in :attr:`report`.

    Args:
        method: ``"rai"``, ``"sign_flip"`` or ``"rai+sign_flip"``.
        seed: seed of the RAI generator, in [0, 2**64); ``None`` draws one from the global generator (so
            ``seed_everything`` makes it reproducible) on rank 0 and broadcasts it.
        max_samples: training samples the sign flip looks at, taken from the first batches.
        input_fn: maps a training batch to the model's input; by default a batch that is a tuple or a list gives
            its first element and a tensor batch is the input itself.
        log_prefix: prefix of the logged keys (not empty).

    Raises:
        ValueError: if an argument is invalid.

    Example::

        from lightning.pytorch import Trainer
        from lightning_relu.initializer import ReluInitializer

        trainer = Trainer(callbacks=[ReluInitializer("rai+sign_flip", seed=0)])

    Attributes:
        applied: whether the method has been applied (restored from a checkpoint on resume).
        report: the per-site :class:`~lightning_relu.init.SignFlipReport` of the sign flip, keyed by site name, in
            forward order (rank 0's decisions on every rank); empty before the run or without sign flipping.
        rai_layers: qualified names of the layers RAI initialized.
        seed_used: the RAI seed actually used.
        metrics: the values logged, keyed with ``/`` as separator.
    """

    def __init__(
        self,
        method: Literal["rai", "sign_flip", "rai+sign_flip"] = "rai",
        *,
        seed: int | None = None,
        max_samples: int = 1024,
        input_fn: Callable[[Any], Tensor] | None = None,
        log_prefix: str = "relu_init",
    ) -> None:
        if method not in _METHODS:
            raise ValueError(f"`method` can be {', '.join(map(repr, _METHODS))}, got {method!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
            raise ValueError(f"`seed` must be an integer in [0, 2**64) or None, got {seed!r}")
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ValueError(f"`max_samples` must be a positive integer, got {max_samples!r}")
        if input_fn is not None and not callable(input_fn):
            raise ValueError(f"`input_fn` must be a callable or None, got {input_fn!r}")
        if not isinstance(log_prefix, str) or not log_prefix:
            raise ValueError(f"`log_prefix` must be a non-empty string, got {log_prefix!r}")
        self.method = method
        self.seed = seed
        self.max_samples = max_samples
        self.input_fn = input_fn
        self.log_prefix = log_prefix

        self.applied = False
        self.report: dict[str, SignFlipReport] = {}
        self.rai_layers: list[str] = []
        self.seed_used: int | None = None
        self.metrics: dict[str, float] = {}
        self._applied_to: weakref.ref[nn.Module] | None = None  # the model it initialized, in this process
        # the fit it is set up for (a state loaded outside `fit`, by `validate`/`test` with `ckpt_path`, is ignored),
        # whether that fit's decision is still to come, and the checkpoint whose restored state was saved before it
        # came in a fresh fit (by Lightning's learning-rate and batch-size finders, restored before `on_train_start`)
        self._trainer: weakref.ref[pl.Trainer] | None = None
        self._stage: str | None = None
        self._undecided = False
        self._restored_before_start: Any = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, log_prefix=self.log_prefix)

    @property
    def uses_rai(self) -> bool:
        return self.method in ("rai", "rai+sign_flip")

    @property
    def uses_sign_flip(self) -> bool:
        return self.method in ("sign_flip", "rai+sign_flip")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Once per instance and model: a new fit of the model it initialized (a second training stage) keeps the
        # trained weights, a new fit of another model gets initialized, on a new Trainer or on the same one (a
        # resumed fit gets `applied` back from its checkpoint after this)
        # (a model no longer alive is another model; a copy knows the model its original initialized; an unpickled
        # initializer does not know it, and keeps the weights)
        self._stage = stage
        try:
            self._trainer = weakref.ref(trainer)
        except TypeError:  # a stand-in without weak references (a test double): no checkpoint path is read
            self._trainer = None
        if stage == "fit":
            self._undecided, self._restored_before_start = True, None
        if stage == "fit" and self._applied_to is not None and self._applied_to() is not pl_module:
            self.applied = False
            self.report, self.rai_layers, self.seed_used, self.metrics = {}, [], None, {}
        if stage != "fit" or self.applied:
            return
        # what the initializers cannot write into (Lightning's DeepSpeedStrategy) is refused before the fit starts;
        # whether they find anything to act on is known only on the first batch's forward (functional calls,
        # rectifiers outside an `nn.Sequential`): `on_train_start` says so when they do not
        write_through(pl_module, "ReluInitializer", "pl_module", trainer=trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            self._decide(trainer, pl_module)
        finally:
            self._undecided = False

    def _decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.applied:  # to this model before, or as the checkpoint this fit resumes says: its weights are done
            self._applied_to = weakref.ref(pl_module)
            return
        if self._applied_to is not None and self._applied_to() is pl_module:
            return  # a model whose checkpoint weights an earlier fit kept: kept again
        if trainer.ckpt_path is not None and trainer.ckpt_path != self._restored_before_start:
            # a resumed fit keeps the checkpoint's weights; not one restored from a checkpoint saved in this fresh fit
            # before this hook (Lightning's learning-rate and batch-size finders save one at the fit's start, run
            # trial steps and restore it, which leaves `trainer.ckpt_path` set)
            rank_zero_info(
                f"`ReluInitializer` skipped: the fit resumes from the checkpoint {trainer.ckpt_path!r}, whose weights"
                " are kept."
            )
            self._applied_to = weakref.ref(pl_module)
            return
        if self.uses_rai:
            self._apply_rai(trainer, pl_module)
            if not self.rai_layers:
                rank_zero_warn(
                    f"`ReluInitializer({self.method!r})` initialized no layer with RAI: no rectifier site of "
                    f"{type(pl_module).__name__} has a trainable Linear/ConvNd computing its input on the forward of "
                    "the first training batch.",
                    category=RuntimeWarning,
                )
        if self.uses_sign_flip:
            self._apply_sign_flip(trainer, pl_module)
            if not self.report:
                rank_zero_warn(
                    f"`ReluInitializer({self.method!r})` flipped no sign: it found no rectifier site it can flip in "
                    f"{type(pl_module).__name__} on the training data.",
                    category=RuntimeWarning,
                )
        self.applied = True
        self._applied_to = weakref.ref(pl_module)
        self._log(trainer)

    def _apply_rai(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seed = self.seed
        if seed is None:
            # every rank draws (their global generators stay in step), rank 0's value is used
            seed = int(torch.randint(0, 2**62, (1,)).item())
        seed = int(trainer.strategy.broadcast(seed, src=0))
        self.seed_used = seed
        generator = torch.Generator(device="cpu").manual_seed(seed)
        example = self._example_input(trainer)
        engine = write_through(pl_module, "ReluInitializer", "pl_module", trainer=trainer)
        if engine is not None:  # FSDP2 (sharded in `configure_model`): the layers are found on the unsharded model
            self.rai_layers = engine.run(lambda model, _: self._rai(model, generator, example), share_result=True)
        else:
            self.rai_layers = self._rai(pl_module, generator, example)

    @staticmethod
    def _rai(pl_module: nn.Module, generator: torch.Generator, example: Any) -> list[str]:
        """RAI on the producers of ``pl_module``'s sites, found on ``example``; their names."""
        try:
            sites = find_relu_sites(pl_module, example_input=example)
        except ObservationError as error:
            rank_zero_warn(
                f"`ReluInitializer` could not observe the model on the first training batch ({error}); RAI falls back "
                "to the producers `nn.Sequential` order shows. Pass `input_fn=` to take the model's input out of a "
                "batch.",
                category=RuntimeWarning,
            )
            example, sites = None, find_relu_sites(pl_module)
        names: list[str] = []
        frozen: list[str] = []  # left as they are (a distillation teacher, a frozen backbone)
        for site in sites:
            if site.producer_name is None or site.producer_name in names or site.producer_name in frozen:
                continue
            (names if _trainable(site.producer) else frozen).append(site.producer_name)
        if frozen:
            rank_zero_warn(
                f"`ReluInitializer` left {len(frozen)} frozen layer(s) as they were (their weight does not require "
                f"grad): {frozen}.",
                category=RuntimeWarning,
            )
        if names:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="`rai_` left .* frozen layer")  # said above, on rank zero
                rai_(pl_module, generator=generator, example_input=example, skip_frozen=True)
        return names

    def _example_input(self, trainer: pl.Trainer) -> Any:
        """A few samples of the first training batch, to observe the model's structure on (None without a
        loader or when the batch holds no input the model takes; then only `nn.Sequential` order links).
        Drawing it changes no random state: the global generator and the loader's own are restored."""
        data = _first_loader(trainer.train_dataloader)
        if data is None:
            return None
        saved = [(generator, generator.get_state()) for generator in _generators_of(data)]
        try:
            with torch.random.fork_rng(devices=[]):
                batch = next(iter(data))
            return _batch_input(trainer.precision_plugin.convert_input(batch), self.input_fn)[:8]
        except (StopIteration, ValueError, TypeError):
            return None
        finally:
            for generator, state in saved:
                generator.set_state(state)

    def _apply_sign_flip(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        data = _first_loader(trainer.train_dataloader)
        if data is None:
            rank_zero_warn(
                "`ReluInitializer` cannot flip signs: the trainer has no training dataloader.",
                category=RuntimeWarning,
            )
            return
        precision, input_fn = trainer.precision_plugin, self.input_fn

        def inputs_of(batch: Any) -> Tensor:
            # as a training step gets it: `precision="bf16-true"`/`"64-true"` cast the batch to the weights' dtype
            return _batch_input(precision.convert_input(batch), input_fn)

        local = sign_flip_(pl_module, data, max_samples=self.max_samples, input_fn=inputs_of, skip_frozen=True)
        frozen = sorted({str(r.target) for r in local.values() if r.target and r.frozen})
        if frozen:
            rank_zero_warn(
                f"`ReluInitializer` left {len(frozen)} frozen layer(s) unflipped (their parameters do not require "
                f"grad): {frozen}.",
                category=RuntimeWarning,
            )
        chosen: dict[str, SignFlipReport] = trainer.strategy.broadcast(local, src=0)
        # ranks saw different shards: every rank takes rank 0's decisions (negation is an involution)
        differ = [name for name, r in chosen.items() if (name in local and local[name].flipped) != r.flipped]
        if differ:
            example = self._example_input(trainer)
            sites = {site.name: site for site in find_relu_sites(pl_module, example_input=example)}
            for name in differ:
                target = _flip_target(sites[name]) if name in sites else "unknown site"
                if not isinstance(target, str):
                    target.negate_()
                    target.negate_running_means_()
        self.report = chosen

    def _log(self, trainer: pl.Trainer) -> None:
        metrics: dict[str, float] = {}
        if self.uses_rai:
            metrics["rai_layers"] = float(len(self.rai_layers))
        if self.report:
            metrics["flipped_sites"] = float(sum(r.flipped for r in self.report.values()))
            metrics["living_data"] = list(self.report.values())[-1].living_after
            for name, r in self.report.items():
                metrics[f"{name}/flipped"] = float(r.flipped)
                metrics[f"{name}/living_before"] = r.living_before
                metrics[f"{name}/living_after"] = r.living_after
        self.metrics = {f"{self.log_prefix}/{key}": value for key, value in metrics.items()}
        trainer.callback_metrics.update({key: torch.tensor(value) for key, value in self.metrics.items()})

        summary = [f"`ReluInitializer({self.method!r})`"]
        if self.uses_rai:
            summary.append(f"RAI on {len(self.rai_layers)} layer(s) (seed {self.seed_used})")
        if self.report:
            summary.append(
                f"flipped {int(metrics['flipped_sites'])} of {len(self.report)} site(s),"
                f" living data after the last site {metrics['living_data']:.3f}"
            )
        rank_zero_info(": ".join([summary[0], "; ".join(summary[1:]) or "nothing to do"]))

        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            separator = logger.group_separator
            logger.log_metrics(
                {separator.join([self.log_prefix, *key.split("/")]): value for key, value in metrics.items()},
                step=trainer.global_step,
            )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_applied_to"] = state["_trainer"] = None  # a weak reference does not pickle
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> ReluInitializer:
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for key, value in self.__dict__.items():  # weak references (the model, the Trainer) are shared, not copied
            clone.__dict__[key] = value if key in ("_applied_to", "_trainer") else copy.deepcopy(value, memo)
        return clone

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "applied": self.applied,
            "method": self.method,
            "seed_used": self.seed_used,
            "rai_layers": list(self.rai_layers),
            "flipped_sites": [name for name, r in self.report.items() if r.flipped],
            "before_start": self._undecided and self._fit_checkpoint() is None,
        }

    def _fit_checkpoint(self) -> Any:
        """The checkpoint the fit it is set up for resumes from (``None``: a fresh fit, or no Trainer known)."""
        trainer = self._trainer() if self._trainer is not None else None
        return trainer.ckpt_path if trainer is not None else None

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if restored_outside_fit(self):
            return  # `validate`/`test`/`predict` restoring a checkpoint: nothing of a fit to take from it
        self._restored_before_start = self._fit_checkpoint() if state_dict.get("before_start") else None
        self.applied = bool(state_dict.get("applied", False))
        self.seed_used = state_dict.get("seed_used", self.seed_used)
        self.rai_layers = list(state_dict.get("rai_layers", self.rai_layers))


def _first_loader(loaders: Any) -> Iterable[Any] | None:
    """The training dataloader, or the first of several (Lightning's CombinedLoader iterables)."""
    if loaders is None:
        return None
    if isinstance(loaders, Mapping):
        return _first_loader(next(iter(loaders.values()), None))
    if isinstance(loaders, (list, tuple)) and loaders and isinstance(loaders[0], torch.utils.data.DataLoader):
        return loaders[0]
    return cast("Iterable[Any] | None", loaders)
