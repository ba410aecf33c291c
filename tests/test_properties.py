"""Property tests on random architectures: MLPs and CNNs of random depth and widths, optional BatchNorm/LayerNorm,
in-place or not, ``nn.ReLU`` modules or functional calls (every form), random dead units forced by large negative
biases, dense or sequence inputs.

Every property is checked against a replay of the network written here, layer by layer, with ``torch.clamp`` for the
rectifier and ``F.linear``/``F.conv2d``/``F.batch_norm``/``F.layer_norm`` for the rest:

- the tracker's report equals a brute-force count;
- after ``sign_flip_`` at least half of the samples alive before each site survive it, and its report says so;
- ``revive_dead_units_`` leaves the network's output unchanged (eval and train mode), and the revived units fire.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lightning_relu import DeadUnitTracker, RevivalWarning, find_relu_sites, revive_dead_units_, sign_flip_

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# every functional form the package claims to see; the in-place ones act on a fresh affine/norm output
FORMS: list[Callable[[Tensor], Tensor]] = [
    lambda h: F.relu(h),
    lambda h: torch.relu(h),
    lambda h: h.relu(),
    lambda h: F.relu(h, inplace=True),
    lambda h: torch.relu_(h),
    lambda h: h.relu_(),
]


@dataclass
class Arch:
    kind: str  # "mlp" or "cnn"
    in_size: int  # input features (mlp) or channels (cnn)
    widths: list[int]
    norm: str | None  # None, "bn" or "ln" (mlp only)
    inplace: list[bool]
    functional: bool
    forms: list[int]
    dead: list[list[int]]  # units forced dead, per site
    seq_len: int | None  # mlp only: inputs (B, T, C)
    kernels: list[int]  # cnn only
    pool: bool  # cnn only: max-pool before the flatten

    @property
    def unit_axis(self) -> int:
        return 1 if self.kind == "cnn" else -1

    @property
    def depth(self) -> int:
        return len(self.widths)


@st.composite
def archs(
    draw: st.DrawFn, norms: tuple[str | None, ...] = (None, "bn", "ln"), functional: tuple[bool, ...] = (False, True)
) -> Arch:
    kind = draw(st.sampled_from(["mlp", "cnn"]))
    depth = draw(st.integers(1, 4 if kind == "mlp" else 3))
    norm = draw(st.sampled_from([n for n in norms if not (kind == "cnn" and n == "ln")]))
    # LayerNorm over one feature outputs its bias exactly: a pre-activation of exact zeros, which no sign helps
    min_width = 2 if norm == "ln" else 1
    widths = draw(st.lists(st.integers(min_width, 7), min_size=depth, max_size=depth))
    dead = [sorted(draw(st.sets(st.integers(0, w - 1), max_size=w))) if draw(st.booleans()) else [] for w in widths]
    seq_len = draw(st.none() | st.integers(1, 3)) if kind == "mlp" and norm != "bn" else None
    return Arch(
        kind=kind,
        in_size=draw(st.integers(1, 5)) if kind == "mlp" else draw(st.integers(1, 3)),
        widths=widths,
        norm=norm,
        inplace=draw(st.lists(st.booleans(), min_size=depth, max_size=depth)),
        functional=draw(st.sampled_from(functional)),
        forms=draw(st.lists(st.integers(0, len(FORMS) - 1), min_size=depth, max_size=depth)),
        dead=dead,
        seq_len=seq_len,
        kernels=draw(st.lists(st.sampled_from([1, 3]), min_size=depth, max_size=depth)),
        pool=draw(st.booleans()),
    )


SPATIAL = 4  # CNN inputs are (N, C, 4, 4)


class FunctionalNet(nn.Module):
    """The same layers as the Sequential variant, applied by a forward that calls the rectifier functions."""

    def __init__(self, arch: Arch, affines: list[nn.Module], norms: list[nn.Module] | None, head: nn.Linear) -> None:
        super().__init__()
        self.affines = nn.ModuleList(affines)
        self.norms = nn.ModuleList(norms) if norms is not None else None
        self.head = head
        self.forms = [FORMS[i] for i in arch.forms]
        self.cnn = arch.kind == "cnn"
        self.pool = arch.pool

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for i, affine in enumerate(self.affines):
            h = affine(h)
            if self.norms is not None:
                h = self.norms[i](h)
            h = self.forms[i](h)
        if self.cnn:
            if self.pool:
                h = F.max_pool2d(h, 2)
            h = torch.flatten(h, 1)
        return self.head(h)


def build(arch: Arch, seed: int = 0) -> tuple[nn.Module, list[str]]:
    """The model and its site names in forward order."""
    torch.manual_seed(seed)
    affines: list[nn.Module] = []
    norms: list[nn.Module] = []
    size = arch.in_size
    for width, kernel in zip(arch.widths, arch.kernels, strict=True):
        if arch.kind == "mlp":
            affines.append(nn.Linear(size, width))
            if arch.norm == "bn":
                norms.append(nn.BatchNorm1d(width))
            elif arch.norm == "ln":
                norms.append(nn.LayerNorm(width))
        else:
            affines.append(nn.Conv2d(size, width, kernel, padding=kernel // 2))
            if arch.norm == "bn":
                norms.append(nn.BatchNorm2d(width))
        size = width
    spatial = (SPATIAL // 2 if arch.pool else SPATIAL) ** 2 if arch.kind == "cnn" else 1
    head = nn.Linear(size * spatial, 2)
    with torch.no_grad():
        for i, units in enumerate(arch.dead):
            if units:
                (norms[i] if norms else affines[i]).bias[units] = -1e4
    if arch.functional:
        model: nn.Module = FunctionalNet(arch, affines, norms or None, head)
        names = ["relu" if i == 0 else f"relu_{i}" for i in range(arch.depth)]
        return model, names
    layers: list[nn.Module] = []
    names = []
    for i, affine in enumerate(affines):
        layers.append(affine)
        if norms:
            layers.append(norms[i])
        names.append(str(len(layers)))
        layers.append(nn.ReLU(inplace=arch.inplace[i]))
    if arch.kind == "cnn":
        if arch.pool:
            layers.append(nn.MaxPool2d(2))
        layers.append(nn.Flatten())
    layers.append(head)
    return nn.Sequential(*layers), names


def parts(model: nn.Module, arch: Arch) -> tuple[list[nn.Module], list[nn.Module] | None, nn.Linear]:
    """The affine layers, norm layers and head of a model built by :func:`build`."""
    if isinstance(model, FunctionalNet):
        norms = list(model.norms) if model.norms is not None else None
        return list(model.affines), norms, model.head
    layers = list(model)
    affines = [m for m in layers if isinstance(m, (nn.Linear, nn.Conv2d))][: arch.depth]
    norms = [m for m in layers if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm))] or None
    return affines, norms, layers[-1]


def replay(model: nn.Module, arch: Arch, x: Tensor, batch_stats: bool) -> tuple[list[Tensor], list[Tensor]]:
    """Pre-norm affine outputs and site outputs, layer by layer, by hand.

    ``batch_stats``: BatchNorm normalizes with the batch's statistics (train mode), else with its running ones.
    """
    affines, norms, _ = parts(model, arch)
    pre: list[Tensor] = []
    outs: list[Tensor] = []
    h = x
    with torch.no_grad():
        for i, affine in enumerate(affines):
            if isinstance(affine, nn.Linear):
                h = F.linear(h, affine.weight, affine.bias)
            else:
                h = F.conv2d(h, affine.weight, affine.bias, padding=affine.padding)
            pre.append(h)
            if norms is not None:
                norm = norms[i]
                if isinstance(norm, nn.LayerNorm):
                    h = F.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
                elif batch_stats:
                    h = F.batch_norm(h, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
                else:
                    h = F.batch_norm(
                        h, norm.running_mean, norm.running_var, norm.weight, norm.bias, training=False, eps=norm.eps
                    )
            h = torch.clamp(h, min=0)
            outs.append(h)
    return pre, outs


def units_last(out: Tensor, unit_axis: int) -> Tensor:
    """(samples, positions, units)."""
    return out.movedim(unit_axis, -1).reshape(out.shape[0], -1, out.shape[unit_axis])


def inputs(arch: Arch, n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    if arch.kind == "cnn":
        return torch.randn(n, arch.in_size, SPATIAL, SPATIAL, generator=g)
    if arch.seq_len is not None:
        return torch.randn(n, arch.seq_len, arch.in_size, generator=g)
    return torch.randn(n, arch.in_size, generator=g)


# ------------------------------------------------------------------------------------------------ discovery


@SETTINGS
@given(arch=archs())
def test_discovery_links_every_site_to_its_layers(arch: Arch) -> None:
    model, names = build(arch)
    affines, norms, head = parts(model, arch)
    sites = find_relu_sites(model, example_input=inputs(arch, 4, 0))
    assert [s.name for s in sites] == names
    for i, site in enumerate(sites):
        assert site.producer is affines[i]
        assert site.norm is (norms[i] if norms is not None else None)
        assert site.num_units == arch.widths[i]
        assert site.unit_dim == arch.unit_axis
        consumer = affines[i + 1] if i + 1 < arch.depth else head
        assert [c.module for c in site.consumers] == [consumer]
        assert site.consumers[0].through_flatten == (arch.kind == "cnn" and i + 1 == arch.depth)


# ------------------------------------------------------------------------------------------------ counting


@SETTINGS
@given(
    arch=archs(),
    batch_sizes=st.lists(st.integers(2, 6), min_size=1, max_size=3),
    train=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_tracker_report_equals_brute_force(arch: Arch, batch_sizes: list[int], train: bool, seed: int) -> None:
    model, names = build(arch, seed)
    model.train(train)
    batches = [inputs(arch, n, seed + i) for i, n in enumerate(batch_sizes)]
    expected_outs: list[list[Tensor]] = [[] for _ in names]
    for x in batches:
        # replay first: a train-mode forward moves the BatchNorm running statistics an eval replay would read
        _, outs = replay(model, arch, x, batch_stats=train)
        for i, out in enumerate(outs):
            expected_outs[i].append(out)
    with DeadUnitTracker(model) as tracker, torch.no_grad():
        for x in batches:
            model(x)
    report = tracker.report()
    assert list(report) == names
    for i, name in enumerate(names):
        layer = report[name]
        per_batch = [units_last(out, arch.unit_axis) for out in expected_outs[i]]
        width = arch.widths[i]
        active = [sum(int((b[:, :, u] > 0).sum()) for b in per_batch) for u in range(width)]
        killed = sum(int((~(b > 0).flatten(1).any(1)).sum()) for b in per_batch)
        samples = sum(b.shape[0] for b in per_batch)
        assert layer.num_units == width
        assert layer.active_count.tolist() == active
        assert layer.dead.tolist() == [a == 0 for a in active]
        assert layer.entries_per_unit == sum(b.shape[0] * b.shape[1] for b in per_batch)
        assert layer.samples == samples
        assert layer.killed == killed
        # forced-dead units stay dead whatever the data
        assert all(layer.dead[u] for u in arch.dead[i])


# ------------------------------------------------------------------------------------------------ sign flipping


@SETTINGS
@given(arch=archs(), n=st.integers(4, 48), seed=st.integers(0, 2**16))
def test_sign_flip_keeps_half_of_the_living_data_at_every_site(arch: Arch, n: int, seed: int) -> None:
    model, names = build(arch, seed)
    x = inputs(arch, n, seed)
    report = sign_flip_(model, x)
    assert list(report) == names
    # the flipped model, re-run by hand as the pass ran it: BatchNorm with the batch's statistics
    _, outs = replay(model, arch, x, batch_stats=True)
    alive = torch.ones(n, dtype=torch.bool)
    for name, out in zip(names, outs, strict=True):
        before = int(alive.sum())
        alive = alive & (out > 0).flatten(1).any(1)
        after = int(alive.sum())
        assert 2 * after >= before, (name, before, after)
        assert report[name].living_before == pytest.approx(before / n)
        assert report[name].living_after == pytest.approx(after / n)
    assert int(alive.sum()) / n >= 2.0**-arch.depth


@SETTINGS
@given(arch=archs(), n=st.integers(4, 32), seed=st.integers(0, 2**16))
def test_sign_flip_only_changes_signs(arch: Arch, n: int, seed: int) -> None:
    model, _ = build(arch, seed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = sign_flip_(model, inputs(arch, n, seed))
    flipped_targets = {r.target for r in report.values() if r.flipped}
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in flipped_targets and key.rpartition(".")[2] in ("weight", "bias"):
            assert torch.equal(value, -before[key]), key
        else:  # other parameters, and every BatchNorm buffer (the pass restores them)
            assert torch.equal(value, before[key]), key


# ------------------------------------------------------------------------------------------------ revival


@SETTINGS
@given(
    arch=archs(norms=(None, "bn"), functional=(False,)),
    train_measure=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_revival_keeps_the_output_and_revived_units_fire(arch: Arch, train_measure: bool, seed: int) -> None:
    """The output is unchanged in every mode in which the revived units were dead (always the mode they were measured
    in). LayerNorm is left out: it normalizes units together, so revival changes the output (documented, warned)."""
    model, names = build(arch, seed)
    x = inputs(arch, 32, seed)
    model.train(train_measure)
    with DeadUnitTracker(model) as tracker, torch.no_grad():
        model(x)
    report = tracker.report()
    revived = {name: torch.nonzero(report[name].dead).flatten().tolist() for name in names}
    # before the surgery: are those units dead in the other mode too? (BatchNorm's running statistics and a batch's
    # own statistics can disagree: a unit dead under one may fire under the other, and then its outgoing weights count)
    _, other_outs = replay(model, arch, x, batch_stats=not train_measure)
    dead_in_other = all(
        not bool((units_last(out, arch.unit_axis)[:, :, u] > 0).any())
        for out, name in zip(other_outs, names, strict=True)
        for u in revived[name]
    )
    if arch.norm is None or all(arch.dead[i] == revived[name] for i, name in enumerate(names)):
        assert dead_in_other  # without BatchNorm the modes agree; forced-dead units are dead in both
    reference = copy.deepcopy(model)
    counts = revive_dead_units_(model, report, generator=torch.Generator().manual_seed(seed), init="kaiming")
    assert counts == {name: len(revived[name]) for name in names}

    with torch.no_grad():
        for mode in (train_measure, not train_measure):
            model.train(mode)
            reference.train(mode)
            if mode == train_measure or dead_in_other:
                torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)

    # revived units fire where that is certain: at the first site (symmetric weights, no bias, Gaussian inputs:
    # silent on all 32 samples with probability 2^-32), and behind a reset BatchNorm (gamma 1, beta 0) whenever
    # their pre-activation is not constant over the batch
    pre, outs = replay(model, arch, x, batch_stats=True)
    for i, name in enumerate(names):
        out = units_last(outs[i], arch.unit_axis)
        z = units_last(pre[i], arch.unit_axis)
        for u in revived[name]:
            varies = float(z[:, :, u].max() - z[:, :, u].min()) > 1e-3
            if i == 0 or (arch.norm == "bn" and varies):
                assert bool((out[:, :, u] > 0).any()), (name, u)


@SETTINGS
@given(arch=archs(norms=(None, "bn"), functional=(True,)), seed=st.integers(0, 2**16))
def test_observed_revival_of_functional_sites_keeps_the_output(arch: Arch, seed: int) -> None:
    """Rectifier function calls are found on the observed forward: revival acts on them, never on more units than
    are dead, and the output in evaluation mode on the example is what it was (rolled back site by site where not)."""
    model, names = build(arch, seed)
    x = inputs(arch, 32, seed)
    with DeadUnitTracker(model) as tracker, torch.no_grad():
        model(x)
    report = tracker.report()
    assert list(report) == names
    model.eval()
    with torch.no_grad():
        before = model(x)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RevivalWarning)  # units alive in evaluation mode are left, with a warning
        counts = revive_dead_units_(model, report, generator=torch.Generator().manual_seed(seed), example_input=x)
    assert set(counts) == set(names)
    assert all(0 <= counts[name] <= int(report[name].dead.sum()) for name in names)
    if arch.norm is None:  # the first site reads the input: its forced-dead units can be revived, in both modes
        assert counts[names[0]] >= len(arch.dead[0])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
