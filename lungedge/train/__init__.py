"""Training: ``train(config)`` for any registry model, ``resume``, and ``finetune(checkpoint)``.

The torch trainer (:mod:`.torch_trainer`) also runs under ``torchrun`` with
DistributedDataParallel; the Keras trainer (:mod:`.keras_trainer`) accepts a
``tf.distribute`` strategy. Heavy libraries are imported inside the functions,
torch always before tensorflow.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LungedgeError
from .common import TrainConfig, ddp_env, run_checkpoint


def train(cfg: TrainConfig, resume: bool = False, on_epoch=None, show_progress: bool | None = None,
          stop_after: int | None = None, strategy=None) -> dict:
    """Train ``cfg.model`` (or, with ``resume``, continue its newest interrupted run); return the
    run summary that is also written to ``<out>/<model>/<run>/metrics.json``."""
    from ..models.registry import get_spec, import_torch_first
    from .common import claim_run_name, default_run_name, lock_run, planned_run_dir

    spec = get_spec(cfg.model)
    if cfg.run_name is not None:
        planned_run_dir(cfg)  # refuses a --run-name that would leave the runs folder
    import_torch_first()
    resume_dir = None
    if resume:
        from .common import find_resumable, load_config

        resume_dir = find_resumable(cfg)
        stored = load_config(resume_dir)
        _check_resume_options(cfg, stored, resume_dir)
        stored.device, stored.threads = cfg.device, cfg.threads or stored.threads
        cfg = stored
    cfg = cfg.resolved(spec)
    if cfg.split:
        from ..data.split import read_manifest

        read_manifest(cfg.split)  # a bad manifest is refused before any run folder is made
    main_rank = ddp_env(launched=True)[1] == 0
    runs = Path(cfg.out) / cfg.model
    new_parents = [p for p in (runs.parent, runs) if not p.exists()]  # runs/, runs/MODEL
    claimed = resume_dir is None and not cfg.run_name and main_rank
    if resume_dir is None and not cfg.run_name:  # a timestamp, made unique (its folder made) by the main rank;
        cfg.run_name = claim_run_name(cfg) if main_rank else default_run_name(cfg)  # others get its run folder
    run_dir = resume_dir or planned_run_dir(cfg)
    new_folder = resume_dir is None and (claimed or not run_dir.exists())
    try:
        lock = lock_run(run_dir) if main_rank else None
    except BaseException:
        for folder in (run_dir, *reversed(new_parents)) if claimed else ():  # the folders made for it, if empty
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    refused = False
    try:
        return _train(cfg, spec, resume_dir, on_epoch, show_progress, stop_after, strategy)
    except LungedgeError as exc:
        from ..io import WriteError

        if new_folder and main_rank and not run_checkpoint(run_dir):
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)  # refused before an epoch finished: leave no half run
            refused = True
        elif isinstance(exc, WriteError) and main_rank and run_checkpoint(run_dir):  # e.g. the disk filled up
            raise WriteError(f"{exc}; {_kept(cfg, run_dir)}") from None
        raise
    except KeyboardInterrupt:
        from ..io import note_kept

        if run_checkpoint(run_dir):
            note_kept(_kept(cfg, run_dir))
        else:
            note_kept(f"{run_dir}: no epoch finished, nothing to resume")
        raise
    finally:
        if lock is not None:
            lock.release()
        for folder in reversed(new_parents) if refused else ():  # the folders this refused run made, if empty
            try:
                folder.rmdir()
            except OSError:
                pass


def _kept(cfg: TrainConfig, run_dir: Path) -> str:
    """What a stopped run keeps (its epochs' files are written as one set: the last finished one is whole)."""
    return (f"{run_dir} keeps its last finished epoch; continue with "
            f"'lungedge train {cfg.model} --out {cfg.out} --run-name {run_dir.name} --resume'")


# where a run runs (free to change on resume) and how it is found (--out, --run-name)
_RESUME_FREE = ("model", "device", "threads", "out", "run_name")


def _check_resume_options(given: TrainConfig, stored: TrainConfig, run_dir: Path) -> None:
    """Refuse options that differ from the run being resumed: it continues exactly as it was started (the
    schedule is laid out over its epochs): a differing --lr or --epochs is refused, not silently ignored."""
    import os

    default = TrainConfig(model=given.model)
    differ = []
    for name in (f for f in given.to_dict() if f not in _RESUME_FREE):
        value, was = getattr(given, name), getattr(stored, name)
        if value == getattr(default, name) or value == was:
            continue  # not given (its default), or the same
        if name in ("data", "split", "init_checkpoint") and was and os.path.abspath(value) == os.path.abspath(was):
            continue
        if isinstance(value, bool):  # --augment/--no-augment
            differ.append(f"--{'' if value else 'no-'}{name} (started with --{'' if was else 'no-'}{name})")
        else:
            differ.append(f"--{name.replace('_', '-')} {value} (started with {was})")
    if differ:
        raise LungedgeError(f"--resume continues {run_dir} as it was started, but {'; '.join(differ)}: "
                            "drop these options, or start a new run with another --run-name")


def _train(cfg: TrainConfig, spec, resume_dir, on_epoch, show_progress, stop_after, strategy) -> dict:
    if cfg.weights not in ("none", "imagenet") and not Path(cfg.weights).is_file():
        raise LungedgeError(f"--weights: {cfg.weights} is neither 'imagenet', 'none' nor an existing file")
    if spec.framework == "torch":
        if strategy is not None:
            raise LungedgeError("a tf.distribute strategy only applies to Keras models; use torchrun for torch models")
        from .torch_trainer import train_torch

        return train_torch(cfg, on_epoch=on_epoch, show_progress=show_progress, stop_after=stop_after,
                           resume_dir=resume_dir)
    from .keras_trainer import train_keras

    return train_keras(cfg, on_epoch=on_epoch, show_progress=show_progress, stop_after=stop_after,
                       resume_dir=resume_dir, strategy=strategy)


def finetune_config(checkpoint, unfreeze: str | None = None, epochs: int | None = None, lr: float | None = None,
                    **overrides) -> TrainConfig:
    """The run configuration that continues ``checkpoint`` with more layers trainable and a lower rate."""
    from ..models.checkpoint import read_meta
    from ..models.registry import get_spec

    meta = read_meta(checkpoint)
    spec = get_spec(meta["architecture"])
    base = dict(meta.get("config") or {})
    unfreeze = unfreeze if unfreeze is not None else str(spec.defaults.finetune_unfreeze)
    if unfreeze != "all":
        try:
            if int(unfreeze) < 0:
                raise ValueError
        except ValueError:
            raise LungedgeError(f"--unfreeze must be a number of blocks or 'all', got {unfreeze!r}") from None
    cfg = TrainConfig.from_dict({
        **base,
        "model": spec.name, "mode": "full" if unfreeze == "all" else "finetune", "unfreeze": unfreeze,
        "epochs": epochs if epochs is not None else 10,
        "lr": lr if lr is not None else min(spec.defaults.finetune_lr, float(base.get("lr") or 1.0) / 10),
        "image_size": meta["input_size"], "init_checkpoint": str(checkpoint), "weights": "none",
        "run_name": None, "split": overrides.pop("split", None) or meta.get("split_manifest"),
        "data": overrides.pop("data", None) or base.get("data") or meta.get("data_root"),
    })
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    if cfg.split:
        from ..data.split import read_manifest

        manifest = read_manifest(cfg.split)
        if meta.get("split_fingerprint") and manifest["dataset"]["fingerprint"] != meta["split_fingerprint"]:
            raise LungedgeError(f"split manifest {cfg.split} is of another data set than the one {checkpoint} was trained on")
    return cfg


def finetune(checkpoint, unfreeze: str | None = None, epochs: int | None = None, lr: float | None = None,
             on_epoch=None, show_progress: bool | None = None, **overrides) -> dict:
    cfg = finetune_config(checkpoint, unfreeze, epochs, lr, **overrides)
    return train(cfg, on_epoch=on_epoch, show_progress=show_progress)


__all__ = ["TrainConfig", "train", "finetune", "finetune_config"]
