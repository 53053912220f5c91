"""``--uint8-input`` (issue #14): the ONNX takes the resized uint8 pixels and normalises inside.

The graph gets a new input ``input`` (uint8, N x H x W x 3, RGB) and, in front of the network,
``Cast -> [Gather BGR] -> Mul(scale) -> Sub(mean) -> Div(std) -> [Transpose to NCHW]`` — the same
float32 arithmetic as :meth:`lungedge.preprocess.Preprocessing.normalize`'s lookup table, so the
network sees the values it saw before; preprocessing on the host is then decode + crop + resize, and
on a Jetson the normalisation runs on the GPU with the rest of the engine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import LungedgeError
from ..io import atomic_write_bytes
from ..onnx_meta import INPUT_NAME
from ..preprocess import Preprocessing

FLOAT_INPUT = "input_normalized"  # the network's former input, now an inner tensor


def uint8_preprocessing(prep: Preprocessing) -> Preprocessing:
    if prep.channel_order == "GRAY":
        raise LungedgeError("--uint8-input needs an RGB or BGR model (this one takes one grayscale channel)")
    d = prep.to_dict()
    d["input_dtype"] = "uint8"
    return Preprocessing.from_dict(d)


def add_uint8_front(model, prep: Preprocessing):
    """The ONNX ``model`` (float input ``input`` in ``prep``'s layout) with the uint8 pixel front; in place."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    (inp,) = [i for i in graph.input if i.name == INPUT_NAME]
    if inp.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise LungedgeError("--uint8-input: the model's input is not float32 (already uint8?)")
    for node in graph.node:
        node.input[:] = [FLOAT_INPUT if n == INPUT_NAME else n for n in node.input]
    graph.input.remove(inp)
    s = prep.size
    graph.input.insert(0, helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["batch", s, s, 3]))
    consts = {"u8_scale": np.float32(prep.scale), "u8_mean": np.asarray(prep.mean, np.float32),
              "u8_std": np.asarray(prep.std, np.float32)}
    nodes = [helper.make_node("Cast", [INPUT_NAME], ["u8_float"], to=TensorProto.FLOAT)]
    x = "u8_float"
    if prep.channel_order == "BGR":
        consts["u8_bgr"] = np.asarray([2, 1, 0], np.int64)
        nodes.append(helper.make_node("Gather", [x, "u8_bgr"], ["u8_ordered"], axis=3))
        x = "u8_ordered"
    nodes += [helper.make_node("Mul", [x, "u8_scale"], ["u8_scaled"]),
              helper.make_node("Sub", ["u8_scaled", "u8_mean"], ["u8_centred"]),
              helper.make_node("Div", ["u8_centred", "u8_std"],
                               [FLOAT_INPUT if prep.layout == "NHWC" else "u8_nhwc"])]
    if prep.layout == "NCHW":
        nodes.append(helper.make_node("Transpose", ["u8_nhwc"], [FLOAT_INPUT], perm=[0, 3, 1, 2]))
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    for n in reversed(nodes):
        graph.node.insert(0, n)
    onnx.checker.check_model(model)
    return model


def fold_normalisation(files: list[Path], prep: Preprocessing, log=print, images: int = 8) -> dict:
    """Give every ONNX in ``files`` the uint8 front and its metadata the uint8 preprocessing; the fp32
    file (the first) on random pixels must give the float file's logits on :meth:`normalize`'s values."""
    import onnx

    from .. import onnx_meta
    from .compare import compare_outputs, run_onnx

    u8 = uint8_preprocessing(prep)
    pixels = np.random.default_rng(0).integers(0, 256, size=(images, prep.size, prep.size, 3), dtype=np.uint8)
    models = [add_uint8_front(onnx.load(str(f)), prep) for f in files]  # refuses before anything is written
    ref = run_onnx(files[0], prep.normalize(pixels))
    for f, model in zip(files, models):
        meta = onnx_meta.from_model(model, str(f))
        meta.update(preprocessing=u8.to_dict(), input_layout=u8.input_layout, input_shape=["batch", *u8.input_shape])
        onnx_meta.attach(model, meta)
        atomic_write_bytes(Path(f), model.SerializeToString())
    p = compare_outputs(ref, run_onnx(files[0], pixels))
    log(f"uint8 input: normalisation folded into {len(files)} file(s); fp32 on {images} random pixel images: "
        f"max abs difference {p['max_abs']:.2e} from the float input")
    if p["max_rel"] > 1e-5:
        raise LungedgeError(f"--uint8-input: the folded normalisation differs from lungedge's ({p['max_rel']:.1e})")
    return p
