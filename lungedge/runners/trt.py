"""TensorRT runner: a serialized engine built on this GPU (``lungedge export --engine``).

Buffers are torch CUDA tensors (no pycuda needed); one ``infer`` copies the input to the GPU,
runs the engine on a CUDA stream, copies the logits back and synchronises.
"""

from __future__ import annotations

import numpy as np

from ..errors import LungedgeError
from .base import Runner


class TensorRTRunner(Runner):
    backend = "tensorrt"
    includes = "host->device copy, engine execution, device->host copy (stream synchronised)"

    def load(self) -> None:
        from .. import onnx_meta, trt
        from ..models.registry import import_torch_first

        if self.device != "cuda":
            self.device = "cuda"  # an engine only runs on its GPU
        import_torch_first()
        import torch

        engine, side = trt.load_engine(self.info.path)  # refuses another GPU / TensorRT release
        self._torch = torch
        self.engine = engine
        self.context = engine.create_execution_context()
        self.max_batch = int(side.get("max_batch") or 1)
        self.input_name, self.output_name = onnx_meta.INPUT_NAME, onnx_meta.OUTPUT_NAME
        self.stream = torch.cuda.Stream()

    def _infer(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        outs = []
        for i in range(0, len(x), self.max_batch):  # the engine's profile caps the batch
            chunk = torch.from_numpy(x[i : i + self.max_batch]).cuda()
            self.context.set_input_shape(self.input_name, tuple(chunk.shape))
            shape = tuple(self.context.get_tensor_shape(self.output_name))
            out = torch.empty(shape, dtype=torch.float32, device="cuda")
            self.context.set_tensor_address(self.input_name, chunk.data_ptr())
            self.context.set_tensor_address(self.output_name, out.data_ptr())
            torch.cuda.current_stream().synchronize()
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise LungedgeError(f"TensorRT failed to run {self.info.path.name}")
            self.stream.synchronize()
            outs.append(out.cpu().numpy())
        return np.concatenate(outs)

    def close(self) -> None:
        self.context = None
        self.engine = None
