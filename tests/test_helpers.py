"""The test helpers that are not references: the retry of spawned DDP tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch.multiprocessing.spawn import ProcessExitedException

from tests.helpers import retry_spawn_abort


def _died(signal_name: str) -> ProcessExitedException:
    return ProcessExitedException("rank died", error_index=1, error_pid=0, exit_code=-6, signal_name=signal_name)


def test_retry_spawn_abort_runs_again_on_sigabrt_with_an_empty_tmp_path(tmp_path: Path) -> None:
    calls: list[int] = []

    @retry_spawn_abort
    def flaky(tmp_path: Path) -> list[str]:
        calls.append(1)
        (tmp_path / f"attempt{len(calls)}").mkdir()
        (tmp_path / f"file{len(calls)}").write_text("x")
        if len(calls) < 3:
            raise _died("SIGABRT")
        return sorted(p.name for p in tmp_path.iterdir())

    assert flaky(tmp_path=tmp_path) == ["attempt3", "file3"]  # what failed attempts wrote is gone
    assert len(calls) == 3


def test_retry_spawn_abort_gives_up_after_three_attempts_and_never_retries_other_failures() -> None:
    calls: list[str] = []

    @retry_spawn_abort
    def dies(signal_name: str) -> None:
        calls.append(signal_name)
        raise _died(signal_name)

    with pytest.raises(ProcessExitedException):
        dies("SIGABRT")
    assert calls == ["SIGABRT"] * 3
    calls.clear()
    with pytest.raises(ProcessExitedException):
        dies("SIGSEGV")
    assert calls == ["SIGSEGV"]
