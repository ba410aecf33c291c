"""When the callbacks' state belongs to the fit that is starting."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

import lightning.pytorch as pl

T = TypeVar("T")


def starts_afresh(trainer: pl.Trainer) -> bool:
    """Whether the fit being set up starts from step 0: not a later ``fit`` of the same Trainer.

    Asked in ``setup``, which Lightning calls before it restores a checkpoint's callback state: a callback that clears
    what an earlier fit left (of this model or another) gets the checkpoint's state back when the fit resumes.
    """
    return trainer.global_step == 0


def restored_outside_fit(callback: object) -> bool:
    """Whether ``callback.load_state_dict`` runs for ``validate``/``test``/``predict`` with ``ckpt_path=`` (Lightning
    restores the callbacks' state for them too), as the stage it was last set up for (its ``_stage``, set in
    ``setup``) says: nothing of a fit is to be taken from that state."""
    return getattr(callback, "_stage", None) not in (None, "fit")


def continued_history(history: list[T], last: list[T], place: Callable[[T], Hashable]) -> list[T]:
    """The history after a checkpoint whose latest entry is ``last`` (at most one) was restored within the fit (as
    Lightning's learning-rate and batch-size finders do at a later epoch's start; a resumed fit starts from ``last``
    alone): ``last`` alone, or, when the history in memory holds an entry at the same epoch and step, the entries
    before it and ``last``."""
    if last:
        at = place(last[0])
        for index, entry in enumerate(history):
            if place(entry) == at:
                return [*history[:index], last[0]]
    return last
