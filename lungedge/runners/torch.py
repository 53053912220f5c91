"""PyTorch backend: a lungedge ``.pth`` checkpoint on CPU or CUDA, in FP32 or FP16 (CUDA only)."""

from __future__ import annotations

import numpy as np

from ..errors import LungedgeError
from .base import Loader, Runner


def weight_layers_torch(model) -> int:
    import torch

    return sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())


class ModelFromCheckpoint(Loader):
    """-> (module in eval mode on the device, in the precision's dtype; checkpoint metadata)."""

    def __call__(self):
        from ..models.checkpoint import load_checkpoint
        from ..models.registry import import_torch_first

        import_torch_first()
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise LungedgeError("--device cuda: no CUDA GPU is visible to PyTorch here")
        if self.threads:
            torch.set_num_threads(int(self.threads))
        model, meta = load_checkpoint(self.info.path, device=self.device)
        dtype = torch.float16 if self.precision == "fp16" else torch.float32
        return model.to(dtype=dtype).eval(), meta


class TorchRunner(Runner):
    loader_class = ModelFromCheckpoint

    @property
    def includes(self) -> str:
        if self.device == "cuda":
            return "host->device copy, forward, device->host copy (synchronised)"
        return "model forward only"

    def load(self) -> None:
        import torch

        self._torch = torch
        self._threads_before = torch.get_num_threads()  # the loader may change it; close() puts it back
        self.model, self.meta = self.loader()
        self.dtype = next(self.model.parameters()).dtype

    def _infer(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            t = torch.from_numpy(x).to(self.device, dtype=self.dtype, non_blocking=False)
            return self.model(t).float().cpu().numpy()  # .cpu() waits for the GPU

    def threads_used(self):
        return self._torch.get_num_threads() if self.device == "cpu" else self.threads

    def describe(self) -> dict:
        from ..models.registry import apply_mode, get_spec

        spec = get_spec(self.info.architecture)
        total = sum(p.numel() for p in self.model.parameters())
        # trainable in the training run's mode (requires_grad as the checkpoint's mode set it)
        apply_mode(spec, self.model, self.meta.get("mode") or spec.defaults.mode)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {"total_params": int(total), "trainable_params": int(trainable),
                "weight_layers": weight_layers_torch(self.model), "method": self.meta.get("mode"),
                "library": f"PyTorch {self._torch.__version__.split('+')[0]}"}

    def close(self) -> None:
        self.model = None
        torch = getattr(self, "_torch", None)
        if torch is not None and getattr(self, "_threads_before", None):
            torch.set_num_threads(self._threads_before)  # a runner leaves the process as it found it
        if self.device == "cuda" and torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
