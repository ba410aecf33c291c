"""Compaction (`compact`): the compacted model's output equals the original's (the ground truth is the original
model itself), the parameter count is the closed form of the narrower layers, what cannot be removed is said, the
certified mode agrees with brute force over the box, and the compacted model exports."""

from __future__ import annotations

import itertools
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_relu import DeadUnitTracker
from lightning_relu.compaction import Compaction, compact

RTOL = 1e-5


def _report(model: nn.Module, x: Tensor) -> dict:
    with DeadUnitTracker(model) as tracker, torch.no_grad():
        model(x)
    return tracker.report()


def _kill(*entries: tuple[Tensor, list[int]]) -> None:
    with torch.no_grad():
        for tensor, units in entries:
            tensor[units] = -100.0


def _eval(model: nn.Module, x: Tensor) -> Tensor:
    training = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(training)
    return out


def _close(after: Tensor, before: Tensor) -> bool:
    scale = float(before.abs().max())
    return after.shape == before.shape and float((after - before).abs().max()) <= RTOL * max(scale, 1e-30)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}


def _compacted(model: nn.Module, x: Tensor, **kwargs) -> tuple[Compaction, Tensor, dict]:
    """Measure a report on ``x`` (train mode), compact, and check the original is untouched."""
    report = _report(model, x)
    before = _eval(model, x)
    state = _snapshot(model)
    result = compact(model, report, x, **kwargs)
    after = _snapshot(model)
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state), "input changed"
    assert _close(_eval(model, x), before)
    return result, before, report


# ------------------------------------------------------------------------------------------------ nets
class CNN(nn.Module):
    """conv → BN → ReLU → conv → BN → ReLU → max pool → flatten → Linear → ReLU → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.r1 = nn.ReLU()
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.b2 = nn.BatchNorm2d(6)
        self.r2 = nn.ReLU()
        self.fc = nn.Linear(6 * 4 * 4, 5)
        self.r3 = nn.ReLU()
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.r2(self.b2(self.c2(self.r1(self.b1(self.c1(x))))))
        return self.head(self.r3(self.fc(F.max_pool2d(h, 2).flatten(1))))


class Branches(nn.Module):
    """Two conv → BN → ReLU branches joined by ``cat``, read by a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(3, 5, 1)
        self.bn_b = nn.BatchNorm2d(5)
        self.mix = nn.Conv2d(9, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.cat([F.relu(self.bn_a(self.a(x))), F.relu(self.bn_b(self.b(x)))], 1)
        return self.fc(F.adaptive_avg_pool2d(self.mix(h), 1).flatten(1))


class Grouped(nn.Module):
    """Pointwise conv → BN → ReLU6 → grouped (depthwise when ``groups == 8``) conv → BN → ReLU6 → 1x1 conv."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.pw = nn.Conv2d(3, 8, 1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.r1 = nn.ReLU6()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.r2 = nn.ReLU6()
        self.proj = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.r2(self.b2(self.dw(self.r1(self.b1(self.pw(x))))))
        return self.fc(self.proj(h).mean((2, 3)))


class Residual(nn.Module):
    """A residual block: the first site's output is also added to the second's pre-activation."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.r1 = nn.ReLU()
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.r2 = nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.r1(self.c1(x))
        return self.fc(self.r2(self.c2(h) + h).mean((2, 3)))


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 1))


# ------------------------------------------------------------------------------------------------ exactness
def test_mlp_output_kept_and_params_closed_form() -> None:
    net = _mlp()
    _kill((net[0].bias, [0, 3, 7]), (net[2].bias, [1]))
    x = torch.randn(64, 4)
    result, before, report = _compacted(net, x)
    d1, d2 = int(report["1"].num_dead), int(report["3"].num_dead)
    assert (d1, d2) == (3, 1)
    assert {n: s.removed for n, s in result.sites.items()} == {"1": d1, "3": d2}
    assert all(s.reason is None for s in result.sites.values())
    assert _close(_eval(result.model, x), before)
    w1, w2 = 8 - d1, 6 - d2
    assert _params(result.model) == (4 + 1) * w1 + (w1 + 1) * w2 + (w2 + 1) * 1
    assert result.model[0].out_features == w1 and result.model[2].in_features == w1
    assert result.model.training  # the mode of the input model


def test_cnn_with_batchnorm_and_flatten_into_linear() -> None:
    torch.manual_seed(0)
    net = CNN()
    _kill((net.b1.bias, [1, 5]), (net.b2.bias, [0]), (net.fc.bias, [2]))
    x = torch.randn(8, 3, 8, 8)
    result, before, report = _compacted(net, x)
    removed = {name: site.removed for name, site in result.sites.items()}
    assert removed["r1"] == 2 and removed["r2"] == 1 and removed["r3"] >= 1
    for name, site in result.sites.items():  # dead in train mode, some alive with the running statistics
        assert site.dead == int(report[name].num_dead)
        assert site.removed == site.dead or "active on the example input in evaluation mode" in (site.reason or "")
    assert _close(_eval(result.model, x), before)
    a, b, c = 8 - removed["r1"], 6 - removed["r2"], 5 - removed["r3"]
    closed = 27 * a + 2 * a + a * b * 9 + b + 2 * b + b * 16 * c + c + c * 2 + 2
    assert _params(result.model) == closed
    assert result.model.b1.running_mean.shape == (a,) and result.model.b1.num_features == a
    assert result.model.fc.in_features == b * 16


def test_cat_of_two_branches() -> None:
    torch.manual_seed(0)
    net = Branches()
    _kill((net.bn_a.bias, [1]), (net.bn_b.bias, [0, 4]))
    x = torch.randn(8, 3, 8, 8)
    result, before, _ = _compacted(net, x)
    assert [site.removed for site in result.sites.values()] == [1, 2]
    assert result.model.mix.in_channels == 6 and result.model.a.out_channels == 3 and result.model.b.out_channels == 3
    assert _close(_eval(result.model, x), before)
    # the 1x1 conv keeps exactly the columns of the living units, in order
    kept = [0, 2, 3, 4 + 1, 4 + 2, 4 + 3]
    assert torch.equal(result.model.mix.weight, net.mix.weight[:, kept])


def test_depthwise_chain_loses_whole_groups() -> None:
    torch.manual_seed(0)
    net = Grouped(groups=8)
    _kill((net.b1.bias, [1, 2]))  # the depthwise channels 1, 2 then read zeros: dead at the next site too
    x = torch.randn(8, 3, 8, 8)
    result, before, report = _compacted(net, x)
    assert bool(report["r2"].dead[[1, 2]].all())
    assert result.sites["r1"].removed == 2 and result.sites["r2"].removed == 2
    dw = result.model.dw
    assert (dw.groups, dw.in_channels, dw.out_channels) == (6, 6, 6)
    assert _close(_eval(result.model, x), before)
    assert _params(result.model) == 3 * 6 + 2 * 6 + 6 * 9 + 2 * 6 + 6 * 4 + 4 + 4 * 2 + 2


def test_grouped_conv_refuses_a_split_group() -> None:
    torch.manual_seed(0)
    net = Grouped(groups=2)
    _kill((net.b1.bias, [0, 1, 2, 3, 5]))  # group 0 whole, one unit of group 1
    x = torch.randn(8, 3, 8, 8)
    result, before, _ = _compacted(net, x)
    first = result.sites["r1"]
    assert (first.dead, first.removed) == (5, 4)
    assert "grouped convolution `dw` would lose part of a group" in (first.reason or "")
    assert result.model.dw.groups == 1 and result.model.dw.in_channels == 4 and result.model.dw.out_channels == 4
    assert _close(_eval(result.model, x), before)


@pytest.mark.parametrize(("dead", "removed"), [([0, 1, 2, 3], 4), ([0, 1, 2, 3, 5], 4), ([1, 5], 0)])
def test_group_norm_loses_whole_groups_only(dead: list[int], removed: int) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.LazyLinear(2)
    )
    x = torch.randn(4, 3, 6, 6)
    net(x)  # materialize the lazy layer
    with torch.no_grad():
        net[1].bias[dead] = -100.0
    result, before, _ = _compacted(net, x)
    site = result.sites["2"]
    assert (site.dead, site.removed) == (len(dead), removed)
    if removed < len(dead):
        assert "GroupNorm `1` would lose part of a group" in (site.reason or "")
    norm = result.model[1]
    assert (norm.num_channels, norm.num_groups, norm.weight.numel()) == (8 - removed, 2 - removed // 4, 8 - removed)
    assert _close(_eval(result.model, x), before)


def test_residual_refuses_and_says_why() -> None:
    torch.manual_seed(0)
    net = Residual()
    _kill((net.c1.bias, [1]), (net.c2.bias, [2]))
    x = torch.randn(8, 4, 8, 8)
    result, before, report = _compacted(net, x)
    assert sum(int(layer.num_dead) for layer in report.values()) >= 2
    assert result.removed == 0
    assert "`add`" in (result.sites["r1"].reason or "")
    assert "no producer" in (result.sites["r2"].reason or "")
    assert _params(result.model) == _params(net)
    assert _close(_eval(result.model, x), before)


def test_output_check_takes_back_a_site_whose_removal_breaks_the_forward() -> None:
    class Gated(nn.Module):  # the site's output is scaled by a gate of the full width, computed apart
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 6)
            self.gate = nn.Parameter(torch.rand(6) + 0.5)
            self.fc2 = nn.Linear(6, 4)
            self.head = nn.Linear(4, 1)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.relu(self.fc(x)) * self.gate.reshape(1, 6)
            return self.head(torch.relu(self.fc2(h)))

    torch.manual_seed(0)
    net = Gated()
    _kill((net.fc.bias, [2]), (net.fc2.bias, [0]))
    x = torch.randn(32, 3)
    result, before, _ = _compacted(net, x)
    sites = list(result.sites.values())
    assert sites[0].removed == 0 and "forward fail" in (sites[0].reason or "")
    assert sites[1].removed == 1
    assert _close(_eval(result.model, x), before)


def test_unit_alive_in_eval_mode_stays() -> None:
    torch.manual_seed(0)
    net = CNN()
    x = torch.randn(8, 3, 8, 8)
    report = _report(net, x)
    # a forged report: units 0 and 1 of the first site "dead", though they fire
    report["r1"].dead[:2] = True
    result = compact(net, report, x)
    assert result.sites["r1"].removed == 0
    assert "active on the example input" in (result.sites["r1"].reason or "")
    assert _close(_eval(result.model, x), _eval(net, x))


# ------------------------------------------------------------------------------------------------ bad input
def test_report_of_another_model_raises_naming_the_site() -> None:
    net = _mlp()
    x = torch.randn(16, 4)
    state = _snapshot(net)
    other = _report(CNN(), torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="'r1'"):
        compact(net, other, x)
    wrong = _report(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 1)), x)
    with pytest.raises(ValueError, match="site '1' has 5 units but the model's site '1' has 8"):
        compact(net, wrong, x)
    assert all(torch.equal(state[k], v) for k, v in _snapshot(net).items())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"report": {"1": torch.zeros(8)}}, "1-D bool `dead` mask"),
        ({"report": [1, 2]}, "`report` must map site names"),
        ({"report": None}, "`report` is None"),
        ({"rtol": 0.0}, "`rtol` must be a positive number, got 0.0"),
        ({"certify": (1.0,)}, "`certify` must be a pair"),
        ({"certify": (1.0, -1.0)}, "low <= high"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    net = _mlp()
    x = torch.randn(16, 4)
    arguments = {"report": _report(net, x), **kwargs}
    with pytest.raises(ValueError, match=match):
        compact(net, arguments.pop("report"), x, **arguments)


# ------------------------------------------------------------------------------------------------ certified mode
def _box_samples(low: float, high: float, dim: int, n: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    corners = torch.tensor(list(itertools.product([low, high], repeat=dim)))
    return torch.cat([corners, low + (high - low) * torch.rand(n, dim, generator=generator)])


def test_certified_mode_against_brute_force_over_the_box() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 1))
    with torch.no_grad():
        reach = net[0].weight.abs().sum(1)  # max of w·x over [-1, 1]^3
        net[0].bias[:4] = -reach[:4] - 0.05  # dead on the whole box
        net[0].bias[4:6] = -reach[4:6] + 0.3  # fire only near a corner of the box
        net[2].bias[:3] = -50.0
    data = torch.rand(64, 3) * 0.2 - 0.1  # the data seen: near the centre only
    report = _report(net, data)
    assert bool(report["1"].dead[:6].all())
    result = compact(net, report, data, certify=(-1.0, 1.0))
    samples = _box_samples(-1.0, 1.0, 3, 20000, seed=1)
    with torch.no_grad():
        pre1 = net[0](samples)
        pre2 = net[2](torch.relu(pre1))
    # first layer: IBP is exact on a box, and the maximum of an affine map is at a corner
    corner_max = pre1[:8].amax(0)
    removed_first = result.sites["1"].removed
    assert removed_first == int(((corner_max <= 0) & report["1"].dead).sum()) == 4
    # deeper: sound (every unit removed is dead on every sample of the box)
    certified_second = result.sites["3"].removed
    assert certified_second >= 3
    assert int((report["3"].dead & (pre2.amax(0) <= 0)).sum()) >= certified_second
    # the compacted model equals the original on the whole box, not only on the data seen
    with torch.no_grad():
        assert _close(result.model(samples), net(samples))
    # the report's "dead" alone removes the units that fire near a corner: the output differs there
    seen_only = compact(net, report, data)
    assert seen_only.sites["1"].removed == int(report["1"].num_dead) > removed_first
    with torch.no_grad():
        assert not _close(seen_only.model(samples), net(samples))


def test_certified_mode_through_conv_batchnorm_pool() -> None:
    torch.manual_seed(0)
    net = CNN()
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        net(x)  # running statistics
        net.b1.bias[[1, 5]] = -30.0
    net.eval()
    result = compact(net, None, x, certify=(-1.0, 1.0))
    assert result.sites["r1"].removed >= 1
    generator = torch.Generator().manual_seed(2)
    samples = torch.rand(256, 3, 8, 8, generator=generator) * 2 - 1
    # soundness by sampling: each unit removed at the first site is dead on every sample
    seen: list[Tensor] = []
    handle = net.r1.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        expected = net(samples)
    handle.remove()
    alive = (seen[0].amax((0, 2, 3)) > 0).nonzero().reshape(-1).tolist()
    assert result.model.c1.out_channels >= len(alive)
    with torch.no_grad():
        assert _close(result.model(samples), expected)


def test_certified_mode_refuses_where_bounds_do_not_reach() -> None:
    class Normed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.norm = nn.LayerNorm(6)
            self.fc2 = nn.Linear(6, 5)
            self.head = nn.Linear(5, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(torch.relu(self.fc2(self.norm(torch.relu(self.fc(x))))))

    torch.manual_seed(0)
    net = Normed()
    _kill((net.fc2.bias, [0, 1]))
    x = torch.randn(16, 4)
    result = compact(net, None, x, certify=(-1.0, 1.0))
    last = list(result.sites.values())[-1]
    assert last.removed == 0 and "layer_norm" in (last.reason or "")


@pytest.mark.parametrize("how", ["h[:, 0] += 5", "h[:, 0] = h[:, 0] + 5"])
def test_certification_sees_an_in_place_write_through_a_view(how: str) -> None:
    """A constant added at the first position of a sequence, in place through a slice: units 2 and 3 are dead on
    the example (x - 5.5 and x - 0.5 at position 0, x below 0.4) but fire inside the box at position 0. The interval
    bounds kept the Linear's bound of `h`, certified them dead and removed them (0.125 off inside the box)."""

    class Shifted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act, self.out = nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1)

        def forward(self, x: Tensor) -> Tensor:  # (N, 3, 1)
            h = self.fc(x)
            if how == "h[:, 0] += 5":
                h[:, 0] += 5.0
            else:
                h[:, 0] = h[:, 0] + 5.0
            return self.out(self.act(h)).sum(1)

    torch.manual_seed(0)
    net = Shifted().eval()
    with torch.no_grad():
        net.fc.weight.fill_(1.0)
        net.fc.bias.copy_(torch.tensor([0.0, 0.0, -5.5, -5.5]))
    x = torch.rand(32, 3, 1) * 1.4 - 1.0
    with DeadUnitTracker(net, unit_dims={"act": -1}) as tracker, torch.no_grad():
        net(x)
    assert tracker.report()["act"].dead.tolist() == [False, False, True, True]
    result = compact(net, None, x, certify=(-1.0, 1.0))  # every unit the bounds prove dead is a candidate
    grid = torch.linspace(-1.0, 1.0, 201).reshape(-1, 1, 1).expand(-1, 3, 1)  # the box, position 0 included
    with torch.no_grad():
        assert torch.equal(result.model(grid), net(grid))  # certified: the same output on the whole box
    assert result.sites["act"].removed == 0


def test_certification_sees_a_functional_in_place_write_through_a_view() -> None:
    """`F.threshold(h[:, :1], -0.5, 1.0, inplace=True)`: unit 0 reads `x0` above -0.5 and 1 below, so it fires on
    about half of the box though it is dead on the example; the bounds kept the Linear's and removed it (1.0 off)."""

    class Thresholded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.out = nn.Linear(2, 3), nn.Linear(3, 1)

        def forward(self, x: Tensor) -> Tensor:
            h = self.fc(x)
            F.threshold(h[:, :1], -0.5, 1.0, inplace=True)
            return self.out(F.relu(h))

    net = Thresholded().eval()
    with torch.no_grad():
        net.fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        net.fc.bias.copy_(torch.tensor([0.0, 5.0, 5.0]))
    x = torch.tensor([[-0.1, 0.3], [-0.2, -0.4], [-0.3, 0.9]])  # in the box, unit 0 dead on it
    low, high = torch.tensor([-1.0, -1.0]), torch.tensor([0.0, 1.0])
    result = compact(net, None, x, certify=(low, high))
    grid = torch.stack(torch.meshgrid(torch.linspace(-1, 0, 51), torch.linspace(-1, 1, 51), indexing="ij"), -1)
    with torch.no_grad():
        assert torch.equal(result.model(grid.reshape(-1, 2)), net(grid.reshape(-1, 2)))
    assert result.sites["relu"].removed == 0


@pytest.mark.parametrize("how", ["setitem", "out add", "out cat"])
def test_certification_sees_a_buffer_the_forward_writes(how: str) -> None:
    """A buffer the forward makes and writes from the input (`buf[:] = fc1(x)`, `torch.add(..., out=buf)`): it was
    taken for a constant (or both bounds wrote into it), so units that fire in the box were certified dead."""

    class Buffered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(2, 2), nn.Linear(2, 4), nn.Linear(4, 1)

        def forward(self, x: Tensor) -> Tensor:
            if how == "setitem":
                buf = torch.zeros(x.shape[0], 2)
                buf[:] = self.fc1(x)
                h = x + buf
            elif how == "out add":
                h = torch.empty(x.shape[0], 2)
                torch.add(x, self.fc1(x), out=h)
            else:
                buf = torch.empty(x.shape[0], 4)
                torch.cat([x, x + self.fc1(x)], 1, out=buf)
                h = buf[:, 2:]
            return self.fc3(torch.relu(self.fc2(h)))

    net = Buffered().eval()
    with torch.no_grad():
        net.fc1.weight.copy_(10 * torch.eye(2))
        net.fc1.bias.zero_()
        net.fc2.weight.fill_(0.1)
        net.fc2.bias.fill_(-1.0)  # 0.1 * 11 * (x0 + x1) - 1: below 0 near 0, up to 1.2 in the box
    x = 0.01 * torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    result = compact(net, None, x, certify=(-1.0, 1.0))
    box = torch.rand(2000, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(result.model(box), net(box))
    assert result.sites["relu"].removed == 0


# ------------------------------------------------------------------------------------------------ export
def _small_cnn() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    net = CNN()
    _kill((net.b1.bias, [1, 5]), (net.b2.bias, [0]))
    x = torch.randn(8, 3, 8, 8)
    result = compact(net, _report(net, x), x)
    assert result.removed >= 3
    model = result.model.eval()
    with torch.no_grad():
        return model, x, model(x)


def test_torchscript_and_torch_export() -> None:
    model, x, expected = _small_cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated, still widely deployed
        scripted = torch.jit.script(model)
    with torch.no_grad():
        assert torch.allclose(scripted(x), expected, atol=1e-6)
    if not hasattr(torch, "export"):
        pytest.skip("torch.export is not available in this torch build")
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), expected, atol=1e-6)


def test_onnx_export(tmp_path) -> None:
    pytest.importorskip("onnx", reason="the ONNX exporter needs the `onnx` package (pip install lightning-relu[onnx])")
    onnxruntime = pytest.importorskip("onnxruntime", reason="running the exported graph needs `onnxruntime`")
    model, x, expected = _small_cnn()
    path = tmp_path / "compact.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": x.numpy()})
    assert torch.allclose(torch.from_numpy(out), expected, atol=1e-5)


def test_state_dict_round_trip_into_the_compacted_architecture() -> None:
    model, x, expected = _small_cnn()
    clone = _small_cnn()[0]
    clone.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(clone(x), expected)


# ------------------------------------------------------------------------------------------------ checkpoints and CLI
def _demo_checkpoint(tmp_path) -> str:
    """A checkpoint as a demo fit with checkpointing writes it: DemoRegressor, DeadUnitMonitor, three dead units."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_relu import DeadUnitMonitor
    from lightning_relu._demo import DemoRegressor, DemoTask

    pl.seed_everything(0, verbose=False)
    task = DemoTask(depth=3, width=8, samples=256)
    model = DemoRegressor(task.depth, task.width, task.in_features, task.lr, task.momentum)
    _kill((model.net[0].bias, [0, 4, 5]))
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        accelerator="cpu",
        callbacks=[DeadUnitMonitor(print_summary=False)],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(task.data(0), batch_size=64))
    path = tmp_path / "demo.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def test_cli_compacts_a_demo_checkpoint_and_the_result_loads(tmp_path, capsys) -> None:
    from lightning_relu._demo import DemoRegressor
    from lightning_relu.compaction import CHECKPOINT_KEY, resize_like_
    from lightning_relu.demo import main

    path = _demo_checkpoint(tmp_path)
    out = tmp_path / "small.ckpt"
    assert main(["compact", path, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "net.1" in printed and "removed" in printed and str(out) in printed
    original = torch.load(path, weights_only=True)
    written = torch.load(out, weights_only=True)
    dead = original["callbacks"]
    assert written[CHECKPOINT_KEY]["net.0"]["out_features"] == 8 - 3
    assert "optimizer_states" not in written and any(str(k).startswith("DeadUnitMonitor") for k in dead)
    # the ground truth: the uncompacted model of the checkpoint, on fresh inputs
    before = DemoRegressor(**original["hyper_parameters"])
    before.load_state_dict(original["state_dict"])
    after = resize_like_(DemoRegressor(**written["hyper_parameters"]), written)
    after.load_state_dict(written["state_dict"])
    from lightning_relu._demo import DemoTask

    x = DemoTask(depth=3, width=8, samples=256).data(0).tensors[0]  # the data the report saw
    assert _close(_eval(after, x), _eval(before, x))

    # a LightningModule that resizes itself in `on_load_checkpoint` loads the compacted checkpoint with Lightning
    class Resizing(DemoRegressor):
        def on_load_checkpoint(self, checkpoint: dict) -> None:
            resize_like_(self, checkpoint)

    loaded = Resizing.load_from_checkpoint(out, weights_only=True)
    assert _close(_eval(loaded, x), _eval(before, x))
    widths = written[CHECKPOINT_KEY]
    assert _params(after) == sum((w["in_features"] + 1) * w["out_features"] for w in widths.values())
    fan_in = before.hparams.in_features
    assert _params(after) <= _params(before) - 3 * (fan_in + 1) - 3 * 8


def test_cli_refuses_a_checkpoint_without_a_monitor(tmp_path, capsys) -> None:
    from lightning_relu.demo import main

    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, path)
    with pytest.raises(SystemExit):
        main(["compact", str(path)])
    assert "holds no `DeadUnitMonitor` report" in capsys.readouterr().err


def _one_epoch(tmp_path, callback) -> Any:
    """A quiet one-epoch CPU Trainer with a monitor and ``callback``."""
    import lightning.pytorch as pl

    from lightning_relu import DeadUnitMonitor

    return pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        accelerator="cpu",
        callbacks=[DeadUnitMonitor(print_summary=False), callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
    )


def test_compact_on_fit_end_callback(tmp_path) -> None:
    import pickle

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_relu import CompactOnFitEnd
    from lightning_relu._demo import DemoRegressor, DemoTask
    from lightning_relu.compaction import resize_like_

    with pytest.raises(ValueError, match="`example_size` must be a positive integer, got 0"):
        CompactOnFitEnd(example_size=0)
    pickle.loads(pickle.dumps(CompactOnFitEnd(dirpath=str(tmp_path))))
    pl.seed_everything(0, verbose=False)
    task = DemoTask(depth=3, width=8, samples=256)
    model = DemoRegressor(task.depth, task.width, task.in_features, task.lr, task.momentum)
    _kill((model.net[2].bias, [1, 6]))
    callback = CompactOnFitEnd(dirpath=str(tmp_path / "small"))
    trainer = _one_epoch(tmp_path, callback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(task.data(0), batch_size=64))
    assert callback.result is not None and callback.result.sites["net.3"].removed >= 2
    x = task.data(0).tensors[0]  # the data the report saw
    assert _close(_eval(callback.result.model, x), _eval(model, x))
    saved = torch.load(callback.path, weights_only=True)
    fresh = resize_like_(DemoRegressor(**saved["hyper_parameters"]), saved)
    fresh.load_state_dict(saved["state_dict"])
    assert _close(_eval(fresh, x), _eval(model, x))
    assert fresh.net[2].out_features <= 6

    # and as Lightning loads a checkpoint, into a module that resizes itself first
    class Resizing(DemoRegressor):
        def on_load_checkpoint(self, checkpoint: dict) -> None:
            resize_like_(self, checkpoint)

    loaded = Resizing.load_from_checkpoint(callback.path, weights_only=True)
    assert _close(_eval(loaded, x), _eval(model, x)) and loaded.net[2].out_features == fresh.net[2].out_features


@pytest.mark.parametrize("certify", [None, (-10.0, 10.0)], ids=["measured", "certified"])
def test_compact_on_fit_end_compacts_each_child_the_step_calls(tmp_path, certify) -> None:

    from lightning_relu import CompactOnFitEnd
    from tests.helpers import AutoEncoder

    module = AutoEncoder(lr=0.0)  # weights fixed: the units killed by hand stay dead
    x = module.train_dataloader().dataset.tensors[0]
    callback = CompactOnFitEnd(certify=certify)
    trainer = _one_epoch(tmp_path, callback)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module)
    assert callback.result is not None
    removed = {name: site.removed for name, site in callback.result.sites.items()}
    small = callback.result.model
    with torch.no_grad():
        before = module.decoder(module.encoder(x))
        after = small.decoder(small.encoder(x))
    assert _close(after, before)
    if certify is None:  # the two calls of the step: `self.encoder(x)`, then `self.decoder(...)`
        assert removed["encoder.1"] >= 2 and removed["decoder.1"] >= 2
        assert small.encoder[0].out_features <= 6 and small.decoder[0].out_features <= 6
    else:  # a box of the step's input says nothing of the decoder's: its sites stay, and a warning says so
        assert removed["encoder.1"] >= 2 and "decoder.1" not in removed
        assert any("`decoder`" in str(w.message) and "certif" in str(w.message) for w in caught)


def test_compact_on_fit_end_needs_a_monitor(tmp_path) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lightning_relu import CompactOnFitEnd

    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        limit_train_batches=1,
        callbacks=[CompactOnFitEnd()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(ValueError, match="needs a `DeadUnitMonitor`"):
        trainer.fit(BoringModel())


class _AuxHead(nn.Module):
    """A trunk, and an auxiliary head with a rectifier function that runs in training only (GoogLeNet's aux heads)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(4, 6)
        self.head = nn.Linear(6, 2)
        self.aux = nn.Linear(6, 3)
        with torch.no_grad():
            self.trunk.bias[:2] = -1e4
            self.aux.bias[0] = -1e4

    def forward(self, x: Tensor) -> Tensor:
        h = torch.nn.functional.relu(self.trunk(x))
        out = self.head(h)
        if self.training:
            out = out + torch.nn.functional.relu(self.aux(h)).sum(1, keepdim=True)
        return out


def test_a_site_only_training_reaches_stays_with_its_reason() -> None:
    model = _AuxHead()
    x = torch.randn(16, 4)
    with DeadUnitTracker(model) as tracker, torch.no_grad():
        model(x)  # training mode: the aux head's call is a site
    report = tracker.report()
    assert set(report) == {"relu", "relu_1"} and int(report["relu_1"].dead.sum()) == 1
    small, sites = compact(model.eval(), report, x)
    assert sites["relu"].removed == 2 and small.trunk.out_features == 4
    assert sites["relu_1"].removed == 0 and "does not reach" in str(sites["relu_1"].reason)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_norm_without_per_channel_tensors_takes_the_new_width() -> None:
    # InstanceNorm2d's default holds no affine parameters nor running statistics: only its `num_features` says its width
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.InstanceNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten())
    with torch.no_grad():
        net[0].weight[:3] = 0.0
        net[0].bias[:3] = -1.0  # constant channels, normalized to 0 and rectified: dead
    x = torch.randn(8, 3, 8, 8)
    with DeadUnitTracker(net) as tracker, torch.no_grad():
        before = net(x)
    small, sites = compact(net, tracker.report(), x)
    assert sites["2"].removed == 3 and small[0].out_channels == 5
    assert small[1].num_features == small[0].out_channels == small[3].in_channels
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # InstanceNorm warns when its width and its input's differ
        with torch.no_grad():
            after = small(x)
    assert _close(after, before)
