"""When the callbacks' state belongs to the fit that is starting."""

from __future__ import annotations

import lightning.pytorch as pl


def starts_afresh(trainer: pl.Trainer) -> bool:
    """Whether the fit being set up starts from step 0: not a later ``fit`` of the same Trainer.

    Asked in ``setup``, which Lightning calls before it restores a checkpoint's callback state: a callback that clears
    what an earlier fit left (of this model or another) gets the checkpoint's state back when the fit resumes.
    """
    return trainer.global_step == 0
