"""What an artifact says about itself: the one place that tells a checkpoint, an ONNX file and an
engine apart (by suffix) and reads their metadata. Everything downstream looks at :class:`ArtifactInfo`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LungedgeError
from ..preprocess import Preprocessing

# artifact kind -> file suffixes
KINDS = {
    "checkpoint": (".pth", ".pt", ".h5", ".hdf5", ".safetensors"),  # .safetensors: always a foreign state dict
    "onnx": (".onnx",),
    "engine": (".engine", ".plan", ".trt"),
}


@dataclass
class ArtifactInfo:
    """What an artifact says about itself."""

    path: Path
    kind: str  # checkpoint | onnx | engine
    architecture: str
    framework: str  # torch | keras (the source framework)
    classes: list[str]
    preprocessing: Preprocessing
    precision: str  # of the artifact itself (a checkpoint is fp32)
    source_sha256: str | None
    variant: str = ""  # e.g. "int8-cpu" (U8S8 for ONNX Runtime CPU) or "int8" (S8S8 for TensorRT)
    extra: dict = field(default_factory=dict)
    output: str = "logits"  # logits | probabilities | sigmoid (runners.base.OUTPUT_KINDS)
    temperature: float = 1.0  # divides the logits before the softmax (fitted at export; lungedge.temperature)
    input_check: object = None  # lungedge.inputcheck.InputCheck fitted at export; None: the file carries none

    @property
    def fixed_precision(self) -> bool:
        """True when the precision is baked into the file (ONNX, engine); a checkpoint runs in any."""
        return self.kind != "checkpoint"


def artifact_kind(path) -> str:
    s = Path(path).suffix.lower()
    for kind, suffixes in KINDS.items():
        if s in suffixes:
            return kind
    from ..models.sniff import DESCRIBE, sniff

    if Path(path).is_file() and sniff(path) in set(DESCRIBE) - {"zip"}:  # a model under another name (.bin, .ckpt)
        raise _export_first(path)
    raise LungedgeError(f"{path}: unknown artifact type (expected .pth, .h5, .onnx or .engine)")


def _export_first(path) -> LungedgeError:
    """A model file lungedge did not write: what to do with it."""
    return LungedgeError(f"{path} was not written by lungedge (no metadata): export it first with "
                         f"`lungedge export MODEL --checkpoint {path} --classes A,B,C` (add --custom for your "
                         "own architecture), then use the ONNX it writes")


def is_kind(path, kind: str) -> bool:
    return Path(path).suffix.lower() in KINDS[kind]


def _onnx_variant(meta: dict) -> str:
    precision = meta.get("precision", "fp32")
    if precision == "int8":
        target = (meta.get("extra") or {}).get("int8_target")
        from ..onnx_meta import variant_of

        return variant_of("int8", target if target in ("cpu", "ov") else "trt")
    return precision


def _temperature(meta: dict, path: Path) -> float:
    """The temperature an exported file carries (``extra.temperature.value``), 1 where none was fitted."""
    t = (meta.get("extra") or {}).get("temperature")
    if t is None:
        return 1.0
    from ..temperature import check

    return check(t.get("value") if isinstance(t, dict) else t, f"{path}: metadata extra.temperature")


def _input_check(meta: dict, path: Path):
    """The input check an exported file carries (``extra.input_check``), None where none was fitted; a
    damaged one is one line naming the field."""
    c = (meta.get("extra") or {}).get("input_check")
    if c is None:
        return None
    from ..inputcheck import InputCheck
    from ..validation import validate

    where = f"{path}: metadata extra.input_check"
    validate("InputCheckFields", c, where)
    return InputCheck.from_meta(c, where)


def _checkpoint(path: Path) -> ArtifactInfo:
    from ..models.checkpoint import read_meta
    from ..models.sniff import check_model_file

    check_model_file(path)  # LFS pointers, empty files, HTML pages: said in one line
    try:
        m = read_meta(path)
    except LungedgeError as exc:
        if "not a lungedge checkpoint" not in str(exc) and "not a plain state-dict" not in str(exc):
            raise
        raise _export_first(path) from None
    return ArtifactInfo(path, "checkpoint", m["architecture"], m["framework"], list(m["classes"]),
                        Preprocessing.from_dict(m["preprocessing"]), "fp32", m["checkpoint_sha256"], "fp32",
                        {"meta": m}, m.get("output", "logits"))


def _onnx(path: Path) -> ArtifactInfo:
    from .. import onnx_meta
    from ..models.sniff import check_model_file

    check_model_file(path)
    m = onnx_meta.read(path)
    return ArtifactInfo(path, "onnx", m["architecture"], m.get("framework", "?"), list(m["classes"]),
                        m["preprocessing"], m.get("precision", "fp32"), m.get("source_sha256"),
                        _onnx_variant(m), dict(m.get("extra") or {}), m.get("output", "logits"),
                        _temperature(m, path), _input_check(m, path))


def _engine(path: Path) -> ArtifactInfo:
    from .. import onnx_meta, trt

    side = trt.read_sidecar(path)
    onnx_path = path.parent / side["onnx"]
    if not onnx_path.is_file():
        raise LungedgeError(f"{path}: the ONNX it was built from ({onnx_path.name}) must lie next to it; "
                            "it carries the classes and preprocessing")
    m = onnx_meta.read(onnx_path)
    return ArtifactInfo(path, "engine", m["architecture"], m.get("framework", "?"), list(m["classes"]),
                        m["preprocessing"], side["precision"], m.get("source_sha256"), side["precision"],
                        {"sidecar": side, "max_batch": side.get("max_batch")}, m.get("output", "logits"),
                        _temperature(m, onnx_path), _input_check(m, onnx_path))


_READERS = {"checkpoint": _checkpoint, "onnx": _onnx, "engine": _engine}


def artifact_info(path) -> ArtifactInfo:
    """Read an artifact's own metadata (no model is built)."""
    if isinstance(path, ArtifactInfo):
        return path
    path = Path(path)
    if not path.is_file():
        raise LungedgeError(f"artifact not found: {path}")
    return _READERS[artifact_kind(path)](path)
