"""The lungedge metadata every exported ONNX carries, written from its :class:`Source`."""

from __future__ import annotations

from pathlib import Path

from .. import onnx_meta
from ..io import atomic_write_bytes
from .source import Source


def metadata(source: Source, precision: str, **extra) -> dict:
    if source.converter:
        extra = {"converter": source.converter, **extra}
    if source.temperature:
        extra = {"temperature": source.temperature, **extra}
    if source.input_check:
        extra = {"input_check": source.input_check, **extra}
    return onnx_meta.make_metadata(source.architecture, source.framework, source.classes, source.preprocessing,
                                   precision, source.sha256, build=source.build, output=source.output, **extra)


def write(model, source: Source, out: Path, precision: str = "fp32", **extra) -> Path:
    """Attach the metadata, check the graph, write one self-contained file atomically."""
    import onnx

    onnx_meta.attach(model, metadata(source, precision, **extra))
    onnx.checker.check_model(model)
    return atomic_write_bytes(out, model.SerializeToString())


def restamp(path: Path, source: Source, precision: str, **extra) -> Path:
    """Re-write a derived ONNX's metadata for its own precision."""
    import onnx

    return write(onnx.load(str(path)), source, Path(path), precision, **extra)
