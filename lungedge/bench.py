"""Latency and throughput of any runner: warm-up first, then percentiles.

For every target (artifact x backend x device x precision) and batch size, two timings:

* ``preprocessing: false`` — one ``runner.infer(batch)`` on an already preprocessed batch
  (on a GPU this includes the host->device and device->host copies: see ``includes``);
* ``preprocessing: true`` — decode the image files, crop/resize/normalise, then infer.

Each result row carries its provenance (host, CPU, GPU and driver, library versions, threads,
artifact hash, date) and is written as one JSON line under ``results/``.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from . import provenance
from .errors import LungedgeError
from .io import atomic_write_text, sha256_file
from .runners import open_runner
from .runners.discover import Target

FORMAT = "lungedge-result/1"
SYNTHETIC_SIZE = 512


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


def image_files(data) -> list[Path]:
    from .data.layout import detect_layout

    layout = detect_layout(data)
    files = layout.files[:: max(1, len(layout.files) // 32)][:32]
    return [layout.root / f.path for f in files]


def stats(seconds: list[float], batch: int) -> dict:
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    mean = float(ms.mean())
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "mean": mean, "std": float(ms.std()),
            "min": float(ms.min()), "max": float(ms.max())}, (batch / (mean / 1e3) if mean > 0 else None)


def time_calls(fn, warmup: int, iters: int | None, seconds: float | None, min_iters: int = 3) -> list[float]:
    for _ in range(max(0, warmup)):
        fn()
    times: list[float] = []
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if iters is not None:
            if len(times) >= iters:
                break
        elif len(times) >= min_iters and time.perf_counter() - started >= (seconds or 0):
            break
    return times


def bench_target(target: Target, batch_sizes, files, warmup: int = 3, iters: int | None = None,
                 seconds: float | None = 1.0, threads: int | None = None, preprocessing: bool = True,
                 log=lambda s: None) -> list[dict]:
    rows = []
    sha = sha256_file(target.artifact)
    with open_runner(target.artifact, target.backend, target.device, target.precision, threads) as runner:
        prep = runner.preprocessing
        base = {"format": FORMAT, "kind": "bench", "model": runner.info.architecture, "backend": runner.backend,
                "source_framework": runner.info.framework, "device": runner.device, "precision": target.precision,
                "variant": runner.variant, "artifact": str(target.artifact), "artifact_sha256": sha,
                "source_sha256": runner.info.source_sha256, "input_size": prep.size}
        for bs in batch_sizes:
            paths = [files[i % len(files)] for i in range(bs)]
            x = prep.load_batch(paths)
            runner.infer(x)  # first call: graph building / allocation, never timed
            modes = [(False, lambda: runner.infer(x))]
            if preprocessing:
                modes.append((True, lambda: runner.infer(prep.load_batch(paths))))
            for with_prep, fn in modes:
                times = time_calls(fn, warmup, iters, seconds)
                lat, ips = stats(times, bs)
                includes = runner.includes
                if with_prep:
                    includes = f"decode + crop/resize/normalise of {bs} image file(s) on the CPU, then {includes}"
                row = {**base, "batch_size": bs, "preprocessing": with_prep, "includes": includes,
                       "warmup": warmup, "iters": len(times), "latency_ms": lat, "throughput_ips": ips,
                       "provenance": provenance.collect(threads=runner.threads_used())}
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


def run_bench(targets: list[Target], batch_sizes=(1, 8), warmup: int = 3, iters: int | None = None,
              seconds: float | None = 1.0, threads: int | None = None, data=None, out="results",
              preprocessing: bool = True, log=lambda s: None) -> tuple[list[dict], Path | None]:
    """Benchmark every target; returns (rows, JSON-lines file written under ``out``)."""
    if not targets:
        raise LungedgeError("nothing to benchmark")
    if any(b < 1 for b in batch_sizes):
        raise LungedgeError(f"batch sizes must be at least 1, got {list(batch_sizes)}")
    if iters is not None and iters < 1:
        raise LungedgeError(f"--iters must be at least 1, got {iters}")
    if warmup < 0:
        raise LungedgeError(f"--warmup must be 0 or more, got {warmup}")
    if any(t.device == "cuda" for t in targets):
        check_cuda()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lungedge-bench-") as tmp:
        files = image_files(data) if data else synthetic_images(Path(tmp))
        source = str(data) if data else f"synthetic {SYNTHETIC_SIZE}x{SYNTHETIC_SIZE} grayscale PNG files"
        for t in targets:
            for r in bench_target(t, batch_sizes, files, warmup, iters, seconds, threads, preprocessing, log):
                r["images"] = source
                rows.append(r)
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


def write_rows(rows: list[dict], out, kind: str) -> Path:
    """results/<kind>-<host>-<UTC time>.jsonl (one JSON object a line)."""
    host = provenance.slug_host()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = Path(out) / f"{kind}-{host}-{stamp}.jsonl"
    n = 1
    while path.exists():
        n += 1
        path = Path(out) / f"{kind}-{host}-{stamp}-{n}.jsonl"
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows))
    return path


def table(rows: list[dict], title: str = "lungedge bench"):
    """A rich table: one line per target and batch size, model-only and with preprocessing side by side."""
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
