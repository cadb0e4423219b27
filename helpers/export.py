"""Export a fine-tuned model as one file that carries its preprocessing and class names.

Format: a ``torch.export`` program (``.pt2``), not TorchScript. On torch 2.14 ``torch.jit.trace``
prints deprecation warnings and points to ``torch.export``; ``torch.export`` captured every
backbone of the registry (EfficientNet-Lite with TensorFlow 'same' padding, ResNet, MobileNetV3,
EfficientNet-B0, ConvNeXt, and truncated models) with outputs identical to eager PyTorch.

The exported module takes a float32 batch (N, 3, S, S) in [0, 1], already square-padded,
resized and centre-cropped by `preprocess_for_export`; it normalizes with the stored mean and
std, runs the network and returns softmax probabilities. The batch size is free, the image
size S is fixed. ``workbook.json`` inside the file holds the classes, the `Preprocessing`
(``preprocessing``), backbone, strategy and task.

``torch.export.load`` has no ``weights_only`` mode: it unpickles entries the archive marks as
pickled (and falls back to a full unpickle for sample inputs), and a crafted file runs code
that way. `load_exported` therefore inspects the archive first and refuses anything but what
`export_model` writes: JSON, raw tensor bytes, and sample inputs that load with
``weights_only=True``. ``trusted=True`` skips that check for a file you made yourself. To share
a model with people who should not have to trust you, share the ``weights_only`` checkpoint
(the course's ``final.pt``).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.export.passes as passes
from torch import nn
from torchvision.transforms import v2

from .errors import InputError, MissingFileError
from .files import atomic_open
from .transforms import Preprocessing, eval_transform

META_FILE = "workbook.json"
EXPORT_FORMAT = "helpers.export/2"


class ProbabilityModel(nn.Module):
    """Normalize a [0, 1] batch, run the model, return softmax probabilities."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std).softmax(1)


def export_meta(model: nn.Module, ckpt: dict) -> dict:
    """The ``workbook.json`` of an export, from a checkpoint dict (`helpers.checkpoint`) or any dict
    with ``classes`` and ``preprocessing`` (a `Preprocessing` or its dict)."""
    missing = [k for k in ("classes", "preprocessing") if k not in ckpt]
    if missing:
        raise KeyError(f"export needs {missing} in the checkpoint/meta dict; it has {sorted(ckpt)}")
    prep = ckpt["preprocessing"]
    prep = prep if isinstance(prep, Preprocessing) else Preprocessing.from_dict(prep)
    classes = [str(c) for c in ckpt["classes"]]
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and num_classes != len(classes):
        raise ValueError(f"the model has {num_classes} outputs but {len(classes)} classes were given: {classes}")
    spec = getattr(model, "spec", None)
    return {
        "format": EXPORT_FORMAT,
        "classes": classes,
        "preprocessing": prep.to_dict(),
        "backbone": ckpt.get("backbone", spec.name if spec else type(model).__name__),
        "strategy": dict(ckpt.get("strategy", getattr(model, "strategy", {}))),
        "task": (ckpt.get("meta") or {}).get("task", ckpt.get("task")),
        "torch_version": torch.__version__,
    }


def export_model(model: nn.Module, ckpt_or_meta: dict, path: str | os.PathLike) -> Path:
    """Export ``model`` with its preprocessing and class names to one ``.pt2`` file (atomic write).

    The model is copied to the CPU in eval mode (the caller's model is left untouched), and
    the exported program is checked against eager PyTorch before it is written.
    """
    path = Path(path)
    meta = export_meta(model, ckpt_or_meta)
    cpu_model = copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format).eval()
    prep = meta["preprocessing"]
    wrapper = ProbabilityModel(cpu_model, prep["mean"], prep["std"]).eval()
    size = prep["image_size"]
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(wrapper, (example,), dynamic_shapes=({0: batch},))
        expected = wrapper(example)
        got = program.module()(example)
    if not torch.allclose(got, expected, atol=1e-5):
        raise RuntimeError(f"the exported program differs from the model by {(got - expected).abs().max():.2e}; "
                           f"not writing {path}")
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={META_FILE: json.dumps(meta)})
    with atomic_open(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return path


def is_exported(path: str | os.PathLike) -> bool:
    """True when ``path`` is a file written by `export_model` (checked by content, not by name)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith(f"extra/{META_FILE}") for name in archive.namelist())


class UnsafeExportError(InputError):
    """An exported file that ``torch.export.load`` would unpickle (or run native code from)."""


# Archive entries (after the archive's top folder) that `export_model` writes, besides the raw
# tensor files its two JSON configs list.
_SAFE_ENTRIES = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
                 "models/model.json", "data/weights/model_weights_config.json",
                 "data/constants/model_constants_config.json", "data/sample_inputs/model.pt"}


def _raw_payloads(archive: zipfile.ZipFile, prefix: str, folder: str, config_name: str) -> set[str]:
    """Entries of ``folder`` that its JSON config lists as raw tensor bytes; any pickled one is refused."""
    name = f"{prefix}{folder}/{config_name}"
    if name not in archive.namelist():
        return set()
    config = json.loads(archive.read(name)).get("config", {})
    raw = set()
    for key, entry in config.items():
        path_name = str(entry.get("path_name", ""))
        if entry.get("use_pickle") or (folder == "data/constants" and not path_name.startswith("tensor_")):
            raise UnsafeExportError(f"{folder}/{path_name} (for {key!r}) is a pickled object")
        raw.add(f"{folder}/{path_name}")
    return raw


def check_export_safe(path: str | os.PathLike) -> None:
    """Raise `UnsafeExportError` unless loading ``path`` with ``torch.export.load`` only parses
    JSON, copies raw tensor bytes and loads sample inputs with ``weights_only=True``.

    Anything else in the archive (pickled weights or constants, legacy ``.pt`` weight files,
    compiled AOTInductor code, extra programs) could run code while loading.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            prefix = names[0].split("/", 1)[0] + "/" if names else ""
            raw = (_raw_payloads(archive, prefix, "data/weights", "model_weights_config.json")
                   | _raw_payloads(archive, prefix, "data/constants", "model_constants_config.json"))
            for name in names:
                entry = name[len(prefix):] if name.startswith(prefix) else name
                if entry.endswith("/") or entry in raw or entry.startswith("extra/"):
                    continue
                if entry not in _SAFE_ENTRIES:
                    raise UnsafeExportError(f"unexpected entry {name!r}")
            inputs = f"{prefix}data/sample_inputs/model.pt"
            if inputs in names:
                # torch.export.load tries weights_only=True first, then unpickles fully: only the first may work.
                try:
                    torch.load(io.BytesIO(archive.read(inputs)), weights_only=True)
                except Exception as err:  # any failure here would send torch to the unsafe fallback
                    raise UnsafeExportError(f"{inputs} holds Python objects beyond tensors "
                                            f"({type(err).__name__})") from err
    except UnsafeExportError as err:
        raise UnsafeExportError(
            f"refusing to load {path}: {err}; torch.export.load would unpickle it, which can run code from "
            f"the file. Share and load the weights_only checkpoint (final.pt) instead; for a file you exported "
            f"yourself, pass trusted=True (predict: --trust-export)") from None
    except (zipfile.BadZipFile, json.JSONDecodeError, AttributeError, KeyError, OSError) as err:
        raise InputError(f"{path} is damaged or not a helpers export ({type(err).__name__}: {err})") from err


class _KeepRecords(logging.Handler):
    """Collects log records instead of printing them."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def cause(self) -> BaseException | None:
        """The exception of the last record that carried one."""
        found = [r.exc_info[1] for r in self.records if r.exc_info and r.exc_info[1] is not None]
        return found[-1] if found else None

    def replay(self) -> None:
        for record in self.records:
            logging.getLogger(record.name).handle(record)


@contextmanager
def _torch_export_log_held() -> Iterator[_KeepRecords]:
    """Hold back what ``torch.export`` logs: on a damaged file it prints a whole traceback through
    its own handler, then raises a vague error; we report the cause in one line instead."""
    log = logging.getLogger("torch.export")
    kept = _KeepRecords()
    handlers, propagate = list(log.handlers), log.propagate
    log.handlers, log.propagate = [kept], False
    try:
        yield kept
    finally:
        log.handlers, log.propagate = handlers, propagate


def load_exported(path: str | os.PathLike, device: str | torch.device = "cpu",
                  trusted: bool = False) -> tuple[nn.Module, dict]:
    """Load an `export_model` file onto ``device``: (module returning probabilities, meta dict).

    The archive is checked first (`check_export_safe`): one that would unpickle anything is
    refused unless ``trusted=True``. A damaged file raises ``ValueError`` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"exported model not found: {path}")
    if not is_exported(path):
        raise InputError(f"{path} is not a model exported by helpers.export.export_model "
                         f"(no {META_FILE} inside); a training checkpoint loads with "
                         f"helpers.checkpoint.model_from_checkpoint")
    if not trusted:
        check_export_safe(path)
    extra = {META_FILE: ""}  # torch.export.load fills only the keys that are asked for
    with _torch_export_log_held() as kept:
        try:
            program = torch.export.load(path, extra_files=extra)
            meta = json.loads(extra[META_FILE])
        except Exception as err:  # torch raises many kinds for a damaged archive; name the file instead
            cause = kept.cause() or err
            raise InputError(f"{path} is damaged or was exported by an incompatible torch "
                             f"({type(cause).__name__}: {str(cause).strip().splitlines()[0][:200]})") from err
    kept.replay()  # the file loaded: torch's warnings, if any, are worth seeing after all
    if meta.get("format") != EXPORT_FORMAT:
        raise InputError(f"{path}: export format {meta.get('format')!r}, this code reads {EXPORT_FORMAT!r}")
    try:  # the classes and preprocessing the command needs, checked before any image is read
        export_transform(meta)
        if not isinstance(meta["classes"], list) or not meta["classes"]:
            raise InputError(f"classes is {meta['classes']!r}, not a list of names")
    except (KeyError, TypeError, InputError) as err:
        raise InputError(f"{path}: its metadata cannot be used ({err}); export the model again") from err
    # An exported program's constants are baked into its graph: .to(device) on its module does not
    # move them all; the supported pass rewrites the program for the device (a no-op for the CPU).
    program = passes.move_to_device_pass(program, torch.device(device))
    return program.module(), meta


def export_transform(meta: dict) -> v2.Compose:
    """`helpers.transforms.eval_transform` for ``meta`` without its final Normalize (the exported
    module normalizes), so exported and PyTorch predictions see identical pixels."""
    if "preprocessing" not in meta:
        raise KeyError(f"meta lacks 'preprocessing'; it has {sorted(meta)}")
    steps = eval_transform(Preprocessing.from_dict(meta["preprocessing"])).transforms
    if not isinstance(steps[-1], v2.Normalize):  # eval_transform's contract; fail loudly if it changes
        raise RuntimeError(f"eval_transform no longer ends with Normalize: {steps}")
    return v2.Compose(steps[:-1])


def preprocess_for_export(image_rgb_uint8: np.ndarray | torch.Tensor, meta: dict) -> torch.Tensor:
    """SquarePad, resize and centre-crop one RGB uint8 image (H, W, 3 array or 3, H, W tensor)
    to the float32 (3, S, S) tensor in [0, 1] that an exported model takes."""
    image = image_rgb_uint8
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB image of shape (H, W, 3), got {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 RGB image, got dtype {image.dtype} and shape {tuple(image.shape)}")
    return export_transform(meta)(image)
