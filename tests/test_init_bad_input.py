"""``sign_flip_`` on bad data: empty or misshapen data names what was expected; a failure after a flip leaves the model
unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_relu import (
    sign_flip_,
)
from tests.helpers import (
    assert_same_params,
    params_of,
)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (torch.empty(0, 4), r"`data` holds no samples: expected a tensor of shape \(num_samples, \.\.\.\)"),
        ([], r"`data` holds no samples"),
        (DataLoader(TensorDataset(torch.empty(0, 4)), batch_size=2), r"`data` holds no samples"),
        (torch.tensor(1.0), r"`data` must hold samples along a first dimension"),
        (torch.randn(6, 5), r"`data` of shape \(6, 5\) \(expected samples of shape \(\.\.\., 4\)\)"),
        ([torch.randn(3, 4), torch.randn(3, 5)], r"expected \(\*, 4\), got \(3, 5\)"),
        ([("x",)], r"`data` batches must be tensors"),
        ([()], r"`data` holds an empty batch"),
        (
            [{"input": torch.randn(3, 4)}, {"input": torch.randn(3, 5)}],
            r"key 'input' has samples of shapes \[\(4,\), \(5,\)\]",
        ),
    ],
    ids=[
        "empty-tensor",
        "empty-list",
        "empty-loader",
        "scalar",
        "wrong-width",
        "mixed-shapes",
        "non-tensor",
        "empty-batch",
        "dict-batches-of-different-shapes",
    ],
)
def test_sign_flip_with_empty_or_misshapen_data_names_what_was_expected(data, match):
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 1))
    before = params_of(model)
    with pytest.raises(ValueError, match=match):
        sign_flip_(model, data)
    assert_same_params(before, model)
    assert model.training  # mode restored


def test_sign_flip_failing_after_a_flip_leaves_the_model_unchanged():
    """The first site is flipped, then the forward fails: the flip is undone."""

    class FailsLate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU())
            with torch.no_grad():
                self.body[0].weight.fill_(-1.0)
                self.body[0].bias.fill_(-1.0)  # kills every positive sample: the site must flip

        def forward(self, x):
            return self.body(x).view(7, -1)  # fails after the sites ran

    model = FailsLate()
    before = params_of(model)
    with pytest.raises(ValueError, match="could not run the model"):
        sign_flip_(model, torch.rand(4, 3) + 0.1)
    assert_same_params(before, model)
