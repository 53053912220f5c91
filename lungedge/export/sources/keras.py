"""Keras ``.h5``/``.hdf5``/``.keras`` files: a lungedge checkpoint; a model saved with ``model.save()``
given as a registry architecture (checked to be one: layer and parameter signature); or, with
``--custom``, any Keras model under the user's name with its declared preprocessing. The input size
is read from the model, the output kind from its final activation (softmax: probabilities; one
sigmoid: a binary model)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from ...errors import LungedgeError
from ...io import sha256_file
from ...models.files import load_keras_file
from ...models.frameworks import installed
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
    spec = None if custom else src.registry_spec(request, "keras", path)
    if spec is not None and spec.name == "resnet50" and os.environ.get("LUNGEDGE_KERAS_CONVERT") != "inprocess":
        from . import keras_resnet50

        try:  # read with h5py: this process never loads TensorFlow (issue #14)
            return _resnet50_read(path, spec, meta, keras_resnet50.inspect(path), request)
        except keras_resnet50.NotResNet50:
            pass
    if meta is not None:
        src.refuse_declared(request, path)
        return src.from_lungedge_checkpoint(path, KIND.name, spec, meta)
    model = load_keras_file(path, trust_code=request.trust_pickle)
    facts = _facts(model, path)
    if spec is not None:
        _check_signature(spec, model, path)
    return _foreign(path, spec, facts, request, model)


def _resnet50_read(path: Path, spec, meta, reading, request: Request) -> Source:
    """A plain Keras ResNet50 + head, described from the file alone; the model that parity runs is
    :class:`KerasReference` (Keras itself, in a worker process)."""
    model = KerasReference(path, reading)
    if meta is not None:
        src.refuse_declared(request, path)
        source = src.from_lungedge_checkpoint(path, KIND.name, spec, meta, model=model)
    else:
        facts = {"input_shape": (None, reading.size, reading.size, 3), "outputs": reading.outputs,
                 "activation": OUTPUT_OF_ACTIVATION.get(reading.activation, "logits"),
                 "class": "Functional", "parameters": reading.parameters}
        source = _foreign(path, spec, facts, request, model)
    if model.note:
        source.notes.append(model.note)
    return source


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
    own = {type(la).__name__ for la in _all_layers(expected)}
    extra = [la for la in _all_layers(model) if type(la).__name__ not in own | NEUTRAL_LAYERS | set(INFERENCE_IDENTITY)
             and not type(la).__name__.startswith("Random")]
    if extra:
        some = ", ".join(f"{type(la).__name__} {la.name!r}" for la in extra[:3])
        raise LungedgeError(
            f"{path} is not a plain {spec.name}: it has layers the {spec.title} backbone + Dense head does not ({some}"
            f"{', ...' if len(extra) > 3 else ''}), which may change what its input must be (preprocessing inside "
            f"the model), so {spec.name}'s preprocessing cannot be assumed; export it as your own model with "
            "--custom and declare the preprocessing its input expects (--scale, --mean, --std, --channels)")


# layers that neither hold weights nor change what the input must be: pooling/flatten/activation before or at the
# head, and layers that pass their input through at inference (INFERENCE_IDENTITY, augmentation layers Random*)
NEUTRAL_LAYERS = {"InputLayer", "GlobalAveragePooling2D", "GlobalMaxPooling2D", "Flatten", "Activation", "Softmax"}


def _all_layers(model) -> list:
    """Every layer of ``model``, nested models' layers included (the models themselves left out)."""
    found = []
    for layer in getattr(model, "layers", []):
        if getattr(layer, "layers", None):
            found.extend(_all_layers(layer))
        else:
            found.append(layer)
    return found


# a Keras model's final activation -> what it outputs (runners.base.OUTPUT_KINDS); anything else: logits
OUTPUT_OF_ACTIVATION = {"softmax": "probabilities", "sigmoid": "sigmoid"}


# layers that pass their input through at inference: the activation is that of the layer before them
INFERENCE_IDENTITY = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "AlphaDropout",
                      "GaussianDropout", "GaussianNoise", "ActivityRegularization", "Identity")


def final_activation(model) -> str:
    """'probabilities' / 'sigmoid' / 'logits' from the model's last layer (Dense activation, Activation
    or Softmax layer), trailing dropout-like layers skipped."""
    layer = model
    while hasattr(layer, "layers") and layer.layers:  # a nested model as the last layer
        computing = [la for la in layer.layers if type(la).__name__ not in INFERENCE_IDENTITY]
        layer = (computing or layer.layers)[-1]
    if type(layer).__name__ == "Softmax":
        return "probabilities"
    act = getattr(getattr(layer, "activation", None), "__name__", "linear")
    return OUTPUT_OF_ACTIVATION.get(act, "logits")


def _facts(model, path: Path | None = None) -> dict:
    """What export needs to know of a loaded Keras model; a model with several outputs refused in one line."""
    if len(getattr(model, "outputs", None) or [None]) > 1:
        names = ", ".join(getattr(model, "output_names", None) or [getattr(t, "name", "?") for t in model.outputs])
        raise LungedgeError(f"{path or 'the Keras model'} has {len(model.outputs)} outputs ({names}); lungedge "
                            "exports classifiers with one output: save keras.Model(model.inputs, model.outputs[i]) "
                            "with the class scores and export that")
    return {"input_shape": model.input_shape, "outputs": int(model.output_shape[-1]) if len(model.output_shape) == 2
            else None, "activation": final_activation(model), "class": type(model).__name__,
            "parameters": int(model.count_params())}


def _foreign(path: Path, spec, facts: dict, request: Request, model) -> Source:
    opts = request.options
    names = src.class_names(request, path)
    size, layout, channels = declared.image_facts(facts["input_shape"])
    base = spec.preprocessing_for(size or spec.native_size) if spec is not None else src.declared_base(request)
    prep, notes = declared.preprocessing(opts, path, size=size, layout=layout, channels=channels, base=base,
                                         default_layout="NHWC")
    if prep.layout != "NHWC":
        said = "--layout says NCHW" if opts.get("layout") else "it takes channels-first (N, C, H, W) inputs"
        raise LungedgeError(f"{path}: lungedge runs Keras models channels-last (N, H, W, C); {said}: save the model "
                            "with data_format='channels_last', or convert it to ONNX yourself and export that with "
                            "--custom")
    outputs = facts["outputs"]
    kind, keep, more = declared.output_kind(facts["activation"], opts.get("output"), outputs, names, path)
    notes = [f"{path.name} carries no lungedge metadata; classes {', '.join(names)}", *notes, *more]
    arch = spec.name if spec is not None else request.model
    build = {"source_kind": "keras", "file": path.name, "class": facts["class"], "parameters": facts["parameters"]}
    if spec is not None:  # a registry architecture: its build record, with the file's head
        from ...models.registry import foreign_build

        build = foreign_build(spec, outputs or len(names), prep.size)
        build["head"]["activation"] = {k: a for a, k in OUTPUT_OF_ACTIVATION.items()}.get(kind, "linear")
    if request.trust_pickle:
        build["trusted_code"] = True  # Lambda layers' code allowed (--trust-pickle): the conversion child too
    return Source(model, KIND.name, "keras", arch, names, prep, path, sha256_file(path), build=build, notes=notes,
                  output=kind, keep=keep)


def run(source: Source, x: np.ndarray) -> np.ndarray:
    if isinstance(source.model, KerasReference):
        return source.model(x)
    return np.asarray(source.model(x, training=False), dtype=np.float32)


class KerasReference:
    """The Keras model of ``path`` run in a worker process (``python -m lungedge.export.sources.keras
    --serve FILE``), started at the first call and ended by :meth:`close`: the export process never
    holds TensorFlow, and the worker's memory is handed back when parity is done. Where TensorFlow is
    not installed, the file's PyTorch reading (:mod:`.keras_resnet50`) runs instead (``self.note`` says so)."""

    def __init__(self, path: Path, reading):
        self.path, self._proc, self._log = Path(path), None, None
        self.keras = all(installed(m) for m in ("tensorflow", "keras"))
        self.reading = None if self.keras else reading  # its weights (94 MB) only where they are run
        self.note = None if self.keras else (
            f"TensorFlow is not installed here: {self.path.name} is checked against lungedge's PyTorch reading "
            "of its weights, not against Keras itself")
        self._net = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not self.keras:
            import torch

            if self._net is None:
                self._net = self.reading.module()
            with torch.no_grad():
                return self._net(torch.from_numpy(x)).numpy()
        if self._proc is None:
            try:
                self._start()
            except OSError as exc:  # no temporary folder to write its log to, no interpreter, ...
                raise LungedgeError(f"cannot start the Keras worker for {self.path}: {exc}") from None
        try:
            write_array(self._proc.stdin, x)
            return read_array(self._proc.stdout)
        except (OSError, EOFError, ValueError):
            raise LungedgeError(f"the Keras worker for {self.path} stopped: {self._why()}") from None

    def _start(self) -> None:
        import subprocess
        import tempfile

        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(child_command("--serve", str(self.path)), stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log, env=child_env())

    def _why(self) -> str:
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10)
            except Exception:  # noqa: BLE001 - still running: it is killed in close()
                pass
        self._log.seek(0)
        return child_failure(self._log.read().decode(errors="replace"), self._proc.returncode if self._proc else None)

    def close(self) -> None:
        proc, self._proc, self._net = self._proc, None, None
        if proc is not None:
            import subprocess

            try:
                proc.stdin.close()
                proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit, or after a failed __init__
            pass


def child_command(*args: str) -> list[str]:
    """This module run as a child process (:func:`_child`) with ``args``."""
    return [sys.executable, "-m", "lungedge.export.sources.keras", *args]


def child_env() -> dict:
    """The child's environment: TensorFlow's C++ start-up chatter off unless the user asked for it."""
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}


def child_failure(stderr: str, code: int | None) -> str:
    """Why a child process of this module failed, in one line: its own ``error:`` line, else the signal
    that killed it, else its last line of output."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    said = [ln for ln in lines if ln.startswith("error: ")]
    if said:
        return said[-1][len("error: "):]
    if code is not None and code < 0:
        return f"killed by signal {-code} (out of memory?)"
    return f"exit {code}: {(lines or ['no output'])[-1][:160]}"


def write_array(stream, x: np.ndarray) -> None:
    """One float32 array on a pipe: 8-byte header length, a JSON header (shape), the raw bytes."""
    import json

    head = json.dumps({"shape": list(x.shape)}).encode()
    stream.write(len(head).to_bytes(8, "little") + head)
    stream.write(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    stream.flush()


def read_array(stream) -> np.ndarray:
    """What :func:`write_array` wrote; EOFError at the end of the stream."""
    import json

    def exactly(n: int) -> bytes:
        chunks, got = [], 0
        while got < n:
            b = stream.read(n - got)
            if not b:
                raise EOFError("the stream ended")
            chunks.append(b)
            got += len(b)
        return b"".join(chunks)

    shape = json.loads(exactly(int.from_bytes(exactly(8), "little")))["shape"]
    return np.frombuffer(exactly(4 * int(np.prod(shape, dtype=np.int64))), dtype=np.float32).reshape(shape).copy()


def _serve(path: Path) -> int:
    """The worker of :class:`KerasReference`: the model's outputs for each array read from stdin, one image
    a call (the smallest TensorFlow peak), written to the original stdout (fd 1 is stderr meanwhile,
    so nothing TensorFlow prints can mix with the arrays)."""
    proto = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    model = load_keras_file(path)
    stdin = sys.stdin.buffer
    while True:
        try:
            x = read_array(stdin)
        except EOFError:
            return 0
        y = [np.asarray(model(x[i : i + 1], training=False), dtype=np.float32) for i in range(len(x))]
        write_array(proto, np.concatenate(y) if y else np.zeros((0, 0), np.float32))


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


def convert_file(path: Path, input_shape, opset: int, out: Path, keras_model=None) -> str:
    """Write ``path``'s ONNX to ``out``; returns the converter's name. A plain Keras ResNet50 + head
    ``.h5`` is read without TensorFlow (:mod:`.keras_resnet50`: about 1.5 GB where tf2onnx passes 3.8 GB);
    anything else goes through tf2onnx (``keras_model``: already loaded, else loaded here)."""
    from ...io import atomic_write_bytes
    from . import keras_resnet50

    try:
        keras_resnet50.to_onnx_file(path, out, opset, input_shape)
        return keras_resnet50.NAME
    except keras_resnet50.NotResNet50:
        pass
    model = convert(keras_model if keras_model is not None else load_keras_file(path), input_shape, opset, path)
    atomic_write_bytes(out, model.SerializeToString())
    return "tf2onnx"


def to_onnx(source: Source, opset: int):
    """The conversion runs in a child process (issue #14): tf2onnx's conversion of a ResNet50 alone takes
    more than 2 GB on top of TensorFlow, and a child hands all of it back when it exits, so the export's
    own peak stays that of the loaded model. The child loads the same file; parity (next step) compares
    the result with the parent's model. ``LUNGEDGE_KERAS_CONVERT=inprocess`` converts in this process.
    The converter used is recorded as ``source.converter`` (ONNX metadata ``extra.converter``)."""
    import subprocess
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory(prefix="lungedge-keras-") as tmp:
        out = Path(tmp) / "model.onnx"
        if os.environ.get("LUNGEDGE_KERAS_CONVERT") == "inprocess":
            converter = convert_file(source.path, source.preprocessing.input_shape, opset, out, source.model)
        else:
            cmd = child_command(str(source.path), str(out), str(opset),
                                ",".join(str(d) for d in source.preprocessing.input_shape))
            env = child_env()
            if source.build.get("trusted_code"):
                from ...models.files import TRUST_CODE_ENV

                env[TRUST_CODE_ENV] = "1"
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode != 0 or not out.is_file():
                raise LungedgeError(f"Keras->ONNX conversion of {source.path} failed in its child process: "
                                    f"{child_failure(p.stderr, p.returncode)}")
            said = [ln for ln in p.stdout.splitlines() if ln.startswith("converter: ")]
            converter = said[-1][len("converter: "):] if said else "tf2onnx"
        source.converter = converter
        return onnx.load(str(out))


def _child(argv: list[str]) -> int:
    """``python -m lungedge.export.sources.keras FILE OUT.onnx OPSET H,W,C``: convert, write, print
    ``converter: NAME``, exit; ``... --serve FILE``: :func:`_serve`."""
    try:
        import torch  # noqa: F401  (torch before tensorflow, where both are installed)
    except ImportError:
        pass

    try:
        if argv[0] == "--serve":
            return _serve(Path(argv[1]))
        path, out, opset = Path(argv[0]), Path(argv[1]), int(argv[2])
        print(f"converter: {convert_file(path, tuple(int(d) for d in argv[3].split(',')), opset, out)}")
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
