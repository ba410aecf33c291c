"""Site discovery on real model code: functional rectifiers (with their producers and consumers, named after the
submodule that calls them)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_relu import (
    find_relu_sites,
)
from tests.helpers import (
    FUNCTIONAL_SITES,
    AllFunctional,
)


def test_functional_forms_are_found_with_producers_and_consumers():
    model = AllFunctional()
    sites = find_relu_sites(model, example_input=torch.randn(3, 4))
    assert [s.name for s in sites] == list(FUNCTIONAL_SITES)
    for site in sites:
        producer, consumer, width = FUNCTIONAL_SITES[site.name]
        assert site.kind == "function" and site.module is None
        assert site.parent is model and site.parent_name == ""
        assert site.producer is getattr(model, producer) and site.producer_name == producer
        assert [c.module for c in site.consumers] == [getattr(model, consumer)]
        assert site.num_units == width and site.unit_dim == -1


def test_functional_forms_in_a_submodule_are_named_after_it():
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = AllFunctional()

        def forward(self, x: Tensor) -> Tensor:
            return self.enc(x)

    names = [s.name for s in find_relu_sites(Holder(), example_input=torch.randn(3, 4))]
    assert names == [f"enc.{n}" for n in FUNCTIONAL_SITES]
