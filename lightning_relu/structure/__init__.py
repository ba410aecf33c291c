"""Structure of a model's rectifier sites, observed on one real forward (see :func:`observe`)."""

from lightning_relu.structure.observation import (
    AxisWatch,
    Consumer,
    Norm,
    ObservationError,
    ParamRef,
    Producer,
    SiteStructure,
    Structure,
    call_model,
    example_from_batch,
    observe,
    preserved_state,
)

__all__ = [
    "AxisWatch",
    "Consumer",
    "Norm",
    "ObservationError",
    "ParamRef",
    "Producer",
    "SiteStructure",
    "Structure",
    "call_model",
    "example_from_batch",
    "observe",
    "preserved_state",
]
