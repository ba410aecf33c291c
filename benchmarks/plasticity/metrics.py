"""What the benchmark measures: effective rank, τ-dormant scores, 95% intervals."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["dormant_scores", "effective_rank", "interval", "unit_activity"]

# two-sided 95% quantiles of Student's t, by degrees of freedom (scipy.stats.t.ppf(0.975, df))
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
         25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def _t975(df: int) -> float:
    if df in _T975:
        return _T975[df]
    larger = [k for k in _T975 if k > df]
    return _T975[min(larger)] if larger else 1.960  # the next tabulated df: a slightly wider interval


def interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% Student-t interval of the mean (half-width NaN for fewer than 2 values)."""
    finite = [float(v) for v in values if not math.isnan(float(v))]
    n = len(finite)
    if n == 0:
        return math.nan, math.nan
    mean = sum(finite) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1))
    return mean, _t975(n - 1) * sd / math.sqrt(n)


def effective_rank(features: Tensor) -> float:
    r"""Effective rank of a ``(samples, units)`` matrix (Roy & Vetterli 2007; used by Dohare et al. 2024).

    .. math:: \operatorname{erank}(\Phi) = \exp\Big(-\sum_k p_k \log p_k\Big), \quad p_k = \sigma_k / \sum_j \sigma_j

    with :math:`\sigma_k` the singular values (terms with :math:`p_k = 0` count 0). A zero matrix has rank 0.
    """
    sigma = torch.linalg.svdvals(features.double().reshape(features.shape[0], -1))
    total = sigma.sum()
    if float(total) == 0.0:
        return 0.0
    p = sigma / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def unit_activity(output: Tensor) -> Tensor:
    """Mean absolute activation of each unit (dimension 1) over the batch and any spatial positions."""
    dims = [d for d in range(output.dim()) if d != 1]
    return output.detach().abs().mean(dim=dims)


def dormant_scores(output: Tensor) -> Tensor:
    r"""ReDo's score of every unit of one layer (Sokar et al. 2023, eq. 1):
    :math:`s_i = \mathbb{E}|h_i| \,/\, \frac{1}{H}\sum_k \mathbb{E}|h_k|`; a layer whose units are all zero scores 0."""
    activity = unit_activity(output)
    mean = activity.mean()
    if float(mean) == 0.0:
        return torch.zeros_like(activity)
    return activity / mean
