"""The ``lightning-relu demo`` showcase: a short run, read back from its TensorBoard event files."""

from __future__ import annotations

import contextlib
import io
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_relu import _demo, demo
from lightning_relu._demo import DemoTask, VariantResult, _verdict
from lightning_relu.demo import VARIANTS, DemoResults, main, run_demo
from lightning_relu.monitor import EpochReport


@dataclass
class ShortRun:
    rc: int
    out: str
    out_dir: Path
    results: DemoResults


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> ShortRun:
    """``demo --quick --seeds 2 --epochs 2`` through ``main``, with the results ``main`` got from ``run_demo``."""
    out_dir = tmp_path_factory.mktemp("demo")
    captured: list[DemoResults] = []

    def spy(*args: object, **kwargs: object) -> DemoResults:
        results = run_demo(*args, **kwargs)  # type: ignore[arg-type]
        captured.append(results)
        return results

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(demo, "run_demo", spy)
        rc = main(["demo", "--quick", "--seeds", "2", "--epochs", "2", "--out", str(out_dir)])
    assert len(captured) == 1
    return ShortRun(rc=rc, out=stdout.getvalue(), out_dir=out_dir, results=captured[0])


def _events(log_dir: Path | str) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


def _collapsed(report: EpochReport) -> bool:
    """A site whose every unit is dead, from the per-unit masks (not from LayerReport.collapsed)."""
    return any(bool(layer.dead.all()) and layer.dead.numel() > 0 for layer in report.layers.values())


def test_the_run_prints_the_table_the_story_and_the_tensorboard_command(short_run: ShortRun) -> None:
    assert short_run.rc == 0
    out = short_run.out
    assert f"tensorboard --logdir {short_run.out_dir.resolve()}" in out
    assert "What happened:" in out
    for name in VARIANTS:
        assert re.search(rf"^{name}\s", out, flags=re.MULTILINE)  # a table row
        assert re.search(rf"^- {name}: ", out, flags=re.MULTILINE)  # a sentence
        assert f"{name:<10} seed 1:" in out  # a progress line
    assert re.search(r"\d+ s on \d+ CPU cores", out)


def test_printed_counts_match_the_reports(short_run: ShortRun) -> None:
    """Each row's collapsed counts and mean final loss, recomputed from the per-unit reports."""
    results = short_run.results
    n = len(results.seeds)
    rows = {line.split()[0]: line for line in short_run.out.splitlines() if line.split()[:1] == [line[:10].strip()]}
    for name, runs in results.variants.items():
        assert [r.seed for r in runs] == results.seeds == [0, 1]
        first = sum(_collapsed(r.history[0]) for r in runs)
        last = sum(_collapsed(r.history[-1]) for r in runs)
        cells = re.findall(r"(\d+) of (\d+)", rows[name])
        assert cells[:2] == [(str(first), str(n)), (str(last), str(n))]
        mean_loss = statistics.fmean(r.final_loss for r in runs)
        assert f"{mean_loss:.3f} (" in rows[name]


def test_final_loss_of_a_collapsed_network_is_the_target_variance(short_run: ShortRun) -> None:
    """A network with a layer all dead outputs a constant: its loss is at least the targets' variance (n-1 scaled)."""
    variance = short_run.results.target_variance
    _, y = short_run.results.task.data().tensors
    assert variance == pytest.approx(float(y.var()), rel=1e-6) and variance == pytest.approx(1.0, abs=1e-5)
    for runs in short_run.results.variants.values():
        for run in runs:
            if _collapsed(run.history[-1]):
                assert run.final_loss >= float(((y - y.mean()) ** 2).mean()) - 1e-5


def test_one_tensorboard_run_per_variant_and_seed_matching_the_reports(short_run: ShortRun) -> None:
    results = short_run.results
    for name, runs in results.variants.items():
        for run in runs:
            files = list((short_run.out_dir / name / f"seed_{run.seed}").glob("events.out.tfevents.*"))
            assert len(files) == 1, files
            # the last epoch's checkpoint, which `lightning-relu compact` reads
            checkpoints = list((short_run.out_dir / name / f"seed_{run.seed}" / "checkpoints").glob("*.ckpt"))
            assert len(checkpoints) == 1 and checkpoints[0].name.startswith(f"epoch={results.epochs - 1}-"), checkpoints
            assert len(run.history) == results.epochs == 2
            events = _events(run.log_dir)
            total = events.Scalars("dead_units/total")
            assert len(total) == results.epochs
            for report, logged in zip(run.history, total, strict=True):
                dead = sum(int(layer.dead.sum()) for layer in report.layers.values())
                units = sum(int(layer.dead.numel()) for layer in report.layers.values())
                assert logged.value == pytest.approx(dead / units, abs=1e-6)


def test_every_variant_starts_from_the_same_he_weights(short_run: ShortRun) -> None:
    """Same seed, same He weights and batches: he and he_revival agree on epoch 0 (revival acts after it), and
    sign_flip equals he wherever it flipped nothing."""
    variants = short_run.results.variants
    for he, revival, flip in zip(variants["he"], variants["he_revival"], variants["sign_flip"], strict=True):
        for site, layer in he.history[0].layers.items():
            assert torch.equal(layer.dead, revival.history[0].layers[site].dead)
        if flip.flipped_sites == 0:
            assert flip.final_loss == he.final_loss
    assert all(r.revived_units is not None for r in variants["he_revival"])
    assert all(r.flipped_sites is not None for r in variants["sign_flip"])
    assert all(r.revived_units is None and r.flipped_sites is None for r in variants["he"])


def _fake(name: str, collapsed: bool, loss: float) -> VariantResult:
    """A one-epoch result whose one site has both units dead (collapsed) or one alive."""
    from lightning_relu.functional import activation_stats

    output = torch.zeros(4, 2)
    if not collapsed:
        output[:, 1] = 1.0
    report = EpochReport(epoch=0, global_step=1, layers={"net.1": activation_stats(output, name="net.1")})
    return VariantResult(name, 0, "", [report], loss, 0.0)


@pytest.mark.parametrize(
    ("runs", "expected"),
    [
        ([(False, 0.1), (False, 0.2)], "helped"),
        ([(True, 1.0), (True, 1.0)], "no clear difference from He in this run"),
        ([(True, 1.0), (True, 1.5)], "did worse than He"),
        ([(False, 1.0), (True, 1.0)], "helped"),
    ],
)
def test_verdict_words(runs: list[tuple[bool, float]], expected: str) -> None:
    baseline = [_fake("he", True, 1.0), _fake("he", True, 1.0)]
    assert _verdict([_fake("x", *run) for run in runs], baseline, tolerance=0.1) == expected


def test_help_lists_the_options_and_variants(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--epochs", "--seeds", "--out", "--quick", "--depth", "--width"):
        assert option in out
    for name in VARIANTS:
        assert name in out


@pytest.mark.parametrize(
    "argv", [[], ["demo", "--epochs", "0"], ["demo", "--seeds", "0"], ["demo", "--width", "0"], ["nope"]]
)
def test_bad_command_lines_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_run_demo_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`epochs`"):
        run_demo(0, out_dir=tmp_path)
    with pytest.raises(ValueError, match="`seeds`"):
        run_demo(1, [], out_dir=tmp_path)
    with pytest.raises(ValueError, match="`variants`"):
        run_demo(1, out_dir=tmp_path, variants=["xavier"])


def test_the_task_is_standardized_and_the_same_for_every_seed() -> None:
    task = DemoTask(samples=256)
    x, y = task.data().tensors
    assert x.shape == (256, 1) and bool((x.abs() <= 1).all())
    assert float(y.mean()) == pytest.approx(0.0, abs=1e-5) and float(y.std()) == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(task.data().tensors[1], y)
    assert _demo.DEFAULT_SEEDS == (0, 1, 2, 3, 4) and len(_demo.QUICK_SEEDS) >= 3
