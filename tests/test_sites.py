from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_relu import find_relu_sites


def _by_name(model):
    return {site.name: site for site in find_relu_sites(model)}


def test_mlp_links_producer_and_consumer():
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU6(), nn.Linear(4, 1))
    sites = _by_name(net)
    assert list(sites) == ["1", "3"]
    assert sites["1"].producer is net[0] and sites["1"].producer_name == "0"
    assert [c.module for c in sites["1"].consumers] == [net[2]]
    assert sites["3"].producer is net[2] and sites["3"].num_units == 4 and sites["3"].unit_dim == -1
    assert sites["3"].consumers[0].module is net[4] and not sites["3"].consumers[0].through_flatten


def test_conv_bn_relu_pool_flatten_linear():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Dropout(0.1),
        nn.Flatten(),
        nn.Linear(8 * 4, 2),
    )
    (site,) = find_relu_sites(net)
    assert site.producer is net[0] and site.norm is net[1] and site.norm_name == "1"
    assert site.num_units == 8 and site.unit_dim == 1
    assert len(site.consumers) == 1
    assert site.consumers[0].module is net[6] and site.consumers[0].through_flatten


def test_nested_sequentials_are_followed_across_boundaries():
    block = nn.Sequential(nn.Conv1d(2, 4, 1), nn.GroupNorm(2, 4))
    net = nn.Sequential(block, nn.Sequential(nn.ReLU(), nn.Conv1d(4, 3, 1)))
    (site,) = find_relu_sites(net)
    assert site.name == "1.0"
    assert site.producer is block[0] and site.producer_name == "0.0"
    assert site.norm is block[1] and site.norm_name == "0.1"
    assert site.consumers[0].name == "1.1"


def test_layernorm_unit_dim_is_last():
    net = nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.ReLU())
    (site,) = find_relu_sites(net)
    assert site.norm is net[1] and site.num_units == 6 and site.unit_dim == -1
    assert site.consumers == []


def test_custom_module_links_come_from_an_observed_forward():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.act = nn.ReLU()
            self.head = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

        def forward(self, x):
            return self.head(self.act(self.fc(x)))

    block = Block()
    sites = {site.name: site for site in find_relu_sites(block, example_input=torch.randn(2, 3))}
    assert list(sites) == ["act", "head.1"]
    assert sites["act"].producer is block.fc and sites["act"].num_units == 4 and sites["act"].unit_dim == -1
    assert [c.module for c in sites["act"].consumers] == [block.head[0]]
    assert sites["head.1"].producer_name == "head.0"
    # without an example, only `nn.Sequential` order links: the custom forward is not read
    untraced = _by_name(block)
    assert untraced["head.1"].producer is block.head[0]
    assert untraced["act"].producer is None and untraced["act"].num_units is None and untraced["act"].unit_dim is None


def test_inconsistent_widths_are_not_guessed():
    net = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(5), nn.ReLU())
    (site,) = find_relu_sites(net)
    assert site.producer is None and site.norm is None and site.num_units is None


def test_other_layers_break_the_chain():
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.ReLU(), nn.Softmax(dim=-1), nn.Linear(6, 2))
    (site,) = find_relu_sites(net)
    assert site.producer is None and site.consumers == []


def test_no_relu_returns_empty_list():
    assert find_relu_sites(nn.Sequential(nn.Linear(2, 2), nn.Sigmoid())) == []


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.bn = nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(5, 4)
        self.inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def forward(self, x):
        h = F.relu(self.bn(self.fc1(x)))
        h = self.fc2(h).relu()
        h = self.inner(h)
        return torch.relu_(h + 1) + F.relu6(h)


def test_functional_sites_are_observed_with_links():
    model = _Functional()
    # without an example nothing runs: the functional calls are not seen (a tracker finds them on its first forward)
    assert [s.name for s in find_relu_sites(model)] == ["inner.1"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sites = find_relu_sites(model, example_input=torch.randn(6, 3))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BatchNorm statistics untouched
    assert [(s.name, s.kind) for s in sites] == [
        ("relu", "function"),
        ("relu_1", "function"),
        ("inner.1", "module"),
        ("relu_2", "function"),
        ("relu6", "function"),
    ]
    first = sites[0]
    assert first.module is None and first.parent is model and first.parent_name == ""
    assert first.producer is model.fc1 and first.norm is model.bn and first.num_units == 5
    assert [c.module for c in first.consumers] == [model.fc2]
    assert sites[1].producer is model.fc2 and [c.module for c in sites[1].consumers] == [model.inner[0]]
    assert sites[3].producer is None  # reads an addition


def test_residual_block_links():
    from tests.test_tracker import _BasicBlock

    net = nn.Sequential(nn.Conv2d(3, 4, 1), _BasicBlock(4))
    sites = {site.name: site for site in find_relu_sites(net, example_input=torch.randn(2, 3, 5, 5))}
    assert list(sites) == ["1.relu", "1.relu_1"]
    assert sites["1.relu"].producer is net[1].conv1 and sites["1.relu"].norm is net[1].bn1
    assert [c.module for c in sites["1.relu"].consumers] == [net[1].conv2]
    assert sites["1.relu_1"].module is net[1].relu and sites["1.relu_1"].call_index == 1
    assert sites["1.relu_1"].producer is None and sites["1.relu_1"].consumers == []


def test_data_dependent_control_flow_shows_the_branch_the_forward_takes():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.act = nn.ReLU()

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return F.relu(self.fc(x))
            return self.act(self.fc(x))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), DataDependent())
    with torch.no_grad():
        net[0].bias.fill_(1.0)  # the ReLU's output sums to more than 0: the functional branch runs
    sites = find_relu_sites(net, example_input=torch.randn(4, 3) * 0.01)
    # reached sites in forward order, then the module the forward did not reach
    assert [(s.name, s.kind) for s in sites] == [("1", "module"), ("2.relu", "function"), ("2.act", "module")]
    assert sites[0].producer is net[0] and sites[1].producer is net[2].fc and sites[2].producer is None


def test_invalid_trace_argument():
    with pytest.raises(ValueError, match="`trace` must be a bool, got 'yes'"):
        find_relu_sites(nn.ReLU(), trace="yes")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------ site keys
class _Clashing(nn.Module):
    """Module names chosen to collide with display names: `relu` is a module and a functional call of the root,
    `relu_1` and `relu_fn` are modules too, and `act` (applied three times) has a neighbour named `act_1`."""

    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU()
        self.relu_1 = nn.Identity()
        self.relu_fn = nn.Identity()
        self.act = nn.ReLU()
        self.act_1 = nn.Linear(3, 3)

    def forward(self, x):
        x = self.relu_fn(self.relu_1(self.relu(x)))
        x = self.act(self.act(self.act_1(x)) - 0.1)
        x = self.act(x + 0.1)
        return F.relu6(F.relu(x) - 0.2) + F.relu(x - 0.3)


def test_display_names_of_distinct_keys_never_collide_nor_name_another_module():
    from lightning_relu.site import SiteKey, module_names, site_name

    model = _Clashing()
    names = module_names(model)
    keys = [SiteKey(path, k) for path in ("relu", "act") for k in range(8)]
    keys += [SiteKey(path, k, f) for path in ("", "act", "relu") for f in ("relu", "relu6") for k in range(8)]
    shown = [site_name(key, names) for key in keys]
    assert len(set(shown)) == len(shown)  # one name per key
    # only a module's own first call position carries a module's name
    assert {name for key, name in zip(keys, shown, strict=True) if name in names} == {"relu", "act"}
    assert [site_name(k, names) for k in keys if k.call == 0 and not k.function] == ["relu", "act"]
    assert site_name(SiteKey("act", 1), names) == "act_1_mod"  # `act_1` is another module
    assert site_name(SiteKey("", 0, "relu"), names) == "relu_fn_fn"  # `relu` and `relu_fn` are modules
    assert site_name(SiteKey("act", 2, "relu6"), names) == "act.relu6_2"
    assert site_name(SiteKey("act", 2, "relu6", 0), names) == "act.relu6"  # shown as its function's first call


def test_sites_found_on_a_forward_carry_their_keys_and_the_names_derived_from_them():
    from lightning_relu import DeadUnitTracker
    from lightning_relu.site import SiteKey, module_names, site_name

    model = _Clashing()
    with DeadUnitTracker(model) as tracker:
        model(torch.randn(4, 3))
    keys = {site.name: site.key for site in tracker.sites}
    assert keys == {
        "relu": SiteKey("relu"),
        "act": SiteKey("act"),
        "act_1_mod": SiteKey("act", 1),
        "act_2": SiteKey("act", 2),
        "relu_fn_fn": SiteKey("", 0, "relu"),
        "relu6": SiteKey("", 1, "relu6"),
        "relu_1_fn": SiteKey("", 2, "relu"),
    }
    assert all(site.name == site_name(site.key, module_names(model)) for site in tracker.sites)
    # the observed discovery gives the same keys and names
    observed = find_relu_sites(model, example_input=torch.randn(4, 3))
    assert {site.name: site.key for site in observed} == keys


def test_names_of_positions_a_forward_creates_are_accepted_before_it_and_others_refused():
    from lightning_relu import DeadUnitTracker

    model = _Clashing()
    tracker = DeadUnitTracker(model, sites=["act_2", "relu6", "relu_1_fn"])
    with tracker:
        model(torch.randn(4, 3))
    assert sorted(tracker.stats) == ["act_2", "relu6", "relu_1_fn"]
    # `act_1` is a Linear, not the second call of `act` (that is `act_1_mod`)
    with pytest.raises(ValueError, match=r"unknown site names \['act_1'\]"), DeadUnitTracker(model, sites=["act_1"]):
        model(torch.randn(4, 3))
