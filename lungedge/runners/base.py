"""The Runner protocol and :func:`open_runner`, the one factory bench, eval and predict use."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import LungedgeError
from ..preprocess import Preprocessing

# backend -> artifact kinds it runs
BACKENDS = {
    "torch": ("checkpoint",),
    "keras": ("checkpoint",),
    "onnxruntime": ("onnx",),  # CPU or CUDA execution provider, from --device
    "onnxruntime-trt": ("onnx",),  # ONNX Runtime's TensorRT execution provider (GPU)
    "tensorrt": ("engine",),
}
DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "fp16", "int8")


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


def artifact_kind(path: Path) -> str:
    s = path.suffix.lower()
    if s in (".pth", ".pt", ".h5", ".hdf5"):
        return "checkpoint"
    if s == ".onnx":
        return "onnx"
    if s in (".engine", ".plan", ".trt"):
        return "engine"
    raise LungedgeError(f"{path}: unknown artifact type (expected .pth, .h5, .onnx or .engine)")


def _onnx_variant(path: Path, meta: dict) -> str:
    precision = meta.get("precision", "fp32")
    if precision == "int8":
        target = (meta.get("extra") or {}).get("int8_target")
        return "int8-cpu" if target == "cpu" else "int8"
    return precision


def artifact_info(path) -> ArtifactInfo:
    """Read an artifact's own metadata (no model is built)."""
    path = Path(path)
    if not path.is_file():
        raise LungedgeError(f"artifact not found: {path}")
    kind = artifact_kind(path)
    if kind == "checkpoint":
        from ..models.checkpoint import read_meta

        m = read_meta(path)
        return ArtifactInfo(path, kind, m["architecture"], m["framework"], list(m["classes"]),
                            Preprocessing.from_dict(m["preprocessing"]), "fp32", m["checkpoint_sha256"], "fp32",
                            {"meta": m})
    if kind == "onnx":
        from .. import onnx_meta

        m = onnx_meta.read(path)
        return ArtifactInfo(path, kind, m["architecture"], m.get("framework", "?"), list(m["classes"]),
                            m["preprocessing"], m.get("precision", "fp32"), m.get("source_sha256"),
                            _onnx_variant(path, m), dict(m.get("extra") or {}))
    from .. import onnx_meta, trt

    side = trt.read_sidecar(path)
    onnx_path = path.parent / side["onnx"]
    if not onnx_path.is_file():
        raise LungedgeError(f"{path}: the ONNX it was built from ({onnx_path.name}) must lie next to it; "
                            "it carries the classes and preprocessing")
    m = onnx_meta.read(onnx_path)
    return ArtifactInfo(path, kind, m["architecture"], m.get("framework", "?"), list(m["classes"]),
                        m["preprocessing"], side["precision"], m.get("source_sha256"), side["precision"],
                        {"sidecar": side, "max_batch": side.get("max_batch")})


def default_backend(info: ArtifactInfo) -> str:
    if info.kind == "checkpoint":
        return info.framework
    return "onnxruntime" if info.kind == "onnx" else "tensorrt"


class Runner:
    """A context manager with one call, ``infer(batch) -> logits`` (float32, N x classes).

    ``batch`` is the preprocessed float32 input in the artifact's layout (``preprocessing``).
    ``includes`` says what one timed ``infer`` covers (e.g. host<->device copies).
    """

    backend = "?"

    def __init__(self, info: ArtifactInfo, device: str = "cpu", precision: str | None = None,
                 threads: int | None = None):
        self.info = info
        self.device = device
        self.precision = precision or info.precision
        self.threads = threads
        self.active = False

    # the artifact's metadata, for callers that never look at the backend
    @property
    def classes(self) -> list[str]:
        return self.info.classes

    @property
    def preprocessing(self) -> Preprocessing:
        return self.info.preprocessing

    @property
    def name(self) -> str:
        return f"{self.info.architecture} {self.backend} {self.device} {self.variant}"

    @property
    def variant(self) -> str:
        return self.info.variant if self.info.kind != "checkpoint" else self.precision

    includes = "model forward only"

    def load(self) -> None:  # build sessions / move weights
        raise NotImplementedError

    def close(self) -> None:
        pass

    def _infer(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if not self.active:
            raise LungedgeError(f"{self.name}: runner used outside its 'with' block")
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.preprocessing.input_shape):
            raise LungedgeError(f"{self.name}: expected a batch of shape (N, {', '.join(map(str, self.preprocessing.input_shape))}), "
                                f"got {tuple(x.shape)}")
        return np.asarray(self._infer(x), dtype=np.float32)

    def describe(self) -> dict:
        """Model facts for the report (parameter counts, layers) where the backend knows them."""
        return {}

    def threads_used(self):
        return self.threads

    def __enter__(self):
        self.load()
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False
        self.close()
        return False


def check_device(device: str) -> str:
    if device not in DEVICES:
        raise LungedgeError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
    return device


def open_runner(artifact, backend: str | None = None, device: str = "cpu", precision: str | None = None,
                threads: int | None = None) -> Runner:
    """A runner for ``artifact`` (a path or an :class:`ArtifactInfo`); use it in a ``with`` block."""
    check_device(device)
    info = artifact if isinstance(artifact, ArtifactInfo) else artifact_info(artifact)
    backend = backend or default_backend(info)
    if backend not in BACKENDS:
        raise LungedgeError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if info.kind not in BACKENDS[backend]:
        raise LungedgeError(f"backend {backend} does not run a {info.kind} ({info.path.name})")
    if precision is not None and precision not in PRECISIONS:
        raise LungedgeError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    if info.kind != "checkpoint" and precision not in (None, info.precision):
        raise LungedgeError(f"{info.path.name} is a {info.precision} model; precision is fixed in the file "
                            f"(pick the {precision} file instead)")
    if backend == "torch":
        if info.framework != "torch":
            raise LungedgeError(f"{info.path.name} is a {info.framework} checkpoint, not a torch one")
        from .torch import TorchRunner as cls
    elif backend == "keras":
        if info.framework != "keras":
            raise LungedgeError(f"{info.path.name} is a {info.framework} checkpoint, not a Keras one")
        from .keras import KerasRunner as cls
    elif backend in ("onnxruntime", "onnxruntime-trt"):
        from .onnxrt import OnnxRuntimeRunner as cls
    else:
        from .trt import TensorRTRunner as cls
    runner = cls(info, device=device, precision=precision, threads=threads)
    if backend == "onnxruntime-trt":
        runner.backend = "onnxruntime-trt"
    return runner
