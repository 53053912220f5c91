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

The search compares every image with every other (O(N^2) time) but never holds the N x N
matrix: a block of rows at a time, keeping the pairs above the threshold
(:func:`similar_pairs`); memory is the features (88 x 400 float32 per image) plus one block.
:func:`similar_across` is the same search between two sets (test images against training images,
``lungedge eval``'s leakage check): len(a) x len(b) comparisons, a block of a's rows at a time.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from .defaults import DEFAULT_THRESHOLD, LOOSE_THRESHOLD  # noqa: F401 - re-exported
ANGLES = tuple(range(-25, 26, 5))
SIDE = 20  # correlation is computed on SIDE x SIDE pixels


def rotations(thumb: np.ndarray) -> np.ndarray:
    """One (64, 64) uint8 thumbnail rotated by each of :data:`ANGLES` (angle 0 first), each zoomed to drop
    the blank corners and resized to SIDE x SIDE: (len(ANGLES), SIDE, SIDE) uint8. The costly part of
    :func:`variants` (Pillow, a few ms per image), exact in uint8, so it can be kept (eval's leakage check
    caches it for the training images: :mod:`lungedge.data.leak`)."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(thumb, dtype=np.uint8))
    n = thumb.shape[0]
    out = []
    for ang in sorted(ANGLES, key=abs):  # angle 0 first
        rot = img.rotate(ang, Image.BILINEAR)
        zoom = math.cos(math.radians(abs(ang))) + math.sin(math.radians(abs(ang)))
        side = n / zoom
        off = (n - side) / 2
        out.append(np.asarray(rot.crop((off, off, off + side, off + side)).resize((SIDE, SIDE), Image.BILINEAR)))
    return np.stack(out)


def turns(rots: np.ndarray) -> np.ndarray:
    """(..., A, SIDE, SIDE) rotations -> (..., A * 8, SIDE, SIDE): each as it is and flipped, each of those
    turned by 0/90/180/270 degrees (the same dtype)."""
    out = [np.rot90(u, k, axes=(-2, -1)) for u in (rots, rots[..., ::-1]) for k in range(4)]
    return np.stack(out, axis=-3).reshape(*rots.shape[:-3], rots.shape[-3] * 8, SIDE, SIDE)


def variants(thumb: np.ndarray) -> np.ndarray:
    """All rotated/flipped variants of one thumbnail: (len(ANGLES) * 8, SIDE, SIDE) float32.

    Variant 0 is the plain image (angle 0, no flip, no turn).
    """
    return turns(rotations(thumb)).astype(np.float32)


CHUNK = 1024  # images normalised at a time (bounds the temporaries of :func:`features`)
BLOCK_BYTES = 512 * 2**20  # the largest block of correlations :func:`similar_pairs` holds at once


def features(thumbs: np.ndarray, advance=lambda n=1: None) -> np.ndarray:
    """(N, 64, 64) uint8 thumbnails -> (N, V, SIDE*SIDE) unit vectors, variant 0 plain.

    Built in place: the result and temporaries of one :data:`CHUNK` of images, so peak memory is
    about the result's (N x 88 x 400 float32: 2.1 GB for LC25000's 15,000 lung images), with the
    values of the plain formula (``v - mean``, each variant centred and scaled to unit length).
    ``advance(1)`` is called after each image (a progress bar's)."""
    rots = np.empty((len(thumbs), len(ANGLES), SIDE, SIDE), np.uint8)
    for i, t in enumerate(thumbs):
        rots[i] = rotations(t)
        advance(1)
    return features_of_rotations(rots)


def features_of_rotations(rots: np.ndarray) -> np.ndarray:
    """:func:`features` of images whose :func:`rotations` are known: (N, len(ANGLES), SIDE, SIDE) uint8 ->
    (N, V, SIDE*SIDE) float32, centred by the mean variant of these N images."""
    n, k, d = len(rots), len(ANGLES) * 8, SIDE * SIDE
    out = np.empty((n, k, d), np.float32)
    for i0 in range(0, n, CHUNK):
        out[i0 : i0 + CHUNK] = turns(rots[i0 : i0 + CHUNK]).reshape(-1, k, d)
    if n:
        out -= out.mean(axis=0, keepdims=True)  # the data set's mean variant
    for i0 in range(0, n, CHUNK):
        x = out[i0 : i0 + CHUNK]
        x -= x.mean(-1, keepdims=True)
        norm = np.linalg.norm(x, axis=-1, keepdims=True)
        norm[norm == 0] = 1.0
        x /= norm
    return out


def similar_pairs(feats: np.ndarray, threshold: float,
                  advance=lambda n=1: None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of images whose similarity is at least ``threshold``: (i, j, similarity) arrays,
    i < j, in (i, j) order. The similarity of a and b is the larger of (a's plain thumbnail against
    b's best variant) and the other way round. Computed a block of rows at a time (at most
    :data:`BLOCK_BYTES` of correlations), so memory grows with the pairs found, not with N x N.
    ``advance(rows)`` is called after each block."""
    n, k, d = feats.shape
    everything = feats.reshape(n * k, d)
    block = int(max(1, min(512, BLOCK_BYTES // max(1, n * k * 4))))
    found = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))]
    for i0 in range(0, n, block):
        part = (feats[i0 : i0 + block, 0] @ everything.T).reshape(-1, n, k).max(-1)
        rows, cols = np.nonzero(part >= threshold)
        value = part[rows, cols]
        rows += i0
        off = rows != cols
        found.append((rows[off], cols[off], value[off]))
        advance(len(part))
    r, c, v = (np.concatenate(a) for a in zip(*found))
    i, j = np.minimum(r, c).astype(np.int64), np.maximum(r, c).astype(np.int64)
    order = np.lexsort((-v, j, i))  # by pair, the larger direction first
    i, j, v = i[order], j[order], v[order]
    first = np.ones(len(i), bool)
    first[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])  # each pair once, with its larger value
    return i[first], j[first], v[first].astype(np.float32)


def similar_across(a: np.ndarray, b: np.ndarray, threshold: float,
                   advance=lambda n=1: None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (i of ``a``, j of ``b``) whose similarity is at least ``threshold``: (i, j, similarity)
    arrays in (i, j) order. ``a`` and ``b`` are rows of one :func:`features` call (centred by the same mean),
    and the similarity is :func:`similar_pairs`'s: the larger of a_i's plain thumbnail against b_j's best
    variant and b_j's plain thumbnail against a_i's best variant. Only a x b is compared (never a x a or
    b x b), a block of a's rows at a time (two blocks of at most :data:`BLOCK_BYTES`), so memory grows with
    the pairs found, not with len(a) x len(b). ``advance(rows)`` is called after each block."""
    na, k, d = a.shape
    nb = len(b)
    if not na or not nb:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    b_all, b_plain = b.reshape(nb * k, d), b[:, 0]
    block = int(max(1, min(512, BLOCK_BYTES // max(1, nb * k * 4))))
    found = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))]
    for i0 in range(0, na, block):
        part = a[i0 : i0 + block]
        sim = (part[:, 0] @ b_all.T).reshape(len(part), nb, k).max(-1)  # a's plain against b's variants
        np.maximum(sim, (b_plain @ part.reshape(-1, d).T).reshape(nb, len(part), k).max(-1).T, out=sim)
        rows, cols = np.nonzero(sim >= threshold)
        found.append(((rows + i0).astype(np.int64), cols.astype(np.int64), sim[rows, cols].astype(np.float32)))
        advance(len(part))
    i, j, v = (np.concatenate(x) for x in zip(*found))
    return i, j, v


def duplicate_pairs(pairs: tuple[np.ndarray, np.ndarray, np.ndarray], threshold: float) -> list[tuple[int, int]]:
    """The pairs of :func:`similar_pairs` at ``threshold`` or above (which may be above the one they were found at)."""
    i, j, value = pairs
    keep = value >= threshold
    return list(zip(i[keep].tolist(), j[keep].tolist()))


def identical_sets(hashes: list[str]) -> list[list[int]]:
    """Indices of byte-identical files (same SHA-256): one list per repeated hash, in first-seen order.
    An empty hash (a file that could not be read) matches nothing."""
    by_hash: dict[str, list[int]] = {}
    for idx, h in enumerate(hashes):
        if h:
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
