"""ONNX Runtime runner: an FP32, FP16 or INT8 ONNX on the CPU, CUDA or TensorRT execution provider."""

from __future__ import annotations

import numpy as np

from .. import onnx_meta
from ..errors import LungedgeError
from .base import Runner


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"

    def providers(self) -> list:
        if self.backend == "onnxruntime-trt":
            return [("TensorrtExecutionProvider", {"trt_fp16_enable": self.info.precision == "fp16",
                                                   "trt_int8_enable": self.info.precision == "int8"}),
                    "CUDAExecutionProvider", "CPUExecutionProvider"]
        if self.device == "cuda":
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    @property
    def includes(self) -> str:
        if self.device == "cuda" or self.backend == "onnxruntime-trt":
            return "host->device copy, forward, device->host copy (session.run with NumPy in/out)"
        return "model forward only (session.run)"

    def load(self) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        wanted = self.providers()
        first = wanted[0][0] if isinstance(wanted[0], tuple) else wanted[0]
        if first not in available:
            raise LungedgeError(f"ONNX Runtime here has no {first} (available: {', '.join(available)}); "
                                "install onnxruntime-gpu on a CUDA machine")
        if self.backend == "onnxruntime-trt":
            self.device = "cuda"
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = int(self.threads)
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.info.path), sess_options=opts, providers=wanted)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            raise LungedgeError(f"ONNX Runtime cannot load {self.info.path} ({str(exc).splitlines()[0][:160]})") from None
        used = self.session.get_providers()
        if first not in used:
            raise LungedgeError(f"ONNX Runtime fell back from {first} to {', '.join(used)} for {self.info.path.name}")
        self.opts = opts

    def _infer(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([onnx_meta.OUTPUT_NAME], {onnx_meta.INPUT_NAME: x})[0]

    def threads_used(self):
        return self.threads or "default"

    def close(self) -> None:
        self.session = None
