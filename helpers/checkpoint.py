"""Checkpoints that are safe to share: atomic writes, ``weights_only`` loads, self-describing.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(..., weights_only=True)``, which refuses to run code hidden in a pickle. It
carries everything needed to rebuild the model (backbone, classes, strategy) and to prepare an
image exactly as training did (``preprocessing``: a `helpers.transforms.Preprocessing` as a
dict), and a format version. Format 1 files (image size and preprocessing stored apart) are
upgraded on load.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from .errors import InputError, MissingFileError
from .files import atomic_open
from .models import TransferModel, create_model
from .transforms import Preprocessing

FORMAT_VERSION = 2


def atomic_save(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, flush to disk, then rename.

    ``os.replace`` is atomic on POSIX and Windows: a crash or SIGKILL at any moment leaves
    either the old file or the new one, never half a file.
    """
    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)
    return Path(path)


def describe_model(model: TransferModel, classes: list[str], preprocessing: Preprocessing) -> dict:
    """The fields that identify a model and how its inputs are prepared (stored in every checkpoint)."""
    if not isinstance(preprocessing, Preprocessing):
        raise TypeError(f"preprocessing must be a helpers.transforms.Preprocessing, got {type(preprocessing).__name__}")
    if len(classes) != model.num_classes:
        raise ValueError(f"{len(classes)} class names {list(classes)} for a model with {model.num_classes} outputs")
    return {
        "format_version": FORMAT_VERSION,
        "backbone": model.spec.name,
        "classes": list(classes),
        "num_classes": model.num_classes,
        "strategy": dict(model.strategy),
        "preprocessing": preprocessing.to_dict(),
    }


def save_model(model: TransferModel, classes: list[str], preprocessing: Preprocessing, path: str | os.PathLike,
               meta: dict | None = None, score: float | None = None, metric: str | None = None,
               epoch: int = 0) -> Path:
    """Save ``model`` as a checkpoint in the format `fit` writes, e.g. the linear probe of phase 1 (``epoch`` 0:
    not trained by `fit`), so that it loads, exports and predicts like any other."""
    payload = {**describe_model(model, classes, preprocessing), "meta": dict(meta or {}), "epoch": int(epoch),
               "score": score, "metric": metric, "model": model.state_dict()}
    return atomic_save(payload, path)


def checkpoint_preprocessing(ckpt: dict) -> Preprocessing:
    """The `Preprocessing` a checkpoint's model was trained and validated with."""
    return Preprocessing.from_dict(ckpt["preprocessing"])


def _upgrade(ckpt: dict, path: Path) -> dict:
    """Format 1 kept ``image_size`` beside a partial ``preprocessing`` dict: merge them. A field missing is
    a ValueError naming ``path`` and the field, not a bare KeyError."""
    missing = [k for k in ("image_size", "preprocessing") if k not in ckpt]
    if missing:
        raise InputError(f"{path}: format 1 checkpoint lacks {missing}: it was not written by helpers.training.fit")
    old = ckpt["preprocessing"]
    if not isinstance(old, dict):
        raise InputError(f"{path}: format 1 checkpoint's preprocessing is a {type(old).__name__}, not a dict")
    missing = [k for k in ("crop_pct", "mean", "std", "interpolation") if k not in old]
    if missing:
        raise InputError(f"{path}: format 1 checkpoint's preprocessing lacks {missing}: "
                         f"it was not written by helpers.training.fit")
    prep = Preprocessing(image_size=int(ckpt["image_size"]), crop_pct=old["crop_pct"], mean=old["mean"],
                         std=old["std"], interpolation=old["interpolation"])
    upgraded = {k: v for k, v in ckpt.items() if k != "image_size"}
    upgraded.update(format_version=FORMAT_VERSION, preprocessing=prep.to_dict())
    return upgraded


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint safely (``weights_only=True``) and check its format version."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # Refused objects are named as a GLOBAL; anything else (a JSON file, random bytes) is no pickle at all.
        if "weights only" not in str(err).lower() or "global" not in str(err).lower():
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            detail = next((line for line in lines if line.startswith("Unsupported")), lines[0] if lines else "")
            raise InputError(f"{path} is damaged or not a PyTorch checkpoint ({detail[:200]})") from err
        # The pickle holds Python objects beyond tensors and plain containers: loading them
        # would run code from the file, so we refuse.
        raise InputError(f"refusing to load {path}: it contains Python objects that weights_only=True does "
                         f"not allow (loading them could run code from the file). Only open files you "
                         f"trust with torch.load(path, weights_only=False)") from err
    except (RuntimeError, EOFError, KeyError) as err:  # torch's errors for a cut-off or non-zip file
        raise InputError(f"{path} is damaged or not a PyTorch checkpoint ({type(err).__name__}: "
                         f"{str(err)[:200]})") from err
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise InputError(f"{path} is not a workbook checkpoint (no format_version)")
    if ckpt["format_version"] == 1:
        ckpt = _upgrade(ckpt, path)
    if ckpt["format_version"] != FORMAT_VERSION:
        raise InputError(f"{path}: checkpoint format {ckpt['format_version']}, this code reads {FORMAT_VERSION}")
    check_classes_match_outputs(ckpt, str(path))
    return ckpt


def check_classes_match_outputs(ckpt: dict, source: str = "checkpoint") -> None:
    """Raise when the class list and the classifier's outputs disagree in length: the
    predictions would then be labelled with the wrong names (or crash on the last ones)."""
    if "classes" not in ckpt or "num_classes" not in ckpt:
        return  # an older or partial dict: the model rebuild reports what is missing
    outputs = {int(ckpt["num_classes"])}
    # The classifier group's last linear layer (TransferModel keeps it under groups.classifier).
    linear = [v for k, v in (ckpt.get("model") or {}).items() if k.startswith("groups.classifier.")
              and k.endswith(".weight") and getattr(v, "ndim", 0) == 2]
    if linear:
        outputs.add(int(linear[-1].shape[0]))
    if len(outputs) > 1 or len(ckpt["classes"]) not in outputs:
        raise InputError(f"{source}: {len(ckpt['classes'])} class name(s) {list(ckpt['classes'])[:10]} but the "
                         f"classifier has {' or '.join(map(str, sorted(outputs)))} output(s); the checkpoint is "
                         f"inconsistent")


def check_compatible(model: TransferModel, ckpt: dict, source: str = "checkpoint") -> None:
    """Raise an error naming the first field where ``model`` and ``ckpt`` differ."""
    mine = {"backbone": model.spec.name, "num_classes": model.num_classes, "strategy": dict(model.strategy)}
    for field, value in mine.items():
        if field == "strategy" and value.get("name") != "truncate" and ckpt[field].get("name") != "truncate":
            continue  # freezing does not change the architecture, only truncation does
        if ckpt[field] != value:
            raise InputError(f"{source} does not fit this model: {field} is {ckpt[field]!r} in the "
                             f"checkpoint but {value!r} in the model")


def load_weights(model: TransferModel, ckpt: dict | str | os.PathLike) -> TransferModel:
    """Load a checkpoint's weights into ``model`` after checking they belong together."""
    source = str(ckpt) if not isinstance(ckpt, dict) else "checkpoint"
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    check_compatible(model, ckpt, source)
    model.load_state_dict(ckpt["model"], strict=True)
    return model


def model_from_checkpoint(ckpt: dict | str | os.PathLike) -> tuple[TransferModel, dict]:
    """Rebuild the model a checkpoint describes (no download needed) and load its weights."""
    from .freezing import rebuild_strategy

    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    check_classes_match_outputs(ckpt)
    model = create_model(ckpt["backbone"], ckpt["num_classes"], pretrained=False)
    model = rebuild_strategy(model, ckpt["strategy"])
    model.load_state_dict(ckpt["model"], strict=True)
    return model.eval(), ckpt
