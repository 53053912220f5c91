"""Keras runner: a lungedge ``.h5`` checkpoint on CPU or GPU (TensorFlow backend), FP32."""

from __future__ import annotations

import numpy as np

from ..errors import LungedgeError
from .base import Runner


def weight_layers_keras(model) -> int:
    n = 0
    for layer in model.layers:
        if hasattr(layer, "layers"):
            n += weight_layers_keras(layer)
        elif layer.__class__.__name__ in ("Conv2D", "Dense", "DepthwiseConv2D", "SeparableConv2D"):
            n += 1
    return n


class KerasRunner(Runner):
    backend = "keras"

    @property
    def includes(self) -> str:
        if self.device == "cuda":
            return "host->device copy, forward, device->host copy"
        return "model forward only (eager call, training=False)"

    def load(self) -> None:
        from ..models.checkpoint import load_checkpoint
        from ..models.registry import import_keras

        if self.precision != "fp32":
            raise LungedgeError(f"the Keras runner runs fp32 only, not {self.precision}; use the ONNX files")
        import_keras()
        import tensorflow as tf

        if self.threads:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(int(self.threads))
                tf.config.threading.set_inter_op_parallelism_threads(1)
            except RuntimeError:
                pass  # TensorFlow already started: its thread pools are fixed for this process
        if self.device == "cuda" and not tf.config.list_physical_devices("GPU"):
            raise LungedgeError("--device cuda: no GPU is visible to TensorFlow here")
        self._tf = tf
        self._where = "/GPU:0" if self.device == "cuda" else "/CPU:0"
        with tf.device(self._where):
            self.model, self.meta = load_checkpoint(self.info.path)

        @tf.function(reduce_retracing=True)
        def forward(x):
            return self.model(x, training=False)

        self._forward = forward

    def _infer(self, x: np.ndarray) -> np.ndarray:
        with self._tf.device(self._where):
            return self._forward(self._tf.constant(x)).numpy()

    def threads_used(self):
        v = self._tf.config.threading.get_intra_op_parallelism_threads()
        return v or self.threads

    def describe(self) -> dict:
        import keras

        total = int(self.model.count_params())
        trainable = int(sum(int(np.prod(w.shape)) for w in self.model.trainable_weights))
        return {"total_params": total, "trainable_params": trainable,
                "weight_layers": weight_layers_keras(self.model), "method": self.meta.get("mode"),
                "library": f"Keras {keras.__version__} (TensorFlow {self._tf.__version__})"}

    def close(self) -> None:
        self.model = None
        self._forward = None
