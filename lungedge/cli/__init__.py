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
from . import mlp as _mlp
from .common import app, not_built

app.add_typer(_data.app, name="data")
app.add_typer(_mlp.app, name="mlp")


@app.command("models")
def models_cmd():
    """List the model registry: framework, input size, total and trainable parameters."""
    not_built("models", 4)


@app.command("train", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def train_cmd():
    """Train one of the four classifiers on an image folder (transfer, finetune or full)."""
    not_built("train", 4)


@app.command("finetune", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def finetune_cmd():
    """Continue training a checkpoint with more layers unfrozen and a lower learning rate."""
    not_built("finetune", 4)


@app.command("export", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def export_cmd():
    """Export a checkpoint to ONNX (FP32, FP16, calibrated INT8) and build TensorRT engines."""
    not_built("export", 5)


@app.command("bench", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def bench_cmd():
    """Benchmark latency and throughput of models on CPU, a CUDA GPU or a Jetson."""
    not_built("bench", 6)


@app.command("eval", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def eval_cmd():
    """Evaluate accuracy, balanced accuracy, sensitivity and specificity of a model or artifact."""
    not_built("eval", 6)


@app.command("report", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def report_cmd():
    """Write the accuracy-vs-latency report (Markdown, HTML, PNG) from results files."""
    not_built("report", 6)


@app.command("predict", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def predict_cmd():
    """Classify images with a model, checkpoint, ONNX file or TensorRT engine."""
    not_built("predict", 6)


@app.command("bundle", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def bundle_cmd():
    """Pack the ONNX files, calibration manifest and checksums a Jetson needs into one archive."""
    not_built("bundle", 7)


@app.command("demo", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def demo_cmd():
    """Run the whole job (split, train, export, eval, bench, report) on a small default set."""
    not_built("demo", 8)


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
