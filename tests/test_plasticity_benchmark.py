"""Smoke test of the plasticity benchmark (``benchmarks/plasticity``): a tiny grid, the JSON's shape, and properties
of the baselines and measurements that must hold whatever the results."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from benchmarks.plasticity import Config, Setting, run_grid
from benchmarks.plasticity.__main__ import main
from benchmarks.plasticity.methods import METHODS, ContinualBackprop, ReDo, reinitialize_units
from benchmarks.plasticity.metrics import dormant_scores, effective_rank, interval
from benchmarks.plasticity.models import build_model, hidden_layers
from benchmarks.plasticity.problems import make_problem
from benchmarks.plasticity.report import replace_section, tables

TINY = Config(
    settings=(
        Setting("permuted", "mlp", (8, 8), tasks=2, steps_per_task=6, batch_size=4),
        Setting("random_labels", "cnn", (2, 2, 4), tasks=2, steps_per_task=6, batch_size=4),
        Setting("regression", "mlp", (3,), tasks=2, steps_per_task=6, batch_size=1),
    ),
    seeds=(0,),
    redo_period=3,
    revival_period=3,
    cbp_maturity=2,
    cbp_rate=0.1,
    processes=1,
)


def test_grid_shape() -> None:
    runs = run_grid(TINY)
    assert len(runs) == len(TINY.settings) * len(TINY.optimizers) * len(TINY.methods) * len(TINY.seeds)
    keys = {(r["setting"], r["optimizer"], r["method"], r["seed"]) for r in runs}
    assert len(keys) == len(runs)
    assert {r["method"] for r in runs} == set(METHODS)
    for run in runs:
        assert run["steps"] == 12 and len(run["tasks"]) == 2
        assert run["cpu_seconds"] > 0 and run["wall_seconds"] > 0
        for task in run["tasks"]:
            assert 0.0 <= task["dead_fraction"] <= task["dormant_fraction"] <= 1.0  # dead units score 0: dormant
            assert task["effective_rank"] >= 0.0 and math.isfinite(task["online_loss"])
            if not run["setting"].startswith("regression"):
                assert 0.0 <= task["accuracy"] <= 1.0
        if run["method"] in ("none", "rai", "sign_flip"):
            assert run["units_reset"] == 0
    text = tables(runs, TINY.methods)
    assert text.count("| no remedy |") == len(TINY.settings) * len(TINY.optimizers)
    json.dumps(runs)  # raw results are JSON-ready


def test_main_writes_json(tmp_path, monkeypatch) -> None:
    import benchmarks.plasticity.__main__ as entry

    monkeypatch.setattr(entry, "QUICK", replace(TINY, settings=TINY.settings[:1], seeds=(0, 1)))
    result = main(["--quick", "--out", str(tmp_path), "--processes", "1", "--no-plots"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["seeds"] == [0, 1] and len(saved["runs"]) == len(result["runs"])
    assert {"date", "machine", "seconds", "config", "runs"} <= saved.keys()
    assert (tmp_path / "tables.md").read_text().count("####") == 2  # one setting, two optimizers


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return build_model("mlp", (6,), 2, (5, 4))


def test_redo_infinite_tau_resets_every_unit() -> None:
    problem = make_problem("regression", 0, 1, 1)
    model = build_model("mlp", problem.input_shape, 1, (5, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    redo = ReDo(model, optimizer, torch.Generator().manual_seed(0), tau=math.inf, period=1, score_batch=8)
    redo.after_step(1, problem)
    assert redo.units_reset == 5 + 4
    # every unit of the last hidden layer has zero outgoing weights: the network outputs its output bias
    assert torch.count_nonzero(model[4].weight) == 0
    assert torch.equal(model(problem.sample(16)), model[4].bias.expand(16, 1))


def test_redo_zero_tau_resets_only_silent_units() -> None:
    model = _mlp()
    with torch.no_grad():
        model[0].bias[:2] = -1e3  # two units of the first layer never fire
    problem_x = torch.randn(32, 6)
    redo = ReDo(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.Generator().manual_seed(0), 0.0, 1, 32)
    dormant = redo.dormant(problem_x)
    assert dormant[0].tolist() == [0, 1]


def test_cbp_replacement_count_matches_rate() -> None:
    rate, steps, widths = 0.03, 200, (5, 4)
    problem = make_problem("regression", 0, 1, steps)
    problem.start_task(0)
    torch.manual_seed(0)
    model = build_model("mlp", problem.input_shape, 1, widths)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    cbp = ContinualBackprop(model, optimizer, torch.Generator().manual_seed(0), rate=rate, decay=0.99, maturity=0)
    for step in range(1, steps + 1):
        x, y = problem.batch()
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        cbp.after_step(step, problem)
    # maturity 0: every unit is eligible at every step (a replaced unit is one step old at the next check), so a
    # layer of n units accumulates rate * n per step and has replaced floor(rate * n * steps) units in all
    expected = sum(math.floor(rate * n * steps + 1e-9) for n in widths)
    assert abs(cbp.units_reset - expected) <= len(widths)  # float accumulation may lose one per layer
    assert all(int(age.max()) <= steps for age in cbp.age)


def test_reinitialize_units_keeps_function_and_clears_state() -> None:
    model = _mlp()
    with torch.no_grad():
        model[0].bias[[1, 3]] = -1e3  # units 1 and 3 are dead: removing them does not change the output
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x = torch.randn(16, 6)
    model(x).sum().backward()
    optimizer.step()
    before = model(x).detach()
    layer = hidden_layers(model)[0]
    reinitialize_units(layer, torch.tensor([1, 3]), torch.Generator().manual_seed(0), optimizer)
    assert torch.allclose(model(x), before, atol=1e-6)  # outgoing weights zeroed: the output is unchanged
    state = optimizer.state[model[0].weight]
    assert torch.count_nonzero(state["exp_avg"][[1, 3]]) == 0
    assert torch.count_nonzero(optimizer.state[model[0].bias]["exp_avg"][[1, 3]]) == 0
    assert torch.count_nonzero(state["exp_avg"][[0, 2, 4]]) > 0  # the other units keep theirs
    assert torch.count_nonzero(optimizer.state[model[2].weight]["exp_avg_sq"][:, [1, 3]]) == 0


def test_cnn_columns_follow_the_flatten() -> None:
    torch.manual_seed(0)
    model = build_model("cnn", (1, 8, 8), 10, (2, 3, 4))
    layers = hidden_layers(model)
    assert [type(layer.consumer).__name__ for layer in layers] == ["Conv2d", "Linear", "Linear"]
    # 3 channels of 2x2 after the second pooling: channel 1 feeds columns 4..7 of the dense layer
    assert layers[1].columns(torch.tensor([1])).tolist() == [4, 5, 6, 7]
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        model[3].bias[1] = -1e3  # channel 1 of the second conv layer is dead
    before = model(x).detach()
    reinitialize_units(
        layers[1], torch.tensor([1]), torch.Generator().manual_seed(0), torch.optim.SGD(model.parameters(), lr=0.1)
    )
    assert torch.allclose(model(x), before, atol=1e-6)


@pytest.mark.parametrize("n", [1, 3, 7])
def test_effective_rank_closed_forms(n: int) -> None:
    assert effective_rank(torch.eye(n)) == pytest.approx(n)  # equal singular values: exp(log n)
    assert effective_rank(3.0 * torch.eye(n)) == pytest.approx(n)  # scale-free
    assert effective_rank(torch.ones(n, 4)) == pytest.approx(1.0)  # rank one
    assert effective_rank(torch.zeros(n, 4)) == 0.0
    # diag(a, b): p = (a, b) / (a + b), erank = exp(-p log p - q log q)
    a, b = 3.0, 1.0
    p, q = a / (a + b), b / (a + b)
    closed_form = math.exp(-p * math.log(p) - q * math.log(q))
    assert effective_rank(torch.diag(torch.tensor([a, b]))) == pytest.approx(closed_form)


def test_dormant_scores_and_interval() -> None:
    h = torch.tensor([[0.0, 1.0, 3.0], [0.0, 3.0, 1.0]])  # unit means 0, 2, 2; layer mean 4/3
    assert dormant_scores(h).tolist() == pytest.approx([0.0, 1.5, 1.5])
    assert dormant_scores(torch.zeros(4, 3)).tolist() == [0.0, 0.0, 0.0]
    mean, half = interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert math.isnan(interval([1.0])[1])


def test_problem_properties() -> None:
    problem = make_problem("regression", 3, 3, 10)
    problem.start_task(0)
    x0 = problem.sample(64)
    assert x0[:, -1].eq(1).all() and ((x0 == 0) | (x0 == 1)).all()
    assert (x0[:, :15] == x0[:1, :15]).all()  # the flipping bits are shared by every example of a period
    problem.start_task(1)
    x1 = problem.sample(1)
    assert int((x1[0, :15] != x0[0, :15]).sum()) == 1  # exactly one bit flipped
    labels = make_problem("random_labels", 0, 2, 1)
    labels.start_task(0)
    first = labels.labels.clone()
    labels.start_task(1)
    assert not torch.equal(first, labels.labels)
    with pytest.raises(ValueError, match="`problem` can be"):
        make_problem("mnist", 0, 1, 1)


def test_replace_section() -> None:
    text = "a\n<!-- results:begin -->\nold\n<!-- results:end -->\nb"
    assert replace_section(text, "results", "new") == "a\n<!-- results:begin -->\nnew\n<!-- results:end -->\nb"
    with pytest.raises(ValueError, match="markers"):
        replace_section("nothing", "results", "x")


def test_the_ci_shape_check_accepts_a_run_and_names_what_is_missing(tmp_path, monkeypatch) -> None:
    import benchmarks.plasticity.__main__ as entry
    from benchmarks.plasticity.check import check

    monkeypatch.setattr(entry, "QUICK", replace(TINY, settings=TINY.settings[:1], seeds=(0,)))
    result = json.loads(json.dumps(main(["--quick", "--out", str(tmp_path), "--processes", "1", "--no-plots"])))
    assert check(result) == []
    broken = {**result, "runs": [{k: v for k, v in run.items() if k != "tasks"} for run in result["runs"]]}
    assert check(broken)[0] == "run 0: missing ['tasks']"
    assert check({**result, "runs": result["runs"][1:]})[0].endswith(f"the config asks for {len(result['runs'])}")
