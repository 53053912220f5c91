"""Keras -> ONNX conversion runs in a child process (issue #14): same graph as in-process, errors in one line."""

from __future__ import annotations

import numpy as np
import pytest

import torch  # noqa: F401  (torch before tensorflow)

import foreign_files as ff  # noqa: E402
from lungedge.errors import LungedgeError  # noqa: E402
from lungedge.export.sources import keras as keras_source  # noqa: E402
from lungedge.export.source import Request  # noqa: E402


def _source(path):
    return keras_source.load(path, Request("tiny", classes="a,b,c", options={"custom": True}))


def test_child_conversion_gives_the_in_process_graph(tmp_path, monkeypatch):
    import onnxruntime as ort

    ff.tiny_keras(tmp_path / "tiny.h5", size=16, outputs=3)
    source = _source(tmp_path / "tiny.h5")
    child = keras_source.to_onnx(source, 17)
    monkeypatch.setenv("LUNGEDGE_KERAS_CONVERT", "inprocess")
    here = keras_source.to_onnx(source, 17)
    assert [n.op_type for n in child.graph.node] == [n.op_type for n in here.graph.node]
    x = np.random.default_rng(0).normal(size=(2, *source.preprocessing.input_shape)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {"input": x})[0]
    np.testing.assert_allclose(run(child), run(here), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(run(child), keras_source.run(source, x), rtol=1e-4, atol=1e-4)


def test_a_failing_child_is_one_line(tmp_path):
    ff.tiny_keras(tmp_path / "tiny.h5", size=16, outputs=3)
    source = _source(tmp_path / "tiny.h5")
    (tmp_path / "tiny.h5").write_bytes(b"not a keras file any more")  # the child cannot load what the parent did
    with pytest.raises(LungedgeError, match="failed in its child process") as err:
        keras_source.to_onnx(source, 17)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
