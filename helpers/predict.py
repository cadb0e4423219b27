"""Label a folder of images with a trained model and write a CSV.

    python -m helpers.predict runs/course/model.pt2 my_cells/ --out predictions.csv
    python -m helpers.predict runs/course/final.pt my_cells/ --out p.csv --recursive --skip-bad

MODEL is a file from `helpers.export.export_model` (``.pt2``) or a training checkpoint
(``final.pt``, the course's final model, or any ``best.pt``; loaded with ``weights_only=True``). Both
apply the preprocessing stored with the model. An export that would unpickle anything while loading is refused unless
``--trust-export`` (see `helpers.export.check_export_safe`). The CSV has one row per image:
file (relative to FOLDER), predicted, confidence, ``prob_<class>``; text cells that a
spreadsheet would run as a formula (starting with = + - @) get a leading ``'``. ``--out`` is
checked before any work: an existing file is never overwritten without ``--overwrite``, and
never when it is the model or one of the images. Unreadable images (including ones larger
than `helpers.data.MAX_IMAGE_PIXELS`) are errors unless ``--skip-bad``.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from torch.utils.data import Dataset

from .data import IMAGE_EXTENSIONS, ImageReadError, check_utf8_names, is_hidden_name, read_image
from .errors import InputError
from .export import ProbabilityModel, export_transform, is_exported, load_exported
from .files import write_csv
from .runtime import make_loader, pick_device, tune_cpu, with_progress


class PredictError(InputError):
    """A problem with the command's inputs, reported as one line without a traceback."""


def list_images(folder: Path, recursive: bool = False, all_files: bool = False) -> list[Path]:
    """Image files (by extension; every file with ``all_files``) in ``folder``, sorted; hidden files and
    folders are skipped, as training skips them (`helpers.data.scan_class_folders`)."""
    if not folder.is_dir():
        raise PredictError(f"image folder not found: {folder}")
    files = folder.rglob("*") if recursive else folder.iterdir()
    images = sorted(p for p in files if p.is_file() and (all_files or p.suffix.lower() in IMAGE_EXTENSIONS)
                    and not any(is_hidden_name(part) for part in p.relative_to(folder).parts))
    check_utf8_names([p.relative_to(folder).as_posix() for p in images], str(folder))
    if not images:
        nested = not recursive and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*"))
        hint = " (there are images in subfolders: add --recursive)" if nested else ""
        others = "" if all_files or not any(p.is_file() for p in folder.iterdir()) else (
            "; files with other extensions are read with --all-files")
        raise PredictError(f"no images with extensions {list(IMAGE_EXTENSIONS)} in {folder}{hint}{others}")
    return images


def left_out(folder: Path, files: Sequence[Path], recursive: bool = False, all_files: bool = False) -> str:
    """What `list_images` did not take from ``folder`` (hidden files aside), as a line to print, "" if nothing:
    images in subfolders without ``recursive``, files of other extensions without ``all_files``."""
    taken = set(files)
    rest = [p for p in folder.rglob("*") if p.is_file() and p not in taken
            and not any(is_hidden_name(part) for part in p.relative_to(folder).parts)]
    nested = [p for p in rest if p.parent != folder and p.suffix.lower() in IMAGE_EXTENSIONS]
    other = [p for p in rest if p.suffix.lower() not in IMAGE_EXTENSIONS and (recursive or p.parent == folder)]
    parts = ([f"{len(nested)} image(s) in subfolders (add --recursive)"] if nested else []) + (
        [f"{len(other)} file(s) with other extensions, e.g. {other[0].relative_to(folder).as_posix()!r} (add "
         f"--all-files to read them as images)"] if other else [])
    return f"not read: {'; '.join(parts)}" if parts else ""


def load_model(path: Path, device: torch.device | str = "cpu",
               trust_export: bool = False) -> tuple[torch.nn.Module, dict]:
    """(module on ``device`` returning probabilities for [0, 1] input, meta with ``classes`` and
    ``preprocessing``) from an export or a training checkpoint.

    The loader is picked by content, not by name; an export is checked for pickled entries
    first unless ``trust_export``.
    """
    if not path.is_file():
        raise PredictError(f"model file not found: {path}")
    if is_exported(path):
        return load_exported(path, device, trusted=trust_export)
    from .checkpoint import model_from_checkpoint

    try:
        model, ckpt = model_from_checkpoint(path)
    except (ValueError, KeyError, RuntimeError, pickle.UnpicklingError) as err:
        raise PredictError(f"{path} is neither an exported model (helpers.export) nor a training "
                           f"checkpoint: {err}") from err
    meta = {"classes": list(ckpt["classes"]), "preprocessing": ckpt["preprocessing"], "backbone": ckpt["backbone"]}
    prep = ckpt["preprocessing"]
    return ProbabilityModel(model, prep["mean"], prep["std"]).eval().to(device), meta


class FolderImages(Dataset):
    """Preprocessed images of a file list; an unreadable file yields its error instead of raising,
    so one pass reports every bad file."""

    def __init__(self, files: Sequence[Path], meta: dict):
        self.files, self.transform = list(files), export_transform(meta)
        self.size = int(meta["preprocessing"]["image_size"])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        try:
            image = torch.from_numpy(read_image(self.files[index])).permute(2, 0, 1)
            return self.transform(image), ""
        except (ImageReadError, OSError) as err:
            return torch.zeros(3, self.size, self.size), str(err) or type(err).__name__


@torch.inference_mode()
def predict_folder(model: torch.nn.Module, meta: dict, files: Sequence[Path], root: Path, batch_size: int = 32,
                   device: str | torch.device | None = None,
                   num_workers: int | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Probabilities for every readable file: (table, errors as 'file: reason')."""
    device = pick_device(device)
    classes = list(meta["classes"])
    rows, errors = [], []
    loader = make_loader(FolderImages(files, meta), batch_size, False, device, num_workers=num_workers)
    start = 0
    for x, problems in with_progress(loader, "predicting", enabled=sys.stderr.isatty()):
        probs = model(x.to(device)).float().cpu()
        for offset, (p, problem) in enumerate(zip(probs, problems, strict=True)):
            name = files[start + offset].relative_to(root).as_posix()
            if problem:
                errors.append(f"{name}: {problem}")
                continue
            best = int(p.argmax())
            rows.append({"file": name, "predicted": classes[best], "confidence": float(p[best]),
                         **{f"prob_{c}": float(v) for c, v in zip(classes, p.tolist(), strict=True)}})
        start += len(x)
    return pd.DataFrame(rows, columns=["file", "predicted", "confidence", *[f"prob_{c}" for c in classes]]), errors


def check_out_path(out: Path, overwrite: bool) -> None:
    """Raise `PredictError` unless ``out`` can be written: not a folder, not kept (no ``--overwrite``),
    and its nearest existing parent a writable folder. Runs before any inference."""
    if out.is_dir():
        raise PredictError(f"--out {out} is a folder; give a CSV file name")
    if out.exists() and not overwrite:
        raise PredictError(f"{out} exists; pass --overwrite to replace it")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PredictError(f"cannot write --out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PredictError(f"cannot write --out {out}: no permission to write in {parent}")


def check_out_is_not_an_input(out: Path, model: Path, files: Sequence[Path]) -> None:
    """``--overwrite`` replaces an old CSV, never the model or an image being labelled."""
    if not out.exists():
        return
    target = out.resolve()
    if target == model.resolve():
        raise PredictError(f"--out {out} is the model file; choose another name for the CSV")
    if any(target == f.resolve() for f in files):
        raise PredictError(f"--out {out} is one of the images to label; choose another name for the CSV")


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def escape_formulas(table: pd.DataFrame, columns: Sequence[str] = ("file", "predicted")) -> pd.DataFrame:
    """Prefix text cells that a spreadsheet would evaluate (``=cmd|...``) with ``'`` (OWASP's advice
    against CSV injection): file names come from whoever supplied the images, class names from
    whoever trained the model. Plain numbers such as a class ``-1`` are left as they are."""
    def escape(value: object) -> object:
        risky = isinstance(value, str) and value.startswith(_FORMULA_START) and not _is_number(value)
        return f"'{value}" if risky else value

    out = table.copy()
    for column in columns:
        out[column] = [escape(v) for v in out[column]]
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m helpers.predict",
                                     description="Label every image in a folder with a trained model.")
    parser.add_argument("model", type=Path,
                        help="exported model (.pt2 from export_model) or checkpoint (final.pt, best.pt)")
    parser.add_argument("folder", type=Path, help="folder of images")
    parser.add_argument("--out", type=Path, required=True, help="CSV to write (file, predicted, confidence, prob_*)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    parser.add_argument("--num-workers", type=int, default=None, help="image reading processes")
    parser.add_argument("--recursive", action="store_true", help="also label images in subfolders")
    parser.add_argument("--all-files", action="store_true",
                        help="label every file, whatever its extension (a label table may list images without "
                             "one); files that are not images are then errors, or skipped with --skip-bad")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--skip-bad", action="store_true",
                        help="warn about unreadable images and label the rest (default: stop with an error)")
    parser.add_argument("--trust-export", action="store_true",
                        help="load a .pt2 export even if it contains pickled entries (only for files you made)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_workers is not None and args.num_workers < 0:
        parser.error(f"--num-workers must be >= 0, got {args.num_workers}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (0 ok, 1 unreadable images, 2 bad inputs)."""
    args = parse_args(argv)
    tune_cpu()
    try:
        check_out_path(args.out, args.overwrite)
        files = list_images(args.folder, args.recursive, args.all_files)
        skipped = left_out(args.folder, files, args.recursive, args.all_files)  # before --out is written there
        check_out_is_not_an_input(args.out, args.model, files)
        device = pick_device(args.device)
        model, meta = load_model(args.model, device, args.trust_export)
    except InputError as err:  # PredictError too; anything else is a bug and keeps its traceback
        print(f"error: {err}", file=sys.stderr)
        return 2

    table, errors = predict_folder(model, meta, files, args.folder, args.batch_size, device, args.num_workers)
    if errors and not args.skip_bad:
        print(f"error: {len(errors)} unreadable image(s) of {len(files)}; nothing written "
              f"(pass --skip-bad to label the rest):", file=sys.stderr)
        for line in errors:
            print(f"  {line}", file=sys.stderr)
        return 1
    if errors:
        print(f"warning: skipped {len(errors)} unreadable image(s) of {len(files)}:", file=sys.stderr)
        for line in errors:
            print(f"  {line}", file=sys.stderr)
    if len(table) == 0:
        print(f"error: none of the {len(files)} image(s) could be read; nothing written", file=sys.stderr)
        return 1
    write_csv(escape_formulas(table), args.out)
    counts = table["predicted"].value_counts().to_dict()
    if skipped:  # said before the last line, which scripts (and notebook 05) read as the summary
        print(skipped)
    print(f"wrote {args.out}: {len(table)} image(s), predicted {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
