"""`lungedge models`, `lungedge train` and `lungedge finetune`: parse, call lungedge.train, print."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import print_json


def _epoch_printer(rec: dict) -> None:
    from ..train.common import epoch_line

    typer.echo(epoch_line(rec), err=True)


def _print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        print_json(summary)
        return
    run_dir = Path(summary["run_dir"])
    if summary.get("status") == "interrupted":
        typer.echo(f"interrupted; continue with --resume ({run_dir})")
        return
    best = summary.get("best") or {}
    typer.echo(f"run: {run_dir}")
    typer.echo(f"best epoch {best.get('epoch')}: val balanced accuracy {best.get('val_balanced_accuracy', 0):.3f}")
    test = summary.get("test")
    if test and test.get("n"):
        sens = "  ".join(f"{c} {v:.3f}" if v is not None else f"{c} -" for c, v in test["sensitivity"].items())
        typer.echo(f"test ({test['n']} images): balanced accuracy {test['balanced_accuracy']:.3f}, "
                   f"accuracy {test['accuracy']:.3f}, macro-F1 {test['macro_f1']:.3f}")
        typer.echo(f"test sensitivity: {sens}")
        typer.echo("confusion matrix (rows true, columns predicted; " + ", ".join(summary["classes"]) + "):")
        for row in test["confusion_matrix"]:
            typer.echo("  " + " ".join(f"{v:5d}" for v in row))
    typer.echo(f"checkpoints: {run_dir / 'best.pth' if (run_dir / 'best.pth').exists() else run_dir / 'best.h5'} "
               f"(best), last alongside; metrics: {run_dir / 'metrics.json'}")


def models_cmd(
    mode: Optional[str] = typer.Option(None, help="Count trainable parameters in this mode (default: each model's own)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """List the model registry: framework, input size, total and trainable parameters."""
    from ..models.registry import describe, names

    rows, missing = [], []
    for n in names():
        try:
            rows.append(describe(n, mode=mode))
        except ModuleNotFoundError as exc:  # e.g. no keras/tensorflow here: list the others
            missing.append(f"note: {n} not listed: {exc.name} is not installed here")
    for line in missing:
        typer.echo(line, err=True)
    if as_json:
        print_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="models", title_justify="left")
    for i, col in enumerate(["name", "model", "framework", "input", "mode", "total params", "trainable", "trains",
                             "epochs", "batch"]):
        table.add_column(col, justify="right" if col in ("input", "total params", "trainable", "epochs", "batch") else "left")
    for r in rows:
        table.add_row(r["name"], r["title"], r["framework"], str(r["native_size"]), r["mode"], f"{r['total_params']:,}",
                      f"{r['trainable_params']:,}", r["trains"], str(r["defaults"]["epochs"]),
                      str(r["defaults"]["batch_size"]))
    Console(width=200).print(table)


def train_cmd(
    model: str = typer.Argument(..., help="Registry name (see 'lungedge models')."),
    data: Optional[Path] = typer.Option(None, "--data", help="Image folder (IQ-OTH/NCCD, LC25000 or one folder per class)."),
    split: Optional[Path] = typer.Option(None, "--split", help="Split manifest from 'lungedge data split' (default: make the grouped split)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default: the model's, from the group's table)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size (global, over all ranks)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Input size in pixels (default: the model's native size)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (AdamW / Adam, warm-up then cosine)."),
    weights: str = typer.Option("imagenet", help="imagenet (download and cache), none (random init) or a local weights file "
                                 "(.pth/.safetensors, .h5)."),
    mode: Optional[str] = typer.Option(None, help="transfer (head only), finetune (head + top blocks) or full."),
    unfreeze: Optional[str] = typer.Option(None, help="finetune mode: number of top blocks to train, or 'all'."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    out: Path = typer.Option(Path("runs"), help="Runs folder; this run goes to OUT/MODEL/RUN."),
    run_name: Optional[str] = typer.Option(None, "--run-name", help="Run folder name (default: a timestamp)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the newest interrupted run of MODEL under OUT (or --run-name)."),
    seed: int = typer.Option(0, help="Seed of the split, the initialisation, shuffling and augmentation."),
    patience: int = typer.Option(0, help="Early stopping: stop after this many epochs without a better val balanced accuracy (0: off)."),
    group_by: str = typer.Option("near-duplicate", "--group-by", help="Split made without --split: near-duplicate or none."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Random flips, small rotations/zoom and intensity jitter while training."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (PyTorch or TensorFlow)."),
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as JSON."),
):
    """Train one of the classifiers on an image folder (transfer, finetune or full)."""
    from ..train import TrainConfig, train

    cfg = TrainConfig(model=model, data=str(data) if data else None, split=str(split) if split else None, epochs=epochs,
                      batch_size=batch_size, image_size=image_size, lr=lr, weights=weights, mode=mode, unfreeze=unfreeze,
                      device=device, out=str(out), run_name=run_name, seed=seed, patience=patience, group_by=group_by,
                      augment=augment, threads=threads)
    summary = train(cfg, resume=resume, on_epoch=_epoch_printer)
    _print_summary(summary, as_json)


def finetune_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint from 'lungedge train' (.pth or .h5)."),
    unfreeze: Optional[str] = typer.Option(None, help="Number of top blocks to train besides the head, or 'all'."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default 10)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default: a tenth of the original, at most 1e-4)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Image folder (default: the checkpoint's)."),
    split: Optional[Path] = typer.Option(None, "--split", help="Split manifest (default: the checkpoint's)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    out: Optional[Path] = typer.Option(None, help="Runs folder (default: the checkpoint's)."),
    patience: Optional[int] = typer.Option(None, help="Early stopping patience (0: off)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (PyTorch or TensorFlow)."),
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as JSON."),
):
    """Continue training a checkpoint with more layers unfrozen and a lower learning rate."""
    from ..limits import check_threads
    from ..train import finetune

    check_threads(threads)  # before the checkpoint is read
    summary = finetune(checkpoint, unfreeze=unfreeze, epochs=epochs, lr=lr, on_epoch=_epoch_printer,
                       data=str(data) if data else None, split=str(split) if split else None,
                       batch_size=batch_size, device=device, out=str(out) if out else None, patience=patience,
                       threads=threads)
    _print_summary(summary, as_json)


def register(app) -> None:
    app.command("models")(models_cmd)
    app.command("train")(train_cmd)
    app.command("finetune")(finetune_cmd)
