"""Builders: how each kind of registry entry constructs its network and records that construction.

Every builder has the same three methods:

- ``build(spec, num_classes, size, weights, kwargs)`` -> ``(model, build)``: construct the network
  (``weights`` is "imagenet" or "none"; ``kwargs`` overrides the constructor arguments) and return
  the ``build`` record: the constructor, the arguments that change the function, the head and the
  weights' name and meta (as timm's ``pretrained_cfg`` and torchvision's ``weights.meta`` do);
- ``rebuild(spec, build)`` -> model: the same function again, randomly initialised, from the record
  alone (:func:`lungedge.models.checkpoint.load_checkpoint` then loads the weights);
- ``preprocessing(spec, weights)``: the input those weights expect.

``foreign_kwargs`` are the constructor arguments a weights file in the framework's own layout
(e.g. torchvision's ImageNet file) implies: what the framework itself sets for pretrained weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import LungedgeError
from ..preprocess import Preprocessing
from .frameworks import import_keras, import_torch_first
from .spec import BUILD_FORMAT


def download_error(spec, exc: Exception) -> LungedgeError:
    return LungedgeError(
        f"could not download the ImageNet weights of {spec.name} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
        "offline? use --weights PATH (a local weights file) or --weights none (random init)"
    )


def resolve(model, dotted: str):
    """The submodule (or Keras layer) at a dotted path."""
    for part in dotted.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


def record(spec, constructor: str, kwargs: dict, num_classes: int, size: int, weights: dict, **head) -> dict:
    import json

    build = {"format": BUILD_FORMAT, "architecture": spec.name, "framework": spec.framework,
            "constructor": constructor, "kwargs": dict(sorted(kwargs.items())),
            "head": {"path": spec.head, "num_classes": int(num_classes), **head}, "input_size": int(size),
            "weights": weights}
    return json.loads(json.dumps(build))  # plain JSON values, as stored in checkpoints and ONNX


@dataclass(frozen=True)
class Torchvision:
    """A ``torchvision.models`` constructor with its weights enum (``get_model_weights(fn).DEFAULT``).

    ``kwargs``: constructor arguments for a random init; ``recorded``: attributes read back from
    the built model into the record (torchvision sets ``transform_input=True`` for ImageNet
    weights); ``foreign_kwargs``: what a state dict in torchvision's ImageNet layout implies;
    ``aux_heads``: training-only classifiers, dropped with ImageNet weights.
    """

    fn: str
    kwargs: dict = field(default_factory=dict)
    recorded: tuple[str, ...] = ()
    foreign_kwargs: dict = field(default_factory=dict)
    aux_heads: tuple[str, ...] = ()

    @property
    def constructor(self) -> str:
        return f"torchvision.models.{self.fn}"

    def weights_enum(self, tag: str = "DEFAULT"):
        import torchvision.models as tvm

        return getattr(tvm.get_model_weights(self.fn), tag)

    def preprocessing(self, spec, weights: str) -> Preprocessing:
        """The input the DEFAULT ImageNet weights were trained with (crop size, mean, std)."""
        t = self.weights_enum().transforms()
        return spec.preprocessing.__class__(size=int(t.crop_size[0]), mean=tuple(t.mean), std=tuple(t.std),
                                            scale=1.0 / 255.0, channel_order="RGB", layout="NCHW")

    def _read_back(self, model, kwargs: dict) -> dict:
        return {**kwargs, **{a: getattr(model, a) for a in self.recorded if hasattr(model, a)}}

    def build(self, spec, num_classes: int, size: int, weights: str, kwargs: dict | None = None):
        import_torch_first()
        import torchvision.models as tvm

        fn = getattr(tvm, self.fn)
        if weights != "imagenet":
            kw = {**self.kwargs, **(kwargs or {})}
            model = fn(weights=None, num_classes=num_classes, **kw)
            return model, record(spec, self.constructor, self._read_back(model, kw), num_classes, size, {"name": "none"})
        enum = self.weights_enum()
        kw = dict(kwargs or {})  # torchvision sets its own pretrained arguments (aux heads dropped: aux_logits=False)
        try:
            model = fn(weights=enum, **kw)
        except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
            raise download_error(spec, exc) from None
        replace_linear(model, spec.head, num_classes)
        used = {**{k: v for k, v in self.kwargs.items() if k != "init_weights"}, **kw}
        if "init_weights" in self.kwargs:
            used["init_weights"] = False  # what torchvision passes with weights
        return model, record(spec, self.constructor, self._read_back(model, used), num_classes, size,
                             weights_record(enum))

    def rebuild(self, spec, build: dict):
        import_torch_first()
        import torchvision.models as tvm

        return getattr(tvm, self.fn)(weights=None, num_classes=int(build["head"]["num_classes"]), **build["kwargs"])


def weights_record(enum) -> dict:
    """Name and meta of torchvision weights (the categories list left out, its length kept)."""
    t = enum.transforms()
    meta = {k: v for k, v in enum.meta.items() if k in ("num_params", "min_size", "recipe", "_file_size")}
    meta["num_categories"] = len(enum.meta.get("categories") or [])
    meta["transforms"] = {"crop_size": list(t.crop_size), "resize_size": list(t.resize_size),
                          "mean": list(t.mean), "std": list(t.std), "interpolation": t.interpolation.value}
    return {"name": f"{type(enum).__name__}.{enum.name}", "source": "torchvision", "url": enum.url,
            "meta": meta}


def replace_linear(model, path: str, num_classes: int):
    """Swap the ``nn.Linear`` at ``path`` (the spec's declared head) for one with ``num_classes`` outputs."""
    import torch.nn as nn

    parent_path, _, leaf = path.rpartition(".")
    parent = resolve(model, parent_path) if parent_path else model
    old = resolve(parent, leaf)
    if not isinstance(old, nn.Linear):
        raise LungedgeError(f"the declared head {path!r} is a {type(old).__name__}, not a Linear layer")
    new = nn.Linear(old.in_features, num_classes)
    if leaf.isdigit():
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


@dataclass(frozen=True)
class KerasApplication:
    """A ``keras.applications`` backbone without its top, global pooling and a ``Dense`` head (logits)."""

    application: str
    pooling: str = "avg"
    model_name: str = "lungedge"

    def preprocessing(self, spec, weights: str) -> Preprocessing:
        return spec.preprocessing  # keras.applications weights share the application's preprocess_input

    def build(self, spec, num_classes: int, size: int, weights: str, kwargs: dict | None = None):
        keras = import_keras()
        kw = {"include_top": False, "pooling": self.pooling, **(kwargs or {})}
        try:
            base = getattr(keras.applications, self.application)(
                weights="imagenet" if weights == "imagenet" else None, input_shape=(size, size, 3), **kw)
        except Exception as exc:  # urllib / http errors when offline
            if weights != "imagenet":
                raise
            raise download_error(spec, exc) from None
        inputs = keras.Input(shape=(size, size, 3), name="image")
        outputs = keras.layers.Dense(num_classes, name=spec.head)(base(inputs))  # logits
        model = keras.Model(inputs, outputs, name=f"{spec.name}_{self.model_name}")
        w = {"name": "imagenet", "source": "keras.applications"} if weights == "imagenet" else {"name": "none"}
        return model, record(spec, f"keras.applications.{self.application}", kw, num_classes, size, w,
                             activation="linear")

    def rebuild(self, spec, build: dict):
        model, _ = self.build(spec, int(build["head"]["num_classes"]), int(build["input_size"]), "none",
                              build["kwargs"])
        return model


@dataclass(frozen=True)
class TorchModule:
    """A network defined in lungedge (``factory(num_classes, **kwargs)``); no ImageNet weights."""

    factory: object
    kwargs: dict = field(default_factory=dict)

    def preprocessing(self, spec, weights: str) -> Preprocessing:
        raise LungedgeError(f"{spec.name} has no ImageNet weights; use --weights none or --weights PATH")

    def build(self, spec, num_classes: int, size: int, weights: str, kwargs: dict | None = None):
        if weights == "imagenet":
            self.preprocessing(spec, weights)
        import_torch_first()
        kw = {**self.kwargs, **(kwargs or {})}
        model = self.factory(num_classes, **kw)
        return model, record(spec, f"lungedge.models.builders.{self.factory.__name__}", kw, num_classes, size,
                             {"name": "none"})

    def rebuild(self, spec, build: dict):
        import_torch_first()
        return self.factory(int(build["head"]["num_classes"]), **build["kwargs"])


def small_cnn(num_classes: int, widths: tuple = (32, 64, 128, 256), dropout: float = 0.3):
    """A plain 4-block CNN (conv-BN-ReLU + max-pool per block), global average pool, linear head."""
    import torch.nn as nn

    def block(cin, cout):
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )

    class SmallCNN(nn.Module):
        def __init__(self):
            super().__init__()
            w = (3, *widths)
            self.block1, self.block2, self.block3, self.block4 = (block(w[i], w[i + 1]) for i in range(4))
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.dropout = nn.Dropout(dropout)
            self.fc = nn.Linear(w[-1], num_classes)

        def forward(self, x):
            x = self.block4(self.block3(self.block2(self.block1(x))))
            return self.fc(self.dropout(self.pool(x).flatten(1)))

    return SmallCNN()
