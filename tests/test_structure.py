"""The observed structure: producers, unit maps and readers checked against brute-force perturbation."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_relu.structure import ObservationError, observe


class Branchy(nn.Module):
    """Concatenation, channel split, flatten, pooling, permute and a depthwise conv between sites and readers."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(2)
        self.act_a = nn.ReLU()
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.pw = nn.Conv2d(3, 5, 1)
        self.fc = nn.Linear(3 * 2 * 2, 7)
        self.head = nn.Linear(7, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.cat([F.relu(self.bn(self.b(x))), self.act_a(self.a(x))], dim=1)  # units: b 0-1, a 2-5
        z = self.dw(y)
        left, right = z.chunk(2, dim=1)
        out = self.pw(left) + 0.0 * right.sum()
        pooled = F.adaptive_avg_pool2d(right, 2).permute(0, 2, 3, 1).flatten(1)  # (N, 2*2*3): channel last
        return self.head(F.relu(self.fc(pooled))) + out.mean()


def _perturbation_map(model: nn.Module, x: Tensor, site_module: nn.Module, unit_dim: int, consumer: nn.Module):
    """Brute force: for each unit of the site, add 1 to its output and see which input columns/channels of
    ``consumer`` change. Returns {unit: set(columns)}."""
    captured: dict[str, Tensor] = {}
    bump: dict[str, int | None] = {"unit": None}

    def at_site(module, inputs, output):
        if bump["unit"] is None:
            return None
        output = output.clone()
        output.select(unit_dim, bump["unit"]).add_(1.0)
        return output

    def at_consumer(module, inputs):
        captured["x"] = inputs[0].detach().clone()

    handles = [site_module.register_forward_hook(at_site), consumer.register_forward_pre_hook(at_consumer)]
    try:
        with torch.no_grad():
            model(x)
            base = captured["x"]
            width = None
            result = {}
            for unit in range(10_000):
                bump["unit"] = unit
                try:
                    model(x)
                except IndexError:
                    break
                changed = captured["x"] != base
                axis = base.ndim - 1 if isinstance(consumer, nn.Linear) else 1
                per_column = changed.movedim(axis, 0).reshape(changed.shape[axis], -1).any(1)
                result[unit] = set(torch.nonzero(per_column).reshape(-1).tolist())
                width = width or base.shape[axis]
    finally:
        for handle in handles:
            handle.remove()
    return result


def _observed_map(consumers, module_name: str) -> dict[int, set[int]]:
    result: dict[int, set[int]] = {}
    for consumer in consumers:
        if consumer.name != module_name:
            continue
        for column, unit in zip(consumer.columns.tolist(), consumer.units.tolist(), strict=True):
            result.setdefault(unit, set()).add(column)
    return result


def test_unit_maps_equal_brute_force_perturbation() -> None:
    torch.manual_seed(0)
    model = Branchy().eval()
    x = torch.randn(2, 3, 4, 4)
    structure = observe(model, x)
    site = structure.sites["act_a"]
    assert site.producer is not None and site.producer.name == "a"
    assert site.unit_dim == 1 and site.num_units == 4
    truth = _perturbation_map(model, x, model.act_a, 1, model.dw)
    observed = _observed_map(site.consumers, "dw")
    assert observed == {unit: columns for unit, columns in truth.items() if columns}
    # the functional site: producer through a BatchNorm, read by the depthwise conv at channels 0-1
    functional = next(s for name, s in structure.sites.items() if name != "act_a" and s.num_units == 2)
    assert functional.producer is not None and functional.producer.name == "b"
    assert [n.name for n in functional.norms] == ["bn"]
    assert _observed_map(functional.consumers, "dw") == {0: {0}, 1: {1}}


def test_unit_map_through_pool_permute_flatten_to_linear() -> None:
    torch.manual_seed(0)
    model = Branchy().eval()
    x = torch.randn(2, 3, 4, 4)
    structure = observe(model, x)
    fc_site = next(s for s in structure.sites.values() if s.num_units == 7)
    assert fc_site.producer is not None and fc_site.producer.name == "fc"
    assert _observed_map(fc_site.consumers, "head") == {u: {u} for u in range(7)}


def test_a_residual_reader_and_the_model_output_are_reported() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)
            self.act = nn.ReLU()

        def forward(self, x: Tensor) -> Tensor:
            h = self.act(self.fc1(x))
            return self.fc2(h) + h

    structure = observe(Residual(), torch.randn(3, 4))
    site = structure.sites["act"]
    assert site.producer is not None and site.producer.name == "fc1"
    assert [c.name for c in site.consumers] == ["fc2"]
    assert any("add" in problem for problem in site.reader_problems)
    assert "revive" not in site.remedies and "rai" in site.remedies


def test_a_site_fed_by_a_sum_has_no_producer_and_says_why() -> None:
    class Sum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.out = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(3, 1)
            self.act = nn.ReLU()

        def forward(self, x: Tensor) -> Tensor:
            return self.out(self.act(self.a(x) + self.b(x)))

    site = observe(Sum(), torch.randn(2, 4)).sites["act"]
    assert site.producer is None and "combines several computed tensors" in (site.producer_problem or "")
    assert site.remedies == ()


def test_weight_standardisation_is_traced_to_its_parameter() -> None:
    class StdConv(nn.Conv2d):
        def forward(self, x: Tensor) -> Tensor:
            w = self.weight
            w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    model = nn.Sequential(StdConv(3, 4, 3), nn.ReLU(), StdConv(4, 2, 1))
    site = observe(model, torch.randn(2, 3, 5, 5)).sites["1"]
    assert site.producer is not None and site.producer.weight.parameter is model[0].weight
    assert site.producer.weight.computed
    # the reader's weight is standardised too: its columns cannot be zeroed, and the structure says so
    assert any("standardisation" in problem for problem in site.reader_problems)


def test_a_block_run_several_times_is_one_site_with_its_links() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down, self.act = nn.Linear(4, 6), nn.Linear(6, 4), nn.ReLU()

        def forward(self, x: Tensor) -> Tensor:
            return self.down(self.act(self.up(x)))

    class Shared(nn.Module):  # one block applied three times (ALBERT's shared layer)
        def __init__(self) -> None:
            super().__init__()
            self.block = Block()

        def forward(self, x: Tensor) -> Tensor:
            for _ in range(3):
                x = self.block(x)
            return x

    site = observe(Shared(), torch.randn(2, 4)).sites["block.act"]
    assert site.calls == 3
    assert site.producer is not None and site.producer.name == "block.up"
    assert {c.name for c in site.consumers} == {"block.down"}
    assert "revive" in site.remedies


def test_a_module_applied_at_several_places_is_one_site_per_place() -> None:
    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down, self.act = nn.Linear(4, 6), nn.Linear(6, 4), nn.ReLU()

        def forward(self, x: Tensor) -> Tensor:
            for _ in range(2):
                x = self.down(self.act(self.up(x)))
            return x

    sites = observe(Loop(), torch.randn(2, 4)).sites
    assert list(sites) == ["act", "act_1"]
    # the producer feeds both places: acting on it for one place would change the other
    assert all(site.producer is None and "elsewhere" in (site.producer_problem or "") for site in sites.values())


def test_a_producer_used_elsewhere_is_not_linked() -> None:
    class Elsewhere(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act, self.out = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.out(self.act(self.fc(x))) + self.fc(x).sum()

    site = observe(Elsewhere(), torch.randn(2, 4)).sites["act"]
    assert site.producer is None and "also used elsewhere" in (site.producer_problem or "")


def test_observing_changes_no_parameter_buffer_or_rng_state() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(16, 2)
    ).train()
    x = torch.randn(4, 3, 4, 4)
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    observe(model, x)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(torch.get_rng_state(), rng)
    assert int(model[1].num_batches_tracked) == 0


def test_keyword_and_positional_inputs() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act, self.out = nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1)

        def forward(self, x: Tensor, scale: Tensor) -> Tensor:
            return self.out(self.act(self.fc(x))) * scale

    model = TwoInputs()
    by_position = observe(model, (torch.randn(2, 4), torch.ones(1)))
    by_keyword = observe(model, {"x": torch.randn(2, 4), "scale": torch.ones(1)})
    assert by_position.sites["act"].producer is not None and by_keyword.sites["act"].producer is not None


def test_a_model_that_cannot_run_on_the_input_gets_a_clear_error() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    with pytest.raises(ObservationError, match="example_input"):
        observe(model, torch.randn(2, 5))


def test_the_table_names_every_site_and_its_remedies() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), nn.ReLU())
    table = observe(model, torch.randn(2, 4)).table()
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["site", "units", "producer"]
    assert lines[2].split()[:5] == ["1", "3", "0", "-", "2"]
    assert "revive" in lines[2]
    assert "reaches the model's output" in lines[3] and "revive" not in lines[3]


class _Untraceable(nn.Module):
    """A token MLP whose forward branches on data: the trace fails, so no layer fixes the site's unit axis."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 1e9:  # data-dependent control flow
            x = x * 0
        return self.fc2(self.act(self.fc1(x)))


def test_an_example_input_gives_the_tracker_the_producers_unit_axis() -> None:
    import warnings

    from lightning_relu import DeadUnitTracker

    torch.manual_seed(0)
    model = _Untraceable()
    with torch.no_grad():
        model.fc1.bias[[1, 4]] = -1e4
    x = torch.randn(2, 5, 4)  # (batch, tokens, features): 5 tokens, 6 units
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no rank-based guess: the first forward shows the producer
        first_forward = DeadUnitTracker(model)
        with first_forward:
            model(x)
    assert first_forward.report()["act"].num_units == 6
    observed = DeadUnitTracker(model, example_input=x)
    with observed:
        model(x)
    report = observed.report()["act"]
    assert report.num_units == 6
    truth = (model.act(model.fc1(x)) > 0).reshape(-1, 6).any(0).logical_not()
    assert torch.equal(report.dead, truth) and torch.nonzero(truth).reshape(-1).tolist() == [1, 4]


def test_the_monitor_observes_the_first_batch_for_unit_axes(tmp_path) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_relu import DeadUnitMonitor

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _Untraceable()

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return self.net(x).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    torch.manual_seed(0)
    module = Module()
    with torch.no_grad():
        module.net.fc1.bias[[2, 3]] = -1e4
    x = torch.randn(8, 5, 4)
    monitor = DeadUnitMonitor()
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_epochs=1, callbacks=[monitor], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(x), batch_size=4))
    report = monitor.last_report["net.act"]
    truth = (module.net.act(module.net.fc1(x)) > 0).reshape(-1, 6).any(0).logical_not()
    assert report.num_units == 6 and torch.equal(report.dead, truth)


def test_rai_acts_on_observed_producers_and_names_the_sites_it_cannot() -> None:
    from lightning_relu import rai_

    class Block(nn.Module):  # no nn.Sequential: only the observed forward links these layers
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.skip, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(4, 6), nn.Linear(6, 1)

        def forward(self, x: Tensor) -> Tensor:
            h = F.relu(self.fc1(x))
            return self.out(torch.relu(self.fc2(h) + self.skip(x)))

    torch.manual_seed(0)
    model = Block()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="combines several computed tensors"):
        rai_(model, generator=torch.Generator().manual_seed(0), example_input=torch.randn(3, 4))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"fc1.weight", "fc1.bias"}  # fc2 and skip feed a sum: no single producer


def test_observing_a_traced_model_leaves_batch_norm_state_alone() -> None:
    class Custom(nn.Module):  # not built-in only: discovery traces it
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))

    model = Custom().train()
    x = torch.randn(4, 3, 6, 6)
    state = copy.deepcopy(model.state_dict())
    structure = observe(model, x)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    site = next(iter(structure.sites.values()))
    assert site.producer is not None and site.producer.name == "conv"
    assert [c.name for c in site.consumers] == ["fc"] and "revive" in site.remedies


def test_a_transpose_by_attribute_keeps_the_unit_map() -> None:
    class Transposed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act, self.mix = nn.Linear(4, 3), nn.ReLU(), nn.Linear(5, 2)

        def forward(self, x: Tensor) -> Tensor:  # x: (features=4, samples=5) -> units on dim 1 after .T
            return self.mix(self.act(self.fc(x.T)).T)

    site = observe(Transposed(), torch.randn(4, 5)).sites["act"]
    assert site.producer is not None and site.producer.name == "fc"
    # the transpose puts the 3 units on the rows the Linear `mix` reads as its batch: no column carries one unit
    assert site.consumers == [] and any("several units" in p for p in site.reader_problems)


def test_the_watch_keeps_each_outermost_call_of_the_latest_training_step() -> None:
    from lightning_relu.structure import ModuleCall, RootCallWatch

    class Steps(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
            self.decoder = nn.Sequential(nn.Linear(3, 4), nn.ReLU())

        def forward(self, x: Tensor) -> Tensor:
            return self.decoder(self.encoder(x))

    model = Steps()
    x1, x2, x3 = (torch.randn(5, 4) for _ in range(3))
    watch = RootCallWatch(model).start()
    hidden = model.encoder(x1)  # a step calling two children, as `self.decoder(self.encoder(x))`
    model.decoder(hidden)
    examples = watch.examples(2)
    assert [e.module for e in examples] == ["encoder", "decoder"] and watch.root == "encoder"
    assert torch.equal(examples[0].args[0], x1[:2]) and torch.equal(examples[1].args[0], hidden[:2].detach())
    watch.active = False  # between steps (validation): not recorded
    model.decoder(torch.randn(5, 3))
    watch.active = True
    model(x2)  # a step through the model's forward: it reaches every site, the children inside it are not outermost
    assert [(e.module, torch.equal(e.args[0], x2)) for e in watch.examples(None)] == [("", True)]
    watch.active = False
    watch.active = True
    model.encoder(x3)
    model(x3)  # the model's own call, whatever else the step calls
    assert [e.module for e in watch.examples(None)] == [""]
    assert isinstance(watch.example(None), ModuleCall)
    watch.stop()
    model(x1)
    assert [e.module for e in watch.examples(None)] == [""] and torch.equal(watch.examples(None)[0].args[0], x3)


def test_reports_are_split_among_the_calls_that_hold_their_sites() -> None:
    from lightning_relu.structure import ModuleCall, split_by_call

    reports = {"encoder.1": "e", "decoder.1": "d", "decoder.relu": "f", "head.1": "h", "decoderx.1": "x"}
    enc, dec = ModuleCall("encoder", (1,)), ModuleCall("decoder", (2,))
    parts = split_by_call(reports, [enc, dec])
    # each site with the call of the child that holds it; those of no call with the first (which will say so)
    assert parts == [
        (enc, {"encoder.1": "e", "head.1": "h", "decoderx.1": "x"}),
        (dec, {"decoder.1": "d", "decoder.relu": "f"}),
    ]
    root = ModuleCall("", (1,))
    assert split_by_call(reports, [root, enc]) == [(root, reports)]  # the model's own call holds every site
    whole = torch.ones(2)
    assert split_by_call(reports, [whole]) == [(whole, reports)]
    assert split_by_call(reports, []) == []
    assert split_by_call({"decoder.1": "d"}, [enc, dec]) == [(dec, {"decoder.1": "d"})]


class _Scaled(nn.Module):
    """One site whose pre-activation is a known function of a Linear or of a BatchNorm after a convolution."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.fc = nn.Linear(4, 6)
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.gamma = nn.Parameter(torch.linspace(-2.0, 2.0, 6))
        self.head = nn.Linear(6, 1)

    def pre(self, x: Tensor) -> Tensor:
        if self.how == "x3-bn":  # a scale before the norm: the norm's bias reaches the site unscaled
            return self.bn(3 * self.conv(x))
        if self.how.startswith("bn"):
            h = self.bn(self.conv(x))
            return {"bn": lambda: h, "bn-neg": lambda: -h, "bn-x3": lambda: 3 * h}[self.how]()
        h = self.fc(x)
        g = self.gamma
        return {
            "x3": lambda: 3 * h,
            "neg2": lambda: h * -2.0,
            "rsub": lambda: 0.5 - h,
            "neg": lambda: -h,
            "div4": lambda: h / 4,
            "gamma": lambda: h * g,
            "gamma-sub": lambda: torch.sub(1.0 + 0 * g, h, alpha=2.0),
            "plain": lambda: h + 1.0,
        }[self.how]()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.pre(x))
        return self.head(out.mean((2, 3)) if out.ndim == 4 else out)


_SCALED = ["x3", "neg2", "rsub", "neg", "div4", "gamma", "gamma-sub", "plain", "bn", "bn-neg", "bn-x3", "x3-bn"]


@pytest.mark.parametrize("how", _SCALED)
def test_the_scale_from_the_shifted_bias_to_the_pre_activation_is_its_derivative(how: str) -> None:
    torch.manual_seed(0)
    model = _Scaled(how).eval()
    x = torch.randn(5, 3, 4, 4) if how.startswith("bn") or how == "x3-bn" else torch.randn(5, 4)
    site = observe(model, x).sites["relu"]
    assert site.producer is not None, site.producer_problem
    target = model.bn.bias if site.norms else model.fc.bias
    # brute force: per unit, how much the pre-activation moves when the bias it is shifted by moves by 1
    with torch.no_grad():
        before = model.pre(x)
        expected = []
        for unit in range(6):
            target[unit] += 1.0
            moved = model.pre(x) - before
            target[unit] -= 1.0
            expected.append(moved.select(1, unit).mean().item())
    got = torch.ones(6, dtype=torch.float64) if site.scale is None else site.scale
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5)


class _Between(nn.Module):
    """``out(relu(between(fc(x))))``: ``between`` is what the forward does to the Linear's output ``h`` before the
    rectifier reads what it returns."""

    def __init__(self, between: Callable[[Tensor], Tensor], width: int = 6) -> None:
        super().__init__()
        self.between, self.fc, self.out = between, nn.Linear(4, width), nn.Linear(width, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.relu(self.between(self.fc(x))))


@pytest.mark.parametrize(
    "pre", [lambda h: torch.div(torch.tensor(2.0), h), lambda h: torch.div(h, 2.0, rounding_mode="floor")]
)
def test_a_pre_activation_not_affine_in_its_producer_has_no_producer(pre) -> None:
    site = observe(_Between(pre, width=3), torch.randn(2, 4)).sites["relu"]
    assert site.producer is None and "not an affine function" in (site.producer_problem or "")


@pytest.mark.parametrize("how", ["detach_", "requires_grad_"])
def test_in_place_methods_that_write_no_value_keep_the_producer(how: str) -> None:
    def flag(h: Tensor) -> Tensor:
        p = h.detach()
        p.detach_() if how == "detach_" else p.requires_grad_()
        return h

    site = observe(_Between(flag), torch.randn(3, 4)).sites["relu"]
    assert site.producer is not None and site.producer.name == "fc", site.producer_problem


# how a view `v` of the pre-activation `h` (its first two units) is written in place before the rectifier reads `h`
_WRITES = {
    "neg_": lambda h, v: v.neg_(),
    "neg out=": lambda h, v: torch.neg(v, out=v),
    "mul out=": lambda h, v: torch.mul(v, -2.0, out=v),
    "setitem": lambda h, v: h.__setitem__((slice(None), 0), h[:, 0] + 5.0),
    "threshold": lambda h, v: F.threshold(v, -0.5, 1.0, True),  # `inplace` given by position
    "hardtanh": lambda h, v: F.hardtanh(v, -0.1, 0.1, inplace=True),
    "dropout": lambda h, v: F.dropout(v, 0.5, True, inplace=True),
    ".data": lambda h, v: v.data.mul_(-1.0),
}


@pytest.mark.parametrize("how", list(_WRITES))
def test_a_write_through_another_view_before_the_rectifier_is_seen(how: str) -> None:
    def write(h: Tensor) -> Tensor:
        _WRITES[how](h, h[:, :2])
        return h

    torch.manual_seed(0)
    model, x = _Between(write), torch.randn(16, 4)
    with torch.no_grad():  # brute force: the rectifier's input is not the Linear's output
        assert not torch.equal(_pre_of(model, x), model.fc(x))
    site = observe(model, x).sites["relu"]
    assert site.producer is None and "written in place through another view" in (site.producer_problem or "")


def _pre_of(model: nn.Module, x: Tensor) -> Tensor:
    """The input ``F.relu`` gets in ``model``'s forward (a spy that calls the real function)."""
    seen: list[Tensor] = []
    real = F.relu

    def spy(t: Tensor, *args: object, **kwargs: object) -> Tensor:
        seen.append(t.detach().clone())
        return real(t, *args, **kwargs)  # type: ignore[arg-type]

    F.relu = spy  # type: ignore[assignment]
    try:
        with torch.no_grad():
            model(x)
    finally:
        F.relu = real  # type: ignore[assignment]
    return seen[0]


def test_a_write_into_one_chunk_of_a_sites_output_keeps_the_other_chunks_reader() -> None:
    class Chunked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act, self.fc_a, self.fc_b = nn.Linear(4, 8), nn.ReLU(), nn.Linear(4, 1), nn.Linear(4, 1)

        def forward(self, x: Tensor) -> Tensor:
            a, b = self.act(self.fc(x)).chunk(2, 1)
            a.mul_(0.5)
            return self.fc_a(a) + self.fc_b(b)

    site = observe(Chunked(), torch.randn(3, 4)).sites["act"]
    maps = {c.name: sorted(c.units.tolist()) for c in site.consumers}
    assert maps == {"fc_a": [0, 1, 2, 3], "fc_b": [4, 5, 6, 7]} and not site.reader_problems


def test_reading_a_view_as_a_number_is_not_a_write() -> None:
    def read(h: Tensor) -> Tensor:
        int(h[0, 0])  # `__int__` of a view of `h`: a read
        return h

    site = observe(_Between(read), torch.randn(3, 4)).sites["relu"]
    assert site.producer is not None and site.producer.name == "fc", site.producer_problem


def test_a_write_into_a_sites_output_before_its_reader_is_a_reader_problem() -> None:
    class Copied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act, self.fc2 = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1)

        def forward(self, x: Tensor) -> Tensor:
            a = self.act(self.fc(x))
            a[:, 0] = a[:, 1]  # column 0 of fc2 now reads unit 1
            return self.fc2(a)

    site = observe(Copied(), torch.randn(3, 4)).sites["act"]
    assert any("written in place through another view" in p for p in site.reader_problems), site.reader_problems
    assert "revive" not in site.remedies
