"""What a file really holds, from its first bytes: the one place that tells a model file from what
only looks like one (a Git LFS pointer, an empty download, an HTML error page saved as ``.h5``,
random bytes) and says so in one line, before any framework tries to read it.

:func:`sniff` names the container (``hdf5``, ``torchscript``, ``torch-export``, ``torch-zip``,
``torch-pickle``, ``safetensors``, ``keras-zip``, ``onnx``, ``zip``) or what the file is instead (``empty``,
``lfs-pointer``, ``html``, ``text``, ``unknown``); :func:`check_model_file` raises
:class:`~lungedge.errors.LungedgeError` for the latter.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from ..errors import LungedgeError

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"
LFS_PREFIX = b"version https://git-lfs"
HEAD = 4096

READS = "PyTorch (.pth/.pt/.pt2/.safetensors), Keras (.h5/.keras) or ONNX (.onnx)"
SAFETENSORS_SUFFIX = ".safetensors"
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header


def _head(path: Path, n: int = HEAD) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except FileNotFoundError:
        raise LungedgeError(f"file not found: {path}") from None
    except OSError as exc:
        raise LungedgeError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _zip_kind(path: Path) -> str:
    """torchscript | torch-export | torch-zip | keras-zip | zip, from the archive's member names."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return "unknown"  # a zip header on a truncated or damaged file
    tails = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if "archive_format" in tails or any(t.startswith("models/") and t.endswith(".json") for t in tails):
        return "torch-export"
    if any(t.startswith("code/") for t in tails) and "constants.pkl" in tails:
        return "torchscript"
    if "data.pkl" in tails:
        return "torch-zip"
    if "config.json" in names and any(n.endswith(".weights.h5") or n == "model.weights.h5" for n in names):
        return "keras-zip"
    return "zip"


def _looks_like_onnx(head: bytes) -> bool:
    """ModelProto starts with ir_version (field 1, varint) then another known field."""
    return (len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 30
            and head[2] in (0x12, 0x1A, 0x22, 0x2A, 0x32, 0x3A, 0x42, 0x52, 0x72))


def _looks_like_safetensors(head: bytes) -> bool:
    """An 8-byte little-endian header length (zero bytes in it: no text) followed by the JSON header's ``{`` and
    what may follow it in JSON (``"``, ``}``, white space); a header damaged past that is found by its suffix
    (:func:`problem`)."""
    return (len(head) >= 9 and head[8:9] == b"{" and b"\0" in head[:8]
            and head[9:10] in (b"", b'"', b"}", b" ", b"\t", b"\n", b"\r"))


def safetensors_problem(path: Path) -> str | None:
    """One line saying why ``path`` is not a readable safetensors file (cut short, a header length past the end of
    the file, a header that is not a JSON object, tensors past the end), or ``None`` when its header reads. What
    the header declares beyond that (dtypes, shapes, overlaps) the safetensors library checks when it opens the file."""
    import json

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            n = int.from_bytes(raw, "little") if len(raw) == 8 else None
            text = fh.read(n) if n is not None and n <= min(size - 8, SAFETENSORS_MAX_HEADER) else b""
    except OSError as exc:
        return f"{path}: cannot read ({exc.strerror or exc})"
    what = f"{path} is not a readable safetensors file"
    if n is None:
        return f"{what}: {size} bytes, fewer than its 8-byte header length (cut short? fetch the file again)"
    if n > size - 8:
        return (f"{what}: its header length says {n:,} bytes, but {size - 8:,} follow it (cut short or damaged? "
                "fetch the file again)")
    if n > SAFETENSORS_MAX_HEADER:
        return f"{what}: its header is {n:,} bytes, more than the {SAFETENSORS_MAX_HEADER:,} the format allows"
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return f"{what}: its header is not JSON ({str(exc).splitlines()[0][:80]}); damaged data?"
    if not isinstance(header, dict):
        return f"{what}: its header is JSON but not an object of tensors ({type(header).__name__})"
    ends = [e.get("data_offsets") for k, e in header.items() if k != "__metadata__" and isinstance(e, dict)]
    end = max((int(o[1]) for o in ends if isinstance(o, list) and len(o) == 2 and isinstance(o[1], int)), default=0)
    if end > size - 8 - n:
        return (f"{what}: its header places {end:,} bytes of tensors after it, but the file holds {size - 8 - n:,} "
                "(cut short? fetch the file again)")
    return None


def _is_text(head: bytes) -> bool:
    if not head or b"\0" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # a cut multi-byte character at the end of the head is still text
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    printable = sum(ch.isprintable() or ch in "\r\n\t\f" for ch in text)
    return printable >= 0.95 * len(text)


def sniff(path: str | Path) -> str:
    """The container a file holds, from its first bytes (see the module doc for the names)."""
    path = Path(path)
    head = _head(path)
    if not head:
        return "empty"
    if head.startswith(LFS_PREFIX):
        return "lfs-pointer"
    if head.startswith(HDF5_MAGIC) or any(head[o:o + 8] == HDF5_MAGIC for o in (512, 1024, 2048)):
        return "hdf5"
    if head.startswith(ZIP_MAGIC):
        return _zip_kind(path)
    if _looks_like_safetensors(head):  # before the pickle test: a header length of 640 bytes starts b"\x80\x02"
        return "safetensors"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "torch-pickle"  # torch.save's legacy (pre-1.6) format: a pickle stream
    if _looks_like_onnx(head):
        return "onnx"
    if _is_text(head):
        low = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
        if low.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<!--")) or b"<html" in low:
            return "html"
        return "text"
    return "unknown"


def _lfs_size(path: Path) -> str:
    m = re.search(rb"^size (\d+)", _head(path, 1024), re.M)
    return f" (the real file is {int(m.group(1)):,} bytes)" if m else ""


def problem(path: str | Path, fmt: str | None = None) -> str | None:
    """One line saying why ``path`` is not a model file, or ``None`` when it may be one."""
    path = Path(path)
    fmt = fmt or sniff(path)
    if fmt == "empty":
        return f"{path} is empty (0 bytes): an interrupted download or copy? fetch the file again"
    if fmt == "lfs-pointer":
        return f"{path} is a Git LFS pointer, not the weights: run `git lfs pull`{_lfs_size(path)}"
    if fmt == "html":
        return (f"{path} is an HTML/XML page, not a model (an error or login page saved under the model's "
                "name?): download the file itself")
    if fmt == "text":
        first = _head(path, 200).decode("utf-8", "replace").strip().splitlines()[0][:60]
        return f"{path} is a text file ({first!r}...), not a model; lungedge reads {READS}"
    if fmt == "safetensors" or (fmt == "unknown" and path.suffix.lower() == SAFETENSORS_SUFFIX):
        reason = safetensors_problem(path)
        if reason or fmt == "safetensors":
            return reason
    if fmt == "unknown":
        return (f"{path} is not a model file: its bytes match none of the formats lungedge reads ({READS}); "
                "random or damaged data?")
    return None


def check_model_file(path: str | Path) -> str:
    """The container format of ``path``; one-line :class:`LungedgeError` when it is not a model file."""
    path = Path(path)
    if not path.is_file():
        raise LungedgeError(f"file not found: {path}")
    fmt = sniff(path)
    reason = problem(path, fmt)
    if reason:
        raise LungedgeError(reason)
    return fmt


def expect(path: str | Path, formats: tuple[str, ...], what: str) -> str:
    """Like :func:`check_model_file`, and the content must be one of ``formats`` (e.g. an HDF5
    file named ``.pth`` is said to be one)."""
    fmt = check_model_file(path)
    if fmt not in formats:
        raise LungedgeError(f"{path} holds {DESCRIBE.get(fmt, fmt)}, not {what}")
    return fmt


DESCRIBE = {
    "hdf5": "an HDF5 (Keras .h5) file", "torchscript": "a TorchScript program",
    "torch-export": "a torch.export program",
    "torch-zip": "a torch.save file", "torch-pickle": "a legacy torch.save (pickle) file",
    "safetensors": "a safetensors file (a state dict)",
    "keras-zip": "a Keras 3 .keras archive", "onnx": "an ONNX model", "zip": "a zip archive",
}
