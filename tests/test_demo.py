"""The ``lightning-relu demo`` showcase: a quick run, read back from its TensorBoard event files."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_relu import demo
from lightning_relu.demo import VARIANTS, DemoResults, main, run_demo


@dataclass
class QuickRun:
    rc: int
    out: str
    out_dir: Path
    results: DemoResults


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    """One ``demo --quick`` through ``main``, with the results that ``main`` got from ``run_demo``."""
    out_dir = tmp_path_factory.mktemp("demo")
    captured: list[DemoResults] = []

    def spy(*args: object, **kwargs: object) -> DemoResults:
        results = run_demo(*args, **kwargs)  # type: ignore[arg-type]
        captured.append(results)
        return results

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(demo, "run_demo", spy)
        rc = main(["demo", "--quick", "--out", str(out_dir)])
    assert len(captured) == 1
    return QuickRun(rc=rc, out=stdout.getvalue(), out_dir=out_dir, results=captured[0])


def _events(log_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


def test_quick_demo_returns_0_and_prints_table_and_tensorboard_command(quick_run: QuickRun) -> None:
    assert quick_run.rc == 0
    out = quick_run.out
    assert f"tensorboard --logdir {quick_run.out_dir.resolve()}" in out
    assert "Dead units per ReLU layer" in out
    for name in VARIANTS:
        assert f"[{name}] epoch" in out  # progress lines
        assert re.search(rf"^{name}\s", out, flags=re.MULTILINE)  # a summary row
    for site in quick_run.results.variants["he"].sites:
        assert re.search(rf"^{re.escape(site)}\s", out, flags=re.MULTILINE)  # a per-layer row


def test_one_tensorboard_run_per_variant(quick_run: QuickRun) -> None:
    results = quick_run.results
    assert list(results.variants) == list(VARIANTS)
    for name, result in results.variants.items():
        files = list((quick_run.out_dir / name).rglob("events.out.tfevents.*"))
        assert len(files) == 1, files
        assert Path(result.log_dir) == files[0].parent
        assert len(result.history) == results.epochs == 3


def test_event_files_match_the_reports(quick_run: QuickRun) -> None:
    """What TensorBoard reads back is what the monitors reported, and what the table printed."""
    for result in quick_run.results.variants.values():
        events = _events(Path(result.log_dir))
        total = [(event.step, event.value) for event in events.Scalars("dead_units/total")]
        assert [step for step, _ in total] == [step for step, _ in result.dead_total]
        for (_, logged), (_, reported) in zip(total, result.dead_total, strict=True):
            assert logged == pytest.approx(reported, abs=1e-6)
        # recompute the total from the per-unit reports, independently of EpochReport.dead_fraction
        for report, (_, logged) in zip(result.history, total, strict=True):
            dead = sum(int(layer.dead.sum()) for layer in report.layers.values())
            units = sum(int(layer.dead.numel()) for layer in report.layers.values())
            assert logged == pytest.approx(dead / units, abs=1e-6)
        tags = events.Tags()
        for site in result.sites:
            assert f"activation_rate/{site}" in tags["histograms"]
            logged = events.Scalars(f"dead_units/{site}")
            assert len(logged) == quick_run.results.epochs
            first, last = result.history[0].layers[site], result.history[-1].layers[site]
            assert logged[0].value * first.num_units == pytest.approx(first.num_dead, abs=1e-4)
            assert logged[-1].value * last.num_units == pytest.approx(last.num_dead, abs=1e-4)


def test_printed_layer_table_matches_event_files(quick_run: QuickRun) -> None:
    results = quick_run.results
    names = list(results.variants)
    lines = {line.split()[0]: line for line in quick_run.out.splitlines() if line.startswith("net.")}
    events = {name: _events(Path(result.log_dir)) for name, result in results.variants.items()}
    for site in results.variants["he"].sites:
        cells = re.findall(r"(\d+)/(\d+) → (\d+)/(\d+)", lines[site])
        assert len(cells) == len(names)
        for name, (dead_first, units, dead_last, units_last) in zip(names, cells, strict=True):
            logged = events[name].Scalars(f"dead_units/{site}")
            assert int(units) == int(units_last) == results.task.width
            assert logged[0].value * int(units) == pytest.approx(int(dead_first), abs=1e-4)
            assert logged[-1].value * int(units) == pytest.approx(int(dead_last), abs=1e-4)


def test_variants_did_what_they_say(quick_run: QuickRun) -> None:
    variants = quick_run.results.variants
    assert variants["rai"].rai_layers == quick_run.results.task.depth
    assert variants["sign_flip"].flipped_sites is not None
    assert variants["he_revival"].revived_units is not None
    assert variants["he"].revived_units is None and variants["he"].flipped_sites is None
    # every variant starts from the same He weights and batch order: without a flip, sign_flip is the baseline
    if variants["sign_flip"].flipped_sites == 0:
        assert variants["sign_flip"].losses == variants["he"].losses


def test_help_runs_as_a_module() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_relu", "demo", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "python -m lightning_relu demo" in proc.stdout
    for option in ("--epochs", "--seed", "--out", "--quick"):
        assert option in proc.stdout
    for name in VARIANTS:
        assert name in proc.stdout


@pytest.mark.parametrize("argv", [[], ["demo", "--epochs", "0"], ["demo", "--width", "0"], ["nope"]])
def test_bad_command_lines_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_run_demo_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`epochs`"):
        run_demo(0, out_dir=tmp_path)
    with pytest.raises(ValueError, match="`variants`"):
        run_demo(1, out_dir=tmp_path, variants=["xavier"])
