"""Near-duplicate images, found from the pixels.

Neither IQ-OTH/NCCD nor LC25000 ships patient or source-tile IDs, yet consecutive
slices of one CT scan look nearly the same, and LC25000 holds ~20 augmented copies of
every source tile: rotated by up to 25 degrees (then cropped back to a square),
flipped and turned by multiples of 90 degrees. Two images are near-duplicates when
one, under some such transform, correlates with the other above a threshold:

* each image's 64x64 grayscale thumbnail is rotated by -25..25 degrees in 5-degree
  steps (zoomed to drop the blank corners, as the augmentation does), and each of
  those is also flipped and turned by 0/90/180/270 degrees: 88 variants;
* every variant is centred by the data set's mean variant (so the anatomy all CT
  slices share does not count as similarity) and by its own mean, then scaled to unit
  length, over the central 20x20 pixels;
* the similarity of images a and b is the largest correlation between a's plain
  thumbnail and any variant of b (taken symmetric).

Byte-identical files are always duplicates. Groups are the connected components of
the duplicate graph, so the slices of a scan chain into one group.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from .defaults import DEFAULT_THRESHOLD, LOOSE_THRESHOLD  # noqa: F401 - re-exported
ANGLES = tuple(range(-25, 26, 5))
SIDE = 20  # correlation is computed on SIDE x SIDE pixels


def _dihedral(a: np.ndarray) -> list[np.ndarray]:
    out = []
    for u in (a, a[:, ::-1]):
        out += [np.rot90(u, k) for k in range(4)]
    return out


def variants(thumb: np.ndarray) -> np.ndarray:
    """All rotated/flipped variants of one thumbnail: (len(ANGLES) * 8, SIDE, SIDE) float32.

    Variant 0 is the plain image (angle 0, no flip, no turn).
    """
    from PIL import Image

    img = Image.fromarray(thumb)
    n = thumb.shape[0]
    out = []
    for ang in sorted(ANGLES, key=abs):  # angle 0 first
        rot = img.rotate(ang, Image.BILINEAR)
        zoom = math.cos(math.radians(abs(ang))) + math.sin(math.radians(abs(ang)))
        side = n / zoom
        off = (n - side) / 2
        rot = rot.crop((off, off, off + side, off + side)).resize((SIDE, SIDE), Image.BILINEAR)
        out += _dihedral(np.asarray(rot, dtype=np.float32))
    return np.stack(out)


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.reshape(*x.shape[:-2], -1)
    x = x - x.mean(-1, keepdims=True)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    norm[norm == 0] = 1.0
    return (x / norm).astype(np.float32)


def features(thumbs: np.ndarray) -> np.ndarray:
    """(N, 64, 64) uint8 thumbnails -> (N, V, SIDE*SIDE) unit vectors, variant 0 plain."""
    if len(thumbs) == 0:
        return np.zeros((0, len(ANGLES) * 8, SIDE * SIDE), np.float32)
    v = np.stack([variants(t) for t in thumbs])
    return _unit(v - v.mean(axis=0, keepdims=True))


def similarity(feats: np.ndarray, block: int = 512) -> np.ndarray:
    """Symmetric (N, N) matrix of the best correlation over variants; diagonal is -1."""
    n, k, d = feats.shape
    sim = np.empty((n, n), np.float32)
    everything = feats.reshape(n * k, d)
    for i0 in range(0, n, block):
        part = feats[i0 : i0 + block, 0] @ everything.T
        sim[i0 : i0 + block] = part.reshape(len(part), n, k).max(-1)
    sim = np.maximum(sim, sim.T)
    np.fill_diagonal(sim, -1.0)
    return sim


def duplicate_pairs(sim: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    i, j = np.nonzero(np.triu(sim >= threshold, 1))
    return list(zip(i.tolist(), j.tolist()))


def identical_sets(hashes: list[str]) -> list[list[int]]:
    """Indices of byte-identical files (same SHA-256): one list per repeated hash, in first-seen order."""
    by_hash: dict[str, list[int]] = {}
    for idx, h in enumerate(hashes):
        by_hash.setdefault(h, []).append(idx)
    return [members for members in by_hash.values() if len(members) > 1]


def identical_pairs(hashes: list[str]) -> list[tuple[int, int]]:
    """Every pair of indices whose files are byte-identical."""
    return [pair for members in identical_sets(hashes) for pair in itertools.combinations(members, 2)]


def components(n: int, pairs) -> list[int]:
    """Connected components of the graph with edges ``pairs``: id per node, numbered by first appearance."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0:
        return []
    edges = np.asarray(list(pairs), dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    ids: dict[int, int] = {}
    return [ids.setdefault(int(label), len(ids)) for label in labels]
