"""Export and calibration time per model, and batch-1 / batch-8 CPU latency of the source framework
(PyTorch eager or Keras) against ONNX Runtime FP32 and the two INT8 forms, measured in one run.

    .venv/bin/python benchmarks/bench_export.py [--models googlenet,...] [--calib-data ../shared/data/iq-oth-nccd]
        [--calib-size 64] [--iters 20] [--out /tmp/bench-export]

Weights are random (no ImageNet download here): latency does not depend on them. Each model is
exported at its native input size. Latency is the median of --iters timed runs after 3
warm-up runs, model inference only (no preprocessing), on this machine's CPU threads. The
source framework runs through the same runner as `lungedge bench` (PyTorch eager under
inference_mode; Keras through a tf.function, not an eager call).
Targets (issue #5): ONNX Runtime FP32 >= 2x faster than the source framework at batch 1;
INT8 >= 1.5x faster than FP32 on ResNet50 and Inception v3.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch  # torch and torchvision before tensorflow
import torchvision  # noqa: F401
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lungedge.export import Request, export, load_source  # noqa: E402
from lungedge.models import checkpoint as ckpt  # noqa: E402
from lungedge.models import registry  # noqa: E402
from lungedge.runners import open_runner  # noqa: E402
from lungedge.timing import time_calls  # noqa: E402


def median_seconds(fn, iters: int) -> float:
    return statistics.median(time_calls(fn, warmup=3, iters=iters, seconds=None))


def make_checkpoint(name: str, folder: Path) -> Path:
    spec = registry.get_spec(name)
    model = registry.create(name, weights="none", mode=spec.defaults.mode)
    prep = spec.preprocessing
    meta = ckpt.make_meta(spec, ["Benign", "Malignant", "Normal"], prep, spec.defaults.mode, None, 0, [])
    if spec.framework == "keras":
        return ckpt.save_keras_checkpoint(folder / f"{name}.h5", model, meta)
    return ckpt.save_torch_checkpoint(folder / f"{name}.pth", model, meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,googlenet,inception_v3,densenet121")
    ap.add_argument("--calib-data", default=str(Path(__file__).resolve().parents[2] / "shared/data/iq-oth-nccd"))
    ap.add_argument("--calib-size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default="/tmp/lungedge-bench-export")
    args = ap.parse_args()
    import onnxruntime as ort

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"# {platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {ort.__version__}")
    rows = []
    for name in args.models.split(","):
        path = make_checkpoint(name, out)
        t0 = time.perf_counter()
        export(name, checkpoint=path, out=out / "engines", calibration=out / "calibration", engine=False,
               log=lambda *_: None)
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        summary = export(name, checkpoint=path, int8=True, calib_data=args.calib_data, calib_size=args.calib_size,
                         calib_method="minmax", out=out / "engines", calibration=out / "calibration", engine=False,
                         log=lambda *_: None)
        calib_s = time.perf_counter() - t0 - export_s  # the second call re-exports FP32 too
        source = load_source(path, Request(name))
        sessions = {k: ort.InferenceSession(summary["files"][k], providers=["CPUExecutionProvider"])
                    for k in ("fp32", "int8-cpu", "int8")}
        with open_runner(path) as runner:  # the same source runner `lungedge bench` uses
            for batch in (1, 8):
                x = np.random.default_rng(0).normal(size=(batch, *source.preprocessing.input_shape)).astype(np.float32)
                t = {"source": median_seconds(lambda: runner.infer(x), args.iters)}
                for k, sess in sessions.items():
                    t[k] = median_seconds(lambda s=sess: s.run(None, {"input": x}), args.iters)
                rows.append((name, source.framework, batch, export_s, calib_s, t))
                print(f"{name:12s} b{batch}: source {t['source']*1e3:8.1f} ms | ORT fp32 {t['fp32']*1e3:7.1f} ms "
                      f"({t['source']/t['fp32']:4.1f}x) | int8 u8s8 {t['int8-cpu']*1e3:7.1f} ms "
                      f"({t['fp32']/t['int8-cpu']:4.2f}x vs fp32) | int8 s8s8 {t['int8']*1e3:7.1f} ms "
                      f"({t['fp32']/t['int8']:4.2f}x)", flush=True)
    print("\n| model | source | batch | export s | calibration s | source ms | ORT FP32 ms | FP32 vs source "
          "| INT8 U8S8 (CPU) ms | U8S8 vs FP32 | INT8 S8S8 (TensorRT form) ms | S8S8 vs FP32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, fw, batch, export_s, calib_s, t in rows:
        print(f"| {name} | {fw} | {batch} | {export_s:.0f} | {calib_s:.0f} | {t['source']*1e3:.1f} | {t['fp32']*1e3:.1f} "
              f"| {t['source']/t['fp32']:.2f}x | {t['int8-cpu']*1e3:.1f} | {t['fp32']/t['int8-cpu']:.2f}x "
              f"| {t['int8']*1e3:.1f} | {t['fp32']/t['int8']:.2f}x |")


if __name__ == "__main__":
    main()
