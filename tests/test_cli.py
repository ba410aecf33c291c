"""The ``lightning-relu`` console command: fast help and version, and the ``structure`` command."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from torch import nn

import lightning_relu


def _run(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "lightning_relu", *args], capture_output=True, text=True, timeout=120, check=False
    )
    return done, time.perf_counter() - start


def test_help_is_fast_and_imports_neither_lightning_nor_torch() -> None:
    """``--help`` answers without importing torch or Lightning (about 0.2 s on 2 cores; the bound is generous)."""
    code = (
        "import sys\n"
        "from lightning_relu.demo import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "heavy = sorted(m for m in ('torch', 'lightning', 'lightning.pytorch') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout and "demo" in done.stdout and "structure" in done.stdout
    assert "HEAVY []" in done.stdout
    done, seconds = _run("--help")
    assert done.returncode == 0, done.stderr
    assert seconds < 5.0, f"`--help` took {seconds:.1f} s"


def test_version() -> None:
    done, seconds = _run("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["python", "-m", "lightning_relu", lightning_relu.__version__]
    assert seconds < 5.0


def test_demo_help_lists_the_variants() -> None:
    from lightning_relu.demo import VARIANTS

    done, _ = _run("demo", "--help")
    assert done.returncode == 0, done.stderr
    for name in VARIANTS:
        assert name in done.stdout


def small_convnet() -> nn.Module:
    """Built by `lightning-relu structure tests.test_cli:small_convnet` below."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.ReLU()
    )


def test_structure_command_prints_each_site(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_relu.demo import main

    assert main(["structure", "tests.test_cli:small_convnet", "--input-shape", "2,3,8,8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["site", "units", "producer", "norm", "consumers"]
    # built above: conv 0 -> bn 1 -> ReLU 2 -> flatten -> linear 4 -> ReLU 5 (the output)
    assert lines[2].split()[:6] == ["2", "4", "0", "1", "(batch)", "4"]
    assert lines[3].split()[:4] == ["5", "5", "4", "-"] and "output" in lines[3]


def test_structure_command_rejects_a_bad_model_spec(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_relu.demo import main

    with pytest.raises(SystemExit):
        main(["structure", "no_colon_here"])
    assert "MODULE:NAME" in capsys.readouterr().err
