"""How often the input check flags images, by kind, and what it costs per image (lungedge.inputcheck).

Takes an exported FP32 ONNX that carries an input check (``lungedge export`` of a run: fitted on its
training part) and its run's split manifest, and prints:

1. the flag rate, for the check as stamped, on the run's own validation and test images (of the
   same kind: should be near 0), on LC25000 histopathology tiles (another kind: near 100 %), and on
   made-up images from the test slices: inverted, all black, all white, mid-grey, uniform grey noise,
   colour noise; and a few *subtle* shifts of the same test slices (brightness +-20 grey levels,
   gamma 0.7 / 1.4, blur, JPEG quality 10, rotated 90 degrees), which it is not meant to catch;
2. the same for other margins (the envelope fitted again from the training descriptors), to show
   why :data:`lungedge.inputcheck.MARGIN` is what it is;
3. the check's time per image (describe + flag, batch 16) beside the model's ONNX Runtime inference on
   the same batch, and the descriptors alone at 224 px.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_inputcheck.py engines/smallcnn/smallcnn.fp32.onnx \\
        runs/smallcnn/<run>/split.json --lc25000 ../shared/data/lc25000-lung-subset
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np

from lungedge import inputcheck
from lungedge.preprocess import Preprocessing
from lungedge.runners.artifact import artifact_info
from lungedge.testset import load_test_set, load_training_set, load_validation_set

MARGINS = (0.0, 0.1, 0.25, 0.5, 1.0)
FLOORS = (1.0, 3.0, 10.0)


def pixels_of(paths, prep: Preprocessing) -> list[np.ndarray]:
    return [prep.load_pixels(p) for p in paths]


def to_input(pixels: list[np.ndarray], prep: Preprocessing) -> np.ndarray:
    return np.stack([prep.normalize(p) for p in pixels])


def made_up(test_pixels: list[np.ndarray], size: int, n: int, rng) -> dict[str, list[np.ndarray]]:
    from PIL import Image, ImageFilter

    def pil(op):
        return [np.asarray(op(Image.fromarray(p))) for p in test_pixels]

    def jpeg(im, q=10):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=q)
        return Image.open(io.BytesIO(buf.getvalue()))

    lut = lambda g: (255 * (np.arange(256) / 255) ** g).round().astype(np.uint8)  # noqa: E731
    shift = lambda p, d: np.clip(p.astype(int) + d, 0, 255).astype(np.uint8)  # noqa: E731
    return {
        "other kind: inverted test slice": [255 - p for p in test_pixels],
        "other kind: all black": [np.zeros((size, size), np.uint8)] * n,
        "other kind: all white": [np.full((size, size), 255, np.uint8)] * n,
        "other kind: mid-grey": [np.full((size, size), 128, np.uint8)] * n,
        "other kind: uniform grey noise": list(rng.integers(0, 256, (n, size, size), dtype=np.uint8)),
        "other kind: colour noise": list(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)),
        "subtle: brightness +20": [shift(p, 20) for p in test_pixels],
        "subtle: brightness -20": [shift(p, -20) for p in test_pixels],
        "subtle: gamma 0.7": [lut(0.7)[p] for p in test_pixels],
        "subtle: gamma 1.4": [lut(1.4)[p] for p in test_pixels],
        "subtle: Gaussian blur r=1": pil(lambda im: im.filter(ImageFilter.GaussianBlur(1))),
        "subtle: JPEG quality 10": pil(jpeg),
        "subtle: rotated 90 degrees": [np.rot90(p).copy() for p in test_pixels],
    }


def rate(check: inputcheck.InputCheck, values: np.ndarray) -> float:
    return float(np.mean([f["unlike_training"] for f in check.flag_values(values)]))


def timing(fn, reps: int, rounds: int = 7) -> float:
    """Seconds per call: the best of ``rounds`` rounds of ``reps`` calls (a shared machine's other jobs
    only ever add time)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("onnx", type=Path)
    ap.add_argument("split", type=Path)
    ap.add_argument("--lc25000", type=Path, help="LC25000 folder (lung_image_sets/...)")
    ap.add_argument("--lc-images", type=int, default=600, help="evenly spaced LC25000 images")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads for the timing")
    args = ap.parse_args()

    info = artifact_info(args.onnx)
    prep, stamped = info.preprocessing, info.extra.get("input_check")
    if info.input_check is None:
        raise SystemExit(f"{args.onnx} carries no input check: export it with --input-check")
    print(f"{args.onnx}: input check fitted on {stamped['fitted_on']} ({stamped['images']} images), "
          f"margin {stamped['margin']}, floor {stamped['floor']}; preprocessing {prep.size} px {prep.channel_order}")
    rng = np.random.default_rng(0)
    train = load_training_set(args.split, limit=inputcheck.MAX_IMAGES)
    val, test = load_validation_set(args.split), load_test_set(split=args.split)
    test_pixels = pixels_of(test.paths, prep)
    sets = {"own validation images (same kind)": to_input(pixels_of(val.paths, prep), prep),
            "own test images (same kind)": to_input(test_pixels, prep)}
    if args.lc25000:
        lc = load_test_set(data=args.lc25000, limit=args.lc_images)
        sets[f"other kind: LC25000 histopathology ({lc.where})"] = to_input(pixels_of(lc.paths, prep), prep)
    for name, px in made_up(test_pixels, prep.size, 50, rng).items():
        sets[name] = to_input(px, prep)
    described = {name: inputcheck.describe_in_chunks([(x, prep)]) for name, x in sets.items()}

    print("\nflag rate with the stamped check (images flagged / images):")
    for name, values in described.items():
        flags = info.input_check.flag_values(values)
        n = sum(f["unlike_training"] for f in flags)
        first = next((f["reasons"][0] for f in flags if f["unlike_training"]), "")
        print(f"  {name:<58} {n:>4} / {len(flags):<4} {n / len(flags):7.1%}   {first}")

    train_values = inputcheck.describe_in_chunks([(to_input(pixels_of(train.paths, prep), prep), prep)])
    print("\nflag rate by margin and floor (envelope fitted again on the same training descriptors):")
    names = list(described)
    print("  " + "margin floor".ljust(14) + "".join(n.split(":")[-1].strip()[:14].rjust(16) for n in names))
    for floor in FLOORS:
        for m in MARGINS:
            fitted = inputcheck.fit(train_values, "train", margin=m, floor=floor)
            check = inputcheck.InputCheck.from_meta(fitted, "bench")
            print("  " + f"{m:<6} {floor:<7}" + "".join(f"{rate(check, described[n]):16.1%}" for n in names))
    print("\ntraining images' range (0.5-99.5 %) per descriptor, and where the other kinds lie (median):")
    for k, d in enumerate(inputcheck.DESCRIPTORS):
        others = "  ".join(f"{n.split(':')[-1].strip()[:12]} {np.nanmedian(described[n][:, k]):.1f}"
                           for n in names[2:9])
        lo, hi = np.nanpercentile(train_values[:, k], inputcheck.RANGE)
        print(f"  {d:<14} {lo:7.1f} – {hi:7.1f}   {others}")

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(args.onnx), so, providers=["CPUExecutionProvider"])
    x = sets["own test images (same kind)"][:16]
    t_check = timing(lambda: info.input_check.flag(x, prep), 50) / len(x)
    t_infer = timing(lambda: sess.run(None, {"input": x}), 50) / len(x)
    print(f"\ncost per image, batch 16 ({args.threads} ORT thread): input check {t_check * 1e6:.0f} us, "
          f"inference {t_infer * 1e6:.0f} us ({t_check / t_infer:.1%} of the inference)")
    big = Preprocessing(size=224)
    xb = big.normalize(rng.integers(0, 256, (16, 224, 224), dtype=np.uint8))
    t_big = timing(lambda: inputcheck.describe(xb, big), 20) / len(xb)
    print(f"descriptors alone at 224 px (RGB, NCHW; one pixel in {inputcheck.stride(224)} each way): "
          f"{t_big * 1e6:.0f} us per image")


if __name__ == "__main__":
    main()
