"""What both trainers share: the run configuration, the split, the image cache and the run folder."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from ..errors import LungedgeError
from ..io import write_json
from ..preprocess import Preprocessing, open_image
from ..ui import progress

RUN_FORMAT = "lungedge-run/1"


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored as ``config.json`` in the run folder)."""

    model: str
    data: str | None = None
    split: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    image_size: int | None = None
    lr: float | None = None
    weights: str = "imagenet"
    mode: str | None = None
    device: str = "cpu"
    out: str = "runs"
    run_name: str | None = None
    seed: int = 0
    patience: int = 0  # early stopping: epochs without a better val balanced accuracy (0: off)
    augment: bool = True
    group_by: str = "near-duplicate"  # for the split made when --split is not given
    val: float = 0.15
    test: float = 0.15
    unfreeze: str | None = None  # finetune: number of blocks or "all"
    init_checkpoint: str | None = None  # finetune: the checkpoint to start from
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    threads: int | None = None

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
        c.batch_size = int(c.batch_size or d.batch_size)
        c.lr = float(c.lr if c.lr is not None else d.lr)
        c.image_size = spec.preprocessing_for(c.image_size).size
        if c.epochs < 1:
            raise LungedgeError(f"--epochs must be at least 1, got {c.epochs}")
        if c.batch_size < 1:
            raise LungedgeError(f"--batch-size must be at least 1, got {c.batch_size}")
        if not c.lr > 0:
            raise LungedgeError(f"--lr must be positive, got {c.lr}")
        if c.device not in ("cpu", "cuda"):
            raise LungedgeError(f"unknown device {c.device!r} (cpu or cuda)")
        return c


# -- the split --------------------------------------------------------------------------------------

def _scan_fingerprint(root) -> str:
    from ..data.layout import detect_layout
    from ..data.scan import fingerprint, scan

    layout = detect_layout(root)
    with progress(len(layout.files), "hashing images") as advance:
        records = scan(layout.root, layout.files, thumbs=False, progress=advance)
    return fingerprint([r for r in records if r.ok])


def manifest_fingerprint(manifest: dict) -> str:
    from ..data.scan import fingerprint

    class _R:  # the (path, label, sha256) triple fingerprint() reads
        def __init__(self, it):
            self.path, self.label, self.sha256 = it["path"], it["label"], it["sha256"]

    return fingerprint([_R(it) for it in manifest["items"]])


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
    with progress(len(items), f"loading images at {prep.size} px") as advance:
        pixels = []
        for it in items:
            pixels.append(prep.pixels(open_image(root / it["path"])))
            advance()
    pixels = np.stack(pixels) if pixels else np.zeros((0, prep.size, prep.size, 3), np.uint8)
    for split in ("train", "val", "test"):
        idx = [i for i, it in enumerate(items) if it["split"] == split]
        out.x[split] = prep.normalize(pixels[idx]) if idx else np.zeros((0, *prep.input_shape), np.float32)
        out.y[split] = np.array([classes.index(items[i]["label"]) for i in idx], dtype=np.int64)
        out.paths[split] = [items[i]["path"] for i in idx]
    if len(out.y["train"]) == 0:
        raise LungedgeError("the split has no training images")
    return out


# -- the run folder ---------------------------------------------------------------------------------

def new_run_dir(cfg: TrainConfig) -> Path:
    base = Path(cfg.out) / cfg.model
    name = cfg.run_name or time.strftime("%Y%m%d-%H%M%S") + f"-s{cfg.seed}"
    run_dir = base / name
    if (run_dir / "last.pth").exists() or (run_dir / "last.h5").exists():
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
        if not ((run_dir / "last.pth").exists() or (run_dir / "last.h5").exists()) or not (run_dir / "config.json").exists():
            continue
        status = read_status(run_dir)
        if status != "finished" or cfg.run_name:
            return run_dir
    raise LungedgeError(f"no interrupted run of {cfg.model} to resume under {base}")


def read_status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "metrics.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def save_config(run_dir: Path, cfg: TrainConfig) -> None:
    write_json(run_dir / "config.json", {"format": RUN_FORMAT, **cfg.to_dict()})


def load_config(run_dir: Path) -> TrainConfig:
    return TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))


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


def env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def initial_model(cfg: TrainConfig, spec, classes: list[str]):
    """The model a run starts from: the checkpoint being fine-tuned, or a fresh one; mode applied."""
    from ..models import checkpoint as ckpt
    from ..models.registry import apply_mode, create

    if cfg.init_checkpoint:
        model, init_meta = ckpt.load_checkpoint(cfg.init_checkpoint, mode=cfg.mode, unfreeze=cfg.unfreeze)
        if init_meta["classes"] != classes:
            raise LungedgeError(f"{cfg.init_checkpoint} has classes {init_meta['classes']}, the split has {classes}")
    else:
        model = create(cfg.model, num_classes=len(classes), weights=cfg.weights, mode=cfg.mode,
                       image_size=cfg.image_size, unfreeze=cfg.unfreeze)
    apply_mode(spec, model, cfg.mode, cfg.unfreeze)
    return model
