"""The ``lightning-relu`` command line: ``demo`` (watch a deep, narrow ReLU network lose its units, and what
prevents or undoes it) and ``structure`` (print what the remedies see in a model).

This module imports neither torch nor Lightning until a command runs, so ``lightning-relu --help`` answers at
once; the demo's training lives in :mod:`lightning_relu._demo`, and its public names (:func:`run_demo`,
:class:`DemoTask`, :class:`DemoResults`, :class:`VariantResult`, :func:`format_report`) are importable from here.

    lightning-relu demo
    python -m lightning_relu demo --quick
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lightning_relu._demo_options import DEFAULT_OUT, VARIANTS

if TYPE_CHECKING:
    from lightning_relu._demo import DemoResults, DemoTask, VariantResult, format_report, run_demo

__all__ = [
    "DEFAULT_OUT",
    "VARIANTS",
    "DemoResults",
    "DemoTask",
    "VariantResult",
    "build_parser",
    "cli",
    "format_report",
    "main",
    "run_demo",
]

# names defined by the demo's training module, imported on first use
_TRAINING_NAMES = ("DemoResults", "DemoTask", "VariantResult", "format_report", "run_demo")


def __getattr__(name: str) -> Any:
    if name in _TRAINING_NAMES:
        from lightning_relu import _demo

        return getattr(_demo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _training(name: str) -> Any:
    """``name`` as this module holds it: what a test put there, else the training module's."""
    return getattr(sys.modules[__name__], name)


# --------------------------------------------------------------------------------------------------------- CLI

# --------------------------------------------------------------------------------------------------------- CLI
_DEMO_HELP = """\
Train a deep, narrow ReLU network (10 layers of 4 units, a one-dimensional regression with Adam) several ways,
on several seeds, each fit with a DeadUnitMonitor and its own TensorBoard run, and print what happened: how many
networks ended as a constant function (a layer with every unit dead), the dead units and the final loss.

variants:
{variants}

For a given seed every variant starts from the same He weights (the initializers change them before the first
step) and sees the same batches. The closing table says, for each remedy, whether it helped in this run, and says
so when it did not.
"""

_EPILOG = """\
examples:
  {prog} demo                    # 5 seeds × 4 variants: 18 s on a 2-core CPU (2026-12-07)
  {prog} demo --quick            # 3 seeds, 4 epochs: 6.5 s there
  {prog} demo --seeds 10 --out /tmp/relu-demo
  {prog} demo --width 8          # wider: fewer networks die, the remedies matter less
  tensorboard --logdir lightning_logs/demo
"""


def _version() -> str:
    from lightning_relu import __version__

    return __version__


def _prog() -> str:
    argv0 = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m lightning_relu" if argv0 in ("__main__.py", "-m", "") else "lightning-relu"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    prog = prog or _prog()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="lightning_relu: measure, prevent and revive dead ReLU units in PyTorch Lightning.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    variants = "\n".join(f"  {name:<11} {text}" for name, text in VARIANTS.items())
    demo = commands.add_parser(
        "demo",
        help="train a deep, narrow ReLU network with and without each remedy, on several seeds, and compare",
        description=_DEMO_HELP.format(variants=variants),
        epilog=_EPILOG.format(prog=prog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--epochs", type=int, default=None, help="training epochs per fit (default: 8; 4 with --quick)")
    demo.add_argument(
        "--seeds", type=int, default=None, help="number of seeds, 0, 1, ... (default: 5; 3 with --quick)"
    )
    demo.add_argument("--out", default=DEFAULT_OUT, help=f"TensorBoard log directory (default: {DEFAULT_OUT})")
    demo.add_argument("--quick", action="store_true", help="a shorter run: 512 samples, 4 epochs, 3 seeds")
    demo.add_argument("--depth", type=int, default=10, help="hidden ReLU layers (default: 10)")
    demo.add_argument("--width", type=int, default=4, help="units per hidden layer (default: 4)")
    structure = commands.add_parser(
        "structure",
        help="print each rectifier site's producer, consumers and the remedies that apply",
        description=(
            "Build a model with random weights, observe one forward on a random input and print the structure of "
            "every rectifier site: its units, the layer that produces its pre-activation, the norm in between, "
            "the layers that read it, and the remedies that can act on it (with the reason where one cannot)."
        ),
    )
    structure.add_argument(
        "model", help="a callable that builds the model, as MODULE:NAME (e.g. torchvision.models:resnet18)"
    )
    structure.add_argument(
        "--input-shape",
        default="2,3,64,64",
        help="shape of the random input, comma-separated (default: 2,3,64,64)",
    )
    structure.add_argument("--train", action="store_true", help="observe in training mode (default: evaluation)")
    compact = commands.add_parser(
        "compact",
        help="remove the dead units of a checkpoint's model and write the smaller weights",
        description=(
            "Load a Lightning checkpoint written with a DeadUnitMonitor, rebuild its LightningModule from the "
            "saved hyperparameters, remove the units dead in the monitor's last report (producer rows, norm "
            "entries, consumer columns), check that the output is unchanged on an example input in evaluation "
            "mode, print the per-site table and write a checkpoint of the compacted model (its layer widths are "
            "recorded: `lightning_relu.compaction.resize_like_` makes a fresh build load it)."
        ),
    )
    compact.add_argument(
        "checkpoint", help="a .ckpt file written by a Trainer with DeadUnitMonitor among the callbacks"
    )
    compact.add_argument("--out", default=None, help="where to write (default: CHECKPOINT with .compact before .ckpt)")
    compact.add_argument(
        "--model",
        default=None,
        help="the LightningModule class, as MODULE:NAME (default: the demo's, lightning_relu._demo:DemoRegressor)",
    )
    compact.add_argument(
        "--input-shape",
        default=None,
        help="shape of the random example input, comma-separated (required with --model; for the demo's own model "
        "the default is 1024 of its training inputs)",
    )
    compact.add_argument("--seed", type=int, default=0, help="seed of the example input (default: 0)")
    return parser


def _compact_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from lightning_relu.compaction import _compact_checkpoint

    shape = None
    if args.input_shape is not None:
        try:
            shape = tuple(int(part) for part in args.input_shape.split(","))
        except ValueError:
            parser.error(f"--input-shape must be comma-separated integers, got {args.input_shape!r}")
    if not os.path.isfile(args.checkpoint):
        parser.error(f"`checkpoint` must be a file, got {args.checkpoint!r}")
    try:
        result, out = _compact_checkpoint(args.checkpoint, args.out, args.model, shape, args.seed)
    except (ValueError, ImportError, AttributeError) as error:
        parser.error(str(error))
    print(result.table())
    print(f"{result.removed} units removed; compacted checkpoint written to {out}")
    return 0


def _structure_command(parser: argparse.ArgumentParser, spec: str, shape_text: str, train: bool) -> int:
    import importlib

    import torch

    from lightning_relu.structure import observe

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        parser.error(f"`model` must be MODULE:NAME, got {spec!r}")
    try:
        shape = tuple(int(part) for part in shape_text.split(","))
    except ValueError:
        parser.error(f"--input-shape must be comma-separated integers, got {shape_text!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        parser.error(f"cannot load {spec!r}: {error}")
    model = factory()
    model.train(train)
    torch.manual_seed(0)
    print(observe(model, torch.randn(shape)).table())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``lightning-relu`` command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "structure":
        return _structure_command(parser, args.model, args.input_shape, args.train)
    if args.command == "compact":
        return _compact_command(parser, args)
    if args.command != "demo":  # pragma: no cover - argparse rejects unknown commands
        parser.error(f"unknown command {args.command!r}")
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be a positive integer, got {args.epochs}")
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be a positive integer, got {args.seeds}")
    if args.depth < 1 or args.width < 1:
        parser.error(f"--depth and --width must be positive, got {args.depth} and {args.width}")
    DemoTask = _training("DemoTask")
    base = DemoTask(samples=512) if args.quick else DemoTask()
    task = DemoTask(
        depth=args.depth,
        width=args.width,
        in_features=base.in_features,
        samples=base.samples,
        batch_size=base.batch_size,
        lr=base.lr,
        momentum=base.momentum,
        data_seed=base.data_seed,
    )
    seeds = None if args.seeds is None else list(range(args.seeds))
    results = _training("run_demo")(args.epochs, seeds, args.out, quick=args.quick, task=task)
    print(_training("format_report")(results))
    return 0


def cli() -> None:
    """Entry point of the ``lightning-relu`` console script."""
    sys.exit(main())
