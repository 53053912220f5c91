"""ONNX Runtime with its TensorRT execution provider (GPU): the same runner, other providers.

The provider gets an engine cache and a timing cache next to the ONNX (``ort-trt-cache/``), so the
engine is built once per GPU and TensorRT release; FP16 kernels are allowed for the FP16 and INT8
files only. An FP32 file may still run in TF32 on Ampere and newer GPUs (Orin included): that is
TensorRT's default and the provider has no option to clear it (the ``tensorrt`` backend's FP32 engines
clear it). CPU fallback is disabled (see ``session_config``).
"""

from __future__ import annotations

from pathlib import Path

from .onnxrt import OnnxRuntimeRunner, SessionFromOnnx

CACHE_DIR = "ort-trt-cache"


def trt_provider_options(precision: str, cache_dir) -> dict[str, str]:
    """TensorrtExecutionProvider options for an ONNX file of ``precision`` (values as ONNX Runtime reads them)."""
    flag = lambda on: "True" if on else "False"  # noqa: E731
    cache = str(Path(cache_dir))
    return {"trt_fp16_enable": flag(precision in ("fp16", "int8")), "trt_int8_enable": flag(precision == "int8"),
            "trt_engine_cache_enable": "True", "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": "True", "trt_timing_cache_path": cache}


class SessionFromOnnxTrt(SessionFromOnnx):
    def providers(self) -> list:
        cache = self.info.path.parent / CACHE_DIR
        cache.mkdir(parents=True, exist_ok=True)
        return [("TensorrtExecutionProvider", trt_provider_options(self.info.precision, cache)),
                "CUDAExecutionProvider", "CPUExecutionProvider"]


class OnnxRuntimeTrtRunner(OnnxRuntimeRunner):
    loader_class = SessionFromOnnxTrt
    includes = "host->device copy, forward, device->host copy (session.run with NumPy in/out)"
