"""A loss-of-plasticity benchmark: does reviving dead ReLU units keep a network learning, against ReDo and
continual backprop, and RAI / sign-flip initializations?

    python -m benchmarks.plasticity [--quick] [--out DIR] [--docs] [--processes N] [--tune]

Problems (:mod:`benchmarks.plasticity.problems`, all generated from a seed), networks
(:mod:`benchmarks.plasticity.models`), remedies (:mod:`benchmarks.plasticity.methods`), measurements
(:mod:`benchmarks.plasticity.metrics`); the results, tables and plots are described in ``docs/plasticity.md``.
"""

from benchmarks.plasticity.runner import FULL, QUICK, Config, Setting, run_grid, run_one

__all__ = ["FULL", "QUICK", "Config", "Setting", "run_grid", "run_one"]
