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
* where the images share an anatomy, an image that looks turned, one the mean thumbnail
  turned by 90, 180 or 270 degrees (flipped or not) explains better than the mean as it
  is (:data:`ANATOMY`, :data:`TURNED_GAIN`), is also centred by that turned mean, and by
  its mirror image (:func:`turned_back`): a CT slice turned by 90 degrees carries the
  anatomy turned with it, so centred by the upright mean it correlates ~0.7 with its own
  source's turned variant, centred by the turned mean exactly as well as that variant (the
  mean of the variants turned is the mean turned);
* the similarity of images a and b is the largest correlation between a's plain
  thumbnail (or, for an image that looks turned, its turned-back ones) and any variant
  or turned-back thumbnail of b (taken symmetric).

Byte-identical files are always duplicates. Groups are the connected components of
the duplicate graph, so the slices of a scan chain into one group.

The search compares every image with every other (O(N^2) time) but never holds the N x N
matrix: a block of rows at a time, keeping the pairs above the threshold
(:func:`similar_pairs`); memory is the features (90 x 400 float32 per image: 88 variants and
2 turned-back thumbnails) plus one block.
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
VARIANTS = len(ANGLES) * 8  # rotated/flipped/turned variants per image; then TURNED turned-back thumbnails
TURNED = 2
# Only where the images share an anatomy: the mean thumbnail (centred) holds at least ANATOMY of the energy an image
# holds beside it (IQ-OTH/NCCD's mean CT slice: 0.67, still 0.39 with half as many of its slices again turned by 90
# degrees; LC25000's mean tile is flat: 0.0007, and the mean of N unrelated random pictures holds about 1/(N-1),
# under 0.2 from 7 on: their features are those of plain rows alone). There an image is taken as turned when the mean turned by 90/180/270 degrees (or that
# flipped) leaves at least TURNED_GAIN less of it unexplained (squared residual, each centred by its own mean) than
# the mean as it is: on IQ-OTH/NCCD, 97 of 100 training slices turned by 90 or 270 degrees and 100 of 100 turned by
# 180 (benchmarks/bench_turned.py), and 24 of its 1,097 upright slices (which are then compared more, never less:
# the data set's pairs stay the same).
ANATOMY = 0.2
TURNED_GAIN = 0.02


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
    """(N, 64, 64) uint8 thumbnails -> (N, VARIANTS + TURNED, SIDE*SIDE) unit vectors: row 0 the plain
    thumbnail, rows 1..VARIANTS-1 the other variants, the last TURNED rows the turned-back thumbnails
    (:func:`turned_back`; copies of row 0 for an image that does not look turned).

    Built in place: the result and temporaries of one :data:`CHUNK` of images, so peak memory is
    about the result's (N x 90 x 400 float32: 2.2 GB for LC25000's 15,000 lung images), with the
    values of the plain formula (``v - mean``, each variant centred and scaled to unit length).
    ``advance(1)`` is called after each image (a progress bar's)."""
    rots = np.empty((len(thumbs), len(ANGLES), SIDE, SIDE), np.uint8)
    for i, t in enumerate(thumbs):
        rots[i] = rotations(t)
        advance(1)
    return features_of_rotations(rots)


def features_of_rotations(rots: np.ndarray) -> np.ndarray:
    """:func:`features` of images whose :func:`rotations` are known: (N, len(ANGLES), SIDE, SIDE) uint8 ->
    (N, VARIANTS + TURNED, SIDE*SIDE) float32, centred by the mean variant of these N images."""
    n, k, d = len(rots), VARIANTS, SIDE * SIDE
    out = np.empty((n, k + TURNED, d), np.float32)
    for i0 in range(0, n, CHUNK):
        out[i0 : i0 + CHUNK, :k] = turns(rots[i0 : i0 + CHUNK]).reshape(-1, k, d)
    if n:
        mean = out[:, :k].mean(axis=0)  # the data set's mean variant; mean[:8]: the mean thumbnail turned/flipped
        out[:, :k] -= mean
        turned_back(out, mean[:8])
    for i0 in range(0, n, CHUNK):
        x = out[i0 : i0 + CHUNK]
        x -= x.mean(-1, keepdims=True)
        norm = np.linalg.norm(x, axis=-1, keepdims=True)
        norm[norm == 0] = 1.0
        x /= norm
    return out


def turned_back(out: np.ndarray, means: np.ndarray) -> None:
    """Fill the last :data:`TURNED` rows of ``out`` (N, VARIANTS + TURNED, d), whose row 0 is each plain thumbnail
    less the mean thumbnail ``means[0]`` (not yet scaled), in place.

    ``means`` are the mean thumbnail as it is, turned by 90/180/270 degrees, then flipped and turned the same
    (variants 0..7: :func:`turns` order). Where the images share an anatomy (:data:`ANATOMY`), for an image that
    one of the turned means, flipped or not, explains better than ``means[0]`` (:data:`TURNED_GAIN`), the rows
    are its thumbnail less that turned mean and less its mirror image (a CT slice is nearly symmetric left to
    right, so which of the two fits better is a toss-up, and only the one its source's variant was centred by
    matches it exactly); for any other image they are copies of row 0, so that they find nothing row 0 does
    not. Where the images share no anatomy (LC25000's tiles) no turn of their flat mean tells anything, and
    every image's rows are copies of row 0."""
    k, n = VARIANTS, len(out)
    plain = out[:, 0] - out[:, 0].mean(-1, keepdims=True)  # centred as the rows will be
    shift = (means[:1] - means).astype(np.float32)  # row 0 plus shift[e]: the thumbnail less means[e]
    shift -= shift.mean(-1, keepdims=True)
    left = np.einsum("nd,nd->n", plain, plain)  # squared residuals: as it is, and less each turned mean
    anatomy = means[0] - means[0].mean()
    out[:, k:] = out[:, :1]
    if not n or float(anatomy @ anatomy) < ANATOMY * float(left.mean()):
        return  # nothing the images share, to turn
    residual = left[:, None] + 2 * plain @ shift.T + np.einsum("ed,ed->e", shift, shift)[None]
    gain = np.divide(left[:, None] - residual, left[:, None], out=np.zeros_like(residual),
                     where=left[:, None] > 0)  # a blank image looks like nothing
    best = np.maximum(gain[:, 1:4], gain[:, 5:8])  # a turn by 90/180/270, flipped or not
    turn = best.argmax(1) + 1
    looks_turned = best[np.arange(n), turn - 1] >= TURNED_GAIN
    idx = np.nonzero(looks_turned)[0]
    out[idx, k] = out[idx, 0] + shift[turn[idx]]
    out[idx, k + 1] = out[idx, 0] + shift[turn[idx] + 4]


def _turned_probes(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The turned-back rows images are compared by besides row 0: (image, row) arrays, for the images that look
    turned (whose turned-back rows are not copies of row 0: :func:`turned_back`)."""
    k = VARIANTS
    turned = np.nonzero((feats[:, k:] != feats[:, :1]).any(axis=(1, 2)))[0].astype(np.int64)
    return np.tile(turned, TURNED), np.repeat(np.arange(k, k + TURNED, dtype=np.int64), len(turned))


def similar_pairs(feats: np.ndarray, threshold: float,
                  advance=lambda n=1: None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of images whose similarity is at least ``threshold``: (i, j, similarity) arrays,
    i < j, in (i, j) order. The similarity of a and b is the larger of (a's plain thumbnail, or its
    turned-back ones, against b's best row: variant or turned-back) and the other way round. Computed a
    block of rows at a time (at most :data:`BLOCK_BYTES` of correlations), so memory grows with the pairs
    found, not with N x N: the plain thumbnails, then the turned-back ones of the images that look turned
    (24 of IQ-OTH/NCCD's 1,097 slices, none of LC25000's tiles: a second pass that costs little).
    ``advance(rows)`` is called after each block of plain rows."""
    n, k, d = feats.shape
    everything = feats.reshape(n * k, d)
    block = int(max(1, min(512, BLOCK_BYTES // max(1, n * k * 4))))
    found = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))]

    def keep(part, owners):
        rows, cols = np.nonzero(part >= threshold)
        value = part[rows, cols]
        rows = owners[rows]
        off = rows != cols
        found.append((rows[off], cols[off], value[off]))

    for i0 in range(0, n, block):
        part = (feats[i0 : i0 + block, 0] @ everything.T).reshape(-1, n, k).max(-1)
        keep(part, np.arange(i0, i0 + len(part)))
        advance(len(part))
    owner, row = _turned_probes(feats)
    for p0 in range(0, len(owner), block):
        o = owner[p0 : p0 + block]
        keep((feats[o, row[p0 : p0 + block]] @ everything.T).reshape(-1, n, k).max(-1), o)
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
    and the similarity is :func:`similar_pairs`'s: the larger of a_i's plain (or turned-back) thumbnails against
    b_j's best row and b_j's plain (or turned-back) thumbnails against a_i's best row. Only a x b is compared
    (never a x a or b x b), a block of a's rows at a time (blocks of at most :data:`BLOCK_BYTES`), so memory
    grows with the pairs found, not with len(a) x len(b). ``advance(rows)`` is called after each block."""
    na, k, d = a.shape
    nb = len(b)
    if not na or not nb:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    b_all, b_plain = b.reshape(nb * k, d), b[:, 0]
    a_owner, a_row = _turned_probes(a)
    b_owner, b_row = _turned_probes(b)
    b_turned = b[b_owner, b_row]
    block = int(max(1, min(512, BLOCK_BYTES // max(1, nb * k * 4))))
    found = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))]
    for i0 in range(0, na, block):
        part = a[i0 : i0 + block]
        sim = (part[:, 0] @ b_all.T).reshape(len(part), nb, k).max(-1)  # a's plain against b's rows
        np.maximum(sim, (b_plain @ part.reshape(-1, d).T).reshape(nb, len(part), k).max(-1).T, out=sim)
        mine = (a_owner >= i0) & (a_owner < i0 + len(part))
        for p0 in range(0, int(mine.sum()), block):  # a's turned-back thumbnails against b's rows
            o, r = a_owner[mine][p0 : p0 + block], a_row[mine][p0 : p0 + block]
            np.maximum.at(sim, o - i0, (a[o, r] @ b_all.T).reshape(len(o), nb, k).max(-1))
        for p0 in range(0, len(b_owner), nb):  # b's turned-back thumbnails against a's rows
            rows = (b_turned[p0 : p0 + nb] @ part.reshape(-1, d).T).reshape(-1, len(part), k).max(-1)
            np.maximum.at(sim.T, b_owner[p0 : p0 + nb], rows)
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
