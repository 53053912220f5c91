"""The one preprocessing definition every step uses.

Training, export, calibration and every runner turn an image file into a model
input through :class:`Preprocessing`, and the parameters travel with each artifact
(checkpoint metadata, ONNX ``metadata_props``) as :meth:`Preprocessing.to_dict`.

Decode -> RGB (grayscale is replicated to 3 channels) -> centre-crop to a square on
the shorter side -> resize to ``size`` x ``size`` (bilinear) -> scale -> normalise.

Fast path for files (:meth:`Preprocessing.load`): a JPEG is decoded at a reduced scale where the
result still covers twice ``size`` (libjpeg's DCT scaling, Pillow's ``draft``; the bilinear resize
then still averages over 2x2 source pixels or more), a grayscale image stays
one channel through crop and resize, and scale/mean/std are applied once per output channel,
straight into the batch (the gray channel replicated there); the files of a batch are decoded on
a few threads. Same pixels as the full decode within interpolation tolerance (README: maximum
difference); images that are not JPEG give exactly the same values.
Every image goes through the same steps whatever its aspect ratio: a non-square
CT slice is neither padded with tell-tale bars nor squashed, so an image's shape
cannot reveal its class.
"""

from __future__ import annotations

import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import LungedgeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageReadError(LungedgeError):
    """An image file that cannot be decoded (not an image, truncated, ...)."""


DICOM_ADVICE = ("lungedge reads image files (PNG, JPEG, TIFF, BMP); export the slices as PNG with the window "
                "(level and width) the training images were made with")


def not_an_image(head: bytes) -> str:
    """What a file Pillow cannot identify holds instead of an image, from its first bytes (at least 132): a
    DICOM file, a Git LFS pointer (a clone without ``git lfs pull``), an HTML page (a failed download), nothing."""
    if not head:
        return "empty file (0 bytes): an interrupted download or copy?"
    if head[128:132] == b"DICM":
        return f"a DICOM file; {DICOM_ADVICE}"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the image: run `git lfs pull`"
    low = head[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if low.startswith((b"<!doctype html", b"<html")):
        return "an HTML page, not an image (an error or login page saved under the image's name?)"
    return "not an image file"


def pillow():
    """PIL.Image, with Pillow's own decompression-bomb warning muted: :func:`check_pixels` decides, and
    Pillow's error (at twice its limit) is reported as :func:`lungedge.limits.too_large`."""
    import warnings

    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    return Image


def check_pixels(img) -> None:
    """ValueError for an image above ``LUNGEDGE_MAX_PIXELS`` (checked from the header, before decoding)."""
    from .limits import check_image_pixels

    check_image_pixels(*img.size, getattr(img, "filename", None))


def open_image(path: str | Path):
    """Decode an image fully and return a PIL image; raise :class:`ImageReadError` otherwise."""
    return read_image(path)


WIDE_MODES = ("I;16", "I;16B", "I;16L", "I", "F")  # more than 8 bits a pixel: stretched by the image's own range
GRAY_MODES = ("L", "1", *WIDE_MODES)


def is_regular_file(path: str | Path) -> bool:
    """Whether ``path`` (symlinks followed) is a regular file: a FIFO blocks and a device (/dev/zero) never ends
    when read. OSError (missing, dangling or looping symlink, permission denied) as :func:`os.stat` raises it."""
    return stat.S_ISREG(os.stat(path).st_mode)


def read_image(path: str | Path, size: int | None = None):
    """Decode like :func:`open_image`; a JPEG at the smallest DCT scale (1/2, 1/4, 1/8) whose
    centre square still has at least 2 x ``size`` pixels a side (none: the full decode)."""
    return read_image_turn(path, size)[0]


def read_image_turn(path: str | Path, size: int | None = None):
    """(:func:`read_image`'s image, its :func:`exif_turn`): the EXIF tag comes from the header this one open
    already parsed (a few microseconds), so a caller that notes turned images opens no file twice."""
    from PIL import UnidentifiedImageError

    Image = pillow()

    try:
        if not is_regular_file(path):
            raise ImageReadError(f"{path}: not a regular file")
        with Image.open(path) as img:
            check_pixels(img)  # a decompression bomb is refused before it is decoded
            if size and img.format == "JPEG":
                w, h = img.size
                side = min(w, h)
                img.draft(img.mode, (-(-w * 2 * size // side), -(-h * 2 * size // side)))
            img.load()  # force a full decode: truncated files fail here, not later
            turn = exif_turn(img)
            # a JPEG (one frame) is kept as decoded: leaving the block closes its file, not its pixels;
            # other formats may hold a handle of their own (TIFF) until the image goes: a copy, then
            return (img if img.format == "JPEG" else img.copy()), turn
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except UnidentifiedImageError:
        try:
            with open(path, "rb") as fh:
                head = fh.read(512)
        except OSError:
            head = b"?"
        raise ImageReadError(f"{path}: {not_an_image(head)}") from None
    except Image.DecompressionBombError:
        from .limits import too_large

        raise ImageReadError(f"{path}: unreadable image ({too_large()})") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated / corrupt data
        raise ImageReadError(f"{path}: unreadable image ({exc})") from None


# EXIF Orientation (tag 0x0112) -> how a viewer shows the stored pixels (1: as stored)
EXIF_TURNS = {2: "mirrored", 3: "turned 180°", 4: "flipped upside down", 5: "turned 90° and mirrored",
              6: "turned 90°", 7: "turned 90° and mirrored", 8: "turned 90°"}


def exif_turn(img) -> str | None:
    """How photo viewers show the open image ``img`` against its stored pixels, from its EXIF Orientation
    ("turned 90°"), or None (no tag, upright, unreadable tag). lungedge, like torchvision's and Keras' image
    loaders, reads the pixels as stored, in training and at inference alike; a phone photo of a screen may
    carry such a tag. Read from the header the open already parsed: no second read of the file."""
    try:
        return EXIF_TURNS.get(img.getexif().get(0x0112))
    except Exception:  # noqa: BLE001 - only a note: a damaged EXIF block does not make the image unreadable
        return None


def to_gray_or_rgb(img):
    """8-bit "L" for grayscale images (16-bit, 32-bit and float stretched as :func:`to_rgb` does), else "RGB"."""
    if img.mode == "L":
        return img
    if img.mode in GRAY_MODES:
        return to_rgb(img).convert("L")
    return to_rgb(img)


def to_gray(img):
    """8-bit "L" of any image, 16-bit stretched as :func:`to_rgb` does: the intensities a one-channel model sees
    (``convert("L")`` alone clips 16-bit pixels, and a CT slice turns all white)."""
    img = to_gray_or_rgb(img)
    return img if img.mode == "L" else img.convert("L")


def to_rgb(img):
    """Any PIL mode -> 8-bit RGB; grayscale is replicated to three channels."""
    if img.mode == "RGB":
        return img
    if img.mode in WIDE_MODES:  # 16/32-bit integers and floats (a TIFF of Hounsfield units) alike
        arr = np.asarray(img, dtype=np.float64)
        finite = np.isfinite(arr)  # a float image's NaN / inf pixels count as its lowest value
        lo, hi = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0.0, 0.0)
        arr = np.where(finite, arr, lo)
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        from PIL import Image

        img = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    return img.convert("RGB")


CHANNEL_ORDERS = ("RGB", "BGR", "GRAY")
RESIZES = ("center-crop-bilinear", "stretch-bilinear")
INPUT_DTYPES = ("float32", "uint8")  # uint8: the ONNX takes N x H x W x 3 RGB pixels and normalises inside (#14)


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a model input.

    ``scale`` multiplies the 0..255 pixel values before ``(x - mean) / std``;
    ``channel_order`` is "RGB", "BGR" or "GRAY" (one channel: the image's luma, ``mean[0]``/``std[0]``);
    ``layout`` is "NCHW" or "NHWC"; ``resize`` is "center-crop-bilinear" (the centre square, resized)
    or "stretch-bilinear" (the whole image resized to a square). The defaults are torchvision's
    ImageNet normalisation. ``input_dtype`` "uint8" (an ONNX exported with ``--uint8-input``): the
    model input is the resized uint8 RGB pixels, N x H x W x 3, and scale/mean/std/order/layout are
    applied inside the graph, so :meth:`normalize` only stacks pixels.
    """

    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    scale: float = 1.0 / 255.0
    channel_order: str = "RGB"
    layout: str = "NCHW"
    resize: str = field(default="center-crop-bilinear")
    input_dtype: str = "float32"

    def __post_init__(self):
        if self.size < 8:
            raise LungedgeError(f"image size {self.size} is too small (at least 8 pixels)")
        from .limits import max_input_size

        if self.size > max_input_size():  # e.g. an ONNX whose metadata declares size 100000
            raise LungedgeError(f"image size {self.size} is too large (at most {max_input_size()} pixels; "
                                "LUNGEDGE_MAX_INPUT_SIZE raises the limit)")
        if self.channel_order not in CHANNEL_ORDERS:
            raise LungedgeError(f"unknown channel order {self.channel_order!r} (RGB, BGR or GRAY)")
        if self.layout not in ("NCHW", "NHWC"):
            raise LungedgeError(f"unknown layout {self.layout!r} (NCHW or NHWC)")
        if self.resize not in RESIZES:
            raise LungedgeError(f"unknown resize method {self.resize!r} ({' or '.join(RESIZES)})")
        if self.input_dtype not in INPUT_DTYPES:
            raise LungedgeError(f"unknown input dtype {self.input_dtype!r} ({' or '.join(INPUT_DTYPES)})")
        if self.input_dtype == "uint8" and self.channel_order == "GRAY":
            raise LungedgeError("a uint8-input model takes RGB pixels: not for a one-channel (GRAY) model")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    # -- metadata round trip ------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    def with_size(self, size: int) -> "Preprocessing":
        d = self.to_dict()
        d["size"] = int(size)
        return Preprocessing.from_dict(d)

    @property
    def channels(self) -> int:
        return 1 if self.channel_order == "GRAY" else 3

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image, without the batch axis."""
        if self.input_dtype == "uint8":
            return (self.size, self.size, 3)
        c = self.channels
        return (c, self.size, self.size) if self.layout == "NCHW" else (self.size, self.size, c)

    @property
    def input_layout(self) -> str:
        """The layout of the model input: uint8 pixels are NHWC whatever the network's own layout."""
        return "NHWC" if self.input_dtype == "uint8" else self.layout

    def as_float_input(self) -> "Preprocessing":
        """The same spec with a float32 input (what the network inside a uint8-input graph takes)."""
        d = self.to_dict()
        d["input_dtype"] = "float32"
        return Preprocessing.from_dict(d)

    # -- the transform itself -----------------------------------------------
    def _resized(self, img):
        """Centre square resized to size x size (bilinear), in the image's own mode (L or RGB)."""
        from PIL import Image

        w, h = img.size
        if self.resize == "stretch-bilinear":
            return img if (w, h) == (self.size, self.size) else img.resize((self.size, self.size), Image.BILINEAR)
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        if side != w or side != h:
            img = img.crop((left, top, left + side, top + side))  # not resize's box: its filter reads outside
        return img if side == self.size else img.resize((self.size, self.size), Image.BILINEAR)

    def pixels(self, img) -> np.ndarray:
        """PIL image -> uint8 HxWx3 RGB array at the model's size (before normalisation)."""
        out = np.asarray(self._resized(to_gray_or_rgb(img)), dtype=np.uint8)
        return np.repeat(out[..., None], 3, axis=-1) if out.ndim == 2 else out

    def gray_or_rgb_pixels(self, img) -> np.ndarray:
        """PIL image -> uint8 HxW (grayscale) or HxWx3 (RGB) at the model's size."""
        img = to_gray_or_rgb(img)
        if self.channel_order == "GRAY" and img.mode != "L":
            img = img.convert("L")
        return np.asarray(self._resized(img), dtype=np.uint8)

    def normalize(self, pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 (..., H, W, 3) RGB, or (..., H, W) grayscale, -> float32 model input in this spec's
        order and layout (grayscale is replicated to the three channels). ``out``: an array of the
        result's shape and dtype to write into (one slot of a batch: no copy to stack)."""
        pixels = np.asarray(pixels)
        if self.input_dtype == "uint8":  # the graph normalises: RGB pixels, grayscale replicated
            if pixels.dtype != np.uint8:
                raise LungedgeError(f"a uint8-input model takes uint8 pixels, got {pixels.dtype.name}")
            if pixels.ndim == 2 or pixels.shape[-1] != 3:
                if out is not None:
                    out[...] = pixels[..., None]
                    return out
                pixels = np.repeat(pixels[..., None], 3, axis=-1)
            return _into(out, np.ascontiguousarray(pixels))
        if self.channel_order == "GRAY":
            return _into(out, self._normalize_gray(pixels))
        gray = pixels.ndim == 2 or pixels.shape[-1] != 3
        lead, (h, w) = pixels.shape[: (-2 if gray else -3)], pixels.shape[(-2 if gray else -3):][:2]
        shape = (*lead, 3, h, w) if self.layout == "NCHW" else (*lead, h, w, 3)
        if out is None:
            out = np.empty(shape, np.float32)
        elif out.shape != shape or out.dtype != np.float32:
            raise ValueError(f"normalize: out is {out.dtype.name}{out.shape}, needs float32{shape}")
        x = pixels.astype(np.float32)
        x *= np.float32(self.scale)
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        src = [2, 1, 0] if self.channel_order == "BGR" else [0, 1, 2]
        for c in range(3):  # (x * scale - mean) / std in float32, written straight into the slot
            dst = out[..., c, :, :] if self.layout == "NCHW" else out[..., c]
            np.subtract(x if gray else x[..., src[c]], mean[c], out=dst)
            np.divide(dst, std[c], out=dst)
        return out

    def _normalize_gray(self, pixels: np.ndarray) -> np.ndarray:
        """One-channel input: RGB pixels become their luma (as PIL's ``convert("L")``), then the formula."""
        if pixels.ndim >= 3 and pixels.shape[-1] == 3:
            p = pixels.astype(np.int32) if pixels.dtype == np.uint8 else pixels.astype(np.float32)
            luma = p[..., 0] * 299 + p[..., 1] * 587 + p[..., 2] * 114
            pixels = (luma + 500) // 1000 if pixels.dtype == np.uint8 else luma / 1000.0
        x = (pixels.astype(np.float32) * np.float32(self.scale) - np.float32(self.mean[0])) / np.float32(self.std[0])
        return np.ascontiguousarray(x[..., None, :, :] if self.layout == "NCHW" else x[..., None], dtype=np.float32)

    def __call__(self, img) -> np.ndarray:
        """PIL image -> float32 input for one image (no batch axis)."""
        return self.normalize(self.gray_or_rgb_pixels(img))

    def load_pixels(self, path: str | Path) -> np.ndarray:
        """Image file -> uint8 HxW (grayscale) or HxWx3 (RGB) at the model's size, decoded fast."""
        return self._load_turn(path)[0]

    def _load_turn(self, path: str | Path) -> tuple[np.ndarray, str | None]:
        """(:meth:`load_pixels`, the file's :func:`exif_turn`), from the one decode."""
        img, turn = read_image_turn(path, self.size)
        return self.gray_or_rgb_pixels(img), turn

    def load(self, path: str | Path) -> np.ndarray:
        """Image file -> float32 input for one image; :class:`ImageReadError` if unreadable."""
        return self.normalize(self.load_pixels(path))

    def load_batch(self, paths, turns: list | None = None) -> np.ndarray:
        """Image files -> one batch, each image normalised straight into its slot. Two or more files are
        decoded and resized on a few threads at once (Pillow releases the GIL while it decodes and
        resizes); the first unreadable file raises :class:`ImageReadError`, as one at a time would.
        ``turns``: a list that gets each file's :func:`exif_turn` (None for most), in order, read from the
        same decode (predict, eval and their notes: the model sees such images unturned)."""
        paths = list(paths)
        out = np.empty((len(paths), *self.input_shape), self.input_dtype)
        found = []
        if len(paths) > 1:
            for i, (pixels, turn) in enumerate(decode_pool().map(self._load_turn, paths)):
                self.normalize(pixels, out=out[i])
                found.append(turn)
        elif paths:
            pixels, turn = self._load_turn(paths[0])
            self.normalize(pixels, out=out[0])
            found.append(turn)
        if turns is not None:  # only once every file was read: a failed batch adds nothing
            turns += found
        return out

    def load_readable(self, paths, turns: list | None = None
                      ) -> tuple[list[int], np.ndarray | None, list[tuple[Path, str]]]:
        """:meth:`load_batch`, leaving out each file that cannot be read (missing, corrupt, not a regular
        file, over LUNGEDGE_MAX_PIXELS) instead of failing all: (indices of the files read, their batch
        or None when none was, (path, reason) of each file left out). ``turns`` gets the :func:`exif_turn`
        of each file read, in the order of the indices."""
        paths = list(paths)
        try:
            return list(range(len(paths))), self.load_batch(paths, turns), []
        except ImageReadError:
            pass
        keep, xs, skipped = [], [], []
        for i, path in enumerate(paths):
            try:
                xs.append(self.load_batch([path], turns))
                keep.append(i)
            except ImageReadError as exc:
                skipped.append((path, str(exc).removeprefix(f"{path}: ")))
        return keep, (np.concatenate(xs) if xs else None), skipped


def _into(out: np.ndarray | None, x: np.ndarray) -> np.ndarray:
    if out is None:
        return x
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"normalize: out is {out.dtype.name}{out.shape}, needs {x.dtype.name}{x.shape}")
    out[...] = x
    return out


MAX_DECODE_THREADS = 8
_POOL: tuple[int, object] | None = None


def decode_threads() -> int:
    """Threads that decode a batch: the CPUs this process may use, at most :data:`MAX_DECODE_THREADS`."""
    import os

    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_DECODE_THREADS))


def decode_pool():
    """The process's decode thread pool (made again in a forked child, whose copy has no threads)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(decode_threads(), thread_name_prefix="lungedge-decode"))
    return _POOL[1]
