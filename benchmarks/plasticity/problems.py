"""The continual problems, all generated from a seed (no download, no bundled data).

- ``permuted``: 10-class classification of generated 8x8 "images" (each class a mixture of three smooth random
  prototypes plus noise); every task applies a new random permutation to the 64 pixels (task 0: none), as in
  Online Permuted MNIST (Dohare et al. 2024). Reported: test accuracy on held-out samples at the end of the task.
- ``random_labels``: a fixed pool of generated images whose labels are redrawn uniformly at random at every task
  (memorization, as in Lyle et al. 2022 and Kumar et al. 2023). Reported: accuracy on the pool at the end of the
  task (the network's ability to fit a new labelling).
- ``regression``: the Slowly-Changing Regression problem of Dohare et al. (2024, Extended Data Fig. 2; earlier
  "bit-flipping"): ``m`` input bits of which ``f`` "flipping" bits are constant except that one of them, chosen at
  random, flips every ``T`` examples; the other ``m - f`` bits are i.i.d. at every example; a last bit is always 1.
  The target is a fixed network with one hidden layer of linear threshold units (LTUs), every weight -1 or +1;
  LTU ``i`` fires when its input sum exceeds ``θ_i = (m + 1) β - S_i``, ``S_i`` its number of negative input
  weights. A task is one period of ``T`` examples; reported: the online squared error over the period (the
  error on each example before the step that learns from it, averaged), as the paper's binned error.
- ``tuning``: random labels on a pool of i.i.d. Gaussian 32-d inputs; only for tuning our revival's window, never
  reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PROBLEMS", "TUNING_PROBLEM", "Problem", "make_problem"]

PROBLEMS: tuple[str, ...] = ("permuted", "random_labels", "regression")
#: the problem our revival's period was tuned on: random labels on Gaussian 32-d inputs (never reported)
TUNING_PROBLEM = "tuning"


def _images(generator: torch.Generator, n: int, prototypes: Tensor, noise: float) -> tuple[Tensor, Tensor]:
    """``n`` samples: a random prototype (3 per class) plus Gaussian noise; returns flattened images and classes."""
    which = torch.randint(prototypes.shape[0], (n,), generator=generator)
    x = prototypes[which] + noise * torch.randn(n, prototypes.shape[1], generator=generator)
    return x, which // 3


def _prototypes(generator: torch.Generator, classes: int = 10, per_class: int = 3, side: int = 8) -> Tensor:
    """Smooth random fields (white noise blurred by a 3x3 box), each standardized: ``(classes*per_class, side²)``."""
    noise = torch.randn(classes * per_class, 1, side + 2, side + 2, generator=generator)
    smooth = F.avg_pool2d(noise, 3, stride=1).reshape(classes * per_class, side * side)
    return (smooth - smooth.mean(1, keepdim=True)) / smooth.std(1, keepdim=True)


@dataclass
class Problem:
    """One continual problem: a stream of training batches per task and an evaluation set per task.

    ``kind`` is ``"classification"`` (cross-entropy; metric: accuracy, higher is better) or ``"regression"``
    (squared error; metric: online MSE over the task, lower is better).
    """

    name: str
    kind: str
    input_shape: tuple[int, ...]
    outputs: int
    tasks: int
    steps_per_task: int
    batch_size: int

    def start_task(self, task: int) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def batch(self) -> tuple[Tensor, Tensor]:  # pragma: no cover - overridden
        raise NotImplementedError

    def eval_set(self) -> tuple[Tensor, Tensor]:  # pragma: no cover - overridden
        """Held-out inputs and targets of the current task (the pool itself for ``random_labels``)."""
        raise NotImplementedError

    def sample(self, n: int) -> Tensor:  # pragma: no cover - overridden
        """``n`` fresh inputs from the current task's training distribution (for the remedies' scoring batch)."""
        raise NotImplementedError

    def initial_inputs(self, n: int) -> Tensor:
        """Inputs of task 0, before training, for the initializers that look at data (sign flip)."""
        self.start_task(0)
        return self.sample(n)


class _ImageProblem(Problem):
    def __init__(self, name: str, seed: int, tasks: int, steps_per_task: int, batch_size: int, pool: int, test: int,
                 noise: float, image: bool, gaussian: int = 0) -> None:
        features = gaussian or 64
        shape = (1, 8, 8) if image else (features,)
        super().__init__(name, "classification", shape, 10, tasks, steps_per_task, batch_size)
        self.generator = torch.Generator().manual_seed(seed)
        if gaussian:  # the tuning problem: i.i.d. Gaussian inputs, no image structure
            self.x, self.y = torch.randn(pool, gaussian, generator=self.generator), torch.zeros(pool, dtype=torch.long)
            self.test_x, self.test_y = self.x[:0], self.y[:0]
        else:
            self.prototypes = _prototypes(self.generator)
            self.x, self.y = _images(self.generator, pool, self.prototypes, noise)
            self.test_x, self.test_y = _images(self.generator, test, self.prototypes, noise)
        self.perm = torch.arange(features)
        self.labels = self.y

    def _shape(self, x: Tensor) -> Tensor:
        return x[:, self.perm].reshape(x.shape[0], *self.input_shape)

    def batch(self) -> tuple[Tensor, Tensor]:
        index = torch.randint(self.x.shape[0], (self.batch_size,), generator=self.generator)
        return self._shape(self.x[index]), self.labels[index]

    def sample(self, n: int) -> Tensor:
        index = torch.randint(self.x.shape[0], (n,), generator=self.generator)
        return self._shape(self.x[index])


class PermutedInputs(_ImageProblem):
    def start_task(self, task: int) -> None:
        task_generator = torch.Generator().manual_seed(int(self.generator.initial_seed()) * 1009 + task)
        n = self.perm.numel()
        self.perm = torch.arange(n) if task == 0 else torch.randperm(n, generator=task_generator)

    def eval_set(self) -> tuple[Tensor, Tensor]:
        return self._shape(self.test_x), self.test_y


class RandomLabels(_ImageProblem):
    def start_task(self, task: int) -> None:
        task_generator = torch.Generator().manual_seed(int(self.generator.initial_seed()) * 1013 + task)
        self.labels = torch.randint(10, (self.x.shape[0],), generator=task_generator)

    def eval_set(self) -> tuple[Tensor, Tensor]:
        return self._shape(self.x), self.labels


class SlowlyChangingRegression(Problem):
    """Dohare et al.'s Slowly-Changing Regression (see the module docstring); inputs are ``m + 1`` bits in {0, 1}."""

    def __init__(self, seed: int, tasks: int, steps_per_task: int, batch_size: int = 1, m: int = 20, f: int = 15,
                 hidden: int = 100, beta: float = 0.7, test: int = 500) -> None:
        if not 0 < f <= m:
            raise ValueError(f"`f` must be in (0, m], got f={f}, m={m}")
        super().__init__("regression", "regression", (m + 1,), 1, tasks, steps_per_task, batch_size)
        self.generator = torch.Generator().manual_seed(seed)
        self.m, self.f, self.test = m, f, test
        self.w = torch.randint(0, 2, (hidden, m + 1), generator=self.generator).float() * 2 - 1
        negatives = (self.w < 0).sum(1).float()
        self.theta = (m + 1) * beta - negatives
        self.v = torch.randint(0, 2, (hidden,), generator=self.generator).float() * 2 - 1
        self.flipping = torch.randint(0, 2, (f,), generator=self.generator).float()

    def target(self, x: Tensor) -> Tensor:
        ltu = (x @ self.w.T > self.theta).float()
        return (ltu @ self.v).unsqueeze(1)

    def start_task(self, task: int) -> None:
        if task > 0:  # one flipping bit, chosen at random, flips at the start of every period
            bit = int(torch.randint(self.f, (1,), generator=self.generator))
            self.flipping[bit] = 1.0 - self.flipping[bit]

    def sample(self, n: int) -> Tensor:
        free = torch.randint(0, 2, (n, self.m - self.f), generator=self.generator).float()
        return torch.cat([self.flipping.expand(n, self.f), free, torch.ones(n, 1)], dim=1)

    def batch(self) -> tuple[Tensor, Tensor]:
        x = self.sample(self.batch_size)
        return x, self.target(x)

    def eval_set(self) -> tuple[Tensor, Tensor]:
        x = self.sample(self.test)
        return x, self.target(x)


def make_problem(name: str, seed: int, tasks: int, steps_per_task: int, image: bool = False, **options: int) -> Problem:
    """Build problem ``name`` for ``seed``; ``image`` gives ``(1, 8, 8)`` inputs (for the CNN)."""
    if name == "permuted":
        return PermutedInputs(name, seed, tasks, steps_per_task, options.get("batch_size", 16),
                              options.get("pool", 2000), options.get("test", 500), 1.5, image)
    if name == "random_labels":
        return RandomLabels(name, seed, tasks, steps_per_task, options.get("batch_size", 16),
                            options.get("pool", 512), 0, 1.5, image)
    if name == TUNING_PROBLEM:
        if image:
            raise ValueError("`image` inputs do not exist for the tuning problem")
        return RandomLabels(name, seed, tasks, steps_per_task, options.get("batch_size", 16),
                            options.get("pool", 256), 0, 0.0, False, gaussian=32)
    if name == "regression":
        if image:
            raise ValueError("`image` inputs do not exist for the regression problem")
        return SlowlyChangingRegression(seed, tasks, steps_per_task, options.get("batch_size", 1))
    raise ValueError(f"`problem` can be {', '.join(map(repr, PROBLEMS))}, got {name!r}")
