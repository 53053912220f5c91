"""What every command module shares: the root app, output helpers and the not-built notice."""

from __future__ import annotations

import json
import sys

import typer

from ..errors import LungedgeError

app = typer.Typer(
    name="lungedge",
    help=(
        "Train, export, quantise, benchmark and deploy lung-image classifiers "
        "(ResNet50, GoogLeNet, Inception v3, DenseNet121) from a workstation to an NVIDIA Jetson."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

ISSUES = {
    3: "the MLP reference kernel",
    4: "training and the model registry",
    5: "export, INT8/FP16 and TensorRT engines",
    6: "runners, bench, eval, predict and report",
    7: "Jetson deployment",
    8: "the end-to-end demo",
}


def not_built(command: str, issue: int) -> None:
    """One line saying the command is not built yet, and a non-zero exit."""
    raise LungedgeError(f"'lungedge {command}' is not built yet (planned with {ISSUES[issue]}, issue #{issue})")


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
