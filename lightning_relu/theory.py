r"""How likely a sample is to stay alive through a rectifier network at initialization.

Rister and Rubin, "Probabilistic bounds on data sensitivity in deep rectifier networks", bound the probability that a
fixed input is still *alive* (not mapped to zero by a rectifier layer) after :math:`k` layers of width :math:`n`
whose weights and biases are drawn iid from a symmetric, continuous distribution (eq. 10):

.. math::
    \left(1 - 2^{-n}\right)^{k} \leq P(\text{alive}) \leq \left(1 - 2^{-n^2 - n}\right)^{k - 1}.

The lower bound comes from each layer killing a living input with probability at most :math:`2^{-n}` (every unit's
pre-activation is symmetric and is exactly 0 with probability 0), so for layers of widths :math:`n_1, \dots, n_k`
it is :math:`\prod_i (1 - 2^{-n_i})`.
For a convolution, :math:`n` is the number of channels: a sample dies only when every channel at every position is
non-positive, which is no more likely than every channel at one position being so, and the bound stays valid.
The bounds assume symmetric iid initialization from a distribution without an atom at 0 (Gaussian or uniform, as
PyTorch's defaults and He initialization are; with weights and biases of ±1, say, a pre-activation is 0 with positive
probability and the lower bound fails); batch normalization and data-dependent schemes such as sign flipping
(:func:`lightning_relu.init.sign_flip_`) are outside their hypotheses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from lightning_relu.sites import find_relu_sites

__all__ = [
    "alive_probability_bounds",
    "alive_probability_lower_bound",
    "min_width",
    "min_width_real",
    "model_alive_lower_bound",
]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return value


def _check_probability(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"`{name}` must be a probability strictly between 0 and 1, got {value!r}")
    return float(value)


def _log_survival(exponent: int) -> float:
    r""":math:`\log(1 - 2^{-e})` for an integer of any size (2^-e is 0.0 in double beyond e = 1074)."""
    return math.log1p(-math.ldexp(1.0, -min(exponent, 1100)))


def _survival(exponent: int, times: int) -> float:
    """:math:`(1 - 2^{-e})^t` for integers of any size."""
    if times == 0 or exponent >= 2**1000:  # (no integer in memory has a log near 2^1000 · ln 2)
        return 1.0
    if exponent <= 1000 and times < 2**53:
        return math.exp(times * _log_survival(exponent))
    # in logs: t · -log(1 - 2^-e) = exp(log(-log(1 - 2^-e)) + log t), where -log(1 - 2^-e) = 2^-e to double
    # precision once e > 1000 (2^-e underflows in double long before t does)
    log_loss = math.log(-_log_survival(exponent)) if exponent <= 1000 else -exponent * math.log(2.0)
    magnitude = log_loss + math.log(times)
    return 0.0 if magnitude > 709.0 else math.exp(-math.exp(magnitude))


def alive_probability_bounds(width: int, depth: int) -> tuple[float, float]:
    r"""Rister and Rubin's bounds on the probability that an input survives ``depth`` layers of ``width`` units.

    .. math::
        \left(1 - 2^{-n}\right)^{k} \leq P(\text{alive}) \leq \left(1 - 2^{-n^2 - n}\right)^{k - 1}

    Args:
        width: units per layer, :math:`n \geq 1`.
        depth: rectifier layers, :math:`k \geq 1`.

    Returns:
        ``(lower, upper)``.

    Examples:
        >>> alive_probability_bounds(2, 1)
        (0.75, 1.0)
        >>> lower, upper = alive_probability_bounds(3, 10)
        >>> round(lower, 4), round(upper, 4)
        (0.2631, 0.9978)
    """
    n = _check_positive_int("width", width)
    k = _check_positive_int("depth", depth)
    return _survival(n, k), _survival(n * n + n, k - 1)


def alive_probability_lower_bound(widths: Sequence[int]) -> float:
    r"""Lower bound on the probability that an input survives layers of the given widths: :math:`\prod_i (1-2^{-n_i})`.

    Args:
        widths: the number of units of each rectifier layer, in any order (at least one).

    Examples:
        >>> alive_probability_lower_bound([2, 2])
        0.5625
        >>> alive_probability_lower_bound([3] * 10) == alive_probability_bounds(3, 10)[0]
        True
    """
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or len(widths) == 0:
        raise ValueError(f"`widths` must be a non-empty sequence of positive integers, got {widths!r}")
    for width in widths:
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"`widths` must be a non-empty sequence of positive integers, got {widths!r}")
    return math.exp(math.fsum(_log_survival(n) for n in widths))


def min_width_real(depth: int, p: float) -> float:
    r"""The real width :math:`n` at which the lower bound :math:`(1-2^{-n})^k` equals ``p``.

    .. math::
        n = -\log_2\left(1 - p^{1/k}\right)

    This is the unrounded value of the formula, useful for plots; :func:`min_width` gives the integer to build.

    Args:
        depth: rectifier layers, :math:`k \geq 1`.
        p: target probability that an input stays alive, strictly between 0 and 1.

    Examples:
        >>> min_width_real(1, 0.5)
        1.0
    """
    k = _check_positive_int("depth", depth)
    q = _check_probability("p", p)
    if k < 2**53:
        # 1 - p^(1/k) computed without cancellation for deep networks and p close to 1
        return -math.log2(-math.expm1(math.log(q) / k))
    # a depth beyond floats: 1 - p^(1/k) = x (1 + O(x)) with x = -log(p) / k, taken in logs
    log_x = math.log(-math.log(q)) - math.log(k)
    return -math.log2(-math.expm1(-math.exp(log_x))) if log_x > -700.0 else -log_x / math.log(2.0)


def min_width(depth: int, p: float) -> int:
    r"""The smallest integer width :math:`n \geq 1` whose lower bound guarantees ``p``: :math:`(1-2^{-n})^k \geq p`.

    This is the ceiling of :func:`min_width_real` (at least 1), checked against the bound so that rounding in the
    floating-point formula never gives a width one too large or too small.

    Args:
        depth: rectifier layers, :math:`k \geq 1`.
        p: target probability that an input stays alive, strictly between 0 and 1.

    Examples:
        >>> min_width(10, 0.9)
        7
        >>> alive_probability_bounds(7, 10)[0] >= 0.9 > alive_probability_bounds(6, 10)[0]
        True
    """
    real = min_width_real(depth, p)
    n = max(1, math.ceil(real))
    while n > 1 and alive_probability_bounds(n - 1, depth)[0] >= p:
        n -= 1
    while alive_probability_bounds(n, depth)[0] < p:
        n += 1
    return n


def model_alive_lower_bound(model: nn.Module) -> float | None:
    r"""The lower bound :math:`\prod_i (1-2^{-n_i})` for a model, from the widths of its rectifier sites.

    The widths are the sites' ``num_units`` (:func:`lightning_relu.sites.find_relu_sites`): output features of a
    dense layer, channels of a convolution. The bound assumes the sites are applied one after the other to
    symmetric iid-initialized affine maps.

    Returns:
        The bound, or ``None`` when it is unknown: the model has no rectifier site, or the width of a site is unknown
        (a site whose producer cannot be determined).

    Examples:
        >>> net = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> model_alive_lower_bound(net)
        0.5625
    """
    sites = find_relu_sites(model)
    widths = [site.num_units for site in sites]
    if not widths or any(width is None for width in widths):
        return None
    return alive_probability_lower_bound([int(width) for width in widths if width is not None])
