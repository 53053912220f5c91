"""`lungedge demo`: the whole job on an embedded synthetic default, or on your data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_cmd)


def demo_cmd(
    data: Optional[Path] = typer.Option(None, help="Image folder (default: a small SYNTHETIC CT-like set, generated)."),
    out: Path = typer.Option(Path("demo"), help="Folder for everything the demo writes (re-run to resume)."),
    models: str = typer.Option("smallcnn,googlenet", help="Comma-separated models to train and compare."),
    per_class: int = typer.Option(40, help="Synthetic images per class (without --data)."),
):
    """Run the whole job (inspect, split, train, export, eval, bench, report) and print the report's path."""
    from ..demo import demo
    from .common import main

    report = demo(main, data=data, out=out, models=[m.strip() for m in models.split(",") if m.strip()],
                  per_class=per_class, log=typer.echo)
    typer.echo(f"report: {report.resolve()}")
