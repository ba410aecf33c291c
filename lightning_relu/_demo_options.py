"""The demo's options, shared by the command line (:mod:`lightning_relu.demo`) and the training
(:mod:`lightning_relu._demo`) without either importing the other at run time: nothing here imports torch."""

from __future__ import annotations

import os

__all__ = ["DEFAULT_OUT", "VARIANTS"]

#: The variants trained by the demo, in order, with a one-line description each.
VARIANTS: dict[str, str] = {
    "he": "He initialization (N(0, 2/fan_in) weights, zero biases), nothing else: the baseline",
    "rai": 'randomized asymmetric initialization (Lu et al. 2020): ReluInitializer("rai")',
    "sign_flip": 'He, then data-dependent sign flipping (Rister & Rubin): ReluInitializer("sign_flip")',
    "he_revival": "He, and dead units revived after every epoch: DeadUnitMonitor(revive=True)",
}

DEFAULT_OUT = os.path.join("lightning_logs", "demo")
