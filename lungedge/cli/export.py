"""`lungedge export`: checkpoint -> FP32 / FP16 / INT8 ONNX -> TensorRT engine (on the target)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)


def export_cmd(
    model: str = typer.Argument(..., help="Model name (see 'lungedge models')."),
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint (.pth/.h5); default: the best of MODEL's latest run."),
    fp16: bool = typer.Option(False, "--fp16", help="Also write an FP16 ONNX (inputs/outputs stay FP32)."),
    int8: bool = typer.Option(False, "--int8", help="Also write calibrated INT8 ONNX files (TensorRT and CPU forms)."),
    calib_data: Optional[Path] = typer.Option(None, help="Calibration images: a data folder or a split manifest "
                                              "(default: the training split of the checkpoint's run)."),
    calib_size: int = typer.Option(300, help="Number of calibration images (class-stratified)."),
    calib_method: str = typer.Option("entropy", help="minmax, entropy or percentile."),
    max_batch: int = typer.Option(8, help="Largest batch of the TensorRT optimisation profile."),
    opset: int = typer.Option(17, help="ONNX opset."),
    engine: Optional[bool] = typer.Option(None, "--engine/--no-engine",
                                          help="Build the TensorRT engine (default: when TensorRT and a GPU are here)."),
    out: Path = typer.Option(Path("engines"), help="Output folder (files land in OUT/MODEL/)."),
    runs: Path = typer.Option(Path("runs"), help="Training runs folder, to find the latest checkpoint."),
    calibration: Path = typer.Option(Path("calibration"), help="Where calibration manifests and ranges are kept."),
    classes: Optional[str] = typer.Option(None, help="Class names in output order, for checkpoints without metadata."),
    data: Optional[Path] = typer.Option(None, help="Data folder: class names and test images for checkpoints "
                                        "without a lungedge run."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a .pth holding a whole pickled model "
                                      "(it can run arbitrary code: only for files you trust)."),
):
    """Export a checkpoint to ONNX (FP32, FP16, calibrated INT8) and build TensorRT engines."""
    from ..export import export

    summary = export(model, checkpoint=checkpoint, fp16=fp16, int8=int8, calib_data=calib_data,
                     calib_size=calib_size, calib_method=calib_method, max_batch=max_batch, opset=opset,
                     engine=engine, out=out, runs=runs, calibration=calibration, classes=classes, data=data,
                     trust_pickle=trust_pickle, log=typer.echo)
    typer.echo(f"wrote {', '.join(summary['files'].values())}")
