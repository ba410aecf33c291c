"""Screenshots of the demo's TensorBoard dashboards, and a figure of the paper reproductions, for the docs.

    python docs/screenshot.py                       # run the demo into a temporary directory, then screenshot it
    python docs/screenshot.py --logdir lightning_logs/demo   # use logs that exist already
    python docs/screenshot.py --skip-reproductions  # only the TensorBoard screenshots

It serves the logs with TensorBoard on a free loopback port, opens each dashboard with headless Chromium
(Debian: ``apt-get install chromium``) and writes, under ``--out`` (default ``docs/images``):

- ``dashboard.png``: the Custom Scalars tab (dead units, living data, dying units and revivals, every layer);
- ``heatmap.png``: the Images tab, the layers × epochs heatmap of the dead share of every variant;
- ``timeseries.png``: the Time Series tab;
- ``heatmap_<variant>.png``: the last heatmap of each variant's first run at full size, as TensorBoard serves it;
- ``reproductions.png`` (needs matplotlib): the tables of ``examples/reproduce_lu2020.py`` and
  ``examples/reproduce_rister2020.py``, read from docs/reproductions.md where their output is recorded, or from
  files holding their output (``--lu2020``, ``--rister2020``).

Nothing here is part of the package: matplotlib and Chromium are needed only to regenerate the images.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

#: (file name, URL fragment, window size) of each screenshot.
SHOTS: tuple[tuple[str, str, str], ...] = (
    ("dashboard.png", "#custom_scalars", "1400,1000"),
    ("heatmap.png", "#images", "1400,1000"),
    ("timeseries.png", "#timeseries", "1400,1000"),
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=2.0) as response:  # a loopback URL built here
        return json.loads(response.read())


@contextmanager
def tensorboard(logdir: Path, timeout: float = 60.0) -> Iterator[str]:
    """Serve ``logdir`` on a free loopback port; yields the base URL once the scalars are loaded."""
    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", HOST, "--port", str(port)]
    command += ["--load_fast", "false"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tensorboard exited with {proc.returncode}: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
            try:
                tags = _get_json(f"{url}/data/plugin/scalars/tags")
                if isinstance(tags, dict) and any("dead_units/total" in run for run in tags.values()):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensorboard did not serve {logdir} within {timeout:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def find_chromium(explicit: str | None) -> str:
    for candidate in [explicit, "chromium", "chromium-browser", "google-chrome"]:
        if candidate and shutil.which(candidate):
            return str(shutil.which(candidate))
    raise SystemExit("Chromium not found: apt-get install chromium (or pass --chromium PATH)")


def screenshot(chromium: str, url: str, png: Path, window: str, budget_ms: int) -> None:
    """One headless Chromium screenshot of ``url``, after ``budget_ms`` of virtual time for the JS app to render."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        command = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={window}",
            f"--virtual-time-budget={budget_ms}",
            f"--screenshot={png}",
            url,
        ]
        subprocess.run(command, check=True, capture_output=True, timeout=180)
    if not png.exists() or png.stat().st_size == 0:
        raise RuntimeError(f"Chromium wrote no screenshot for {url}")


def heatmap_images(url: str, out: Path, tag: str = "dead_units/heatmap") -> dict[str, Path]:
    """Save the last heatmap of each variant's first run (``<variant>/seed_0``) at full size,
    ``heatmap_<variant>.png``, read from TensorBoard's API."""
    saved: dict[str, Path] = {}
    tags = _get_json(f"{url}/data/plugin/images/tags")
    assert isinstance(tags, dict)
    for run in sorted(run for run, run_tags in tags.items() if tag in run_tags):
        if any(earlier.split("/")[0] == run.split("/")[0] for earlier in saved):
            continue  # one picture per variant: its first seed's
        query = urllib.parse.urlencode({"run": run, "tag": tag, "sample": 0})
        images = _get_json(f"{url}/data/plugin/images/images?{query}")
        assert isinstance(images, list) and images
        with urllib.request.urlopen(f"{url}/data/plugin/images/individualImage?{images[-1]['query']}") as response:
            data = response.read()
        png = out / f"heatmap_{run.split('/')[0]}.png"
        png.write_bytes(data)
        saved[run] = png
    return saved


# ------------------------------------------------------------------------------------------- reproductions figure
def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Every markdown table of ``text``, as rows keyed by lower-cased header cells."""
    tables: list[list[dict[str, str]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines) - 1:
        if lines[i].lstrip().startswith("|") and re.fullmatch(r"\s*\|[\s:|-]+\|\s*", lines[i + 1]):
            header = [cell.strip().lower() for cell in lines[i].strip().strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                cells = [cell.strip() for cell in lines[i].strip().strip("|").split("|")]
                rows.append(dict(zip(header, cells, strict=False)))
                i += 1
            tables.append(rows)
        else:
            i += 1
    return tables


def _column(row: dict[str, str], *words: str) -> str | None:
    """The cell whose header holds every one of ``words`` as whole words ("rai" is not in "training")."""
    for key, value in row.items():
        tokens = re.findall(r"[a-z0-9^-]+", key)
        if all(all(part in tokens for part in word.split()) for word in words):
            return value
    return None


def _number(cell: str) -> float:
    value = float(re.match(r"\s*([-+0-9.eE]+)", cell).group(1))  # type: ignore[union-attr]
    return value / 100 if cell.strip().endswith("%") else value


def lu2020_rows(text: str) -> dict[int, dict[str, float]]:
    """Per width: he/rai born dead and he/rai collapsed after training (shares), from the tables in ``text``."""
    out: dict[int, dict[str, float]] = {}
    keys = {
        "he_born": ("he", "born"),
        "rai_born": ("rai", "born"),
        "he_collapsed": ("he", "collapsed"),
        "rai_collapsed": ("rai", "collapsed"),
    }
    for table in markdown_tables(text):
        for row in table:
            width = row.get("width")
            if width is None or not width.isdigit():
                continue
            for key, words in keys.items():
                cell = _column(row, *words)
                if cell is not None:
                    out.setdefault(int(width), {})[key] = _number(cell)
    return {w: v for w, v in out.items() if {"he_born", "rai_born"} <= set(v)}


def rister2020_rows(text: str) -> list[dict[str, float]]:
    """Rows with width, k and the living-data shares: iid He, BatchNorm, sign flip (mean, min), iid lower bound."""
    rows = []
    for table in markdown_tables(text):
        for row in table:
            flip = _column(row, "sign flip")
            if flip is None or "k" not in row or not row.get("width", "").isdigit():
                continue
            low = re.search(r"\(([-+0-9.eE]+)\)", flip)
            rows.append(
                {
                    "width": float(row["width"]),
                    "k": float(row["k"]),
                    "he": _number(_column(row, "iid he") or "nan"),
                    "batchnorm": _number(_column(row, "batchnorm") or "nan"),
                    "sign_flip": _number(flip),
                    "sign_flip_min": float(low.group(1)) if low else float("nan"),
                    "bound": _number(_column(row, "lower bound") or "nan"),
                }
            )
    return rows


def reproductions_figure(lu_text: str, rister_text: str, png: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            'reproductions.png needs matplotlib: pip install -e ".[plots]" (or pass --skip-reproductions)'
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lu = lu2020_rows(lu_text)
    rister = rister2020_rows(rister_text)
    if not lu or not rister:
        raise SystemExit("no reproduction tables found (expected the tables of examples/reproduce_*.py)")
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1, 1.4]})
    widths = sorted(lu)
    series = [
        ("he_born", "He: born dead", "tab:red", "-"),
        ("rai_born", "RAI: born dead", "tab:blue", "-"),
        ("he_collapsed", "He: collapsed after training", "tab:red", "--"),
        ("rai_collapsed", "RAI: collapsed after training", "tab:blue", "--"),
    ]
    for key, label, color, style in series:
        points = [(w, lu[w][key]) for w in widths if key in lu[w]]
        if points:
            xs, ys = zip(*points, strict=True)
            left.plot(xs, [100 * y for y in ys], style, marker="o", color=color, label=label)
    left.set_xlabel("width (depth 10, 1-D input)")
    left.set_ylabel("networks that are a constant function (%)")
    left.set_title("Lu et al. 2020: dying ReLU, He vs RAI")
    left.set_xticks(widths)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)

    labels = [f"n={int(r['width'])}, k={int(r['k'])}" for r in rister]
    bars = [
        ("he", "iid He", "tab:red"),
        ("batchnorm", "BatchNorm", "tab:orange"),
        ("sign_flip", "sign flip", "tab:green"),
    ]
    step = 0.8 / len(bars)
    for j, (key, label, color) in enumerate(bars):
        xs = [i - 0.4 + step * (j + 0.5) for i in range(len(rister))]
        right.bar(xs, [r[key] for r in rister], width=step, color=color, label=label)
        if key == "sign_flip":
            right.scatter(
                xs,
                [r["sign_flip_min"] for r in rister],
                marker="_",
                s=200,
                color="black",
                zorder=3,
                label="sign flip, worst network",
            )
    right.scatter(
        range(len(rister)), [r["bound"] for r in rister], marker="x", color="black", zorder=3, label="iid lower bound"
    )
    right.set_xticks(range(len(rister)), labels, fontsize=8)
    right.set_ylabel("share of 1024 Gaussian points alive after k layers")
    right.set_title("Rister & Rubin: data alive after k layers of width n")
    right.set_ylim(0, 1)
    right.grid(axis="y", alpha=0.3)
    right.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logdir", type=Path, help="existing demo logs (default: run the demo into a temp dir)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="where the PNGs go")
    parser.add_argument("--epochs", type=int, default=None, help="demo epochs when running it (default: the demo's)")
    parser.add_argument("--seeds", type=int, default=1, help="demo seeds when running it (default: 1, one run each)")
    parser.add_argument("--chromium", help="Chromium executable (default: found on PATH)")
    parser.add_argument("--budget-ms", type=int, default=15000, help="virtual time given to TensorBoard's app")
    tables = ROOT / "docs" / "reproductions.md"
    parser.add_argument("--lu2020", type=Path, default=tables, help="text holding the Lu 2020 tables")
    parser.add_argument("--rister2020", type=Path, default=tables, help="text holding the R&R tables")
    parser.add_argument("--skip-reproductions", action="store_true", help="no reproductions.png")
    parser.add_argument("--skip-screenshots", action="store_true", help="no TensorBoard screenshots")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    if not args.skip_screenshots:
        chromium = find_chromium(args.chromium)
        with tempfile.TemporaryDirectory(prefix="lightning-relu-demo-") as tmp:
            logdir = args.logdir
            if logdir is None:
                from lightning_relu.demo import format_report, run_demo

                results = run_demo(args.epochs, list(range(args.seeds)), out_dir=tmp)
                print(format_report(results))
                logdir = Path(tmp)
            with tensorboard(logdir) as url:
                for name, fragment, window in SHOTS:
                    png = args.out / name
                    screenshot(chromium, f"{url}/{fragment}", png, window, args.budget_ms)
                    print(f"wrote {png} ({png.stat().st_size // 1024} KiB) from {url}/{fragment}")
                for run, png in heatmap_images(url, args.out).items():
                    print(f"wrote {png}: the last dead-share heatmap of run {run}, as TensorBoard serves it")

    if not args.skip_reproductions:
        png = args.out / "reproductions.png"
        reproductions_figure(args.lu2020.read_text(), args.rister2020.read_text(), png)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
