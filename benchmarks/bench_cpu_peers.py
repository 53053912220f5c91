"""CPU peers on the same networks, contenders alternated in rounds within one run (issue #14).

Rows per model and batch: ONNX Runtime FP32; ONNX Runtime INT8 (lungedge's int8-cpu U8S8 file, and
``quantize_static`` with its defaults); OpenVINO FP32 (forced f32), BF16, INT8 on lungedge's int8 (S8S8)
and int8-cpu (U8S8) files, on lungedge's int8-ov file (NNCF's ONNX backend, written by export) and on
an NNCF OpenVINO model from the same calibration images; the source framework
(PyTorch eager). Rows marked ``lungedge`` are paths ``lungedge bench --device cpu`` runs (its OpenVINO
runner compiles with the same settings: LATENCY hint, the thread count, f32 or bf16 inference
precision). Ratios are against ORT FP32 of the same round-robin; ``spread`` is the interquartile
range of that contender's rounds over its median (the noise to read the ratios with). INT8/BF16 top-1
agreement with FP32 is measured on IQ-OTH/NCCD images when --data is given (else random inputs, said so).

Each model runs in its own child process (every session of one model is released before the next
model's contenders are built), under a watchdog that kills a child above ``--limit-gb``.

Random-init networks (no hub); ResNet50 is torchvision's here (lungedge's is Keras: same layers, the
converter left out to keep this run small).

    .venv/bin/python benchmarks/bench_cpu_peers.py --rounds 20 --data ../shared/data/iq-oth-nccd
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch  # noqa: F401  (before anything that may import tensorflow)
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lungedge import quantize  # noqa: E402
from lungedge.preprocess import Preprocessing  # noqa: E402
from lungedge.timing import alternate, spread  # noqa: E402

MODELS = {"resnet50": ("resnet50", 224), "googlenet": ("googlenet", 224), "inception_v3": ("inception_v3", 299),
          "densenet121": ("densenet121", 224)}


def build(name: str):
    import torchvision

    arch, size = MODELS[name]
    kw = {"aux_logits": False, "init_weights": True} if arch in ("googlenet", "inception_v3") else {}
    torch.manual_seed(0)
    return getattr(torchvision.models, arch)(weights=None, num_classes=3, **kw).eval(), size


def inputs(size: int, n: int, data: str | None, seed: int = 0) -> tuple[np.ndarray, str]:
    if data:
        files = sorted(Path(data).rglob("*.jpg"))[:: 7][:n]
        if files:
            return Preprocessing(size=size).load_batch(files), f"{len(files)} images of {data}"
    return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32), f"{n} random inputs"


def ort_session(path, threads):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads = threads, 1
    s = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
    return lambda x: s.run(None, {"input": x})[0]


def ov_model(model_or_path, threads, hint="f32"):
    import openvino as ov

    core = ov.Core()
    m = core.read_model(str(model_or_path)) if isinstance(model_or_path, (str, Path)) else model_or_path
    c = core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                                      "INFERENCE_NUM_THREADS": threads})
    req = c.create_infer_request()

    def run(x):
        req.infer({0: x})
        return np.array(req.get_output_tensor(0).data, copy=True)

    return run


def contenders(name: str, d: Path, calib: np.ndarray, threads: int) -> dict:
    import nncf
    import onnx
    import openvino as ov
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model, size = build(name)
    fp32 = d / f"{name}.fp32.onnx"
    torch.onnx.export(model, torch.zeros(1, 3, size, size), str(fp32), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    batches = [calib[i : i + 8] for i in range(0, len(calib), 8)]
    ranges = d / f"{name}.ranges.json"
    files = {v: quantize.to_int8(fp32, d / f"{name}.{v}.onnx", t, "minmax", ranges, batches=batches)
             for t, v in (("cpu", "int8-cpu"), ("trt", "int8"))}
    # lungedge's int8-ov file: NNCF's placement through lungedge's export path, same calibration images
    files["int8-ov"] = quantize.to_int8_nncf(fp32, d / f"{name}.int8-ov.onnx", lambda: iter(batches), len(calib))

    class Reader:  # one image a call: ONNX Runtime's calibrator holds every output of every call it is fed
        def __init__(self):
            self.it = iter({"input": calib[i : i + 1]} for i in range(len(calib)))

        def get_next(self):
            return next(self.it, None)

    pre = d / f"{name}.pre.onnx"
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    qs = d / f"{name}.qs.onnx"
    # its defaults (MinMax, QDQ, per-tensor); merging the intermediate outputs after every call only bounds its
    # memory (min/max are the same whatever the merging)
    # (ONNX Runtime 1.31 raises "No data is collected" when the last merge leaves nothing: a k not dividing the count)
    k = next(k for k in (3, 5, 7, 11) if len(calib) % k)
    quantize_static(str(pre), str(qs), Reader(), extra_options={"CalibMaxIntermediateOutputs": k})
    nncf_model = nncf.quantize(ov.Core().read_model(str(fp32)), nncf.Dataset([calib[i : i + 1] for i in range(len(calib))]),
                               subset_size=len(calib))
    del onnx
    torch.set_num_threads(threads)

    def run_torch(x):  # as lungedge's torch runner: eager under inference_mode
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()
    out = {"ORT FP32": ort_session(fp32, threads),
           "lungedge ORT INT8 int8-cpu (U8S8)": ort_session(files["int8-cpu"], threads),
           "peer ORT INT8 quantize_static defaults": ort_session(qs, threads),
           "lungedge OV FP32 (f32)": ov_model(fp32, threads),
           "lungedge OV INT8 int8 (S8S8, TensorRT placement)": ov_model(files["int8"], threads),
           "lungedge OV INT8 int8-cpu (U8S8)": ov_model(files["int8-cpu"], threads),
           "lungedge OV INT8 int8-ov (NNCF placement)": ov_model(files["int8-ov"], threads),
           "peer OV INT8 NNCF": ov_model(nncf_model, threads), "peer PyTorch eager FP32": run_torch}
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        out["lungedge OV BF16"] = ov_model(fp32, threads, "bf16")
    return out, size


def one_model(name: str, args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        calib, _ = inputs(MODELS[name][1], args.calib, args.data, seed=1)
        runs, size = contenders(name, Path(tmp), calib, args.threads)
        test, where = inputs(size, 64, args.data)
        top1 = lambda f: np.concatenate([f(test[i : i + 8]).argmax(1) for i in range(0, len(test), 8)])  # noqa: E731
        ref = top1(runs["ORT FP32"])
        agree = {k: float((top1(f) == ref).mean()) for k, f in runs.items()}
        for b in (int(v) for v in args.batches.split(",")):
            x = test[:b]
            times = alternate([lambda f=f: f(x) for f in runs.values()], args.rounds, warmup=3)
            p50 = {k: float(np.median(t)) * 1e3 for k, t in zip(runs, times)}
            noise = {k: spread(t) for k, t in zip(runs, times)}
            for k in runs:
                print(f"| {name} | {b} | {k} | {p50[k]:.2f} | {noise[k]:.1%} | {p50['ORT FP32'] / p50[k]:.2f}x | "
                      f"{agree[k]:.1%} |", flush=True)
        print(f"<!-- {name}: agreement on {where}; classes predicted by ORT FP32: "
              f"{np.bincount(ref, minlength=3).tolist()} -->", flush=True)


def run_child(cmd: list[str], limit_gb: float) -> tuple[int, bool, float]:
    """Run one model's child, killing it above ``limit_gb`` resident; (exit code, killed, peak GB)."""
    p = subprocess.Popen(cmd)
    peak, killed = 0, False
    while p.poll() is None:
        try:
            rss = int(open(f"/proc/{p.pid}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError):
            rss = 0
        peak = max(peak, rss)
        if rss > limit_gb * 1024**3:
            killed = True
            p.send_signal(signal.SIGKILL)
        time.sleep(0.2)
    return p.wait(), killed, peak / 1024**3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--data", default=None, help="IQ-OTH/NCCD folder: agreement on its images")
    ap.add_argument("--limit-gb", type=float, default=3.8, help="watchdog: kill a model's child above this RSS")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: the child for one model
    args = ap.parse_args()
    if args.one:
        one_model(args.one, args)
        return
    print("| model | batch | contender | p50 ms | spread | vs ORT FP32 | top-1 agreement with FP32 |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for name in args.models.split(","):
        if name not in MODELS:
            sys.exit(f"error: unknown model {name!r} (choose from {', '.join(MODELS)})")
        child = [sys.executable, __file__, "--one", name, "--batches", args.batches, "--rounds", str(args.rounds),
                 "--threads", str(args.threads), "--calib", str(args.calib)] + (["--data", args.data] if args.data else [])
        rc, killed, peak = run_child(child, args.limit_gb)
        print(f"<!-- {name}: child peak RSS {peak:.2f} GB"
              + (f", killed above {args.limit_gb} GB" if killed else "" if rc == 0 else f", exit {rc}") + " -->",
              flush=True)


if __name__ == "__main__":
    main()
