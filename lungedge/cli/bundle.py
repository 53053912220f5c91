"""`lungedge bundle`: pack a model's ONNX files for a Jetson; verify and unpack such a bundle there.

``lungedge bundle MODEL --out F.tar.gz`` is the same as ``lungedge bundle create MODEL --out F.tar.gz``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from .common import print_result


class _BundleGroup(TyperGroup):
    """Treat ``bundle MODEL ...`` (first word not a subcommand or --help) as ``bundle create MODEL ...``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["create", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_BundleGroup,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    help="Pack the ONNX files, calibration manifest, README and checksums a Jetson needs into one "
         "archive; verify or unpack it on the device. 'lungedge bundle MODEL --out F.tar.gz' is "
         "short for 'lungedge bundle create MODEL --out F.tar.gz'.",
)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="bundle")


@app.command("create")
def create_cmd(
    model: str = typer.Argument(..., help="Model name, as exported with 'lungedge export MODEL'."),
    out: Path = typer.Option(..., "--out", "-o", help="Archive to write (NAME.tar.gz; NAME becomes its top folder)."),
    precision: Optional[str] = typer.Option(None, help="Comma-separated precisions to include, e.g. fp16,int8 "
                                            "(default: every exported fp32/fp16/int8 ONNX; int8-cpu on request)."),
    engines: Path = typer.Option(Path("engines"), help="Export folder (the ONNX files are in ENGINES/MODEL/)."),
    calibration: Path = typer.Option(Path("calibration"), help="Calibration folder (for the INT8 manifest)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    results: Path = typer.Option(Path("results"), help="Eval results (the release gate of each reduced precision)."),
    allow_failed_gate: bool = typer.Option(False, "--allow-failed-gate", help="Include a precision whose release "
                                           "gate against FP32 failed in 'lungedge eval'."),
):
    """Write MODEL's ONNX files, export summary, calibration manifest, README and checksums to one .tar.gz."""
    from ..bundle import create, parse_precisions

    result = create(model, out, parse_precisions(precision), engines=engines, calibration=calibration,
                    results=results, allow_failed_gate=allow_failed_gate)
    m = result["manifest"]
    print_result(result, json_out, f"wrote {result['path']} ({result['size']:,} bytes, {len(m['files']) + 2} files: "
                                   f"{', '.join(m['precisions'])}), sha256 {result['sha256']}")


@app.command("verify")
def verify_cmd(
    file: Path = typer.Argument(..., help="A bundle written by 'lungedge bundle create'."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Check every file of a bundle against its SHA-256 manifest; refuse a tampered or truncated one."""
    from ..bundle import verify

    result = verify(file)
    m = result["manifest"]
    print_result(result, json_out, f"ok: {file}: {result['files']} files match their checksums ({m['model']}, "
                                   f"{', '.join(m['precisions'])})")


@app.command("extract")
def extract_cmd(
    file: Path = typer.Argument(..., help="A bundle written by 'lungedge bundle create'."),
    to: Path = typer.Option(Path("."), "--to", help="Folder to unpack into (the bundle's top folder is created there)."),
):
    """Verify a bundle, then unpack it (never outside --to, never over an existing folder)."""
    from ..bundle import extract

    dest = extract(file, to)
    typer.echo(f"extracted {file} to {dest}")
