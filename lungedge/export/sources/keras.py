"""Keras ``.h5``/``.hdf5``/``.keras`` files: a lungedge checkpoint; a model saved with ``model.save()``
given as a registry architecture (checked to be one: layer and parameter signature); or, with
``--custom``, any Keras model under the user's name with its declared preprocessing. The input size
is read from the model, the output kind from its final activation (softmax: probabilities; one
sigmoid: a binary model)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ...errors import LungedgeError
from ...io import sha256_file
from ...models.files import load_keras_file
from .. import declared
from .. import source as src
from ..kind import SourceKind
from ..source import Request, Source

SUFFIXES = (".h5", ".hdf5", ".keras")


def recognise(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES


def load(path: Path, request: Request) -> Source:
    from ...models.sniff import expect

    expect(path, ("hdf5", "keras-zip"), "a Keras model (.h5 saved by model.save, or a .keras archive)")
    custom = bool(request.options.get("custom"))
    meta = None if custom else src.lungedge_meta(path)
    if meta is not None:
        return src.from_lungedge_checkpoint(path, KIND.name, src.registry_spec(request, "keras", path), meta)
    spec = None if custom else src.registry_spec(request, "keras", path)
    model = load_keras_file(path)
    if spec is not None:
        _check_signature(spec, model, path)
    return _foreign(path, spec, model, request)


def _shapes(weights) -> list[tuple]:
    return sorted(tuple(int(d) for d in w.shape) for w in weights)


def _check_signature(spec, model, path: Path) -> None:
    """A file given as a registry architecture must be one: its weights' shapes (layer and parameter
    signature) are those of the registry's network with the file's head size, else one line."""
    outputs = int(model.output_shape[-1])
    size = model.input_shape[1] or spec.native_size
    expected, _ = spec.builder.build(spec, outputs, size, "none", {})
    if _shapes(model.weights) != _shapes(expected.weights):
        raise LungedgeError(
            f"{path} is not a {spec.name} ({spec.title} backbone + Dense head): its layers and parameters differ "
            f"({model.count_params():,} parameters in {len(model.weights)} tensors, {spec.name} has "
            f"{expected.count_params():,} in {len(expected.weights)}); export it as your own model with --custom "
            "and its preprocessing")


def final_activation(model) -> str:
    """'probabilities' / 'sigmoid' / 'logits' from the model's last layer (Dense activation, Activation
    or Softmax layer)."""
    layer = model.layers[-1]
    while hasattr(layer, "layers") and layer.layers:  # a nested model as the last layer
        layer = layer.layers[-1]
    if type(layer).__name__ == "Softmax":
        return "probabilities"
    act = getattr(getattr(layer, "activation", None), "__name__", "linear")
    return {"softmax": "probabilities", "sigmoid": "sigmoid"}.get(act, "logits")


def _foreign(path: Path, spec, model, request: Request) -> Source:
    opts = request.options
    names = src.class_names(request, path)
    size, layout, channels = declared.image_facts(model.input_shape)
    base = spec.preprocessing_for(size or spec.native_size) if spec is not None else src.declared_base(request)
    prep, notes = declared.preprocessing(opts, path, size=size, layout=layout, channels=channels, base=base,
                                         default_layout="NHWC")
    if prep.layout != "NHWC":
        raise LungedgeError(f"{path}: Keras models take NHWC inputs here; --layout says {prep.layout}")
    outputs = int(model.output_shape[-1]) if len(model.output_shape) == 2 else None
    kind, keep, more = declared.output_kind(final_activation(model), opts.get("output"), outputs, names, path)
    notes = [f"{path.name} carries no lungedge metadata; classes {', '.join(names)}", *notes, *more]
    arch = spec.name if spec is not None else request.model
    build = {"source_kind": "keras", "file": path.name, "class": type(model).__name__,
             "parameters": int(model.count_params())}
    if spec is not None:  # a registry architecture: its build record, with the file's head
        from ...models.registry import foreign_build

        build = foreign_build(spec, outputs or len(names), prep.size)
        build["head"]["activation"] = {"probabilities": "softmax", "sigmoid": "sigmoid"}.get(kind, "linear")
    return Source(model, KIND.name, "keras", arch, names, prep, path, sha256_file(path), build=build, notes=notes,
                  output=kind, keep=keep)


def run(source: Source, x: np.ndarray) -> np.ndarray:
    return np.asarray(source.model(x, training=False), dtype=np.float32)


def convert(keras_model, input_shape, opset: int, path: Path):
    """tf2onnx's ``from_keras``; where it fails (Keras 2-era Sequential ``.h5``: a KeyError inside it),
    the model traced as a ``tf.function``, which converts the same graph."""
    import tensorflow as tf
    import tf2onnx

    from ... import onnx_meta

    spec = (tf.TensorSpec((None, *input_shape), tf.float32, name=onnx_meta.INPUT_NAME),)
    try:
        model, _ = tf2onnx.convert.from_keras(keras_model, input_signature=spec, opset=opset)
    except Exception:  # noqa: BLE001 - tf2onnx fails on some saved Sequential models
        fn = tf.function(lambda x: keras_model(x, training=False))
        try:
            model, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=opset)
        except Exception as exc:  # noqa: BLE001
            raise LungedgeError(f"{path}: tf2onnx cannot convert this Keras model "
                                f"({str(exc).splitlines()[0][:160]})") from None
    declared.rename_io(model, onnx_meta.INPUT_NAME, onnx_meta.OUTPUT_NAME)
    return model


def to_onnx(source: Source, opset: int):
    """The conversion runs in a child process (issue #14): tf2onnx's conversion of a ResNet50 alone takes
    more than 2 GB on top of TensorFlow, and a child hands all of it back when it exits, so the export's
    own peak stays that of the loaded model. The child loads the same file; parity (next step) compares
    the result with the parent's model. ``LUNGEDGE_KERAS_CONVERT=inprocess`` converts in this process."""
    import os
    import subprocess
    import sys
    import tempfile

    import onnx

    if os.environ.get("LUNGEDGE_KERAS_CONVERT") == "inprocess":
        return convert(source.model, source.preprocessing.input_shape, opset, source.path)
    with tempfile.TemporaryDirectory(prefix="lungedge-keras-") as tmp:
        out = Path(tmp) / "model.onnx"
        cmd = [sys.executable, "-m", "lungedge.export.sources.keras", str(source.path), str(out), str(opset),
               ",".join(str(d) for d in source.preprocessing.input_shape)]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode != 0 or not out.is_file():
            lines = [ln for ln in p.stderr.strip().splitlines() if ln.startswith("error: ")]
            why = lines[-1][len("error: "):] if lines else (
                f"killed by signal {-p.returncode} (out of memory?)" if p.returncode < 0 else
                f"exit {p.returncode}: {(p.stderr.strip().splitlines() or ['no output'])[-1][:160]}")
            raise LungedgeError(f"Keras->ONNX conversion of {source.path} failed in its child process: {why}")
        return onnx.load(str(out))


def _child(argv: list[str]) -> int:
    """``python -m lungedge.export.sources.keras FILE OUT.onnx OPSET H,W,C``: convert, write, exit."""
    try:
        import torch  # noqa: F401  (torch before tensorflow, where both are installed)
    except ImportError:
        pass
    from ...io import atomic_write_bytes

    path, out, opset, shape = Path(argv[0]), Path(argv[1]), int(argv[2]), tuple(int(d) for d in argv[3].split(","))
    try:
        model = convert(load_keras_file(path), shape, opset, path)
        atomic_write_bytes(out, model.SerializeToString())
    except LungedgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one line to the parent, never a traceback
        print(f"error: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}", file=sys.stderr)
        return 2
    return 0


KIND = SourceKind("keras", "Keras .h5/.hdf5/.keras (lungedge checkpoint, registry resnet50, or --custom)",
                  recognise, load, run, to_onnx)


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
