"""OpenVINO backend: the same ONNX files on the CPU, with the precision said plainly.

* an FP32 ONNX runs in FP32: ``INFERENCE_PRECISION_HINT`` is forced to ``f32`` (OpenVINO would
  otherwise run it in BF16 on a CPU with AMX, silently);
* BF16: the FP32 ONNX with the hint ``bf16`` (precision ``bf16`` in the runner table, which points
  it at the fp32 file), only where the CPU has AMX or AVX-512 BF16; reported as precision and
  variant ``bf16``, never as ``fp32``, and compared with FP32 like any reduced precision;
* an INT8 (Q/DQ) ONNX runs its quantized layers in INT8 (AMX/VNNI kernels), the rest in FP32;
* the FP16 ONNX runs with FP16 weights, computed in FP32 (hint ``f32``).

The performance hint (``LATENCY``), thread count, inference precision and the model cache folder
(compiled blobs, ``$LUNGEDGE_OPENVINO_CACHE`` or ``~/.cache/lungedge/openvino``) are what
:meth:`OpenVinoRunner.describe` reports, read back from the compiled model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import LungedgeError
from .base import Loader, Runner, TensorSpec

PERFORMANCE_HINT = "LATENCY"


def cache_dir() -> Path:
    return Path(os.environ.get("LUNGEDGE_OPENVINO_CACHE") or Path.home() / ".cache" / "lungedge" / "openvino")


def _import_openvino():
    try:
        import openvino as ov
    except ImportError:
        raise LungedgeError("OpenVINO is not installed here (pip install openvino; the workstation install has it)") \
            from None
    return ov


def cpu_has_bf16(core=None) -> bool:
    """True where OpenVINO's CPU plugin computes in BF16 natively (AMX or AVX-512 BF16)."""
    ov = _import_openvino()
    core = core or ov.Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class CompiledModelFromOnnx(Loader):
    """-> an OpenVINO compiled model on the CPU, inference precision f32, or bf16 when the runner's
    precision is ``bf16``."""

    @property
    def hint(self) -> str:
        return "bf16" if self.precision == "bf16" else "f32"

    def __call__(self):
        ov = _import_openvino()
        core = ov.Core()
        if self.hint == "bf16":
            if self.info.precision != "fp32":
                raise LungedgeError(f"OpenVINO BF16 runs the fp32 ONNX, not {self.info.path.name}")
            if not cpu_has_bf16(core):
                raise LungedgeError("this CPU has neither AMX nor AVX-512 BF16: OpenVINO would emulate BF16; "
                                    "use the fp32 or int8 file")
        folder = cache_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not os.access(folder, os.W_OK):  # a read-only disk or folder: OpenVINO would write nothing
                raise PermissionError(folder)
            core.set_property({"CACHE_DIR": str(folder)})
        except OSError:
            folder = None  # read-only home: no cache (describe() says so), still runs
        config = {"INFERENCE_PRECISION_HINT": self.hint, "PERFORMANCE_HINT": PERFORMANCE_HINT}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        try:
            compiled = core.compile_model(core.read_model(str(self.info.path)), "CPU", config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
            raise LungedgeError(f"OpenVINO cannot load {self.info.path} ({str(exc).strip().splitlines()[0][:160]})") \
                from None
        return compiled, folder


class OpenVinoRunner(Runner):
    loader_class = CompiledModelFromOnnx
    includes = "model forward only (OpenVINO infer request)"

    @property
    def variant(self) -> str:
        return "bf16" if self.precision == "bf16" else super().variant

    def load(self) -> None:
        self.model, self._cache = self.loader()
        self._request = self.model.create_infer_request()

    def close(self) -> None:
        self._request = None
        self.model = None

    def get_input_metadata(self) -> dict[str, TensorSpec]:
        compiled = getattr(self, "model", None)
        if compiled is None:
            return super().get_input_metadata()
        (port,) = compiled.inputs
        shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
        dtype = np.dtype(np.uint8) if port.get_element_type().to_string() == "u8" else np.dtype(np.float32)
        return {port.get_any_name(): TensorSpec(port.get_any_name(), shape, dtype)}

    def _infer(self, x: np.ndarray) -> np.ndarray:
        self._request.infer({0: x})
        return np.array(self._request.get_output_tensor(0).data, copy=True)

    def _property(self, name: str):
        """A compiled-model property as plain text/number ("f32", "LATENCY", 2)."""
        try:
            value = self.model.get_property(name)
        except Exception:  # noqa: BLE001 - a property this version does not expose
            return None
        if hasattr(value, "to_string"):  # ov.Type
            return value.to_string()
        if hasattr(value, "name") and not isinstance(value, (str, int)):  # enums (performance mode)
            return value.name
        return value if isinstance(value, (str, int, float)) else str(value)

    def threads_used(self):
        n = self._property("INFERENCE_NUM_THREADS") if getattr(self, "model", None) is not None else None
        return int(n) if n else (self.threads or "default")

    def runtime_facts(self) -> dict:
        return self.describe()

    def describe(self) -> dict:
        if getattr(self, "model", None) is None:
            return {}
        import openvino as ov

        return {"openvino": ov.__version__.split("-")[0],
                "inference_precision": self._property("INFERENCE_PRECISION_HINT"),
                "performance_hint": self._property("PERFORMANCE_HINT"),
                "threads": self.threads_used(),
                "streams": self._property("NUM_STREAMS"),
                "cache_dir": str(self._cache) if self._cache else None}
