"""PyTorch runner: a lungedge ``.pth`` checkpoint on CPU or CUDA, in FP32 or FP16 (CUDA only)."""

from __future__ import annotations

import numpy as np

from ..errors import LungedgeError
from .base import Runner


def weight_layers_torch(model) -> int:
    import torch

    return sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())


class TorchRunner(Runner):
    backend = "torch"

    @property
    def includes(self) -> str:
        if self.device == "cuda":
            return "host->device copy, forward, device->host copy (synchronised)"
        return "model forward only"

    def load(self) -> None:
        from ..models.checkpoint import load_checkpoint
        from ..models.registry import import_torch_first

        import_torch_first()
        import torch

        if self.precision not in ("fp32", "fp16"):
            raise LungedgeError(f"PyTorch runs fp32 or fp16, not {self.precision}; INT8 runs from the ONNX file")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise LungedgeError("--device cuda: no CUDA GPU is visible to PyTorch here")
        if self.device == "cpu" and self.precision == "fp16":
            raise LungedgeError("PyTorch FP16 runs on CUDA only; use --device cuda or the FP16 ONNX")
        if self.threads:
            torch.set_num_threads(int(self.threads))
        model, meta = load_checkpoint(self.info.path, device=self.device)
        self.meta = meta
        self.dtype = torch.float16 if self.precision == "fp16" else torch.float32
        self.model = model.to(dtype=self.dtype).eval()
        self._torch = torch

    def _infer(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            t = torch.from_numpy(x).to(self.device, dtype=self.dtype, non_blocking=False)
            out = self.model(t)
            return out.float().cpu().numpy()  # .cpu() waits for the GPU

    def threads_used(self):
        return self._torch.get_num_threads() if self.device == "cpu" else self.threads

    def describe(self) -> dict:
        from ..models.registry import get_spec

        spec = get_spec(self.info.architecture)
        total = sum(p.numel() for p in self.model.parameters())
        # trainable in the training run's mode (requires_grad as the checkpoint's mode set it)
        from ..models.registry import apply_mode

        apply_mode(spec, self.model, self.meta.get("mode") or spec.defaults.mode)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {"total_params": int(total), "trainable_params": int(trainable),
                "weight_layers": weight_layers_torch(self.model), "method": self.meta.get("mode"),
                "library": f"PyTorch {self._torch.__version__.split('+')[0]}"}

    def close(self) -> None:
        self.model = None
        if self.device == "cuda":
            self._torch.cuda.empty_cache()
