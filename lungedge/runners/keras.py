"""Keras backend: a lungedge ``.h5`` checkpoint on CPU or GPU (TensorFlow backend), FP32."""

from __future__ import annotations

import numpy as np

from ..errors import LungedgeError
from .base import Loader, Runner


def weight_layers_keras(model) -> int:
    n = 0
    for layer in model.layers:
        if hasattr(layer, "layers"):
            n += weight_layers_keras(layer)
        elif layer.__class__.__name__ in ("Conv2D", "Dense", "DepthwiseConv2D", "SeparableConv2D"):
            n += 1
    return n


def device_name(device: str) -> str:
    return "/GPU:0" if device == "cuda" else "/CPU:0"


class ModelFromH5(Loader):
    """-> (Keras model placed on the device, checkpoint metadata)."""

    def __call__(self):
        from ..models.checkpoint import load_checkpoint
        from ..models.frameworks import set_tensorflow_threads
        from ..models.registry import import_keras

        import_keras()
        import tensorflow as tf

        set_tensorflow_threads(self.threads)
        if self.device == "cuda" and not tf.config.list_physical_devices("GPU"):
            raise LungedgeError("--device cuda: no GPU is visible to TensorFlow here")
        with tf.device(device_name(self.device)):
            return load_checkpoint(self.info.path)


class KerasRunner(Runner):
    loader_class = ModelFromH5

    @property
    def includes(self) -> str:
        if self.device == "cuda":
            return "host->device copy, forward, device->host copy"
        return "model forward only (tf.function, training=False)"

    def load(self) -> None:
        self.model, self.meta = self.loader()
        import tensorflow as tf

        self._tf = tf
        model = self.model

        @tf.function(reduce_retracing=True)
        def forward(x):
            return model(x, training=False)

        self._forward = forward

    def _infer(self, x: np.ndarray) -> np.ndarray:
        with self._tf.device(device_name(self.device)):
            return self._forward(self._tf.constant(x)).numpy()

    def threads_used(self):
        return self._tf.config.threading.get_intra_op_parallelism_threads() or self.threads

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
