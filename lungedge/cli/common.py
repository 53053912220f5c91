"""What every command module shares: the root app and output helpers."""

from __future__ import annotations

import json
import sys

import typer

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


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
