"""Structure of a model's rectifier sites, observed on one real forward (see :func:`observe`)."""

from lightning_relu.structure.observation import (
    AxisWatch,
    Consumer,
    ModuleCall,
    Norm,
    ObservationError,
    ParamRef,
    Producer,
    RootCallWatch,
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
    "ModuleCall",
    "Norm",
    "ObservationError",
    "ParamRef",
    "Producer",
    "RootCallWatch",
    "SiteStructure",
    "Structure",
    "call_model",
    "example_from_batch",
    "observe",
    "preserved_state",
]
