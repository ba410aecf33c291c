"""Every python block of the README, of the user guide and of the compaction page runs as written.

The blocks of one page run in order in one namespace, as a reader pastes them into one session; a guide page
that reuses the monitor page's model and loader (it says so) runs after that page's first block. Blocks that
import the reader's own project (``my_project``) are shown, not run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "guide"
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
# pages whose examples reuse the model and loader that the monitor page's first block defines
USES_MONITOR_PAGE = {"initializers.md", "revival.md", "distributed.md", "compaction.md"}


def python_blocks(path: Path) -> list[str]:
    return [block for block in FENCE.findall(path.read_text()) if "my_project" not in block]


PAGES = [ROOT / "README.md", *sorted(GUIDE.glob("*.md")), ROOT / "docs" / "index.md", ROOT / "docs" / "compaction.md"]


def test_the_extraction_finds_the_blocks() -> None:
    """The fence pattern sees what a reader sees: the README's quickstart and the monitor page's model."""
    readme = python_blocks(ROOT / "README.md")
    assert len(readme) >= 3
    assert any("DeadUnitMonitor" in block and "trainer.fit" in block for block in readme)
    assert "class Regressor" in python_blocks(GUIDE / "monitor.md")[0]


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # lightning_logs/ and checkpoints land here
    namespace: dict[str, object] = {"__name__": "__readme__"}
    blocks = python_blocks(page)
    if page.name in USES_MONITOR_PAGE:
        blocks = [python_blocks(GUIDE / "monitor.md")[0], *blocks]
    for index, block in enumerate(blocks):
        code = compile(block, f"{page.name}[python block {index}]", "exec")
        exec(code, namespace)
