"""PyTorch programs that carry their own code: TorchScript (``torch.jit.save``, ``.pt``) and
``torch.export`` (``torch.export.save``, ``.pt2``). Any architecture, exported under the user's
name (``--custom``) with its declared preprocessing and classes. Recognised by content (the
archive's members), so they are told apart from state-dict ``.pt`` files whatever their suffix.
The output kind is read from the converted graph (a trailing Softmax/Sigmoid) unless declared."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ...errors import LungedgeError
from ...io import sha256_file
from .. import declared
from .. import source as src
from ..source import Request, Source
from ..kind import SourceKind

SUFFIXES = (".pt", ".pth", ".pt2", ".ts", ".zip")


def _is(path: Path, fmt: str) -> bool:
    if path.suffix.lower() not in SUFFIXES or not path.is_file():
        return False
    from ...models.sniff import sniff

    return sniff(path) == fmt


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def _finish(model, kind: str, path: Path, request: Request, shape, build: dict) -> Source:
    """Preprocessing, classes and output kind of a loaded program (its outputs counted on one input)."""
    import torch

    size, layout, channels = declared.image_facts(shape)
    prep, notes = declared.preprocessing(request.options, path, size=size, layout=layout, channels=channels,
                                         base=src.declared_base(request))
    names = src.class_names(request, path)
    try:
        with torch.no_grad():
            probe = model(torch.zeros(1, *prep.input_shape))
    except Exception as exc:  # noqa: BLE001 - whatever the program raises on the declared input
        raise LungedgeError(f"{path} does not run on a {tuple(prep.input_shape)} input ({_first_line(exc)}); "
                            "check --input-size, --layout and --channels") from None
    try:
        with torch.no_grad():
            model(torch.zeros(2, *prep.input_shape))
    except Exception as exc:  # noqa: BLE001 - e.g. torch.export's guard on a static batch of 1
        raise LungedgeError(f"{path} fixes batch 1 (it fails on a batch of 2: {_first_line(exc)}); lungedge runs "
                            "batches: export it again with a dynamic batch (torch.export: dynamic_shapes with "
                            "torch.export.Dim on axis 0)") from None
    if isinstance(probe, (tuple, list)):
        notes.append(f"the program returns {len(probe)} outputs; using the first")
    out = probe[0] if isinstance(probe, (tuple, list)) else probe
    outputs = int(out.shape[-1]) if out.ndim == 2 else None
    source = Source(model, kind, "torch", request.model, names, prep, path, sha256_file(path), build=build,
                    notes=notes)
    detected = declared.onnx_output_kind(_graph(source, 17)) if not request.options.get("output") else "logits"
    source.output, source.keep, more = declared.output_kind(detected, request.options.get("output"), outputs,
                                                            names, path)
    source.notes += more
    return source


def _module(model):
    import torch

    class FirstOutput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            y = self.inner(x)
            return y[0] if isinstance(y, (tuple, list)) else y

        def train(self, mode: bool = True):
            return self  # programs are saved in eval mode; torch.export's module refuses train()/eval()

    for p in model.parameters():
        p.requires_grad_(False)
    return FirstOutput()


def _graph(source: Source, opset: int):
    """The program as ONNX (before lungedge's output slicing)."""
    from .torch import to_onnx as module_to_onnx

    try:
        model = module_to_onnx(source, opset)  # the same exporter call as a PyTorch checkpoint's
    except Exception as exc:  # noqa: BLE001
        raise LungedgeError(f"{source.path}: the ONNX exporter cannot convert this program "
                            f"({_first_line(exc)})") from None
    del model.graph.output[1:]  # a program returning a tuple: its first output (said at load)
    return model


# -- TorchScript --------------------------------------------------------------------------------------------

def ts_recognise(path: Path) -> bool:
    return _is(path, "torchscript")


def ts_load(path: Path, request: Request) -> Source:
    import torch

    try:
        model = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:  # noqa: BLE001
        raise LungedgeError(f"{path}: cannot load the TorchScript program ({_first_line(exc)})") from None
    return _finish(model, TORCHSCRIPT.name, path, request, None,
                   {"source_kind": "torchscript", "file": path.name})


# -- torch.export -------------------------------------------------------------------------------------------

def ep_recognise(path: Path) -> bool:
    return _is(path, "torch-export")


class _CodeRefused(Exception):
    """A pickle inside a .pt2 that only loads by running code (not a RuntimeError: torch.export.load swallows those)."""


def _refuse(*args, **kwargs):
    raise _CodeRefused()


def _weights_only_load(load):
    def safe(*args, **kwargs):
        if kwargs.get("weights_only") is False:
            raise _CodeRefused()  # torch.export's fallback after the safe load failed
        return load(*args, **kwargs)

    return safe


@contextmanager
def _no_code(trust_pickle: bool):
    """While torch.export.load runs: every pickle in the archive loaded with weights_only=True (torch's
    fallback to a full unpickle, and plain pickle.loads of opaque objects, refused) unless trusted;
    torch's logged tracebacks kept quiet (the failure is said in one line)."""
    import logging
    import pickle
    from unittest import mock

    import torch

    loggers = [logging.getLogger(name) for name in ("torch.export", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        if trust_pickle:
            yield
        else:
            with mock.patch.object(torch, "load", _weights_only_load(torch.load)), \
                    mock.patch.object(pickle, "loads", _refuse):
                yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def ep_load(path: Path, request: Request) -> Source:
    import zipfile

    import torch

    refusal = (f"{path} holds {{}}, which runs code when loaded; refusing it. If you trust its origin, "
               "pass --trust-pickle")
    try:
        with zipfile.ZipFile(path) as zf:
            compiled = any("/data/aotinductor/" in f"/{n}" for n in zf.namelist())
    except (OSError, zipfile.BadZipFile):
        compiled = False  # said by torch.export.load below
    if compiled and not request.trust_pickle:
        raise LungedgeError(refusal.format("an AOTInductor-compiled library (data/aotinductor/)"))
    try:
        with _no_code(request.trust_pickle):
            ep = torch.export.load(str(path))
    except _CodeRefused:
        raise LungedgeError(refusal.format("a pickled object that is not plain tensors")) from None
    except Exception as exc:  # noqa: BLE001
        raise LungedgeError(f"{path}: cannot load the torch.export program ({_first_line(exc)})") from None
    shape = None
    example = getattr(ep, "example_inputs", None)
    if example and example[0] and hasattr(example[0][0], "shape"):
        shape = list(example[0][0].shape)
    return _finish(_module(ep.module()), TORCH_EXPORT.name, path, request, shape,
                   {"source_kind": "torch.export", "file": path.name})


# -- shared -------------------------------------------------------------------------------------------------

def run(source: Source, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        y = source.model(torch.from_numpy(x))
        return (y[0] if isinstance(y, (tuple, list)) else y).float().numpy()


def to_onnx(source: Source, opset: int):
    return _graph(source, opset)


TORCHSCRIPT = SourceKind("torchscript", "TorchScript .pt (torch.jit.save; --custom)", ts_recognise, ts_load, run,
                         to_onnx)
TORCH_EXPORT = SourceKind("torch.export", "torch.export .pt2 (torch.export.save; --custom)", ep_recognise, ep_load,
                          run, to_onnx)
