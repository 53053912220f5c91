"""Where the +prep resize could run: Pillow (lungedge's), torch, or inside OpenVINO's graph (issue #14).

The resize of a 512 x 512 CT slice to the model's size is half of lungedge's preprocessing. This script
times each way of doing it on one grayscale slice, in turns (``--rounds`` rounds of ``--per-round``
calls each, 2 threads where the library threads), and gives each one's largest difference from
Pillow's pixels over the IQ-OTH/NCCD slices of that size (``--check`` files):

* ``pillow``: ``Image.resize(BILINEAR)``, what :mod:`lungedge.preprocess` does (antialiased, fixed-point);
* ``torch``: ``F.interpolate(uint8, bilinear, antialias=True)``;
* ``openvino bilinear_pillow``: Interpolate-11 in its Pillow-compatible mode, uint8 in and out, as
  a model would run it in front of the network;
* ``openvino linear + antialias``: Interpolate-11's plain linear mode with ``antialias`` set.

    .venv/bin/python benchmarks/bench_resize.py --data ../shared/data/iq-oth-nccd --size 224
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch  # noqa: F401  (before anything that may import tensorflow)
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lungedge.timing import spread  # noqa: E402


def openvino_resize(side: int, size: int, mode: str):
    import openvino as ov
    from openvino import opset11

    p = opset11.parameter([1, 1, side, side], ov.Type.u8)
    extra = {} if mode == "bilinear_pillow" else {"coordinate_transformation_mode": "half_pixel"}
    y = opset11.interpolate(p, np.array([size, size], np.int64), mode=mode, shape_calculation_mode="sizes",
                            axes=np.array([2, 3], np.int64), antialias=True, **extra)
    request = ov.Core().compile_model(ov.Model([y], [p]), "CPU", {"INFERENCE_NUM_THREADS": 2,
                                                                  "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()

    def run(a: np.ndarray) -> np.ndarray:
        request.infer({0: a[None, None]})
        return np.asarray(request.get_output_tensor(0).data)[0, 0].astype(np.uint8)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "iq-oth-nccd"))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--side", type=int, default=512, help="the slices' size (square ones only)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=50)
    ap.add_argument("--check", type=int, default=200, help="slices compared with Pillow's pixels")
    a = ap.parse_args()
    import torch.nn.functional as F
    from PIL import Image

    slices = []
    for f in sorted(Path(a.data).rglob("*.jpg")):
        with Image.open(f) as im:
            if im.size == (a.side, a.side):
                slices.append(np.array(im.convert("L")))
        if len(slices) >= a.check:
            break
    if not slices:
        sys.exit(f"no {a.side} x {a.side} .jpg under {a.data}")
    size = (a.size, a.size)

    def pillow(x):
        return np.asarray(Image.fromarray(x).resize(size, Image.BILINEAR))

    def torch_aa(x):
        return F.interpolate(torch.from_numpy(x)[None, None], size=size, mode="bilinear", antialias=True)[0, 0].numpy()

    ways = {"pillow": pillow, "torch": torch_aa,
            "openvino bilinear_pillow": openvino_resize(a.side, a.size, "bilinear_pillow"),
            "openvino linear + antialias": openvino_resize(a.side, a.size, "linear")}
    worst = {k: max(int(np.abs(fn(x).astype(np.int16) - pillow(x)).max()) for x in slices) for k, fn in ways.items()}
    x = slices[0].copy()
    for fn in ways.values():  # warm-up
        fn(x)
    per_round = {k: [] for k in ways}
    for _ in range(a.rounds):
        for k, fn in ways.items():
            t = []
            for _ in range(a.per_round):
                t0 = time.perf_counter()
                fn(x)
                t.append(time.perf_counter() - t0)
            per_round[k].append(np.median(t))
    p50 = {k: float(np.median(v)) * 1e3 for k, v in per_round.items()}
    print(f"resize {a.side} -> {a.size}, one grayscale slice, {a.rounds} rounds x {a.per_round}, "
          f"max difference over {len(slices)} slices")
    print("| resize | p50 ms | spread | / pillow | max difference from Pillow (grey levels) |\n|---|---|---|---|---|")
    for k in ways:
        print(f"| {k} | {p50[k]:.3f} | {spread(per_round[k]):.0%} | {p50[k] / p50['pillow']:.2f}x | {worst[k]} |")


if __name__ == "__main__":
    main()
