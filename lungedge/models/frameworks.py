"""Importing the frameworks in the one order that works: torch and torchvision before tensorflow
(importing tensorflow first makes a later torchvision import crash), Keras with its start-up
chatter muted."""

from __future__ import annotations

import contextlib
import sys


def installed(module: str) -> bool:
    """Whether ``module`` could be imported, without importing it: an imported module is there, one
    blocked on purpose (``sys.modules[module] = None``) is not."""
    import importlib.util

    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # "a.b" whose parent "a" is missing
        return False


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


def set_tensorflow_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads for TensorFlow's ops (one inter-op pool); possible only before
    TensorFlow starts its pools, after that they are fixed for the process and this does nothing."""
    if not threads:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(int(threads))
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # TensorFlow already started: its thread pools are fixed for this process
