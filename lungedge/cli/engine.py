"""`lungedge engine build FILE.onnx`: the TensorRT engine, built on the GPU or Jetson that runs it.

The model name and precision come from the ONNX's own metadata, so an ONNX file copied alone
(or from a bundle) is enough.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import print_result

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    help="TensorRT engines, built on the GPU or Jetson that will run them.",
)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="engine")


@app.command("build")
def build_cmd(
    onnx_file: Path = typer.Argument(..., metavar="FILE.onnx", help="An ONNX exported by lungedge (fp32, fp16 or int8)."),
    max_batch: int = typer.Option(8, help="Largest batch of the optimisation profile (1..MAX_BATCH)."),
    opt_batch: Optional[int] = typer.Option(None, help="Batch size TensorRT tunes for (default: MAX_BATCH)."),
    workspace_gib: float = typer.Option(4.0, help="Builder workspace limit in GiB (use less on small Jetsons)."),
    out: Path = typer.Option(Path("engines"), help="Output folder (the engine lands in OUT/MODEL/)."),
    json_out: bool = typer.Option(False, "--json", help="Print the engine's sidecar as JSON."),
):
    """Build a TensorRT engine from an exported ONNX; model and precision come from its metadata."""
    from ..trt import build_from_onnx

    path, sidecar = build_from_onnx(onnx_file, max_batch=max_batch, opt_batch=opt_batch,
                                    workspace_gib=workspace_gib, out=out)
    print_result({"engine": str(path), **sidecar}, json_out,
                 f"wrote {path} ({sidecar.get('precision')}, batch 1..{sidecar.get('max_batch')}, {sidecar.get('gpu')}, "
                 f"TensorRT {sidecar.get('trt_version')}, {sidecar.get('build_seconds')} s)")
