"""Peak memory and time of `lungedge export MODEL --int8` with 300 calibration images (issue #14).

Each export runs in its own child process (a fresh Python per model, so nothing of one model's
framework is resident during the next); its peak resident memory is the child's ``ru_maxrss``
(``RUSAGE_CHILDREN`` of a fresh probe process): conversion, parity, calibration and both INT8 files
included. A watchdog samples the child's memory and kills it above ``--limit-gb`` (a shared
machine), which the table then says. Random-init checkpoints: a torchvision state dict for
DenseNet121, a Keras .h5 for ResNet50 (each made in a child too, so this process stays small).
``--phases`` adds the resident memory the watchdog saw at each line the export printed
(conversion / parity done, each INT8 file written), to tell conversion from calibration.

    .venv/bin/python benchmarks/bench_calibration.py --models densenet121,resnet50 \\
        --calib-data ../shared/data/iq-oth-nccd
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CLASSES = "Benign,Malignant,Normal"

MAKE = {
    "densenet121": ("densenet121.pth", "import torch, torchvision, sys; torch.manual_seed(0); "
                    "torch.save(torchvision.models.densenet121(weights=None, num_classes=3).state_dict(), sys.argv[1])"),
    "resnet50": ("resnet50.h5", "import torch, sys; from lungedge.models.registry import create; "
                 "create('resnet50', num_classes=3, weights='none').save(sys.argv[1])"),
}

# runs the export, samples its RSS every 0.1 s (watchdog), prints one JSON line: seconds, ru_maxrss, rc, phases
PROBE = r"""
import json, os, resource, signal, subprocess, sys, threading, time
limit = float(sys.argv[1]) * 1024**3
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[2:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
state = {"rss": 0, "killed": False, "self": 0, "child": 0, "child_killed": False}
def rss(pid=None):
    try:
        return int(open(f"/proc/{pid or p.pid}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError):
        return 0
def descendants():  # processes the export started (the Keras conversion child)
    kids, out = {}, []
    for d in os.listdir("/proc"):
        try:
            kids.setdefault(int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1]), []).append(int(d))
        except (OSError, ValueError, IndexError):
            pass
    todo = list(kids.get(p.pid, []))
    while todo:
        q = todo.pop(); out.append(q); todo += kids.get(q, [])
    return out
def watch():
    while p.poll() is None:
        r = rss(); state["rss"] = r; state["self"] = max(state["self"], r)
        if r > limit:
            state["killed"] = True; p.send_signal(signal.SIGKILL)
        for q in descendants():  # each child on its own: it hands its memory back when it exits
            rq = rss(q); state["child"] = max(state["child"], rq)
            if rq > limit:
                state["child_killed"] = True; os.kill(q, signal.SIGKILL)
        time.sleep(0.1)
threading.Thread(target=watch, daemon=True).start()
phases, tail = [], []
for line in p.stdout:
    tail = (tail + [line.rstrip()])[-5:]
    phases.append([round(time.perf_counter() - t0, 1), round(rss() / 1024**3, 2), line.strip()[:90]])
rc = p.wait()
print(json.dumps({"seconds": time.perf_counter() - t0, "kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "rc": rc, "killed": state["killed"], "phases": phases, "tail": tail,
                  "self_gb": state["self"] / 1024**3, "child_gb": state["child"] / 1024**3,
                  "child_killed": state["child_killed"]}))
"""


# --calibration-only: an FP32 ONNX of the torchvision network (same layers as lungedge's), then, in a fresh
# process, the calibration of 300 images and both INT8 files alone (what export does after conversion)
TORCHVISION_ONNX = ("import torch, torchvision, sys; torch.manual_seed(0); "
                    "m = getattr(torchvision.models, sys.argv[2])(weights=None, num_classes=3).eval(); "
                    "torch.onnx.export(m, torch.zeros(1, 3, 224, 224), sys.argv[1], input_names=['input'], "
                    "output_names=['logits'], dynamic_axes={'input': {0: 'b'}, 'logits': {0: 'b'}}, dynamo=False)")
CALIBRATE = r"""
import sys
from pathlib import Path
from lungedge import quantize
from lungedge.data.split import make_split
from lungedge.preprocess import Preprocessing
fp32, data, size, method, tmp = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], Path(sys.argv[5])
m = make_split(data, val=0.0, test=0.0, group_by="none")
sample = quantize.calibration_sample(m["items"], m["classes"], size)
prep, root = Preprocessing(size=224), Path(m["dataset"]["root"])
batches = lambda: (prep.load_batch([root / it["path"] for it in sample[i : i + 16]]) for i in range(0, len(sample), 16))
for target in ("trt", "cpu"):
    quantize.to_int8(fp32, tmp / f"m.{target}.onnx", target, method, tmp / "ranges.json", batches=batches())
print("calibrated and quantized", flush=True)
"""


def calibration_only(name: str, args, env) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / f"{name}.fp32.onnx"
        subprocess.run([PY, "-c", TORCHVISION_ONNX, str(fp32), name], cwd=ROOT, check=True, env=env)
        cmd = [PY, "-u", "-c", CALIBRATE, str(fp32), args.calib_data, str(args.calib_size), args.method, tmp]
        out = subprocess.run([PY, "-c", PROBE, str(args.limit_gb), *cmd], cwd=ROOT, capture_output=True,
                             text=True, env=env)
        try:
            res = json.loads(out.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            print(f"| {name} (torchvision ONNX, calibration only) | {args.calib_size} | {args.method} | probe failed |"
                  " | |")
            return
        status = f" (killed above {args.limit_gb} GB)" if res["killed"] else "" if res["rc"] == 0 else \
            f" (exit {res['rc']}: {' / '.join(res['tail'])[-200:]})"
        print(f"| {name} (torchvision ONNX, calibration + both INT8 files only) | {args.calib_size} | {args.method} | "
              f"{res['kb'] / 1024**2:.2f}{status} | {res['seconds']:.0f} | |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-data", required=True, help="calibration image folder (IQ-OTH/NCCD)")
    ap.add_argument("--data", default=None, help="also compare on this folder's images (loads them all: "
                    "not part of the issue's command)")
    ap.add_argument("--models", default="densenet121,resnet50")
    ap.add_argument("--calib-size", type=int, default=300)
    ap.add_argument("--method", default="minmax")
    ap.add_argument("--limit-gb", type=float, default=3.8, help="watchdog: kill an export above this RSS")
    ap.add_argument("--phases", action="store_true")
    ap.add_argument("--calibration-only", action="store_true", help="measure calibration + INT8 files alone, on a "
                    "torchvision FP32 ONNX of the network (for a source whose converter alone exceeds the limit)")
    args = ap.parse_args()
    print("| model | calibration images | method | peak RSS (GB) | time (s) | int8-cpu / int8 / int8-ov top-1 agreement "
          "with fp32 |")
    print("|---|---|---|---|---|---|")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in args.models.split(","):
        if args.calibration_only:
            calibration_only(name, args, env)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / MAKE[name][0]
            subprocess.run([PY, "-c", MAKE[name][1], str(ckpt)], cwd=ROOT, check=True, env=env)
            cmd = [PY, "-u", "-m", "lungedge", "export", name, "--checkpoint", str(ckpt), "--classes", CLASSES,
                   "--int8", "--calib-data", args.calib_data, "--calib-size", str(args.calib_size),
                   "--calib-method", args.method, "--no-engine", "--out", f"{tmp}/engines",
                   "--calibration", f"{tmp}/calibration"] + (["--data", args.data] if args.data else [])
            out = subprocess.run([PY, "-c", PROBE, str(args.limit_gb), *cmd], cwd=ROOT, capture_output=True,
                                 text=True, env=env)
            try:
                res = json.loads(out.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                print(f"| {name} | {args.calib_size} | {args.method} | probe failed: {out.stderr.strip()[-200:]} | | |")
                continue
            gb = res["kb"] / 1024**2
            status = f" (killed above {args.limit_gb} GB)" if res["killed"] else \
                ("" if res["rc"] == 0 else f" (exit {res['rc']}: {' / '.join(res['tail'])[-200:]})")
            agree = ""
            summary = Path(tmp) / "engines" / name / f"{name}.export.json"
            if summary.is_file():
                par = json.loads(summary.read_text())["parity"]
                agree = " / ".join(f"{par[k]['top1_agreement']:.1%}" for k in ("int8-cpu_vs_fp32", "int8_vs_fp32",
                                                                                  "int8-ov_vs_fp32")
                                   if k in par)
            print(f"| {name} | {args.calib_size} | {args.method} | {gb:.2f}{status} | {res['seconds']:.0f} | "
                  f"{agree} |", flush=True)
            # ru_maxrss is the largest of the export and the child it started (Keras: the converter); apart:
            print(f"<!-- {name}: export process peak {res['self_gb']:.2f} GB (sampled), its child processes "
                  f"{res['child_gb']:.2f} GB" + (f" (killed above {args.limit_gb} GB)" if res["child_killed"] else "")
                  + " -->", flush=True)
            if args.phases:
                for t, r, line in res["phases"]:
                    print(f"    {t:7.1f} s  {r:5.2f} GB  {line}")


if __name__ == "__main__":
    main()
