"""The runner contract (Polygraphy-like): a lazy :class:`Loader` and a :class:`Runner` that takes it.

A loader is cheap to make and does the heavy work (import the library, read the file, build a
session) only when called, inside the runner's ``with`` block. A runner is a context manager with
one call, ``infer(batch) -> logits`` (float32, N x classes), checked against
:meth:`Runner.get_input_metadata`. This module knows no concrete backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import LungedgeError
from ..preprocess import Preprocessing
from .artifact import ArtifactInfo


@dataclass(frozen=True)
class TensorSpec:
    """One input of a runner: name, shape (``None`` where any size goes, e.g. the batch) and dtype."""

    name: str
    shape: tuple
    dtype: np.dtype

    def check(self, x: np.ndarray, who: str) -> None:
        fixed = ", ".join("N" if d is None else str(d) for d in self.shape)
        if x.ndim != len(self.shape) or any(d is not None and d != s for d, s in zip(self.shape, x.shape)):
            raise LungedgeError(f"{who}: expected a batch of shape ({fixed}), got {tuple(x.shape)}")
        if np.dtype(self.dtype) == np.uint8 and x.dtype != np.uint8:
            raise LungedgeError(f"{who}: expected uint8 pixels (a uint8-input model), got {x.dtype.name} "
                                "(preprocess images with runner.preprocessing.load_batch)")
        if np.dtype(self.dtype) != np.uint8 and x.dtype.kind != "f":
            raise LungedgeError(f"{who}: expected a floating-point batch ({np.dtype(self.dtype).name}), "
                                f"got {x.dtype.name} (preprocess images with runner.preprocessing.load_batch)")


OUTPUT_KINDS = ("logits", "probabilities", "sigmoid")  # what a model's output is (ONNX metadata ``output``)


def class_scores(out: np.ndarray, kind: str, n_classes: int, who: str = "model") -> np.ndarray:
    """The model's raw output as one score per class: a single-sigmoid output ``p`` (binary models)
    becomes ``[1 - p, p]`` (the sigmoid is the probability of the second class); logits and
    probabilities are unchanged."""
    out = np.asarray(out, dtype=np.float32)
    if kind == "sigmoid":
        if n_classes != 2 or out.ndim != 2 or out.shape[1] != 1:
            raise LungedgeError(f"{who}: a sigmoid output is one probability for 2 classes, got shape "
                                f"{out.shape} for {n_classes} classes")
        return np.concatenate([1.0 - out, out], axis=1)
    return out


def to_probabilities(scores: np.ndarray, kind: str, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities from :func:`class_scores` (what ``Runner.infer`` returns): softmax of
    logits, applied once; probabilities (softmax or sigmoid heads) are already that. A
    ``temperature`` other than 1 (fitted at export, :mod:`lungedge.temperature`) divides the logits
    (or the log-probabilities) first: the same predictions, honest confidence."""
    from ..errors import check_choice

    check_choice(kind, OUTPUT_KINDS, "output kind")
    if temperature != 1.0:
        from ..temperature import scaled_log_probs

        return np.exp(scaled_log_probs(scores, kind, temperature))
    if kind == "logits":
        from ..metrics import softmax

        return softmax(scores)
    return np.asarray(scores, dtype=np.float32)


class Loader:
    """Lazy loader: ``Loader(info, device, precision, threads)()`` returns the loaded model/session.

    Subclasses implement ``__call__``; the constructor only stores the settings.
    """

    def __init__(self, info: ArtifactInfo, device: str, precision: str, threads: int | None = None):
        self.info, self.device, self.precision, self.threads = info, device, precision, threads

    def __call__(self):
        raise NotImplementedError


class Runner:
    """A context manager with one call, ``infer(batch) -> logits`` (float32, N x classes).

    ``batch`` is the preprocessed float32 input in the artifact's layout (``preprocessing``). The
    result is one score per class: logits, or probabilities for models whose ``output`` is
    ``probabilities`` or ``sigmoid`` (:func:`class_scores`); :meth:`probabilities` turns either into
    probabilities, the one place that does (:func:`to_probabilities`).
    ``includes`` says what one timed ``infer`` covers (e.g. host<->device copies). ``device`` and
    ``precision`` are resolved by :func:`lungedge.runners.open_runner` before the runner is made and
    never change afterwards.
    """

    loader_class: type[Loader] | None = None  # what from_artifact builds the loader with
    includes = "model forward only"

    def __init__(self, loader, info: ArtifactInfo, *, backend: str, device: str, precision: str,
                 threads: int | None = None):
        self.loader = loader
        self.info = info
        self.backend = backend
        self.device = device
        self.precision = precision
        self.threads = threads
        self.active = False

    @classmethod
    def from_artifact(cls, info: ArtifactInfo, *, backend: str, device: str, precision: str,
                      threads: int | None = None) -> "Runner":
        loader = cls.loader_class(info, device, precision, threads) if cls.loader_class else None
        return cls(loader, info, backend=backend, device=device, precision=precision, threads=threads)

    # the artifact's metadata, for callers that never look at the backend
    @property
    def classes(self) -> list[str]:
        return self.info.classes

    @property
    def preprocessing(self) -> Preprocessing:
        return self.info.preprocessing

    @property
    def output(self) -> str:
        """What the model outputs: logits | probabilities | sigmoid (see :data:`OUTPUT_KINDS`)."""
        return getattr(self.info, "output", "logits") or "logits"

    @property
    def temperature(self) -> float:
        """What the logits are divided by before the softmax (1: none; :mod:`lungedge.temperature`)."""
        return getattr(self.info, "temperature", 1.0)

    @property
    def input_check(self):
        """The artifact's :class:`lungedge.inputcheck.InputCheck` (fitted at export), None where it has none."""
        return getattr(self.info, "input_check", None)

    @property
    def variant(self) -> str:
        return self.info.variant if self.info.fixed_precision else self.precision

    @property
    def name(self) -> str:
        return f"{self.info.architecture} {self.backend} {self.device} {self.variant}"

    def get_input_metadata(self) -> dict[str, TensorSpec]:
        """The inputs ``infer`` accepts: by default the artifact's preprocessed batch, any batch size."""
        from ..onnx_meta import INPUT_NAME

        return {INPUT_NAME: TensorSpec(INPUT_NAME, (None, *self.preprocessing.input_shape),
                                       np.dtype(self.preprocessing.input_dtype))}

    # --- what a backend implements -------------------------------------------------------------
    def load(self) -> None:
        """Call the loader (default: keep what it returns as ``self.model``)."""
        self.model = self.loader() if self.loader is not None else None

    def _infer(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release what ``load`` made; must also work after a ``load`` that failed half-way."""
        self.model = None

    def describe(self) -> dict:
        """Model facts for the report (parameter counts, layers) where the backend knows them."""
        return {}

    def threads_used(self):
        return self.threads

    def runtime_facts(self) -> dict:
        """How the loaded runtime was set up, for every row it produces (e.g. OpenVINO's inference
        precision, hints, streams, cache dir and version); default none."""
        return {}

    def timing_facts(self, batch: int, iters: int) -> dict:
        """Extra fields for a bench row at this batch size, asked after its timing (e.g. the forward
        alone timed on the device, without the copies); default none."""
        return {}

    # --- the contract ------------------------------------------------------------------------------
    def infer(self, batch: np.ndarray) -> np.ndarray:
        if not self.active:
            raise LungedgeError(f"{self.name}: runner used outside its 'with' block")
        (spec,) = self.get_input_metadata().values()
        x = np.asarray(batch)
        spec.check(x, self.name)
        x = np.ascontiguousarray(x, dtype=spec.dtype)
        out = class_scores(self._infer(x), self.output, len(self.classes), self.name)
        if out.shape != (len(x), len(self.classes)):
            raise LungedgeError(f"{self.name}: returned shape {out.shape}, expected ({len(x)}, {len(self.classes)}) "
                                "(one logit per class)")
        return out

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities (N x classes): :func:`to_probabilities` of :meth:`infer`."""
        return to_probabilities(self.infer(batch), self.output, self.temperature)

    def __enter__(self):
        try:
            self.load()
        except BaseException:
            self.close()
            raise
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False
        self.close()
        return False
