"""The input check against "another scanner": flag rate and accuracy on shifted copies of the test images.

A clinician at another hospital feeds the model CT slices from another scanner, windowed, compressed,
cropped or annotated differently, and sometimes something that is no CT slice at all. This script does
what such a user would, through the command line only:

1. trains a small model and exports it (``lungedge train`` / ``lungedge export``; skipped with
   ``--onnx``/``--split``), so that the ONNX carries an input check fitted on the run's training part;
2. writes, with Pillow/NumPy, each *variant* of the split's test images as image files (full size, one
   folder per class) under ``WORK/variants/``. IQ-OTH/NCCD (default): another CT window (contrast,
   brightness, gamma), noise, lower resolution, JPEG quality 20, a 16-bit export of raw Hounsfield units,
   inverted, rotated 90 degrees, flipped, an 80 % crop, a black border, a text overlay. LC25000
   (``--dataset lc25000-lung-subset``): another stain (hue, saturation), greyscale, brightness, noise,
   lower resolution, JPEG, rotated. Then unlabelled images of other kinds: the other data set's images,
   synthetic colour photos of outdoor scenes, all black, uniform grey;
3. runs ``lungedge eval --json`` on each labelled variant (the share flagged "unlike the training
   images", whether the whole set is found unlike them (``set_shift``: its largest Wasserstein distance in
   training spreads, the descriptor, the threshold), accuracy and balanced accuracy, beside the unchanged
   test images') and ``lungedge predict --json`` on each unlabelled set (the share flagged; predict has no
   set check), and prints a Markdown table.

What matters are the rows where accuracy drops and (almost) nothing is flagged, by either check; and the
unchanged test images, which neither must flag.

    PYTHONPATH=. .venv/bin/python benchmarks/input_check_shift.py --data ../shared/data --work /tmp/shift

About three minutes on two CPU cores for IQ-OTH/NCCD (training smallcnn 8 epochs at 64 px is one of
them), five for LC25000 (3 epochs). Deterministic: the same numbers on a second run. A measurement, not a
test.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

IQ, LC = "iq-oth-nccd", "lc25000-lung-subset"
OTHER_IMAGES = 300  # evenly spaced images of the other data set
MADE_UP = 40  # images per unlabelled made-up kind (photos, blank, grey)
EPOCHS = {IQ: 8, LC: 3}


def lungedge(*args: str, threads: int) -> str:
    """Run ``python -m lungedge ARGS`` as a user would; stdout, or the error and exit."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-m", "lungedge", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"lungedge {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


# --- the variants: each maps a PIL image (L or RGB) to another; some take the rng too ---------------------

def _lut(fn):
    table = list(np.clip(np.round(fn(np.arange(256, dtype=np.float64))), 0, 255).astype(np.uint8))
    return lambda im: im.point(table * len(im.getbands()))


def _noise(sigma: float):
    from PIL import Image

    def op(im, rng):
        a = np.asarray(im, np.float64)
        return Image.fromarray(np.clip(np.round(a + rng.normal(0, sigma, a.shape)), 0, 255).astype(np.uint8))
    return op


def _resample(factor: int):
    from PIL import Image

    def op(im):
        small = im.resize((max(1, im.width // factor), max(1, im.height // factor)), Image.BILINEAR)
        return small.resize(im.size, Image.BILINEAR)
    return op


def _jpeg(quality: int):
    from PIL import Image

    def op(im):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        return Image.open(io.BytesIO(buf.getvalue())).convert(im.mode)
    return op


def _crop(share: float):
    from PIL import Image

    def op(im):
        w, h = im.size
        cw, ch = round(w * share), round(h * share)
        left, top = (w - cw) // 2, (h - ch) // 2
        return im.crop((left, top, left + cw, top + ch)).resize(im.size, Image.BILINEAR)
    return op


def _border(share: float):
    from PIL import ImageOps

    return lambda im: ImageOps.expand(im, border=round(im.width * share), fill=0)


def _text(im):
    """White burnt-in annotation, as a PACS screenshot carries: name, date, side marker, window."""
    from PIL import ImageDraw, ImageFont

    im = im.copy()
    d = ImageDraw.Draw(im)
    size = max(12, im.height // 16)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one small bitmap font
        font = ImageFont.load_default()
    white = 255 if im.mode == "L" else (255, 255, 255)
    d.text((8, 8), "DOE, JANE  F 64Y", fill=white, font=font)
    d.text((8, 8 + size + 4), "2021-03-14  CHEST", fill=white, font=font)
    d.text((im.width - 3 * size, im.height // 2), "R", fill=white, font=font)
    d.text((8, im.height - size - 12), "W:1500 L:-600  5mm", fill=white, font=font)
    return im


def _raw16(im):
    """A 16-bit PNG as a PACS exports it: raw Hounsfield units + 1024, which lungedge min-max stretches on
    reading. The 8-bit slice is read as a lung window (width 1500, level -600), air clipped at -1024 HU and
    its saturated pixels (>= 150 HU: bone, contrast) put at +1000 HU."""
    from PIL import Image

    g = np.asarray(im, np.float64)
    hu = np.maximum(-600 - 750 + g * 1500 / 255, -1024)
    hu[g >= 255] = 1000
    return Image.fromarray((hu + 1024).round().astype(np.uint16))


def _hsv(dh: int = 0, ds: float = 1.0):
    """Another stain: hue turned by ``dh`` (of 256) and saturation scaled by ``ds``."""
    from PIL import Image

    def op(im):
        h, s, v = im.convert("HSV").split()
        h, s = h.point(lambda t: (t + dh) % 256), s.point(lambda t: min(255, round(t * ds)))
        return Image.merge("HSV", (h, s, v)).convert("RGB")
    return op


def labelled_variants(dataset: str) -> dict:
    """Name -> operation on a PIL image of the data set's own mode (L for CT, RGB for histopathology)."""
    from PIL import ImageOps

    rotate = lambda im: im.transpose(2)  # noqa: E731  (Image.Transpose.ROTATE_90)
    if dataset == LC:
        return {
            "stain: hue +25 (of 256)": _hsv(25),
            "stain: hue -25": _hsv(-25),
            "stain: saturation x0.6 (paler)": _hsv(0, 0.6),
            "stain: saturation x1.4": _hsv(0, 1.4),
            "greyscale tile": lambda im: im.convert("L").convert("RGB"),
            "brightness +20": _lut(lambda g: g + 20),
            "noise: Gaussian sigma 10": _noise(10),
            "resolution: 1/4 then back up": _resample(4),
            "JPEG quality 20": _jpeg(20),
            "rotated 90 degrees": rotate,
            "crop 80 % (zoom in)": _crop(0.8),
        }
    return {
        "window: contrast x1.5 (narrower window)": _lut(lambda g: (g - 128) * 1.5 + 128),
        "window: contrast x0.6 (wider window)": _lut(lambda g: (g - 128) * 0.6 + 128),
        "window: brightness +20": _lut(lambda g: g + 20),
        "window: brightness -20": _lut(lambda g: g - 20),
        "window: gamma 0.6": _lut(lambda g: 255 * (g / 255) ** 0.6),
        "window: gamma 1.6": _lut(lambda g: 255 * (g / 255) ** 1.6),
        "noise: Gaussian sigma 10": _noise(10),
        "noise: Gaussian sigma 25": _noise(25),
        "resolution: 1/4 then back up": _resample(4),
        "resolution: 1/12 then back up": _resample(12),
        "JPEG quality 20": _jpeg(20),
        "16-bit PNG of raw HU (stretched on reading)": _raw16,
        "inverted": ImageOps.invert,
        "rotated 90 degrees": rotate,
        "flipped left-right": ImageOps.mirror,
        "crop 80 % (zoom in)": _crop(0.8),
        "black border 15 % each side": _border(0.15),
        "text overlay (burnt-in annotation)": _text,
    }


def outdoor_photo(rng, size: int = 384):
    """A synthetic colour photo of an outdoor scene: sky gradient, a sun, 1/f-noise hills and grass
    (natural images have a ~1/f spectrum), so that no download is needed."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    f = np.fft.fftfreq(size)
    amp = 1 / np.maximum(np.hypot(f[:, None], f[None, :]), 1 / size)
    noise = np.real(np.fft.ifft2(amp * np.exp(2j * np.pi * rng.random((size, size)))))
    noise = (noise - noise.mean()) / noise.std()
    horizon = 0.45 + 0.1 * rng.random() + 0.08 * np.sin(2 * np.pi * (x[0] * rng.uniform(1, 3) + rng.random()))
    sky = np.stack([90 + 80 * y, 150 + 70 * y, 235 - 10 * y], -1) * rng.uniform(0.8, 1.1)
    ground = np.stack([60 + 25 * noise, 120 + 35 * noise, 40 + 15 * noise], -1) * rng.uniform(0.7, 1.2)
    img = np.where((y > horizon[None, :])[..., None], ground, sky)
    cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.3), rng.uniform(0.03, 0.08)
    img[np.hypot(x - cx, y - cy) < r] = (255, 240, 180)
    img += rng.normal(0, 4, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def write_variants(test, dataset: str, work: Path, rng) -> tuple[dict, dict]:
    """Labelled variant folders (name -> folder) and made-up unlabelled image files (name -> files)."""
    from PIL import Image

    labelled, unlabelled = {}, {}
    mode = "RGB" if dataset == LC else "L"
    originals = [Image.open(p).convert(mode) for p in test.paths]
    for k, (name, op) in enumerate(labelled_variants(dataset).items()):
        folder = work / "variants" / f"{k:02d}"
        labelled[name] = folder
        if (folder / "done").exists():
            continue
        for i, (im, label, path) in enumerate(zip(originals, test.labels, test.paths)):
            out = folder / label / f"{i:04d}-{Path(path).stem}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                op(im, rng).save(out)
            except TypeError:  # an operation without the rng
                op(im).save(out)
        (folder / "done").write_text(name)
    made = work / "variants" / "unlabelled"
    made.mkdir(parents=True, exist_ok=True)
    kinds = {"synthetic outdoor colour photo": lambda: outdoor_photo(rng),
             "all black": lambda: Image.new("L", (512, 512), 0),
             "uniform grey (128)": lambda: Image.new("L", (512, 512), 128)}
    for k, (name, make) in enumerate(kinds.items()):
        files = [made / f"{k}-{i:03d}.png" for i in range(MADE_UP)]
        for f in files:
            if not f.exists():
                make().save(f)
        unlabelled[name] = files
    return labelled, unlabelled


def eval_row(onnx: Path, work: Path, threads: int, *, split: Path | None = None, data: Path | None = None) -> dict:
    where = ["--split", str(split)] if split else ["--data", str(data)]
    out = lungedge("eval", str(onnx), *where, "--json", "--bootstrap", "100", "--threads", str(threads),
                   "--out", str(work / "results"), threads=threads)
    return json.loads(out)[0]


def set_cell(shift: dict | None) -> str:
    """'**fires** 0.72 (grey_std)' / 'no 0.08 (grey_std)' from an eval row's or predict's ``set_shift``."""
    if not shift:
        return "no set check"
    if not shift["judged"]:
        return "not judged"
    top = max(shift["distance"], key=shift["distance"].get)
    return f"{'**fires**' if shift['differs'] else 'no'} {shift['statistic']:.2f} ({top})"


def flag_share(onnx: Path, files: list[Path], threads: int) -> tuple[int, int, str, str]:
    """(images flagged, images, the first reason, '–': predict has no set check) of one predict call."""
    out = json.loads(lungedge("predict", str(onnx), *map(str, files), "--json", threads=threads))
    preds = out["predictions"]
    hit = [p for p in preds if (p.get("input_check") or {}).get("unlike_training")]
    return len(hit), len(preds), (hit[0]["input_check"]["reasons"][0] if hit else ""), "–"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"),
                    help=f"folder holding {IQ}/ and {LC}/")
    ap.add_argument("--dataset", choices=(IQ, LC), default=IQ, help="the data set the model is trained on")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lungedge-shift"), help="runs, ONNX and variants go here")
    ap.add_argument("--onnx", type=Path, help="an exported ONNX with an input check (skips train + export)")
    ap.add_argument("--split", type=Path, help="with --onnx: its run's split manifest")
    ap.add_argument("--model", default="smallcnn")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, help=f"default: {EPOCHS}")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.onnx and not args.split:
        ap.error("--onnx needs --split (its run's split manifest)")

    from lungedge.testset import load_test_set

    work, t = args.work.resolve(), args.threads
    work.mkdir(parents=True, exist_ok=True)
    if args.onnx:
        onnx, split = args.onnx.resolve(), args.split.resolve()
    else:
        run = work / "runs" / args.model / "shift"
        epochs = args.epochs or EPOCHS[args.dataset]
        if not (run / "best.pth").exists():
            print(f"training {args.model} on {args.dataset} ({args.image_size} px, {epochs} epochs) ...", flush=True)
            lungedge("train", args.model, "--data", str(args.data / args.dataset), "--image-size", str(args.image_size),
                     "--epochs", str(epochs), "--weights", "none", "--out", str(work / "runs"),
                     "--run-name", "shift", "--threads", str(t), threads=t)
        onnx = work / "engines" / args.model / f"{args.model}.fp32.onnx"
        if not onnx.exists():
            out = lungedge("export", args.model, "--checkpoint", str(run / "best.pth"), "--out", str(work / "engines"),
                           "--calibration", str(work / "calibration"), threads=t)
            print("\n".join(line for line in out.splitlines() if "input check" in line or "set check" in line),
                  flush=True)
        split = run / "split.json"
    test = load_test_set(split=split)
    rng = np.random.default_rng(0)
    labelled, unlabelled = write_variants(test, args.dataset, work, rng)

    print(f"{'images':<46} {'flagged':>18} {'set check':>28} {'accuracy':>9} {'bal. acc':>9}", flush=True)
    table = []
    for name, folder in [("own test images (unchanged)", None), *labelled.items()]:
        row = eval_row(onnx, work, t, split=split) if folder is None else eval_row(onnx, work, t, data=folder)
        m = row["metrics"]
        n_flag, n = int(row.get("unlike_training_count", 0)), int(m["n"])
        acc, bacc = m["accuracy"], m["balanced_accuracy"]
        shift = set_cell(row.get("set_shift"))
        print(f"{name:<46} {n_flag:>5} / {n:<4} {n_flag / n:6.1%} {shift:>28} {acc:9.3f} {bacc:9.3f}", flush=True)
        table.append((name, n_flag, n, shift, acc, bacc))
    other = LC if args.dataset == IQ else IQ
    other_set = load_test_set(data=args.data / other, limit=OTHER_IMAGES)
    kind = "LC25000 histopathology tiles" if other == LC else "IQ-OTH/NCCD CT slices"
    for name, files in {kind: list(other_set.paths), **unlabelled}.items():
        n_flag, n, why, shift = flag_share(onnx, files, t)
        print(f"{name:<46} {n_flag:>5} / {n:<4} {n_flag / n:6.1%} {shift:>28} {'':>19}  {why}", flush=True)
        table.append((name, n_flag, n, shift, None, None))

    print(f"\n{onnx} ({args.dataset}): Markdown table\n")
    print("| images | flagged | set check: distance (descriptor) | accuracy | balanced accuracy |\n"
          "|---|---|---|---|---|")
    for name, n_flag, n, shift, acc, bacc in table:
        cells = ("–", "–") if acc is None else (f"{acc:.3f}", f"{bacc:.3f}")
        print(f"| {name} | {n_flag} / {n} ({n_flag / n:.0%}) | {shift} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
