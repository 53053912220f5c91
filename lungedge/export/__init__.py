"""Export a model to ONNX (FP32), FP16 and calibrated INT8, then (on the target) an engine.

``export(...)`` is the library entry point the CLI calls. Its steps, each in its own module:

1. :mod:`.sources` — the file is read by the source kind that recognises it (one module per
   kind: :mod:`.sources.torch`, :mod:`.sources.keras`) into a :class:`~.source.Source`, which
   the same kind runs and converts to an FP32 ONNX (dynamic batch, input ``input``, output
   ``logits``); :mod:`.metadata` stamps the lungedge metadata (including the build record);
2. :mod:`.compare` — parity of the source framework and ONNX Runtime on test images
   (:mod:`lungedge.testset`); fails below 100 % decisive top-1 agreement or above 1e-3
   relative error;
3. :mod:`.precision` — FP16 / INT8 through :mod:`lungedge.quantize`, each compared with FP32;
4. the TensorRT engine through :func:`lungedge.trt.build_from_onnx`, only where TensorRT and a
   GPU are present (elsewhere the command to run on the target is printed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import onnx_meta, quantize, stats, trt
from ..batching import nonfinite_rows
from ..errors import LungedgeError
from ..io import staged_folder, write_json
from ..limits import check_batch, check_input_size
from . import compare, metadata, precision
from .compare import PARITY_MAX_REL
from .source import Request, Source, parse_classes, resolve_checkpoint
from .sources import load_source, run_source, source_to_onnx

PARITY_IMAGES = 32

__all__ = ["export", "load_source", "resolve_checkpoint", "Request", "Source", "evaluation_set", "EvalSet", "failed_gates"]


@dataclass
class EvalSet:
    """Preprocessed inputs to compare on, their labels (indices) where known, and what they are."""

    x: np.ndarray
    y: np.ndarray | None
    where: str
    groups: list | None = None  # near-duplicate group per image (split manifest), for the release gate

    def head(self, n: int) -> "EvalSet":
        if len(self.x) <= n:
            return self
        return EvalSet(self.x[:n], None if self.y is None else self.y[:n], f"first {n} of {self.where}",
                       None if self.groups is None else self.groups[:n])


def evaluation_set(source: Source, data=None, limit: int | None = None, seed: int = 0, log=print) -> EvalSet:
    """Test images of the run's split, else images of --data, else random-pixel images (said so)."""
    from ..testset import load_test_set

    if source.split_path is not None:
        try:
            ts = load_test_set(split=source.split_path, data=data, limit=limit)
            return EvalSet(ts.inputs(source.preprocessing), ts.label_indices(source.classes), ts.where, ts.groups)
        except LungedgeError as exc:
            log(f"note: not comparing on the run's test images ({exc})")
    if data:
        ts = load_test_set(data=data, limit=limit or PARITY_IMAGES)
        return EvalSet(ts.inputs(source.preprocessing), ts.label_indices(source.classes), ts.where, ts.groups)
    # random pixels through the model's own preprocessing, so that the inputs have the range the model
    # expects (N(0, 1) would be a nearly black image to a caffe-style model that only subtracts means)
    prep = source.preprocessing
    pixels = np.random.default_rng(seed).integers(0, 256, size=(limit or PARITY_IMAGES, prep.size, prep.size, 3),
                                                  dtype=np.uint8)
    x = prep.normalize(pixels).astype(np.float32)
    return EvalSet(x, None, f"{len(x)} random-pixel images (no test images known: pass --data DIR)")


def _scores(outputs: np.ndarray, source: Source) -> np.ndarray:
    """One score per class (a single sigmoid output becomes two), for accuracy."""
    from ..runners.base import class_scores

    return class_scores(outputs, source.output, len(source.classes))


def _check_settings(calib_method: str, calib_size: int, max_batch: int) -> None:
    quantize.check_calib_method(calib_method)
    quantize.check_calib_size(calib_size)  # also without --int8
    check_batch(max_batch, "--max-batch")


def _check_fp32(source: Source, fp32: Path, base: Path, check: EvalSet, summary: dict, log) -> None:
    """The FP32 ONNX against the source framework on the same inputs; refuse a mismatch."""
    summary["parity_images"] = check.where
    from ..batching import predict_in_batches

    # the source a few images a call: a Keras ResNet50 on 32 images at once alone took > 3.8 GB (#14)
    ref = predict_in_batches(lambda c: run_source(source, c), check.x, 4)
    if ref.ndim != 2:
        raise LungedgeError(f"{source.path} outputs a {'x'.join(str(d) for d in ref.shape[1:]) or 'scalar'} array "
                            "per image; lungedge exports classifiers that output one score per class (N, classes): "
                            "end the model with a Flatten/Reshape to (N, classes) and export it again")
    bad = nonfinite_rows(ref)
    if bad:
        raise LungedgeError(f"{source.path}: the model's own output is NaN or infinite on {bad} of "
                            f"{check.where}: a broken checkpoint, or inputs it was not made for")
    p = compare.compare_outputs(ref, compare.run_onnx(fp32, check.x))
    summary["parity"]["fp32_vs_source"] = p
    log(f"fp32 ONNX {fp32}: top-1 agreement {p['top1_agreement']:.1%}, max rel error {p['max_rel']:.2e} "
        f"on {check.where}" + _nonfinite_note(p))
    if not compare.within(p):
        write_json(f"{base}.export.json", summary)
        raise LungedgeError(f"ONNX export of {source.path} does not match the source (top-1 agreement "
                            f"{p['top1_agreement']:.1%}, relative error {p['max_rel']:.1e} > {PARITY_MAX_REL}"
                            f"{_nonfinite_note(p)})")


def _nonfinite_note(parity: dict) -> str:
    n = parity.get("nonfinite")
    return f"; output NaN or infinite on {n} of {parity['images']} images" if n else ""


def _compare_variants(variants: list[tuple[str, Path]], fp32: Path, test: EvalSet, source: Source, summary: dict,
                      log, max_bacc_drop: float = stats.MAX_BACC_DROP, max_sens_drop: float = stats.MAX_SENS_DROP
                      ) -> None:
    """Each reduced-precision file against FP32 on the whole test set; where labelled, its accuracy and
    the release gate (:func:`lungedge.stats.release_gate`: paired group bootstrap, McNemar) in
    ``summary["gate"][variant]``."""
    ref = compare.run_onnx(fp32, test.x)
    if test.y is not None:
        summary["accuracy"]["fp32"] = compare.accuracy(_scores(ref, source), test.y, source.classes)
        summary["gate"] = {}
    for name, file in variants:
        summary["files"][name] = str(file)
        got = compare.run_onnx(file, test.x)
        agreement = compare.compare_outputs(ref, got)
        summary["parity"][f"{name}_vs_fp32"] = agreement
        line = f"{name} {file}: top-1 agreement with fp32 {agreement['top1_agreement']:.1%}{_nonfinite_note(agreement)}"
        if test.y is not None:
            summary["accuracy"][name] = compare.accuracy(_scores(got, source), test.y, source.classes)
            line += f", balanced accuracy {summary['accuracy'][name]['balanced_accuracy']:.3f}" \
                    f" (fp32 {summary['accuracy']['fp32']['balanced_accuracy']:.3f})"
        log(line + f" on {test.where}")
        if test.y is not None:
            gate = _gate(_scores(ref, source).argmax(1), _scores(got, source).argmax(1), test, source.classes,
                         max_bacc_drop, max_sens_drop)
            summary["gate"][name] = gate
            log(f"release gate {name} vs fp32: {stats.gate_line(gate)}")


def _gate(ref_pred, new_pred, test: EvalSet, classes, max_bacc_drop: float, max_sens_drop: float) -> dict:
    """The release gate of one reduced precision against FP32 on the export's test images (groups of the
    run's split; image by image where none are known, said in ``method``)."""
    gate = stats.release_gate(test.y, ref_pred, new_pred, test.groups, classes, max_bacc_drop, max_sens_drop)
    gate["test_set"] = test.where
    gate["method"] = ("paired bootstrap over near-duplicate groups" if test.groups is not None
                      else "paired bootstrap over images (no groups known)")
    return gate


def failed_gates(summary: dict) -> list[str]:
    """The variants of an export summary whose release gate against FP32 failed."""
    return [v for v, g in (summary.get("gate") or {}).items() if g and not g["pass"]]


OPSETS = (13, 18)  # opsets every exporter here writes: torch (7-20), tf2onnx 1.17 (up to 18); Q/DQ per channel needs 13


def export(model_name: str, checkpoint=None, fp16: bool = False, int8: bool = False, calib_data=None,
           calib_size: int = 300, calib_method: str = quantize.DEFAULT_CALIB_METHOD, max_batch: int = 8, opset: int = 17,
           engine: bool | None = None, out="engines", runs="runs", calibration="calibration",
           classes: str | None = None, data=None, trust_pickle: bool = False, log=print,
           options: dict | None = None, max_bacc_drop: float = stats.MAX_BACC_DROP,
           max_sens_drop: float = stats.MAX_SENS_DROP, uint8_input: bool = False, temperature: bool = True,
           input_check: bool = True) -> dict:
    """Export MODEL; returns the summary that is also written as ``<model>.export.json``.

    ``temperature``: fit one on the run's validation images and stamp it on every file
    (:mod:`lungedge.temperature`; nothing is fitted without validation images).
    ``input_check``: fit the input check (:mod:`lungedge.inputcheck`) on the run's training images (else the
    ``calib_data`` images) and stamp it on every file; its false-flag rate is measured on the validation part.

    ``options``: declared facts for the source kinds (``Request.options``: --custom, preprocessing, output).
    With FP16/INT8 and labelled test images, ``summary["gate"]`` holds each precision's release gate
    against FP32 (limits as fractions; :func:`failed_gates` lists the failed ones)."""
    _check_settings(calib_method, calib_size, max_batch)  # before any work
    if classes is not None:
        parse_classes(classes)
    if (options or {}).get("input_size") is not None:
        check_input_size(options["input_size"], "--input-size")
    if engine:  # asked for: said before anything is written or replaced, not after minutes of export
        try:
            trt.detect_target()
        except LungedgeError as exc:
            raise LungedgeError(f"--engine: no TensorRT engine can be built here ({exc}); export without "
                                "--engine and build it on the target with `lungedge engine build`") from None
    stats.check_gate_limits(max_bacc_drop, max_sens_drop)
    if isinstance(opset, bool) or not isinstance(opset, int) or not OPSETS[0] <= opset <= OPSETS[1]:
        raise LungedgeError(f"--opset must be from {OPSETS[0]} to {OPSETS[1]} (what the torch and Keras "
                            f"exporters and the INT8 Q/DQ writer all support), got {opset}")
    path = resolve_checkpoint(model_name, checkpoint, runs, log=log)
    source = load_source(path, Request(model_name, classes=classes, data=data, trust_pickle=trust_pickle,
                                         options=dict(options or {})))
    for note in source.notes:
        log(f"note: {note}")
    final = Path(out) / source.architecture
    summary = {"model": source.architecture, "checkpoint": str(path), "checkpoint_sha256": source.sha256,
               "classes": source.classes, "build": source.build, "output": source.output,
               "notes": list(source.notes), "files": {},
               "parity": {}, "accuracy": {}}
    # the set is written into a locked staging folder and replaces OUT/MODEL only once all of it is
    # written and checked: a kill or a failure leaves the previous complete set (issue #13)
    with staged_folder(final, "lungedge export", check=lambda stage: _check_set(stage, source), log=log) as stage:
        base = stage / source.architecture
        shown = lambda line: log(line.replace(str(stage), str(final)))  # noqa: E731 - paths as they will be
        fp32 = metadata.write(source_to_onnx(source, opset), source, Path(f"{base}.fp32.onnx"))
        summary["files"]["fp32"] = str(fp32)
        if source.converter:
            summary["converter"] = source.converter
        # the whole test part when other precisions are compared, its first images for parity
        test = evaluation_set(source, data, log=log) if (fp16 or int8) else None
        check = test.head(PARITY_IMAGES) if test is not None else evaluation_set(source, data, PARITY_IMAGES, log=log)
        _check_fp32(source, fp32, base, check, summary, shown)
        _release_source(source)  # the framework's model is not run again: free it before calibrating (#14)
        val = _validation_set(source, data) if (input_check or temperature) else None  # read once for both
        if input_check:
            _fit_input_check(source, data, calib_data, val, summary, shown)
        if temperature:
            _fit_temperature(source, fp32, val, summary, shown)
        if source.temperature or source.input_check:  # every later file inherits them through the source
            metadata.restamp(fp32, source, "fp32")
        variants = [precision.write_fp16(fp32, base, source)] if fp16 else []
        if int8:
            cal = precision.calibration(source, calib_data, calib_size, Path(calibration), calib_method)
            summary["calibration"] = cal.summary()
            variants += precision.write_int8(fp32, base, source, cal, shown)
        if test is not None:
            _compare_variants(variants, fp32, test, source, summary, shown, max_bacc_drop, max_sens_drop)
        if uint8_input:  # every file takes uint8 pixels and normalises inside (#14), checked against the float file
            from .uint8 import fold_normalisation

            summary["parity"]["uint8_input_vs_float"] = fold_normalisation(
                [Path(f) for f in summary["files"].values()], source.preprocessing, shown)
        summary["files"] = {v: str(final / Path(f).name) for v, f in summary["files"].items()}
        summary["engines"] = []
        write_json(stage / f"{source.architecture}.export.json", summary)
    summary["engines"] = _engines(summary["files"], fp16, int8, engine, max_batch, out, log)
    if summary["engines"]:
        write_json(final / f"{source.architecture}.export.json", summary)
    return summary


def _validation_set(source: Source, data):
    """The run's validation part (the temperature's fit, the input check's false-flag rate), read once and
    its images decoded once for both; None without a run split, the :class:`LungedgeError` where it cannot
    be read."""
    from ..testset import load_validation_set

    if source.split_path is None:
        return None
    try:
        return load_validation_set(source.split_path, data)
    except LungedgeError as exc:
        return exc


def _fit_temperature(source: Source, fp32: Path, val, summary: dict, log) -> None:
    """Temperature scaling on the run's validation part with the FP32 ONNX, kept in ``source.temperature``
    (the FP32 file is stamped again by the caller, every later file inherits it). Said in a note where
    it cannot be fitted (no run split, too few validation images)."""
    from .. import temperature as temp

    if val is None:
        log("note: probabilities not temperature-scaled: no validation images known (a run's split has them)")
        return
    if isinstance(val, LungedgeError):
        log(f"note: probabilities not temperature-scaled ({val})")
        return
    if len(val.paths) < temp.MIN_IMAGES:
        log(f"note: probabilities not temperature-scaled: {val.where} are fewer than {temp.MIN_IMAGES}")
        return
    labels = val.label_indices(source.classes)
    if labels is None:
        log(f"note: probabilities not temperature-scaled: the labels of {val.where} are not the model's classes")
        return
    scores = _scores(compare.run_onnx(fp32, val.inputs(source.preprocessing)), source)
    fit = temp.fit(scores, labels, "logits" if source.output == "logits" else "probabilities")
    fit["fitted_on"] = val.where
    source.temperature = fit
    summary["temperature"] = fit
    log(f"temperature {fit['value']:.3f} fitted on {val.where}: their negative log-likelihood "
        f"{fit['nll_before']:.3f} -> {fit['nll_after']:.3f}" + (" (at the search bound)" if fit["at_bound"] else "")
        + "; predictions unchanged")


def _reference_images(source: Source, data, calib_data):
    """(the input check's reference images, a note when there are none): the run's training part, else the
    --calib-data images (a folder, or a manifest's training part)."""
    from .. import inputcheck
    from ..testset import load_test_set, load_training_set

    if source.split_path is not None:
        try:
            return load_training_set(source.split_path, data, inputcheck.MAX_IMAGES), None
        except LungedgeError as exc:
            return None, f"no input check ({exc})"
    if calib_data:
        try:
            if Path(calib_data).is_file():
                return load_training_set(calib_data, None, inputcheck.MAX_IMAGES), None
            return load_test_set(data=calib_data, limit=inputcheck.MAX_IMAGES), None
        except LungedgeError as exc:
            return None, f"no input check (--calib-data: {exc})"
    return None, ("no input check: no training images known (a run's split has them; for a model from "
                  "outside pass --calib-data DIR with images like those it was trained on)")


def _descriptors(images, prep) -> np.ndarray:
    """The input check's descriptors of ``images`` (a TestImages), decoded through ``prep`` a chunk at a time
    (memory stays bounded); unreadable images are left out."""
    from .. import inputcheck

    def chunks():
        for i in range(0, len(images.paths), inputcheck.CHUNK):
            _, x, _ = prep.load_readable(images.paths[i : i + inputcheck.CHUNK])
            if x is not None:
                yield x, prep

    return inputcheck.describe_in_chunks(chunks())


def _fit_input_check(source: Source, data, calib_data, val, summary: dict, log) -> None:
    """The input check (:mod:`lungedge.inputcheck`) fitted on the reference images, through the model's own
    preprocessing, its false-flag rate measured on the validation part ``val`` (:func:`_validation_set`:
    without one, the check has no rate); kept in ``source.input_check`` (stamped on every file). Said in a
    note where there are no (or too few) reference images."""
    from .. import inputcheck

    ref, why = _reference_images(source, data, calib_data)
    if ref is None:
        log(f"note: {why}")
        return
    values = _descriptors(ref, source.preprocessing)
    if len(values) < inputcheck.MIN_IMAGES:
        log(f"note: no input check: {len(values)} readable reference images ({ref.where}) are fewer than "
            f"{inputcheck.MIN_IMAGES}")
        return
    check = inputcheck.fit(values, ref.where)
    if val is not None and not isinstance(val, LungedgeError):
        try:  # the decoded images stay cached in val for the temperature's fit
            values = inputcheck.describe_in_chunks([(val.inputs(source.preprocessing), source.preprocessing)])
        except LungedgeError:  # none of them readable: no rate, as without a validation part
            values = np.empty((0, len(inputcheck.DESCRIPTORS)))
        check = inputcheck.validation_rate(check, values, val.where)
    source.input_check = check
    summary["input_check"] = check
    rate = check["validation_flag_rate"]
    log(f"input check fitted on {ref.where}: {len(check['descriptors'])} descriptors"
        + (f"; flags {rate:.1%} of the {check['validation_images']} validation images" if rate is not None
           else "; no validation images to measure its false-flag rate on")
        + "".join(f"; {note}" for note in check.get("not_available", {}).values()))
    ref = check.get("set_reference") or {}
    if ref.get("validation_distance") is not None:
        log(f"set check: the validation images lie {ref['validation_distance']:.2f} training spreads from the "
            f"training images (a set differs beyond {ref['validation_threshold']:.2f})")


def _release_source(source: Source) -> None:
    """Drop the framework's model (and Keras's graph state) once parity is checked, and hand the freed
    memory back, so that calibration runs beside the ONNX files only (issue #14)."""
    import sys

    close = getattr(source.model, "close", None)  # a worker process (KerasReference) ends here
    if callable(close):
        close()
    source.model = None
    keras = sys.modules.get("keras")
    if source.framework == "keras" and keras is not None:
        keras.backend.clear_session()
    quantize.trim_memory()


def _check_set(stage: Path, source) -> None:
    """Every ONNX file of the staged set carries this source's checkpoint hash and input size."""
    for f in sorted(stage.glob("*.onnx")):
        meta = onnx_meta.read(f)
        if meta["source_sha256"] != source.sha256 or meta["preprocessing"].size != source.preprocessing.size:
            raise LungedgeError(f"{f.name} does not match the exported source; nothing was replaced")


def _engines(files: dict, fp16: bool, int8: bool, engine: bool | None, max_batch: int, out, log) -> list[str]:
    """Engines of the asked precisions where TensorRT and a GPU are here; else the command to run there."""
    if engine is False:
        return []
    variants = [v for v, asked in ((onnx_meta.variant_of("int8", "trt"), int8), ("fp16", fp16)) if asked] or ["fp32"]
    try:
        trt.detect_target()
    except LungedgeError as exc:
        if engine:
            raise
        builds = "; ".join(f"lungedge engine build {files[v]} --max-batch {max_batch}" for v in variants)
        log(f"no TensorRT engine built here ({exc}); on the target run: {builds}")
        return []
    return [str(trt.build_from_onnx(files[v], max_batch=max_batch, out=out)[0]) for v in variants]
