"""DeepSpeed on 2 CPU processes (gloo, ``DS_ACCELERATOR=cpu``), ZeRO stages 0 to 3 (issue 20, item 5).

DeepSpeed keeps fp32 master weights of its own (stages 1 and 2: partitions in its optimizer; stage 3: the parameters
themselves are partitioned), so a unit revived in the model alone would be reverted by the next ``engine.step()``.
Counting works (the tracker observes activations). Under ZeRO stages 1, 2 and 3 (ZeRO-3 with
``"memory_efficient_linear": false``), ``rai_``, ``sign_flip_`` and ``revive_dead_units_`` write through the
partitions, the fp32 masters and the optimizer state: each rank with data of its own, every rank ends with the module,
masters and momentum of one process on rank 0's data, through the next steps; a call failing on one rank changes
nothing. ZeRO-3 with its default ``memory_efficient_linear`` (it replaces ``torch.nn.functional.linear`` for the
whole process), and Lightning's ``DeepSpeedStrategy`` (``DeadUnitReviver``, ``ReluInitializer``) are refused with a
clear error before anything changes. ZeRO stage 0 in fp32 keeps no masters and needs nothing. The processes start once
for the module (a start costs more than the work); each rank saves what it saw and the tests assert on it.
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

from lightning_relu import DeadUnitReviver, DeadUnitTracker, ReluInitializer, rai_, revive_dead_units_, sign_flip_
from tests.faults.engines import averaged_step, error_of
from tests.helpers import kill_units, mlp

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None,
        reason="DeepSpeed is not installed (optional: `pip install -e .[deepspeed]`)",
    ),
]

STAGES = (1, 2, 3)
WRITTEN = (1, 2, 3)  # the stages written through (ZeRO-3 with `memory_efficient_linear` off)
REFUSED = (3,)  # ZeRO-3 with its default `memory_efficient_linear`, which replaces `torch.nn.functional.linear`
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
    trainer = types.SimpleNamespace(strategy=DeepSpeedStrategy(stage=2), global_step=0)
    error = error_of(lambda: DeadUnitReviver().on_fit_start(trainer, model))  # type: ignore[arg-type]
    initializer = error_of(lambda: ReluInitializer().setup(trainer, model, "fit"))  # type: ignore[arg-type]
    unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    return {"error": error, "initializer": initializer, "unchanged": unchanged}


def _config(stage: int) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:  # its default replaces `torch.nn.functional.linear` for the whole process
        zero["memory_efficient_linear"] = False
    return {
        "train_micro_batch_size_per_gpu": 16,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # a torch optimizer: nothing is compiled
        "gradient_clipping": 0.0,
    }


def _loss(model: Any, x: torch.Tensor) -> torch.Tensor:
    return (model(x) - 1.0).pow(2).mean()


def _gathered(params: list[torch.Tensor], modifier_rank: int | None = None) -> Any:
    """ZeRO-3's partitioned parameters whole for a block (rank `modifier_rank`'s changes kept); otherwise nothing."""
    import contextlib

    import deepspeed

    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def _module_weights(engine: Any) -> list[torch.Tensor]:
    """The module's parameters (ZeRO-3: gathered, a collective)."""
    params = list(engine.module.parameters())
    with _gathered(params):
        return [p.detach().clone() for p in params]


def _write_(engine: Any, index: int, change: Any) -> None:
    """Change the weights of layer `index` (`change(weight, bias)` in place) in the module and in the fp32 masters,
    with DeepSpeed's public accessors; on a plain model, in the model."""
    layer = (engine.module if hasattr(engine, "module") else engine)[index]
    params = [layer.weight, layer.bias]
    with torch.no_grad(), _gathered(params, modifier_rank=0):
        change(layer.weight, layer.bias)
        values = [p.detach().clone() for p in params]
    if hasattr(engine, "module"):
        from deepspeed.utils import safe_set_full_fp32_param

        for param, value in zip(params, values, strict=True):
            safe_set_full_fp32_param(param, value)


def _shift(weight: torch.Tensor, bias: torch.Tensor) -> None:
    bias.sub_(1.0)  # pre-activations pushed down: `sign_flip_` has something to flip


def _kill(weight: torch.Tensor, bias: torch.Tensor) -> None:
    bias[DEAD] = -1e4  # after training: the units' optimizer state is not zero


def _written_state(engine: Any) -> dict[str, Any]:
    """The module's parameters, the fp32 masters and the momentum DeepSpeed holds, in full (collectives)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    return {
        "module": _module_weights(engine),
        "masters": _full_weights(engine),
        "momentum": [safe_get_full_optimizer_state(p, "momentum_buffer").clone() for p in engine.module.parameters()],
    }


def _plain_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    params = [p.detach().clone() for p in model.parameters()]
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    return {"module": params, "masters": params, "momentum": momentum}


def _written(rank: int, stage: int) -> dict[str, Any]:
    """`rai_`, `sign_flip_` and `revive_dead_units_` on the engine, each rank with data of its own, with steps between;
    what the test compares with one process on rank 0's data."""
    import deepspeed

    x = _inputs(rank)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=_config(stage))
    results: dict[str, Any] = {"optimizer": f"{type(ds_optimizer).__module__}.{type(ds_optimizer).__name__}"}
    with DeadUnitTracker(engine.module) as tracker, torch.no_grad():
        engine.module(x)
    results["counts"] = {name: (r.active_count.tolist(), int(r.samples)) for name, r in tracker.report().items()}

    rai_(engine, generator=torch.Generator().manual_seed(0))
    results["rai_"] = {"module": _module_weights(engine), "masters": _full_weights(engine)}
    _write_(engine, 0, _shift)
    _write_(engine, 2, _shift)
    flips = sign_flip_(engine.module, x)
    results["flipped"] = {name: r.flipped for name, r in flips.items()}
    results["sign_flip_"] = {"module": _module_weights(engine), "masters": _full_weights(engine)}
    engine.backward(_loss(engine, x))
    engine.step()
    _write_(engine, 0, _kill)
    with DeadUnitTracker(engine.module) as tracker, torch.no_grad():
        engine.module(x)
    report = tracker.report()
    results["trained"] = _written_state(engine)
    generator = torch.Generator().manual_seed(0)
    results["revived"] = revive_dead_units_(engine, report, ds_optimizer, generator, example_input=x)
    results["after revival"] = _written_state(engine)
    engine.backward(_loss(engine, x))
    engine.step()
    results["stepped"] = _written_state(engine)

    # a call failing on one rank only, after rank 0 redrew every producer: no rank waits for the other, none keeps
    # anything
    before = _snapshot(engine)
    generator: Any = torch.Generator().manual_seed(1) if rank == 0 else "a seed"
    results["one rank fails"] = error_of(lambda: rai_(engine.module, generator=generator))
    results["unchanged after the failure"] = all(
        torch.equal(a, b) for a, b in zip(before, _snapshot(engine), strict=True)
    )
    plain = _model()
    results["plain with the engine's optimizer"] = error_of(lambda: revive_dead_units_(plain, report, ds_optimizer))
    return results


def _bf16(rank: int) -> dict[str, Any]:
    """ZeRO stage 2 in bf16: the module's parameters are bf16 copies of fp32 masters. `rai_` after a step writes the
    producers' new values into the masters and leaves the other layers' fp32 masters as they were (not rounded)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    model = _model()
    config = {**_config(2), "bf16": {"enabled": True}}
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=config
    )
    engine.backward(_loss(engine, _inputs(rank).bfloat16()).float())
    engine.step()
    before = _full_weights(engine)
    rai_(engine, generator=torch.Generator().manual_seed(0))
    return {
        "dtype": str(next(engine.module.parameters()).dtype),
        "before": before,
        "after": [safe_get_full_fp32_param(p).clone() for p in engine.module.parameters()],
        "module": [p.detach().float() for p in engine.module.parameters()],
    }


def _written_reference() -> dict[str, Any]:
    """What `_written` does, on one process with rank 0's data; the steps on both ranks' losses averaged (as
    DeepSpeed averages the gradients)."""
    xs = [_inputs(0), _inputs(1)]
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    step = averaged_step(model, optimizer, _loss, xs)

    results: dict[str, Any] = {}
    rai_(model, generator=torch.Generator().manual_seed(0))
    results["rai_"] = [p.detach().clone() for p in model.parameters()]
    _write_(model, 0, _shift)
    _write_(model, 2, _shift)
    results["flipped"] = {name: r.flipped for name, r in sign_flip_(model, xs[0]).items()}
    results["sign_flip_"] = [p.detach().clone() for p in model.parameters()]
    step()
    _write_(model, 0, _kill)
    with DeadUnitTracker(model) as tracker, torch.no_grad():
        model(xs[0])
        model(xs[1])
    results["trained"] = _plain_state(model, optimizer)
    generator = torch.Generator().manual_seed(0)
    results["revived"] = revive_dead_units_(model, tracker.report(), optimizer, generator, example_input=xs[0])
    results["after revival"] = _plain_state(model, optimizer)
    step()
    results["stepped"] = _plain_state(model, optimizer)
    return results


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
    # the written stages first: a ZeRO-3 engine (its default `memory_efficient_linear`) replaces
    # `torch.nn.functional.linear` in the whole process, and revival's observed forward then finds no Linear producer
    results: dict[Any, Any] = {stage: _written(rank, stage) for stage in WRITTEN}
    results.update({("refused", stage): _stage(rank, stage) for stage in REFUSED})
    results[0] = _stage0(rank)
    results["bf16"] = _bf16(rank)
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


@pytest.mark.parametrize("stage", REFUSED)
def test_zero_3_with_memory_efficient_linear_is_refused_engine_module_and_optimizer(
    runs: list[dict[str, Any]], stage: int
) -> None:
    optimizer = {1: "stage_1_and_2.DeepSpeedZeroOptimizer", 2: "stage_1_and_2.DeepSpeedZeroOptimizer"}.get(
        stage, "stage3.DeepSpeedZeroOptimizer_Stage3"
    )
    linear = r", and DeepSpeed replaced `torch\.nn\.functional\.linear` for the whole process \(ZeRO-3's "
    linear += r"`memory_efficient_linear`, on by default\).*`\"memory_efficient_linear\": false`"
    module_why = "partitioned by DeepSpeed ZeRO stage 3.*" + linear
    for run in runs:
        results = run[("refused", stage)]
        assert results["optimizer"] == f"deepspeed.runtime.zero.{optimizer}"
        errors = results["errors"]
        for call, argument in (("rai_", "module"), ("sign_flip_", "model"), ("revive_dead_units_", "model")):
            engine = errors[f"{call}(engine)"]
            assert re.match(
                rf"ValueError: `{call}` cannot write into `{argument}`: it is a DeepSpeed engine "
                rf"\(`DeepSpeedEngine`, ZeRO stage {stage}\){linear}.*next `engine\.step\(\)` would copy them back.*"
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


@pytest.mark.parametrize("stage", REFUSED)
def test_zero_3_the_step_after_the_refusals_is_the_step_of_an_untouched_model(
    runs: list[dict[str, Any]], stage: int
) -> None:
    expected = _expected_step()
    for run in runs:
        for got, want in zip(run[("refused", stage)]["stepped"], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_reviver_and_the_initializer_refuse_lightnings_deepspeed_strategy(runs: list[dict[str, Any]]) -> None:
    for run in runs:
        for key, name in (("error", "DeadUnitReviver"), ("initializer", "ReluInitializer")):
            message = run["lightning"][key]
            assert re.match(
                rf"ValueError: `{name}` cannot write into `pl_module`: the trainer's strategy is "
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


def _assert_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage", WRITTEN)
def test_zero_1_2_3_initializers_and_revival_write_through_the_fp32_masters_as_one_process(
    runs: list[dict[str, Any]], stage: int
) -> None:
    reference = _written_reference()
    assert any(reference["flipped"].values())  # the setup has something to flip
    assert reference["revived"]["1"] >= len(DEAD)  # the units killed, and any that training killed
    # revival resets the momentum that training made: the revived rows (weights, biases) and the consumer's columns
    trained, revived = reference["trained"]["momentum"], reference["after revival"]["momentum"]
    assert all(bool(trained[i][DEAD].ne(0).all()) and bool(revived[i][DEAD].eq(0).all()) for i in (0, 1))
    assert bool(trained[2][:, DEAD].ne(0).all()) and bool(revived[2][:, DEAD].eq(0).all())
    assert bool(reference["stepped"]["masters"][1][DEAD].gt(-100).all())  # the step keeps the revived biases
    for run in runs:
        results = run[stage]
        assert results["optimizer"] == {3: "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3"}.get(
            stage, "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer"
        )
        for name in ("module", "masters"):
            assert all(torch.equal(a, b) for a, b in zip(results["rai_"][name], reference["rai_"], strict=True))
            assert all(
                torch.equal(a, b) for a, b in zip(results["sign_flip_"][name], reference["sign_flip_"], strict=True)
            )  # rank 1's data decided nothing
        assert results["flipped"] == reference["flipped"]
        assert results["revived"] == reference["revived"]
        for point in ("trained", "after revival", "stepped"):
            for name in ("module", "masters", "momentum"):
                _assert_close(results[point][name], reference[point][name])


@pytest.mark.parametrize("stage", WRITTEN)
def test_zero_1_2_3_a_call_failing_on_one_rank_changes_nothing_and_hangs_no_rank(
    runs: list[dict[str, Any]], stage: int
) -> None:
    holder = "DeepSpeed ZeRO-3 partitions" if stage == 3 else "DeepSpeed's fp32 master weights"
    kind = r"`DeepSpeedZeroOptimizer_Stage3` of `deepspeed\.runtime\.zero\.stage3`"
    if stage != 3:
        kind = r"`DeepSpeedZeroOptimizer` of `deepspeed\.runtime\.zero\.stage_1_and_2`"
    rank0, rank1 = runs[0][stage], runs[1][stage]
    expected = f"RuntimeError: `rai_` failed on another rank, so no rank changed `module` ({holder})."
    assert rank0["one rank fails"] == expected
    assert rank1["one rank fails"] == "ValueError: `generator` must be a `torch.Generator` or None, got 'a seed'"
    assert rank0["unchanged after the failure"] and rank1["unchanged after the failure"]
    for run in runs:  # the engine's optimizer with a model it does not train: refused
        message = run[stage]["plain with the engine's optimizer"]
        assert re.match(
            rf"ValueError: `revive_dead_units_` cannot use `optimizer`: it is a DeepSpeed optimizer \({kind}\)"
            r".*Nothing was changed",
            message,
        ), message


def test_zero_2_bf16_writes_the_changed_entries_and_keeps_the_other_fp32_masters(runs: list[dict[str, Any]]) -> None:
    for run in runs:
        results = run["bf16"]
        assert results["dtype"] == "torch.bfloat16"
        before, after, module = results["before"], results["after"], results["module"]
        for index in (0, 1, 2, 3):  # the producers RAI drew: the masters hold the module's new (bf16) values
            assert not torch.equal(after[index], before[index]) and torch.equal(after[index], module[index])
        for index in (4, 5):  # the output layer: its fp32 masters, which bf16 cannot hold, are kept bit for bit
            assert not torch.equal(before[index], before[index].bfloat16().float())
            assert torch.equal(after[index], before[index])
