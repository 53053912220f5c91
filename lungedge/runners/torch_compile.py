"""The fastest PyTorch-native path, for GPUs without TensorRT (issue #15): two backends.

* ``torch-amp``: eager PyTorch, weights kept in FP32 and ``channels_last``; FP16 / BF16 run under
  ``torch.autocast`` (FP32: no autocast, TF32 off, so the row is true FP32). On CUDA the batch goes
  through a pinned host buffer, asynchronous copies and one synchronisation per call.
* ``torch-compile``: the same, compiled with ``torch.compile`` (Inductor, static shapes: each batch
  size compiles once, on its first call, which ``lungedge bench`` reports as ``first_call_s``).
  Batches up to :data:`CUDAGRAPH_MAX_BATCH` use mode ``reduce-overhead`` (CUDA graphs: one launch per
  call, what small batches need); larger ones mode ``default``. CUDA only (compiling on the CPU
  takes minutes and OpenVINO is the CPU's fast path).

Every timed ``infer`` includes the host->device copy and the device->host copy of the logits; the
bench row also carries ``device_only_ms`` (CUDA events around the forward alone, input already on the
GPU) so that the copies can be told apart.

Both run lungedge ``.pth`` checkpoints (torch framework), in precision fp32, fp16 (CUDA) or bf16.
"""

from __future__ import annotations

import shutil
import time
from contextlib import nullcontext

import numpy as np

from ..errors import LungedgeError
from ..models.frameworks import installed
from .base import Loader
from .torch import TorchRunner

CUDAGRAPH_MAX_BATCH = 32
AUTOCAST = {"fp32": None, "fp16": "float16", "bf16": "bfloat16"}


def autocast_dtype(precision: str) -> str | None:
    """fp16 -> 'float16', bf16 -> 'bfloat16', fp32 -> None (no autocast)."""
    if precision not in AUTOCAST:
        raise LungedgeError(f"the PyTorch fast path runs fp32, fp16 or bf16, not {precision}")
    return AUTOCAST[precision]


def compile_mode(device: str, batch: int) -> str:
    """torch.compile mode for a batch size: CUDA graphs ('reduce-overhead') for small CUDA batches."""
    return "reduce-overhead" if device == "cuda" and batch <= CUDAGRAPH_MAX_BATCH else "default"


def compile_unavailable(device: str, triton_version=None, c_compiler=None) -> str | None:
    """Why torch-compile cannot run here (None: it can). Inductor needs Triton on CUDA and a C compiler
    (Triton builds its launcher with one). The arguments are facts; None means 'look it up'."""
    if device != "cuda":
        return "torch-compile runs on cuda only (compiling on the CPU takes minutes; use torch-amp or openvino)"
    if triton_version is None and not installed("triton"):
        return "Triton is not installed (torch.compile's CUDA code generator)"
    if c_compiler is None and not (shutil.which("cc") or shutil.which("gcc")):
        return "no C compiler (cc/gcc) on PATH: Triton compiles its kernel launcher with one"
    return None


def _limit_recompiles(torch, at_least: int = 64) -> None:
    """Static shapes recompile per batch size; keep Dynamo from falling back to eager after 8."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < at_least:
            setattr(cfg, name, at_least)


class FastModelFromCheckpoint(Loader):
    """-> (FP32 module in eval mode, channels_last, on the device; checkpoint metadata)."""

    def __call__(self):
        from ..models.checkpoint import load_checkpoint
        from ..models.registry import import_torch_first

        import_torch_first()
        import torch

        if self.device == "cuda":
            if not torch.cuda.is_available():
                raise LungedgeError("--device cuda: no CUDA GPU is visible to PyTorch here")
            if self.precision == "bf16" and not torch.cuda.is_bf16_supported():
                raise LungedgeError(f"{torch.cuda.get_device_name(0)} has no BF16 support; use fp16")
        if self.threads:
            torch.set_num_threads(int(self.threads))
        model, meta = load_checkpoint(self.info.path, device=self.device)
        return model.float().eval().to(memory_format=torch.channels_last), meta


class TorchAmpRunner(TorchRunner):
    """Eager PyTorch with autocast and channels_last; pinned, asynchronous copies on CUDA."""

    loader_class = FastModelFromCheckpoint
    compiled = False

    @property
    def includes(self) -> str:
        cast = autocast_dtype(self.precision) or ("FP32, TF32 off" if self.device == "cuda" else "FP32")
        what = f"{'compiled ' if self.compiled else ''}forward ({cast}, channels_last)"
        if self.device == "cuda":
            return f"copy into pinned memory, host->device copy, {what}, device->host copy (one synchronisation)"
        return what

    def load(self) -> None:
        super().load()  # model, meta, torch; remembers the thread count to restore
        torch = self._torch
        self._autocast = getattr(torch, autocast_dtype(self.precision)) if autocast_dtype(self.precision) else None
        self._io = None
        if self.device == "cuda":
            from .cuda_io import PinnedIO

            self._tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                          torch.backends.cudnn.benchmark)
            if self.precision == "fp32":  # a row labelled FP32 computes in FP32
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            torch.backends.cudnn.benchmark = True
            self._io = PinnedIO(torch, memory_format=torch.channels_last)

    def forward_for(self, batch: int):
        """The callable that runs a device batch of this size (eager: the module itself)."""
        return self.model

    def _forward(self, xd):
        torch = self._torch
        fn = self.forward_for(int(xd.shape[0]))
        cast = torch.autocast(self.device, dtype=self._autocast) if self._autocast is not None else nullcontext()
        with torch.inference_mode(), cast:
            return fn(xd).float()

    def _infer(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        if self._io is None:  # CPU: no copies to make
            xd = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
            return self._forward(xd).numpy()
        y = self._forward(self._io.upload(x))
        return self._io.download(y)

    def timing_facts(self, batch: int, iters: int) -> dict:
        """For a bench row: how it ran, and on CUDA the forward alone timed with CUDA events (no copies)."""
        torch = self._torch
        facts = {"autocast": autocast_dtype(self.precision), "memory_format": "channels_last",
                 "compiled": self.compiled}
        if self.compiled:
            facts["compile_mode"] = compile_mode(self.device, batch)
        if self._io is None:
            return facts
        from ..timing import latency_stats

        _, xd = self._io.device_input((batch, *self.preprocessing.input_shape))
        times = []
        for _ in range(min(max(3, iters), 200)):  # enough for percentiles, bounded in time
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self._forward(xd)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        lat, ips = latency_stats(times, batch)
        facts["device_only_ms"] = lat
        facts["device_only_ips"] = ips
        return facts

    def close(self) -> None:
        torch = getattr(self, "_torch", None)
        if getattr(self, "_io", None) is not None:
            self._io.clear()
        if torch is not None and hasattr(self, "_tf32"):
            (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark) = self._tf32  # the process as the runner found it
        super().close()


class TorchCompileRunner(TorchAmpRunner):
    """:class:`TorchAmpRunner` compiled with ``torch.compile`` (CUDA graphs for small batches)."""

    compiled = True

    def load(self) -> None:
        why = compile_unavailable(self.device)
        if why:
            raise LungedgeError(f"backend torch-compile: {why}")
        super().load()
        _limit_recompiles(self._torch)
        self._compiled: dict = {}
        self.first_call_s: dict = {}

    def forward_for(self, batch: int):
        mode = compile_mode(self.device, batch)
        if mode not in self._compiled:
            self._compiled[mode] = self._torch.compile(self.model, mode=mode, dynamic=False)
        if mode == "reduce-overhead":  # a new CUDA-graph replay: earlier outputs may be overwritten
            self._torch.compiler.cudagraph_mark_step_begin()
        return self._compiled[mode]

    def _infer(self, x: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = super()._infer(x)
        self.first_call_s.setdefault(len(x), time.perf_counter() - t0)
        return out

    def timing_facts(self, batch: int, iters: int) -> dict:
        facts = super().timing_facts(batch, iters)
        facts["compile_s"] = self.first_call_s.get(batch)  # the first call: tracing, Inductor, autotuning
        return facts

    def close(self) -> None:
        self._compiled = {}
        super().close()
