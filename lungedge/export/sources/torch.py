"""PyTorch ``.pth``/``.pt`` files: a lungedge checkpoint, a bare torchvision state dict (head
size read from the weights), or a whole pickled model (only with ``--trust-pickle``); and ``.safetensors``
files, always a bare state dict, read without pickle and then treated exactly as a ``.pth`` state dict.
Which of the two a file is, its bytes say (:func:`lungedge.models.sniff.sniff`), not its name."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ...errors import LungedgeError
from ...io import sha256_file
from ...models.files import torch_load_problem
from .. import declared
from .. import source as src
from ..kind import SourceKind
from ..source import Request, Source

SUFFIXES = (".pth", ".pt", ".safetensors")


def recognise(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES


def load(path: Path, request: Request) -> Source:
    from ...models.sniff import expect

    fmt = expect(path, ("torch-zip", "torch-pickle", "safetensors"), "a PyTorch file (torch.save or safetensors)")
    if request.options.get("custom"):
        what = "a safetensors file" if fmt == "safetensors" else "a torch.save file"
        raise LungedgeError(f"{path.name} is {what}, which carries no architecture: for your own "
                            f"model use {ACCEPTED_CUSTOM}, or name a registry model instead of --custom")
    spec = src.registry_spec(request, "torch", path)
    meta = None if fmt == "safetensors" else src.lungedge_meta(path)  # safetensors: always a foreign state dict
    if meta is not None:
        src.refuse_declared(request, path)
        return src.from_lungedge_checkpoint(path, KIND.name, spec, meta)
    return _foreign(path, spec, request, fmt)


ACCEPTED_CUSTOM = "TorchScript, torch.export (.pt2) or ONNX, with --custom"


def _payload(path: Path, trust_pickle: bool, notes: list[str]):
    """torch.load without running code; a whole pickled model only when trusted."""
    import pickle

    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
        if "weights_only" not in str(exc) and not isinstance(exc, pickle.UnpicklingError):
            raise LungedgeError(f"{path} is not a readable .pth file ({torch_load_problem(exc)})") from None
        if not trust_pickle:
            raise LungedgeError(f"{path} holds a whole pickled model, which runs code when loaded; refusing it. "
                                "If you trust its origin, pass --trust-pickle") from None
    notes.append("loaded a whole pickled model (--trust-pickle)")
    return torch.load(str(path), map_location="cpu", weights_only=False)


def _accepted(spec) -> str:
    return (f"accepted: a lungedge checkpoint, torchvision's {spec.name} state dict (.pth or .safetensors), a "
            f"pickled model (--trust-pickle); other architectures: {ACCEPTED_CUSTOM}")


def _from_state_dict(path: Path, spec, state: dict, request: Request, notes: list[str], holds: str | None = None):
    """The registry architecture rebuilt around a bare state dict (torchvision's layout): aux heads
    dropped, the constructor arguments torchvision sets for pretrained weights assumed (said, and
    overridable); (model, build record, head outputs). ``holds``: what the file holds, where the state
    dict is a pickled model's (for the messages)."""
    from ...models.registry import foreign_build, rebuild

    from ...models.statedict import as_float32, normalise_keys

    state = normalise_keys(state, spec.head, path.name, notes, wrapper_prefixes=holds is None)
    state = as_float32(state, path.name, notes)  # a pickled model's are float32 already
    head_key = f"{spec.head}.weight"
    only = _head_only(state, spec.head)
    if only:
        raise _head_only_error(path, spec, only)
    if head_key not in state:
        what = f"holds {holds}, which is not a {spec.name}" if holds else f"is not a {spec.name} state dict"
        raise LungedgeError(f"{path.name} {what} (no {head_key}); {_accepted(spec)}")
    aux = tuple(getattr(spec.builder, "aux_heads", ()))
    dropped = sorted({k.split(".")[0] for k in state if k.split(".")[0] in aux})
    if dropped:
        n = sum(1 for k in state if k.split(".")[0] in aux)
        state = {k: v for k, v in state.items() if k.split(".")[0] not in aux}
        notes.append(f"dropped the auxiliary head{'s' if len(dropped) > 1 else ''} {', '.join(dropped)} "
                     f"({n} tensors): they only matter in training")
    out_features = int(state[head_key].shape[0])
    overrides = {}
    if request.options.get("transform_input") is not None and "transform_input" in getattr(
            spec.builder, "foreign_kwargs", {}):
        overrides["transform_input"] = bool(request.options["transform_input"])
    size = request.options.get("input_size")
    build = foreign_build(spec, out_features, size, overrides)
    if "transform_input" in getattr(spec.builder, "foreign_kwargs", {}):
        ti = build["kwargs"]["transform_input"]
        notes.append(f"transform_input={ti}" + (" assumed (torchvision's setting for ImageNet-initialised "
                     f"{spec.name}, which such files almost always come from); pass --no-transform-input if it was "
                     "trained without it" if "transform_input" not in overrides else
                     f" (--{'' if ti else 'no-'}transform-input given)"))
    model = rebuild(build)
    subject = f"{path.name} ({holds})" if holds else path.name
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensors of other shapes
        shapes = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        raise LungedgeError(f"{subject} does not fit {spec.name}: {len(shapes)} tensors of other shapes "
                            f"({(shapes or [''])[0][:120]}); {_accepted(spec)}") from None
    missing = [k for k in missing if "num_batches_tracked" not in k]
    if missing or unexpected:
        some = ", ".join((list(unexpected) + missing)[:3])
        raise LungedgeError(f"{subject} does not fit {spec.name}: {len(missing)} missing and {len(unexpected)} "
                            f"unexpected tensors (e.g. {some}); {_accepted(spec)}")
    return model.eval(), build, out_features


def _head_only(state: dict, head: str) -> str | None:
    """'a Linear I -> O' where ``state`` holds one Linear layer's weights and nothing else (``model.fc.state_dict()``
    saved instead of ``model.state_dict()``: ``weight``/``bias``, or ``fc.weight``/``fc.bias``); else None."""
    for prefix in ("", f"{head}."):
        if set(state) in ({f"{prefix}weight", f"{prefix}bias"}, {f"{prefix}weight"}) \
                and state[f"{prefix}weight"].dim() == 2:
            out_f, in_f = state[f"{prefix}weight"].shape
            return f"a Linear {in_f} -> {out_f}"
    return None


def _head_only_error(path: Path, spec, what: str, key: str | None = None) -> LungedgeError:
    where = f" (under {key!r})" if key else ""
    return LungedgeError(f"{path.name} holds only a classifier head's weights{where}, {what}, not a whole {spec.name}: "
                         f"the network's other layers are not in it; save the whole model's weights "
                         f"(torch.save(model.state_dict(), ...), not model.{spec.head}.state_dict()) and export that")


def _pickled_model(path: Path, spec, model, request: Request, notes: list[str]):
    """A whole pickled model, unwrapped from (Distributed)DataParallel and in FP32, checked against the
    registry architecture as its state dict would be; (model, head outputs)."""
    import torch

    while isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        notes.append(f"the pickled model is wrapped in {type(model).__name__}; exporting its .module")
        model = model.module
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in [*model.parameters(), *model.buffers()]
                     if t.is_floating_point() and t.dtype != torch.float32})
    if dtypes:
        notes.append(f"the pickled model holds {', '.join(dtypes)} weights; converted to float32 (the FP32 ONNX; "
                     "--fp16 writes the FP16 one)")
        model = model.float()
    *_, out_features = _from_state_dict(path, spec, model.state_dict(), request, [],
                                        holds=f"a pickled {type(model).__name__}")
    return model.eval(), out_features


def _foreign(path: Path, spec, request: Request, fmt: str) -> Source:
    import torch

    notes: list[str] = []
    if fmt == "safetensors":
        from ...models.files import read_safetensors

        payload = read_safetensors(path)  # {name: tensor}: from here on, exactly a .pth state dict
    else:
        payload = _payload(path, request.trust_pickle, notes)
    from ...models.statedict import describe_payload, unwrap, unwrap_module

    if isinstance(payload, dict) and unwrap(payload, path.name)[0] is None:
        module, unwrapped = unwrap_module(payload, path.name)  # {"model": <a whole nn.Module>, "optimizer": ...}
        if module is not None:
            notes += unwrapped
            payload = module
    pickled = isinstance(payload, torch.nn.Module)
    if pickled:
        model, out_features = _pickled_model(path, spec, payload, request, notes)
        build = {}  # a pickled model records no build
    else:
        state, unwrapped = unwrap(payload, path.name)
        if state is None and isinstance(payload, dict):  # {"fc": <the head's state dict>}
            from ...models.statedict import is_tensor_dict

            for key, inner in payload.items():
                only = _head_only(inner, spec.head) if is_tensor_dict(inner) else None
                if only:
                    raise _head_only_error(path, spec, only, key)
        if state is None:
            raise LungedgeError(f"{path.name} holds {describe_payload(payload)}; {_accepted(spec)}")
        notes += unwrapped
        model, build, out_features = _from_state_dict(path, spec, state, request, notes)
    names = src.class_names(request, path)
    base = spec.preprocessing_for(request.options.get("input_size") or (build or {}).get("input_size"))
    prep, more = declared.preprocessing(request.options, path, base=base)
    said = request.options.get("output")
    graph = None
    if pickled and not said:  # what the pickled model's forward ends in (a Softmax head), read from its graph
        graph = (DETECT_OPSET, _export(model, prep.input_shape, DETECT_OPSET))
        detected = declared.onnx_output_kind(graph[1])
    elif not pickled and said in ("probabilities", "sigmoid"):  # weights hold no activation: the user's appended
        model = _Activated(model, said)
        build["activation"] = said
        notes.append(f"--output {said}: a state dict holds no activation, so a {model.final} is appended to the "
                     f"rebuilt {spec.name}'s head")
        detected = said
    else:
        detected = "logits"
    kind, keep, more2 = declared.output_kind(detected, said, out_features, names, path)
    source = Source(model, KIND.name, "torch", spec.name, names, prep, path, sha256_file(path),
                    build=dict(build), notes=notes + more + more2, output=kind, keep=keep)
    source.onnx = graph  # reused by to_onnx at the same opset
    return source


DETECT_OPSET = 17  # export's default --opset: the graph read at load is the one written


def _activated_class():
    import torch

    class Activated(torch.nn.Module):
        """A rebuilt registry model with the final activation a state dict cannot hold (``--output``)."""

        def __init__(self, inner, output: str):
            super().__init__()
            self.inner = inner
            self.final = "Softmax" if output == "probabilities" else "Sigmoid"

        def forward(self, x):
            y = self.inner(x)
            return torch.softmax(y, dim=1) if self.final == "Softmax" else torch.sigmoid(y)

    return Activated


def _Activated(model, output: str):  # noqa: N802 - a class made on first use (torch imported lazily)
    return _activated_class()(model, output).eval()


def run(source: Source, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return source.model(torch.from_numpy(x)).float().numpy()


def to_onnx(source: Source, opset: int):
    """The model as FP32 ONNX: input "input", output "logits", dynamic batch (TorchScript exporter)."""
    model = src.prepared_onnx(source, opset)
    return model if model is not None else _export(source.model, source.preprocessing.input_shape, opset)


def _export(model, input_shape, opset: int):
    import onnx
    import torch

    from ... import onnx_meta

    buf = io.BytesIO()
    torch.onnx.export(model, torch.zeros(1, *input_shape), buf,
                      input_names=[onnx_meta.INPUT_NAME], output_names=[onnx_meta.OUTPUT_NAME],
                      opset_version=opset, dynamo=False,
                      dynamic_axes={onnx_meta.INPUT_NAME: {0: "batch"}, onnx_meta.OUTPUT_NAME: {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


KIND = SourceKind("torch", "PyTorch .pth/.pt (lungedge checkpoint, state dict, pickled model) or .safetensors "
                  "(state dict)",
                  recognise, load, run, to_onnx)
