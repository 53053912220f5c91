"""What both trainers share: the run configuration, the split, the image cache and the run folder."""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from ..errors import LungedgeError, check_choice
from ..io import FolderLock, clean_temp_files, read_json, safe_name, write_error, write_json
from ..limits import check_batch, check_input_size, check_positive, check_seed, check_threads
from ..preprocess import Preprocessing, read_image
from ..ui import progress

RUN_FORMAT = "lungedge-run/1"


def _checked(default=None, **rules):
    """A field whose value read back from ``config.json`` must meet ``rules`` (pydantic ``Field`` constraints:
    ``ge``, ``strict``, ...). They are declared here once and applied by :func:`load_config` through
    :func:`lungedge.schemas.dataclass_model`; building a TrainConfig checks nothing (options are checked,
    with their own names, by :meth:`TrainConfig.resolved`)."""
    return field(default=default, metadata={"schema": rules})


_COUNT = dict(ge=1, strict=True)  # a whole number >= 1
_NUMBER = dict(strict=True, allow_inf_nan=False)  # a finite number, not a string


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored as ``config.json`` in the run folder).

    The one list of the run's fields: their types, defaults and the constraints a stored ``config.json``
    must meet (:func:`_checked`) are read from here by the schema check (:func:`load_config`)."""

    model: str
    data: str | None = None
    split: str | None = None
    epochs: int | None = _checked(**_COUNT)
    batch_size: int | None = _checked(**_COUNT)
    image_size: int | None = _checked(ge=8, strict=True)
    lr: float | None = _checked(gt=0, le=1, **_NUMBER)
    weights: str = "imagenet"
    mode: str | None = None
    device: str = "cpu"
    out: str = "runs"
    run_name: str | None = None
    seed: int = _checked(0, strict=True)
    patience: int = _checked(0, ge=0, strict=True)  # early stopping: epochs without a better val bal. acc (0: off)
    augment: bool = _checked(True, strict=True)
    group_by: str = "near-duplicate"  # for the split made when --split is not given
    val: float = _checked(0.15, ge=0, lt=1, **_NUMBER)
    test: float = _checked(0.15, ge=0, lt=1, **_NUMBER)
    unfreeze: str | None = None  # finetune: number of blocks or "all"
    init_checkpoint: str | None = None  # finetune: the checkpoint to start from
    weight_decay: float = _checked(1e-4, ge=0, **_NUMBER)
    warmup_epochs: float = _checked(1.0, ge=0, **_NUMBER)
    threads: int | None = _checked(**_COUNT)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def resolved(self, spec) -> "TrainConfig":
        """Fill the unset values from the model's defaults."""
        from ..models.registry import check_mode

        d = spec.defaults
        c = TrainConfig.from_dict(self.to_dict())
        c.mode = check_mode(c.mode or d.mode)
        c.epochs = int(c.epochs if c.epochs is not None else d.epochs)
        c.batch_size = int(c.batch_size if c.batch_size is not None else d.batch_size)
        c.lr = float(c.lr if c.lr is not None else d.lr)
        if c.image_size is not None:
            check_input_size(c.image_size, "--image-size")
        check_positive(c.lr, "--lr", upper=1.0)  # above 1 AdamW only diverges into NaN
        check_positive(c.batch_size, "--batch-size", integer=True)
        c.image_size = spec.preprocessing_for(c.image_size).size
        if c.epochs < 1:
            raise LungedgeError(f"--epochs must be at least 1, got {c.epochs}")
        if c.batch_size < 1:
            raise LungedgeError(f"--batch-size must be at least 1, got {c.batch_size}")
        if not c.lr > 0:
            raise LungedgeError(f"--lr must be positive, got {c.lr}")
        if c.device not in ("cpu", "cuda"):
            raise LungedgeError(f"unknown device {c.device!r} (cpu or cuda)")
        check_seed(c.seed)
        check_threads(c.threads)
        check_unfreeze(c.unfreeze)
        if isinstance(c.patience, bool) or not isinstance(c.patience, int) or c.patience < 0:
            raise LungedgeError(f"--patience must be 0 (off) or more epochs, got {c.patience!r}")
        from ..data.defaults import GROUP_BY

        check_choice(c.group_by, GROUP_BY, "--group-by")  # also with --split (where it was ignored)
        if c.epochs > MAX_EPOCHS:
            raise LungedgeError(f"--epochs must be at most {MAX_EPOCHS:,}, got {c.epochs}")
        check_batch(c.batch_size, "--batch-size")
        return c


MAX_EPOCHS = 10_000  # 10**12 trained until killed


def check_unfreeze(unfreeze) -> None:
    """--unfreeze: None, 'all' or a whole number of blocks >= 0 (``abc`` was int()'s ValueError, exit 3, in
    finetune mode, and taken without a word in the others)."""
    if unfreeze is None or unfreeze == "all":
        return
    text = str(unfreeze).strip()
    if not (text.isascii() and text.isdigit()):
        raise LungedgeError(f"--unfreeze must be a number of blocks or 'all', got {unfreeze!r}")


# -- the split --------------------------------------------------------------------------------------

def _scan_fingerprint(root) -> str:
    from ..data.layout import detect_layout
    from ..data.scan import fingerprint, scan

    layout = detect_layout(root)
    with progress(len(layout.files), "hashing images") as advance:
        records = scan(layout.root, layout.files, thumbs=False, progress=advance)
    return fingerprint([r for r in records if r.ok])


def prepare_split(cfg: TrainConfig, run_dir: Path | None, write: bool = True) -> tuple[dict, Path]:
    """The split manifest and the data root: read ``cfg.split`` (checked against ``cfg.data``) or make
    the grouped split of ``cfg.data`` and save it as ``split.json`` in the run folder."""
    from ..data.split import load_manifest, make_split, read_manifest, write_manifest

    if cfg.split:
        manifest = read_manifest(cfg.split)
        if cfg.data:
            root = Path(cfg.data)
            if not root.is_dir():
                raise LungedgeError(f"data folder not found: {root}")
            found = _scan_fingerprint(root)
            if found != manifest["dataset"]["fingerprint"]:
                raise LungedgeError(
                    f"split manifest {cfg.split} was made from another data set than {root} "
                    f"(fingerprint {manifest['dataset']['fingerprint'][:12]} != {found[:12]}); "
                    "make a split of this folder with 'lungedge data split' or omit --split")
        else:
            root = Path(manifest["dataset"]["root"])
        manifest, _ = load_manifest(cfg.split, root=root)
        return manifest, root
    if not cfg.data:
        raise LungedgeError("give the data folder (--data DIR) or a split manifest (--split FILE)")
    root = Path(cfg.data)
    if not root.is_dir():
        raise LungedgeError(f"data folder not found: {root}")
    manifest = make_split(root, val=cfg.val, test=cfg.test, seed=cfg.seed, group_by=cfg.group_by)
    if write and run_dir is not None:
        write_manifest(manifest, run_dir / "split.json")
    return manifest, Path(manifest["dataset"]["root"])


@dataclass
class Arrays:
    """Cached model inputs per split: x (float32, the model's layout), y (class index)."""

    x: dict = field(default_factory=dict)
    y: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)


def load_arrays(manifest: dict, root: Path, prep: Preprocessing) -> Arrays:
    """Decode every image once through ``prep`` (the same preprocessing export and runners use)."""
    classes = manifest["classes"]
    out = Arrays()
    items = manifest["items"]
    from ..limits import check_memory

    check_memory(len(items) * prep.size ** 2 * 3 * 5, f"caching {len(items)} images at {prep.size} px",
                 "use a smaller --image-size")  # uint8 pixels + float32 inputs
    with progress(len(items), f"loading images at {prep.size} px") as advance:
        pixels = []
        for it in items:
            pixels.append(prep.pixels(read_image(root / it["path"], prep.size)))  # the decode inference uses
            advance()
    pixels = np.stack(pixels) if pixels else np.zeros((0, prep.size, prep.size, 3), np.uint8)
    for split in ("train", "val", "test"):
        idx = [i for i, it in enumerate(items) if it["split"] == split]
        out.x[split] = prep.normalize(pixels[idx]) if idx else np.zeros((0, *prep.input_shape), np.float32)
        out.y[split] = np.array([classes.index(items[i]["label"]) for i in idx], dtype=np.int64)
        out.paths[split] = [items[i]["path"] for i in idx]
    if len(out.y["train"]) == 0:
        raise LungedgeError("the split has no training images")
    absent = [c for i, c in enumerate(classes) if not (out.y["train"] == i).any()]
    if absent:  # the model would have outputs it never learns, and val/test scores that hide it
        raise LungedgeError(f"the split's training part has no images of {', '.join(absent)} (classes "
                            f"{', '.join(classes)}): add images of each class, or list only the classes present")
    if len(out.y["val"]) == 0:  # the best epoch is chosen on it; without it every score is NaN
        raise LungedgeError(f"the split has no validation images ({len(items)} images in all): add images, "
                            "or give --split a manifest with a 'val' part")
    return out


# -- the run folder ---------------------------------------------------------------------------------

def default_run_name(cfg: TrainConfig) -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-s{cfg.seed}"


def claim_run_name(cfg: TrainConfig) -> str:
    """A new run's name when ``--run-name`` is not given: the timestamp name (``20250101-120000-s0``), or, when
    a run folder of that name exists (a run started in the same second), the first free ``-2``, ``-3``, ...
    The folder is made here (``mkdir``, atomic), so two runs started together never take the same name."""
    parent = Path(cfg.out) / safe_name(cfg.model, "model")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(parent, exc, "cannot create") from None
    base = default_run_name(cfg)
    for n in itertools.count(1):
        name = base if n == 1 else f"{base}-{n}"
        try:
            (parent / name).mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise write_error(parent / name, exc, "cannot create") from None
        return name
    raise AssertionError("unreachable")


def planned_run_dir(cfg: TrainConfig) -> Path:
    """``out/model/run_name``; the run name must be one plain folder name (it cannot leave ``out``)."""
    return Path(cfg.out) / safe_name(cfg.model, "model") / safe_name(cfg.run_name or default_run_name(cfg), "--run-name")


def lock_run(run_dir: Path) -> FolderLock:
    """Hold ``run_dir`` for this training (rank 0 only under torchrun): a second ``lungedge train`` with
    the same run folder gets one line naming this one. Litter of a killed run's writes is removed."""
    lock = FolderLock(run_dir).acquire()
    clean_temp_files(run_dir, published=[f"{which}.h5" for which in ("best", "last")])  # the Keras trainer's
    return lock


CHECKPOINT_SUFFIXES = (".pth", ".h5")  # the PyTorch and the Keras trainer's


def run_checkpoint(run_dir, which: str = "last") -> Path | None:
    """A run folder's ``best`` or ``last`` checkpoint (``.pth`` or ``.h5``), or None before its first epoch."""
    return next((p for s in CHECKPOINT_SUFFIXES if (p := Path(run_dir) / f"{which}{s}").exists()), None)


def new_run_dir(cfg: TrainConfig) -> Path:
    run_dir = planned_run_dir(cfg)
    if run_checkpoint(run_dir):
        raise LungedgeError(f"run folder {run_dir} already holds a run; use --resume or another --run-name")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def find_resumable(cfg: TrainConfig) -> Path:
    """The run to resume: ``out/model/run_name``, or the newest unfinished run of this model."""
    base = Path(cfg.out) / cfg.model
    if cfg.run_name:
        cands = [base / cfg.run_name]
    else:
        cands = sorted((p for p in base.glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for run_dir in cands:
        if not run_checkpoint(run_dir) or not (run_dir / "config.json").exists():
            continue
        status = read_status(run_dir)
        if status != "finished" or cfg.run_name:
            return run_dir
    if cfg.run_name:  # the run asked for by name: say what is wrong with it
        run_dir = base / cfg.run_name
        why = ("does not exist" if not run_dir.exists() else "has no finished epoch to resume from"
               if not run_checkpoint(run_dir) else "has no config.json")
        raise LungedgeError(f"cannot resume --run-name {cfg.run_name}: {run_dir} {why}")
    raise LungedgeError(f"no interrupted run of {cfg.model} to resume under {base}")


def read_status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "metrics.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def save_config(run_dir: Path, cfg: TrainConfig) -> None:
    write_json(run_dir / "config.json", {"format": RUN_FORMAT, **cfg.to_dict()})


def load_config(run_dir: Path) -> TrainConfig:
    """The stored ``config.json``; a damaged or hand-edited one is one line naming the file (and the field)."""
    from ..validation import validate

    path = run_dir / "config.json"
    data = read_json(path, "a run configuration")
    if not isinstance(data, dict):
        raise LungedgeError(f"{path} is not a run configuration (a JSON object expected)")
    validate(TrainConfig, data, path)  # fields typed and in range: "epochs": "many" is named here, not as --epochs
    return TrainConfig.from_dict(data)


def check_device(device: str, framework: str) -> None:
    if device != "cuda":
        return
    if framework == "torch":
        import torch

        ok = torch.cuda.is_available()
    else:
        import tensorflow as tf

        ok = bool(tf.config.list_physical_devices("GPU"))
    if not ok:
        raise LungedgeError("--device cuda: no CUDA GPU is available here; use --device cpu")


def epoch_line(rec: dict) -> str:
    return (f"epoch {rec['epoch']}: loss {rec['train_loss']:.4f}  val loss {rec['val_loss']:.4f}  "
            f"val balanced acc {rec['val_balanced_accuracy']:.3f}  ({rec['seconds']:.1f} s)"
            + ("  *best" if rec.get("best") else ""))


def ddp_env(launched: bool = False) -> tuple[int, int, int]:
    """(world size, rank, local rank) as torchrun sets them (1, 0, 0 without it), checked: ``RANK=abc`` was an
    internal error, ``WORLD_SIZE=0`` a division by zero, ``RANK=1`` alone a crash on a run folder never made.
    ``launched``: also the rest that torch.distributed's env:// start needs (checked before a run starts)."""
    values = {}
    for name, default in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)):
        raw = os.environ.get(name, "").strip()
        try:
            values[name] = int(raw) if raw else default
        except ValueError:
            values[name] = None
        if values[name] is None or values[name] < (1 if name == "WORLD_SIZE" else 0):
            least = "1" if name == "WORLD_SIZE" else "0"
            raise LungedgeError(f"{name} (set by torchrun) must be a whole number of at least {least}, got {raw!r}")
    world, rank, local = values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"]
    missing = [n for n in ("RANK", "MASTER_ADDR", "MASTER_PORT")
               if launched and world > 1 and not os.environ.get(n, "").strip()]
    if missing:  # torch.distributed's own ValueError was an internal error
        raise LungedgeError(f"WORLD_SIZE={world} without {', '.join(missing)}: start distributed training with "
                            "torchrun, which sets them all")
    if rank >= world:
        raise LungedgeError(f"RANK (set by torchrun) must be less than WORLD_SIZE ({world}), got {rank}; "
                            "start distributed training with torchrun")
    return world, rank, local


def initial_model(cfg: TrainConfig, spec, classes: list[str]):
    """The model a run starts from, as a :class:`lungedge.models.registry.Built` (model, build record,
    preprocessing): the checkpoint being fine-tuned (its build kept), or a fresh one; mode applied."""
    from ..models import checkpoint as ckpt
    from ..models.registry import Built, apply_mode, build_model

    if cfg.init_checkpoint:
        model, init_meta = ckpt.load_checkpoint(cfg.init_checkpoint, mode=cfg.mode, unfreeze=cfg.unfreeze)
        if init_meta["classes"] != classes:
            raise LungedgeError(f"{cfg.init_checkpoint} has classes {init_meta['classes']}, the split has {classes}")
        built = Built(model, ckpt.build_of(init_meta), Preprocessing.from_dict(init_meta["preprocessing"]))
    else:
        built = build_model(cfg.model, num_classes=len(classes), weights=cfg.weights, mode=cfg.mode,
                            image_size=cfg.image_size, unfreeze=cfg.unfreeze)
    apply_mode(spec, built.model, cfg.mode, cfg.unfreeze)
    return built


def run_preprocessing(cfg: TrainConfig, spec) -> Preprocessing:
    """The input of the model a run starts from: the fine-tuned checkpoint's, else its weights'."""
    if cfg.init_checkpoint:
        from ..models.checkpoint import read_meta

        return Preprocessing.from_dict(read_meta(cfg.init_checkpoint)["preprocessing"]).with_size(cfg.image_size)
    return spec.preprocessing_for(cfg.image_size, "imagenet" if cfg.weights == "imagenet" else "none")


# -- what both trainers do the same way ---------------------------------------------------------------

@dataclass
class RunData:
    """The run folder, its split and the cached inputs (what both trainers start with)."""

    run_dir: Path
    manifest: dict
    root: Path
    split_path: str
    classes: list
    arrays: Arrays

    @property
    def fingerprint(self) -> str:
        return self.manifest["dataset"]["fingerprint"]


def open_run(cfg: TrainConfig, run_dir: Path, resuming: bool, prep: Preprocessing, write: bool = True) -> RunData:
    """The split of ``run_dir`` (made and saved for a new run unless ``cfg.split`` is given) and its inputs."""
    split = cfg.split or (str(run_dir / "split.json") if resuming else None)
    manifest, root = prepare_split(TrainConfig.from_dict({**cfg.to_dict(), "split": split}), run_dir, write=write)
    split_path = str(Path(cfg.split)) if cfg.split else str(run_dir / "split.json")
    return RunData(run_dir, manifest, root, split_path, list(manifest["classes"]), load_arrays(manifest, root, prep))


def score(logits: np.ndarray, y: np.ndarray, classes) -> dict:
    """Mean cross-entropy of ``logits`` against ``y`` plus :func:`.metrics.summarize`'s metrics."""
    from .metrics import summarize

    if len(y) == 0:
        return {"loss": float("nan"), **summarize([], [], classes)}
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return {"loss": float(-logp[np.arange(len(y)), y].mean()), **summarize(y, logits.argmax(1), classes)}


def is_better(best: dict | None, val: dict) -> bool:
    """Higher validation balanced accuracy, ties broken by a lower validation loss."""
    if best is None:
        return True
    score_, top = val["balanced_accuracy"], best["val_balanced_accuracy"]
    return score_ > top + 1e-12 or (score_ >= top - 1e-12 and val["loss"] < best["val_loss"])


def epoch_record(epoch: int, train_loss: float, val: dict, seconds: float, improved: bool, **extra) -> dict:
    return {"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"],
            "val_balanced_accuracy": val["balanced_accuracy"], "val_accuracy": val["accuracy"], **extra,
            "seconds": seconds, "best": bool(improved)}


def best_record(epoch: int, val: dict) -> dict:
    return {"epoch": epoch, "val_balanced_accuracy": val["balanced_accuracy"], "val_loss": val["loss"]}


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to zero at ``total_steps`` (a factor of the rate)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def augment(x, gen, prep: Preprocessing, max_degrees: float = 10.0, max_scale: float = 0.10, max_shift: float = 0.06,
            contrast: float = 0.10, brightness_levels: float = 6.0):
    """Random horizontal flip, small rotation/zoom/shift, contrast (x 1 +- ``contrast``) and brightness
    (+- ``brightness_levels`` grey levels, converted through ``prep``'s scale and std) on a batch of
    normalised NCHW torch inputs (train only; val/test see exactly the model's Preprocessing)."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    r = torch.rand(b, 7, generator=gen) * 2 - 1  # uniform in [-1, 1]
    x = torch.where((r[:, 0] > 0)[:, None, None, None], x.flip(-1), x)
    angle = r[:, 1] * math.radians(max_degrees)
    scale = 1 + r[:, 2] * max_scale
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, r[:, 3] * max_shift], 1),
                         torch.stack([sin, cos, r[:, 4] * max_shift], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    unit = brightness_levels * prep.scale / float(np.mean(prep.std))
    return x * (1 + contrast * r[:, 5])[:, None, None, None] + (unit * r[:, 6])[:, None, None, None]


def clean(v):
    """NaN/inf -> None, recursively (JSON has no NaN)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [clean(x) for x in v]
    return v


def write_metrics(run: RunData, cfg: TrainConfig, history, best, test, status, seconds, suffix: str = ".pth",
                  **extra) -> dict:
    """Write (and return) the run summary ``metrics.json``."""
    manifest = run.manifest
    summary = {
        "format": RUN_FORMAT, "model": cfg.model, "run_dir": str(run.run_dir), "status": status,
        "config": cfg.to_dict(), "classes": manifest["classes"],
        "split": {"manifest": run.split_path, "fingerprint": run.fingerprint,
                  "group_by": manifest["params"]["group_by"],
                  "counts": {s: sum(v.values()) for s, v in manifest["counts"].items()}},
        "history": history, "best": best, "test": test, "wall_seconds": round(seconds, 1),
        "checkpoints": {"best": str(run.run_dir / f"best{suffix}"), "last": str(run.run_dir / f"last{suffix}")},
        **extra,
    }
    summary = clean(summary)
    write_json(run.run_dir / "metrics.json", summary)
    return summary
