"""What every source kind hands to the export: a :class:`Source`, loaded from a :class:`Request`.

A source kind (see :mod:`lungedge.export.sources`) reads one kind of file into a ``Source``:
the model object, which kind and framework it is, its class names, preprocessing, the file's
SHA-256 and how it was built (the checkpoint's build record, stored in every ONNX made from it).
The helpers here are shared by the kinds: the registry spec a request names, class names from
``--classes``/``--data``, and a lungedge checkpoint's own metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LungedgeError
from ..io import JOURNAL, settle
from ..preprocess import Preprocessing


@dataclass
class Request:
    """What the user asked for: the model name and the facts a file without metadata lacks."""

    model: str  # the name the export is stored under (for now a registry architecture)
    classes: str | None = None  # "A,B,C" in output order
    data: Path | None = None  # a data folder: class names (and test images)
    trust_pickle: bool = False
    options: dict = field(default_factory=dict)  # kind-specific declared facts (e.g. preprocessing)


@dataclass
class Source:
    """A loaded model, ready to run and to convert."""

    model: object  # the framework's model object (torch.nn.Module, keras.Model, ...)
    kind: str  # the source kind that loaded it (its module in lungedge.export.sources)
    framework: str  # "torch" | "keras": what the ONNX metadata says it came from
    architecture: str
    classes: list[str]
    preprocessing: Preprocessing
    path: Path
    sha256: str
    build: dict = field(default_factory=dict)  # how the model was built (checkpoint meta["build"])
    split_path: Path | None = None  # the split manifest of the run that trained it
    split_fingerprint: str | None = None
    notes: list[str] = field(default_factory=list)  # one line each, printed as "note: ..."
    output: str = "logits"  # logits | probabilities | sigmoid (ONNX metadata "output"; runners.base.OUTPUT_KINDS)
    keep: int | None = None  # more outputs than classes: the first ``keep`` are labelled (run_source, source_to_onnx)
    converter: str = ""  # which converter wrote the ONNX where a kind has several (ONNX metadata extra.converter)
    temperature: dict | None = None  # fitted at export on the run's validation images (lungedge.temperature)
    input_check: dict | None = None  # fitted at export on the run's training images (lungedge.inputcheck)
    # an ONNX graph the source kind made while loading (a pickled torch model's, exported to read its output
    # kind; a foreign ONNX converted to a newer opset): (its opset, or None for any; the ModelProto)
    onnx: tuple | None = None


def prepared_onnx(source: Source, opset: int):
    """A copy of the ONNX graph ``source`` made while loading (``Source.onnx``) where it serves ``opset``, else None."""
    if source.onnx is None or source.onnx[0] not in (None, opset):
        return None
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(source.onnx[1])
    return model


class UnfinishedRun(LungedgeError):
    """MODEL has runs, but none whose training finished (the message says how to use or finish one)."""


def resolve_checkpoint(model_name: str, checkpoint: str | Path | None, runs: str | Path = "runs", log=None) -> Path:
    """``checkpoint`` if given, else the best checkpoint of MODEL's latest finished run under ``runs``.

    A run whose training did not finish (killed, interrupted, still running) is never taken by default: its
    best checkpoint is of an epoch before the end and untested (``log`` gets a note naming a newer one that
    was passed over). With only such runs, one line names the newest and how to use it anyway
    (``--checkpoint``) or finish it (``--resume``)."""
    from ..models.registry import get_spec

    if checkpoint:  # any name: a registry model's file or (--custom) the user's own
        path = Path(checkpoint)
        if path.is_dir():
            raise LungedgeError(f"--checkpoint {path} is a folder, not a model file: name the file in it")
        if not path.is_file():
            raise LungedgeError(f"checkpoint not found: {path}")
        return path
    spec = get_spec(model_name)
    suffix = ".h5" if spec.framework == "keras" else ".pth"
    for journal in Path(runs, model_name).glob(f"*/{JOURNAL}"):  # epochs a killed training left half renamed
        settle(journal.parent)
    found = sorted(Path(runs, model_name).glob(f"*/best{suffix}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise LungedgeError(f"no trained {model_name} under {Path(runs, model_name)}; train one with "
                            f"'lungedge train {model_name} --data DIR' or pass --checkpoint PATH")
    finished = [p for p in found if not _unfinished(p.parent)]
    if finished:
        skipped = [p.parent.name for p in found if p.stat().st_mtime > finished[-1].stat().st_mtime]
        if skipped and log:
            log(f"note: using {finished[-1]}, the newest finished run; passed over the newer unfinished "
                f"{', '.join(skipped)} (use one with --checkpoint PATH)")
        return finished[-1]
    last = found[-1]
    exc = UnfinishedRun(f"the training of {last.parent} did not finish (status {_status(last.parent)}) and no run of "
                        f"{model_name} under {Path(runs, model_name)} did; finish it with 'lungedge train {model_name} "
                        f"--out {runs} --run-name {last.parent.name} --resume', or pass --checkpoint {last} to use "
                        "its best epoch so far")
    exc.checkpoint, exc.status = last, _status(last.parent)
    raise exc


def _status(run_dir: Path) -> str:
    from ..train.common import read_status

    return read_status(run_dir) or "unknown: no metrics.json"


def _unfinished(run_dir: Path) -> bool:
    """A run folder lungedge trained (its config.json is there) whose metrics.json does not say finished; a
    checkpoint put there without them is the user's own, taken as it is."""
    return (run_dir / "config.json").exists() and _status(run_dir) != "finished"


def registry_spec(request: Request, framework: str, path: Path):
    """The registry spec ``request.model`` names, refused when it is not a ``framework`` model."""
    from ..models.registry import get_spec

    spec = get_spec(_registry_name(request))
    if spec.framework != framework:
        raise LungedgeError(f"{path} is not a {spec.framework} checkpoint, which {spec.name} needs")
    return spec


def _registry_name(request: Request) -> str:
    """``request.model``, refused in one line when it is neither a registry model nor declared ``--custom``."""
    import re

    from ..models.registry import REGISTRY

    if request.options.get("custom"):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", request.model):
            raise LungedgeError(f"model name {request.model!r}: use letters, digits, '_', '-' or '.' (it names "
                                "the output folder and files)")
        return request.model
    if request.model not in REGISTRY:
        raise LungedgeError(f"{request.model!r} is not a registry model ({', '.join(REGISTRY)}); for your own "
                            "model add --custom and declare its classes and preprocessing")
    return request.model


def declared_base(request: Request):
    """The preprocessing a file from outside starts from: the registry entry's when ``request.model``
    names one (and ``--custom`` is not given), else none (everything declared or read from the model)."""
    from ..models.registry import REGISTRY

    name = _registry_name(request)
    return None if request.options.get("custom") else REGISTRY[name].preprocessing


def parse_classes(text: str) -> list[str]:
    """``--classes A,B,C`` -> its names, in output order: at least 2, none empty (``A,,B`` shifts every name after
    the gap to another output), none repeated (two outputs with one name)."""
    names = [c.strip() for c in str(text).split(",")]
    if len([n for n in names if n]) < 2:
        raise LungedgeError(f"--classes needs at least 2 comma-separated names, got {text!r}")
    if "" in names:
        raise LungedgeError(f"--classes has an empty name (names in output order, one per output), got {text!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise LungedgeError(f"--classes names {', '.join(map(repr, repeated))} more than once, got {text!r}")
    return names


def class_names(request: Request, path: Path) -> list[str]:
    """Class names from ``--classes`` (in output order), else from ``--data``'s folders."""
    if request.classes:
        return parse_classes(request.classes)
    if request.data:
        from ..data.layout import detect_layout

        return detect_layout(request.data).classes
    raise LungedgeError(f"{path} carries no class names; give --classes A,B,C (in output order) or --data DIR")


def lungedge_meta(path: Path) -> dict | None:
    """A lungedge checkpoint's metadata, or ``None`` for a file lungedge did not write."""
    from ..models.checkpoint import read_meta

    try:
        meta = read_meta(path)
    except LungedgeError:
        return None
    return meta if meta.get("format") is not None else None


DECLARED = {"input_size": "--input-size", "scale": "--scale", "mean": "--mean", "std": "--std",
            "channels": "--channels", "layout": "--layout", "resize": "--resize", "output": "--output",
            "transform_input": "--transform-input"}


def refuse_declared(request: Request, path: Path) -> None:
    """A lungedge checkpoint records its classes and preprocessing: options declaring them for a file from
    outside were ignored without a word (``--scale nan`` exported the run's scale, exit 0); refused here."""
    given = (["--classes"] if request.classes else []) + [
        flag for key, flag in DECLARED.items() if request.options.get(key) is not None]
    if given:
        raise LungedgeError(f"{', '.join(given)}: {path} is a lungedge checkpoint and records its own classes "
                            "and preprocessing; these options are for files from outside lungedge (drop them)")


def from_lungedge_checkpoint(path: Path, kind: str, spec, meta: dict, model=None) -> Source:
    """A lungedge checkpoint: the model rebuilt from the file alone (or ``model``, a stand-in that runs
    it), with everything it records."""
    from ..models.checkpoint import build_of, load_checkpoint
    from ..testset import split_of_run

    if meta["architecture"] != spec.name:
        raise LungedgeError(f"{path} is a checkpoint of {meta['architecture']}, not {spec.name}")
    if model is None:
        model, meta = load_checkpoint(path)
    return Source(model, kind, spec.framework, spec.name, list(meta["classes"]),
                  Preprocessing.from_dict(meta["preprocessing"]), path, meta["checkpoint_sha256"],
                  build=dict(build_of(meta)), split_path=split_of_run(path),
                  split_fingerprint=meta.get("split_fingerprint"))
