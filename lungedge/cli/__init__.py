"""The ``lungedge`` command line.

Each command group lives in its own module and only parses arguments, calls a
library function and prints; heavy libraries are imported inside the commands, so
``lungedge --help`` starts fast and never loads torch, tensorflow or onnxruntime.
"""

from __future__ import annotations

import sys

from . import bundle as _bundle
from . import cv as _cv
from . import data as _data
from . import demo as _demo
from . import engine as _engine
from . import export as _export
from . import mlp as _mlp
from . import runtime as _runtime
from . import train as _train
from .common import app, main  # noqa: F401 - main is the public entry point

app.add_typer(_data.app, name="data")
app.add_typer(_mlp.app, name="mlp")

_train.register(app)  # models, train, finetune (issue #4)
_export.register(app)  # export (issue #5)
_runtime.register(app)  # bench, eval, report, predict (issue #6)
_bundle.register(app)  # bundle create / verify / extract (issue #7)
_engine.register(app)  # engine build, on the target (issue #7)
_demo.register(app)  # demo (issue #8)
_cv.register(app)  # cv: grouped cross-validation with intervals (issue #16)


def run() -> None:  # console-script target
    sys.exit(main())
