"""Files lungedge did not write, in the shapes the research group and other people hand over.

The group's four deliverables (random weights; the real architectures):

- ``densenet_lung_cancer.pth``: torchvision DenseNet121 state dict, 1,000-output head (7,978,856 parameters);
- ``inception_v3_lung_cancer.pth``: Inception v3 with its aux head kept (1,000 outputs), ``fc`` -> 3 (25,118,411);
- ``googlenet_model.pth``: GoogLeNet, ``fc`` -> 3, with or without ``aux1``/``aux2``;
- ``model_resnet50_20241016.h5``: Keras ResNet50 without top + average pooling + ``Dense(3, softmax)``,
  saved by plain Keras code (23,593,859 parameters, 6,147 trainable).

Torch is imported before Keras/TensorFlow in every function.
"""

from __future__ import annotations

from pathlib import Path

GROUP_CLASSES = "Benign,Malignant,Normal"


def densenet121_state_dict(path: Path, seed: int = 0):
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.densenet121(weights=None).eval()
    torch.save(model.state_dict(), path)
    return model


def _torchvision_state_dict(path: Path, name: str, features: int, seed: int, **kwargs):
    """torchvision's ``name`` with ``fc`` swapped for 3 outputs, saved as a plain state dict (as the group did)."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None, init_weights=False, **kwargs)
    model.fc = torch.nn.Linear(features, 3)
    model.eval()
    torch.save(model.state_dict(), path)
    return model


def inception_v3_with_aux(path: Path, seed: int = 0):
    return _torchvision_state_dict(path, "inception_v3", 2048, seed, aux_logits=True)


def googlenet_state_dict(path: Path, aux: bool = True, seed: int = 0):
    return _torchvision_state_dict(path, "googlenet", 1024, seed, aux_logits=aux)


def keras_resnet50_softmax(path: Path, size: int = 224, seed: int = 0, pooling: str = "avg",
                           activation: str = "softmax", rescale: bool = False):
    """The group's notebook: frozen ResNet50 base, Sequential with a softmax Dense(3), ``model.save``
    (``rescale``: a ``Rescaling(1/255)`` layer in front of the base, as many notebooks put one)."""
    import torch  # noqa: F401

    from lungedge.models.frameworks import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(seed)
    base = keras.applications.ResNet50(include_top=False, weights=None, pooling=pooling, input_shape=(size, size, 3))
    base.trainable = False
    front = [keras.layers.Rescaling(1 / 255.0)] if rescale else []
    model = keras.Sequential([keras.Input((size, size, 3)), *front, base, keras.layers.Dense(3, activation=activation)])
    model.save(path)
    return model


# -- tiny custom models --------------------------------------------------------------------------------

def tiny_keras(path: Path, size: int = 16, outputs: int = 3, activation: str | None = "softmax",
               channels: int = 3, seed: int = 0, rescale: bool = False, dropout_last: bool = False):
    """A small Keras CNN (functional), optionally rescaling its own input or ending in Dropout (after the Dense)."""
    import torch  # noqa: F401

    from lungedge.models.frameworks import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, channels))
    x = keras.layers.Rescaling(1 / 255.0)(inputs) if rescale else inputs
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(outputs, activation=activation)(x)
    out = keras.layers.Dropout(0.5)(out) if dropout_last else out
    model = keras.Model(inputs, out)
    model.save(path)
    return model


def tiny_torch(outputs: int = 3, channels: int = 3, seed: int = 0, final=None):
    import torch

    torch.manual_seed(seed)
    layers = [torch.nn.Conv2d(channels, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
              torch.nn.Linear(4, outputs)]
    if final is not None:
        layers.append(final)
    return torch.nn.Sequential(*layers).eval()


def torchscript_file(path: Path, model, size: int = 16, channels: int = 3):
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, torch.zeros(1, channels, size, size)), str(path))
    return path


def torch_export_file(path: Path, model, size: int = 16, channels: int = 3, dynamic: bool = True):
    """A torch.export program with a dynamic batch (or, ``dynamic=False``, exported on one image: batch 1 fixed)."""
    import torch

    if dynamic:
        batch = torch.export.Dim("batch", min=1, max=1024)
        ep = torch.export.export(model, (torch.zeros(2, channels, size, size),), dynamic_shapes=({0: batch},))
    else:
        ep = torch.export.export(model, (torch.zeros(1, channels, size, size),))
    torch.export.save(ep, str(path))
    return path


def onnx_file(path: Path, model, size: int = 16, channels: int = 3, names=("x", "y"), dtype=None, opset=None):
    """A plain ONNX (any input/output names, no lungedge metadata; input of ``dtype``, float32 by default;
    ``opset``: an old one, e.g. 9 or 11, as older scripts pass ``opset_version``)."""
    import torch

    torch.onnx.export(model, torch.zeros(1, channels, size, size, dtype=dtype), str(path), input_names=[names[0]],
                      output_names=[names[1]], dynamic_axes={names[0]: {0: "n"}, names[1]: {0: "n"}}, dynamo=False,
                      **({"opset_version": opset} if opset else {}))
    return path


def onnx_dynamo_file(path: Path, model, size: int = 16, channels: int = 3):
    """``torch.onnx.export`` as torch 2.9+ does by default (the dynamo exporter): the graph in ``path`` and its
    weights in the external data file ``path.data`` beside it; a dynamic batch."""
    import torch

    torch.onnx.export(model, (torch.zeros(2, channels, size, size),), str(path), external_data=True,
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    return path


class _TouchOnLoad:
    """Unpickling this calls ``open(marker, "w")``: the marker file exists iff the pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def torch_export_with_code(path: Path, program: Path, marker: Path, member: str = "sample_inputs/model.pt"):
    """``program`` (a torch.export .pt2) with ``member`` replaced by a torch.save pickle that runs code."""
    import io
    import zipfile

    import torch

    buf = io.BytesIO()
    torch.save(((torch.zeros(2, 3, 16, 16),), {"z": _TouchOnLoad(marker)}), buf)
    with zipfile.ZipFile(program) as src, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info, buf.getvalue() if info.filename.endswith(member) else src.read(info.filename))
    return path


def _wrapped(inner, forward):
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return forward(self.inner, x)

    return Wrapped().eval()


def uint8_input(model):
    """``model`` taking uint8 images (scaled inside)."""
    return _wrapped(model, lambda inner, x: inner(x.float() / 255))


def fixed_batch_one(outputs: int = 3, seed: int = 0):
    """tiny_torch's layers with a ``reshape(1, 4)`` that hard-codes batch 1 (as many fixed-batch exports do)."""
    model = tiny_torch(outputs=outputs, seed=seed)
    return _wrapped(model, lambda inner, x: inner[4](inner[2](inner[1](inner[0](x))).reshape(1, 4)))


def googlenet_training_checkpoint(path: Path, seed: int = 0, head=None, key: str = "model_state_dict",
                                  prefix: str = "model."):
    """GoogLeNet (3 classes, no aux heads) as fine-tuning scripts save it: its weights under ``key`` with
    every name prefixed (a wrapper module), the optimizer state and epoch beside them; ``head``: the
    ``fc`` module (e.g. ``nn.Sequential(nn.Dropout(0.5), nn.Linear(1024, 3))``)."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False, num_classes=3,
                                         transform_input=False)
    if head is not None:
        model.fc = head
    model.eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    model.zero_grad()
    state = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save({key: state, "optimizer_state_dict": opt.state_dict(), "epoch": 7, "best_acc": 0.91}, path)
    return model


def densenet121_old_names(state: dict) -> dict:
    """A torchvision DenseNet state dict with the pre-0.3 names (``norm.1`` for ``norm1``, ``conv.2``...)."""
    import re

    return {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))(\d)\.", r"\1.\2.", k): v for k, v in state.items()}


def rank4_output(outputs: int = 3, size: int = 16, seed: int = 0):
    """A fully convolutional classifier whose scores come out as (N, outputs, 1, 1) (no Flatten at the end)."""
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, outputs, size)).eval()


def softmax_first(model):
    """``model`` returning (softmax probabilities, logits): two outputs, the probabilities first."""
    import torch

    return _wrapped(model, lambda inner, x: (torch.softmax(inner(x), 1), inner(x)))


def keras_two_outputs(path: Path, size: int = 16, seed: int = 0):
    """A Keras model with two heads (class scores and a sigmoid), as multi-task code writes them."""
    import torch  # noqa: F401

    from lungedge.models.frameworks import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, activation="relu")(inputs))
    model = keras.Model(inputs, [keras.layers.Dense(3, name="classes")(x),
                                 keras.layers.Dense(1, activation="sigmoid", name="tumour")(x)])
    model.save(path)
    return model


def keras_lambda(path: Path, size: int = 16, seed: int = 0):
    """A small Keras CNN mapping its input to [-1, 1] with a Python ``Lambda`` layer (code in the file)."""
    import torch  # noqa: F401

    from lungedge.models.frameworks import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Lambda(lambda t: t * 2.0 - 1.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, activation="relu")(x))
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    model.save(path)
    return model


def keras_channels_first(path: Path, size: int = 16, seed: int = 0):
    """A small Keras CNN built ``data_format="channels_first"``: input (N, 3, H, W)."""
    import torch  # noqa: F401

    from lungedge.models.frameworks import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3, size, size))
    x = keras.layers.Conv2D(4, 3, activation="relu", data_format="channels_first")(inputs)
    x = keras.layers.GlobalAveragePooling2D(data_format="channels_first")(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    model.save(path)
    return model


def as_saved_on_cuda(src: Path, dst: Path) -> Path:
    """``src`` (a torch.save zip file of CPU tensors) as a GPU machine writes it: every storage's location
    ``cpu`` -> ``cuda:0`` in its pickle, so ``torch.load`` without ``map_location`` fails on a CPU-only machine."""
    import zipfile

    cpu, cuda = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"  # BINUNICODE, 4-byte length
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                assert cpu in data, "no CPU storage location in the pickle"
                data = data.replace(cpu, cuda)
            zout.writestr(info, data)
    return dst
