"""Structure of a model's rectifier sites, observed on one real forward (see :func:`observe`)."""

from lightning_relu.structure.observation import (
    Consumer,
    Norm,
    ObservationError,
    ParamRef,
    Producer,
    SiteStructure,
    Structure,
    call_model,
    observe,
    preserved_state,
)

__all__ = [
    "Consumer",
    "Norm",
    "ObservationError",
    "ParamRef",
    "Producer",
    "SiteStructure",
    "Structure",
    "call_model",
    "observe",
    "preserved_state",
]
