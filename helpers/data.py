"""Datasets, transforms and splits: the article's `ImageDataset`, generalized and fixed.

The article reads a folder with OpenCV and label-encodes from a table. We keep that shape and
fix what it gets wrong: OpenCV returns BGR (the article feeds BGR to an RGB network), 16-bit,
grayscale and alpha images need converting, labels must be encoded the same way in every
split, and a bad file must fail with its name instead of a cryptic stack trace.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .files import write_csv

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageReadError(ValueError):
    """An image file that exists but cannot be decoded (empty, truncated, not an image)."""


# ----------------------------------------------------------------------------------------
# Reading one image


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read any common image as an RGB ``uint8`` array of shape (H, W, 3).

    Grayscale is repeated to three channels, alpha is dropped, 16-bit is scaled to 8-bit.
    JPEGs are decoded with ``IMREAD_COLOR`` because only that flag applies the EXIF
    orientation and converts CMYK; everything else with ``IMREAD_UNCHANGED`` so that the
    bit depth and channels are seen as stored.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    data = np.fromfile(path, dtype=np.uint8)  # imdecode(fromfile) also handles non-ASCII paths on Windows
    if data.size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes)")
    head, tail = data[:8].tobytes(), data[-32:].tobytes()
    is_png, is_jpeg = head.startswith(b"\x89PNG"), head.startswith(b"\xff\xd8")
    # Decoders fill a cut-off file with grey and only print a warning; check the end markers.
    if is_png and b"IEND" not in tail:
        _check_complete(data, path, "PNG")
    if is_jpeg and not tail.rstrip(b"\x00").endswith(b"\xff\xd9"):
        _check_complete(data, path, "JPEG")

    image = cv2.imdecode(data, cv2.IMREAD_COLOR if is_jpeg else cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageReadError(f"{path}: not a readable image (OpenCV could not decode it)")
    return to_rgb_uint8(image, path)


def _check_complete(data: np.ndarray, path: Path, kind: str) -> None:
    """Raise `ImageReadError` if an image without its end marker is really cut off.

    A missing end marker usually means a truncated download, but phones and editors also
    append data after a complete image (motion photos put a video there). Pillow, unlike
    OpenCV, raises when image data run out, so a full decode tells the two apart.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data.tobytes())) as image:
            image.load()
    except (OSError, SyntaxError, ValueError) as err:  # Pillow's errors for cut-off or broken files
        raise ImageReadError(f"{path}: truncated {kind} (no end marker, and decoding fails: {err})") from err


def to_rgb_uint8(image: np.ndarray, path: str | os.PathLike = "<array>") -> np.ndarray:
    """Convert an OpenCV-decoded array (BGR order, any depth) to RGB uint8."""
    if image.dtype == np.uint16:
        image = (image.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif image.dtype in (np.float32, np.float64):
        image = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageReadError(f"{path}: unsupported pixel type {image.dtype}")

    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    channels = image.shape[2]
    if channels == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 2:  # gray + alpha
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    raise ImageReadError(f"{path}: unsupported number of channels {channels}")


# ----------------------------------------------------------------------------------------
# Label tables


def scan_class_folders(root: str | os.PathLike) -> pd.DataFrame:
    """Table of a class-per-subfolder layout: columns ``file`` (relative path) and ``label``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"{root}: no class subfolders found (expected {root}/<class>/<image>, "
                         f"or pass a label table)")
    rows, ignored = [], []
    for class_dir in class_dirs:
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        ignored += [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
        if not images:
            raise ValueError(f"class folder {class_dir} has no images (extensions {list(IMAGE_EXTENSIONS)})")
        rows += [(p.relative_to(root).as_posix(), class_dir.name) for p in images]
    if ignored:
        warnings.warn(f"{root}: ignored {len(ignored)} non-image file(s): "
                      f"{[str(p.relative_to(root)) for p in ignored[:10]]}", stacklevel=2)
    return pd.DataFrame(rows, columns=["file", "label"])


def load_table(root: str | os.PathLike, table: str | os.PathLike | pd.DataFrame | None = None,
               file_col: str = "file", label_col: str = "label", group_col: str | None = None,
               check_empty: bool = True) -> pd.DataFrame:
    """Validated table with columns ``file``, ``label`` (str) and ``group`` (str or None).

    ``table`` is a CSV path, a DataFrame, or None for the class-per-subfolder layout.
    Fails, naming the culprit, on: missing folder, missing column, empty labels, duplicate
    file names, files listed but missing, and zero-byte files (unless ``check_empty=False``,
    which `ImageDataset` uses with ``skip_bad=True`` to skip them with a warning instead).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    if table is None:
        frame = scan_class_folders(root)
        file_col, label_col = "file", "label"
        source = f"class folders of {root}"
    else:
        source = str(table) if not isinstance(table, pd.DataFrame) else "the label DataFrame"
        if not isinstance(table, pd.DataFrame):
            if not Path(table).is_file():
                raise FileNotFoundError(f"label table not found: {table}")
            table = pd.read_csv(table, dtype=str, keep_default_na=False, na_values=[""])
        frame = table
        for col in (file_col, label_col, group_col):
            if col is not None and col not in frame.columns:
                raise KeyError(f"{source} has no column {col!r}; its columns are {list(frame.columns)}")
    if len(frame) == 0:
        raise ValueError(f"{source} lists no images")

    out = pd.DataFrame({"file": frame[file_col].astype(str).to_numpy()})
    labels = frame[label_col]
    if labels.isna().any():
        bad = out["file"][labels.isna().to_numpy()].tolist()
        raise ValueError(f"{source}: empty {label_col!r} for {len(bad)} file(s): {bad[:10]}")
    out["label"] = labels.astype(str).to_numpy()
    out["group"] = frame[group_col].astype(str).to_numpy() if group_col else None

    duplicated = out["file"][out["file"].duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(f"{source}: {len(duplicated)} file name(s) listed more than once: {duplicated[:10]}")
    paths = [root / f for f in out["file"]]
    missing = [f for f, p in zip(out["file"], paths) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{source}: {len(missing)} listed file(s) missing under {root}: {missing[:10]}")
    empty = [f for f, p in zip(out["file"], paths) if check_empty and p.stat().st_size == 0]
    if empty:
        raise ImageReadError(f"{source}: {len(empty)} empty file(s) (0 bytes) under {root}: {empty[:10]}")
    return out


class ImageDataset(Dataset):
    """Images in a folder with labels from a table (or from class subfolders).

    Returns ``(image_tensor, label_index)``. Pass ``classes=train_set.classes`` to the
    validation and test sets so the same label always gets the same index; a label the
    training split never had is an error, not a new class. ``group_col`` (e.g. ELPV's
    mono/poly) is carried along in ``.frame`` for per-group evaluation.

    With ``skip_bad=True`` every image is decoded once up front and unreadable ones are
    dropped with a warning that counts and lists them (all of them in ``.skipped``, with the
    reason); by default they raise.
    """

    def __init__(self, root: str | os.PathLike, table: str | os.PathLike | pd.DataFrame | None = None,
                 file_col: str = "file", label_col: str = "label", group_col: str | None = None,
                 classes: Sequence[str] | None = None, transform: Callable | None = None,
                 skip_bad: bool = False):
        self.root = Path(root)
        frame = load_table(self.root, table, file_col, label_col, group_col, check_empty=not skip_bad)
        if classes is None:
            classes = sorted(frame["label"].unique())
        self.classes = [str(c) for c in classes]
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes contain duplicates: {self.classes}")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        unknown = frame.loc[~frame["label"].isin(self.classes)]
        if len(unknown):
            first = unknown.iloc[0]
            raise ValueError(
                f"label {first['label']!r} of {first['file']!r} is not among the known classes {self.classes} "
                f"({len(unknown)} row(s) affected; a validation/test label must also occur in training)")
        self.skipped: dict[str, str] = {}  # file -> why it was skipped (skip_bad=True only)
        if skip_bad:
            frame = self._drop_unreadable(frame)
        frame["target"] = frame["label"].map(self.class_to_idx).astype(int)
        self.frame = frame.reset_index(drop=True)
        self.transform = transform

    def _drop_unreadable(self, frame: pd.DataFrame) -> pd.DataFrame:
        bad = {}
        for file in frame["file"]:
            try:
                read_image(self.root / file)
            except ImageReadError as err:
                bad[file] = str(err)
        self.skipped = bad
        if bad:
            warnings.warn(f"skipped {len(bad)} unreadable image(s) of {len(frame)}: {list(bad.values())[:20]}",
                          stacklevel=3)
            frame = frame[~frame["file"].isin(list(bad))]
        if len(frame) == 0:
            raise ValueError(f"{self.root}: no readable images left")
        return frame

    @property
    def targets(self) -> list[int]:
        return self.frame["target"].tolist()

    @property
    def files(self) -> list[str]:
        return self.frame["file"].tolist()

    def __len__(self) -> int:
        return len(self.frame)

    def load(self, index: int) -> torch.Tensor:
        """The untransformed image as a uint8 tensor (3, H, W)."""
        image = read_image(self.root / self.frame["file"].iat[index])
        return torch.from_numpy(image).permute(2, 0, 1).contiguous()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.frame["target"].iat[index])


# ----------------------------------------------------------------------------------------
# Splits


def make_splits(frame: pd.DataFrame, label_col: str = "label", group_col: str | None = "group",
                test_size: float = 0.25, val_size: float = 0.15, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Seeded train/val/test split, stratified on label x group.

    ``test_size`` is the share of all images held out for testing (25 % as in Deitsch et al.
    2019); ``val_size`` is the share of the remaining training images used for validation.
    """
    from sklearn.model_selection import train_test_split

    for name, value in (("test_size", test_size), ("val_size", val_size)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value}")
    if label_col not in frame.columns:
        raise KeyError(f"no column {label_col!r} to stratify on; columns are {list(frame.columns)}")
    strata = frame[label_col].astype(str)
    if group_col and group_col in frame.columns and frame[group_col].notna().all():
        strata = strata + "|" + frame[group_col].astype(str)
    counts = strata.value_counts()
    if (counts < 4).any():
        raise ValueError(f"too few images to stratify three splits: {counts[counts < 4].to_dict()} "
                         f"(each label x group needs at least 4)")

    rest, test = train_test_split(frame, test_size=test_size, stratify=strata, random_state=seed)
    train, val = train_test_split(rest, test_size=val_size, stratify=strata.loc[rest.index], random_state=seed)
    return {"train": train.reset_index(drop=True), "val": val.reset_index(drop=True),
            "test": test.reset_index(drop=True)}


def save_splits(splits: dict[str, pd.DataFrame], folder: str | os.PathLike) -> list[Path]:
    """Write ``train.csv``, ``val.csv`` and ``test.csv`` into ``folder``."""
    return [write_csv(frame, Path(folder) / f"{name}.csv") for name, frame in splits.items()]


def load_splits(folder: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """Read the split CSVs written by `save_splits`."""
    folder = Path(folder)
    missing = [n for n in ("train", "val", "test") if not (folder / f"{n}.csv").is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: split file(s) {missing} missing; "
                                f"run notebooks/02_prepare_dataset.ipynb first")
    return {n: pd.read_csv(folder / f"{n}.csv", dtype=str, keep_default_na=False, na_values=[""])
            for n in ("train", "val", "test")}


# ----------------------------------------------------------------------------------------
# ELPV: materialized from the installed `elpv-dataset` wheel

ELPV_TASKS = {
    # task -> (label column in labels.csv, classes in a meaningful order)
    "binary": ("label", ["functional", "defective"]),
    "4class": ("label4", ["0.00", "0.33", "0.67", "1.00"]),
}


def _elpv_package_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the ELPV data needs the package elpv-dataset: pip install elpv-dataset")
    return Path(spec.origin).parent / "data"


def _elpv_labels() -> pd.DataFrame:
    raw = pd.read_csv(_elpv_package_dir() / "labels.csv", sep=r"\s+", header=None,
                      names=["path", "probability", "type"])
    prob = raw["probability"].astype(float)
    return pd.DataFrame({
        "file": raw["path"].map(lambda p: Path(p).name),
        "probability": prob.round(4),
        "label": np.where(prob >= 0.5, "defective", "functional"),
        "label4": prob.map(lambda p: f"{p:.2f}"),
        "type": raw["type"],
    })


def prepare_elpv(dest: str | os.PathLike = "data/elpv") -> Path:
    """Copy the 2,624 ELPV cell images out of the installed package into ``dest``.

    Writes ``dest/images/cellNNNN.png`` and ``dest/labels.csv`` (file, probability, label =
    functional/defective at p >= 0.5, label4 = the four probability classes, type = mono/poly).
    ``labels.csv`` is written last, so its presence marks a complete copy and a second call
    returns at once.
    """
    import shutil

    dest = Path(dest)
    labels_path = dest / "labels.csv"
    if labels_path.is_file():
        existing = pd.read_csv(labels_path, dtype=str)
        if len(existing) == 2624 and all((dest / f).is_file() for f in existing["file"]):
            return dest
    table = _elpv_labels()
    source = _elpv_package_dir() / "images"
    (dest / "images").mkdir(parents=True, exist_ok=True)
    for name in table["file"]:
        target = dest / "images" / name
        if not target.is_file():
            shutil.copyfile(source / name, target)
    table["file"] = "images/" + table["file"]
    write_csv(table, labels_path)
    return dest


def make_tiny_elpv(dest: str | os.PathLike = "data/elpv_tiny", per_stratum: int = 8, size: int = 64) -> Path:
    """A deterministic miniature ELPV for CI: ``per_stratum`` images of each 4-class label x
    type (64 images by default), downscaled to ``size`` px. Takes a second or two."""
    dest = Path(dest)
    labels_path = dest / "labels.csv"
    expected = per_stratum * 8
    if labels_path.is_file() and len(pd.read_csv(labels_path)) == expected:
        return dest
    table = _elpv_labels()
    # Spread the picks over the whole file list instead of taking the first few of each stratum.
    chosen = []
    for _, stratum in table.groupby(["label4", "type"]):
        chosen += list(stratum.index[np.linspace(0, len(stratum) - 1, per_stratum).round().astype(int)])
    picks = table.loc[chosen]
    source = _elpv_package_dir() / "images"
    (dest / "images").mkdir(parents=True, exist_ok=True)
    for name in picks["file"]:
        image = cv2.imread(str(source / name), cv2.IMREAD_UNCHANGED)
        small = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        if not cv2.imwrite(str(dest / "images" / name), small):
            raise OSError(f"could not write {dest / 'images' / name}")
    picks = picks.sort_values("file").copy()
    picks["file"] = "images/" + picks["file"]
    write_csv(picks, labels_path)
    return dest
