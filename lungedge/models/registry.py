"""The model registry: one :class:`ModelSpec` per architecture, and ``create(name, ...)``.

Like timm's registry, adding an architecture is one entry in :data:`REGISTRY`; like
torchvision's weights API, each spec carries its preprocessing (input size,
normalisation, channel order, layout), so no other module hard-codes 224 or ImageNet
means. Torch and Keras are imported only inside the builders (torch always before
tensorflow: importing tensorflow first makes a later torchvision import crash).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Callable

from ..errors import LungedgeError
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

FRAMEWORKS = ("torch", "keras")
MODES = ("transfer", "finetune", "full")
NUM_CLASSES = 3

# keras.applications.resnet50.preprocess_input ("caffe"): RGB->BGR, subtract the BGR means, no scaling
CAFFE_BGR = Preprocessing(size=224, mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0), scale=1.0,
                          channel_order="BGR", layout="NHWC")
TORCH_IMAGENET = Preprocessing(size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, scale=1.0 / 255.0,
                               channel_order="RGB", layout="NCHW")


@dataclass(frozen=True)
class Defaults:
    """Training defaults, from the research group's table."""

    mode: str
    epochs: int
    batch_size: int
    lr: float
    finetune_lr: float = 1e-4
    finetune_unfreeze: int = 2


@dataclass(frozen=True)
class ModelSpec:
    """One architecture: framework, builder, preprocessing, head and what trains in each mode.

    ``head`` names the classifier module (torch attribute or Keras layer name);
    ``blocks`` lists the backbone's top-level stages from the output side inwards:
    finetune mode unfreezes the head plus the first ``unfreeze`` of them, transfer
    mode only the head, full mode everything.
    """

    name: str
    framework: str
    title: str
    builder: Callable  # builder(spec, num_classes, weights, image_size) -> model
    preprocessing: Preprocessing
    defaults: Defaults
    head: str
    blocks: tuple[str, ...]
    min_size: int = 32
    weights_enum: str | None = None  # torchvision weights enum name, e.g. "GoogLeNet_Weights"
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def native_size(self) -> int:
        return self.preprocessing.size

    def preprocessing_for(self, image_size: int | None = None) -> Preprocessing:
        size = int(image_size or self.native_size)
        if size < self.min_size:
            raise LungedgeError(f"{self.name} needs inputs of at least {self.min_size} px, got {size}")
        return self.preprocessing.with_size(size)

    def trainable_rule(self, mode: str, unfreeze: int | str | None = None) -> str:
        """In words: what trains in ``mode``."""
        if mode == "transfer":
            return f"head ({self.head}) only"
        if mode == "full":
            return "all layers"
        blocks = self.unfrozen_blocks(mode, unfreeze)
        return f"head + {', '.join(blocks)}"

    def unfrozen_blocks(self, mode: str, unfreeze: int | str | None = None) -> tuple[str, ...]:
        check_mode(mode)
        if mode == "transfer":
            return ()
        if mode == "full" or unfreeze == "all":
            return self.blocks
        n = self.defaults.finetune_unfreeze if unfreeze is None else int(unfreeze)
        if n < 0:
            raise LungedgeError(f"--unfreeze must be a non-negative number of blocks or 'all', got {n}")
        return self.blocks[:n]


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise LungedgeError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    return mode


def import_torch_first():
    """Import torch and torchvision before anything imports tensorflow (else a later import segfaults)."""
    import torch  # noqa: F401
    import torchvision  # noqa: F401


@contextlib.contextmanager
def _native_stderr_muted():
    """Send what native code writes to file descriptor 2 to a temporary file; replay it on failure."""
    import os
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def import_keras():
    """Import keras (torch first), with TensorFlow's start-up chatter and the legacy-HDF5 notice muted."""
    import os

    import_torch_first()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow's C++ logger ignores TF_CPP_MIN_LOG_LEVEL while it is imported
    with _native_stderr_muted() if "keras" not in sys.modules else contextlib.nullcontext():
        import keras

    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:
        pass
    return keras


# -- builders -------------------------------------------------------------------------------------

def _torchvision_weights(spec: ModelSpec, weights):
    """'imagenet' -> the torchvision weights enum (downloaded and cached by torchvision)."""
    import torchvision.models as tvm

    if weights != "imagenet":
        return None
    return getattr(tvm, spec.weights_enum).IMAGENET1K_V1


def _download_error(spec: ModelSpec, exc: Exception) -> LungedgeError:
    return LungedgeError(
        f"could not download the ImageNet weights of {spec.name} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
        "offline? use --weights PATH (a local weights file) or --weights none (random init)"
    )


def _replace_linear(model, attr: str, num_classes: int):
    import torch.nn as nn

    old = getattr(model, attr)
    setattr(model, attr, nn.Linear(old.in_features, num_classes))


def _build_torchvision(spec: ModelSpec, num_classes: int, weights, image_size: int):
    import_torch_first()
    import torchvision.models as tvm

    fn = getattr(tvm, spec.extra["fn"])
    kwargs = dict(spec.extra.get("kwargs", {}))
    tv_weights = _torchvision_weights(spec, weights)
    try:
        if tv_weights is None:
            model = fn(weights=None, num_classes=num_classes, **kwargs)
        else:
            # ImageNet weights come with a 1000-class head (and, for the Inceptions, their aux heads)
            model = fn(weights=tv_weights, **{k: v for k, v in kwargs.items() if k not in ("aux_logits", "init_weights")})
            if hasattr(model, "aux_logits"):
                model.aux_logits = False
                for aux in ("AuxLogits", "aux1", "aux2"):
                    if hasattr(model, aux):
                        setattr(model, aux, None)
            _replace_linear(model, spec.head, num_classes)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        if tv_weights is None:
            raise
        raise _download_error(spec, exc) from None
    return model


def _build_small_cnn(spec: ModelSpec, num_classes: int, weights, image_size: int):
    """A plain 4-block CNN (conv-BN-ReLU + max-pool per block), global average pool, linear head."""
    import_torch_first()
    import torch.nn as nn

    if weights == "imagenet":
        raise LungedgeError("smallcnn has no ImageNet weights; use --weights none or --weights PATH")

    def block(cin, cout):
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )

    class SmallCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.block1, self.block2, self.block3, self.block4 = block(3, 32), block(32, 64), block(64, 128), block(128, 256)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.dropout = nn.Dropout(0.3)
            self.fc = nn.Linear(256, num_classes)

        def forward(self, x):
            x = self.block4(self.block3(self.block2(self.block1(x))))
            return self.fc(self.dropout(self.pool(x).flatten(1)))

    return SmallCNN()


def _build_keras_resnet50(spec: ModelSpec, num_classes: int, weights, image_size: int):
    keras = import_keras()

    base_weights = "imagenet" if weights == "imagenet" else None
    try:
        base = keras.applications.ResNet50(include_top=False, weights=base_weights, pooling="avg",
                                           input_shape=(image_size, image_size, 3))
    except Exception as exc:  # urllib / http errors when offline
        if base_weights is None:
            raise
        raise _download_error(spec, exc) from None
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = base(inputs)
    outputs = keras.layers.Dense(num_classes, name=spec.head)(x)  # logits
    return keras.Model(inputs, outputs, name="resnet50_lungedge")


# -- the registry ---------------------------------------------------------------------------------

REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.framework not in FRAMEWORKS:
        raise ValueError(f"unknown framework {spec.framework!r}")
    REGISTRY[spec.name] = spec
    return spec


register(ModelSpec(
    name="resnet50", framework="keras", title="ResNet50", builder=_build_keras_resnet50,
    preprocessing=CAFFE_BGR, defaults=Defaults(mode="transfer", epochs=100, batch_size=64, lr=1e-3),
    head="classifier", blocks=("conv5", "conv4", "conv3", "conv2"), min_size=32,
    notes="Keras; frozen backbone + Dense(3) on the pooled 2048 features"))
register(ModelSpec(
    name="googlenet", framework="torch", title="Inception v1 (GoogLeNet)", builder=_build_torchvision,
    preprocessing=TORCH_IMAGENET, defaults=Defaults(mode="full", epochs=10, batch_size=32, lr=1e-3),
    head="fc", blocks=("inception5b", "inception5a", "inception4e", "inception4d", "inception4c",
                       "inception4b", "inception4a", "inception3b", "inception3a"),
    min_size=32, weights_enum="GoogLeNet_Weights",
    extra={"fn": "googlenet", "kwargs": {"aux_logits": False, "init_weights": True}}))
register(ModelSpec(
    name="inception_v3", framework="torch", title="Inception v3", builder=_build_torchvision,
    preprocessing=TORCH_IMAGENET.with_size(299), defaults=Defaults(mode="transfer", epochs=100, batch_size=64, lr=1e-3),
    head="fc", blocks=("Mixed_7c", "Mixed_7b", "Mixed_7a", "Mixed_6e", "Mixed_6d", "Mixed_6c", "Mixed_6b", "Mixed_6a"),
    min_size=75, weights_enum="Inception_V3_Weights",
    extra={"fn": "inception_v3", "kwargs": {"aux_logits": False, "init_weights": True}}))
register(ModelSpec(
    name="densenet121", framework="torch", title="DenseNet121", builder=_build_torchvision,
    preprocessing=TORCH_IMAGENET, defaults=Defaults(mode="transfer", epochs=100, batch_size=32, lr=1e-3),
    head="classifier", blocks=("features.norm5", "features.denseblock4", "features.transition3", "features.denseblock3"),
    min_size=32, weights_enum="DenseNet121_Weights", extra={"fn": "densenet121"}))
register(ModelSpec(
    name="smallcnn", framework="torch", title="plain 4-block CNN", builder=_build_small_cnn,
    preprocessing=TORCH_IMAGENET.with_size(128), defaults=Defaults(mode="full", epochs=30, batch_size=32, lr=2e-3),
    head="fc", blocks=("block4", "block3", "block2", "block1"), min_size=16,
    notes="random-init baseline; not in the group's table"))


def names() -> list[str]:
    return list(REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise LungedgeError(f"unknown model {name!r} (choose from {', '.join(REGISTRY)})") from None


def _resolve(model, dotted: str):
    for part in dotted.split("."):
        model = getattr(model, part)
    return model


def apply_mode(spec: ModelSpec, model, mode: str, unfreeze: int | str | None = None):
    """Set which parameters train (requires_grad for torch, ``trainable`` for Keras); return the model."""
    blocks = spec.unfrozen_blocks(mode, unfreeze)
    if spec.framework == "torch":
        full = mode == "full" or unfreeze == "all"
        for p in model.parameters():
            p.requires_grad = full
        for name in (spec.head, *blocks):
            for p in _resolve(model, name).parameters():
                p.requires_grad = True
        return model
    # keras: the backbone is one nested Functional model; its stages are layer-name prefixes
    backbone = next(layer for layer in model.layers if hasattr(layer, "layers"))
    full = mode == "full" or unfreeze == "all"
    backbone.trainable = True
    for layer in backbone.layers:
        lname = layer.name
        layer.trainable = full or any(lname.startswith(b + "_") for b in blocks)
        if layer.__class__.__name__ == "BatchNormalization" and not full:
            layer.trainable = False  # keep frozen BN statistics when fine-tuning
    if not full and not blocks:
        backbone.trainable = False
    model.get_layer(spec.head).trainable = True
    return model


def create(name: str, num_classes: int = NUM_CLASSES, weights: str | None = "none", mode: str | None = None,
           image_size: int | None = None, unfreeze: int | str | None = None):
    """Build a model: ``weights`` is "imagenet", "none" (random init) or a local weights file path."""
    spec = get_spec(name)
    mode = check_mode(mode or spec.defaults.mode)
    size = spec.preprocessing_for(image_size).size
    w = "none" if weights in (None, "none") else weights
    model = spec.builder(spec, num_classes, "imagenet" if w == "imagenet" else None, size)
    if w not in ("none", "imagenet"):
        from .checkpoint import load_weights_file

        load_weights_file(spec, model, w)
    return apply_mode(spec, model, mode, unfreeze)


def count_parameters(spec: ModelSpec, model) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    if spec.framework == "torch":
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return int(total), int(trainable)
    total = int(model.count_params())
    trainable = int(sum(int(w.numpy().size) for w in model.trainable_weights))
    return total, trainable


def describe(name: str, mode: str | None = None, image_size: int | None = None) -> dict:
    """One row of ``lungedge models``: framework, sizes, preprocessing, parameter counts (random init)."""
    spec = get_spec(name)
    mode = mode or spec.defaults.mode
    # parameter counts do not depend on the input size: build small, it is faster
    model = create(name, weights="none", mode=mode, image_size=image_size or max(spec.min_size, 96))
    total, trainable = count_parameters(spec, model)
    d = spec.defaults
    return {
        "name": spec.name, "title": spec.title, "framework": spec.framework, "native_size": spec.native_size,
        "mode": mode, "trains": spec.trainable_rule(mode), "total_params": total, "trainable_params": trainable,
        "defaults": {"mode": d.mode, "epochs": d.epochs, "batch_size": d.batch_size, "lr": d.lr},
        "preprocessing": spec.preprocessing.to_dict(), "notes": spec.notes,
    }
