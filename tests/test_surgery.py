"""Revival on the observed structure (`revive_dead_units_(..., example_input=...)`): the output is unchanged,
revived units fire, chains revive together, and what cannot be revived is said."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_relu import DeadUnitTracker, RevivalWarning, revive_dead_units_
from lightning_relu.functional import activation_stats
from lightning_relu.structure import observe


def _active_share(model: nn.Module, module: nn.Module, x: Tensor, unit_dim: int) -> Tensor:
    """Per unit, the share of its entries > 0 at ``module``'s output on ``x`` (a plain hook; counted by the functional
    twin ``activation_stats``, the shared oracle of tests that are not about the counting itself)."""
    seen: list[Tensor] = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return activation_stats(seen[0], unit_dim).activation_rate.double()


def _report(model: nn.Module, x: Tensor):
    with DeadUnitTracker(model) as tracker, torch.no_grad():
        model(x)
    return tracker.report()


def _eval_output(model: nn.Module, x: Tensor) -> Tensor:
    training = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(training)
    return out


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.act_dw = nn.ReLU()
        self.fc = nn.Linear(8 * 4 * 4, 16)
        self.act_fc = nn.ReLU()
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act_dw(self.dw(self.act(self.bn(self.conv(x)))))
        return self.head(self.act_fc(self.fc(F.avg_pool2d(h, 2).flatten(1))))


def _forced() -> tuple[ConvNet, Tensor]:
    torch.manual_seed(0)
    model = ConvNet().train()
    with torch.no_grad():
        model.bn.bias[[1, 5]] = -1e4  # units 1 and 5 of `act`: dead, and so channels 1, 5 of the depthwise input
        model.dw.bias[[1, 2]] = -1e4  # units 1 and 2 of `act_dw` (1 reads only the dead channel 1)
        model.fc.bias[[0, 3, 7]] = -1e4
    return model, torch.randn(16, 3, 8, 8)


def test_revival_keeps_the_output_and_revived_units_fire_on_new_data() -> None:
    model, x = _forced()
    report = _report(model, x)
    dead = {name: torch.nonzero(r.dead).reshape(-1).tolist() for name, r in report.items()}
    assert dead["act"] == [1, 5] and dead["act_dw"] == [1, 2, 5]  # 5 reads only the dead channel 5
    assert {0, 3, 7} <= set(dead["act_fc"])
    optimizer = torch.optim.Adam(model.parameters())
    model(x).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    before = _eval_output(model, x)
    counts = revive_dead_units_(model, report, optimizer, torch.Generator().manual_seed(0), example_input=x)
    assert counts == {"act": 2, "act_dw": 3, "act_fc": len(dead["act_fc"])}
    torch.testing.assert_close(_eval_output(model, x), before, rtol=1e-5, atol=1e-6)
    # every revived unit fires on fresh data of the same kind, on roughly half of its entries
    fresh = torch.randn(64, 3, 8, 8)
    for module, name, dim in ((model.act, "act", 1), (model.act_dw, "act_dw", 1), (model.act_fc, "act_fc", 1)):
        share = _active_share(model, module, fresh, dim)[report[name].dead]
        assert bool((share > 0.1).all()), (name, share)
    # the optimizer starts the touched entries afresh
    state = optimizer.state[model.fc.weight]
    assert torch.count_nonzero(state["exp_avg"][[0, 3, 7]]) == 0
    assert torch.count_nonzero(state["exp_avg"][:, :]) > 0


def test_a_unit_whose_only_input_is_dead_and_not_revived_is_left_and_said() -> None:
    model, x = _forced()
    report = _report(model, x)
    before = _eval_output(model, x)
    with pytest.warns(RevivalWarning, match="act_dw.*cannot fire"):
        counts = revive_dead_units_(model, report, example_input=x, exclude=["act"])
    assert counts["act_dw"] == 1  # unit 2 only: units 1 and 5 read the dead, unrevived channels 1 and 5
    torch.testing.assert_close(_eval_output(model, x), before, rtol=1e-5, atol=1e-6)
    assert bool((_active_share(model, model.act_dw, x, 1)[[1, 5]] == 0).all())


def test_a_site_read_around_its_consumer_is_not_revived_and_said() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.act = nn.Linear(4, 6), nn.Linear(6, 6), nn.ReLU()
            self.out = nn.Linear(6, 1)

        def forward(self, x: Tensor) -> Tensor:
            h = self.act(self.fc1(x))
            return self.out(self.fc2(h) + h)

    torch.manual_seed(0)
    model = Residual()
    with torch.no_grad():
        model.fc1.bias[2] = -1e4
    x = torch.randn(8, 4)
    report = _report(model, x)
    before = _eval_output(model, x)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(RevivalWarning, match="'act'.*add"):
        counts = revive_dead_units_(model, report, example_input=x)
    assert counts == {"act": 0}
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(_eval_output(model, x), before)


def test_a_reader_only_evaluation_mode_shows_is_caught_by_the_check_and_rolled_back() -> None:
    class EvalOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.act = nn.Linear(4, 6), nn.Linear(6, 1), nn.ReLU()
            self.keep = nn.Linear(4, 6)

        def forward(self, x: Tensor) -> Tensor:
            h = self.act(self.fc1(x))
            out = self.fc2(h)
            return out if self.training else out + h.sum(1, keepdim=True)

    torch.manual_seed(0)
    model = EvalOnly().train()
    with torch.no_grad():
        model.fc1.bias[[0, 4]] = -1e4
    x = torch.randn(8, 4)
    report = _report(model, x)
    before = _eval_output(model, x)
    with pytest.warns(RevivalWarning, match="rolled back"):
        counts = revive_dead_units_(model, report, example_input=x)
    assert counts == {"act": 0}
    torch.testing.assert_close(_eval_output(model, x), before)
    # without the check, the same surgery changes the evaluation output
    revive_dead_units_(model, report, example_input=x, check_output=False)
    assert not torch.allclose(_eval_output(model, x), before)


def test_a_report_of_another_model_is_refused_before_anything_changes() -> None:
    model, x = _forced()
    other = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    report = _report(other, torch.randn(2, 3))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="another model"):
        revive_dead_units_(model, report, example_input=x)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_units_revived_in_a_fit_are_alive_in_the_next_epoch(tmp_path, optimizer: str) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_relu import DeadUnitMonitor

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = ConvNet()

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            if optimizer == "sgd":
                return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    module = Module()
    with torch.no_grad():
        module.net.bn.bias[[1, 5]] = -1e4
        module.net.dw.bias[[1, 2]] = -1e4
        module.net.fc.bias[[0, 3, 7]] = -1e4
    x, y = torch.randn(128, 3, 8, 8), torch.randint(0, 3, (128,))
    monitor = DeadUnitMonitor(revive=True)
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_epochs=2, callbacks=[monitor], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=32))
    first, second = monitor.history[0].layers, monitor.history[1].layers
    revived = monitor.reviver.history[0]["revived"]
    assert revived["net.act"] == 2 and revived["net.act_dw"] == 3 and revived["net.act_fc"] >= 3
    still_dead = sum(int((first[name].dead & second[name].dead).sum()) for name in revived)
    assert still_dead <= 0.01 * sum(revived.values())


def test_a_lightning_module_without_forward_is_revived_through_the_call_its_step_makes(tmp_path) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_relu import DeadUnitMonitor

    class NoForward(pl.LightningModule):  # training_step calls the network it holds, with a keyword argument
        def __init__(self) -> None:
            super().__init__()
            self.net = ConvNet()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x=x), y)

        def validation_step(self, batch, batch_idx):  # another input between steps: never held for revival
            self.net(-100.0 * batch[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    torch.manual_seed(0)
    module = NoForward()
    with torch.no_grad():
        module.net.fc.bias[[0, 3, 7]] = -1e4
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 3, (64,))
    monitor = DeadUnitMonitor(revive=True)
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_epochs=1, callbacks=[monitor], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1, limit_val_batches=1,
    )  # fmt: skip
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    trainer.fit(module, loader, loader)
    revived = monitor.reviver.history[0]["revived"]
    dead = monitor.history[0].layers["net.act_fc"].dead
    assert revived["net.act_fc"] == int(dead.sum()) >= 3
    assert bool((_active_share(module.net, module.net.act_fc, x, 1)[dead] > 0.1).all())


def test_a_unit_seen_on_two_entries_is_set_active_on_fresh_ones() -> None:
    """A dense layer on a batch of two: each revived unit must be active on both held entries and, with the margin
    taken from the site's typical spread, on fresh entries of the same distribution (Gaussian: about 99.6%). Half the
    unit's own two-entry spread (the former margin) leaves about 9% of fresh entries at or below zero."""
    from lightning_relu.surgery import _threshold

    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4000, 1, generator=g, dtype=torch.float64) * 5
    held = mean + torch.randn(4000, 2, generator=g, dtype=torch.float64)
    fresh = mean + torch.randn(4000, 64, generator=g, dtype=torch.float64)
    shift = _threshold(held)[:, None]
    assert bool(((held - shift) > 0).all())
    assert float(((fresh - shift) <= 0).double().mean()) < 0.01


class _ScaledSites(nn.Module):
    """Sites whose pre-activation multiplies the shifted bias by a constant: ``-bn(conv)``, a per-channel parameter of
    both signs times a norm's output, ``3 * fc``, ``fc * -2`` and ``0.5 - fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.gamma = nn.Parameter(torch.tensor([-2.0, 1.5, -0.5, 1.0, -1.0, 2.0, -3.0, 0.7]))
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.acts = nn.ModuleList(nn.ReLU() for _ in range(5))
        self.head = nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.acts[0](-self.bn(self.conv(x)))
        h = self.acts[1](self.bn2(self.conv2(h)) * self.gamma[:, None, None])
        h = self.acts[2](3 * self.fc1(h.mean((2, 3))))
        h = self.acts[3](self.fc2(h) * -2.0)
        return self.head(self.acts[4](0.5 - self.fc3(h)))


# two units of `acts.4` are dead by chance in training mode and alive in evaluation mode: left, and said
@pytest.mark.filterwarnings("ignore:Site 'acts.4' was not revived:lightning_relu.RevivalWarning")
def test_revived_units_fire_where_a_constant_scales_the_pre_activation() -> None:
    torch.manual_seed(0)
    model, x = _ScaledSites().train(), torch.randn(64, 3, 6, 6)
    killed = [0, 1, 3]
    with torch.no_grad():  # kill units 0, 1 and 3 at every site: a pre-activation far below 0
        for bias, sign in (
            (model.bn.bias, torch.ones(8)),  # -bn(...): a large positive bias
            (model.bn2.bias, -torch.sign(model.gamma.detach())),
            (model.fc1.bias, -torch.ones(16)),
            (model.fc2.bias, torch.ones(16)),
            (model.fc3.bias, torch.ones(16)),
        ):
            bias[killed] = 1e4 * sign[killed]
    report = _report(model, x)
    assert all(bool(report[f"acts.{i}"].dead[killed].all()) for i in range(5))
    before = _eval_output(model, x)
    counts = revive_dead_units_(model, report, None, torch.Generator().manual_seed(0), example_input=x)
    assert all(counts[f"acts.{i}"] >= 3 for i in range(5))
    torch.testing.assert_close(_eval_output(model, x), before, rtol=1e-5, atol=1e-6)
    # on the example (training mode, its batch statistics): each revived unit is active on about half its entries
    for i, act in enumerate(model.acts):
        share = _active_share(model, act, x, 1)[killed]
        assert bool(((share > 0.3) & (share < 0.7)).all()), (i, share)


class _Frozen(nn.Module):
    """A bias-free convolution, then a per-channel ``x * scale + shift`` of buffers (torchvision's
    ``FrozenBatchNorm2d``, the detection backbones' norm): a constant added and no bias to shift."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.register_buffer("scale", torch.ones(8))
        self.register_buffer("shift", torch.zeros(8))
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x) * self.scale[:, None, None] + self.shift[:, None, None]
        return self.head(self.act(h).mean((2, 3)))


def test_a_site_with_a_constant_added_and_no_bias_is_not_revived_and_said() -> None:
    torch.manual_seed(0)
    model, x = _Frozen(), torch.randn(16, 3, 6, 6)
    model.shift[[0, 3, 5]] = -1e3  # the shift kills them: new weights alone leave them dead
    site = observe(model, x).sites["act"]
    assert site.offset is not None and site.shift_bias is None
    assert site.remedies == ("rai",)  # no sign flip (a constant is added), no revival (nothing to shift)
    report = _report(model, x)
    assert report["act"].dead[[0, 3, 5]].all()
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(RevivalWarning, match="a constant is added to its pre-activation .* no bias to shift"):
        counts = revive_dead_units_(model, report, example_input=x)
    assert counts["act"] == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_units_without_a_bias_that_new_weights_leave_inactive_are_left_and_said() -> None:
    # every sample is about the same positive vector: a bias-free unit fires on all of them or on none, whatever
    # its fresh weights; about half of the redrawn units stay dead, and nothing can shift them
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32, bias=False), nn.ReLU(), nn.Linear(32, 1))
    x = torch.ones(64, 4) + 0.01 * torch.rand(64, 4)
    report = _report(model, x)
    dead = torch.nonzero(report["1"].dead).reshape(-1)
    assert dead.numel() >= 8
    with pytest.warns(RevivalWarning, match="do not fire on the example input with new incoming weights"):
        counts = revive_dead_units_(model, report, None, torch.Generator().manual_seed(0), example_input=x)
    share = _active_share(model, model[1], x, 1)[dead]
    revived = share > 0
    # a fresh row fires with probability 1/2 here: about half are revived (each round used to redraw the units that
    # had fired too, leaving 1 of 17)
    assert dead.numel() // 3 <= counts["1"] < dead.numel()
    assert int(revived.sum()) == counts["1"]  # every unit counted revived fires; the others were left as they were


def test_a_pre_activation_written_in_place_through_a_view_has_no_producer() -> None:
    class Sliced(nn.Module):
        def __init__(self, how: str) -> None:
            super().__init__()
            self.how, self.fc, self.act, self.out = how, nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)

        def forward(self, x: Tensor) -> Tensor:
            h = self.fc(x)
            if self.how == "neg_":
                h[:, :4].neg_()
            else:
                h[:, :4] *= -2
            return self.out(self.act(h))

    for how in ("neg_", "setitem"):
        torch.manual_seed(0)
        model, x = Sliced(how), torch.randn(32, 4)
        site = observe(model, x).sites["act"]
        problem = site.producer_problem or ""
        assert site.producer is None and "written in place through another view" in problem, problem
        with torch.no_grad():
            model.fc.bias[:2] = 1e3  # dead through the negation: a bias shift the wrong way would not show
        report = _report(model, x)
        assert report["act"].dead[:2].all()
        with pytest.warns(RevivalWarning, match="no producer"):
            assert revive_dead_units_(model, report, example_input=x)["act"] == 0


def test_a_factor_that_differs_between_a_units_entries_refuses_revival() -> None:
    """`relu(fc(x) * mask)` with a fixed mask over positions: a shift of the bias moves the entries by different
    amounts (not at all where the mask is 0), so no shift makes the units fire on about half of their entries; the
    calibration took the mask's mean for the factor and stopped at once (revived units active on 5% of entries)."""

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act, self.out = nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1)
            self.register_buffer("mask", torch.tensor([1.0, 0.0, 0.0, 0.0]).reshape(4, 1))

        def forward(self, x: Tensor) -> Tensor:
            return self.out(self.act(self.fc(x) * self.mask)).sum((1, 2))

    torch.manual_seed(0)
    model, x = Masked(), torch.randn(32, 4, 2)
    with torch.no_grad():
        model.fc.bias[:3] = -1e3
    site = observe(model, x).sites["act"]
    assert site.uneven_scale is not None and "revive" not in site.remedies
    report = _report(model, x)
    assert report["act"].dead[:3].all()
    with pytest.warns(RevivalWarning, match="differs between a unit's entries"):
        assert revive_dead_units_(model, report, example_input=x)["act"] == 0


@pytest.mark.parametrize("producer_trains", [False, True])
def test_a_site_whose_readers_are_all_frozen_is_not_revived_and_said(producer_trains: bool) -> None:
    """A frozen teacher, or a fixed classifier reading a trainable layer: a revived unit's outgoing weights would
    stay 0 for good (no gradient reaches a frozen weight), and the frozen layers were rewritten."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)).requires_grad_(False)
    model[0].requires_grad_(producer_trains)
    with torch.no_grad():
        model[0].bias[:3] = -1e3
    x = torch.randn(32, 4)
    report = _report(model, x)
    assert "revive" not in observe(model, x).sites["1"].remedies  # the structure table says so too
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(RevivalWarning, match="every layer reading it is frozen"):
        assert revive_dead_units_(model, report, example_input=x)["1"] == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # a trainable reader: the revived unit's outgoing weights learn (its incoming ones too, or stay a random feature)
    model[2].requires_grad_(True)
    assert revive_dead_units_(model, report, torch.optim.SGD(model.parameters(), lr=0.1), example_input=x)["1"] == 3
