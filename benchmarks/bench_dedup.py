"""Memory and time of the near-duplicate search, streamed in blocks against the dense N x N matrix.

`lungedge data split` and `data audit` compare every image with every variant of every other one.
Until 2026-11-29 that built the whole N x N similarity matrix (and several N x 88 x 400 copies of
the features); LC25000's 15,000 lung images or all 25,000 would need most of a 24 GB machine.
:func:`lungedge.data.dedup.similar_pairs` now keeps one block of rows at a time and only the pairs
above the threshold. Each contender runs in a child process of its own (peak memory: its
``ru_maxrss``), in alternating order per size, on thumbnails of the images under ``--data`` repeated
(each copy flipped or turned, as LC25000's augmentation does) up to N; both must find the same
pairs (their SHA-256 is compared). Both also search the turned-back thumbnails of the images that look
turned (:func:`lungedge.data.dedup.turned_back`, added after README's table was measured: two rows more per
image, and a second pass over the few images that look turned).

    .venv/bin/python benchmarks/bench_dedup.py --sizes 2000,6000,12000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import hashlib, json, resource, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from PIL import Image
from pathlib import Path
from lungedge.data import dedup
mode, n, data, threshold = sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
base = []
for f in sorted(p for p in Path(data).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
    with Image.open(f) as im:
        base.append(np.asarray(im.convert("L").resize((64, 64), Image.BILINEAR), dtype=np.uint8))
thumbs = np.stack([np.rot90(base[i % len(base)], i // len(base)) if (i // len(base)) % 2 == 0
                   else base[i % len(base)][:, ::-1] for i in range(n)])
del base
t0 = time.perf_counter()
if mode == "dense":  # the former code: the whole matrix, then its upper triangle
    v = np.stack([dedup.variants(t) for t in thumbs])
    mean = v.mean(axis=0, keepdims=True)
    v = v - mean
    x = v.reshape(*v.shape[:-2], -1)
    x = np.concatenate([x, np.repeat(x[:, :1], dedup.TURNED, 1)], 1)  # + the turned-back rows (2026-11-29)
    dedup.turned_back(x, mean[0, :8].reshape(8, -1))
    x = x - x.mean(-1, keepdims=True)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    norm[norm == 0] = 1.0
    feats = (x / norm).astype(np.float32)
    del v, x
    k = feats.shape[1]
    sim = np.empty((n, n), np.float32)
    everything = feats.reshape(n * k, -1)
    probes = [0, *range(dedup.VARIANTS, k)]  # plain and turned-back rows against every row
    for i0 in range(0, n, 512):
        part = feats[i0 : i0 + 512][:, probes].reshape(-1, feats.shape[-1]) @ everything.T
        sim[i0 : i0 + 512] = part.reshape(-1, len(probes), n, k).max(axis=(1, 3))
    sim = np.maximum(sim, sim.T)
    np.fill_diagonal(sim, -1.0)
    i, j = np.nonzero(np.triu(sim >= threshold, 1))
    pairs = list(zip(i.tolist(), j.tolist()))
else:
    pairs = dedup.duplicate_pairs(dedup.similar_pairs(dedup.features(thumbs), threshold), threshold)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
                  "pairs": len(pairs), "sha": hashlib.sha256(repr(pairs).encode()).hexdigest()[:16]}))
"""


def run(mode: str, n: int, data: str, threshold: float) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), mode, str(n), data, str(threshold)],
                         capture_output=True, text=True)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1][:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--sizes", default="2000,6000,12000")
    ap.add_argument("--threshold", type=float, default=0.80, help="the loosest one audit uses")
    a = ap.parse_args()
    print(f"near-duplicate search, threshold {a.threshold}, thumbnails of {a.data} repeated to N")
    print("| N | dense: peak GB | streamed: peak GB | memory dense / streamed | dense s | streamed s "
          "| time streamed / dense | pairs | same pairs |\n|---|---|---|---|---|---|---|---|---|")
    for k, n in enumerate(int(s) for s in a.sizes.split(",")):
        order = ["dense", "stream"] if k % 2 == 0 else ["stream", "dense"]
        got = {m: run(m, n, a.data, a.threshold) for m in order}
        d, s = got["dense"], got["stream"]
        if "error" in d or "error" in s:
            print(f"| {n} | {d.get('error') or d['peak_gb']} | {s.get('error') or s['peak_gb']} | | | | | | |")
            continue
        print(f"| {n} | {d['peak_gb']:.2f} | {s['peak_gb']:.2f} | {d['peak_gb'] / s['peak_gb']:.1f}x | "
              f"{d['seconds']:.0f} | {s['seconds']:.0f} | {s['seconds'] / d['seconds']:.2f}x | {s['pairs']} | "
              f"{'yes' if d['sha'] == s['sha'] else 'NO'} |")


if __name__ == "__main__":
    main()
