"""Importing the frameworks in the one order that works: torch and torchvision before tensorflow
(importing tensorflow first makes a later torchvision import crash), Keras with its start-up
chatter muted."""

from __future__ import annotations

import contextlib
import sys


def import_torch_first():
    """Import torch and torchvision before anything imports tensorflow (else a later import segfaults)."""
    import torch  # noqa: F401
    import torchvision  # noqa: F401


@contextlib.contextmanager
def _native_stderr_muted():
    """Send what native code writes to file descriptor 2 to a temporary file; replay it on failure."""
    import os
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def import_keras():
    """Import keras (torch first), with TensorFlow's start-up chatter and the legacy-HDF5 notice muted."""
    import os

    import_torch_first()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow's C++ logger ignores TF_CPP_MIN_LOG_LEVEL while it is imported
    with _native_stderr_muted() if "keras" not in sys.modules else contextlib.nullcontext():
        import keras

    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:
        pass
    return keras
