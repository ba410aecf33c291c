"""``python -m lightning_relu demo``: the same command line as the ``lightning-relu`` console script."""

from __future__ import annotations

from lightning_relu.demo import cli

if __name__ == "__main__":
    cli()
