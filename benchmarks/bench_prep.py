"""End-to-end latency of one image: decode + preprocessing + model, against the model alone (issue #14).

The target: `lungedge bench --data ../shared/data/iq-oth-nccd` with GoogLeNet INT8 at batch 1 gives a
`+prep` p50 at most 1.3x its model-only p50. This script times, in one process, through the same
runner `lungedge bench` opens (OpenVINO, the `int8-ov` file unless --variant says otherwise):

* ``model``  - ``runner.infer(x)`` on an already preprocessed image (bench's model-only row);
* ``+prep``  - ``runner.infer(prep.load_batch([file]))``: one request, decoded then run (bench's
  ``+prep`` row: a latency);
* ``stream`` - the interval between successive results when the next file is decoded on a
  background thread while this one runs, as ``lungedge predict`` does over a folder (a throughput,
  not one request's latency);
* ``prep``   - ``prep.load_batch([file])`` alone;
* ``+prep: its prep`` and ``+prep: its infer`` - the two halves of each ``+prep`` call, timed
  inside it: how much slower each runs right after the other than in a loop of its own.

Contenders take turns in rounds (each round: ``--per-round`` calls of each), so a burst of load on
this shared machine hits all of them alike; ``spread`` is the interquartile range of the per-round
medians over their median. Every IQ-OTH/NCCD file used is also checked against the reference
preprocessing (full decode, centre square, bilinear resize, the float formula): maximum difference.

Without --engines it exports a random-init GoogLeNet (torchvision's layout) with
``lungedge export googlenet --int8`` (32 calibration images) into a temporary folder first.

    .venv/bin/python benchmarks/bench_prep.py --data ../shared/data/iq-oth-nccd --rounds 15
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch  # noqa: F401  (before anything that may import tensorflow)
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lungedge import provenance  # noqa: E402
from lungedge.batching import prefetched  # noqa: E402
from lungedge.runners import open_runner  # noqa: E402
from lungedge.timing import spread, time_calls  # noqa: E402


def export_googlenet(out: Path, data: str, uint8: bool) -> Path:
    import torchvision

    torch.manual_seed(0)
    sd = out / "googlenet_sd.pth"
    torch.save(torchvision.models.googlenet(weights=None, num_classes=3, aux_logits=False, init_weights=True)
               .state_dict(), sd)
    cmd = [sys.executable, "-m", "lungedge", "export", "googlenet", "--checkpoint", str(sd), "--classes",
           "Benign,Malignant,Normal", "--int8", "--calib-data", data, "--calib-size", "32", "--no-engine",
           "--out", str(out / "engines"), "--calibration", str(out / "calibration")]
    subprocess.run(cmd + (["--uint8-input"] if uint8 else []), check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out / "engines" / "googlenet"


def reference(prep, path) -> np.ndarray:
    """The preprocessing as first defined: full decode, centre square, bilinear resize, float formula."""
    from PIL import Image

    from lungedge.preprocess import open_image, to_rgb

    img = to_rgb(open_image(path))
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((prep.size, prep.size), Image.BILINEAR)
    x = np.asarray(img).astype(np.float32) * np.float32(prep.scale)
    x = (x - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    return np.moveaxis(x, -1, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "iq-oth-nccd"))
    ap.add_argument("--engines", help="an export folder holding googlenet.<variant>.onnx (default: export one)")
    ap.add_argument("--variant", default="int8-ov")
    ap.add_argument("--uint8-input", action="store_true", help="export with --uint8-input (without --engines)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    files = sorted(Path(a.data).rglob("*.jpg"))
    if not files:
        sys.exit(f"no .jpg under {a.data}")
    files = files[:: max(1, len(files) // 64)][:64]
    with tempfile.TemporaryDirectory(prefix="lungedge-bench-prep-") as tmp:
        folder = Path(a.engines) if a.engines else export_googlenet(Path(tmp), a.data, a.uint8_input)
        onnx = folder / f"googlenet.{a.variant}.onnx"
        with open_runner(onnx, "openvino", "cpu", "int8", a.threads) as runner:
            prep = runner.preprocessing
            if prep.input_dtype == "float32":
                diff = max(float(np.abs(prep.load(f) - reference(prep, f)).max()) for f in files)
                check = f"max |load - reference| over {len(files)} files: {diff:.3g}"
            else:
                check = "uint8 input: the graph normalises (tests/test_uint8_input.py checks equality)"
            x = prep.load_batch(files[:1])
            state = {"i": 0}

            def nxt():
                state["i"] += 1
                return [files[state["i"] % len(files)]]

            def stream():
                """per-image interval over --per-round files, the next decoded while this one runs"""
                t, last = [], time.perf_counter()
                for xi in prefetched(prep.load_batch, (nxt() for _ in range(a.per_round))):
                    runner.infer(xi)
                    now = time.perf_counter()
                    t.append(now - last)
                    last = now
                return t[1:]  # the first includes a decode nothing overlapped

            def timed(fn):
                return time_calls(fn, 0, a.per_round, None)

            parts = {"+prep: its prep": [], "+prep: its infer": []}

            def prep_then_infer():
                t0 = time.perf_counter()
                xi = prep.load_batch(nxt())
                t1 = time.perf_counter()
                runner.infer(xi)
                parts["+prep: its prep"].append(t1 - t0)
                parts["+prep: its infer"].append(time.perf_counter() - t1)

            contenders = {"model": lambda: timed(lambda: runner.infer(x)),
                          "+prep": lambda: timed(prep_then_infer),
                          "stream": stream, "prep": lambda: timed(lambda: prep.load_batch(nxt()))}
            for fn in contenders.values():  # warm-up
                fn()
            for v in parts.values():
                v.clear()
            per_round = {k: [] for k in contenders}
            allt = {k: [] for k in contenders}
            for _ in range(a.rounds):
                for k, fn in contenders.items():
                    t = fn()
                    allt[k] += t
                    per_round[k].append(np.median(t))
            allt.update(parts)  # the two halves of each +prep call, timed inside it
            per_round.update({k: [np.median(v[i:i + a.per_round]) for i in range(0, len(v), a.per_round)]
                              for k, v in parts.items()})
            p50 = {k: float(np.median(v)) * 1e3 for k, v in allt.items()}
            noise = {k: spread(v) for k, v in per_round.items()}
            print(f"GoogLeNet {a.variant} ({'uint8' if prep.input_dtype == 'uint8' else 'float'} input), OpenVINO, "
                  f"batch 1, threads {runner.threads_used()}, {a.rounds} rounds x {a.per_round}, "
                  f"{os.cpu_count()} CPUs ({provenance.cpu_model()}), load {os.getloadavg()[0]:.2f}")
            print("| timing | p50 ms | spread | / model |\n|---|---|---|---|")
            for k in allt:
                print(f"| {k} | {p50[k]:.2f} | {noise[k]:.0%} | {p50[k] / p50['model']:.2f}x |")
            print(check)


if __name__ == "__main__":
    main()
