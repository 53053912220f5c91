"""`lungedge export`: checkpoint -> FP32 / FP16 / INT8 ONNX -> TensorRT engine (on the target)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import max_bacc_drop_option, max_sens_drop_option


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)


def export_cmd(
    model: str = typer.Argument(..., help="Model name (see 'lungedge models'), or your own name with --custom."),
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint (.pth/.safetensors/.h5, ...); default: the best of MODEL's latest run."),
    fp16: bool = typer.Option(False, "--fp16", help="Also write an FP16 ONNX (inputs/outputs stay FP32)."),
    int8: bool = typer.Option(False, "--int8", help="Also write calibrated INT8 ONNX files (TensorRT and CPU forms)."),
    calib_data: Optional[Path] = typer.Option(None, help="Calibration images: a data folder or a split manifest "
                                              "(default: the training split of the checkpoint's run)."),
    calib_size: int = typer.Option(300, help="Number of calibration images (class-stratified)."),
    calib_method: str = typer.Option(
        "minmax", help="minmax (measured best on IQ-OTH/NCCD), entropy (TensorRT's KL, 2048 bins) or percentile."),
    max_batch: int = typer.Option(8, help="Largest batch of the TensorRT optimisation profile."),
    opset: int = typer.Option(17, help="ONNX opset."),
    uint8_input: bool = typer.Option(False, "--uint8-input", help="Every file takes the resized uint8 RGB pixels "
                                     "(N x H x W x 3) and normalises inside: preprocessing is decode + crop + resize."),
    temperature: bool = typer.Option(True, "--temperature/--no-temperature",
                                     help="Fit a temperature on the run's validation images so that the "
                                     "probabilities say how often the model is right (predictions unchanged)."),
    input_check: bool = typer.Option(True, "--input-check/--no-input-check",
                                     help="Fit the input check on the run's training images (else --calib-data's) "
                                     "so that predict and eval say when an image is unlike them."),
    engine: Optional[bool] = typer.Option(None, "--engine/--no-engine",
                                          help="Build the TensorRT engine (default: when TensorRT and a GPU are here)."),
    out: Path = typer.Option(Path("engines"), help="Output folder (files land in OUT/MODEL/)."),
    runs: Path = typer.Option(Path("runs"), help="Training runs folder, to find the latest checkpoint."),
    calibration: Path = typer.Option(Path("calibration"), help="Where calibration manifests and ranges are kept."),
    classes: Optional[str] = typer.Option(None, help="Class names in output order, for checkpoints without metadata."),
    data: Optional[Path] = typer.Option(None, help="Data folder: class names and test images for checkpoints "
                                        "without a lungedge run."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a .pth holding a whole pickled model, "
                                      "or a Keras file with Lambda layers (both can run arbitrary code: only for "
                                      "files you trust)."),
    custom: bool = typer.Option(False, "--custom", help="Your own model, any architecture (Keras .h5/.keras, "
                                "TorchScript .pt, torch.export .pt2, plain .onnx), exported as MODEL: declare "
                                "--classes and the preprocessing below."),
    input_size: Optional[int] = typer.Option(None, help="Input size in pixels (default: read from the model)."),
    scale: Optional[str] = typer.Option(None, help="Pixel scale before mean/std, e.g. 1/255 or 1."),
    mean: Optional[str] = typer.Option(None, help="Mean to subtract after scaling: 1 or 3 numbers, or none."),
    std: Optional[str] = typer.Option(None, help="Std to divide by: 1 or 3 numbers, or none."),
    channels: Optional[str] = typer.Option(None, help="Channel order the model takes: RGB, BGR or GRAY."),
    layout: Optional[str] = typer.Option(None, help="Input layout: NCHW or NHWC (default: read from the model)."),
    resize: Optional[str] = typer.Option(None, help="crop (centre square, then resize) or stretch (whole image)."),
    output: Optional[str] = typer.Option(None, help="What the model outputs: logits, probabilities or sigmoid "
                                         "(default: detected from its last layer; a state dict holds none: the Softmax/Sigmoid "
                                         "it ended in is appended)."),
    transform_input: Optional[bool] = typer.Option(None, "--transform-input/--no-transform-input",
                                                   help="GoogLeNet/Inception v3 state dicts from outside: torchvision's "
                                                   "input transform (default on, as for ImageNet weights)."),
    gate: bool = typer.Option(False, "--gate", help="Exit non-zero when FP16/INT8 fails the release gate against "
                              "FP32 on the test images (the files are still written; see --max-bacc-drop)."),
    max_bacc_drop: float = max_bacc_drop_option(),
    max_sens_drop: float = max_sens_drop_option(),
):
    """Export a checkpoint to ONNX (FP32, FP16, calibrated INT8) and build TensorRT engines."""
    from ..export import export, failed_gates

    summary = export(model, checkpoint=checkpoint, fp16=fp16, int8=int8, calib_data=calib_data,
                     calib_size=calib_size, calib_method=calib_method, max_batch=max_batch, opset=opset,
                     engine=engine, out=out, runs=runs, calibration=calibration, classes=classes, data=data,
                     trust_pickle=trust_pickle, log=typer.echo,
                     options={"custom": custom, "input_size": input_size, "scale": scale, "mean": mean, "std": std,
                              "channels": channels, "layout": layout, "resize": resize, "output": output,
                              "transform_input": transform_input},
                     max_bacc_drop=max_bacc_drop / 100, max_sens_drop=max_sens_drop / 100, uint8_input=uint8_input,
                     temperature=temperature, input_check=input_check)
    typer.echo(f"wrote {', '.join(summary['files'].values())}")
    failed = failed_gates(summary)
    if gate and failed:
        typer.echo(f"error: release gate against FP32 failed for {', '.join(failed)}", err=True)
        raise typer.Exit(1)
