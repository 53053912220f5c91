"""Latency and throughput of any runner: warm-up first, then percentiles.

For every job (artifact x backend x device x precision) and batch size, two timings:

* ``preprocessing: false`` — one ``runner.infer(batch)`` on an already preprocessed batch
  (on a GPU this includes the host->device and device->host copies: see ``includes``);
* ``preprocessing: true`` — decode the image files, crop/resize/normalise, then infer.

The two are timed in turns (:func:`lungedge.timing.time_in_turns`: stretches of back-to-back calls
of each, about five rounds), so that a burst of load on a shared machine cannot make one of them
look faster than the other: their ratio is what a user reads.

Each result row carries its provenance (host, CPU, GPU and driver, library versions, threads,
artifact hash, date) and is written as one JSON line under ``results/``.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np

from . import provenance
from .errors import LungedgeError, display_name
from .preprocess import decode_threads
from .results import job_row, write_rows
from .runners import open_runner
from .runners.discover import Job
from .timing import latency_stats, time_in_turns

SYNTHETIC_SIZE = 512
MAX_ITERS = 1_000_000  # timed calls per measurement
MAX_WARMUP = 10_000


def synthetic_images(folder: Path, n: int = 8, size: int = SYNTHETIC_SIZE, seed: int = 0) -> list[Path]:
    """n smooth grayscale PNGs the size of a CT slice, for timing decode + preprocessing."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        coarse = rng.integers(0, 256, size=(16, 16), dtype=np.uint8)
        p = folder / f"synthetic{i:02d}.png"
        Image.fromarray(coarse, mode="L").resize((size, size), Image.BICUBIC).save(p)
        out.append(p)
    return out


def image_files(data, log=lambda s: None) -> list[Path]:
    """Up to 32 images spread over the data set for the ``+prep`` timing; an unreadable one (not an image,
    truncated, a FIFO) is skipped with a line, as ``data split``, ``eval`` and ``predict`` do."""
    from .data.layout import detect_layout
    from .preprocess import ImageReadError, read_image

    layout = detect_layout(data)
    out = []
    for f in layout.files[:: max(1, len(layout.files) // 32)][:32]:
        path = layout.root / f.path
        try:
            read_image(path)
            out.append(path)
        except ImageReadError as exc:
            log(f"skipped {display_name(path)}: {str(exc).removeprefix(f'{path}: ')}")
    if not out:
        raise LungedgeError(f"none of the images picked from {data} for the +prep timing could be read")
    return out


def bench_job(job: Job, batch_sizes, files, warmup: int = 3, iters: int | None = None,
                 seconds: float | None = 1.0, threads: int | None = None, preprocessing: bool = True,
                 log=lambda s: None) -> list[dict]:
    rows = []
    with open_runner(job.artifact, job.backend, job.device, job.precision, threads) as runner:
        prep = runner.preprocessing
        base = {**job_row("bench", job, runner), "input_size": prep.size}
        for bs in batch_sizes:
            paths = [files[i % len(files)] for i in range(bs)]
            x = prep.load_batch(paths)
            t0 = time.perf_counter()
            runner.infer(x)  # first call: graph building / compiling / allocation, never timed
            first_call_s = time.perf_counter() - t0
            modes = [(False, lambda: runner.infer(x))]
            if preprocessing:
                modes.append((True, lambda: runner.infer(prep.load_batch(paths))))
            timed = time_in_turns([fn for _, fn in modes], warmup, iters, seconds)
            for (with_prep, _), times in zip(modes, timed):
                lat, ips = latency_stats(times, bs)
                includes = runner.includes
                if with_prep:
                    on = f"on {min(bs, decode_threads())} CPU thread(s)" if bs > 1 else "on the CPU"
                    includes = f"decode + crop/resize/normalise of {bs} image file(s) {on}, then {includes}"
                row = {**base, "batch_size": bs, "preprocessing": with_prep, "includes": includes,
                       "warmup": warmup, "iters": len(times), "timed_in_turns_with": [
                           "+prep" if w else "model only" for w, _ in modes if w != with_prep],
                       "latency_ms": lat, "throughput_ips": ips,
                       "first_call_s": first_call_s, "provenance": provenance.collect(threads=runner.threads_used())}
                if not with_prep:
                    row.update(runner.timing_facts(bs, len(times)))
                rows.append(row)
                log(f"{runner.name} b{bs}{' +prep' if with_prep else ''}: p50 {lat['p50']:.2f} ms, "
                    f"{ips:.1f} img/s ({len(times)} iters)")
    return rows


def add_ratios(rows: list[dict]) -> None:
    """``vs_source``: source-framework FP32 p50 / this p50 (same model, device, batch, preprocessing, machine)."""
    ref = {}
    for r in rows:
        if r["backend"] == r["source_framework"] and r["precision"] == "fp32":
            ref[(r["model"], r["device"], r["batch_size"], r["preprocessing"])] = r["latency_ms"]["p50"]
    for r in rows:
        base = ref.get((r["model"], r["device"], r["batch_size"], r["preprocessing"]))
        r["vs_source"] = (base / r["latency_ms"]["p50"]) if base and r["latency_ms"]["p50"] > 0 else None


def check_counts(warmup: int, iters: int | None) -> None:
    """--warmup and --iters within bounds (10**12 calls would run for weeks)."""
    if iters is not None and not 1 <= iters <= MAX_ITERS:
        raise LungedgeError(f"--iters must be from 1 to {MAX_ITERS:,}, got {iters}")
    if not 0 <= warmup <= MAX_WARMUP:
        raise LungedgeError(f"--warmup must be from 0 to {MAX_WARMUP:,}, got {warmup}")


def run_bench(jobs: list[Job], batch_sizes=(1, 8), warmup: int = 3, iters: int | None = None,
              seconds: float | None = 1.0, threads: int | None = None, data=None, out="results",
              preprocessing: bool = True, log=lambda s: None, keep_to=None) -> tuple[list[dict], Path | None]:
    """Benchmark every job; returns (rows, JSON-lines file written under ``out``). Stopped (Ctrl-C, SIGTERM), it
    writes the rows of the jobs already measured under ``keep_to`` (default ``out``) before it stops."""
    if not jobs:
        raise LungedgeError("nothing to benchmark")
    if any(b < 1 for b in batch_sizes):
        raise LungedgeError(f"batch sizes must be at least 1, got {list(batch_sizes)}")
    check_counts(warmup, iters)
    if seconds is not None and not (math.isfinite(seconds) and 0 <= seconds <= 3600):
        raise LungedgeError(f"--seconds must be a finite number of seconds from 0 to 3600, got {seconds}")
    if any(j.device == "cuda" for j in jobs):
        check_cuda()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lungedge-bench-") as tmp:
        files = image_files(data, log) if data else synthetic_images(Path(tmp))
        source = str(data) if data else f"synthetic {SYNTHETIC_SIZE}x{SYNTHETIC_SIZE} grayscale PNG files"
        try:
            for j in jobs:
                for r in bench_job(j, batch_sizes, files, warmup, iters, seconds, threads, preprocessing, log):
                    r["images"] = source
                    rows.append(r)
        except KeyboardInterrupt:  # Ctrl-C / SIGTERM in a long --all run: the rows measured so far are kept
            if rows and (keep_to or out):
                from .io import note_kept

                add_ratios(rows)
                try:
                    kept = write_rows(rows, keep_to or out, "bench")
                    note_kept(f"{kept} keeps the {len(rows)} rows measured before the stop")
                except LungedgeError as exc:  # a read-only or full results folder: the stop is still a stop
                    note_kept(f"the {len(rows)} rows measured before the stop could not be kept ({exc})")
            raise
    add_ratios(rows)
    path = write_rows(rows, out, "bench") if out else None
    return rows, path


def check_cuda() -> None:
    """--device cuda without a GPU: one line."""
    if not provenance.gpus():
        try:
            from .models.registry import import_torch_first

            import_torch_first()
            import torch

            if torch.cuda.is_available():
                return
        except ImportError:
            pass
        raise LungedgeError("--device cuda: no CUDA GPU here (nvidia-smi finds none); use --device cpu")


def table(rows: list[dict], title: str = "lungedge bench"):
    """A rich table: one line per job and batch size, model-only and with preprocessing side by side."""
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col in ("model", "backend", "device", "precision", "batch", "p50 ms", "p90 ms", "p99 ms", "mean±std ms",
                "img/s", "× source", "+prep p50 ms", "+prep img/s", "+prep × source"):
        t.add_column(col, justify="right" if col not in ("model", "backend", "device", "precision") else "left")
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["backend"], r["device"], r["variant"], r["batch_size"], r["artifact_sha256"]),
                          {})[r["preprocessing"]] = r

    def ratio(r):
        return f"{r['vs_source']:.2f}×" if r and r.get("vs_source") else "–"

    for (model, backend, device, variant, bs, _), g in groups.items():
        a, b = g.get(False), g.get(True)
        lat = a["latency_ms"] if a else None
        t.add_row(model, backend, device, variant, str(bs),
                  f"{lat['p50']:.2f}" if lat else "–", f"{lat['p90']:.2f}" if lat else "–",
                  f"{lat['p99']:.2f}" if lat else "–", f"{lat['mean']:.2f}±{lat['std']:.2f}" if lat else "–",
                  f"{a['throughput_ips']:.1f}" if a else "–", ratio(a),
                  f"{b['latency_ms']['p50']:.2f}" if b else "–", f"{b['throughput_ips']:.1f}" if b else "–", ratio(b))
    return t
