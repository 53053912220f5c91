"""The set check against single scans: how far one scan's slices lie from the training images as a set.

``lungedge eval``'s set check (:meth:`lungedge.inputcheck.InputCheck.compare_set`) measures how far a set of
images lies from the training images, in training spreads. A clinician's folder is often one patient's scan,
and one scan's slices are one anatomy and one finding: they differ from the training *mix* by themselves.
This script takes an exported ONNX with an input check and its run's split manifest, and for each
near-duplicate group of the manifest (IQ-OTH/NCCD: a scan's neighbouring slices) with at least ``--min``
images, measures the set distance of that group alone, and of random unions of k whole groups (k = 5, 10, 20,
drawn from all parts of the split, so images the model was trained on): how often each would fire with the
threshold counted in images, max(0.25, 2/sqrt(n)), and in groups, max(0.25, 2/sqrt(g)), the rule eval uses.

    PYTHONPATH=. .venv/bin/python benchmarks/set_check_scans.py --onnx ENGINES/smallcnn/smallcnn.fp32.onnx \\
        --split RUNS/smallcnn/RUN/split.json --data ../shared/data/iq-oth-nccd

A measurement, not a test; about a minute (every image of the manifest is decoded once).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch  # noqa: F401 - torch and torchvision before anything that may import TensorFlow
import torchvision  # noqa: F401
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", type=Path, required=True, help="an exported ONNX with an input check")
    ap.add_argument("--split", type=Path, required=True, help="its run's split manifest")
    ap.add_argument("--data", type=Path, help="the data set's folder (default: the manifest's root)")
    ap.add_argument("--min", type=int, default=10, help="groups of at least this many images")
    ap.add_argument("--draws", type=int, default=200, help="random unions of k groups per k")
    args = ap.parse_args()

    import onnx

    from lungedge import inputcheck, onnx_meta
    from lungedge.preprocess import Preprocessing

    manifest = json.loads(args.split.read_text())
    root = args.data or Path(manifest["dataset"]["root"])
    meta = onnx_meta.from_model(onnx.load(str(args.onnx)))
    check = inputcheck.InputCheck.from_meta(meta["extra"]["input_check"], str(args.onnx))
    prep = Preprocessing.from_dict(meta["preprocessing"])
    items = manifest["items"]
    _, x, _ = prep.load_readable([root / it["path"] for it in items])
    values = inputcheck.describe_in_chunks([(x, prep)])
    inputcheck.MIN_SET, inputcheck.MIN_GROUPS = 1, 1  # measure every set, however small; the rules are applied below
    by_group = collections.defaultdict(list)
    for k, it in enumerate(items):
        by_group[it["group"]].append(k)

    def rule(stat: float, n: int) -> bool:
        return stat > max(inputcheck.SET_THRESHOLD, inputcheck.SET_NOISE / np.sqrt(n))

    scans = [idx for idx in by_group.values() if len(idx) >= args.min]
    stats = [check.compare_set(values[idx])["statistic"] for idx in scans]
    print(f"{args.onnx.name} on {len(items)} images of {args.split} ({len(by_group)} near-duplicate groups)\n")
    print("| set | sets | images each | distance p10 / p50 / p90 / max | fire, n counted in images | "
          "fire, n counted in groups (eval's rule) |\n|---|---|---|---|---|---|")
    sizes = [len(idx) for idx in scans]
    print(f"| one group (scan) of ≥ {args.min} images | {len(scans)} | {min(sizes)}–{max(sizes)} | "
          f"{' / '.join(f'{q:.2f}' for q in np.percentile(stats, [10, 50, 90, 100]))} | "
          f"{sum(rule(s, n) for s, n in zip(stats, sizes))} of {len(scans)} | 0 (one group: not judged) |")
    rng = np.random.default_rng(0)
    ids = list(by_group)
    for k in (5, 10, 20):
        got = []
        for _ in range(args.draws):
            pick = rng.choice(len(ids), k, replace=False)
            idx = [i for g in pick for i in by_group[ids[g]]]
            got.append((check.compare_set(values[idx])["statistic"], len(idx)))
        s = np.array([g[0] for g in got])
        n_img = [g[1] for g in got]
        print(f"| {k} random groups together | {args.draws} | {min(n_img)}–{max(n_img)} | "
              f"{' / '.join(f'{q:.2f}' for q in np.percentile(s, [10, 50, 90, 100]))} | "
              f"{sum(rule(a, n) for a, n in got)} of {args.draws} | {sum(rule(a, k) for a, _ in got)} of {args.draws} |")


if __name__ == "__main__":
    main()
