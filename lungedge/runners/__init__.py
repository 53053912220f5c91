"""Runners: one interface for every backend (Polygraphy-like).

    with open_runner("engines/googlenet/googlenet.fp16.onnx") as r:
        logits = r.infer(r.preprocessing.load_batch(paths))

A runner is made from an artifact path alone (checkpoint, ONNX file or TensorRT engine) and
takes classes and preprocessing from the artifact's metadata. Backends live one per module
(torch, keras, onnxrt, onnxrt_trt, trt), each a lazy loader and a runner, and join the table in
``registry.py`` with one ``register(...)`` line; each imports its heavy library only when opened.
"""

from .artifact import ArtifactInfo, artifact_info, artifact_kind
from .base import Loader, Runner, TensorSpec
from .registry import BACKENDS, DEVICES, PRECISIONS, Backend, default_backend, get_backend, open_runner, register

__all__ = ["BACKENDS", "DEVICES", "PRECISIONS", "ArtifactInfo", "Backend", "Loader", "Runner", "TensorSpec",
           "artifact_info", "artifact_kind", "default_backend", "get_backend", "open_runner", "register"]
