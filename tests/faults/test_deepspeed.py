"""DeepSpeed on 2 CPU processes (gloo, ``DS_ACCELERATOR=cpu``), ZeRO stages 1, 2 and 3 (issue 20, item 5).

DeepSpeed keeps fp32 master weights of its own (stages 1 and 2: partitions in its optimizer; stage 3: the parameters
themselves are partitioned), so a unit revived in the model would be reverted by the next ``engine.step()``. Counting
works (the tracker observes activations); ``rai_``, ``sign_flip_``, ``revive_dead_units_`` and the reviver refuse
the engine, its module, its optimizer and Lightning's ``DeepSpeedStrategy`` with a clear error before changing
anything. The processes start once for the module (a start costs more than the work); each rank saves what it saw
and the tests assert on it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_relu import DeadUnitReviver, DeadUnitTracker, rai_, revive_dead_units_, sign_flip_
from tests.faults.engines import error_of
from tests.helpers import kill_units, mlp

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None,
        reason="DeepSpeed is not installed (optional: `pip install -e .[deepspeed]`)",
    ),
]

STAGES = (1, 2, 3)
WIDTHS = [4, 8, 8, 1]
DEAD = [1, 2]  # units of the first layer forced dead
LR = 0.1


def _model() -> torch.nn.Sequential:
    model = mlp(WIDTHS, seed=0)
    kill_units(model, 0, DEAD)
    return model


def _inputs(rank: int) -> torch.Tensor:
    return torch.randn(16, 4, generator=torch.Generator().manual_seed(10 + rank))


def _snapshot(engine: Any) -> list[torch.Tensor]:
    """Everything that holds the weights: the module's parameters (ZeRO-3: their local partitions) and the full fp32
    master weights, assembled by DeepSpeed's public accessor (a collective under ZeRO-3: every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    tensors = []
    for param in engine.module.parameters():
        tensors.append((param.ds_tensor if hasattr(param, "ds_tensor") else param).detach().clone())
        tensors.append(safe_get_full_fp32_param(param).detach().clone())
    return tensors


def _full_weights(engine: Any) -> list[torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    return [safe_get_full_fp32_param(param).detach().clone() for param in engine.module.parameters()]


def _stage(rank: int, stage: int) -> dict[str, Any]:
    import deepspeed

    x = _inputs(rank)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    config = {
        "train_micro_batch_size_per_gpu": 16,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # a torch optimizer: nothing is compiled
        "gradient_clipping": 0.0,  # the hand-computed step below clips nothing
    }
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    results: dict[str, Any] = {"optimizer": f"{type(ds_optimizer).__module__}.{type(ds_optimizer).__name__}"}
    with DeadUnitTracker(engine.module) as tracker:
        engine(x)
    report = tracker.report()  # summed over the ranks: every rank calls it
    results["counts"] = {name: (r.active_count.tolist(), int(r.samples)) for name, r in report.items()}

    before = _snapshot(engine)
    plain = _model()
    calls = {
        "rai_(engine)": lambda: rai_(engine, generator=torch.Generator().manual_seed(0)),
        "rai_(module)": lambda: rai_(engine.module, generator=torch.Generator().manual_seed(0)),
        "sign_flip_(engine)": lambda: sign_flip_(engine, x),
        "sign_flip_(module)": lambda: sign_flip_(engine.module, x),
        "revive_dead_units_(engine)": lambda: revive_dead_units_(engine, report, ds_optimizer, example_input=x),
        "revive_dead_units_(module)": lambda: revive_dead_units_(engine.module, report, example_input=x),
        "revive_dead_units_(module, optimizer)": lambda: revive_dead_units_(
            engine.module, report, ds_optimizer, example_input=x
        ),
        "revive_dead_units_(plain, optimizer)": lambda: revive_dead_units_(plain, report, ds_optimizer),
        "DeadUnitReviver(module)": lambda: DeadUnitReviver().on_fit_start(None, engine.module),  # type: ignore[arg-type]
    }
    results["errors"] = {name: error_of(call) for name, call in calls.items()}
    results["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, _snapshot(engine), strict=True))
    results["plain unchanged"] = all(
        torch.equal(a, b) for a, b in zip(plain.parameters(), _model().parameters(), strict=True)
    )

    # one step after the refusals: the same update as on an untouched model (gradients averaged over the ranks)
    loss = engine(x).sum()
    engine.backward(loss)
    engine.step()
    results["stepped"] = _full_weights(engine)
    return results


def _stage0(rank: int) -> dict[str, Any]:
    """ZeRO stage 0 in fp32 keeps no master weights (its optimizer is the torch one): `rai_` is not refused, and what
    it writes stays through the next step."""
    import deepspeed

    model = _model()
    config = {"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0}
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=config
    )
    error = error_of(lambda: rai_(engine.module, generator=torch.Generator().manual_seed(0)))
    loss = engine(_inputs(rank)).sum()
    engine.backward(loss)
    engine.step()
    return {"error": error, "stepped": [p.detach().clone() for p in engine.module.parameters()]}


def _expected_step(rai: bool = False) -> list[torch.Tensor]:
    """One SGD step of the model (after `rai_` on it, seeded as on the engine) on the gradients averaged over both
    ranks' inputs, computed by hand."""
    model = _model()
    if rai:
        rai_(model, generator=torch.Generator().manual_seed(0))
    grads = [torch.zeros_like(p) for p in model.parameters()]
    for rank in (0, 1):
        model.zero_grad()
        model(_inputs(rank)).sum().backward()
        grads = [g + p.grad / 2 for g, p in zip(grads, model.parameters(), strict=True)]
    with torch.no_grad():
        return [p - LR * g for p, g in zip(model.parameters(), grads, strict=True)]


def _lightning_strategy(rank: int) -> dict[str, Any]:
    """The reviver's `on_fit_start` under Lightning's `DeepSpeedStrategy`: the strategy refuses the CPU accelerator in
    a fit, but the instance is built without a GPU; a stub trainer carries it."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    model = _model()
    before = [p.clone() for p in model.parameters()]
    trainer = types.SimpleNamespace(strategy=DeepSpeedStrategy(stage=2))
    error = error_of(lambda: DeadUnitReviver().on_fit_start(trainer, model))  # type: ignore[arg-type]
    unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    return {"error": error, "unchanged": unchanged}


def _rank(rank: int, port: int, root: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        DS_ACCELERATOR="cpu",
    )
    import deepspeed.ops

    # DeepSpeed's CPU communication backend would compile a shared-memory all-reduce op (a C++ build of minutes on
    # first use); marked incompatible, DeepSpeed uses gloo, as on platforms that lack it. This process only.
    deepspeed.ops.__compatible_ops__ = {**deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm": False}
    deepspeed.init_distributed(dist_backend="gloo")
    results = {stage: _stage(rank, stage) for stage in STAGES}
    results[0] = _stage0(rank)
    results["lightning"] = _lightning_strategy(rank)
    torch.save(results, Path(root) / f"deepspeed_rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("deepspeed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank, args=(port, str(root)), nprocs=2)
    return [torch.load(root / f"deepspeed_rank{rank}.pt", weights_only=False) for rank in (0, 1)]


def test_counts_on_the_engines_module_are_exact_under_zero_1_2_3(runs: list[dict[str, Any]]) -> None:
    model = _model()
    expected: dict[str, tuple[list[int], int]] = {}
    with torch.no_grad():  # brute force over both ranks' samples
        for rank in (0, 1):
            h1 = torch.relu(model[0](_inputs(rank)))
            h2 = torch.relu(model[2](h1))
            for name, out in (("1", h1), ("3", h2)):
                counts, samples = expected.get(name, ([0] * out.shape[1], 0))
                expected[name] = ([c + int(n) for c, n in zip(counts, (out > 0).sum(0), strict=True)], samples + 16)
    assert all(expected["1"][0][unit] == 0 for unit in DEAD)
    for run in runs:
        for stage in STAGES:
            assert run[stage]["counts"] == expected, stage


@pytest.mark.parametrize("stage", STAGES)
def test_revival_and_initializers_refuse_the_engine_its_module_and_its_optimizer(
    runs: list[dict[str, Any]], stage: int
) -> None:
    optimizer = {1: "stage_1_and_2.DeepSpeedZeroOptimizer", 2: "stage_1_and_2.DeepSpeedZeroOptimizer"}.get(
        stage, "stage3.DeepSpeedZeroOptimizer_Stage3"
    )
    module_why = "partitioned by DeepSpeed ZeRO stage 3" if stage == 3 else "copies of fp32 master weights"
    for run in runs:
        results = run[stage]
        assert results["optimizer"] == f"deepspeed.runtime.zero.{optimizer}"
        errors = results["errors"]
        for call, argument in (("rai_", "module"), ("sign_flip_", "model"), ("revive_dead_units_", "model")):
            engine = errors[f"{call}(engine)"]
            assert re.match(
                rf"ValueError: `{call}` cannot write into `{argument}`: it is a DeepSpeed engine "
                rf"\(`DeepSpeedEngine`, ZeRO stage {stage}\)\. .*next `engine\.step\(\)` would copy them back.*"
                "Nothing was changed",
                engine,
            ), engine
        for call in ("rai_(module)", "sign_flip_(module)", "revive_dead_units_(module)"):
            name, argument = call.split("(")[0], "module" if call.startswith("rai_") else "model"
            message = errors[call]
            assert re.match(
                rf"ValueError: `{name}` cannot write into `{argument}`: its parameters '0\.weight', '0\.bias', "
                rf"'2\.weight', \.\.\. \(6 in all\) are {module_why}.*Nothing was changed",
                message,
            ), message
        # the module is refused before its optimizer is looked at; a plain model with the engine's optimizer is not
        assert errors["revive_dead_units_(module, optimizer)"] == errors["revive_dead_units_(module)"]
        message = errors["revive_dead_units_(plain, optimizer)"]
        assert re.match(
            rf"ValueError: `revive_dead_units_` cannot use `optimizer`: it is a DeepSpeed optimizer "
            rf"\(`{optimizer.split('.')[1]}` of `deepspeed\.runtime\.zero\.{optimizer.split('.')[0]}`\).*"
            "Nothing was changed",
            message,
        ), message
        assert re.match(
            r"ValueError: `DeadUnitReviver` cannot write into `pl_module`: its parameters",
            errors["DeadUnitReviver(module)"],
        )
        assert results["unchanged"] and results["plain unchanged"]


@pytest.mark.parametrize("stage", STAGES)
def test_the_step_after_the_refusals_is_the_step_of_an_untouched_model(runs: list[dict[str, Any]], stage: int) -> None:
    expected = _expected_step()
    for run in runs:
        for got, want in zip(run[stage]["stepped"], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_reviver_refuses_lightnings_deepspeed_strategy_at_fit_start(runs: list[dict[str, Any]]) -> None:
    for run in runs:
        message = run["lightning"]["error"]
        assert re.match(
            r"ValueError: `DeadUnitReviver` cannot write into `pl_module`: the trainer's strategy is "
            r"`DeepSpeedStrategy`, which wraps the model in a DeepSpeed engine\. .*Nothing was changed",
            message,
        ), message
        assert run["lightning"]["unchanged"]


def test_zero_stage_0_in_fp32_is_not_refused_and_keeps_what_rai_wrote_through_the_step(
    runs: list[dict[str, Any]],
) -> None:
    expected, untouched = _expected_step(rai=True), _expected_step()
    assert not torch.allclose(expected[0], untouched[0])  # rai_ changed the first layer
    for run in runs:
        assert run[0]["error"] == "no error"
        for got, want in zip(run[0]["stepped"], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
