"""The input check: say when an image is unlike the images the model was trained on.

A CT model shown a histopathology photo, a chest X-ray, a blank or an inverted image still answers
with a confident class, and that class means nothing. A handful of cheap, interpretable descriptors
of each image, computed from the model input itself (the normalisation undone with the artifact's
:class:`~lungedge.preprocess.Preprocessing`, so the pixels are those the model sees, at its size):

* ``colourfulness`` (Hasler & Süsstrunk 2003: std and mean of the opponent channels R-G and
  (R+G)/2-B): 0 for a grey CT slice; not available to a one-channel (GRAY) model, which sees no colour;
* the grey level (luma, 0-255) at its 1, 5, 25, 50, 75, 95 and 99 % quantiles, and its std;
* ``gradient``: the mean absolute difference between neighbouring grey levels (texture, noise).

:func:`fit` takes those of the reference images (``export``: the run's training part) and keeps, per
descriptor, their 0.5-99.5 % range widened on each side by :data:`MARGIN` of its width (at least
:data:`FLOOR` grey levels): the *envelope*. An image with any descriptor outside it is "unlike the
training images", and each reason names the descriptor, its value and the training images' range.
Plain NumPy, vectorised (a grey-level histogram per image gives the quantiles), so that it runs on a
Jetson without scikit-learn and costs little beside the inference it accompanies.

It catches images *of another kind* (colour, inverted, blank, noise, another modality with another
grey-level make-up); it is not a detector of subtle shift (another scanner or protocol of the same
kind of image passes it), and passing it does not make a prediction right. Measured
(``benchmarks/input_check_shift.py``, README): a narrower CT window, a 12x lower resolution, an 80 % crop,
a text overlay, a 90 degree turn or another stain hue each cost 10-51 points of balanced accuracy and are
flagged for at most 3 % of images (the set check below catches all but the turn and one of the two hues).

The *set check* looks at a whole evaluated set instead: images from another site can each sit inside the
envelope and still differ from the training images as a distribution. :func:`fit` also keeps each
descriptor's training distribution as :data:`SET_LEVELS` quantiles (``set_reference``, optional: files
written before it still work, and readers that predate it ignore it), and :meth:`InputCheck.compare_set`
measures, per descriptor, the Wasserstein-1 distance between the set's descriptors and that reference in
units of the training images' spread (their 5-95 % range, at least :data:`FLOOR`): "the set's values moved
by 0.4 of the training spread on average". The rule is a threshold on that effect size, not a p-value:
neighbouring CT slices of one scan are nearly copies, so a test of n images has far fewer than n
independent ones and any p-value would call the model's own test part shifted. For the same reason n
counts near-duplicate *groups* (a scan's slices, copies of a tile: the split's groups, or those ``eval``
finds in the test images' pixels) where they are known: the threshold is the larger of
:data:`SET_THRESHOLD` and :data:`SET_NOISE` / sqrt(groups), and a set of fewer than :data:`MIN_SET` images
or :data:`MIN_GROUPS` groups is not judged. A single scan differs from the training mix by itself
(IQ-OTH/NCCD: 24 of its 30 scans of 10 or more slices, all training images, lie beyond 0.25; README).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import LungedgeError

FORMAT = "lungedge-input-check/1"
QUANTILES = (1, 5, 25, 50, 75, 95, 99)  # grey-level percentiles per image
DESCRIPTORS = ("colourfulness", *(f"grey_p{q:02d}" for q in QUANTILES), "grey_std", "gradient")
LABELS = {"colourfulness": "colourfulness", "grey_std": "grey-level std", "gradient": "texture (mean gradient)",
          **{f"grey_p{q:02d}": f"grey level at {q} %" for q in QUANTILES}}
RANGE = (0.5, 99.5)  # percentiles of the reference images' descriptors that bound their range
MARGIN = 0.5  # the range is widened by this share of its width on each side (README: chosen by measurement)
FLOOR = 10.0  # ... and by at least this much (grey levels; colourfulness below ~15 is "not colourful"): a
# range of width 0 (a CT's colourfulness, its black background's low quantiles) gets some room
MIN_IMAGES = 20  # fewer reference images than this: no check (their range would be a few images' whim)
MAX_IMAGES = 2000  # at most this many reference images (evenly spaced) are decoded to fit it
GRID = 40  # points per side the descriptors are computed on (:func:`stride`)
CHUNK = 64  # images per descriptor pass (memory stays bounded on a large set)
GRAY_NOTE = "colourfulness not available: a one-channel (GRAY) model sees no colour"
SET_LEVELS = 41  # quantiles (0, 2.5, ..., 100 %) of each descriptor over the reference images, for the set check
SPREAD = (5, 95)  # percentiles of the reference descriptors whose distance is a descriptor's "training spread"
SET_THRESHOLD = 0.25  # a set differs where a descriptor moved by more than this share of its training spread
SET_NOISE = 2.0  # ... or, for a set of few near-duplicate groups, by more than SET_NOISE / sqrt(groups) (README)
MIN_SET = 20  # fewer evaluated images than this: the set is not judged
MIN_GROUPS = 5  # ... nor a set of fewer near-duplicate groups (one scan's slices are one group)


def stride(size: int) -> int:
    """Every how many pixels the descriptors look, both ways: a grid of at most :data:`GRID` x :data:`GRID`
    points whatever the input size (64 px: every 2nd pixel; 224 px: every 6th), so that the check costs
    little beside any model, and fit and flag always see the same grid."""
    return max(1, -(-size // GRID))


# grey level (ITU-R 601 luma, as PIL's convert("L")) and Hasler-Suesstrunk's opponent channels, rows over R, G, B
OPPONENT = np.array([[0.299, 0.587, 0.114], [1.0, -1.0, 0.0], [0.5, 0.5, -1.0]])


def _channels(x: np.ndarray, prep) -> tuple[np.ndarray, int, int]:
    """The input on the :func:`stride` grid as N x C x h*w float32, its channels as the input holds them."""
    s = stride(prep.size)
    x = np.asarray(x)
    if prep.input_layout == "NCHW":
        sub = x[:, :, ::s, ::s]
        n, c, h, w = sub.shape
        return np.ascontiguousarray(sub, dtype=np.float32).reshape(n, c, h * w), h, w
    sub = x[:, ::s, ::s, :]
    n, h, w, c = sub.shape
    return np.ascontiguousarray(sub, dtype=np.float32).reshape(n, h * w, c).transpose(0, 2, 1), h, w


def _opponents(x: np.ndarray, prep) -> tuple[np.ndarray, np.ndarray | None]:
    """(grey N x h x w, R-G and (R+G)/2-B as N x 2 x h*w, or None for a GRAY model), in 0-255 pixel units.

    Each is linear in the input channels (the normalisation ``(pixel * scale - mean) / std`` undone is
    ``pixel = x * std / scale + mean / scale``), so one small matrix product gives all three."""
    flat, h, w = _channels(x, prep)
    n = len(flat)
    if prep.input_dtype == "uint8":  # the input is the RGB pixels themselves
        a, b, order = np.ones(3), np.zeros(3), "RGB"
    else:
        a = np.asarray(prep.std, np.float64) / prep.scale
        b = np.asarray(prep.mean, np.float64) / prep.scale
        order = prep.channel_order
    if order == "GRAY":
        return (flat[:, 0] * np.float32(a[0]) + np.float32(b[0])).reshape(n, h, w), None
    colour_of = [2, 1, 0] if order == "BGR" else [0, 1, 2]  # input channel c holds colour colour_of[c]
    m = OPPONENT[:, colour_of] * a[None, :]
    const = (OPPONENT[:, colour_of] * b[None, :]).sum(axis=1)
    lin = np.matmul(m.astype(np.float32), flat)  # N x 3 x h*w
    lin += const.astype(np.float32)[None, :, None]
    return lin[:, 0].reshape(n, h, w), lin[:, 1:]


def _colourfulness(opp: np.ndarray) -> np.ndarray:
    """Hasler & Suesstrunk: sqrt(var(rg) + var(yb)) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2), per image."""
    mean = opp.mean(axis=2)
    var = opp.var(axis=2)
    return np.sqrt(var.sum(axis=1)) + 0.3 * np.sqrt((mean ** 2).sum(axis=1))


def _grey_quantiles(grey: np.ndarray) -> np.ndarray:
    """N x len(QUANTILES) grey-level percentiles, to one grey level, from one 256-bin histogram per image
    (a bincount over all images at once: no sort)."""
    n = len(grey)
    levels = np.clip(grey.reshape(n, -1) + np.float32(0.5), 0, 255.5).astype(np.int32)
    levels += (np.arange(n, dtype=np.int32) * 256)[:, None]
    cdf = np.bincount(levels.ravel(), minlength=n * 256).reshape(n, 256).cumsum(axis=1)
    targets = np.asarray(QUANTILES, np.float64)[None, :] / 100.0 * cdf[:, -1:]  # N x Q
    return (cdf[:, None, :] >= targets[:, :, None]).argmax(axis=2).astype(np.float64)


def describe(x: np.ndarray, prep) -> np.ndarray:
    """N x len(DESCRIPTORS) descriptors of a model input batch (NaN colourfulness for a GRAY model)."""
    grey, opp = _opponents(x, prep)
    colour = _colourfulness(opp) if opp is not None else np.full(len(grey), np.nan)
    gradient = (np.abs(np.diff(grey, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(grey, axis=2)).mean(axis=(1, 2))) / 2
    return np.column_stack([colour, _grey_quantiles(grey), grey.std(axis=(1, 2)), gradient]).astype(np.float64)


def describe_in_chunks(batches) -> np.ndarray:
    """:func:`describe` over an iterable of (input batch, preprocessing), stacked."""
    parts = [describe(x[i : i + CHUNK], prep) for x, prep in batches for i in range(0, len(x), CHUNK)]
    return np.concatenate(parts) if parts else np.empty((0, len(DESCRIPTORS)))


def fit(values: np.ndarray, fitted_on: str, margin: float = MARGIN, floor: float = FLOOR) -> dict:
    """The envelope of reference descriptors ``values`` (N x len(DESCRIPTORS)), as stamped into the
    ONNX metadata (``extra.input_check``). Descriptors that are NaN for every image (colourfulness of a
    GRAY model) are left out and named in ``not_available``."""
    values = np.asarray(values, np.float64)
    if len(values) < MIN_IMAGES:
        raise LungedgeError(f"{len(values)} reference images are fewer than {MIN_IMAGES}")
    names, training, envelope, missing = [], {}, {}, {}
    levels = np.linspace(0, 100, SET_LEVELS)
    quantiles, spread = {}, {}
    for k, name in enumerate(DESCRIPTORS):
        v = values[:, k]
        if np.isnan(v).all():
            missing[name] = GRAY_NOTE if name == "colourfulness" else "not available"
            continue
        v = v[~np.isnan(v)]
        lo, hi = np.percentile(v, RANGE)
        pad = max(margin * (hi - lo), floor)
        names.append(name)
        training[name] = [round(float(lo), 3), round(float(hi), 3)]
        envelope[name] = [round(float(lo - pad), 3), round(float(hi + pad), 3)]
        quantiles[name] = [round(float(q), 3) for q in np.percentile(v, levels)]
        s_lo, s_hi = np.percentile(v, SPREAD)
        spread[name] = round(max(float(s_hi - s_lo), floor), 3)
    out = {"format": FORMAT, "descriptors": names, "training_range": training, "envelope": envelope,
           "range_percentiles": list(RANGE), "margin": margin, "floor": floor,
           "fitted_on": fitted_on, "images": int(len(values)),
           "validation_flag_rate": None, "validation_images": None,
           "set_reference": {"levels": [round(float(lv), 3) for lv in levels], "quantiles": quantiles,
                             "spread": spread, "spread_percentiles": list(SPREAD)}}
    if missing:
        out["not_available"] = missing
    return out


@dataclass(frozen=True)
class InputCheck:
    """A fitted check, read from an artifact's metadata: :meth:`flag` a model input batch."""

    names: tuple[str, ...]
    columns: np.ndarray  # index of each name in DESCRIPTORS
    lo: np.ndarray
    hi: np.ndarray
    train_lo: np.ndarray
    train_hi: np.ndarray
    fitted_on: str
    levels: np.ndarray | None = None  # the set check's reference (None: the file predates it), :meth:`compare_set`
    reference: np.ndarray | None = None  # len(names) x len(levels) quantiles of the reference descriptors
    spread: np.ndarray | None = None  # per name: the reference images' 5-95 % range (at least FLOOR)

    @classmethod
    def from_meta(cls, meta: dict, where: str) -> "InputCheck":
        """From ``extra.input_check`` (validated by :mod:`lungedge.schemas` where pydantic is installed;
        here again in plain Python, one line naming ``where`` for anything unusable)."""
        try:
            names = tuple(meta["descriptors"])
            unknown = [n for n in names if n not in DESCRIPTORS]
            if unknown or not names:
                raise ValueError(f"descriptors: unknown {unknown[0]!r}" if unknown else "descriptors: none")
            env = np.array([meta["envelope"][n] for n in names], dtype=np.float64).reshape(len(names), 2)
            train = np.array([meta["training_range"][n] for n in names], dtype=np.float64).reshape(len(names), 2)
            if not (np.isfinite(env).all() and np.isfinite(train).all()) or (env[:, 0] > env[:, 1]).any():
                raise ValueError("envelope: every range must be two finite numbers, low <= high")
            return cls(names, np.array([DESCRIPTORS.index(n) for n in names]), env[:, 0], env[:, 1],
                       train[:, 0], train[:, 1], str(meta.get("fitted_on", "")),
                       *_set_reference(meta.get("set_reference"), names))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LungedgeError(f"{where}: not a usable input check ({exc})") from None

    def compare_set(self, values: np.ndarray, groups=None) -> dict:
        """How far a whole set's descriptors (``values``, N x len(DESCRIPTORS)) lie from the reference images',
        as the ``set_shift`` of an eval row: per descriptor, the Wasserstein-1 distance between the two
        distributions (the mean absolute difference of their quantile functions, on the stored quantile
        levels) divided by the training spread; ``differs`` where the largest exceeds the threshold
        (:data:`SET_THRESHOLD`, or :data:`SET_NOISE` / sqrt(g) for a set of few groups). ``groups``: each
        image's near-duplicate group (None: every image its own), g their number. Not judged (``judged``
        False, ``why``) for a file without the reference, a set under :data:`MIN_SET` images or
        :data:`MIN_GROUPS` groups."""
        v = np.asarray(values, np.float64)
        n = len(v)
        g = n if groups is None else len(set(groups))
        if self.reference is None:
            return {"judged": False, "images": n, "why": "the model file predates the set check (no "
                    "extra.input_check.set_reference; export it again to get one)"}
        if n < MIN_SET:
            return {"judged": False, "images": n, "why": f"{n} images are too few to judge as a set "
                    f"(at least {MIN_SET})"}
        if g < MIN_GROUPS:
            return {"judged": False, "images": n, "groups": g, "why": f"the {n} images are {g} near-duplicate "
                    f"group(s) (one scan's slices are one): too few to judge as a set (at least {MIN_GROUPS}); a "
                    "single scan differs from the training mix by itself"}
        v = v[:, self.columns]
        distance, medians = {}, {}
        for k, name in enumerate(self.names):
            col = v[:, k][~np.isnan(v[:, k])]  # NaN: colourfulness of a GRAY batch on an RGB-fitted check
            if len(col) < MIN_SET:
                continue
            q = np.percentile(col, self.levels)
            w = np.trapezoid(np.abs(q - self.reference[k]), self.levels / 100.0)
            distance[name] = round(float(w / self.spread[k]), 3)
            medians[name] = [round(float(np.median(col)), 3),
                             round(float(np.interp(50.0, self.levels, self.reference[k])), 3)]
        threshold = round(max(SET_THRESHOLD, SET_NOISE / np.sqrt(g)), 3)
        shifted = sorted((d for d in distance if distance[d] > threshold), key=lambda d: -distance[d])
        return {"judged": True, "images": n, "groups": g, "statistic": max(distance.values(), default=0.0),
                "threshold": threshold, "differs": bool(shifted), "shifted": shifted, "distance": distance,
                "median": medians, "method": "Wasserstein-1 / training 5-95 % range, per descriptor"}

    def flag_values(self, values: np.ndarray) -> list[dict]:
        """One ``{"unlike_training": bool, "reasons": [...]}`` per row of descriptors."""
        v = np.asarray(values, np.float64)[:, self.columns]
        outside = (v < self.lo) | (v > self.hi)  # NaN (a GRAY batch on an RGB-fitted check) is never outside
        out = []
        for row, bad in zip(v, outside):
            reasons = [f"{LABELS[self.names[k]]} {row[k]:.1f}, training images "
                       f"{self.train_lo[k]:.1f}–{self.train_hi[k]:.1f}" for k in np.flatnonzero(bad)]
            out.append({"unlike_training": bool(reasons), "reasons": reasons})
        return out

    def flag(self, x: np.ndarray, prep) -> list[dict]:
        """:meth:`flag_values` of a model input batch (``prep``: the artifact's preprocessing)."""
        return self.flag_values(describe_in_chunks([(x, prep)]))


def _set_reference(ref, names: tuple[str, ...]) -> tuple:
    """(levels, quantiles, spread) of ``extra.input_check.set_reference`` for ``names``, (None, None, None)
    where the file has none; ValueError naming the field for anything unusable."""
    if ref is None:
        return None, None, None
    levels = np.asarray(ref["levels"], dtype=np.float64)
    if levels.ndim != 1 or len(levels) < 3 or not np.isfinite(levels).all() or (np.diff(levels) <= 0).any() \
            or levels[0] < 0 or levels[-1] > 100:
        raise ValueError("set_reference.levels: must be at least 3 increasing percentiles in 0-100")
    rows = [ref["quantiles"][n] for n in names]
    bad = ValueError("set_reference.quantiles: one non-decreasing finite value per level for every descriptor")
    if any(not isinstance(r, list) or len(r) != len(levels) for r in rows):
        raise bad
    quantiles = np.array(rows, dtype=np.float64)
    if not np.isfinite(quantiles).all() or (np.diff(quantiles, axis=1) < 0).any():
        raise bad
    spread = np.array([ref["spread"][n] for n in names], dtype=np.float64)
    if not (np.isfinite(spread).all() and (spread > 0).all()):
        raise ValueError("set_reference.spread: must be positive finite numbers")
    return levels, quantiles, spread


def set_line(shift: dict | None, who: str, shown: int = 3) -> str | None:
    """One line on an evaluated set the set check finds unlike the training images, naming the descriptors
    and by how much; a note where it was not judged (a set too small, a file predating the check); None for
    a set like the training images or an artifact without an input check."""
    if not shift:
        return None
    if not shift["judged"]:
        return f"note {who}: no set check: {shift['why']}"
    if not shift["differs"]:
        return None
    parts = [f"{LABELS[d]} by {shift['distance'][d]:.2f} (median {shift['median'][d][0]:.1f}, training "
             f"{shift['median'][d][1]:.1f})" for d in shift["shifted"][:shown]]
    more = f" and {len(shift['shifted']) - shown} more" if len(shift["shifted"]) > shown else ""
    return (f"WARNING {who}: these {shift['images']} images differ as a set from the training images: "
            f"{', '.join(parts)}{more} (Wasserstein distance in training spreads; threshold "
            f"{shift['threshold']:.2f}): they may come from another scanner, protocol or site, and the model's "
            "accuracy on them may be far from its test figures; measure it on labelled images from there")


def validation_rate(check: dict, values: np.ndarray, where: str) -> dict:
    """``check`` with the share of ``values`` (held-out images of the same kind) it flags, and how far they lie
    from the reference images as a set (``set_reference.validation_distance``) where there are enough."""
    fitted = InputCheck.from_meta(check, "input check")
    flags = fitted.flag_values(values)
    n = sum(f["unlike_training"] for f in flags)
    out = {**check, "validation_flag_rate": round(n / len(flags), 4) if flags else None,
           "validation_images": len(flags), "validated_on": where}
    shift = fitted.compare_set(values)
    if shift["judged"]:  # how far the held-out part lies, against the threshold
        out["set_reference"] = {**check["set_reference"], "validation_distance": shift["statistic"],
                                "validation_threshold": shift["threshold"]}
    return out


def summary_line(flags: list[dict], names: list[str], shown: int = 3) -> str:
    """'2 of 40 images (5.0 %) unlike the training images: a.png (colourfulness 38.2, ...), b.png (...)'."""
    hit = [(n, f) for n, f in zip(names, flags) if f["unlike_training"]]
    head = ", ".join(f"{n} ({f['reasons'][0]})" for n, f in hit[:shown])
    more = f" and {len(hit) - shown} more" if len(hit) > shown else ""
    share = len(hit) / max(len(flags), 1)
    return f"{len(hit)} of {len(flags)} images ({share:.1%}) unlike the training images: {head}{more}"
