"""Runners: one interface for every backend (Polygraphy-like).

    with open_runner("engines/googlenet/googlenet.fp16.onnx") as r:
        logits = r.infer(r.preprocessing.load_batch(paths))

A runner is made from an artifact path alone (checkpoint, ONNX file or TensorRT engine) and
takes classes and preprocessing from the artifact's metadata. Backends live one per module
(torch, keras, onnxrt, trt); each imports its heavy library only when opened.
"""

from .base import BACKENDS, ArtifactInfo, Runner, artifact_info, open_runner

__all__ = ["BACKENDS", "ArtifactInfo", "Runner", "artifact_info", "open_runner"]
