"""Facts a file from outside does not carry, declared by the user, and facts read from the model itself.

* Preprocessing (:func:`preprocessing`): the input size is read from the model where it is fixed;
  scale, mean/std, channel order, layout and resize come from the declared options
  (``Request.options``), else from the registry entry the name refers to, else lungedge's
  defaults, and every fact that was assumed rather than declared or read is said in one note.
* Output kind (:func:`output_kind`): logits, probabilities (a softmax head) or sigmoid (one
  probability for two classes), detected from the model (the final activation in Keras, the
  trailing Softmax/Sigmoid node of its ONNX graph) unless declared.
* Outputs beyond the class names: the first N are labelled (one note), the same for every kind
  (:func:`keep_first` on the framework's outputs, :func:`onnx_keep_first` on the ONNX graph).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

from ..errors import LungedgeError, check_choice
from ..limits import check_input_size
from ..preprocess import CHANNEL_ORDERS, RESIZES, Preprocessing

OUTPUT_KINDS = ("logits", "probabilities", "sigmoid")
RESIZE_WORDS = {"crop": "center-crop-bilinear", "stretch": "stretch-bilinear"}


def parse_scale(text) -> float:
    """'1/255', '0.00392', '1' -> float."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        try:
            value = float(Fraction(str(text).strip()))
        except (ValueError, ZeroDivisionError):
            raise LungedgeError(f"--scale must be a number or a fraction such as 1/255, got {text!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise LungedgeError(f"--scale must be greater than 0, got {text!r}")
    return value


def parse_triple(text, what: str):
    """'none' -> None; '0.5' -> (0.5,)*3; 'a,b,c' -> (a, b, c) (values on the scaled 0..1 or 0..255 range)."""
    if text is None:
        return None
    if isinstance(text, (tuple, list)):
        values = [float(v) for v in text]
    elif str(text).strip().lower() == "none":
        return "none"
    else:
        try:
            values = [float(v) for v in str(text).split(",") if v.strip()]
        except ValueError:
            raise LungedgeError(f"--{what} takes 1 or 3 comma-separated numbers or 'none', got {text!r}") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise LungedgeError(f"--{what} takes 1 or 3 comma-separated numbers or 'none', got {text!r}")
    if not all(np.isfinite(values)):  # nan reached the model and was blamed on its output
        raise LungedgeError(f"--{what} values must be finite numbers, got {text!r}")
    if what == "std" and any(v <= 0 for v in values):
        raise LungedgeError(f"--std values must be greater than 0, got {text!r}")
    return tuple(values)


def preprocessing(options: dict, path: Path, *, size: int | None = None, layout: str | None = None,
                  channels: int | None = None, base: Preprocessing | None = None,
                  default_layout: str = "NCHW") -> tuple[Preprocessing, list[str]]:
    """The model's preprocessing: declared options over what the model fixes (``size``, ``layout``,
    ``channels``) over ``base`` (a registry entry's) over defaults; and the notes saying what was assumed."""
    assumed: list[str] = []

    def fallback(value, field: str, default, note: str):
        """The declared (or model-fixed) value, else ``base``'s, else ``default``, noted as assumed."""
        if value is not None:
            return value
        if base is not None and getattr(base, field) is not None:
            return getattr(base, field)
        assumed.append(note)
        return default

    size = _declared_size(options, path, size, base)
    lay = fallback(_declared_layout(options, path, layout), "layout", default_layout, f"layout {default_layout}")
    order = fallback(_declared_channels(options, path, channels), "channel_order", "RGB", "channels RGB")
    scale = options.get("scale")
    scale = fallback(parse_scale(scale) if scale is not None else None, "scale", 1.0 / 255.0, "scale 1/255")
    mean = fallback(parse_triple(options.get("mean"), "mean"), "mean", None, "mean none")
    std = fallback(parse_triple(options.get("std"), "std"), "std", None, "std none")
    resize = options.get("resize")
    if resize is not None:
        resize = check_choice(RESIZE_WORDS.get(str(resize).lower(), str(resize).lower()), RESIZES, "--resize")
    resize = fallback(resize, "resize", RESIZES[0], "resize crop")
    prep = Preprocessing(size=size, mean=(0.0, 0.0, 0.0) if mean in (None, "none") else mean,
                         std=(1.0, 1.0, 1.0) if std in (None, "none") else std, scale=scale,
                         channel_order=order, layout=lay, resize=resize)
    notes = []
    if assumed:
        notes.append(f"preprocessing not declared, assumed: {', '.join(assumed)} (declare with --scale, --mean, "
                     "--std, --channels, --layout, --resize)")
    return prep, notes


def _declared_size(options: dict, path: Path, size: int | None, base: Preprocessing | None) -> int:
    declared = options.get("input_size")
    if declared is not None:
        check_input_size(declared, "--input-size")
    if declared is not None and size is not None and int(declared) != size:
        raise LungedgeError(f"{path} takes {size} x {size} inputs (fixed in the model); --input-size says {declared}")
    size = int(declared or size or (base.size if base else 0))
    if not size:
        raise LungedgeError(f"{path} does not fix its input size; declare it with --input-size N")
    return size


def _declared_layout(options: dict, path: Path, layout: str | None) -> str | None:
    """--layout (checked against the layout the model fixes), else the model's, else None."""
    lay = options.get("layout")
    if lay is None:
        return layout
    lay = check_choice(str(lay).upper(), ("NCHW", "NHWC"), "--layout")
    if layout is not None and lay != layout:
        raise LungedgeError(f"{path} takes {layout} inputs; --layout says {lay}")
    return lay


def _declared_channels(options: dict, path: Path, channels: int | None) -> str | None:
    """--channels (checked against the model's channel count), else GRAY for a 1-channel model, else None."""
    order = options.get("channels")
    if order is None:
        return "GRAY" if channels == 1 else None
    order = check_choice(str(order).upper(), CHANNEL_ORDERS, "--channels")
    if channels is not None and (channels == 1) != (order == "GRAY"):
        raise LungedgeError(f"{path} takes {channels}-channel inputs; --channels says {order}")
    return order


def image_facts(shape) -> tuple[int | None, str | None, int | None]:
    """(size, layout, channels) of a 4-d image input shape (None where unknown); non-square fixed inputs refused."""
    if shape is None or len(shape) != 4:
        return None, None, None
    dims = [d if isinstance(d, int) and d > 0 else None for d in shape[1:]]
    if dims[0] in (1, 3) and dims[2] not in (1, 3):
        layout, channels, hw = "NCHW", dims[0], dims[1:]
    elif dims[2] in (1, 3):
        layout, channels, hw = "NHWC", dims[2], dims[:2]
    else:
        return None, None, None
    if hw[0] is not None and hw[1] is not None and hw[0] != hw[1]:
        raise LungedgeError(f"the model takes {hw[0]} x {hw[1]} inputs; lungedge feeds square images only")
    return hw[0] or hw[1], layout, channels


# -- output kinds ------------------------------------------------------------------------------------------

PASS_THROUGH = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Slice", "Gather")


def onnx_output_kind(model) -> str:
    """'probabilities' / 'sigmoid' when the graph's first output comes from a Softmax / Sigmoid node
    (through shape-only nodes), else 'logits'."""
    producer = {o: n for n in model.graph.node for o in n.output}
    name = model.graph.output[0].name
    for _ in range(20):
        node = producer.get(name)
        if node is None:
            return "logits"
        if node.op_type == "Softmax":
            return "probabilities"
        if node.op_type == "Sigmoid":
            return "sigmoid"
        if node.op_type not in PASS_THROUGH or not node.input:
            return "logits"
        name = node.input[0]
    return "logits"


def output_kind(detected: str, declared: str | None, outputs: int | None, classes: list[str],
                path: Path) -> tuple[str, int | None, list[str]]:
    """(output kind, number of outputs to keep or None, notes) from what the model shows and the user says.

    A sigmoid model with one output is a binary model (2 class names); a sigmoid over several outputs
    (multi-label) is reported as probabilities; more outputs than class names keep the first N."""
    notes = []
    kind = check_choice(declared, OUTPUT_KINDS, "--output") if declared else detected
    if declared and declared != detected:
        notes.append(f"output declared {declared} (the model looks like {detected})")
    elif detected != "logits":
        head = "a softmax head" if detected == "probabilities" else "a sigmoid"
        notes.append(f"the model outputs {detected} ({head});"
                     " probabilities are taken as they are, not softmaxed again")
    n = len(classes)
    if kind == "sigmoid":
        if outputs not in (None, 1):
            notes.append(f"{outputs} sigmoid outputs are independent probabilities (multi-label), not one binary "
                         "output; treated as probabilities")
            kind = "probabilities"
        elif n != 2:
            raise LungedgeError(f"{path} has one sigmoid output, which is P(second class) of a binary model: "
                                f"give 2 class names, got {n}")
        else:
            return kind, None, notes
    if outputs is None or outputs == n:
        return kind, None, notes
    if outputs == 1 and n == 2:
        raise LungedgeError(f"{path} has one output for 2 classes: if it is a probability, pass --output sigmoid")
    if outputs < n:
        raise LungedgeError(f"{path} has {outputs} outputs but {n} class names were given")
    notes.append(f"the model has {outputs} outputs; exporting the first {n}, labelled {', '.join(classes)}")
    return kind, n, notes


def keep_first(out: np.ndarray, keep: int | None) -> np.ndarray:
    return out if keep is None else out[:, :keep]


def onnx_keep_first(model, keep: int | None):
    """Append a Slice keeping the first ``keep`` outputs of the graph's (N, K) output."""
    if keep is None:
        return model
    from onnx import TensorProto, helper

    out = model.graph.output[0]
    inner = out.name + "_all"
    for node in model.graph.node:
        node.output[:] = [inner if o == out.name else o for o in node.output]
        node.input[:] = [inner if i == out.name else i for i in node.input]
    names = [f"{out.name}_keep_{k}" for k in ("starts", "ends", "axes")]
    for name, value in zip(names, ([0], [keep], [1])):
        model.graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [1], value))
    model.graph.node.append(helper.make_node("Slice", [inner, *names], [out.name], name="lungedge_first_outputs"))
    dims = out.type.tensor_type.shape.dim
    if len(dims) == 2:
        dims[1].ClearField("dim_param")
        dims[1].dim_value = keep
    return model


def rename_io(model, input_name: str, output_name: str):
    """Rename the graph's first input and output (every reference), drop other outputs; returns notes."""
    notes = []
    g = model.graph
    if len(g.output) > 1:
        notes.append(f"the graph has {len(g.output)} outputs; using the first ({g.output[0].name})")
        del g.output[1:]
    initializers = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in initializers]
    if len(inputs) != 1:
        raise LungedgeError(f"the model has {len(inputs)} inputs; lungedge runs image classifiers with one input")
    renames = {inputs[0].name: input_name, g.output[0].name: output_name}
    taken = {t for n in g.node for t in (*n.input, *n.output)} | {i.name for i in g.input} | initializers
    for name in (input_name, output_name):  # another tensor already has the name: it gets a free one
        if name in taken and name not in renames:
            free = next(f"{name}_{k}" for k in range(1, 10**6) if f"{name}_{k}" not in taken)
            renames[name] = free
            taken.add(free)
    for init in g.initializer:
        init.name = renames.get(init.name, init.name)
    for vi in (*g.value_info, *g.input):
        vi.name = renames.get(vi.name, vi.name)
    for node in g.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
        node.output[:] = [renames.get(o, o) for o in node.output]
    inputs[0].name, g.output[0].name = input_name, output_name
    return notes


def dynamic_batch(model, names) -> None:
    """Make axis 0 of the named graph inputs/outputs symbolic ("batch")."""
    for vi in [*model.graph.input, *model.graph.output]:
        if vi.name in names and vi.type.tensor_type.shape.dim:
            d = vi.type.tensor_type.shape.dim[0]
            d.ClearField("dim_value")
            d.dim_param = "batch"
