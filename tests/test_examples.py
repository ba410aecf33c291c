from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_trains_and_writes_tensorboard_logs(tmp_path, capsys):
    quickstart = load_example("quickstart")
    monitor = quickstart.main(
        ["--epochs", "2", "--depth", "4", "--width", "8", "--samples", "256", "--out", str(tmp_path)]
    )
    assert [r.epoch for r in monitor.history] == [0, 1]
    assert len(monitor.last_report) == 4
    out = capsys.readouterr().out
    assert f"tensorboard --logdir {tmp_path}" in out
    assert list((tmp_path / "quickstart").glob("version_0/events.out.tfevents.*"))
