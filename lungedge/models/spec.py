"""What one registry entry declares: :class:`ModelSpec` (framework, builder, default preprocessing,
training defaults, the head's path and the backbone's stages)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LungedgeError, check_choice
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

FRAMEWORKS = ("torch", "keras")
MODES = ("transfer", "finetune", "full")
NUM_CLASSES = 3
BUILD_FORMAT = "lungedge-build/1"

# keras.applications.resnet50.preprocess_input ("caffe"): RGB->BGR, subtract the BGR means, no scaling
CAFFE_BGR = Preprocessing(size=224, mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0), scale=1.0,
                          channel_order="BGR", layout="NHWC")
TORCH_IMAGENET = Preprocessing(size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, scale=1.0 / 255.0,
                               channel_order="RGB", layout="NCHW")


@dataclass(frozen=True)
class Defaults:
    """Training defaults, from the research group's table."""

    mode: str
    epochs: int
    batch_size: int
    lr: float
    finetune_lr: float = 1e-4
    finetune_unfreeze: int = 2


def check_mode(mode: str) -> str:
    return check_choice(mode, MODES, "mode")


@dataclass(frozen=True)
class ModelSpec:
    """One architecture.

    ``builder`` (see :mod:`.builders`) constructs the network, records its ``build`` and
    gives the preprocessing of each weights choice; ``preprocessing`` is the input of a
    random-init model and of a weights file in the framework's own layout. ``head`` is
    the dotted path of the classifier (torch module path or Keras layer name) that is
    replaced for the class count; ``blocks`` lists the backbone's top-level stages from
    the output side inwards: finetune mode unfreezes the head plus the first
    ``unfreeze`` of them, transfer mode only the head, full mode everything.
    """

    name: str
    framework: str
    title: str
    builder: object
    preprocessing: Preprocessing
    defaults: Defaults
    head: str
    blocks: tuple[str, ...]
    min_size: int = 32
    notes: str = ""

    @property
    def native_size(self) -> int:
        return self.preprocessing.size

    def check_size(self, image_size: int | None) -> int:
        size = int(image_size or self.native_size)
        if size < self.min_size:
            raise LungedgeError(f"{self.name} needs inputs of at least {self.min_size} px, got {size}")
        return size

    def preprocessing_for(self, image_size: int | None = None, weights: str = "none") -> Preprocessing:
        """The input of this model built with ``weights`` ("none", "imagenet" or a file), at ``image_size``."""
        base = self.builder.preprocessing(self, weights) if weights == "imagenet" else self.preprocessing
        return base.with_size(self.check_size(image_size or base.size))

    def trainable_rule(self, mode: str, unfreeze: int | str | None = None) -> str:
        """In words: what trains in ``mode``."""
        if mode == "transfer":
            return f"head ({self.head}) only"
        if mode == "full":
            return "all layers"
        blocks = self.unfrozen_blocks(mode, unfreeze)
        return f"head + {', '.join(blocks)}"

    def unfrozen_blocks(self, mode: str, unfreeze: int | str | None = None) -> tuple[str, ...]:
        check_mode(mode)
        if mode == "transfer":
            return ()
        if mode == "full" or unfreeze == "all":
            return self.blocks
        n = self.defaults.finetune_unfreeze if unfreeze is None else int(unfreeze)
        if n < 0:
            raise LungedgeError(f"--unfreeze must be a non-negative number of blocks or 'all', got {n}")
        return self.blocks[:n]
