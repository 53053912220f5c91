"""eval's near-duplicate check against copies of training images turned, flipped, re-encoded and resized.

For each data set: a grouped split (`lungedge data split`, seed 0), then N of its training images, each written
as a copy turned by 90/180/270 degrees, flipped upside down or left to right, re-saved as JPEG (quality 90) and
resized to 90 %, one folder per kind; :func:`lungedge.data.leak.trained_on` counts how many of each folder it
warns about (near-duplicates of training/validation images), and how many of the split's own test part (0 when
the split and the check agree). Time: the check of the test part, without the thumbnail cache beside the manifest
(every training image read) and with it. Each contender (``--code``: a lungedge checkout, default this one) runs in
a child process of its own, so two versions of the code can be compared on the same copies:

    git archive <commit> | tar -x -C /tmp/before
    .venv/bin/python benchmarks/bench_turned.py --code /tmp/before --code .
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("turned 90", "turned 180", "turned 270", "upside down", "left-right", "JPEG q90", "resized 90 %")

CHILD = r"""
import json, shutil, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from PIL import Image
from lungedge.data.leak import cache_path, trained_on
from lungedge.data.split import make_split, write_manifest
data, work, n = Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
kinds = json.loads(sys.argv[5])
manifest = make_split(data, show_progress=False)
path = write_manifest(manifest, work / "split.json")
root = Path(manifest["dataset"]["root"])
train = [it for it in manifest["items"] if it["split"] == "train"][:: max(1, sum(
    it["split"] == "train" for it in manifest["items"]) // n)][:n]
how = {"turned 90": Image.ROTATE_90, "turned 180": Image.ROTATE_180, "turned 270": Image.ROTATE_270,
       "upside down": Image.FLIP_TOP_BOTTOM, "left-right": Image.FLIP_LEFT_RIGHT}
folders = {}
for kind in kinds:
    out = work / kind.replace(" ", "_").replace("%", "pc")
    out.mkdir(parents=True, exist_ok=True)
    for k, it in enumerate(train):
        with Image.open(root / it["path"]) as im:
            if kind in how:
                im.transpose(how[kind]).save(out / f"{k}.png")
            elif kind == "JPEG q90":
                im.convert("RGB").save(out / f"{k}.jpg", quality=90)
            else:
                im.resize((round(im.width * 0.9), round(im.height * 0.9)), Image.BILINEAR).save(out / f"{k}.png")
    folders[kind] = sorted(out.iterdir())
own = [root / it["path"] for it in manifest["items"] if it["split"] == "test"]
cache = cache_path(path)
result = {"groups": manifest["groups"], "n": len(train), "test": len(own)}
t0 = time.perf_counter()
leak = trained_on(manifest, own, cache=cache, show_progress=False)
result["own_cold_s"] = time.perf_counter() - t0
t0 = time.perf_counter()
leak = trained_on(manifest, own, cache=cache, show_progress=False)
result["own_warm_s"] = time.perf_counter() - t0
nd = leak["near_duplicates"]
result["own_warned"] = leak["in_training"] + leak["in_validation"] + nd["in_training"] + nd["in_validation"]
for kind, paths in folders.items():
    leak = trained_on(manifest, paths, cache=cache, show_progress=False)
    nd = leak["near_duplicates"]
    result[kind] = leak["in_training"] + leak["in_validation"] + nd["in_training"] + nd["in_validation"]
print(json.dumps(result))
"""


def run(code: str, data: Path, n: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_turned.") as work:
        out = subprocess.run([sys.executable, "-c", CHILD, str(Path(code).resolve()), str(data), work, str(n),
                              json.dumps(KINDS)], capture_output=True, text=True)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1][:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--sets", default="iq-oth-nccd,lc25000-lung-subset")
    ap.add_argument("--code", action="append", help="a lungedge checkout to measure (repeatable; default this one)")
    ap.add_argument("-n", type=int, default=100, help="training images copied per kind")
    a = ap.parse_args()
    codes = a.code or [str(ROOT)]
    print(f"copies of {a.n} training images per kind, warned by eval's near-duplicate check (of {a.n})")
    print("| data set | code | groups | " + " | ".join(KINDS) + " | own test part warned | check: cold / cached |")
    print("|---|---|---|" + "---|" * len(KINDS) + "---|---|")
    for name in a.sets.split(","):
        for code in codes:
            r = run(code, Path(a.data) / name, a.n)
            if "error" in r:
                print(f"| {name} | {code} | {r['error']} |")
                continue
            print(f"| {name} | {code} | {r['groups']} | " + " | ".join(str(r[k]) for k in KINDS)
                  + f" | {r['own_warned']} of {r['test']} | {r['own_cold_s']:.1f} s / {r['own_warm_s']:.1f} s |")


if __name__ == "__main__":
    main()
