"""``TargetScaleCheck``: warn when regression targets are far from unit scale while the optimizer uses momentum.

Arnekvist et al. ("The Effect of Target Normalization and Momentum on Dying ReLU") find that ReLU units die more
easily as the variance of the regression targets approaches zero, and that momentum is what carries them into the
*dead cone* (``P(w·x + b > 0) < ε``; for unit-Gaussian inputs ``b / ‖w‖ < Φ⁻¹(ε)``), from which no gradient brings
them back. This callback measures the targets once, during the first training epoch, and says so when both risk
factors are present.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_relu._lifecycle import starts_afresh

__all__ = ["TargetScaleCheck", "TargetScaleWarning", "optimizer_momentum"]

_LOG_PREFIX = "target_scale"


class TargetScaleWarning(RuntimeWarning):
    """The regression targets are far from zero mean and unit variance while the optimizer uses momentum."""


class TargetScaleCheck(Callback):
    r"""Measure the regression targets during the first training epoch and warn about a dying-ReLU risk.

    While the first training epoch runs, the mean and the standard deviation of the targets are accumulated on
    the targets' device, without any host-device synchronization per step (a running count, mean and sum of
    squared deviations, merged batch by batch with Chan et al.'s parallel formula, so a large mean does not
    cancel the variance out). At the end of that epoch they are combined across processes (DDP) with
    ``trainer.strategy.reduce(..., reduce_op="sum")``, logged to every logger in ``trainer.loggers`` (rank zero)
    and put into ``trainer.callback_metrics`` as

    - ``target_scale/mean``: the mean of every target entry seen;
    - ``target_scale/std``: their standard deviation (with Bessel's correction, as ``torch.std``).

    Then, when the optimizer uses momentum and the targets are far from normalized, a
    :class:`TargetScaleWarning` is issued on rank zero:

    .. math::
        \sigma \notin [\sigma_{\min}, \sigma_{\max}] \quad\text{or}\quad |\mu| > m\,\sigma

    (the standard deviation is outside ``std_range``, or the mean lies more than ``max_abs_mean`` standard
    deviations from 0). *Momentum* means, in any param group of any optimizer in ``trainer.optimizers``, a
    ``momentum`` entry > 0 (SGD, RMSprop) or ``betas[0]`` > 0 (Adam, AdamW, NAdam, RAdam, Adamax, ...); see
    :func:`optimizer_momentum`. Without momentum the check stays silent, whatever the targets.

    Arnekvist et al. show that with small target variance and momentum the units of a ReLU network are pushed
    into the dead cone ``P(w·x + b > 0) < ε``, where they stop learning for good. The fix is to normalize the
    targets to zero mean and unit variance (and undo it on the predictions), or to reduce the momentum.

    The measurement happens once per fit: a later ``fit`` of the same Trainer (which continues from its step) and a
    fit resumed from a checkpoint that holds this callback's state keep the numbers already measured, while a fit
    that starts from step 0 (a new Trainer) measures its own targets (a fit resumed from a checkpoint saved without
    this callback measures during its first epoch). Entries that are NaN or Inf are
    left out of the statistics.

    Targets that are not floating-point tensors (class labels, integer or boolean tensors, strings, ...) are not
    regression targets: the check is skipped without a warning (:attr:`skipped` is ``True``), and so it is when a
    batch has no second element (the default ``target_fn`` reads ``batch[1]``).

    Args:
        std_range: ``(low, high)``: standard deviations in this closed interval are fine. Default ``(0.1, 10.0)``:
            a factor of 10 either way from unit variance.
        max_abs_mean: the mean is fine while ``|mean| <= max_abs_mean * std``. Default ``3.0``: a target whose
            mean lies more than three of its standard deviations from 0 is mostly a constant offset.
            ``math.inf`` disables the mean check.
        target_fn: maps a training batch to its regression targets (a tensor); by default ``batch[1]`` of a tuple
            or list batch.

    Raises:
        ValueError: if an argument is invalid.

    Example::

        from lightning.pytorch import Trainer
        from lightning_relu.target_check import TargetScaleCheck

        check = TargetScaleCheck()
        trainer = Trainer(callbacks=[check])
        trainer.fit(model)
        check.target_mean, check.target_std, check.momentum_found

    Attributes:
        target_mean: the measured mean (``None`` before the measurement, or when skipped).
        target_std: the measured standard deviation (``None`` before the measurement or when skipped; NaN when a
            single finite entry was seen).
        target_count: the number of finite target entries measured.
        momentum_found: the largest momentum coefficient found in the optimizers' param groups when the check
            ran (``0.0`` without momentum, ``None`` before the check).
        measured: whether the measurement is done (restored from checkpoints).
        skipped: whether the targets were not floating-point tensors.
        warned: whether the check warned.
    """

    def __init__(
        self,
        std_range: tuple[float, float] = (0.1, 10.0),
        max_abs_mean: float = 3.0,
        target_fn: Callable[[Any], Tensor] | None = None,
    ) -> None:
        if (
            not isinstance(std_range, Sequence)
            or isinstance(std_range, str)
            or len(std_range) != 2
            or not all(_is_number(v) for v in std_range)
            or not 0.0 < std_range[0] < std_range[1] < math.inf
        ):
            raise ValueError(
                f"`std_range` must be a pair (low, high) of finite numbers with 0 < low < high, got {std_range!r}"
            )
        if not _is_number(max_abs_mean) or not max_abs_mean > 0.0:
            raise ValueError(f"`max_abs_mean` must be a positive number (math.inf disables it), got {max_abs_mean!r}")
        if target_fn is not None and not callable(target_fn):
            raise ValueError(f"`target_fn` must be a callable or None, got {target_fn!r}")
        self.std_range = (float(std_range[0]), float(std_range[1]))
        self.max_abs_mean = float(max_abs_mean)
        self.target_fn = target_fn

        self.target_mean: float | None = None
        self.target_std: float | None = None
        self.target_count = 0
        self.momentum_found: float | None = None
        self.measured = False
        self.skipped = False
        self.warned = False
        # running statistics of the epoch being measured (tensors on the targets' device)
        self._active = False
        self._local_skip = False
        self._count: Tensor | None = None
        self._mean: Tensor | None = None
        self._m2: Tensor | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(std_range=self.std_range, max_abs_mean=self.max_abs_mean)

    # ------------------------------------------------------------- lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and starts_afresh(trainer):  # a new fit measures its own targets
            self.target_mean = self.target_std = self.momentum_found = None
            self.target_count = 0
            self.measured = self.skipped = self.warned = False

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._active = not self.measured
        self._local_skip = False
        self._count = self._mean = self._m2 = None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._active or self._local_skip:
            return
        target = self._target(batch)
        if target is None:
            self._local_skip = True
            return
        self._update(target)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            self._finish(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a fit stopped before the first epoch ended still gets the numbers of the batches it saw
        if self._active:
            self._finish(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "measured": self.measured,
            "skipped": self.skipped,
            "warned": self.warned,
            "target_mean": self.target_mean,
            "target_std": self.target_std,
            "target_count": self.target_count,
            "momentum_found": self.momentum_found,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.measured = bool(state_dict.get("measured", False))
        self.skipped = bool(state_dict.get("skipped", False))
        self.warned = bool(state_dict.get("warned", False))
        self.target_mean = _optional_float(state_dict.get("target_mean"))
        self.target_std = _optional_float(state_dict.get("target_std"))
        self.target_count = int(state_dict.get("target_count", 0))
        self.momentum_found = _optional_float(state_dict.get("momentum_found"))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # the running statistics live on the training device and are only meaningful inside the epoch
        state.update(_active=False, _local_skip=False, _count=None, _mean=None, _m2=None)
        return state

    # --------------------------------------------------------------- helpers
    def _target(self, batch: Any) -> Tensor | None:
        """The batch's regression targets, or ``None`` when they are not a floating-point tensor."""
        if self.target_fn is not None:
            target = self.target_fn(batch)
        elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
            target = batch[1]
        else:
            return None
        if not isinstance(target, Tensor) or not target.is_floating_point():
            return None
        return target

    def _update(self, target: Tensor) -> None:
        """Merge one batch into the running count, mean and sum of squared deviations (no host sync)."""
        with torch.no_grad():
            dtype = torch.float32 if target.device.type == "mps" else torch.float64
            values = target.detach().reshape(-1).to(dtype)
            finite = torch.isfinite(values)
            values = torch.where(finite, values, torch.zeros((), dtype=dtype, device=values.device))
            n_b = finite.sum(dtype=dtype)
            mean_b = values.sum() / n_b.clamp_min(1)
            m2_b = torch.where(finite, values - mean_b, torch.zeros((), dtype=dtype, device=values.device))
            m2_b = m2_b.square().sum()
            if self._count is None or self._mean is None or self._m2 is None:
                self._count, self._mean, self._m2 = n_b, mean_b, m2_b
                return
            count, mean, m2 = _merge(self._count, self._mean, self._m2, n_b, mean_b, m2_b)
            self._count, self._mean, self._m2 = count, mean, m2

    def _finish(self, trainer: pl.Trainer) -> None:
        self._active = False
        strategy = trainer.strategy
        skip = strategy.reduce_boolean_decision(self._local_skip, all=False)  # a rank that skipped decides
        if skip:
            self._skip()
            return
        if self._count is None or self._mean is None or self._m2 is None:
            # this rank saw no batch: it takes part in the reductions with empty statistics
            device = trainer.strategy.root_device
            dtype = torch.float32 if device.type == "mps" else torch.float64
            zero = torch.zeros((), dtype=dtype, device=device)
            self._count, self._mean, self._m2 = zero, zero.clone(), zero.clone()
        count, mean, m2 = self._count, self._mean, self._m2
        # across ranks: first the total count and the weighted sum of the means, then the squared deviations
        # about the global mean (Chan et al.), both plain sums
        totals = strategy.reduce(torch.stack([count, count * mean]), reduce_op="sum")
        total = totals[0]
        global_mean = totals[1] / total.clamp_min(1)
        spread = strategy.reduce(m2 + count * (mean - global_mean).square(), reduce_op="sum")
        self._count = self._mean = self._m2 = None
        n = round(float(total))
        self.measured = True
        self.target_count = n
        if n == 0:
            self._skip()
            return
        self.target_mean = float(global_mean)
        self.target_std = math.sqrt(float(spread) / (n - 1)) if n > 1 else math.nan
        self.momentum_found = max((optimizer_momentum(opt) for opt in trainer.optimizers), default=0.0)
        self._log(trainer)
        self._check()

    def _skip(self) -> None:
        self.measured = True
        self.skipped = True
        self.target_mean = self.target_std = None
        self._count = self._mean = self._m2 = None

    def _log(self, trainer: pl.Trainer) -> None:
        assert self.target_mean is not None and self.target_std is not None
        metrics = {"mean": self.target_mean, "std": self.target_std}
        trainer.callback_metrics.update({f"{_LOG_PREFIX}/{key}": torch.tensor(value) for key, value in metrics.items()})
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            separator = logger.group_separator
            logger.log_metrics(
                {f"{_LOG_PREFIX}{separator}{key}": value for key, value in metrics.items()}, step=trainer.global_step
            )

    def _check(self) -> None:
        mean, std, momentum = self.target_mean, self.target_std, self.momentum_found
        if mean is None or std is None or math.isnan(std) or not momentum:
            return
        low, high = self.std_range
        problems: list[str] = []
        if not low <= std <= high:
            problems.append(f"standard deviation {std:.4g} is outside `std_range` [{low:g}, {high:g}]")
        if abs(mean) > self.max_abs_mean * std:
            problems.append(
                f"mean {mean:.4g} lies more than `max_abs_mean`={self.max_abs_mean:g} standard deviations from 0"
            )
        if not problems:
            return
        self.warned = True
        rank_zero_warn(
            f"The regression targets are far from zero mean and unit variance: their {' and their '.join(problems)}"
            f" (measured over {self.target_count} target entries of the first training epoch), while the optimizer"
            f" uses momentum (coefficient {momentum:g}). Arnekvist et al. ('The Effect of Target"
            " Normalization and Momentum on Dying ReLU') show that ReLUs die more easily as the target variance"
            " shrinks, momentum pushing units into the dead cone P(w·x + b > 0) < eps, from which no gradient brings"
            " them back. Normalize the targets to zero mean and unit variance (and undo it on the predictions), or"
            " reduce the momentum.",
            category=TargetScaleWarning,
        )


def optimizer_momentum(optimizer: torch.optim.Optimizer) -> float:
    """The largest momentum coefficient over the param groups of ``optimizer`` (``0.0`` when there is none).

    A param group's coefficient is its ``momentum`` entry (SGD, RMSprop) or the first of its ``betas`` (Adam,
    AdamW, NAdam, RAdam, Adamax, ...); groups with neither count as 0. Non-numeric entries are ignored.

    Example:
        >>> import torch
        >>> params = [torch.nn.Parameter(torch.zeros(1))]
        >>> optimizer_momentum(torch.optim.SGD(params, lr=0.1, momentum=0.9))
        0.9
        >>> optimizer_momentum(torch.optim.Adam(params))
        0.9
        >>> optimizer_momentum(torch.optim.SGD(params, lr=0.1))
        0.0
    """
    found = 0.0
    for group in optimizer.param_groups:
        values: list[Any] = [group.get("momentum")]
        betas = group.get("betas")
        if isinstance(betas, (tuple, list)) and betas:
            values.append(betas[0])
        for value in values:
            number = _as_float(value)
            if number is not None and number > found:
                found = number
    return found


def _merge(
    count: Tensor, mean: Tensor, m2: Tensor, n_b: Tensor, mean_b: Tensor, m2_b: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Chan et al.'s merge of two (count, mean, sum of squared deviations) summaries."""
    total = count + n_b
    delta = mean_b - mean
    weight = n_b / total.clamp_min(1)
    return total, mean + delta * weight, m2 + m2_b + delta.square() * count * weight


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _as_float(value: object) -> float | None:
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _optional_float(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
