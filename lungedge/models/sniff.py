"""What a file really holds, from its first bytes: the one place that tells a model file from what
only looks like one (a Git LFS pointer, an empty download, an HTML error page saved as ``.h5``,
random bytes) and says so in one line, before any framework tries to read it.

:func:`sniff` names the container (``hdf5``, ``torchscript``, ``torch-export``, ``torch-zip``,
``torch-pickle``, ``keras-zip``, ``onnx``, ``zip``) or what the file is instead (``empty``,
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

READS = "PyTorch (.pth/.pt/.pt2), Keras (.h5/.keras) or ONNX (.onnx)"


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
    "keras-zip": "a Keras 3 .keras archive", "onnx": "an ONNX model", "zip": "a zip archive",
}
