"""The model registry: one :class:`ModelSpec` per architecture, ``create(name, ...)`` and ``build_model``.

Like timm's registry, adding an architecture is one :func:`register` call below; like
torchvision's weights API, preprocessing travels with the weights (``spec.preprocessing_for(size,
weights)``), and every built model comes with its ``build`` record (constructor, the arguments
that change the function, head, weights name and meta) that checkpoints and ONNX files carry, so
that :func:`rebuild` gives the same function. Torch and Keras are imported only inside the builders
(torch always before tensorflow).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import check_choice
from ..preprocess import Preprocessing
from .builders import KerasApplication, TorchModule, Torchvision, resolve, small_cnn
from .frameworks import import_keras, import_torch_first
from .spec import (BUILD_FORMAT, CAFFE_BGR, FRAMEWORKS, MODES, NUM_CLASSES, TORCH_IMAGENET, Defaults, ModelSpec,
                   check_mode)
from .weights import WeightsFile, load_into, read_weights_file

REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.framework not in FRAMEWORKS:
        raise ValueError(f"unknown framework {spec.framework!r}")
    REGISTRY[spec.name] = spec
    return spec


register(ModelSpec(
    name="resnet50", framework="keras", title="ResNet50", builder=KerasApplication("ResNet50", pooling="avg"),
    preprocessing=CAFFE_BGR, defaults=Defaults(mode="transfer", epochs=100, batch_size=64, lr=1e-3),
    head="classifier", blocks=("conv5", "conv4", "conv3", "conv2"), min_size=32,
    notes="Keras; frozen backbone + Dense(3) on the pooled 2048 features"))
register(ModelSpec(
    name="googlenet", framework="torch", title="Inception v1 (GoogLeNet)",
    builder=Torchvision("googlenet", kwargs={"aux_logits": False, "init_weights": True}, recorded=("transform_input",),
                        foreign_kwargs={"transform_input": True}, aux_heads=("aux1", "aux2")),
    preprocessing=TORCH_IMAGENET, defaults=Defaults(mode="full", epochs=10, batch_size=32, lr=1e-3),
    head="fc", blocks=("inception5b", "inception5a", "inception4e", "inception4d", "inception4c",
                       "inception4b", "inception4a", "inception3b", "inception3a"), min_size=32))
register(ModelSpec(
    name="inception_v3", framework="torch", title="Inception v3",
    builder=Torchvision("inception_v3", kwargs={"aux_logits": False, "init_weights": True},
                        recorded=("transform_input",), foreign_kwargs={"transform_input": True},
                        aux_heads=("AuxLogits",)),
    preprocessing=TORCH_IMAGENET.with_size(299), defaults=Defaults(mode="transfer", epochs=100, batch_size=64, lr=1e-3),
    head="fc", blocks=("Mixed_7c", "Mixed_7b", "Mixed_7a", "Mixed_6e", "Mixed_6d", "Mixed_6c", "Mixed_6b", "Mixed_6a"),
    min_size=75))
register(ModelSpec(
    name="densenet121", framework="torch", title="DenseNet121", builder=Torchvision("densenet121"),
    preprocessing=TORCH_IMAGENET, defaults=Defaults(mode="transfer", epochs=100, batch_size=32, lr=1e-3),
    head="classifier", blocks=("features.norm5", "features.denseblock4", "features.transition3", "features.denseblock3"),
    min_size=32))
register(ModelSpec(
    name="smallcnn", framework="torch", title="plain 4-block CNN", builder=TorchModule(small_cnn),
    preprocessing=TORCH_IMAGENET.with_size(128), defaults=Defaults(mode="full", epochs=30, batch_size=32, lr=2e-3),
    head="fc", blocks=("block4", "block3", "block2", "block1"), min_size=16,
    notes="random-init baseline; not in the group's table"))


def names() -> list[str]:
    return list(REGISTRY)


def get_spec(name: str) -> ModelSpec:
    return REGISTRY[check_choice(name, REGISTRY, "model")]


def apply_mode(spec: ModelSpec, model, mode: str, unfreeze: int | str | None = None):
    """Set which parameters train (requires_grad for torch, ``trainable`` for Keras); return the model."""
    blocks = spec.unfrozen_blocks(mode, unfreeze)
    full = mode == "full" or unfreeze == "all"
    if spec.framework == "torch":
        for p in model.parameters():
            p.requires_grad = full
        for name in (spec.head, *blocks):
            for p in resolve(model, name).parameters():
                p.requires_grad = True
        return model
    # keras: the backbone is one nested Functional model; its stages are layer-name prefixes
    backbone = next(layer for layer in model.layers if hasattr(layer, "layers"))
    backbone.trainable = True
    for layer in backbone.layers:
        layer.trainable = full or any(layer.name.startswith(b + "_") for b in blocks)
        if layer.__class__.__name__ == "BatchNormalization" and not full:
            layer.trainable = False  # keep frozen BN statistics when fine-tuning
    if not full and not blocks:
        backbone.trainable = False
    model.get_layer(spec.head).trainable = True
    return model


@dataclass
class Built:
    """A freshly built model, its ``build`` record and the preprocessing its weights expect."""

    model: object
    build: dict
    preprocessing: Preprocessing


def build_model(name: str, num_classes: int = NUM_CLASSES, weights: str | None = "none", mode: str | None = None,
                image_size: int | None = None, unfreeze: int | str | None = None,
                kwargs: dict | None = None) -> Built:
    """Build a model: ``weights`` is "imagenet", "none" (random init) or a local weights file path;
    ``kwargs`` overrides constructor arguments (e.g. ``{"transform_input": False}``)."""
    spec = get_spec(name)
    mode = check_mode(mode or spec.defaults.mode)
    w = "none" if weights in (None, "none") else str(weights)
    wf = read_weights_file(spec, w) if w not in ("none", "imagenet") else None
    prep = _weights_preprocessing(spec, w, wf, image_size)
    model, build = spec.builder.build(spec, num_classes, prep.size, "imagenet" if w == "imagenet" else "none",
                                      {**(wf.kwargs if wf else {}), **(kwargs or {})})
    if wf is not None:
        load_into(spec, model, wf)
        build["weights"] = wf.record()
    return Built(apply_mode(spec, model, mode, unfreeze), build, prep)


def _weights_preprocessing(spec: ModelSpec, weights: str, wf: WeightsFile | None, size: int | None) -> Preprocessing:
    if wf is not None and wf.kind == "lungedge":
        from .files import read_torch_checkpoint

        meta = read_torch_checkpoint(wf.path)["meta"]
        if meta.get("preprocessing"):
            return Preprocessing.from_dict(meta["preprocessing"]).with_size(spec.check_size(size or meta["input_size"]))
    return spec.preprocessing_for(size, "imagenet" if weights == "imagenet" else "none")


def create(name: str, num_classes: int = NUM_CLASSES, weights: str | None = "none", mode: str | None = None,
           image_size: int | None = None, unfreeze: int | str | None = None, kwargs: dict | None = None):
    """Like :func:`build_model`, the model alone."""
    return build_model(name, num_classes, weights, mode, image_size, unfreeze, kwargs).model


def legacy_build(spec: ModelSpec, num_classes: int, size: int) -> dict:
    """The build a checkpoint written before builds were recorded implies: random-init arguments."""
    from .builders import record

    kw = dict(getattr(spec.builder, "kwargs", {}))
    if spec.framework == "keras":
        kw = {"include_top": False, "pooling": spec.builder.pooling}
    build = record(spec, getattr(spec.builder, "constructor", spec.name), kw, num_classes, size, {"name": "unknown"})
    build["legacy"] = True
    return build


def foreign_build(spec: ModelSpec, num_classes: int, size: int | None = None, overrides: dict | None = None) -> dict:
    """The build for a state dict lungedge did not write (torchvision's layout): the builder's
    ``foreign_kwargs`` (what torchvision sets for pretrained weights), then ``overrides``."""
    from .builders import record

    kw = {**getattr(spec.builder, "kwargs", {}), **getattr(spec.builder, "foreign_kwargs", {}), **(overrides or {})}
    if "init_weights" in kw:
        kw["init_weights"] = False
    return record(spec, getattr(spec.builder, "constructor", spec.name), kw, num_classes,
                  spec.check_size(size), {"name": "file", "layout": "plain", "assumed": kw})


def rebuild(build: dict):
    """The network a ``build`` record describes, randomly initialised (load the weights next)."""
    spec = get_spec(build["architecture"])
    return spec.builder.rebuild(spec, build)


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


__all__ = ["BUILD_FORMAT", "CAFFE_BGR", "MODES", "NUM_CLASSES", "REGISTRY", "TORCH_IMAGENET", "Built", "Defaults",
           "ModelSpec", "apply_mode", "build_model", "check_mode", "count_parameters", "create", "describe",
           "foreign_build", "get_spec", "import_keras", "import_torch_first", "legacy_build", "names", "rebuild",
           "register"]
