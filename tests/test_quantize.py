"""FP16 and calibrated INT8 ONNX on a tiny CNN: runs in ONNX Runtime, right Q/DQ form, cached ranges."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import torch  # noqa: F401  (torch before anything that might pull in tensorflow)

from lungedge import quantize
from lungedge.errors import LungedgeError


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3),
    ).eval()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    torch.onnx.export(model, torch.zeros(1, 3, 16, 16), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return path


def _run(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _images(n=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3, 16, 16)).astype(np.float32)


def test_fp16_keeps_fp32_io_and_agrees(tiny_onnx, tmp_path):
    import onnx

    out = quantize.to_fp16(tiny_onnx, tmp_path / "tiny.fp16.onnx")
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    x = _images()
    ref, half = _run(tiny_onnx, x), _run(out, x)
    np.testing.assert_allclose(half, ref, rtol=2e-2, atol=2e-2)


def _qdq_zero_points(path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    zps = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    scales = [inits[n.input[1]] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in inits]
    return zps, scales


@pytest.mark.parametrize("target,dtype", [("trt", np.int8), ("cpu", np.uint8)])
def test_int8_forms_and_cached_ranges(tiny_onnx, tmp_path, target, dtype):
    x = _images(32)
    cache = tmp_path / "ranges.json"
    out = quantize.to_int8(tiny_onnx, tmp_path / f"tiny.int8-{target}.onnx", target, "minmax", cache,
                           batches=(x[i : i + 8] for i in range(0, 32, 8)))
    zps, scales = _qdq_zero_points(out)
    assert zps and all(z.dtype == dtype for z in zps)
    if target == "trt":
        assert all(int(np.abs(z.astype(np.int32)).max()) == 0 for z in zps)  # symmetric
    assert any(s.ndim == 1 and s.size > 1 for s in scales)  # per-channel weight scales
    ref, q = _run(tiny_onnx, x), _run(out, x)
    assert (ref.argmax(1) == q.argmax(1)).mean() >= 0.75
    assert cache.is_file()
    # the cached ranges rebuild the same model without calibration data
    again = quantize.to_int8(tiny_onnx, tmp_path / "again.onnx", target, "minmax", cache)
    np.testing.assert_array_equal(_run(again, x), q)


def test_int8_without_calibration_data_is_a_clear_error(tiny_onnx, tmp_path):
    with pytest.raises(LungedgeError, match="needs calibration data"):
        quantize.to_int8(tiny_onnx, tmp_path / "x.onnx", "trt", "minmax", tmp_path / "none.json")
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("damage, reason", [
    (lambda text: text[:300], r"not a calibration cache \(JSONDecodeError"),
    (lambda text: json.dumps({**json.loads(text), "data": {}}), "it holds no ranges"),
    (lambda text: text.replace('"highest": {"data": ', '"highest": {"data": NaN, "x": ', 1),
     r"1 range\(s\) not finite or upside down"),
    (lambda text: json.dumps({**json.loads(text), "data": dict(list(json.loads(text)["data"].items())[1:])}),
     "no range for 1 tensor"),
])
def test_a_damaged_ranges_cache_is_named_not_used(tiny_onnx, tmp_path, damage, reason):
    x = _images(16)
    cache = tmp_path / "ranges.json"
    quantize.to_int8(tiny_onnx, tmp_path / "first.onnx", "trt", "minmax", cache, batches=iter([x]))
    cache.write_text(damage(cache.read_text()))
    assert (quantize.ranges_problem(cache) is None) == ("no range for" in reason)  # tensors are known from the model
    with pytest.raises(LungedgeError, match=rf"calibration cache {re.escape(str(cache))} cannot be used: {reason}"):
        quantize.to_int8(tiny_onnx, tmp_path / "x.onnx", "trt", "minmax", cache)
    assert not (tmp_path / "x.onnx").exists()


def test_calibration_sample_is_stratified_deterministic_and_train_only():
    items = [{"path": f"{c}/{i}.png", "label": c, "split": "train" if i % 5 else "test", "sha256": f"{c}{i}"}
             for c, n in (("A", 100), ("B", 20), ("C", 5)) for i in range(n)]
    sample = quantize.calibration_sample(items, ["A", "B", "C"], 30, seed=1)
    assert len(sample) == 30
    assert all(it["split"] == "train" for it in sample)
    counts = {c: sum(it["label"] == c for it in sample) for c in "ABC"}
    assert counts["A"] > counts["B"] > 0 and counts["C"] >= 1
    assert quantize.calibration_sample(items, ["A", "B", "C"], 30, seed=1) == sample
    m1 = quantize.calibration_manifest(sample, "entropy", {"size": 16}, "fp")
    m2 = quantize.calibration_manifest(sample, "minmax", {"size": 16}, "fp")
    assert m1["files_sha256"] == m2["files_sha256"] and m1["key"] != m2["key"]
    with pytest.raises(LungedgeError, match="calib-method"):
        quantize.calibration_manifest(sample, "magic", {}, "fp")


# -- streaming calibration ------------------------------------------------------------------------------

def _reference_entropy(hist, width, nbins=128, start=128):
    """NVIDIA's pytorch-quantization _compute_amax_entropy, loop for loop (the slow reference)."""
    from collections import Counter

    bins = np.asarray(hist, np.float64).copy()
    bins[0] = bins[1]
    divergences, arguments = [], []
    for i in range(start, len(bins) + 1):
        space = np.linspace(0, i, num=nbins + 1)
        digitized = np.digitize(range(i), space) - 1
        digitized[bins[:i] == 0] = -1
        counts = np.zeros(nbins)
        for idx, d in enumerate(digitized):
            if d != -1:
                counts[d] += bins[idx]
        for key, val in Counter(digitized).items():
            if key != -1:
                counts[key] /= val
        q = np.array([counts[d] if d != -1 else 0.0 for d in digitized])
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()
        p, q = p / p.sum(), q / q.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.sum(np.where(p > 0, p * np.log(p / q), 0.0))
        divergences.append(kl if np.isfinite(kl) else np.inf)
        arguments.append(i)
    divergences = np.array(divergences)
    return (len(divergences) - 1 - int(np.argmin(divergences[::-1])) + start) * width


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_threshold_is_tensorrts_kl_minimum(seed):
    rng = np.random.default_rng(seed)
    data = np.abs(np.concatenate([rng.normal(size=20000), rng.standard_cauchy(size=200)]))
    hist, edges = np.histogram(data, bins=400, range=(0, data.max()))
    width = edges[1] - edges[0]
    got = quantize.entropy_threshold(hist, width)
    assert got == pytest.approx(_reference_entropy(hist, width), rel=1e-9)
    # a few far outliers are clipped at 2048 bins; a plain normal is kept to several sigma
    hist, edges = np.histogram(data, bins=quantize.HIST_BINS, range=(0, data.max()))
    assert 2.0 < quantize.entropy_threshold(hist, edges[1] - edges[0]) < 0.5 * data.max()


def test_streamed_ranges_do_not_depend_on_batching():
    rng = np.random.default_rng(0)
    # the same distribution in every batch, with a sparse tail
    batches = [np.concatenate([rng.normal(size=20000), rng.choice([-1, 1], 40) * rng.uniform(8, 30, 40)])
               .astype(np.float32) for _ in range(5)]
    one, many = quantize.RangeCollector(), quantize.RangeCollector()
    one.update("t", np.concatenate(batches))
    for b in batches:
        many.update("t", b)
    assert many.range("t", "minmax") == one.range("t", "minmax")
    for method in ("entropy", "percentile"):
        lo, hi = many.range("t", method)
        assert -lo == hi and hi == pytest.approx(one.range("t", method)[1], rel=0.02)


def test_histogram_memory_is_bounded_when_the_range_keeps_growing():
    c = quantize.RangeCollector()
    for k in range(12):
        c.update("t", np.random.default_rng(k).normal(scale=10.0 ** (k / 2), size=1000).astype(np.float32))
    assert quantize.HIST_BINS <= c.hist["t"].size <= 2 * quantize.HIST_BINS
    assert c.hist["t"].sum() == 12000
    assert c.hist["t"].size * c.width["t"] >= max(-c.lo["t"], c.hi["t"])


def test_minmax_only_collection_keeps_no_histograms_and_the_same_ranges():
    from lungedge.errors import LungedgeError

    full, lean = quantize.RangeCollector(), quantize.RangeCollector(histograms=False)
    for k in range(3):
        x = np.random.default_rng(k).normal(size=5000).astype(np.float32)
        full.update("t", x)
        lean.update("t", x)
    assert lean.range("t", "minmax") == full.range("t", "minmax") and not lean.hist
    with pytest.raises(LungedgeError, match="histograms"):
        lean.range("t", "entropy")


def _ort_minmax_ranges(model_path, x):
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    class Reader:
        def __init__(self):
            self.it = iter([{"input": x[i : i + 8]} for i in range(0, len(x), 8)])

        def get_next(self):
            return next(self.it, None)

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        cal = create_calibrator(Path(model_path), augmented_model_path=str(Path(d) / "aug.onnx"),
                                calibrate_method=CalibrationMethod.MinMax)
        cal.collect_data(Reader())
        return {k: tuple(float(np.ravel(r)[0]) for r in v.range_value) for k, v in cal.compute_data().items()}


def test_minmax_ranges_equal_onnxruntimes(tiny_onnx):
    x = _images(32)
    ours = quantize.collect_ranges(tiny_onnx, (x[i : i + 16] for i in range(0, 32, 16)), methods=("minmax",))
    theirs = _ort_minmax_ranges(tiny_onnx, x)
    assert set(theirs) <= set(ours["minmax"])
    for name, (lo, hi) in theirs.items():
        assert ours["minmax"][name] == pytest.approx((lo, hi), rel=1e-6, abs=1e-7)


# -- Q/DQ placement for TensorRT -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def residual_onnx(tmp_path_factory):
    """Conv stem, max pooling, a residual block (Add) and a Concat: what ResNet/GoogLeNet/DenseNet have."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                            torch.nn.ReLU(), torch.nn.MaxPool2d(2))
            self.a = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.b = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.c = torch.nn.Conv2d(16, 8, 1)
            self.fc = torch.nn.Linear(8, 3)

        def forward(self, x):
            x = self.stem(x)
            y = torch.relu(self.b(torch.relu(self.a(x))) + x)
            z = torch.relu(self.c(torch.cat([x, y], 1)))
            return self.fc(torch.nn.functional.adaptive_avg_pool2d(z, 1).flatten(1))

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("onnx") / "residual.onnx"
    torch.onnx.export(Net().eval(), torch.zeros(1, 3, 16, 16), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)
    return path


def test_trt_int8_quantizes_every_layer_and_nothing_tensorrt_cannot_fold(residual_onnx, tmp_path):
    import onnx

    x = _images(16)
    cache = tmp_path / "ranges.json"
    trt = quantize.to_int8(residual_onnx, tmp_path / "r.int8.onnx", "trt", "minmax", cache, batches=[x])
    report = quantize.trt_qdq_report(trt)
    assert report["unquantized"] == [] and report["unfoldable"] == [], report
    model = onnx.load(str(trt))
    prod = {o: n for n in model.graph.node for o in n.output}
    adds = [n for n in model.graph.node if n.op_type == "Add"]
    assert adds and all(sum(prod[t].op_type == "DequantizeLinear" for t in n.input if t in prod) == 1 for n in adds)
    assert not any(n.op_type in ("MaxPool", "Concat") and any(prod.get(t) is not None and
                   prod[t].op_type == "DequantizeLinear" for t in n.input) for n in model.graph.node)
    ref, q = _run(residual_onnx, x), _run(trt, x)
    assert (ref.argmax(1) == q.argmax(1)).mean() >= 0.75
    # ONNX Runtime's default placement (the CPU file) puts Q/DQ where TensorRT cannot fold it: the check sees it
    cpu = quantize.to_int8(residual_onnx, tmp_path / "r.int8-cpu.onnx", "cpu", "minmax", cache)
    assert quantize.trt_qdq_report(cpu)["unfoldable"]


def test_int8_on_a_full_disk_names_the_file_and_leaves_nothing(tiny_onnx, tmp_path):
    """ONNX Runtime's quantizer writes its intermediate copies itself: a full disk used to come out as a bare
    'No space left on device' (or, from onnx's shape inference, an internal 'Wire format was corrupt' error)."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import small_file_limit

    cache = tmp_path / "ranges.json"
    quantize.to_int8(tiny_onnx, tmp_path / "first.onnx", "trt", "minmax", cache, batches=[_images(8)])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "tiny.int8.onnx"
    code = ("import torch\nfrom lungedge import quantize\nfrom lungedge.io import WriteError\n"
            f"try: quantize.to_int8({str(tiny_onnx)!r}, {str(target)!r}, 'trt', 'minmax', {str(cache)!r})\n"
            "except WriteError as e: print(e)\n")
    limit = tiny_onnx.stat().st_size // 2  # the model fits nowhere
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], preexec_fn=small_file_limit(limit))
    assert proc.stdout.strip() == f"cannot write {target}: File too large", (proc.stdout, proc.stderr[-2000:])
    assert list(out_dir.iterdir()) == []  # no temporary copy left behind


def _ranges_in_child(path, then: str):
    """A child writing a ranges cache at ``path`` (write_ranges, through ONNX Runtime's writer) that, once the
    temporary is complete, right before renaming it: ``kill`` -- is SIGKILLed; ``wait`` -- says "stopped" and
    waits for a line on stdin."""
    from conftest import child_stopped_before

    return child_stopped_before("replace", then, f"""
        from lungedge import quantize
        quantize.write_ranges({str(path)!r}, {{"x": (-1.0, 2.0)}}, "minmax")
        print("done", flush=True)
    """, name_starts=".calibcache_")


def test_calibration_temporaries_a_killed_export_left_go_with_the_next_export(tmp_path):
    """ONNX Runtime's writer of the ranges cache leaves ``.calibcache_XXXXXXXX.tmp`` when killed: the next export
    using that calibration folder removes it, and nothing of the user's with a like name."""
    import signal

    folder = tmp_path / "calibration" / "k"
    proc = _ranges_in_child(folder / "ranges.m-0123456789ab.json", "kill")
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    left = [p.name for p in folder.iterdir() if p.name.startswith(".calibcache_")]
    assert len(left) == 1  # what kill -9 leaves
    users = [".calibcache_mine.tmp", ".calibcache_abcdefgh.tmp.bak", "calibcache_abcdefgh.tmp", ".notes.abcdefgh.tmp"]
    for name in users:
        (folder / name).write_text("mine\n")
    assert quantize.calibration_folder(tmp_path / "calibration", {"key": "k"}) == folder
    assert sorted(p.name for p in folder.iterdir()) == sorted(users + ["manifest.json"])


def test_calibration_temporaries_of_a_live_export_stay(tmp_path):
    """Two exports of different models calibrate into one folder (the key is the calibration set's): the one
    starting does not remove the other's temporary, and both ranges files are written."""
    folder = tmp_path / "calibration" / "k"
    proc = _ranges_in_child(folder / "ranges.a-0123456789ab.json", "wait")
    try:
        assert proc.stdout.readline().strip() == "stopped"
        live = sorted(p.name for p in folder.iterdir() if p.name.startswith(".calibcache_"))
        assert len(live) == 1
        quantize.calibration_folder(tmp_path / "calibration", {"key": "k"})
        quantize.write_ranges(folder / "ranges.b-0123456789ab.json", {"y": (0.0, 1.0)}, "minmax")
        assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".calibcache_")) == live
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.communicate(timeout=120)[0].strip() == "done"
    finally:
        proc.kill()
        proc.wait()
    assert quantize.read_ranges(folder / "ranges.a-0123456789ab.json") == {"x": (-1.0, 2.0)}
    assert quantize.read_ranges(folder / "ranges.b-0123456789ab.json") == {"y": (0.0, 1.0)}
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "ranges.a-0123456789ab.json",
                                                        "ranges.b-0123456789ab.json"]
