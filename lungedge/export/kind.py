"""What a source kind is: four functions, the same for every kind (see :mod:`.sources`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .source import Request, Source


@dataclass(frozen=True)
class SourceKind:
    name: str
    describe: str  # for error messages, e.g. "PyTorch .pth/.pt"
    recognise: Callable[[Path], bool]
    load: Callable[[Path, Request], Source]
    run: Callable[[Source, np.ndarray], np.ndarray]
    to_onnx: Callable[[Source, int], object]
