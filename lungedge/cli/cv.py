"""`lungedge cv`: grouped, class-stratified k-fold cross-validation with intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("cv")(cv_cmd)


def cv_cmd(
    model: str = typer.Argument(..., help="A registry model name (see 'lungedge models')."),
    data: Path = typer.Option(..., "--data", help="Data set folder."),
    folds: int = typer.Option(5, help="Number of folds."),
    repeats: int = typer.Option(1, help="Repeat the k-fold with other fold assignments (seed + repeat)."),
    group_by: str = typer.Option("near-duplicate", "--group-by",
                                 help="near-duplicate: whole scans/tiles per fold; none: image by image (the "
                                 "difference is the leakage gap)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Input size (default: the model's)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs per fold (default: the model's)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size (default: the model's)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: the model's)."),
    weights: Optional[str] = typer.Option(None, help="imagenet, none or a weights file (default: imagenet; none "
                                          "for smallcnn)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for training and evaluation."),
    seed: int = typer.Option(0, help="Seed of the fold assignment and the trainings."),
    out: Path = typer.Option(Path("cv"), help="Output folder (one sub-folder per fold; finished folds are reused)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Cross-validate MODEL: one training per fold, mean ± sd and 95% intervals of every metric."""
    from ..cv import run_cv, table_rows
    from .common import print_json

    report = run_cv(model, data, folds, repeats, group_by, image_size, epochs, batch_size, lr, weights, threads,
                    seed, out, log=lambda s: typer.echo(s, err=True))
    if as_json:
        print_json(report)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"lungedge cv {model}: {folds} folds x {repeats}, group-by {group_by}, "
              f"{report['images']} images in {report['groups']} groups", title_justify="left")
    for col in ("metric", "across folds: mean ± sd [95% t-interval]", "pooled out-of-fold [95% group bootstrap]"):
        t.add_column(col)
    for row in table_rows(report):
        t.add_row(*row)
    con = Console(width=200)
    con.print(t)
    classes = report["classes"]
    con.print("pooled confusion matrix (rows true, columns predicted): " + "  ".join(
        f"{c}: {row}" for c, row in zip(classes, report["pooled_confusion_matrix"])), highlight=False)
    typer.echo(f"wrote {report['path']}")
