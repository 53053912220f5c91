"""The ``lungedge`` command line.

Each command group lives in its own module and only parses arguments, calls a
library function and prints; heavy libraries are imported inside the commands, so
``lungedge --help`` starts fast and never loads torch, tensorflow or onnxruntime.
"""

from __future__ import annotations

import sys

import typer

from ..errors import LungedgeError
from . import data as _data
from . import export as _export
from . import mlp as _mlp
from . import train as _train
from .common import app, not_built

app.add_typer(_data.app, name="data")
app.add_typer(_mlp.app, name="mlp")


_train.register(app)  # models, train, finetune (issue #4)
_export.register(app)  # export (issue #5)


# Commands of later issues: real --help text now, a one-line "not built yet" and exit 2 when run.
PLANNED = {
    "bench": (6, "Benchmark latency and throughput of models on CPU, a CUDA GPU or a Jetson."),
    "eval": (6, "Evaluate accuracy, balanced accuracy, sensitivity and specificity of a model or artifact."),
    "report": (6, "Write the accuracy-vs-latency report (Markdown, HTML, PNG) from results files."),
    "predict": (6, "Classify images with a model, checkpoint, ONNX file or TensorRT engine."),
    "bundle": (7, "Pack the ONNX files, calibration manifest and checksums a Jetson needs into one archive."),
    "demo": (8, "Run the whole job (split, train, export, eval, bench, report) on a small default set."),
}


def _planned(name: str, issue: int, help_text: str) -> None:
    def command():
        not_built(name, issue)

    command.__doc__ = help_text
    app.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})(command)


for _name, (_issue, _help) in PLANNED.items():
    _planned(_name, _issue, _help)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; user errors become one line on stderr (exit 2)."""
    try:
        app(args=argv, prog_name="lungedge")
    except SystemExit as exc:  # typer exits on its own after every command and usage error
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except LungedgeError as exc:
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    return 0


def run() -> None:  # console-script target
    sys.exit(main())
