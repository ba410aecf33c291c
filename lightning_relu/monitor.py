"""``DeadUnitMonitor``: per-epoch dead-unit reports for a Lightning ``Trainer``, streamed to every logger."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_relu._compat import lightning_batches_run_in_epoch, lightning_batches_that_stepped
from lightning_relu._lifecycle import continued_history, restored_outside_fit, starts_afresh
from lightning_relu.dashboards import (
    HEATMAP_TAG,
    SUMMARY_TAG,
    activation_rate_tag,
    custom_scalars_layout,
    dead_fraction_heatmap,
    log_epoch_scalars,
    margin_tag,
    print_summary,
    summary_markdown,
)
from lightning_relu.functional import NO_STEP
from lightning_relu.report import EpochReport
from lightning_relu.revive import DeadUnitReviver
from lightning_relu.site import module_names, unknown_names
from lightning_relu.stats import LayerReport, _check_eps
from lightning_relu.structure import AxisWatch
from lightning_relu.theory import alive_probability_lower_bound
from lightning_relu.tracker import DeadUnitTracker, check_unit_dims

__all__ = ["CollapseError", "CollapseWarning", "DeadUnitMonitor", "DyingWarning", "EpochReport"]

_ON_COLLAPSE = ("warn", "raise", "stop")


class CollapseWarning(RuntimeWarning):
    """Every unit of a site is dead: the network after it computes a constant."""


class DyingWarning(RuntimeWarning):
    """A site's units are drifting into the dead cone while few are dead yet."""


# "still low": at most this share of the site's units is dead
_LOW_DEAD = 0.1


class CollapseError(RuntimeError):
    """Raised by ``DeadUnitMonitor(on_collapse="raise")`` when a site collapses."""


ReportListener = Callable[["pl.Trainer", "pl.LightningModule", EpochReport], None]


class DeadUnitMonitor(Callback):
    r"""Count dead units at every ReLU site on every training batch, and report once per epoch.

    A *unit* is one output feature of a site (the channel for convolutions). It is *dead* for an epoch when
    its output was 0 for every sample and position the site saw in that epoch's training batches. A sample
    is *killed* at a site when the site's whole output for it is 0; the *living-data fraction* is the share of
    samples not killed. Validation, test and predict forwards are never counted.

    At each training epoch end the counts are summed across processes, so every rank holds the same
    :attr:`last_report`, and these scalars go to every logger in ``trainer.loggers`` and into
    ``trainer.callback_metrics`` (so ``EarlyStopping``/``ModelCheckpoint`` can watch them):

    - ``dead_units/<site>``: dead fraction of the site's units, in [0, 1];
    - ``dead_units/total``: dead units over all units of all sites;
    - ``living_data/<site>``: living-data fraction at the site;
    - ``dying_units/<site>``: share of the site's units active on fewer than ``eps`` of their entries;
    - ``nonfinite/total``: sites that produced NaN or Inf in the epoch, and ``nonfinite/<site>`` (the site's
      non-finite batches) for each of them;
    - ``partial_epoch``: 1 when the epoch's counts are partial (a resumed fit that could not restore them), else 0.

    They are logged at the step and with the ``epoch`` value of Lightning's own epoch-level metrics (the epoch's
    last step; epochs numbered from 0, as in checkpoint names), so a CSV row lines up with the epoch's losses.

    TensorBoard loggers also get a histogram ``per_unit/activation_rate/<site>`` of the per-unit share of active
    entries (grouped under ``per_unit/``, after the overview) and, with ``dashboards=True``, a Custom Scalars
    layout (one chart per metric with every site), a sites × epochs heatmap image of the dead share
    (``dead_units/heatmap``, beside the ``dead_units/<site>`` charts, updated every epoch) and, at the end of
    training, a markdown summary table (``lightning_relu/summary``). The same table is printed
    on rank zero (a ``rich`` table when ``rich`` is installed) unless ``print_summary=False``.

    Args:
        sites: names of the sites to watch (default: all). Unknown names raise ``ValueError``: at setup, or, for
            names only a forward can confirm (later call positions, functional calls), at the end of the first
            training forward.
        on_collapse: what to do when every unit of a site is dead: ``"warn"`` (once per site, on rank zero),
            ``"raise"`` (:class:`CollapseError`) or ``"stop"`` (warn and stop training gracefully).
        log_histograms: write the per-unit activation-rate histograms to TensorBoard loggers.
        revive: ``True`` to revive dead units after each report with a default
            :class:`~lightning_relu.DeadUnitReviver`, or a configured ``DeadUnitReviver`` to use; its state is
            saved with the monitor's.
        trace: find functional rectifier calls (``F.relu``, ``torch.relu``, ``x.relu()``) on the first forward
            (see :class:`~lightning_relu.DeadUnitTracker`); ``False`` counts ``nn.ReLU``/``nn.ReLU6`` modules only.
        eps: activity threshold of a *dying* unit (Arnekvist et al.), in [0, 1].
        track_margin: also measure each unit's pre-activation mean and standard deviation over the epoch (two
            more float reductions per site and step): the death margin ``m = mean / std`` predicts the activity
            rate ``Φ(m)``, units with ``m < Φ⁻¹(eps)`` are *at risk* (inside Arnekvist et al.'s dead cone), logged
            as ``at_risk/<site>`` with a ``per_unit/margin/<site>`` histogram; a site whose at-risk share rises
            while few of its units are dead gets one early warning.
        dashboards: write the Custom Scalars layout, the heatmap image and the summary text to TensorBoard.
        print_summary: print the per-site summary table at the end of training (rank zero).
        unit_dims: the unit axis of sites that no known layer fixes, by site name: ``-1`` (last dimension, for
            ``(batch, time, features)`` sequences) or ``1`` (channels); see
            :class:`~lightning_relu.tracker.DeadUnitTracker`. Unknown names raise ``ValueError`` as for ``sites``.

    A unit is active on an entry when the entry is ``> 0``: NaN entries are not active, +Inf entries are. The
    first epoch in which a site produces NaN or Inf gets one warning naming the site and the epoch.

    Example::

        from lightning import Trainer
        from lightning.pytorch.callbacks import EarlyStopping
        from lightning_relu import DeadUnitMonitor

        monitor = DeadUnitMonitor()
        trainer = Trainer(callbacks=[monitor, EarlyStopping("dead_units/total", mode="min", patience=3)])
        trainer.fit(model)
        monitor.last_report["encoder.3"].dead_fraction

    An ``EarlyStopping`` or ``ModelCheckpoint`` that watches its metrics sees the epoch's values wherever it stands
    in the ``callbacks`` list: Lightning runs those monitoring callbacks' epoch-end hooks after the others'.
    """

    def __init__(
        self,
        sites: Sequence[str] | None = None,
        on_collapse: Literal["warn", "raise", "stop"] = "warn",
        log_histograms: bool = True,
        revive: bool | DeadUnitReviver = False,
        trace: bool = True,
        eps: float = 0.01,
        track_margin: bool = False,
        dashboards: bool = True,
        print_summary: bool = True,
        unit_dims: Mapping[str, int] | None = None,
    ) -> None:
        if sites is not None:
            if isinstance(sites, str) or not all(isinstance(name, str) for name in sites):
                raise ValueError(f"`sites` must be a sequence of site names or None, got {sites!r}")
            sites = list(sites)
        if on_collapse not in _ON_COLLAPSE:
            raise ValueError(f"`on_collapse` can be {', '.join(map(repr, _ON_COLLAPSE))}, got {on_collapse!r}")
        if not isinstance(log_histograms, bool):
            raise ValueError(f"`log_histograms` must be a bool, got {log_histograms!r}")
        if revive is True:
            reviver: DeadUnitReviver | None = DeadUnitReviver()
        elif revive is False:
            reviver = None
        elif isinstance(revive, DeadUnitReviver):
            reviver = revive
        else:
            raise ValueError(f"`revive` must be a bool or a `DeadUnitReviver`, got {revive!r}")
        if not isinstance(trace, bool):
            raise ValueError(f"`trace` must be a bool, got {trace!r}")
        _check_eps(eps)
        for name, value in (
            ("dashboards", dashboards),
            ("print_summary", print_summary),
            ("track_margin", track_margin),
        ):
            if not isinstance(value, bool):
                raise ValueError(f"`{name}` must be a bool, got {value!r}")
        check_unit_dims(unit_dims)
        self.unit_dims = dict(unit_dims) if unit_dims is not None else None
        self.dashboards = dashboards
        self.print_summary = print_summary
        self.track_margin = track_margin
        self.reviver = reviver
        self.trace = trace
        self.eps = float(eps)
        self._sites = sites
        self.on_collapse = on_collapse
        self.log_histograms = log_histograms
        self.tracker: DeadUnitTracker | None = None
        self.history: list[EpochReport] = []
        # whether the fit's training has begun: a checkpoint loaded then is restored within the fit (as Lightning's
        # learning-rate and batch-size finders do at a later epoch's start), not resumed
        self._training_began = False
        self._stage: str | None = None  # the stage set up last: a state loaded outside `fit` is not this fit's
        #: Rister & Rubin's lower bound on the probability that an input stays alive through every site, stated at
        #: fit start for the model watched (``None`` when a site's width is unknown before the first forward).
        self.alive_lower_bound: float | None = None
        self._collapse_warned: set[str] = set()
        self._nonfinite_warned: set[str] = set()
        self._at_risk_warned: set[str] = set()
        self._listeners: list[ReportListener] = []
        # the revivers of the Trainer's callbacks that follow this monitor, found at fit start (see `_revivers`)
        self._followers: list[DeadUnitReviver] = []
        self._axis_watch: AxisWatch | None = None  # the first step's recording, while it runs
        self._watch_axes = False  # whether the next training step is the fit's first (its forward is watched)
        # the counts of an epoch a checkpoint interrupted, waiting for that epoch to resume (one process only)
        self._window: dict[str, Any] | None = None
        # its sites not added to the counts yet (see `_merge_window`): their states, and where each sits
        self._unmerged: dict[str, tuple[dict[str, Any], Any]] = {}
        # the counts of the epoch in progress when the fit was interrupted by an exception, kept after its hooks are
        # removed for a checkpoint saved then (`OnExceptionCheckpoint` runs after this callback)
        self._window_at_exception: dict[str, Any] | None = None
        self._resumed_epoch: int | None = None
        self._world_size = 1
        self._epoch = 0
        # the epoch in progress: training batches counted, whether its last batch has run, why its counts are only
        # part of it (None: they are whole), the global step of the batch running and the first step at which a
        # site produced NaN/Inf (a device tensor, `NO_STEP` while none did: no host sync per step)
        self._batches = 0
        self._epoch_done = False
        self._partial: str | None = None
        self._step = 0
        self._nonfinite_first: torch.Tensor | None = None
        # what a resumed checkpoint says of the epoch it interrupted (see `on_train_start`)
        self._restored_progress: dict[str, Any] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(sites=self._sites)

    @property
    def last_report(self) -> dict[str, LayerReport] | None:
        """The latest epoch's per-site reports, keyed by site name (``None`` before the first epoch end)."""
        return self.history[-1].layers if self.history else None

    def add_report_listener(self, listener: ReportListener) -> None:
        """Call ``listener(trainer, pl_module, epoch_report)`` on every rank after each epoch's report is logged.

        The report is already reduced across processes, so every rank gets the same one. Listeners run in the
        order they were added (idempotent: adding the same listener twice has no effect).
        """
        if not callable(listener):
            raise ValueError(f"`listener` must be callable, got {listener!r}")
        if listener not in self._listeners:
            self._listeners.append(listener)

    def remove_report_listener(self, listener: ReportListener) -> None:
        """Stop calling ``listener`` (no-op when it was not added)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    # ------------------------------------------------------------- lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stage = stage
        if stage != "fit":
            return
        self._world_size = trainer.world_size
        self._training_began = False
        if starts_afresh(trainer):  # a new fit: what an earlier one left is not its history
            self.history = []
            self._window, self._unmerged = None, {}
            self._restored_progress = None
            self._start_epoch()
            self._collapse_warned.clear()
            self._nonfinite_warned.clear()
            self._at_risk_warned.clear()
            if self.reviver is not None:
                self.reviver._start_afresh()
        self._remove_hooks()
        self._window_at_exception = None
        tracker = DeadUnitTracker(
            pl_module,
            sites=self._sites,
            trace=self.trace,
            eps=self.eps,
            track_margin=self.track_margin,
            unit_dims=self.unit_dims,
        )
        nothing = (
            f"`DeadUnitMonitor` found no `nn.ReLU`/`nn.ReLU6` module in {type(pl_module).__name__}: "
            "it has nothing to count and training goes on untouched."
        )
        if not tracker.sites and not tracker.discovering:
            rank_zero_warn(nothing, category=RuntimeWarning)
        tracker._no_sites_warning = (nothing, RuntimeWarning)  # said after the first forward, where it looks
        tracker._bound_discovery()  # the first training batch's end ends the watch (a step may call a child twice)
        self.tracker = tracker
        self._watch_axes = True
        self._followers = []
        if self.reviver is not None:
            self.reviver.attach(self, pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # every callback's `setup` has run: a reviver among them follows its monitor by now
        self._followers = [
            cb
            for cb in trainer.callbacks  # type: ignore[attr-defined]
            if isinstance(cb, DeadUnitReviver) and cb.monitor is self and cb is not self.reviver
        ]
        if self.reviver is not None and self.reviver not in trainer.callbacks:  # type: ignore[attr-defined]
            self.reviver.on_fit_start(trainer, pl_module)  # refuses a sharded model before the first step
        if self.tracker is None or (not self.tracker.sites and not self.tracker.discovering):
            return
        self.tracker.to(pl_module.device)
        self.tracker.pause()
        self.tracker.attach()
        self._write_layout(trainer)
        widths = [site.num_units for site in self.tracker.sites]
        if widths and all(width is not None for width in widths):
            known = [int(w) for w in widths if w is not None]
            bound = alive_probability_lower_bound(known)
            self.alive_lower_bound = bound
            self._advise_initializer(trainer, known, bound)

    def _advise_initializer(self, trainer: pl.Trainer, widths: list[int], bound: float) -> None:
        """Say so at fit start when the network is narrow enough that an input may be cut off at initialization
        (Rister & Rubin's bound allows more than 1%) and no ``ReluInitializer`` is there to prevent it."""
        from lightning_relu.initializer import ReluInitializer

        if bound >= _ADVICE_BOUND or any(isinstance(cb, ReluInitializer) for cb in trainer.callbacks):  # type: ignore[attr-defined]
            return
        risk = math.ceil((1.0 - bound) * 1000) / 10  # rounded up: an upper bound on the share cut off
        rank_zero_info(
            f"DeadUnitMonitor: {len(widths)} ReLU layers, the narrowest {min(widths)} units wide. With a standard "
            f"random initialization, up to {risk:g}% of inputs can be cut off (every unit of some layer at 0) before "
            'training starts. ReluInitializer("sign_flip") or ReluInitializer("rai") prevents that.'
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A fit resumed from a checkpoint saved during an epoch (Lightning calls no `on_train_epoch_start` for it):
        # that epoch's counts so far come back from the checkpoint. One saved on the epoch's last batch, before the
        # epoch's end, resumes with the next epoch: that epoch is reported (and its remedies run) now.
        window, self._window = self._window, None
        progress, self._restored_progress = self._restored_progress, None
        self._epoch = trainer.current_epoch
        self._training_began = True
        if self.tracker is None or not self.tracker.sites:
            return
        epoch = _interrupted_epoch(window, progress)
        if epoch is None and progress is None and trainer.ckpt_path is not None:
            self._resume_without_state(trainer)
            return
        if epoch is None or epoch > trainer.current_epoch:
            return
        self.tracker.reset()
        self._start_epoch()
        self._epoch = epoch
        self._restore_epoch(trainer, window, progress or {}, epoch)
        if epoch < trainer.current_epoch:
            self._report_epoch(trainer, pl_module)
            self._epoch = trainer.current_epoch
        else:
            self._resumed_epoch = epoch

    def _resume_without_state(self, trainer: pl.Trainer) -> None:
        """A fit resumed from a checkpoint that holds no state of this monitor (saved without it, or by one that
        watched other sites): when Lightning says batches of the current epoch ran before it, their counts are
        missing and the epoch's report is partial."""
        run = lightning_batches_run_in_epoch(trainer)
        if not run:
            return
        assert self.tracker is not None
        self.tracker.reset()
        self._start_epoch()
        self._batches = run
        self._partial = (
            f"the checkpoint holds no state of this monitor: the counts of the {run} training batches of epoch "
            f"{trainer.current_epoch} run before it was saved are missing (saved without this `DeadUnitMonitor`, or by "
            "one with other `sites`)"
        )
        self._resumed_epoch = trainer.current_epoch

    def _restore_epoch(
        self, trainer: pl.Trainer, window: dict[str, Any] | None, progress: dict[str, Any], epoch: int
    ) -> None:
        """Take back what a checkpoint holds of the epoch it interrupted: its counts (added on global rank zero only:
        under several processes the checkpoint holds the sum over every rank), its progress, and why its report
        would be partial."""
        self._batches = int(progress.get("batches", 0))
        self._epoch_done = bool(progress.get("done", False))
        reason = progress.get("partial")
        self._partial = str(reason) if reason else None
        step = progress.get("nonfinite_step")
        if step is not None and self.tracker is not None:
            self._nonfinite_first = torch.tensor(int(step), dtype=torch.int64, device=self._tracker_device())
        if window is None or window.get("epoch") != epoch:
            if self._batches > 0 and self._partial is None:
                self._partial = (
                    f"the checkpoint holds no counts of the {self._batches} training batches of epoch {epoch} run "
                    "before it was saved (saved by an older version under several processes?)"
                )
            return
        sites = window.get("sites") or {}
        if self.track_margin and any("pre_sum_bits" not in states for states in sites.values()):
            self._partial = self._partial or (
                "`track_margin` was off when the checkpoint was saved: the margins cover only the batches run "
                "after the resume"
            )
        if trainer.global_rank == 0:
            places = window.get("places") or {}
            self._unmerged = {name: (states, places.get(name)) for name, states in sites.items()}
            self._merge_window(final=False)

    def _tracker_device(self) -> torch.device:
        """The device the counts live on (the CPU before any)."""
        stats = next(iter(self.tracker.stats.values()), None) if self.tracker is not None else None
        return stats.device if stats is not None else torch.device("cpu")

    def _start_epoch(self) -> None:
        self._batches = 0
        self._epoch_done = False
        self._partial = None
        self._nonfinite_first = None

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch = trainer.current_epoch
        resumed, self._resumed_epoch = self._resumed_epoch, None
        if self.tracker is not None and resumed != trainer.current_epoch:
            self.tracker.reset()
            self._unmerged = {}
            self._start_epoch()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.reviver is not None and self.reviver not in trainer.callbacks:  # type: ignore[attr-defined]
            self.reviver.on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._step = trainer.global_step
        if self.tracker is not None:
            if self._watch_axes and self.tracker.model is pl_module:
                # sites whose unit axis no known layer fixes take their producer's, seen in this fit's first step's
                # forward (a fit resumed from a checkpoint, or a second fit, builds a new tracker: it watches too)
                self._watch_axes = False
                self._axis_watch = AxisWatch(pl_module, self.tracker, batch).start()
            self.tracker.new_pass()
            self.tracker._step_began()
            self.tracker.tag_batch(trainer.global_step)
            self.tracker.resume()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._stop_axis_watch()
        if self.tracker is not None:
            self.tracker.pause()
            self.tracker._step_ended()
            self._batches += 1
            self._epoch_done = bool(trainer.is_last_batch)
            self._note_nonfinite()
        if self.reviver is not None and self.reviver not in trainer.callbacks:  # type: ignore[attr-defined]
            self.reviver.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # it holds a batch slice

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._stop_axis_watch()
        if self.tracker is not None and isinstance(loss, torch.Tensor) and loss.grad_fn is not None:
            # the backward of the step's loss begins with this gradient: forwards from then to its end are
            # recomputations (activation checkpointing), also in a step that never calls the module's own forward
            # (the tracker watches that forward's output)
            loss.register_hook(self.tracker._backward_began)

    def _stop_axis_watch(self) -> None:
        watch, self._axis_watch = self._axis_watch, None
        if watch is not None:
            watch.stop()

    def _note_nonfinite(self) -> None:
        """Keep the first step at which a site's counts saw NaN/Inf, on the device (a few 0-d operations per step,
        no host sync). Counts taken with plain operations (GPU, ``torch.compile``) hold every batch's non-finite
        outputs at once; the CPU path keeps its per-sample sums back and tags each output with its step
        (``tracker.tag_batch``), so its first non-finite step comes from the tags when it folds
        (:meth:`_merge_tagged_nonfinite`), not from a fold after every batch."""
        assert self.tracker is not None
        flags = self.tracker.nonfinite_counted()
        if not flags:
            return
        try:
            total = torch.stack(flags).sum() if len(flags) > 1 else flags[0]
        except RuntimeError:  # counts on several devices (a model split across them)
            total = torch.stack([flag.to(flags[0].device) for flag in flags]).sum()
        first = self._nonfinite_first
        if first is None or first.device != total.device:
            first = torch.full((), NO_STEP, dtype=torch.int64, device=total.device)
        self._nonfinite_first = torch.minimum(first, torch.where(total > 0, self._step, NO_STEP))

    def _merge_tagged_nonfinite(self) -> None:
        """Take the first non-finite step that the CPU path's tags tell (folding what it keeps back) into
        ``_nonfinite_first``."""
        tag = self.tracker.first_nonfinite_tag() if self.tracker is not None else None
        if tag is None:
            return
        first = self._nonfinite_first
        self._nonfinite_first = tag if first is None else torch.minimum(first, tag.to(first.device))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tracker = self.tracker
        if tracker is None or not tracker.sites:
            return
        self._report_epoch(trainer, pl_module)

    def _report_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Report the epoch ``self._epoch`` from the counts, log it, and call the listeners (the remedies)."""
        tracker = self.tracker
        assert tracker is not None
        tracker.pause()
        self._merge_window(final=True)
        self._agree_on_sizes(trainer)
        layers = tracker._reports()  # every rank takes part: the counts are summed across processes
        self._merge_tagged_nonfinite()
        tracker.reset()
        partial = self._partial
        if trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(partial is not None, all=False):
            partial = partial or "another process's counts of the epoch are partial"
        first = None
        if any(layer.nonfinite for layer in layers.values()):  # the same on every rank: the counts are summed
            step = self._nonfinite_first
            if step is None:
                step = torch.full((), NO_STEP, dtype=torch.int64, device=self._tracker_device())
            if trainer.world_size > 1:
                step = trainer.strategy.reduce(step.to(trainer.strategy.root_device), reduce_op="min")
            first = int(step) if int(step) != NO_STEP else None
        stepped = lightning_batches_that_stepped(trainer)
        report = EpochReport(
            epoch=self._epoch,
            global_step=trainer.global_step,
            layers=layers,
            partial=partial is not None,
            partial_reason=partial or "",
            first_nonfinite_step=first,
            log_step=None if stepped is None else max(stepped - 1, 0),
        )
        self._start_epoch()
        self.history.append(report)
        metrics = self._metrics(report)
        trainer.callback_metrics.update({key: torch.tensor(value) for key, value in metrics.items()})
        self._log(trainer, report, metrics)
        self._check_nonfinite(report)
        self._check_partial(report)
        self._check_at_risk(report)
        for listener in list(self._listeners):
            listener(trainer, pl_module, report)
        for reviver in self._revivers():  # the remedies act before a collapse can stop the fit
            reviver.revive_after_report(trainer, pl_module, report)
        self._check_collapse(trainer, report)

    def _revivers(self) -> list[DeadUnitReviver]:
        """The revivers this monitor drives: its own :attr:`reviver`, then those of the Trainer's callbacks that
        follow it, in the Trainer's order."""
        own = [self.reviver] if self.reviver is not None else []
        return own + [reviver for reviver in self._followers if reviver is not self.reviver]

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.history:
            self._summarize(trainer, self.history[-1])

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._remove_hooks()
            self._training_began = False

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop_axis_watch()
        try:  # the counts so far, for a checkpoint saved on this exception; never an error of its own here
            self._merge_tagged_nonfinite()
            self._window_at_exception = self._current_window()
        except Exception:  # the fit's own exception is what the user must see
            self._window_at_exception = None
        self._remove_hooks()

    @override
    def state_dict(self) -> dict[str, Any]:
        """What a resumed fit needs, of a size that does not grow with the epochs (O(units)): the latest epoch's
        report (``last_report``: the next epoch's at-risk check compares with it), the counts and progress of the
        epoch in progress, the reviver's state and the sites warned of. The reports of earlier epochs live in the
        loggers (``dead_units/...`` and the other scalars), not in the checkpoint."""
        last = self.history[-1] if self.history else None
        return {
            "last_report": last.state_dict() if last is not None else None,
            "collapse_warned": sorted(self._collapse_warned),
            "reviver": self.reviver.state_dict() if self.reviver is not None else {},
            "window": self._current_window() if self.tracker is not None else self._window_at_exception,
            "progress": self._progress(),
        }

    def _progress(self) -> dict[str, Any]:
        """Where the epoch in progress stands: enough for a resumed fit to tell whether its report is whole."""
        self._merge_tagged_nonfinite()
        step = self._nonfinite_first
        first = int(step) if step is not None and int(step) != NO_STEP else None
        return {
            "epoch": self._epoch,
            "batches": self._batches,
            "done": self._epoch_done,
            "partial": self._partial,
            "nonfinite_step": first,
        }

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Under several processes each holds its own counts and the checkpoint is written from one: every process
        # takes part here (Lightning saves checkpoints on every process) to store the counts summed over all.
        if trainer.world_size <= 1 or self.tracker is None or not self.tracker.sites:
            return
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if not isinstance(state, dict):
            return
        state["window"] = self._summed_window(trainer)
        self._merge_tagged_nonfinite()
        step = self._nonfinite_first
        if step is None:
            step = torch.full((), NO_STEP, dtype=torch.int64, device=self._tracker_device())
        first = int(trainer.strategy.reduce(step.to(trainer.strategy.root_device), reduce_op="min"))
        state["progress"]["nonfinite_step"] = first if first != NO_STEP else None

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if restored_outside_fit(self):
            return  # `validate`/`test`/`predict` from a checkpoint: the fit's history and counts stay as they are
        self._check_state_sites(state_dict)  # before anything changes
        progress = state_dict.get("progress")
        self._restored_progress = dict(progress) if isinstance(progress, dict) else None
        # a state of an older version holds every epoch's report: the latest one is kept, as a new state holds it
        last = [EpochReport.from_state_dict(report) for report in _saved_reports(state_dict)[-1:]]
        if getattr(self, "_training_began", False):  # restored within the fit: the history before it stays
            self.history = continued_history(self.history, last, lambda report: (report.epoch, report.global_step))
        else:
            self.history = last
        self._collapse_warned = set(state_dict.get("collapse_warned", []))
        if self.reviver is not None:
            self.reviver.load_state_dict(state_dict.get("reviver", {}))
        window = state_dict.get("window")
        self._window = window if isinstance(window, dict) and window.get("sites") else None

    def _current_window(self) -> dict[str, Any] | None:
        """The counts of the epoch in progress, for a checkpoint saved in the middle of it: a fit resumed from it
        reports that epoch over every batch, not only the ones after the resume. Under several processes a
        checkpoint holds one process's state, so there the resumed epoch counts from the resume on."""
        tracker = self.tracker
        if tracker is None or self._world_size > 1:
            return None
        tracker.flush()
        sites = {
            name: {key: _tensor(value).detach().cpu().clone() for key, value in stats.metric_state.items()}
            for name, stats in tracker.stats.items()
            if int(stats.samples) > 0
        }
        for name, (states, _) in self._unmerged.items():  # what an earlier checkpoint of this epoch still holds
            mine = sites.setdefault(name, states)
            if mine is not states and all(mine[key].shape == value.shape for key, value in states.items()):
                sites[name] = {key: mine[key] + value for key, value in states.items()}
        # each site's place (kind, base name, call position): names of positions created at run time depend on
        # the order they were created in, which a resumed run need not repeat
        places = {site.name: list(tracker._place(site)) for site in tracker.sites}
        places.update((name, place) for name, (_, place) in self._unmerged.items() if name not in places)
        if not sites:
            return None
        return {"epoch": self._epoch, "sites": sites, "places": {name: places.get(name) for name in sites}}

    def _summed_window(self, trainer: pl.Trainer) -> dict[str, Any] | None:
        """The counts of the epoch in progress summed over every process (each takes part): two all-reduces."""
        tracker = self.tracker
        assert tracker is not None
        self._merge_window(final=True)  # what an earlier checkpoint of this epoch holds (global rank zero only)
        self._agree_on_sizes(trainer)  # the same sites, of the same sizes, in the same order on every rank
        device = trainer.strategy.root_device
        parts: list[tuple[str, str, torch.Tensor]] = [
            (name, key, _tensor(value).detach())
            for name, stats in tracker.stats.items()
            for key, value in stats.metric_state.items()
        ]
        counts = [value.reshape(-1).to(device) for _, key, value in parts if not key.endswith("_bits")]
        sums = [value.reshape(-1).view(torch.float64).to(device) for _, key, value in parts if key.endswith("_bits")]
        counts_sum = trainer.strategy.reduce(torch.cat(counts), reduce_op="sum").cpu() if counts else None
        sums_sum = trainer.strategy.reduce(torch.cat(sums), reduce_op="sum").cpu() if sums else None
        sites: dict[str, dict[str, torch.Tensor]] = {}
        offsets = {"counts": 0, "sums": 0}
        for name, key, value in parts:
            kind, flat = ("sums", sums_sum) if key.endswith("_bits") else ("counts", counts_sum)
            assert flat is not None
            start = offsets[kind]
            offsets[kind] = start + value.numel()
            piece = flat[start : start + value.numel()].reshape(value.shape).clone()
            sites.setdefault(name, {})[key] = piece.view(torch.int64) if kind == "sums" else piece
        sites = {name: states for name, states in sites.items() if int(states["samples"]) > 0}
        if not sites:
            return None
        places = {site.name: list(tracker._place(site)) for site in tracker.sites}
        return {"epoch": self._epoch, "sites": sites, "places": {name: places.get(name) for name in sites}}

    def _check_state_sites(self, state_dict: dict[str, Any]) -> None:
        """A checkpoint's state must be of this model's sites (checked when the model is known, in a fit): a site of
        both must have the same width, and the state must share a site with the model (a state's site the model
        does not know yet may be a call position created at run time)."""
        tracker = self.tracker
        if tracker is None or not isinstance(state_dict, dict):
            return
        sites = {site.name: site for site in tracker.all_sites}
        names = list(sites)
        layers = [
            layer
            for epoch in _saved_reports(state_dict)
            for layer in (epoch.get("layers", []) if isinstance(epoch, dict) else [])
        ]
        window = state_dict.get("window")
        places = (window.get("places") or {}) if isinstance(window, dict) else {}
        window_sites = list(window.get("sites") or {}) if isinstance(window, dict) else []
        bases = {name: _place_base(places.get(name), name) for name in window_sites}
        # names no site can bear: not a site, a later call position of one, nor, while the first forward is to come,
        # a functional call
        given = [str(layer.get("name", "")) for layer in layers] + window_sites + [str(b) for b in bases.values()]
        functional = tracker.model if tracker.discovering else None
        strange = set(unknown_names(given, tracker.all_sites, module_names(tracker.model), functional))
        unknown: list[str] = []
        matched = 0
        widths: list[str] = []
        for layer in layers:
            name = str(layer.get("name", ""))
            if name in strange:
                unknown.append(name)
                continue
            matched += 1
            site = sites.get(name)
            width = len(layer.get("active_count", []))
            if site is not None and site.num_units is not None and width != site.num_units:
                widths.append(f"{name!r} has {width} units in the checkpoint, {site.num_units} in the model")
        for name in window_sites:
            if str(bases[name]) in strange and name in strange:
                unknown.append(name)
            else:
                matched += 1
        if widths or (unknown and not matched):
            unknown = sorted(set(unknown))
            problem = f"reports of sites {unknown} that the model does not have" if unknown else "; ".join(widths)
            raise ValueError(
                f"`state_dict` of `DeadUnitMonitor` holds {problem}; the model's sites are {names}. Was the "
                "checkpoint saved from another model? Nothing was loaded."
            )

    def _merge_window(self, final: bool) -> None:
        """Add a resumed checkpoint's counts of the epoch to the tracker's. A site whose counts have their shape
        now is merged at once; one sized by its first output, or a later call position not created yet, waits for
        the end of the epoch (``final``), when the run has shaped and created them. Counts whose shape the site's
        do not have then are not this model's: left out."""
        tracker = self.tracker
        if tracker is None or not self._unmerged:
            return
        for name, (states, place) in list(self._unmerged.items()):
            valid = isinstance(place, (list, tuple)) and len(place) == 3
            stats = tracker._place_stats(place[0], place[1], place[2], create=final) if valid else None
            if stats is None or "active" not in states:
                if final:
                    del self._unmerged[name]
                    unplaced = "the checkpoint does not say where the site sits (a checkpoint of an older version?)"
                    self._left_out(name, "the site is not in this run" if valid else unplaced)
                continue
            # options changed since the save (`track_margin`): the counts are kept, margins it did not keep start at 0
            # (the epoch is flagged partial in `_restore_epoch`), margins it kept and the site does not are dropped
            keys = list(stats.metric_state)
            states = {key: value for key, value in states.items() if key in keys}
            for key in keys:
                if key not in states:
                    bits = key.endswith("_bits")
                    states[key] = torch.zeros_like(states["active"]) if bits else torch.zeros((), dtype=torch.int64)
            unsized = [key for key, value in states.items() if getattr(stats, key).shape != value.shape]
            if unsized and not final:
                continue
            if any(getattr(stats, key).numel() or states[key].ndim != 1 for key in unsized):
                del self._unmerged[name]  # another width: not this model's counts
                widths = f"{states['active'].numel()} units saved, {stats.active.numel()} now"
                self._left_out(name, f"the site has another width ({widths}: another unit axis?)")
                continue
            for key in unsized:  # a site that has seen nothing since the resume
                setattr(stats, key, torch.zeros_like(states[key], device=getattr(stats, key).device))
            stats.merge_state({key: value.to(getattr(stats, key).device) for key, value in states.items()})
            del self._unmerged[name]

    def _left_out(self, name: str, why: str) -> None:
        """A checkpoint's counts of site ``name`` that cannot be added: the epoch's report is partial."""
        self._partial = self._partial or (
            f"the checkpoint's counts of site {name!r} for the batches run before it was saved were left out: {why}"
        )

    # --------------------------------------------------------------- helpers
    def _remove_hooks(self) -> None:
        if self.reviver is not None:
            self.reviver.detach()
        if self.tracker is not None:
            self.tracker.detach()
            self.tracker = None

    def _agree_on_sizes(self, trainer: pl.Trainer) -> None:
        """Give every rank the same sites, in the same order and of the same sizes, before summing: sites created
        on first sight (a module applied more times on one rank's data) and sites sized by their first output."""
        assert self.tracker is not None
        self.tracker.flush()
        if trainer.world_size <= 1:
            return
        counts = self.tracker._position_counts()
        if counts:
            local = torch.tensor(counts, dtype=torch.int64, device=trainer.strategy.root_device)
            self.tracker._grow_positions(trainer.strategy.reduce(local, reduce_op="max").tolist())
        lazy = [stats for stats in self.tracker.stats.values() if stats.num_units is None]
        if not lazy:
            return
        device = lazy[0].device
        sizes = torch.tensor([stats.active.numel() for stats in lazy], dtype=torch.int64, device=device)
        sizes = trainer.strategy.reduce(sizes, reduce_op="max")
        for stats, size in zip(lazy, sizes.tolist(), strict=True):
            if stats.active.numel() == 0 and size > 0:
                stats.active = torch.zeros(int(size), dtype=stats.active.dtype, device=stats.device)
            if stats.track_margin and stats.pre_sum.numel() == 0 and size > 0:
                stats.pre_sum = torch.zeros(int(size), dtype=torch.float64, device=stats.device)
                stats.pre_sumsq = torch.zeros(int(size), dtype=torch.float64, device=stats.device)

    @staticmethod
    def _metrics(report: EpochReport) -> dict[str, float]:
        metrics: dict[str, float] = {}
        seen = [layer for layer in report.layers.values() if layer.seen]
        finite = [layer for layer in seen if not layer.nonfinite]  # a non-finite site is not judged dead or dying
        for layer in finite:
            metrics[f"dead_units/{layer.name}"] = layer.dead_fraction
        if finite:
            metrics["dead_units/total"] = report.dead_fraction
        for layer in seen:
            if not math.isnan(layer.living_data_fraction):
                metrics[f"living_data/{layer.name}"] = layer.living_data_fraction
        for layer in finite:
            metrics[f"dying_units/{layer.name}"] = layer.dying_fraction
        for layer in seen:
            if layer.nonfinite:
                metrics[f"nonfinite/{layer.name}"] = float(layer.nonfinite_batches)
        if seen:
            metrics["nonfinite/total"] = float(len(report.nonfinite_sites))
        metrics["partial_epoch"] = float(report.partial)
        for layer in seen:
            if layer.at_risk is not None:
                metrics[f"at_risk/{layer.name}"] = layer.at_risk_fraction
        return metrics

    def revived_totals(self) -> dict[str, int] | None:
        """Units revived per site over the fit, by the reviver acting on this monitor's reports (None: no reviver)."""
        revivers = self._revivers()
        if not revivers:
            return None
        totals: dict[str, int] = {}
        for reviver in revivers:
            for name, count in reviver.revived_per_site.items():
                totals[name] = totals.get(name, 0) + count
        return totals

    @rank_zero_only
    def _write_layout(self, trainer: pl.Trainer) -> None:
        if not self.dashboards:
            return
        revival = self.reviver is not None or any(isinstance(cb, DeadUnitReviver) for cb in trainer.callbacks)  # type: ignore[attr-defined]
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(custom_scalars_layout(revival=revival))

    @rank_zero_only
    def _summarize(self, trainer: pl.Trainer, report: EpochReport) -> None:
        revived = self.revived_totals()
        if self.dashboards:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_text(
                        SUMMARY_TAG, summary_markdown(report, revived), global_step=report.metrics_step
                    )
        if self.print_summary:
            print_summary(report, revived)

    @rank_zero_only
    def _log(self, trainer: pl.Trainer, report: EpochReport, metrics: dict[str, float]) -> None:
        step = report.metrics_step
        for logger in trainer.loggers:
            log_epoch_scalars(logger, report, metrics)
            if self.log_histograms and isinstance(logger, TensorBoardLogger):
                writer = logger.experiment
                for layer in report.layers.values():
                    if layer.seen and layer.num_units > 0:
                        writer.add_histogram(
                            activation_rate_tag(layer.name), layer.activation_rate.float(), global_step=step
                        )
                    if layer.seen and layer.margin is not None and bool(torch.isfinite(layer.margin).any()):
                        finite = layer.margin[torch.isfinite(layer.margin)]
                        writer.add_histogram(margin_tag(layer.name), finite.float(), global_step=step)
            if self.dashboards and isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(
                    HEATMAP_TAG, dead_fraction_heatmap(self.history), global_step=step, dataformats="HWC"
                )

    def _check_nonfinite(self, report: EpochReport) -> None:
        """One warning per fit, naming the first site (in forward order) and the first step that saw NaN/Inf."""
        names = report.nonfinite_sites
        if not names or self._nonfinite_warned:
            return
        self._nonfinite_warned.add(names[0])
        layer = report.layers[names[0]]
        step = report.first_nonfinite_step
        where = f"first at global step {step}" if step is not None else "first step unknown"
        others = f"; {len(names) - 1} later sites too" if len(names) > 1 else ""
        rank_zero_warn(
            f"Site {layer.name!r} produced NaN or Inf activations in {layer.nonfinite_batches} training batches of "
            f"epoch {report.epoch} ({where}{others}). Non-finite sites are reported as non-finite "
            "(`LayerReport.nonfinite`, `nonfinite/<site>`), never as dead or collapsed, and no remedy acts on the "
            "epoch: the training has likely diverged (lower the learning rate, clip gradients, check the data).",
            category=RuntimeWarning,
        )

    def _check_partial(self, report: EpochReport) -> None:
        if report.partial:
            rank_zero_warn(
                f"The dead-unit report of epoch {report.epoch} is partial: {report.partial_reason}. It is logged with "
                "`partial_epoch` = 1 and no remedy acts on it.",
                category=RuntimeWarning,
            )

    def _check_at_risk(self, report: EpochReport) -> None:
        """Warn once per site when its at-risk share rises epoch over epoch while its dead share is still low."""
        if len(self.history) < 2:
            return
        previous, previous_epoch = self.history[-2].layers, self.history[-2].epoch
        for layer in report.layers.values():
            before = previous.get(layer.name)
            if layer.at_risk is None or before is None or before.at_risk is None or not layer.seen:
                continue
            rising = layer.at_risk_fraction > before.at_risk_fraction
            if rising and layer.dead_fraction <= _LOW_DEAD and layer.name not in self._at_risk_warned:
                self._at_risk_warned.add(layer.name)
                rank_zero_warn(
                    f"Site {layer.name!r} is heading for death: at epoch {report.epoch} {layer.num_at_risk} of its "
                    f"{layer.num_units} units are inside the dead cone (mean/std of the pre-activation below "
                    f"Phi^-1({layer.eps:g})), up from {before.num_at_risk} at epoch {previous_epoch}, while "
                    f"only {layer.num_dead} are dead yet. Small target variance with momentum is a known cause "
                    "(Arnekvist et al.): normalize the targets, lower the momentum or the learning rate.",
                    category=DyingWarning,
                )

    def _check_collapse(self, trainer: pl.Trainer, report: EpochReport) -> None:
        for layer in report.layers.values():
            if not layer.collapsed:
                continue
            message = (
                f"Site {layer.name!r} collapsed at epoch {report.epoch}: all {layer.num_units} units are dead, so "
                "everything after it receives a constant and the network computes a constant function."
            )
            if self.on_collapse == "raise":
                raise CollapseError(message)
            if layer.name not in self._collapse_warned:
                self._collapse_warned.add(layer.name)
                suffix = " Stopping the fit (`on_collapse='stop'`)." if self.on_collapse == "stop" else ""
                rank_zero_warn(message + suffix, category=CollapseWarning)
            if self.on_collapse == "stop":
                trainer.should_stop = True


# below this lower bound on the probability that an input stays alive, the start of a fit says what prevents it
_ADVICE_BOUND = 0.99


def _probability_text(bound: float, widths: list[int]) -> str:
    """``bound`` rounded down to 4 significant digits; within 1e-4 of 1, the weaker bound ``1 - 2^-m`` with
    ``2^-m = sum(2^-n_i)`` (the union bound, computed without underflow), ``m`` rounded down to 0.01. Rounding
    down keeps the text a lower bound."""
    if widths and 1.0 - bound < 1e-4:
        low = min(widths)
        exponent = low - math.log2(math.fsum(2.0 ** (low - width) for width in widths))
        return "1 - 2^-" + f"{math.floor(exponent * 100) / 100:.2f}".rstrip("0").rstrip(".")
    if bound <= 0:
        return "0"
    power = math.floor(math.log10(bound))
    scaled = math.floor(bound / 10.0**power * 1000)  # 4 significant digits, rounded down
    return f"{scaled / 1000 * 10.0**power:.4g}"


def _tensor(state: Any) -> torch.Tensor:
    """A state of ``ActivationStats`` (a tensor: none of its states is a list)."""
    assert isinstance(state, torch.Tensor), type(state)
    return state


def _saved_reports(state_dict: dict[str, Any]) -> list[dict[str, Any]]:
    """The epoch reports a monitor state holds: its ``last_report``, or every epoch's in the ``history`` of a state
    saved by an older version (oldest first)."""
    last = state_dict.get("last_report")
    if isinstance(last, dict):
        return [last]
    history = state_dict.get("history")
    return [report for report in history if isinstance(report, dict)] if isinstance(history, list) else []


def _place_base(place: Any, name: str) -> Any:
    """The module (or functional parent) base of a checkpoint's place ``(kind, base, call)``; ``name`` without one."""
    return place[1] if isinstance(place, (list, tuple)) and len(place) == 3 else name


def _interrupted_epoch(window: dict[str, Any] | None, progress: dict[str, Any] | None) -> int | None:
    """The epoch a resumed checkpoint interrupted (some of its batches had run), or None."""
    if isinstance(progress, dict) and int(progress.get("batches", 0)) > 0:
        return int(progress.get("epoch", 0))
    if isinstance(window, dict) and window.get("sites"):  # a checkpoint of an older version
        return int(window.get("epoch", 0))
    return None

