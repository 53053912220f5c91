"""Host<->device copies for the GPU runners: pinned host buffers reused per batch shape, asynchronous
copies on one CUDA stream, and one synchronisation per call (torch only; no pycuda)."""

from __future__ import annotations

import numpy as np


def torch_dtype(torch, dtype) -> object:
    """NumPy dtype -> torch dtype (the types engine and runner buffers use; NumPy has no bfloat16)."""
    table = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
             np.dtype(np.float64): torch.float64, np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64,
             np.dtype(np.int8): torch.int8, np.dtype(np.uint8): torch.uint8, np.dtype(np.bool_): torch.bool}
    return table[np.dtype(dtype)]


class PinnedIO:
    """Per input shape: a pinned host buffer and a device buffer (in ``memory_format``), made once.

    ``upload(x)`` copies a NumPy batch into the pinned buffer, then asynchronously to the device (on
    ``stream``); ``download(y)`` copies a device result into a pinned buffer asynchronously and waits
    for the stream once; it returns a NumPy copy.
    """

    def __init__(self, torch, stream=None, memory_format=None):
        self.torch = torch
        self.stream = stream  # None: the current stream
        self.memory_format = memory_format
        self._inputs: dict = {}
        self._outputs: dict = {}

    def _stream(self):
        return self.stream if self.stream is not None else self.torch.cuda.current_stream()

    def device_input(self, shape, dtype=np.float32):
        """The device buffer a batch of ``shape`` is uploaded into (made on first use)."""
        torch = self.torch
        key = (tuple(shape), np.dtype(dtype).str)
        if key not in self._inputs:
            td = torch_dtype(torch, dtype)
            host = torch.empty(tuple(shape), dtype=td, pin_memory=True)
            kwargs = {"memory_format": self.memory_format} if self.memory_format is not None else {}
            dev = torch.empty(tuple(shape), dtype=td, device="cuda", **kwargs)
            self._inputs[key] = (host, dev)
        return self._inputs[key]

    def upload(self, x: np.ndarray):
        host, dev = self.device_input(x.shape, x.dtype)
        np.copyto(host.numpy(), x)  # into pinned memory: the DMA below can run asynchronously
        with self.torch.cuda.stream(self._stream()):
            dev.copy_(host, non_blocking=True)
        return dev

    def download(self, y) -> np.ndarray:
        torch = self.torch
        key = (tuple(y.shape), str(y.dtype))
        if key not in self._outputs:
            self._outputs[key] = torch.empty(tuple(y.shape), dtype=y.dtype, pin_memory=True)
        host = self._outputs[key]
        stream = self._stream()
        with torch.cuda.stream(stream):
            host.copy_(y, non_blocking=True)
        stream.synchronize()  # the one synchronisation of a call
        return host.numpy().copy()

    def clear(self) -> None:
        self._inputs.clear()
        self._outputs.clear()
