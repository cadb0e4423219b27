"""One preprocessing spec, and the transforms built from it.

A pretrained network only helps when every image reaches it the way its training images did:
same size, crop, interpolation, mean and std. `Preprocessing` holds those numbers. It is
resolved once from the backbone and the data (`resolve_preprocessing`, as timm's
``resolve_data_config`` does), builds the training and evaluation transforms, and is stored in
every checkpoint and export, so `helpers.predict` prepares a new image exactly as validation
images were prepared during training.

The article's pipeline, SquarePad -> Resize -> CenterCrop -> Normalize, is `eval_transform`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch
from torchvision.transforms import v2

from .errors import InputError
from .models import BackboneSpec, TransferModel

INTERPOLATIONS = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR,
                  "nearest": v2.InterpolationMode.NEAREST}
AUGMENTATIONS = ("cells", "cells_no_flip", "natural", "natural_no_flip", "none")
# Test-time flips that keep the label, per augmentation recipe: photos have an "up" (a mirrored
# cat is a cat, an upside-down one is rare); aligned scans such as solar cells have none.
# The "_no_flip" recipes and "none" are for data where a mirror can change the answer (digits, text,
# left/right anatomy): no flips at test either.
TTA_FLIPS = {"cells": "hvflip", "cells_no_flip": None, "natural": "hflip", "natural_no_flip": None, "none": None}
# What a recipe becomes when notebook 02 finds that its mirrors change the label: the same recipe
# without its flips (for "cells" also without the 90-degree turns, which change which way is up).
WITHOUT_MIRRORS = {"cells": "cells_no_flip", "cells_no_flip": "cells_no_flip", "natural": "natural_no_flip",
                   "natural_no_flip": "natural_no_flip", "none": "none"}
MAX_IMAGE_SIZE = 2048


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB image becomes the network's input tensor.

    SquarePad (if ``square_pad``) -> Resize the shorter side to ``image_size / crop_pct`` ->
    CenterCrop ``image_size`` -> scale to [0, 1] -> Normalize with ``mean`` and ``std``.
    ``crop_pct`` is the crop's share of the resized image: ImageNet models use 0.875, images
    whose object fills the frame (a solar cell, a scanned document) use 1.0.
    """

    image_size: int
    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    square_pad: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool) \
                or not 8 <= self.image_size <= MAX_IMAGE_SIZE:
            raise InputError(f"image_size must be an integer in 8..{MAX_IMAGE_SIZE}, got {self.image_size!r}")
        if not 0.1 <= float(self.crop_pct) <= 1.0:
            raise InputError(f"crop_pct must be in [0.1, 1.0], got {self.crop_pct!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise InputError(f"unknown interpolation {self.interpolation!r}; choose one of {list(INTERPOLATIONS)}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3 or (name == "std" and min(value) <= 0):
                raise InputError(f"{name} needs three values (R, G, B){', all > 0' if name == 'std' else ''}, "
                                 f"got {value!r}")
        # Plain floats and tuples, so the spec compares equal after a round trip through a checkpoint.
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def resize_size(self) -> int:
        return int(round(self.image_size / self.crop_pct))

    def to_dict(self) -> dict:
        """Plain values (lists, not tuples) for checkpoints and JSON."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "Preprocessing":
        names = [f.name for f in fields(cls)]
        missing = [n for n in names[:4] if n not in values]
        unknown = sorted(set(values) - set(names))
        if missing or unknown:
            raise InputError(f"a preprocessing spec needs {names[:4]} (and may give {names[4:]}); "
                             f"missing {missing}, unknown {unknown}")
        return cls(**values)


def _spec(backbone: BackboneSpec | TransferModel) -> BackboneSpec:
    return backbone.spec if isinstance(backbone, TransferModel) else backbone


def resolve_preprocessing(backbone: BackboneSpec | TransferModel, image_size: int | None = None,
                          crop_pct: float | None = None) -> Preprocessing:
    """The backbone's ImageNet preprocessing, with the image size and crop this data needs.

    Mean, std and interpolation always come from the backbone (they are what its weights were
    trained with); ``image_size`` defaults to the backbone's input size and ``crop_pct`` to its
    ImageNet crop.
    """
    spec = _spec(backbone)
    return Preprocessing(image_size=int(spec.input_size if image_size is None else image_size),
                         crop_pct=float(spec.input_size / spec.resize_size if crop_pct is None else crop_pct),
                         mean=spec.mean, std=spec.std, interpolation=spec.interpolation)


def _as_preprocessing(source: Preprocessing | BackboneSpec | TransferModel, image_size: int | None,
                      crop_pct: float | None) -> Preprocessing:
    if isinstance(source, Preprocessing):
        if image_size is not None or crop_pct is not None:
            raise ValueError("give image_size and crop_pct either in the Preprocessing or as arguments, not both")
        return source
    return resolve_preprocessing(source, image_size, crop_pct)


class SquarePad(torch.nn.Module):
    """Pad an image tensor (..., H, W) with zeros to a centred square (the article's SquarePad).

    ``Resize`` with one number already keeps the aspect ratio, but the centre crop after it would then cut
    off the ends of the long side; padding first keeps the whole image in the square. The crop loses
    nothing only with ``crop_pct=1.0``; with a smaller one (ImageNet's 0.875) it trims
    ``(1 - crop_pct) / 2`` of the square from each edge,
    which cuts into the image along its long side (the padding absorbs it along the short side).
    """

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        side = max(h, w)
        left, top = (side - w) // 2, (side - h) // 2
        return v2.functional.pad(image, [left, top, side - w - left, side - h - top], fill=0)


class RandomRot90(torch.nn.Module):
    """Rotate by a random multiple of 90 degrees (solar cells and many scans have no 'up')."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(0, 4, ()).item())
        return torch.rot90(image, k, dims=(-2, -1))


def _normalize(prep: Preprocessing) -> list[torch.nn.Module]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(prep.mean, prep.std)]


def eval_transform(source: Preprocessing | BackboneSpec | TransferModel, image_size: int | None = None,
                   crop_pct: float | None = None) -> v2.Compose:
    """Deterministic preprocessing: SquarePad -> Resize -> CenterCrop -> Normalize.

    ``source`` is a `Preprocessing`, or a backbone (spec or model) resolved with ``image_size``
    and ``crop_pct`` by `resolve_preprocessing`. The returned transform carries its spec as
    ``.preprocessing``: `fit` stores it in the checkpoints.
    """
    prep = _as_preprocessing(source, image_size, crop_pct)
    transform = v2.Compose([
        *([SquarePad()] if prep.square_pad else []),
        v2.Resize(prep.resize_size, interpolation=INTERPOLATIONS[prep.interpolation], antialias=True),
        v2.CenterCrop(prep.image_size),
        *_normalize(prep),
    ])
    transform.preprocessing = prep
    return transform


def train_transform(source: Preprocessing | BackboneSpec | TransferModel, image_size: int | None = None,
                    augment: str = "natural", crop_pct: float | None = None) -> v2.Compose:
    """Training preprocessing with augmentation suited to the data.

    - ``"cells"``: aligned, orientation-free images such as ELPV solar cells: the recipe of
      Deitsch et al. 2019 (scale +-2 %, rotation +-3 deg, translation +-2 %, flips, 90 deg turns).
    - ``"cells_no_flip"``: the same small scaling, rotation and translation, without flips and turns.
    - ``"natural"``: photos: random resized crop, horizontal flip, mild colour jitter.
    - ``"natural_no_flip"``: the same without the flip, for images whose mirror is another class
      (digits, text, left/right anatomy).
    - ``"none"``: identical to `eval_transform` (deterministic, so features can be cached).
    """
    if augment not in AUGMENTATIONS:
        raise InputError(f"unknown augment {augment!r}; choose one of {list(AUGMENTATIONS)}")
    prep = _as_preprocessing(source, image_size, crop_pct)
    interpolation = INTERPOLATIONS[prep.interpolation]
    pad = [SquarePad()] if prep.square_pad else []
    if augment == "none":
        transform = eval_transform(prep)
    elif augment in ("cells", "cells_no_flip"):
        turns = [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), RandomRot90()] if augment == "cells" else []
        transform = v2.Compose([
            *pad,
            v2.Resize(prep.resize_size, interpolation=interpolation, antialias=True),
            v2.CenterCrop(prep.image_size),
            # Bilinear: torchvision's affine warp on tensors has no bicubic mode.
            v2.RandomAffine(degrees=3, translate=(0.02, 0.02), scale=(0.98, 1.02),
                            interpolation=v2.InterpolationMode.BILINEAR),
            *turns,
            *_normalize(prep),
        ])
    else:
        transform = v2.Compose([
            *pad,
            v2.RandomResizedCrop(prep.image_size, scale=(0.35, 1.0), interpolation=interpolation, antialias=True),
            *([v2.RandomHorizontalFlip()] if augment == "natural" else []),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
            *_normalize(prep),
        ])
    transform.preprocessing = prep
    transform.augment = augment
    return transform


_DETERMINISTIC = (v2.Compose, SquarePad, v2.Resize, v2.CenterCrop, v2.ToDtype, v2.Normalize, v2.ToImage,
                  v2.Grayscale, v2.Pad)


def is_deterministic(transform: Callable | None) -> bool:
    """True when ``transform`` gives the same output every call (so its results can be cached).

    Unknown transforms count as random: caching them would silently freeze augmentation.
    """
    if transform is None:
        return True
    if isinstance(transform, v2.Compose):
        return all(is_deterministic(t) for t in transform.transforms)
    return isinstance(transform, _DETERMINISTIC)


UNKNOWN = object()  # what `transform_of` returns for a dataset without a transform attribute


def transform_of(dataset: torch.utils.data.Dataset) -> object:
    """The ``transform`` of a dataset (looking through ``Subset``s), or `UNKNOWN` if it has none."""
    while not hasattr(dataset, "transform") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return getattr(dataset, "transform", UNKNOWN)


def preprocessing_of(dataset: torch.utils.data.Dataset) -> Preprocessing | None:
    """The `Preprocessing` a dataset's transform was built from, or None if it cannot tell."""
    transform = transform_of(dataset)
    return getattr(transform, "preprocessing", None)
