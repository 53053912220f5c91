"""A plain ``.onnx`` from any framework: exported under the user's name with its declared
preprocessing and classes. Its input size and layout are read from the graph where fixed; its
output kind from a trailing Softmax/Sigmoid node. The source framework here is ONNX Runtime itself."""

from __future__ import annotations

import re
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


FLOATS = ("FLOAT16", "BFLOAT16", "DOUBLE")  # cast from/to float32 at the graph's edges


def _float32_io(model, path: Path) -> list[str]:
    """Cast a float16/bfloat16/double input and output from/to float32 (lungedge feeds and reads float32);
    any other input type (uint8 images, integers) refused in one line. The input/output are the first ones."""
    from onnx import TensorProto, helper

    g, notes = model.graph, []
    init = {i.name for i in g.initializer}
    inp = next(i for i in g.input if i.name not in init)
    for vi, is_input in ((inp, True), (g.output[0], False)):
        elem = vi.type.tensor_type.elem_type
        if elem in (TensorProto.FLOAT, TensorProto.UNDEFINED):
            continue
        name = TensorProto.DataType.Name(elem)
        if name not in FLOATS:
            what = "inputs" if is_input else "outputs"
            raise LungedgeError(f"{path} takes {name.lower()} {what}; lungedge "
                                + ("feeds float32 images (scaled by --scale): export the model with a float32 input"
                                   if is_input else "reads float32 scores: export the model with float32 outputs"))
        inner = f"{vi.name}_{name.lower()}"
        for node in g.node:
            if is_input:
                node.input[:] = [inner if i == vi.name else i for i in node.input]
            else:
                node.output[:] = [inner if o == vi.name else o for o in node.output]
                node.input[:] = [inner if i == vi.name else i for i in node.input]
        cast = helper.make_node("Cast", [vi.name] if is_input else [inner], [inner] if is_input else [vi.name],
                                to=elem if is_input else TensorProto.FLOAT, name=f"lungedge_{vi.name}_cast")
        if is_input:
            g.node.insert(0, cast)
        else:
            g.node.append(cast)
        vi.type.tensor_type.elem_type = TensorProto.FLOAT
        notes.append(f"the graph {'takes' if is_input else 'returns'} {name.lower()}; cast "
                     f"{'from' if is_input else 'to'} float32 {'in front' if is_input else 'at the end'}")
    return notes


def _check_batch(source: Source, path: Path) -> None:
    """The graph runs on a batch of 2 (made dynamic by lungedge); one line where it fixes batch 1 inside."""
    def attempt(n):
        try:
            run(source, np.zeros((n, *source.preprocessing.input_shape), np.float32))
            return None
        except Exception as exc:  # noqa: BLE001 - whatever ONNX Runtime raises on this graph
            node = re.search(r"running (\w+) node\. Name:'([^']*)'", str(exc))
            return (f"its {node[1]} node {node[2]!r} fails" if node
                    else (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160])

    problem = attempt(2)
    if problem is None:
        return
    if attempt(1) is None:
        raise LungedgeError(f"{path} fixes batch 1 inside its graph ({problem} on a batch of 2); "
                            "lungedge runs batches: export it again with a dynamic batch axis (torch.onnx.export: "
                            "dynamic_shapes=({0: torch.export.Dim('batch')},) with the default dynamo exporter, "
                            "dynamic_axes with dynamo=False)")
    raise LungedgeError(f"{path} does not run on a {tuple(source.preprocessing.input_shape)} input ({problem}); "
                        "check --input-size, --layout and --channels")


MIN_OPSET = 13  # per-channel Q/DQ (--int8) and TensorRT's parser; older graphs are converted (export.OPSETS[0])


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _upgraded(model, path: Path):
    """The graph converted to :data:`MIN_OPSET` where it is older (``torch.onnx.export(opset_version=9/11)``), by
    ONNX's version converter; (model, notes). The source side of the parity check keeps running the original
    graph, so the converted one is checked against it like any export."""
    old = _opset(model)
    if old >= MIN_OPSET:
        return model, []
    from onnx import checker, version_converter

    try:
        new = version_converter.convert_version(model, MIN_OPSET)
        checker.check_model(new)
    except Exception as exc:  # noqa: BLE001 - whatever the converter raises on this graph
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise LungedgeError(f"{path} is ONNX opset {old} and ONNX's version converter cannot bring it to opset "
                            f"{MIN_OPSET} ({first}); export it again with opset_version={MIN_OPSET} or later") from None
    return new, [f"the graph is opset {old}; converted to opset {MIN_OPSET} (INT8 Q/DQ and TensorRT need it), "
                 "checked against the original below"]


def load(path: Path, request: Request) -> Source:
    from ... import onnx_meta

    model = onnx_meta.load_checked(path)
    if any(p.key == "lungedge.format" for p in model.metadata_props):
        raise LungedgeError(f"{path} is already a lungedge ONNX: run it directly (bench, eval, predict, "
                            "engine build)")
    opts = request.options
    notes = declared.rename_io(model, onnx_meta.INPUT_NAME, onnx_meta.OUTPUT_NAME)
    notes += _float32_io(model, path)
    size, layout, channels = declared.image_facts(_input_shape(model))
    prep, more = declared.preprocessing(opts, path, size=size, layout=layout, channels=channels,
                                        base=src.declared_base(request))
    notes += more
    declared.dynamic_batch(model, (onnx_meta.INPUT_NAME, onnx_meta.OUTPUT_NAME))
    names = src.class_names(request, path)
    kind, keep, more = declared.output_kind(declared.onnx_output_kind(model), opts.get("output"), _outputs(model),
                                            names, path)
    upgraded, more2 = _upgraded(model, path)
    if upgraded is model:
        declared.onnx_keep_first(model, keep)
        keep = None
    # else the original graph (its opset's Slice may be the old one) runs whole and its outputs are cut, and
    # the converted one gets the Slice (sources.run_source / source_to_onnx, by Source.keep)
    source = Source(model, KIND.name, "onnx", request.model, names, prep, path, sha256_file(path),
                    build={"source_kind": "onnx", "file": path.name}, notes=notes + more + more2, output=kind,
                    keep=keep)
    source.onnx = None if upgraded is model else (None, upgraded)
    try:
        _session(source)
    except Exception as exc:  # noqa: BLE001 - whatever ONNX Runtime raises on a graph it cannot load
        from ... import onnx_meta

        raise LungedgeError(f"ONNX Runtime cannot load {path}: {onnx_meta.ort_problem(exc)}") from None
    _check_batch(source, path)
    return source


def _session(source: Source):
    sess = getattr(source, "_session", None)
    if sess is None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4  # failures come back as exceptions (said in one line), not logged
        sess = ort.InferenceSession(source.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        source._session = sess
    return sess


def run(source: Source, x: np.ndarray) -> np.ndarray:
    from ... import onnx_meta

    return np.asarray(_session(source).run(None, {onnx_meta.INPUT_NAME: x})[0], dtype=np.float32)


def to_onnx(source: Source, opset: int):
    import onnx

    model = src.prepared_onnx(source, opset)  # the graph converted to a newer opset, if it was
    if model is None:
        model = onnx.ModelProto()
        model.CopyFrom(source.model)
    return model


KIND = SourceKind("onnx", "ONNX .onnx (any framework; --custom)", recognise, load, run, to_onnx)
