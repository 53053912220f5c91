"""Read every image of a data set once: hash, header, full decode and a small thumbnail."""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..preprocess import check_pixels, exif_turn, is_regular_file, not_an_image, pillow, to_gray
from ..limits import too_large

THUMB = 64  # side of the grayscale thumbnail kept for near-duplicate search


@dataclass
class ScannedImage:
    path: str
    label: str
    sha256: str
    nbytes: int
    size: tuple[int, int] | None = None  # (width, height)
    mode: str | None = None
    error: str | None = None
    thumb: np.ndarray | None = None  # THUMB x THUMB uint8 grayscale (whole image, stretched)
    turn: str | None = None  # how photo viewers turn it by its EXIF orientation (preprocess.exif_turn); None: as stored

    @property
    def ok(self) -> bool:
        return self.error is None


def scan_file(root: Path, path: str, label: str, thumb: bool = True) -> ScannedImage:
    from PIL import UnidentifiedImageError

    Image = pillow()

    try:
        if not is_regular_file(root / path):  # a FIFO or a device: reading would block or never end
            return ScannedImage(path, label, "", 0, error="not a regular file")
        data = (root / path).read_bytes()
    except OSError as exc:  # dangling or looping symlink, permission denied, a folder named like an image
        return ScannedImage(path, label, "", 0, error=f"cannot read the file: {exc.strerror or type(exc).__name__}")
    rec = ScannedImage(path, label, hashlib.sha256(data).hexdigest(), len(data))
    try:
        with Image.open(io.BytesIO(data)) as img:
            rec.size, rec.mode = img.size, img.mode
            check_pixels(img)  # a decompression bomb is listed as unreadable, not decoded
            if thumb:
                img.draft("L", (THUMB * 2, THUMB * 2))  # JPEG: decode at reduced scale, still to the end
            img.load()
            rec.turn = exif_turn(img)  # from the header this open parsed: no second read
            if thumb:
                rec.thumb = np.asarray(to_gray(img).resize((THUMB, THUMB), Image.BILINEAR), dtype=np.uint8)
    except UnidentifiedImageError:
        rec.error = not_an_image(data[:512])
    except Image.DecompressionBombError:
        rec.error = f"unreadable image: {too_large()}"
    except (OSError, SyntaxError, ValueError) as exc:
        rec.error = f"unreadable image: {exc}"
    return rec


def scan(root: Path, files, thumbs: bool = True, progress=None, workers: int | None = None) -> list[ScannedImage]:
    """Scan ``files`` (objects with ``path`` and ``label``) under ``root``, in order.

    Decoding runs on a thread pool (Pillow releases the GIL while it decodes).
    ``progress`` is called once per finished file.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(scan_file, root, f.path, f.label, thumbs) for f in files]
        out = []
        for fut in futures:
            out.append(fut.result())
            if progress:
                progress()
    return out


def fingerprint(records) -> str:
    """Data set fingerprint: SHA-256 over the sorted (path, label, file hash) lines."""
    h = hashlib.sha256()
    for line in sorted(f"{r.path}\t{r.label}\t{r.sha256}\n" for r in records):
        h.update(line.encode("utf-8"))
    return h.hexdigest()
