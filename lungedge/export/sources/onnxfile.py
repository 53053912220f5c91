"""A plain ``.onnx`` from any framework: exported under the user's name with its declared
preprocessing and classes. Its input size and layout are read from the graph where fixed; its
output kind from a trailing Softmax/Sigmoid node. The source framework here is ONNX Runtime itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import LungedgeError
from ...io import sha256_file
from .. import declared
from .. import source as src
from ..source import Request, Source
from ..kind import SourceKind

SUFFIXES = (".onnx",)


def recognise(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES


def _input_shape(model):
    init = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name not in init:
            return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    return None


def _outputs(model):
    dims = model.graph.output[0].type.tensor_type.shape.dim
    return dims[-1].dim_value if dims and dims[-1].HasField("dim_value") and len(dims) == 2 else None


def load(path: Path, request: Request) -> Source:
    from ... import onnx_meta

    model = onnx_meta.load_checked(path)
    if any(p.key == "lungedge.format" for p in model.metadata_props):
        raise LungedgeError(f"{path} is already a lungedge ONNX: run it directly (bench, eval, predict, "
                            "engine build)")
    opts = request.options
    notes = declared.rename_io(model, onnx_meta.INPUT_NAME, onnx_meta.OUTPUT_NAME)
    size, layout, channels = declared.image_facts(_input_shape(model))
    prep, more = declared.preprocessing(opts, path, size=size, layout=layout, channels=channels,
                                        base=src.declared_base(request))
    notes += more
    declared.dynamic_batch(model, (onnx_meta.INPUT_NAME, onnx_meta.OUTPUT_NAME))
    names = src.class_names(request, path)
    kind, keep, more = declared.output_kind(declared.onnx_output_kind(model), opts.get("output"), _outputs(model),
                                            names, path)
    declared.onnx_keep_first(model, keep)
    return Source(model, KIND.name, "onnx", request.model, names, prep, path, sha256_file(path),
                  build={"source_kind": "onnx", "file": path.name}, notes=notes + more, output=kind)


def _session(source: Source):
    sess = getattr(source, "_session", None)
    if sess is None:
        import onnxruntime as ort

        sess = ort.InferenceSession(source.model.SerializeToString(), providers=["CPUExecutionProvider"])
        source._session = sess
    return sess


def run(source: Source, x: np.ndarray) -> np.ndarray:
    from ... import onnx_meta

    return np.asarray(_session(source).run(None, {onnx_meta.INPUT_NAME: x})[0], dtype=np.float32)


def to_onnx(source: Source, opset: int):
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(source.model)
    return model


KIND = SourceKind("onnx", "ONNX .onnx (any framework; --custom)", recognise, load, run, to_onnx)
