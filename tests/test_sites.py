from __future__ import annotations

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


def test_custom_module_has_no_producer_without_a_sequential():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.act = nn.ReLU()
            self.head = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

        def forward(self, x):
            return self.head(self.act(self.fc(x)))

    sites = _by_name(Block())
    assert list(sites) == ["act", "head.1"]
    assert sites["act"].producer is None and sites["act"].num_units is None and sites["act"].unit_dim is None
    assert sites["head.1"].producer_name == "head.0"


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
