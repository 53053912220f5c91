"""Classify image files with any artifact: class and probabilities per image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .batching import prefetched
from .errors import LungedgeError
from .runners import open_runner


def predict(artifact, images, backend: str | None = None, device: str | None = None, precision: str | None = None,
            threads: int | None = None, batch: int = 16, explain_dir=None, method: str = "auto") -> dict:
    """{"artifact", "backend", "classes", "predictions": [{"image", "class", "probabilities"}]}; where the
    artifact carries an input check (:mod:`lungedge.inputcheck`), each prediction also has "input_check":
    {"unlike_training", "reasons"} (the class and probabilities are the model's all the same). No set check
    (``eval``'s ``set_shift``): the images of one call are most often one scan's slices, and a single scan
    differs from the training mix as a set by itself (README, "Set check"). With
    ``explain_dir`` each prediction also gets "overlay": the image with its saliency map (Grad-CAM on torch,
    occlusion elsewhere; :mod:`lungedge.saliency`) written there; a Ctrl-C (or SIGTERM) leaves that folder
    as it was or with every overlay of this run, and notes which (:func:`explain_kept`)."""
    images = [Path(p) for p in images]
    if not images:
        raise LungedgeError("give at least one IMAGE")
    if explain_dir is None:
        return _predict(artifact, images, backend, device, precision, threads, batch, None, method, [])
    from .saliency import overlays_in

    earlier, sets = overlays_in(explain_dir), []
    try:
        return _predict(artifact, images, backend, device, precision, threads, batch, explain_dir, method, sets)
    except KeyboardInterrupt:
        from .io import note_kept

        note_kept(explain_kept(explain_dir, earlier, sets[0] if sets else None))
        raise


def explain_kept(folder, earlier: int, together) -> str:
    """What an interrupted ``predict --explain`` leaves in ``folder``, said after "interrupted": the overlays are
    one set (:func:`lungedge.io.written_together`), so all of this run's, or none and the ``earlier`` ones as
    they were."""
    if together is not None and together.committed:
        return f"{folder} holds this run's {together.files} overlay(s)"
    if earlier:
        return f"no overlay written: {folder} holds its {earlier} earlier overlay(s) as they were"
    return f"no overlay written to {folder}"


def _predict(artifact, images: list[Path], backend, device, precision, threads, batch: int, explain_dir,
             method: str, sets: list) -> dict:
    """:func:`predict`; ``sets`` gets the overlays' :class:`lungedge.io.TogetherSet` once they are written."""
    with open_runner(artifact, backend, device, precision, threads) as runner:
        preds, unreadable, readable = [], [], []
        chunks = (images[i : i + batch] for i in range(0, len(images), batch))
        # a batch at a time (memory stays bounded), the next one decoded while this one runs
        for chunk, x, turns in prefetched(lambda c: _decoded(runner.preprocessing, c, unreadable), chunks):
            if not chunk:
                continue
            readable += chunk
            probs = runner.probabilities(x)
            checks = runner.input_check.flag(x, runner.preprocessing) if runner.input_check else [None] * len(x)
            for path, p, check, turn in zip(chunk, probs, checks, turns):
                k = int(np.argmax(p))
                preds.append({"image": str(path), "class": runner.classes[k],
                              "probabilities": {c: round(float(v), 6) for c, v in zip(runner.classes, p)}})
                if check is not None:
                    preds[-1]["input_check"] = check
                if turn:  # viewers show it turned; the model sees it as stored (as in training)
                    preds[-1]["exif_orientation"] = turn
        if not preds:
            first = unreadable[0]
            raise LungedgeError(f"none of the {len(images)} images could be read (first: {first['image']}: "
                                f"{first['reason']})")
        if explain_dir is not None:
            from .io import FolderLock, written_together
            from .saliency import clean_overlay_temps, explain, write_overlays

            # one predict --explain into a folder at a time; the overlays take their names together at the
            # end, so a full disk or a kill leaves the folder as it was, not part of the set
            with FolderLock(Path(explain_dir).absolute(), "lungedge predict --explain"), written_together() as together:
                sets.append(together)
                clean_overlay_temps(explain_dir)
                stems: set[str] = set()  # one overlay per image, also when file names repeat across folders
                for i in range(0, len(readable), batch):
                    chunk = readable[i : i + batch]
                    written = write_overlays(explain(runner, chunk, method), explain_dir, stems,
                                             runner.classes)
                    for p, f in zip(preds[i : i + batch], written):
                        p["overlay"] = f
        return {"artifact": str(artifact), "model": runner.info.architecture, "backend": runner.backend,
                "device": runner.device, "precision": runner.variant, "classes": runner.classes,
                "temperature": runner.temperature,
                "predictions": preds, "unreadable": unreadable}


def _decoded(prep, chunk: list[Path], unreadable: list[dict]):
    """(the readable paths of ``chunk``, their inputs, their EXIF turns from the same decode); each unreadable
    one (missing, corrupt, over LUNGEDGE_MAX_PIXELS) is appended to ``unreadable`` as {"image", "reason"}
    instead of failing all."""
    turns: list = []
    keep, x, skipped = prep.load_readable(chunk, turns)
    unreadable += [{"image": str(path), "reason": reason} for path, reason in skipped]
    return [chunk[i] for i in keep], x, turns

