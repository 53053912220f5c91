"""Limits on sizes, memory and numeric options.

Plain Python (no pydantic): every command imports this. Schema checks of lungedge's files are in
:mod:`lungedge.schemas` (pydantic), reached through :func:`lungedge.validation.validate`.

Limits (environment variables, so every command and the library share them):

* ``LUNGEDGE_MAX_INPUT_SIZE`` -- the largest model input side in pixels (default 2048), for
  ``--image-size`` and for the ``size`` an ONNX file's metadata declares;
* ``LUNGEDGE_MAX_PIXELS`` -- the largest image (width x height) that is decoded at all (default
  89,478,485, Pillow's own decompression-bomb limit); larger images are listed as unreadable.
"""

from __future__ import annotations

import math
import os

from .errors import LungedgeError

DEFAULT_MAX_INPUT_SIZE = 2048
DEFAULT_MAX_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS's default


def _env_limit(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw)
        if value < 1:
            raise ValueError
    except ValueError:
        raise LungedgeError(f"{name} must be a positive whole number, got {raw!r}") from None
    return value


def max_input_size() -> int:
    return _env_limit("LUNGEDGE_MAX_INPUT_SIZE", DEFAULT_MAX_INPUT_SIZE)


def max_pixels() -> int:
    return _env_limit("LUNGEDGE_MAX_PIXELS", DEFAULT_MAX_PIXELS)


def check_input_size(size, what: str = "--image-size") -> int:
    """``size`` if it is a whole number of pixels in [8, LUNGEDGE_MAX_INPUT_SIZE]."""
    cap = max_input_size()
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= cap:
        raise LungedgeError(f"{what} must be a whole number of pixels from 8 to {cap} "
                            f"(LUNGEDGE_MAX_INPUT_SIZE), got {size!r}")
    return size


def check_positive(value, what: str, integer: bool = False, upper: float | None = None):
    """``value`` if it is finite, > 0 (and <= ``upper``); one line naming the option otherwise."""
    if value is None:
        return value
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
    if not bad and integer and int(value) != value:
        bad = True
    if not bad and upper is not None and value > upper:
        raise LungedgeError(f"{what} must be at most {upper:g}, got {value:g}")
    if bad:
        kind = "a whole number" if integer else "a finite number"
        raise LungedgeError(f"{what} must be {kind} greater than 0, got {value!r}")
    return value


MAX_SEED = 2**32 - 1  # what numpy, torch and tensorflow all take


def check_seed(seed, what: str = "--seed"):
    """``seed`` if it is a whole number from 0 to 2**32 - 1 (numpy's default_rng refuses a negative one)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise LungedgeError(f"{what} must be a whole number from 0 to {MAX_SEED}, got {seed!r}")
    return seed


MAX_THREADS = 1024
MAX_BATCH = 4096  # a batch is loaded (or a TensorRT profile allocated) whole: 10**6 images fill the memory


def check_batch(value: int, what: str) -> int:
    """A batch size from 1 to :data:`MAX_BATCH` (--max-batch, --opt-batch, train's --batch-size)."""
    if value < 1:
        raise LungedgeError(f"{what} must be at least 1, got {value}")
    if value > MAX_BATCH:
        raise LungedgeError(f"{what} must be at most {MAX_BATCH:,}, got {value}")
    return value


def check_threads(threads, what: str = "--threads"):
    """``threads`` if None (the library's default) or a whole number from 1 to 1024: 0 and -1 were taken
    silently (each library reads them its own way) and 10**12 was an internal error."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or not 1 <= threads <= MAX_THREADS):
        raise LungedgeError(f"{what} must be a whole number from 1 to {MAX_THREADS}, got {threads!r}")
    return threads


def too_large(width: int | None = None, height: int | None = None) -> str:
    size = f"{width}x{height} pixels is" if width else "it is"
    return f"image too large: {size} over the limit of {max_pixels():,} (LUNGEDGE_MAX_PIXELS); not decoded"


def check_image_pixels(width: int, height: int, where) -> None:
    """Refuse to decode an image above LUNGEDGE_MAX_PIXELS (a decompression bomb or a whole slide)."""
    cap = max_pixels()
    if width * height > cap:
        raise ValueError(too_large(width, height))


def available_memory() -> int | None:
    """Bytes of memory available now (Linux MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(nbytes: int, what: str, hint: str) -> None:
    """Refuse to start work that would need more than 80% of the memory available now."""
    avail = available_memory()
    if avail is not None and nbytes > 0.8 * avail:
        raise LungedgeError(f"{what} would need about {nbytes / 2**30:.1f} GiB of memory, "
                            f"{avail / 2**30:.1f} GiB is available; {hint}")

