"""`lungedge bench / eval / report / predict`: parse, call the library, print."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import LungedgeError
from ..limits import MAX_BATCH, check_threads
from .common import max_bacc_drop_option, max_sens_drop_option

MAX_BOOTSTRAP = 100_000  # replicates x groups draws are held at once: 10**8 ran until killed


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_cmd)
    app.command("eval")(eval_cmd)
    app.command("report")(report_cmd)
    app.command("predict")(predict_cmd)


# the backend table's names (lungedge.runners.registry; written out so --help does not import numpy:
# tests/test_cli.py checks that every registered backend is here)
BACKEND_NAMES = "torch, keras, onnxruntime, openvino, onnxruntime-trt, tensorrt, torch-amp, torch-compile"
BACKEND_HELP = (f"Comma list of {BACKEND_NAMES} (default: every installed one that runs the files on the device: "
                "the source framework, onnxruntime and openvino on cpu; also onnxruntime-trt, tensorrt, torch-amp and "
                "torch-compile on cuda).")


def _ints(text: str, what: str, upper: int) -> list[int]:
    """``"1,8,8"`` -> [1, 8]: whole numbers from 1 to ``upper``, each once, in the order given."""
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise LungedgeError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise LungedgeError(f"{what} must be positive integers, got {text!r}")
    if any(v > upper for v in vals):
        raise LungedgeError(f"{what} must be at most {upper:,}, got {text!r}")
    return list(dict.fromkeys(vals))


def _jobs(specs, all_models, device, backend, precision, runs, engines, include_trt_int8=False):
    from ..errors import check_choice
    from ..runners import BACKENDS, DEVICES, PRECISIONS
    from ..runners.discover import parse_list, resolve

    if device is not None:
        check_choice(device, DEVICES, "device")
    if device == "cuda":
        from ..bench import check_cuda

        check_cuda()
    return resolve(specs, all_models, device, parse_list(backend, BACKENDS, "backend"),
                   parse_list(precision, PRECISIONS, "precision"), runs, engines, include_trt_int8)


def _console():
    from rich.console import Console

    return Console(width=200)


def bench_cmd(
    models: Optional[List[str]] = typer.Argument(None, help="Model names and/or artifact files (.pth, .h5, .onnx, .engine)."),
    all_models: bool = typer.Option(False, "--all", help="Every model with a checkpoint or ONNX files."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cpu; an engine runs on cuda)."),
    backend: Optional[str] = typer.Option(None, help=BACKEND_HELP),
    precision: Optional[str] = typer.Option(None, help="Comma list of fp32, fp16, bf16, int8 (default: every file present; bf16: OpenVINO on the fp32 file, where the CPU has BF16)."),
    batch_sizes: str = typer.Option("1,8,32", help="Comma-separated batch sizes."),
    warmup: int = typer.Option(3, help="Untimed calls before timing."),
    iters: Optional[int] = typer.Option(None, help="Timed calls per measurement (default: run for --seconds)."),
    seconds: float = typer.Option(1.0, help="Time each measurement for at least this long (at least 3 calls)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads of the backend (default: the library's)."),
    no_preprocessing: bool = typer.Option(False, "--no-preprocessing", help="Skip the timing that includes "
                                          "decoding and preprocessing image files."),
    trt_int8: bool = typer.Option(False, "--trt-int8", help="On cpu also run the S8S8 int8 ONNX meant for TensorRT."),
    data: Optional[Path] = typer.Option(None, help="Image folder for the +preprocessing timing (default: synthetic "
                                        "512x512 PNGs)."),
    runs: Path = typer.Option(Path("runs"), help="Training runs folder."),
    engines: Path = typer.Option(Path("engines"), help="Exported ONNX / engine folder."),
    out: Path = typer.Option(Path("results"), help="Where the JSON-lines results go."),
):
    """Benchmark latency (p50/p90/p99, mean, std) and throughput per backend, precision and batch size."""
    from ..bench import check_counts, run_bench, table

    check_counts(warmup, iters)
    check_threads(threads)
    sizes = _ints(batch_sizes, "--batch-sizes", MAX_BATCH)
    jobs = _jobs(models, all_models, device, backend, precision, runs, engines, trt_int8)
    from ..results import write_rows

    rows, _ = run_bench(jobs, sizes, warmup, iters, seconds, threads, data, None,
                        not no_preprocessing, log=lambda s: typer.echo(s, err=True), keep_to=out)
    con = _console()
    con.print(table(rows))
    includes = sorted({r["includes"] for r in rows if not r["preprocessing"]})
    con.print("times include: " + "; ".join(includes))
    path = write_rows(rows, out, "bench")  # after the table: a failed write does not lose the measurement
    typer.echo(f"wrote {path}")


def eval_cmd(
    model: str = typer.Argument(..., help="A model name or an artifact file (.pth, .h5, .onnx, .engine)."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cpu; an engine runs on cuda)."),
    backend: Optional[str] = typer.Option(None, help="Comma list of backends (default: as bench)."),
    precision: Optional[str] = typer.Option(None, help="Comma list of fp32, fp16, bf16, int8 (default: every file present; bf16: OpenVINO on the fp32 file, where the CPU has BF16)."),
    data: Optional[Path] = typer.Option(None, help="Data folder (with --split: the manifest's root; alone: every "
                                        "image in it)."),
    split: Optional[Path] = typer.Option(None, help="Split manifest; its test part is evaluated "
                                         "(default: the training run's split)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads of the backend."),
    runs: Path = typer.Option(Path("runs"), help="Training runs folder."),
    engines: Path = typer.Option(Path("engines"), help="Exported ONNX / engine folder."),
    out: Path = typer.Option(Path("results"), help="Where the JSON-lines results go."),
    as_json: bool = typer.Option(False, "--json", help="Print the result rows as JSON."),
    gate: bool = typer.Option(False, "--gate", help="Exit non-zero when a reduced precision fails the release "
                              "gate against FP32 (paired group bootstrap; see --max-bacc-drop, --max-sens-drop)."),
    max_bacc_drop: float = max_bacc_drop_option(),
    max_sens_drop: float = max_sens_drop_option(),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap replicates for the 95% intervals."),
):
    """Evaluate accuracy, balanced accuracy, sensitivity, specificity, F1, AUROC (with 95% group-bootstrap
    intervals) and FP16/INT8 drift with a paired release gate against FP32."""
    from ..evaluate import confusion_text, gate_lines, run_eval, table
    from ..stats import check_gate_limits
    from ..results import write_rows
    from .common import print_json

    if not 100 <= bootstrap <= MAX_BOOTSTRAP:
        raise LungedgeError(f"--bootstrap must be from 100 to {MAX_BOOTSTRAP:,}, got {bootstrap}")
    check_gate_limits(max_bacc_drop / 100, max_sens_drop / 100)  # before any work
    check_threads(threads)
    jobs = _jobs([model], False, device, backend, precision, runs, engines)
    rows = run_eval(jobs, data, split, runs, threads, log=lambda s: typer.echo(s, err=True), n_boot=bootstrap,
                    max_bacc_drop=max_bacc_drop / 100, max_sens_drop=max_sens_drop / 100)
    failed = [r for r in rows if r.get("gate") and not r["gate"]["pass"]]
    if as_json:
        print_json(rows)
        write_rows(rows, out, "eval")
    else:
        con = _console()
        con.print(table(rows))
        for r in rows:
            con.print(f"\n{r['model']} {r['backend']} {r['variant']}: confusion matrix (rows true, columns predicted)")
            con.print(confusion_text(r), highlight=False)
        for line in gate_lines(rows):
            con.print(line, highlight=False)
        path = write_rows(rows, out, "eval")  # after the tables: a failed write does not lose the measurement
        typer.echo(f"wrote {path}")
    if gate and failed:
        typer.echo("error: release gate failed for " + ", ".join(f"{r['model']} {r['backend']} {r['variant']}"
                                                              for r in failed), err=True)
        raise typer.Exit(1)


def report_cmd(
    results: Optional[List[Path]] = typer.Option(None, "--results", help="Results files or folders (repeatable; "
                                                 "default: results/)."),
    out: Path = typer.Option(Path("reports"), help="Output folder for report.md, report.html and the PNGs."),
):
    """Write the accuracy-vs-latency report (Markdown, self-contained HTML, PNG) from results files."""
    from ..report import build_report

    summary = build_report(list(results) if results else [Path("results")], out)
    for mid, label in summary["machines"].items():
        typer.echo(f"{mid}: {label}")
    typer.echo(f"wrote {summary['markdown']}, {summary['html']}" + (f", {summary['png']}" if summary["png"] else "")
               + (f", {summary['saliency']}" if summary.get("saliency") else "")
               + (f", {summary['reliability']}" if summary.get("reliability") else "")
               + f" ({summary['rows']} rows)")


def predict_cmd(
    model: str = typer.Argument(..., help="A model name or an artifact file (.pth, .h5, .onnx, .engine)."),
    images: List[Path] = typer.Argument(..., help="Image files."),
    backend: Optional[str] = typer.Option(None, help=f"One of {BACKEND_NAMES} (default: the first that runs the file)."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cpu; an engine runs on cuda)."),
    precision: Optional[str] = typer.Option(None, help="fp32, fp16 or int8 (for a MODEL name: which file)."),
    runs: Path = typer.Option(Path("runs"), help="Training runs folder."),
    engines: Path = typer.Option(Path("engines"), help="Exported ONNX / engine folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    explain: Optional[Path] = typer.Option(None, "--explain", help="Write each image with its saliency map "
                                           "overlaid into this folder."),
    method: str = typer.Option("auto", "--method", help="Saliency: auto (Grad-CAM for PyTorch checkpoints, "
                               "occlusion otherwise), gradcam or occlusion (any backend)."),
):
    """Classify images with a model, checkpoint, ONNX file or TensorRT engine: class and probabilities."""
    from ..predict import predict
    from ..errors import check_choice, display_name
    from ..saliency import METHODS
    from .common import print_json

    for name, value in (("--backend", backend), ("--precision", precision)):  # predict runs one file one way
        if value is not None and "," in value:
            raise LungedgeError(f"predict takes one {name}, got {value!r}")
    check_choice(method, METHODS, "saliency method")  # also without --explain: a typo is not ignored
    jobs = _jobs([model], False, device, backend, precision, runs, engines)
    job = jobs[0]
    result = predict(job.artifact, images, job.backend, job.device, job.precision, explain_dir=explain,
                     method=method)
    if as_json:
        print_json(result)
        for p in result["predictions"]:  # beside the JSON, on stderr
            _unlike_warning(p, lambda line: typer.echo(line, err=True))
        _exif_note(result)
        _some_unreadable(result)
        return
    t = result.get("temperature", 1.0)
    typer.echo(f"{result['model']} via {result['backend']} {result['device']} {result['precision']} "
               f"({result['artifact']})" + (f"; probabilities calibrated with temperature {t:.2f}" if t != 1 else ""))
    for p in result["predictions"]:
        probs = "  ".join(f"{c} {v:.3f}" for c, v in p["probabilities"].items())
        typer.echo(f"{display_name(p['image'])}: {p['class']}  ({probs})"
                   + (f"  -> {display_name(p['overlay'])}" if p.get("overlay") else ""))
        _unlike_warning(p, typer.echo)
    for u in result.get("unreadable", []):
        typer.echo(f"{display_name(u['image'])}: unreadable ({u['reason']})")
    _exif_note(result)
    _some_unreadable(result)


def _exif_note(result: dict) -> None:
    """One stderr line when images carry an EXIF orientation: a viewer shows them turned, the model does not
    (a CT model shown a slice turned by 90° may call every slice one class, and the input check cannot see it)."""
    from ..errors import display_name

    turned = [p for p in result["predictions"] if p.get("exif_orientation")]
    if turned:
        first = turned[0]
        typer.echo(f"note: {len(turned)} image(s) carry an EXIF orientation (first: {display_name(first['image'])}, "
                   f"{first['exif_orientation']} in photo viewers); the model saw the pixels as stored, as lungedge "
                   "reads every image in training too: if what you see is the right way up, save the image "
                   "upright without the tag", err=True)


def _some_unreadable(result: dict) -> None:
    """Exit 1 when some images could not be read (the others are classified and printed): a script that checks
    only the exit status must not take a partial answer for a whole one. None readable is exit 2, raised earlier."""
    bad = result.get("unreadable") or []
    if bad:
        typer.echo(f"{len(bad)} of {len(bad) + len(result['predictions'])} images could not be read and have no "
                   "prediction (listed); exit status 1", err=True)
        raise typer.Exit(1)


def _unlike_warning(pred: dict, echo, shown: int = 2) -> None:
    """One warning line for a prediction whose image the input check finds unlike the training images."""
    from ..errors import display_name

    check = pred.get("input_check")
    if not check or not check["unlike_training"]:
        return
    reasons = check["reasons"]
    more = f"; and {len(reasons) - shown} more" if len(reasons) > shown else ""
    echo(f"warning: {display_name(pred['image'])} is unlike the images the model was trained on "
         f"({'; '.join(reasons[:shown])}{more}): the class shown may be meaningless")
