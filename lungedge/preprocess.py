"""The one preprocessing definition every step uses.

Training, export, calibration and every runner turn an image file into a model
input through :class:`Preprocessing`, and the parameters travel with each artifact
(checkpoint metadata, ONNX ``metadata_props``) as :meth:`Preprocessing.to_dict`.

Decode -> RGB (grayscale is replicated to 3 channels) -> centre-crop to a square on
the shorter side -> resize to ``size`` x ``size`` (bilinear) -> scale -> normalise.
Every image goes through the same steps whatever its aspect ratio: a non-square
CT slice is neither padded with tell-tale bars nor squashed, so an image's shape
cannot reveal its class.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import LungedgeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageReadError(LungedgeError):
    """An image file that cannot be decoded (not an image, truncated, ...)."""


def open_image(path: str | Path):
    """Decode an image fully and return a PIL image; raise :class:`ImageReadError` otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()  # force a full decode: truncated files fail here, not later
            return img.copy()
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not an image file") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated / corrupt data
        raise ImageReadError(f"{path}: unreadable image ({exc})") from None


def to_rgb(img):
    """Any PIL mode -> 8-bit RGB; grayscale is replicated to three channels."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        from PIL import Image

        img = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    return img.convert("RGB")


def center_square(img):
    """Crop the largest centred square (no padding, no distortion)."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a model input.

    ``scale`` multiplies the 0..255 pixel values before ``(x - mean) / std``;
    ``channel_order`` is "RGB" or "BGR"; ``layout`` is "NCHW" or "NHWC".
    The defaults are torchvision's ImageNet normalisation.
    """

    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    scale: float = 1.0 / 255.0
    channel_order: str = "RGB"
    layout: str = "NCHW"
    resize: str = field(default="center-crop-bilinear")

    def __post_init__(self):
        if self.size < 8:
            raise LungedgeError(f"image size {self.size} is too small (at least 8 pixels)")
        if self.channel_order not in ("RGB", "BGR"):
            raise LungedgeError(f"unknown channel order {self.channel_order!r} (RGB or BGR)")
        if self.layout not in ("NCHW", "NHWC"):
            raise LungedgeError(f"unknown layout {self.layout!r} (NCHW or NHWC)")
        if self.resize != "center-crop-bilinear":
            raise LungedgeError(f"unknown resize method {self.resize!r}")
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
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image, without the batch axis."""
        return (3, self.size, self.size) if self.layout == "NCHW" else (self.size, self.size, 3)

    # -- the transform itself -----------------------------------------------
    def pixels(self, img) -> np.ndarray:
        """PIL image -> uint8 HxWx3 RGB array at the model's size (before normalisation)."""
        from PIL import Image

        img = center_square(to_rgb(img))
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (..., H, W, 3) RGB -> float32 model input in this spec's order and layout."""
        x = pixels.astype(np.float32) * np.float32(self.scale)
        if self.channel_order == "BGR":
            x = x[..., ::-1]
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.layout == "NCHW":
            x = np.moveaxis(x, -1, -3)
        return np.ascontiguousarray(x, dtype=np.float32)

    def __call__(self, img) -> np.ndarray:
        """PIL image -> float32 input for one image (no batch axis)."""
        return self.normalize(self.pixels(img))

    def load(self, path: str | Path) -> np.ndarray:
        """Image file -> float32 input for one image; :class:`ImageReadError` if unreadable."""
        return self(open_image(path))

    def load_batch(self, paths) -> np.ndarray:
        return np.stack([self.load(p) for p in paths]) if paths else np.zeros((0, *self.input_shape), np.float32)
