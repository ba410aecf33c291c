"""What the monitor writes, as a real TensorBoard server reads it back over its HTTP API (loopback only)."""

from __future__ import annotations

import json
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_relu import DeadUnitMonitor
from lightning_relu.monitor import EpochReport

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 60.0
RUN = "fit/version_0"
EPOCHS = 3


class TinyRegressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


@dataclass
class Served:
    url: str
    history: list[EpochReport]
    sites: list[str]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _get(url: str, timeout: float = 10.0) -> bytes:
    assert urllib.parse.urlparse(url).hostname == HOST  # loopback only
    with urllib.request.urlopen(url, timeout=timeout) as response:  # a loopback URL built here
        return response.read()


def _json(served: Served, path: str, **query: str) -> Any:
    suffix = f"?{urllib.parse.urlencode(query)}" if query else ""
    return json.loads(_get(f"{served.url}{path}{suffix}"))


def _fit(log_dir: Path) -> DeadUnitMonitor:
    pl.seed_everything(0, verbose=False)
    x = torch.randn(256, 4)
    y = 0.1 * x[:, 0]
    monitor = DeadUnitMonitor(revive=True, print_summary=False)
    trainer = pl.Trainer(
        default_root_dir=log_dir,
        logger=TensorBoardLogger(log_dir, name="fit"),
        callbacks=[monitor],
        max_epochs=EPOCHS,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    trainer.fit(TinyRegressor(), DataLoader(TensorDataset(x, y), batch_size=32))
    return monitor


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Logs of a short fit, served by ``tensorboard`` on a free loopback port until the module's tests end."""
    log_dir = tmp_path_factory.mktemp("tb")
    monitor = _fit(log_dir)
    sites = list(monitor.history[-1].layers)
    port = _free_port()
    stderr = (log_dir / "tensorboard.stderr").open("wb")
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(log_dir), "--host", HOST]
    command += ["--port", str(port), "--load_fast", "false", "--reload_interval", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:  # until the server answers and has loaded the run's scalars
            if proc.poll() is not None:
                stderr.flush()
                pytest.fail(
                    f"tensorboard exited with {proc.returncode}: {(log_dir / 'tensorboard.stderr').read_text()}"
                )
            try:
                tags = json.loads(_get(f"{url}/data/plugin/scalars/tags", timeout=2.0))
                if "dead_units/total" in tags.get(RUN, {}):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"tensorboard did not serve the logs within {STARTUP_TIMEOUT_S:.0f} s")
            time.sleep(0.25)
        yield Served(url=url, history=list(monitor.history), sites=sites)
    finally:
        _stop(proc)
        stderr.close()


# ------------------------------------------------------------------------------- always there: scalars, histograms
def test_scalar_tags_for_every_site(served: Served) -> None:
    tags = _json(served, "/data/plugin/scalars/tags")[RUN]
    assert "dead_units/total" in tags
    for site in served.sites:
        for prefix in ("dead_units", "living_data", "dying_units", "revived"):
            assert f"{prefix}/{site}" in tags, (prefix, site, sorted(tags))


def test_scalar_values_are_the_monitor_reports(served: Served) -> None:
    points = _json(served, "/data/plugin/scalars/scalars", run=RUN, tag="dead_units/total")
    assert [step for _, step, _ in points] == [report.global_step - 1 for report in served.history]
    for (_, _, value), report in zip(points, served.history, strict=True):
        assert value == pytest.approx(report.dead_fraction, abs=1e-6)
    for site in served.sites:
        points = _json(served, "/data/plugin/scalars/scalars", run=RUN, tag=f"living_data/{site}")
        values = [value for _, _, value in points]
        assert values == pytest.approx([report.layers[site].living_data_fraction for report in served.history])


def test_histogram_tags_for_every_site(served: Served) -> None:
    tags = _json(served, "/data/plugin/histograms/tags")[RUN]
    for site in served.sites:
        assert f"per_unit/activation_rate/{site}" in tags
    tag = f"per_unit/activation_rate/{served.sites[0]}"
    series = _json(served, "/data/plugin/histograms/histograms", run=RUN, tag=tag)
    assert len(series) == EPOCHS


# ------------------------------------------------------------- dashboards: heatmap image, summary text, custom layout
# These skip while the monitor does not write them yet, and assert as soon as it does.
def _skip_unless(present: bool, what: str) -> None:
    if not present:
        pytest.skip(f"the monitor does not write {what} yet")


def test_dead_heatmap_image(served: Served) -> None:
    tags = _json(served, "/data/plugin/images/tags").get(RUN, {})
    _skip_unless("dead_units/heatmap" in tags, "the `dead_units/heatmap` image")
    images = _json(served, "/data/plugin/images/images", run=RUN, tag="dead_units/heatmap", sample="0")
    assert [image["step"] for image in images] == [report.global_step - 1 for report in served.history]
    png = _get(f"{served.url}/data/plugin/images/individualImage?{images[-1]['query']}")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 0 and height > 0


def test_summary_text(served: Served) -> None:
    # torch's SummaryWriter.add_text(tag, ...) stores the text under "<tag>/text_summary"
    tags = [
        tag for tag in _json(served, "/data/plugin/text/tags").get(RUN, []) if tag.startswith("lightning_relu/summary")
    ]
    _skip_unless(bool(tags), "the `lightning_relu/summary` text")
    assert len(tags) == 1
    entries = _json(served, "/data/plugin/text/text", run=RUN, tag=tags[0])
    assert len(entries) == 1
    html = entries[0]["text"]
    assert "<table>" in html
    for site in served.sites:
        assert site in html


def test_custom_scalars_layout(served: Served) -> None:
    layout = _json(served, "/data/plugin/custom_scalars/layout")
    _skip_unless(bool(layout), "a Custom Scalars layout")
    charts = [chart for category in layout["category"] for chart in category["chart"]]
    regexes = [tag for chart in charts for tag in chart.get("multiline", {}).get("tag", [])]
    tags = _json(served, "/data/plugin/scalars/tags")[RUN]
    for site in served.sites:  # every site's dead-unit and living-data series lands on some chart
        for prefix in ("dead_units", "living_data"):
            assert any(re.fullmatch(regex, f"{prefix}/{site}") for regex in regexes), (prefix, site, regexes)
            assert f"{prefix}/{site}" in tags
