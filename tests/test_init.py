"""Tests of rai_ and sign_flip_ against closed forms and brute-force re-runs."""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_relu.init as init_module
from lightning_relu.init import RAI_SIGMA_SCALE, SignFlipReport, rai_, sign_flip_
from lightning_relu.sites import find_relu_sites

# --------------------------------------------------------------------------------------------------------------------
# rai_
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module", params=["host decisions", "device decisions"])
def decision_path(request):
    """Every test runs with the CPU's host-integer decisions and with the device path CUDA tensors take."""
    previous = init_module._HOST_DECISIONS
    init_module._HOST_DECISIONS = request.param != "device decisions"
    yield request.param
    init_module._HOST_DECISIONS = previous


def _rows(layer: nn.Module) -> Tensor:
    """[w_j; b_j] per unit, as RAI sees them."""
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    if layer.bias is None:
        return w
    return torch.cat([w, layer.bias.detach()[:, None]], dim=1)


def test_rai_in_place_returns_argument() -> None:
    layer = nn.Linear(3, 4)
    weight, bias = layer.weight, layer.bias
    assert rai_(layer) is layer
    assert layer.weight is weight and layer.bias is bias
    assert layer.weight.requires_grad and layer.weight.grad is None


def test_rai_replaced_position_uniform_bias_included() -> None:
    # fan_in 99: sigma = 0.06, a Gaussian entry above 0.45 (7.4 sigma) has probability ~1e-13, so the entries above
    # the threshold are exactly the Beta(2, 1) draws that are above it: P(B > t) = 1 - t^2
    torch.manual_seed(0)
    units, fan_in, t = 20_000, 99, 0.45
    rows = _rows(rai_(nn.Linear(fan_in, units)))
    large = rows > t
    per_row = large.sum(dim=1)
    assert int(per_row.max()) <= 1  # one replaced entry per unit
    p_large = 1 - t**2
    total = int(per_row.sum())
    assert abs(total - units * p_large) < 5 * math.sqrt(units * p_large * (1 - p_large))
    # uniform over the fan_in + 1 positions: the bias gets its 1 / (fan_in + 1) share, chi-square over positions
    counts = large.sum(dim=0).double()
    expected = total / (fan_in + 1)
    assert abs(float(counts[-1]) - expected) < 5 * math.sqrt(expected)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < fan_in + 6 * math.sqrt(2 * fan_in)
    # E[B | B > t] for the density 2x: (2/3)(1 - t^3) / (1 - t^2); not rescaled by sigma
    assert float(rows[large].mean()) == pytest.approx((2 / 3) * (1 - t**3) / (1 - t**2), abs=0.01)


def test_rai_symmetric_part_std_and_beta_mean() -> None:
    torch.manual_seed(1)
    units, fan_in = 20_000, 49
    rows = _rows(rai_(nn.Linear(fan_in, units)))
    sigma = RAI_SIGMA_SCALE / math.sqrt(fan_in)
    # the replaced entry is positive: negative entries are half-normal with second moment sigma^2
    negative = rows[rows < 0]
    assert float(negative.pow(2).mean().sqrt()) == pytest.approx(sigma, rel=0.02)
    # a row sums fan_in centred Gaussians and one Beta(2, 1): mean 2/3, variance fan_in sigma^2 + 1/18
    sums = rows.sum(dim=1)
    se = math.sqrt((fan_in * sigma**2 + 1 / 18) / units)
    assert float(sums.mean()) == pytest.approx(2 / 3, abs=5 * se)
    assert float(sums.var()) == pytest.approx(fan_in * sigma**2 + 1 / 18, rel=0.05)


def test_rai_conv_fan_in_with_groups() -> None:
    torch.manual_seed(2)
    conv = rai_(nn.Conv2d(8, 2000, kernel_size=3, groups=4))
    fan_in = 8 // 4 * 3 * 3
    rows = _rows(conv)
    assert rows.shape == (2000, fan_in + 1)
    sigma = RAI_SIGMA_SCALE / math.sqrt(fan_in)  # twice the value a fan-in of 72 (no groups) would give
    assert float(rows[rows < 0].pow(2).mean().sqrt()) == pytest.approx(sigma, rel=0.03)
    # the bias is the replaced entry 1/19 of the time: E[b] = (2/3) / 19
    assert float(conv.bias.detach().mean()) == pytest.approx((2 / 3) / (fan_in + 1), abs=0.02)
    assert float(rows.sum(dim=1).mean()) == pytest.approx(2 / 3, abs=0.07)


@pytest.mark.parametrize("layer_type", ["linear", "conv1d"])
def test_rai_bias_free_layer_chooses_among_weights(layer_type: str) -> None:
    torch.manual_seed(3)
    layer = nn.Linear(9, 20_000, bias=False) if layer_type == "linear" else nn.Conv1d(3, 20_000, 3, bias=False)
    rai_(layer)
    assert layer.bias is None
    rows = _rows(layer)
    # the Beta draw lands among the 9 weights: each entry has mean (2/3) / 9, not (2/3) / 10
    assert float(rows.mean()) == pytest.approx((2 / 3) / 9, abs=0.0035)
    assert float(rows.sum(dim=1).mean()) == pytest.approx(2 / 3, abs=0.03)


def test_rai_generator_reproducible_and_global_rng_untouched() -> None:
    a, b, c = nn.Linear(5, 7), nn.Linear(5, 7), nn.Linear(5, 7)
    state = torch.get_rng_state()
    rai_(a, generator=torch.Generator().manual_seed(123))
    rai_(b, generator=torch.Generator().manual_seed(123))
    rai_(c, generator=torch.Generator().manual_seed(124))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)


def test_rai_float64_layer() -> None:
    layer = nn.Linear(4, 6).double()
    rai_(layer, generator=torch.Generator().manual_seed(0))
    assert layer.weight.dtype == torch.float64 and torch.isfinite(layer.weight).all()


def test_rai_model_applies_to_producers_only() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2)
    )
    reference = copy.deepcopy(model)
    rai_(model, generator=torch.Generator().manual_seed(7))
    # the same draws, layer by layer in site order
    generator = torch.Generator().manual_seed(7)
    rai_(reference[0], generator=generator)
    rai_(reference[2], generator=generator)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert model[2].bias is None
    # output layer and norm untouched
    untouched = copy.deepcopy(model)
    rai_(model, generator=torch.Generator().manual_seed(8))
    assert torch.equal(model[5].weight, untouched[5].weight) and torch.equal(model[5].bias, untouched[5].bias)
    assert torch.equal(model[3].weight, untouched[3].weight)
    assert not torch.equal(model[0].weight, untouched[0].weight)


class _Negated(nn.Module):
    """``relu(3 * fc1(x))`` then ``relu(g * fc2(h))`` with a per-unit ``g`` of both signs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 1)
        self.register_buffer("g", torch.tensor([-2.0, 1.0, -0.5, 3.0, 1.0, -1.0, 2.0, -4.0]))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.relu(self.g * self.fc2(F.relu(3 * self.fc1(x)))))


def test_rai_stores_negated_rows_where_the_producer_output_is_negated() -> None:
    torch.manual_seed(0)
    model, x = _Negated(), torch.randn(4, 3)
    rai_(model, generator=torch.Generator().manual_seed(7), example_input=x)
    reference = _Negated()
    generator = torch.Generator().manual_seed(7)
    rai_(reference.fc1, generator=generator)
    rai_(reference.fc2, generator=generator)
    assert torch.equal(model.fc1.weight, reference.fc1.weight) and torch.equal(model.fc1.bias, reference.fc1.bias)
    # so the pre-activation g * fc2(h) is |g| times an RAI draw: its rows carry RAI's positive entry
    sign = torch.sign(model.g)[:, None]
    torch.testing.assert_close(model.fc2.weight, sign * reference.fc2.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.fc2.bias, sign[:, 0] * reference.fc2.bias, rtol=0, atol=0)


def test_rai_model_without_producer_warns() -> None:
    model = nn.Sequential(nn.Linear(3, 3))
    before = model[0].weight.clone()
    with pytest.warns(RuntimeWarning, match="no rectifier site with a known producer"):
        assert rai_(model) is model
    assert torch.equal(model[0].weight, before)


def test_rai_zero_element_is_warned_noop() -> None:
    layer = nn.Linear(0, 4)
    bias = layer.bias.clone()
    with pytest.warns(UserWarning, match="zero-element"):
        rai_(layer)
    assert torch.equal(layer.bias, bias)


def test_rai_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"`module` must be a Linear or a .*ConvTranspose2d"):
        rai_(nn.ConvTranspose2d(2, 2, 3))
    with pytest.raises(ValueError, match=r"`module` must be a `torch\.nn\.Module`, got str"):
        rai_("layer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`generator` must be a `torch\.Generator` or None, got 3"):
        rai_(nn.Linear(2, 2), generator=3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------------
# sign_flip_: brute-force helpers
# --------------------------------------------------------------------------------------------------------------------


def _mlp(width: int, depth: int, in_features: int = 3, **kwargs: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(in_features if i == 0 else width, width, **kwargs), nn.ReLU()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def _brute_force_alive(model: nn.Sequential, x: Tensor) -> list[tuple[int, int, int]]:
    """(alive before, alive after, not killed by this site alone) per rectifier, running the layers one by one."""
    alive = torch.ones(x.shape[0], dtype=torch.bool)
    out = []
    h = x
    with torch.no_grad():
        for layer in model:
            h = layer(h)
            if isinstance(layer, nn.ReLU):
                here = h.reshape(h.shape[0], -1).ne(0).any(dim=1)
                before = int(alive.sum())
                alive = alive & here
                out.append((before, int(alive.sum()), int(here.sum())))
    return out


@settings(max_examples=25, deadline=None)
@given(
    width=st.integers(min_value=1, max_value=4),
    depth=st.integers(min_value=1, max_value=24),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_sign_flip_keeps_half_of_living_data_at_every_site(width: int, depth: int, seed: int) -> None:
    torch.manual_seed(seed)
    model = _mlp(width, depth)
    x = torch.randn(200, 3)
    report = sign_flip_(model, x)
    brute = _brute_force_alive(model, x)
    assert list(report) == [str(2 * i + 1) for i in range(depth)]
    for (before, after, here), r in zip(brute, report.values(), strict=True):
        assert 2 * after >= before  # at least half of the living samples survive
        assert r.living_before == before / 200
        assert r.living_after == after / 200
        assert r.site_fraction == here / 200
        assert r.num_samples == 200
    assert brute[-1][1] / 200 >= 2.0**-depth


def test_sign_flip_changes_only_signs_of_whole_layers() -> None:
    torch.manual_seed(5)
    flipped_any = False
    for _ in range(5):
        model = _mlp(2, 16)
        before = copy.deepcopy(model)
        report = sign_flip_(model, torch.randn(256, 3))
        targets = {r.target for r in report.values() if r.flipped}
        flipped_any |= bool(targets)
        for name, layer in model.named_children():
            if not isinstance(layer, nn.Linear):
                continue
            old = before.get_submodule(name)
            sign = -1 if name in targets else 1
            assert torch.equal(layer.weight, sign * old.weight)
            assert torch.equal(layer.bias, sign * old.bias)
    assert flipped_any  # 2 units, 16 layers: flips are certain in practice


def test_sign_flip_flipped_site_kills_fewer_than_unflipped() -> None:
    torch.manual_seed(6)
    model = _mlp(2, 12)
    original = copy.deepcopy(model)
    x = torch.randn(300, 3)
    report = sign_flip_(model, x)
    for name, r in report.items():
        if r.flipped:
            assert r.target == str(int(name) - 1)
            assert r.reason.startswith("more than half")
        else:
            assert r.target == str(int(name) - 1)
    # the first site sees the data itself: compare with the original network's decision there
    first = original[0](x)
    killed = int((first <= 0).all(dim=1).sum())
    assert report["1"].flipped == (2 * killed > 300)


@pytest.mark.parametrize("how", ["neg", "times -2", "per-unit sign"])
def test_sign_flip_reads_a_negated_pre_activation_with_its_sign(how: str) -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.out = nn.Linear(3, 6), nn.Linear(6, 1)
            self.register_buffer("g", torch.tensor([-1.0, -2.0, -0.5, -1.0, -3.0, -1.0]))

        def pre(self, x: Tensor) -> Tensor:
            h = self.fc(x)
            return -h if how == "neg" else h * -2.0 if how == "times -2" else h * self.g

        def forward(self, x: Tensor) -> Tensor:
            return self.out(F.relu(self.pre(x)))

    torch.manual_seed(0)
    model, x = Scaled(), torch.randn(200, 3)
    with torch.no_grad():
        model.fc.weight.mul_(0.1)
        model.fc.bias.fill_(2.0)  # the pre-activation is about -2 times a positive factor: every sample is killed
        killed_before = int((model.pre(x) <= 0).all(dim=1).sum())
    assert killed_before == 200
    report = sign_flip_(model, x)["relu"]
    with torch.no_grad():
        killed_after = int((model.pre(x) <= 0).all(dim=1).sum())
    assert report.flipped and report.target == "fc"
    assert killed_after == 0 and report.site_fraction == 1.0  # what the report says is what the model now does


def test_sign_flip_single_forward_pass_over_all_batches() -> None:
    torch.manual_seed(7)
    model = _mlp(3, 10)
    calls: list[int] = []
    model[0].register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    loader = DataLoader(TensorDataset(torch.randn(100, 3), torch.zeros(100)), batch_size=16)
    report = sign_flip_(model, loader, max_samples=70)
    assert calls == [8, 70]  # the structure observed on 8 samples, then one pass over all 70
    assert all(r.num_samples == 70 for r in report.values())


def test_sign_flip_data_forms_agree() -> None:
    x = torch.randn(90, 3)
    torch.manual_seed(8)
    model = _mlp(2, 8)
    results = []
    for data, kwargs in [
        (x, {}),
        ([x[:30], x[30:60], x[60:]], {}),
        ([(x[:45], None), (x[45:], None)], {}),
        (DataLoader(TensorDataset(x, torch.zeros(90)), batch_size=20), {}),
        ([{"inputs": x}], {"input_fn": lambda batch: batch["inputs"]}),
    ]:
        m = copy.deepcopy(model)
        results.append((sign_flip_(m, data, **kwargs), m))
    first_report, first_model = results[0]
    for report, m in results[1:]:
        assert {k: v.flipped for k, v in report.items()} == {k: v.flipped for k, v in first_report.items()}
        for p, q in zip(m.parameters(), first_model.parameters(), strict=True):
            assert torch.equal(p, q)


def test_sign_flip_leaves_no_other_trace() -> None:
    torch.manual_seed(9)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(4, 2, 3, padding=1),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.Conv2d(2, 2, 3, padding=1),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 6 * 6, 1),
    )
    with torch.no_grad():
        for bn in (model[1], model[5], model[8]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.num_batches_tracked.fill_(11)
            bn.bias.uniform_(-5, -4)  # every sample dies: flips are certain
    model.train()
    model[5].eval()
    modes = [m.training for m in model.modules()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    before = copy.deepcopy(model)
    loader = DataLoader(TensorDataset(torch.randn(64, 3, 6, 6)), batch_size=16, shuffle=True)
    rng = torch.get_rng_state()
    report = sign_flip_(model, loader)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert list(report) == ["2", "6", "9"]
    flipped = [r for r in report.values() if r.flipped]
    assert flipped
    for name, r in report.items():
        norm = model.get_submodule(r.target)
        assert isinstance(norm, nn.BatchNorm2d)  # the norm's affine map is negated, not the conv
        sign = -1 if r.flipped else 1
        old = before.get_submodule(r.target)
        assert torch.equal(norm.weight, sign * old.weight) and torch.equal(norm.bias, sign * old.bias), name
    for i in (0, 4, 7, 11):
        assert torch.equal(model[i].weight, before[i].weight)


def test_sign_flip_leaves_a_loaders_own_generator_as_it_was() -> None:
    """A DataLoader shuffling with its own generator: the training that follows sees the batches it would have."""
    data = TensorDataset(torch.arange(40.0).reshape(20, 2))

    def batches(flip: bool, seeded_sampler: bool) -> list[list[float]]:
        generator = torch.Generator().manual_seed(0)
        if seeded_sampler:  # the generator held by the sampler only
            sampler = torch.utils.data.RandomSampler(data, generator=generator)
            loader = DataLoader(data, batch_size=5, sampler=sampler)
        else:
            loader = DataLoader(data, batch_size=5, shuffle=True, generator=generator)
        if flip:
            sign_flip_(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)), loader, max_samples=5)
        return [batch[0][:, 0].tolist() for epoch in range(2) for batch in loader]

    for seeded_sampler in (False, True):
        assert batches(True, seeded_sampler) == batches(False, seeded_sampler)


def test_sign_flip_conv_bn_matches_batch_statistics_rerun() -> None:
    torch.manual_seed(10)
    layers: list[nn.Module] = []
    for i in range(10):
        layers += [nn.Conv2d(3 if i == 0 else 2, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2), nn.ReLU()]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.normal_(0, 1)
    x = torch.randn(128, 3, 5, 5)
    report = sign_flip_(model, x)
    # brute force: the flipped model in batch-statistics mode (train mode on a copy)
    rerun = copy.deepcopy(model).train()
    for (before, after, here), r in zip(_brute_force_alive(rerun, x), report.values(), strict=True):
        assert 2 * after >= before
        assert (r.living_before, r.living_after, r.site_fraction) == (before / 128, after / 128, here / 128)


def test_sign_flip_norm_without_affine_negates_producer_and_running_mean() -> None:
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2, affine=False), nn.ReLU(), nn.Linear(2, 1))
    x = torch.randn(1000, 3)
    x[:, 0] = torch.empty(1000).exponential_()
    with torch.no_grad():
        # both units see x_0: a sample dies when x_0 is below its mean, 1 - 1/e of an exponential sample
        model[0].weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]]))
        model[0].bias.zero_()
        model[1].running_mean.copy_(torch.tensor([0.3, -0.2]))
        model[1].running_var.copy_(torch.tensor([1.5, 0.7]))
    killed = int((x[:, 0] <= x[:, 0].mean()).sum())
    assert 2 * killed > 1000
    before = copy.deepcopy(model)
    r = sign_flip_(model, x)["2"]
    assert r.flipped and r.target == "0"
    assert r.living_after == (1000 - int((x[:, 0] >= x[:, 0].mean()).sum())) / 1000
    assert torch.equal(model[0].weight, -before[0].weight) and torch.equal(model[0].bias, -before[0].bias)
    # the eval-mode pre-activation is exactly negated: the running mean follows the producer
    assert torch.equal(model[1].running_mean, -before[1].running_mean)
    assert torch.equal(model[1].running_var, before[1].running_var)
    model.eval()
    before.eval()
    assert torch.allclose(model[1](model[0](x)), -before[1](before[0](x)), atol=1e-6)


class _Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
        self.out = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.out(x + self.body(x))


def test_sign_flip_residual_sites_without_producer() -> None:
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), *[_Residual(2) for _ in range(6)])
    x = torch.randn(200, 3)
    report = sign_flip_(model, x)
    assert list(report) == ["1"] + [name for i in range(2, 8) for name in (f"{i}.body.1", f"{i}.out")]
    # brute force: cumulative alive mask over the sites, in forward order
    alive = torch.ones(200, dtype=torch.bool)
    with torch.no_grad():
        h = model[1](model[0](x))
        expected = [(200, int(h.ne(0).any(1).sum()))]
        alive &= h.ne(0).any(1)
        for block in model[2:]:
            inner = block.body[1](block.body[0](h))
            before = int(alive.sum())
            alive &= inner.ne(0).any(1)
            expected.append((before, int(alive.sum())))
            h = block.out(h + block.body[2](inner))
            before = int(alive.sum())
            alive &= h.ne(0).any(1)
            expected.append((before, int(alive.sum())))
    for (before, after), r in zip(expected, report.values(), strict=True):
        assert (r.living_before, r.living_after) == (before / 200, after / 200), r.site
    for i in range(2, 8):
        r = report[f"{i}.out"]
        assert not r.flipped and r.target is None and "no producer" in r.reason
        inner = report[f"{i}.body.1"]
        assert 2 * round(inner.living_after * 200) >= round(inner.living_before * 200)


class _Swapped(nn.Module):
    """Registers its rectifiers in the opposite order of their use."""

    def __init__(self) -> None:
        super().__init__()
        self.second = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        self.first = nn.Sequential(nn.Linear(3, 2), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))


def test_sign_flip_report_in_forward_order() -> None:
    report = sign_flip_(_Swapped(), torch.randn(10, 3))
    assert list(report) == ["first.1", "second.1"]
    assert all(isinstance(r, SignFlipReport) for r in report.values())


def test_sign_flip_inplace_relu_and_relu6() -> None:
    torch.manual_seed(13)
    model = nn.Sequential(*[m for _ in range(10) for m in (nn.Linear(2, 2), nn.ReLU6(inplace=True))])
    model[0] = nn.Linear(3, 2)
    x = torch.randn(150, 3)
    report = sign_flip_(model, x)
    for (before, after, _), r in zip(_brute_force_alive(_as_relu(model), x), report.values(), strict=True):
        assert 2 * after >= before
        assert r.living_after == after / 150


def _as_relu(model: nn.Sequential) -> nn.Sequential:
    # ReLU6 and ReLU kill the same samples; the brute-force helper looks for nn.ReLU
    return nn.Sequential(*[nn.ReLU() if isinstance(m, nn.ReLU6) else m for m in copy.deepcopy(model)])


def test_sign_flip_errors() -> None:
    model = _mlp(2, 3)
    with pytest.raises(ValueError, match="`data` holds no samples"):
        sign_flip_(model, torch.empty(0, 3))
    with pytest.raises(ValueError, match="`data` holds no samples"):
        sign_flip_(model, [])
    with pytest.raises(ValueError, match=r"shape \(10, 5\).*expected samples of shape \(\.\.\., 3\)"):
        sign_flip_(model, torch.randn(10, 5))
    with pytest.raises(ValueError, match="`max_samples` must be a positive integer or None, got 0"):
        sign_flip_(model, torch.randn(10, 3), max_samples=0)
    with pytest.raises(ValueError, match="`input_fn` must be a callable or None, got 'x'"):
        sign_flip_(model, torch.randn(10, 3), input_fn="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`data` must be a tensor, a list/tuple of batches or a DataLoader, got int"):
        sign_flip_(model, 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pass `input_fn`"):
        sign_flip_(model, [{"x": torch.randn(4, 3)}])
    with pytest.raises(ValueError, match=r"share the shape of a sample: expected \(\*, 3\), got \(4, 2\)"):
        sign_flip_(model, [torch.randn(4, 3), torch.randn(4, 2)])
    with pytest.raises(ValueError, match=r"`model` must be a `torch\.nn\.Module`, got str"):
        sign_flip_("model", torch.randn(4, 3))  # type: ignore[arg-type]


def test_sign_flip_failed_pass_restores_parameters() -> None:
    torch.manual_seed(14)

    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp(1, 12)
            self.net[-1] = nn.Linear(5, 1)  # fails after every site has decided

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

    model = Broken()
    with torch.no_grad():
        for layer in model.net:
            if isinstance(layer, nn.Linear) and layer.out_features == 1 and layer.in_features != 5:
                layer.bias.fill_(-5.0)  # kills everything: every site wants to flip
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="could not run the model"):
        sign_flip_(model, torch.randn(20, 3))
    for p, q in zip(model.parameters(), before.parameters(), strict=True):
        assert torch.equal(p, q)


def test_sign_flip_model_without_sites_warns() -> None:
    with pytest.warns(RuntimeWarning, match="no rectifier site"):
        assert sign_flip_(nn.Linear(3, 1), torch.randn(4, 3)) == {}


# --------------------------------------------------------------------------------------------------------------------
# examples/reproduce_lu2020.py
# --------------------------------------------------------------------------------------------------------------------


def _load_example(name: str) -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_reproduce_lu2020_vectorized_networks_match_one_by_one() -> None:
    lu = _load_example("reproduce_lu2020")
    generator = torch.Generator().manual_seed(0)
    x = torch.linspace(-1, 1, 101)
    for init, width in [("he", 2), ("rai", 2), ("he", 3)]:
        layers = lu.init_networks(init, 12, width, 10, generator)
        out, collapsed = lu.forward(layers, x)
        for t in range(12):
            h = x[:, None]
            dead = False
            for weight, bias in layers[:-1]:
                h = torch.relu(h @ weight[t].T + bias[t, :, 0])
                dead |= bool((h == 0).all())
            assert bool(collapsed[t]) == dead
            weight, bias = layers[-1]
            assert torch.allclose(out[t, 0], (h @ weight[t].T + bias[t, :, 0])[:, 0], atol=1e-5)


def test_reproduce_lu2020_quick(capsys: pytest.CaptureFixture[str]) -> None:
    lu = _load_example("reproduce_lu2020")
    results = lu.main(["--quick"])
    printed = capsys.readouterr().out
    assert "| width | He: born dead | RAI: born dead |" in printed
    cfg, born_dead, trained = results["config"], results["born_dead"], results["trained"]
    trials = cfg.born_dead_trials
    for width, rates in born_dead.items():
        # zero biases: the network is a ray on each side of 0, each side survives k layers with probability
        # (1 - 2^-n)^k exactly, and the network is constant when both sides die
        side_alive = (1 - 2.0**-width) ** cfg.depth
        tol = 4 * math.sqrt(0.25 / trials)
        assert 1 - 2 * side_alive - tol <= rates["he"] <= 1 - side_alive + tol
    # Lu et al.: with He about 60% of depth-10 width-3 networks are born dead; RAI lowers it markedly
    assert born_dead[3]["he"] > 0.5
    assert born_dead[3]["rai"] < born_dead[3]["he"] / 2
    assert born_dead[2]["he"] > born_dead[3]["he"] > born_dead[4]["he"]
    he_collapsed, rai_collapsed = trained[3]["he"][0], trained[3]["rai"][0]
    assert rai_collapsed < he_collapsed
    assert he_collapsed >= born_dead[3]["he"] - 4 * math.sqrt(0.25 / cfg.train_trials)  # training revives nothing


class _Reused(nn.Module):
    """One ReLU module applied after every layer."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(3 if i == 0 else width, width) for i in range(depth)])
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = self.act(layer(x))
        return x


def _brute_force_chain(layers: list[nn.Module], x: Tensor) -> list[tuple[int, int]]:
    alive = torch.ones(x.shape[0], dtype=torch.bool)
    out = []
    with torch.no_grad():
        for layer in layers:
            x = torch.relu(layer(x))
            before = int(alive.sum())
            alive &= x.ne(0).any(dim=1)
            out.append((before, int(alive.sum())))
    return out


def test_sign_flip_reused_rectifier_module_is_one_site_per_call() -> None:
    torch.manual_seed(15)
    model = _Reused(2, 12)
    before = copy.deepcopy(model)
    x = torch.randn(200, 3)
    sites = find_relu_sites(model, example_input=x[:8])
    assert len(sites) == 12  # one site per call of the reused module
    report = sign_flip_(model, x)
    assert list(report) == [site.name for site in sites]
    brute = _brute_force_chain(list(model.layers), x)
    for (alive_before, alive_after), r in zip(brute, report.values(), strict=True):
        assert 2 * alive_after >= alive_before
        assert (r.living_before, r.living_after) == (alive_before / 200, alive_after / 200)
    for i, (site, r) in enumerate(zip(sites, report.values(), strict=True)):
        assert r.target == site.producer_name == f"layers.{i}"
        sign = -1 if r.flipped else 1
        assert torch.equal(model.layers[i].weight, sign * before.layers[i].weight)
    assert any(r.flipped for r in report.values())


class _Functional(nn.Module):
    """F.relu calls in forward, and one after a residual sum that nothing can flip."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(3 if i == 0 else width, width) for i in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = F.relu(layer(x))
        return F.relu(x - 1.0)


def test_sign_flip_functional_sites() -> None:
    torch.manual_seed(16)
    model = _Functional(2, 12)
    x = torch.randn(200, 3)
    sites = find_relu_sites(model, example_input=x[:8])
    linked = [site for site in sites if site.module is None and site.producer is not None]
    assert len(linked) == 12 and len(sites) == 13  # the call after the residual sum has no producer
    with pytest.warns(RuntimeWarning, match="cannot watch the functional rectifier calls"):
        report = sign_flip_(model, x)
    assert list(report) == [site.name for site in linked]
    for (alive_before, alive_after), r in zip(_brute_force_chain(list(model.layers), x), report.values(), strict=True):
        assert 2 * alive_after >= alive_before
        assert (r.living_before, r.living_after) == (alive_before / 200, alive_after / 200)
    assert any(r.flipped for r in report.values())


def test_sign_flip_a_nan_sample_is_not_killed() -> None:
    torch.manual_seed(11)
    model = _mlp(3, 6)
    x = torch.randn(50, 3)
    x[0, 0] = float("nan")  # NaN flows through every layer: its outputs are NaN, not zero
    report = sign_flip_(copy.deepcopy(model), x)
    flipped = copy.deepcopy(model)
    sign_flip_(flipped, x)
    brute = _brute_force_alive(flipped, x)  # `ne(0).any()`: a NaN output is not zero
    for (before, after, here), r in zip(brute, report.values(), strict=True):
        assert (r.living_before, r.living_after, r.site_fraction) == (before / 50, after / 50, here / 50)


def test_sign_flip_restores_modes_through_train_overrides() -> None:
    class Frozen(nn.Linear):
        def train(self, mode: bool = True) -> Frozen:
            self.weight.requires_grad_(mode)  # a common way to freeze a block
            return super().train(mode)

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), Frozen(4, 4), nn.ReLU())
    model.train()
    model[2].eval()
    sign_flip_(model, torch.randn(32, 3))
    assert model.training and not model[2].training and not model[2].weight.requires_grad
    assert [m.training for m in model] == [True, True, False, True]


def test_sign_flip_takes_keyword_batches_and_rows_that_merge_batch_and_tokens() -> None:
    class TokenMLP(nn.Module):  # a decoder MLP: (batch, tokens, features) flattened to (batch * tokens, features)
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            h = self.embed(input_ids) * attention_mask[..., None]
            return self.fc2(self.act(self.fc1(h.reshape(-1, h.shape[-1]))))

    torch.manual_seed(0)
    model = TokenMLP()
    with torch.no_grad():
        model.embed.weight.abs_()  # non-negative features ...
        model.fc1.weight.abs_().neg_()  # ... every weight <= 0 ...
        model.fc1.bias.fill_(-0.1)  # ... and a negative bias: most samples die at the site unless flipped
    batches = [{"input_ids": torch.randint(0, 50, (4, 6)), "attention_mask": torch.ones(4, 6)} for _ in range(3)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = sign_flip_(model, batches)
    assert report["act"].num_samples == 12  # the 72 rows grouped back into 12 samples
    assert report["act"].flipped
    for key, value in model.state_dict().items():
        assert torch.equal(value.abs(), before[key].abs()), key
    # brute force: after the flip, each sample keeps some token row alive at the site
    with torch.no_grad():
        ids = torch.cat([b["input_ids"] for b in batches])
        rows = model.act(model.fc1(model.embed(ids).reshape(-1, 8))).reshape(12, -1)
    assert report["act"].living_after == (rows > 0).any(1).double().mean().item()


class _Offset(nn.Module):
    """A constant subtracted between the producer and the rectifier: negating the producer does not negate it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act(self.fc(x) - 3.0))


def test_sign_flip_refuses_a_site_whose_pre_activation_has_a_constant_added() -> None:
    torch.manual_seed(0)
    model, x = _Offset(), torch.randn(256, 4)
    before = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        assert not bool((model.act(model.fc(x) - 3.0) > 0).any())  # every sample killed: a flip would be tried
    report = sign_flip_(model, x)["act"]
    assert not report.flipped and report.target is None and "`sub`" in report.reason
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    with torch.no_grad():  # what the report says is what the model does
        assert report.living_after == float((model.act(model.fc(x) - 3.0) > 0).any(1).float().mean())


class _Gated(nn.Module):
    """A Linear on (batch, 4 positions, 2) and a fixed gate over positions, then a rectifier module or function."""

    def __init__(self, gate: Tensor, functional: bool) -> None:
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)
        self.register_buffer("gate", gate.reshape(4, 1))
        self.functional = functional

    def pre(self, x: Tensor) -> Tensor:
        return self.fc(x) * self.gate

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.pre(x)) if self.functional else self.act(self.pre(x))
        return self.out(h).sum((1, 2))


@pytest.mark.parametrize("gate", [[1.0, 0.0, 0.0, 0.0], [1.0, -0.1, -0.1, -0.1]])
def test_sign_flip_with_a_factor_over_positions(gate: list[float]) -> None:
    """The pre-activation is the layer's output times a gate over positions: a module site is read directly and
    flipped when every sample is killed; a functional site, read from the layer's output, was decided on that
    output (kept, reported alive while every sample was killed): it is now left out, with a warning."""
    x = torch.rand(100, 4, 2) + 0.1
    x[:, 1:] *= -1  # with the weights below the layer's output is < 0 at position 0 and > 0 after it
    for functional in (False, True):
        model = _Gated(torch.tensor(gate), functional)
        with torch.no_grad():
            model.fc.weight.copy_(torch.tensor([[-1.0, 0.0]] * 3))
            model.fc.bias.zero_()
            assert bool((model.pre(x) <= 0).flatten(1).all(1).all())  # every sample killed, by hand
        if functional:
            with pytest.warns(RuntimeWarning, match="cannot watch the functional rectifier calls \\['relu'\\]"):
                assert sign_flip_(model, x) == {}
            assert torch.equal(model.fc.weight, torch.tensor([[-1.0, 0.0]] * 3))
        else:
            report = sign_flip_(model, x)["act"]
            with torch.no_grad():
                killed_after = int((model.pre(x) <= 0).flatten(1).all(1).sum())
            assert report.flipped and killed_after == 0 and report.living_after == 1.0
