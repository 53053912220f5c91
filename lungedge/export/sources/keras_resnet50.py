"""A Keras ResNet50 ``.h5`` to ONNX without TensorFlow: its weights read with h5py into the same network
written in PyTorch, exported by ``torch.onnx`` (issue #14).

tf2onnx's conversion of a ResNet50 alone takes more than 3.8 GB; reading 94 MB of weights and tracing a
PyTorch module takes about 1.5 GB (PyTorch included), and runs where TensorFlow is not installed. It applies only to a
file whose saved configuration is exactly ``keras.applications.ResNet50`` (v1: the stride on the first
1x1 convolution of a block, biased convolutions, the file's own BatchNorm epsilons) followed by global
average pooling, optional dropout and one ``Dense`` layer (linear, softmax or sigmoid): the group's
notebook model, and lungedge's own ``resnet50`` checkpoints. Anything else (another layer type or head,
other weight shapes, a ``.keras`` archive) is left to tf2onnx: :func:`inspect` raises :class:`NotResNet50`;
``LUNGEDGE_KERAS_CONVERTER=tf2onnx`` sends every file there. The export then compares the ONNX with the
Keras model itself (parity), as for any converter.

Input: NHWC float, as the Keras model takes it (lungedge's preprocessing does the caffe BGR/mean step).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NAME = "lungedge's Keras ResNet50 reader (h5py + torch.onnx)"
STAGES = (("conv2", 64, 3, 1), ("conv3", 128, 4, 2), ("conv4", 256, 6, 2), ("conv5", 512, 3, 2))
HEAD_ACTIVATIONS = ("linear", "softmax", "sigmoid")
# layer classes a plain ResNet50 + head holds; any other means "not this network": tf2onnx converts it
KNOWN = {"InputLayer", "Functional", "Model", "Sequential", "ZeroPadding2D", "Conv2D", "BatchNormalization",
         "Activation", "MaxPooling2D", "Add", "GlobalAveragePooling2D", "Dropout", "Dense"}


class NotResNet50(Exception):
    """The file is not (exactly) a Keras ResNet50 + head: the reason, for the log."""


def _layers(config: dict) -> list[dict]:
    """Every layer of a saved model config, nested models flattened, in order."""
    out = []
    inner = config.get("config", {})
    for layer in inner if isinstance(inner, list) else inner.get("layers", []):  # Keras 2.2 Sequential: a list
        out.append(layer)
        if layer.get("class_name") in ("Functional", "Model", "Sequential"):
            out += _layers(layer)
    return out


def _weights(group) -> dict[str, dict[str, np.ndarray]]:
    """{layer name: {"kernel"/"bias"/"gamma"/...: array}} from an h5 ``model_weights`` group, Keras 2
    ("conv1_conv/kernel:0") and Keras 3 ("conv1_conv/kernel", "sequential/dense/kernel") names alike."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for name in group:
        g = group[name]
        for wn in g.attrs.get("weight_names", []):
            wn = wn.decode() if isinstance(wn, bytes) else str(wn)
            parts = wn.split("/")
            if len(parts) < 2:
                raise NotResNet50(f"unexpected weight name {wn!r}")
            out.setdefault(parts[-2], {})[parts[-1].split(":")[0]] = np.asarray(g[wn], dtype=np.float32)
    return out


def _check_conv(cfg: dict, kernel: int, stride: int, padding: str) -> None:
    c = cfg["config"]
    ks, st = tuple(c.get("kernel_size", ())), tuple(c.get("strides", ()))
    if ks != (kernel, kernel) or st != (stride, stride) or c.get("padding", "valid").lower() != padding \
            or not c.get("use_bias", True) or tuple(c.get("dilation_rate", (1, 1))) != (1, 1) \
            or c.get("groups", 1) != 1 or (c.get("activation") or "linear") != "linear" \
            or c.get("data_format", "channels_last") != "channels_last":
        raise NotResNet50(f"layer {c.get('name')} is not ResNet50's {kernel}x{kernel}/{stride} {padding} convolution")


@dataclass
class Reading:
    """What the file holds, read without TensorFlow: enough to describe the model and to rebuild it."""

    size: int | None  # input side in pixels (None: any)
    outputs: int  # units of the Dense head
    activation: str  # linear | softmax | sigmoid
    parameters: int  # every weight, BatchNorm statistics included (Keras's count_params)
    weights: dict = field(repr=False, default_factory=dict)
    eps: dict = field(repr=False, default_factory=dict)
    head: str = ""

    def module(self):
        """The network in PyTorch (eval mode), NHWC float in, the Keras model's output out."""
        try:
            return _module(self.weights, self.eps, self.head, self.activation)
        except KeyError as exc:  # e.g. a BatchNormalization without scale or centre
            raise NotResNet50(f"weights missing: {exc}") from None


def inspect(path: Path) -> Reading:
    """The :class:`Reading` of a plain Keras ResNet50 + head ``.h5``; :class:`NotResNet50` otherwise."""
    import os

    import h5py

    if os.environ.get("LUNGEDGE_KERAS_CONVERTER") == "tf2onnx":
        raise NotResNet50("LUNGEDGE_KERAS_CONVERTER=tf2onnx")
    if Path(path).suffix.lower() not in (".h5", ".hdf5"):
        raise NotResNet50("not an .h5 file")
    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
            if raw is None or "model_weights" not in f:
                raise NotResNet50("no model configuration or weights in the file")
            config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
            weights = _weights(f["model_weights"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # not HDF5, truncated, odd
        raise NotResNet50(f"unreadable here ({type(exc).__name__})") from None  # attributes: Keras's loader says why
    try:
        return _check(config, weights)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:  # a configuration of another shape
        raise NotResNet50(f"an unexpected configuration ({type(exc).__name__}: {exc})") from None


def _expected_shapes() -> dict[str, tuple]:
    """ResNet50's convolution kernels (kh, kw, in, out), by layer name; each BatchNormalization after
    one (the same name with ``_bn``) has that layer's output width."""
    shapes, width = {"conv1_conv": (7, 7, 3, 64)}, 64
    for s, f, n, _ in STAGES:
        for b in range(1, n + 1):
            name = f"{s}_block{b}"
            if b == 1:
                shapes[f"{name}_0_conv"] = (1, 1, width, 4 * f)
            shapes[f"{name}_1_conv"] = (1, 1, width, f)
            shapes[f"{name}_2_conv"] = (3, 3, f, f)
            shapes[f"{name}_3_conv"] = (1, 1, f, 4 * f)
            width = 4 * f
    return shapes


def _check(config: dict, weights: dict) -> "Reading":
    layers = _layers(config)
    unknown = sorted({str(ly.get("class_name")) for ly in layers} - KNOWN)
    if unknown:
        raise NotResNet50(f"layers of other kinds: {', '.join(unknown)}")
    by_name = {ly["config"].get("name"): ly for ly in layers}
    dense = [ly for ly in layers if ly["class_name"] == "Dense"]
    pools = [ly for ly in layers if ly["class_name"] == "GlobalAveragePooling2D"]
    if len(dense) != 1 or len(pools) != 1 or layers[-1] is not dense[0]:
        raise NotResNet50("not one global average pooling and one final Dense layer")
    act = dense[0]["config"].get("activation") or "linear"
    if act not in HEAD_ACTIVATIONS or not dense[0]["config"].get("use_bias", True):
        raise NotResNet50(f"head activation {act!r}")
    activations = {ly["config"].get("activation") for ly in layers if ly["class_name"] == "Activation"}
    if activations - {"relu"}:
        raise NotResNet50(f"activations other than relu: {sorted(map(str, activations - {'relu'}))}")
    convs = [ly for ly in layers if ly["class_name"] == "Conv2D"]
    shapes = _expected_shapes()
    if sorted(c["config"]["name"] for c in convs) != sorted(shapes):
        raise NotResNet50("its convolutions are not ResNet50's (names or count)")
    _check_conv(by_name["conv1_conv"], 7, 2, "valid")
    for s, _, n, stride in STAGES:
        for b in range(1, n + 1):
            st = stride if b == 1 else 1
            if b == 1:
                _check_conv(by_name[f"{s}_block1_0_conv"], 1, st, "valid")
            _check_conv(by_name[f"{s}_block{b}_1_conv"], 1, st, "valid")
            _check_conv(by_name[f"{s}_block{b}_2_conv"], 3, 1, "same")
            _check_conv(by_name[f"{s}_block{b}_3_conv"], 1, 1, "valid")
    _check_stem(layers, by_name)
    for name, shape in shapes.items():
        bn = weights.get(name.replace("_conv", "_bn"), {})
        if tuple(weights.get(name, {}).get("kernel", np.zeros(0)).shape) != shape \
                or tuple(weights[name].get("bias", np.zeros(0)).shape) != shape[-1:] \
                or any(tuple(bn.get(k, np.zeros(0)).shape) != shape[-1:]
                       for k in ("gamma", "beta", "moving_mean", "moving_variance")):
            raise NotResNet50(f"layer {name} or its batch norm does not have ResNet50's weight shapes")
    head = dense[0]["config"]["name"]
    if head not in weights or weights[head].get("kernel", np.zeros((0, 0))).shape[0] != 2048:
        raise NotResNet50("the Dense head does not take ResNet50's 2048 pooled features")
    bns = [ly["config"] for ly in layers if ly["class_name"] == "BatchNormalization"]
    if any(c.get("axis", -1) not in (3, -1, [3], [-1]) for c in bns):
        raise NotResNet50("a batch norm over another axis than the channels")
    eps = {c["name"]: float(c.get("epsilon", 1e-3)) for c in bns}
    return Reading(_input_size(layers), int(weights[head]["kernel"].shape[1]), act,
                   sum(int(a.size) for w in weights.values() for a in w.values()), weights, eps, head)


def read(path: Path):
    """(the network in PyTorch, its input size) for a plain Keras ResNet50 + head ``.h5``."""
    reading = inspect(path)
    return reading.module(), reading.size


def _check_stem(layers: list[dict], by_name: dict) -> None:
    """Zero padding 3 before conv1, zero padding 1 + 3x3/2 max pooling after it, 16 residual adds, and a
    global average pooling that drops the spatial axes."""
    count = lambda cls: sum(ly["class_name"] == cls for ly in layers)  # noqa: E731
    if count("ZeroPadding2D") != 2 or count("MaxPooling2D") != 1 or count("Add") != 16:
        raise NotResNet50("its padding, pooling or residual layers are not ResNet50's")

    def pad(name: str) -> list:
        p = by_name.get(name, {}).get("config", {}).get("padding")
        return [list(q) if isinstance(q, (list, tuple)) else [q, q] for q in p] if isinstance(p, (list, tuple)) \
            else [[p, p], [p, p]]

    pool = by_name.get("pool1_pool", {}).get("config", {})
    gap = next(ly for ly in layers if ly["class_name"] == "GlobalAveragePooling2D")["config"]
    if pad("conv1_pad") != [[3, 3], [3, 3]] or pad("pool1_pad") != [[1, 1], [1, 1]] \
            or tuple(pool.get("pool_size", ())) != (3, 3) or tuple(pool.get("strides", ())) != (2, 2) \
            or pool.get("padding", "valid").lower() != "valid" or gap.get("keepdims") \
            or gap.get("data_format", "channels_last") != "channels_last":
        raise NotResNet50("its stem or pooling is not ResNet50's")


def _input_size(layers: list[dict]) -> int | None:
    for ly in layers:
        if ly["class_name"] == "InputLayer":
            c = ly["config"]
            shape = c.get("batch_shape") or c.get("batch_input_shape")
            if shape and len(shape) == 4:
                if shape[-1] != 3:
                    raise NotResNet50("the input is not channels-last RGB")
                return shape[1]
    return None


def _module(weights: dict, eps: dict, head: str, activation: str):
    import torch
    from torch import nn

    def conv(name: str, stride: int = 1, padding: int = 0) -> nn.Conv2d:
        w = weights[name]
        k = torch.from_numpy(w["kernel"].transpose(3, 2, 0, 1).copy())  # (kh, kw, in, out) -> (out, in, kh, kw)
        m = nn.Conv2d(k.shape[1], k.shape[0], k.shape[2], stride=stride, padding=padding, bias=True)
        m.weight.data.copy_(k)
        m.bias.data.copy_(torch.from_numpy(w["bias"]))
        return m

    def bn(name: str) -> nn.BatchNorm2d:
        w = weights[name]
        m = nn.BatchNorm2d(w["gamma"].shape[0], eps=eps[name])
        for attr, key in (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
                          ("running_var", "moving_variance")):
            getattr(m, attr).data.copy_(torch.from_numpy(w[key]))
        return m

    class Block(nn.Module):
        def __init__(self, name: str, stride: int, shortcut: bool):
            super().__init__()
            self.short = nn.Sequential(conv(f"{name}_0_conv", stride), bn(f"{name}_0_bn")) if shortcut else None
            self.body = nn.Sequential(conv(f"{name}_1_conv", stride), bn(f"{name}_1_bn"), nn.ReLU(),
                                      conv(f"{name}_2_conv", 1, 1), bn(f"{name}_2_bn"), nn.ReLU(),
                                      conv(f"{name}_3_conv"), bn(f"{name}_3_bn"))

        def forward(self, x):
            return torch.relu((x if self.short is None else self.short(x)) + self.body(x))

    class KerasResNet50(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(conv("conv1_conv", 2, 3), bn("conv1_bn"), nn.ReLU())
            self.stages = nn.Sequential(*[Block(f"{s}_block{b}", stride if b == 1 else 1, b == 1)
                                          for s, _, n, stride in STAGES for b in range(1, n + 1)])
            k = weights[head]
            self.head = nn.Linear(*k["kernel"].shape)
            self.head.weight.data.copy_(torch.from_numpy(k["kernel"].T.copy()))
            self.head.bias.data.copy_(torch.from_numpy(k["bias"]))

        def forward(self, x):  # x: N x H x W x 3, as the Keras model takes it
            x = self.stem(x.permute(0, 3, 1, 2))
            x = nn.functional.max_pool2d(nn.functional.pad(x, (1, 1, 1, 1)), 3, 2)  # pool1_pad (zeros) + pool1_pool
            x = self.head(self.stages(x).mean(dim=(2, 3)))
            if activation == "softmax":
                return torch.softmax(x, dim=-1)
            return torch.sigmoid(x) if activation == "sigmoid" else x

    return KerasResNet50().eval()


def to_onnx_file(path: Path, out: Path, opset: int, input_shape) -> None:
    """Write the ONNX of a plain Keras ResNet50 ``.h5`` (:class:`NotResNet50` if it is not one)."""
    import torch

    from ... import onnx_meta

    model, _ = read(path)
    with torch.no_grad():
        torch.onnx.export(model, torch.zeros(1, *input_shape), str(out), input_names=[onnx_meta.INPUT_NAME],
                          output_names=[onnx_meta.OUTPUT_NAME], opset_version=opset, dynamo=False,
                          dynamic_axes={onnx_meta.INPUT_NAME: {0: "batch"}, onnx_meta.OUTPUT_NAME: {0: "batch"}})
