"""ONNX Runtime backend: an FP32, FP16 or INT8 ONNX on the CPU or CUDA execution provider."""

from __future__ import annotations

import numpy as np

from .. import onnx_meta
from ..errors import LungedgeError
from .base import Loader, Runner, TensorSpec

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(uint8)": np.uint8}  # uint8: pixels of a --uint8-input model


def session_config(device: str) -> dict[str, str]:
    """Session config entries: on a GPU, no silent CPU fallback (a row labelled cuda ran there)."""
    return {"session.disable_cpu_ep_fallback": "1"} if device == "cuda" else {}


class SessionFromOnnx(Loader):
    """-> an ``onnxruntime.InferenceSession`` on the providers of the device (refuses a silent fallback)."""

    def providers(self) -> list:
        if self.device == "cuda":
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def __call__(self):
        import onnxruntime as ort

        available = ort.get_available_providers()
        wanted = self.providers()
        first = wanted[0][0] if isinstance(wanted[0], tuple) else wanted[0]
        if first not in available:
            raise LungedgeError(f"ONNX Runtime here has no {first} (available: {', '.join(available)}); "
                                "install onnxruntime-gpu on a CUDA machine")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        for key, value in session_config(self.device).items():
            opts.add_session_config_entry(key, value)
        if self.threads:
            opts.intra_op_num_threads = int(self.threads)
            opts.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(str(self.info.path), sess_options=opts, providers=wanted)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            raise LungedgeError(f"ONNX Runtime cannot load {self.info.path}: {onnx_meta.ort_problem(exc)}") from None
        used = session.get_providers()
        if first not in used:
            raise LungedgeError(f"ONNX Runtime fell back from {first} to {', '.join(used)} for {self.info.path.name}")
        return session


class OnnxRuntimeRunner(Runner):
    loader_class = SessionFromOnnx

    @property
    def includes(self) -> str:
        if self.device == "cuda":
            return "host->device copy, forward, device->host copy (session.run with NumPy in/out)"
        return "model forward only (session.run)"

    def get_input_metadata(self) -> dict[str, TensorSpec]:
        session = getattr(self, "model", None)
        if session is None:
            return super().get_input_metadata()
        return {i.name: TensorSpec(i.name, tuple(d if isinstance(d, int) else None for d in i.shape),
                                   np.dtype(_ORT_TYPES.get(i.type, np.float32)))
                for i in session.get_inputs()}

    def _infer(self, x: np.ndarray) -> np.ndarray:
        (name,) = self.get_input_metadata()
        return self.model.run(None, {name: x})[0]

    def threads_used(self):
        return self.threads or "default"
