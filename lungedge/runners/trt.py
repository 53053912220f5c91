"""TensorRT backend: a serialized engine built on this GPU (``lungedge engine build``).

Everything about the engine's IO comes from the engine itself (``num_io_tensors``,
``get_tensor_name``, ``get_tensor_mode``, ``get_tensor_dtype``, the profile's shapes). Buffers are
torch CUDA tensors (no pycuda needed). One ``infer``: copy the batch into a pinned host buffer,
copy it to the GPU on the runner's own CUDA stream, execute there, copy the logits back into pinned
memory, synchronise once. A batch above the profile's maximum is refused, never split.
"""

from __future__ import annotations

import numpy as np

from ..errors import LungedgeError
from .base import Loader, Runner, TensorSpec


class EngineFromFile(Loader):
    """-> (deserialized engine, its sidecar); refuses an engine built on another GPU / TensorRT release,
    or from another ONNX than the one next to it."""

    def __call__(self):
        from .. import trt
        from ..models.registry import import_torch_first

        import_torch_first()
        return trt.load_engine(self.info.path)


class TensorRTRunner(Runner):
    loader_class = EngineFromFile
    includes = ("copy into pinned memory, host->device copy, engine execution, device->host copy "
                "(own CUDA stream, one synchronisation)")

    def load(self) -> None:
        from .. import trt
        from .cuda_io import PinnedIO

        import torch

        self._torch = torch
        self.engine, self.sidecar = self.loader()
        self.input, self.output = trt.split_io(trt.engine_io(self.engine), self.info.path.name)
        # the profile's (min, opt, max) shapes of the input, profile 0
        _, _, max_shape = self.engine.get_tensor_profile_shape(self.input.name, 0)
        self.max_batch = int(max_shape[0])
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise LungedgeError(f"TensorRT could not make an execution context for {self.info.path.name} "
                                "(out of GPU memory?)")
        self.stream = torch.cuda.Stream()
        self._io = PinnedIO(torch, stream=self.stream)
        self._outputs: dict = {}

    def get_input_metadata(self) -> dict[str, TensorSpec]:
        inp = getattr(self, "input", None)
        if inp is None:
            return super().get_input_metadata()
        return {inp.name: TensorSpec(inp.name, (None, *inp.shape[1:]), inp.dtype)}

    def _output_buffer(self, shape):
        from .cuda_io import torch_dtype

        key = tuple(shape)
        if key not in self._outputs:
            self._outputs[key] = self._torch.empty(key, dtype=torch_dtype(self._torch, self.output.dtype),
                                                   device="cuda")
        return self._outputs[key]

    def _infer(self, x: np.ndarray) -> np.ndarray:
        from .. import trt

        trt.check_batch(len(x), self.max_batch, self.info.path.name)
        name = self.info.path.name
        dev_in = self._io.upload(x)  # on self.stream
        if not self.context.set_input_shape(self.input.name, tuple(x.shape)):
            raise LungedgeError(f"{name}: TensorRT refused input shape {tuple(x.shape)} for {self.input.name}")
        out = self._output_buffer(tuple(self.context.get_tensor_shape(self.output.name)))
        for tensor, buf in ((self.input.name, dev_in), (self.output.name, out)):
            if not self.context.set_tensor_address(tensor, buf.data_ptr()):
                raise LungedgeError(f"{name}: TensorRT refused the buffer of {tensor}")
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise LungedgeError(f"TensorRT failed to run {name}")
        return self._io.download(out)  # D2H on the same stream, then the one synchronisation

    def describe(self) -> dict:
        side = getattr(self, "sidecar", None) or {}
        return {key: side[key] for key in ("build_mode", "builder_flags", "tf32", "non_qdq_layers", "max_batch",
                                           "opt_batch", "trt_version", "gpu") if key in side}

    def close(self) -> None:
        if getattr(self, "_io", None) is not None:
            self._io.clear()
        self._outputs = {}
        self.context = None
        self.engine = None
