"""What reading the EXIF orientation costs on the decode path that predict, eval and data inspect use.

predict, eval and ``data inspect`` note the images an EXIF orientation turns in photo viewers
(:func:`lungedge.preprocess.exif_turn`). The tag comes from the header the decode already parsed
(Pillow's ``getexif()`` on the open image); until 2026-11-29 predict opened each file a second time for
it. Timed per image, contenders taking turns in rounds (a burst of load on this shared machine hits
all alike), on the first ``--images`` JPEGs under ``--data``:

* ``decode``     - ``prep.load_batch([file])`` at ``--size``: the decode every prediction makes (with the tag);
* ``tag``        - ``exif_turn(img)`` on an already decoded image, its parse forgotten each time;
* ``second open``- ``Image.open(file)`` and its ``getexif()``: what predict used to add per image.

    .venv/bin/python benchmarks/bench_exif.py --data ../shared/data/iq-oth-nccd --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lungedge.preprocess import Preprocessing, exif_turn, pillow, read_image  # noqa: E402


def per_image_ms(fn, items) -> float:
    t = time.perf_counter()
    for it in items:
        fn(it)
    return (time.perf_counter() - t) / len(items) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    files = sorted(p for p in Path(a.data).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[: a.images]
    if not files:
        sys.exit(f"no JPEG under {a.data}")
    prep, Image = Preprocessing(size=a.size), pillow()
    decoded = [read_image(f, a.size) for f in files]

    def tag(img):
        img._exif = None  # Pillow caches the parse: time it afresh
        return exif_turn(img)

    def second_open(path):
        with Image.open(path) as img:
            return img.getexif().get(0x0112)

    contenders = {"decode": (lambda f: prep.load_batch([f]), files), "tag": (tag, decoded),
                  "second open": (second_open, files)}
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(a.rounds):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name in order:
            times[name].append(per_image_ms(*contenders[name]))
    turned = sum(1 for img in decoded if exif_turn(img))
    print(f"{len(files)} JPEGs of {a.data} at size {a.size}, {a.rounds} rounds; {turned} carry a turning tag")
    for name, ts in times.items():
        print(f"{name:12s} median {statistics.median(ts):.4f} ms/image  (rounds: "
              f"{', '.join(f'{t:.4f}' for t in ts)})")


if __name__ == "__main__":
    main()
