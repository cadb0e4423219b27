"""Datasets, label tables and splits: the article's `ImageDataset`, generalized and fixed.

The article reads a folder with OpenCV and label-encodes from a table. We keep that shape and
fix what it gets wrong: OpenCV returns BGR (the article feeds BGR to an RGB network), 16-bit,
grayscale and alpha images need converting, labels must be encoded the same way in every
split, and a bad file must fail with its name instead of a cryptic stack trace.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import struct
import unicodedata
import warnings
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .errors import InputError, MissingColumnError, MissingFileError
from .files import atomic_copy, atomic_open, write_csv

# What a class folder's files must end in to be read (.jfif and .jpe are JPEG's other names). GIFs are decoded by
# Pillow (their first frame): OpenCV reads GIF only in some builds, and the same folder must give the same images
# on every machine.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jfif", ".jpe", ".bmp", ".tif", ".tiff", ".webp", ".gif")
# Folder names of a dataset split beforehand (train/val/test): never taken for class names.
SPLIT_FOLDER_NAMES = ("train", "training", "val", "valid", "validation", "dev", "test", "testing", "holdout")

# Largest image (width x height) `read_image` decodes: 100 megapixels, about 300 MB as RGB, more
# than any camera in common use. A tiny PNG can declare 20000 x 20000 px and take gigabytes once
# decoded (a "decompression bomb"), so the header is checked first. TL_MAX_IMAGE_PIXELS overrides.
MAX_IMAGE_PIXELS = 100_000_000


# Floating-point images are read as 0..1; this much rounding error beyond either end is tolerated.
FLOAT_SLACK = 1e-3


class ImageReadError(InputError):
    """An image file that exists but cannot be decoded (empty, truncated, not an image)."""


# ----------------------------------------------------------------------------------------
# Reading one image


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read any common image as an RGB ``uint8`` array of shape (H, W, 3).

    Grayscale is repeated to three channels, alpha is dropped, 16-bit is scaled to 8-bit
    (`to_rgb_uint8`); see `decode_image` for the checks made first.
    """
    return to_rgb_uint8(decode_image(path), path)


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file as stored (OpenCV's BGR order, its own bit depth and channels).

    Raises `ImageReadError`, naming the file, for an empty, truncated, oversized or undecodable
    file. JPEGs are decoded with ``IMREAD_COLOR`` because only that flag applies the EXIF
    orientation and converts CMYK; everything else with ``IMREAD_UNCHANGED`` so that the
    bit depth and channels are seen as stored.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"image file not found: {path}")
    data = np.fromfile(path, dtype=np.uint8)  # imdecode(fromfile) also handles non-ASCII paths on Windows
    if data.size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes)")
    _check_pixel_count(data, path)
    head, tail = data[:8].tobytes(), data[-32:].tobytes()
    is_png, is_jpeg = head.startswith(b"\x89PNG"), head.startswith(b"\xff\xd8")
    # Decoders fill a cut-off file with grey and only print a warning; check the end markers.
    if is_png and b"IEND" not in tail:
        _check_complete(data, path, "PNG")
    if is_jpeg and not tail.rstrip(b"\x00").endswith(b"\xff\xd9"):
        _check_complete(data, path, "JPEG")

    if head.startswith(b"GIF8"):
        return _decode_gif(data, path)
    try:
        image = cv2.imdecode(data, cv2.IMREAD_COLOR if is_jpeg else cv2.IMREAD_UNCHANGED)
    except cv2.error as err:  # OpenCV's own limits and assertions name no file
        raise ImageReadError(f"{path}: not a readable image (OpenCV: {str(err).strip().splitlines()[-1]})") from err
    if image is None:
        raise ImageReadError(f"{path}: not a readable image (OpenCV could not decode it)")
    if not is_jpeg:  # IMREAD_UNCHANGED ignores the orientation a PNG or WebP can carry (a phone's export)
        image = _orient(image, _exif_orientation(data, path))
    return image


def _decode_gif(data: np.ndarray, path: Path) -> np.ndarray:
    """A GIF's first frame as OpenCV's BGR ``uint8`` (its palette applied, transparency dropped), by Pillow: OpenCV
    reads GIF only in some builds."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data.tobytes())) as image:
            rgb = np.asarray(image.convert("RGB"))  # the first frame: an animation's others are not the picture
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"{path}: not a readable image (Pillow: {err})") from err
    return np.ascontiguousarray(rgb[:, :, ::-1])


# EXIF orientation (tag 0x0112) -> what turns the stored pixels upright, on an (H, W[, C]) array
_ORIENTATIONS = {
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # upside down
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.swapaxes(0, 1),  # transposed
    6: lambda a: np.rot90(a, -1),  # stored turned 90 degrees counter-clockwise: turn it clockwise
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),  # transposed across the other diagonal
    8: lambda a: np.rot90(a, 1),
}


def _exif_orientation(data: np.ndarray, path: Path) -> int:
    """The EXIF orientation of a PNG (``eXIf`` chunk) or WebP (``EXIF`` chunk); 1 (upright) when there is none."""
    head = data[:16].tobytes()
    raw = data.tobytes()
    has_exif = (head.startswith(b"\x89PNG") and b"eXIf" in raw) or (
        head.startswith(b"RIFF") and head[8:12] == b"WEBP" and b"EXIF" in raw)
    if not has_exif:
        return 1
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as image:
            return int(image.getexif().get(0x0112, 1))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        warnings.warn(f"{path}: its EXIF block cannot be read ({err}); the image is used as stored, unrotated",
                      stacklevel=3)
        return 1


def _orient(image: np.ndarray, orientation: int) -> np.ndarray:
    return np.ascontiguousarray(_ORIENTATIONS[orientation](image)) if orientation in _ORIENTATIONS else image


def _stored_shape(path: Path) -> tuple[int, ...] | None:
    """The shape of the image at ``path``; None where it is missing or unreadable (to be made again)."""
    try:
        return decode_image(path).shape
    except (OSError, ImageReadError):
        return None


def max_image_pixels() -> int:
    """The pixel limit of `read_image`: ``TL_MAX_IMAGE_PIXELS`` if set, else `MAX_IMAGE_PIXELS`."""
    text = os.environ.get("TL_MAX_IMAGE_PIXELS", "").strip()
    if not text:
        return MAX_IMAGE_PIXELS
    try:
        value = int(float(text))  # accepts 4e8 as well as 400000000
    except ValueError:
        value = 0
    if value <= 0:
        raise InputError(f"TL_MAX_IMAGE_PIXELS must be a positive number of pixels, got {text!r}")
    return value


def _declared_size(data: np.ndarray) -> tuple[int, int] | None:
    """(width, height) from the image header, without decoding; None if it cannot be read.

    PNG's IHDR is read directly (the common case, and free); other formats through
    ``Image.open``, which parses only the header. Pillow's own bomb error is re-raised.
    """
    from PIL import Image

    head = data[:24].tobytes()
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit
            with Image.open(io.BytesIO(data.tobytes())) as image:
                return image.size
    except Image.DecompressionBombError:
        raise
    except (OSError, SyntaxError, ValueError):  # not an image Pillow knows: OpenCV will name it if it fails
        return None


def _check_pixel_count(data: np.ndarray, path: Path) -> None:
    """Raise `ImageReadError` when the header declares more pixels than `max_image_pixels`."""
    from PIL import Image

    limit = max_image_pixels()
    hint = "raise the limit with TL_MAX_IMAGE_PIXELS only for files you trust"
    try:
        size = _declared_size(data)
    except Image.DecompressionBombError as err:  # Pillow's hard limit (twice its own warning size)
        raise ImageReadError(f"{path}: too large to decode safely ({err}); {hint}") from err
    if size is not None and size[0] * size[1] > limit:
        width, height = size
        raise ImageReadError(f"{path}: {width} x {height} = {width * height:,} pixels exceeds the limit of "
                             f"{limit:,} (helpers.data.MAX_IMAGE_PIXELS); {hint}")


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
        low, high = float(np.nanmin(image)), float(np.nanmax(image))
        if not (np.isfinite(image).all() and low >= -FLOAT_SLACK and high <= 1.0 + FLOAT_SLACK):
            # Clipping 0..255 or 0..65535 floats to [0, 1] would make the image white, silently.
            raise ImageReadError(f"{path}: floating-point pixels range over [{low:g}, {high:g}]; the workbook "
                                 f"reads floats as 0..1 (scale the images, or save them as 8- or 16-bit)")
        image = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageReadError(f"{path}: unsupported pixel type {image.dtype}; the workbook reads 8- and 16-bit unsigned "
                             f"integers and 0..1 floats (convert it, e.g. shift signed values to uint16 with numpy)")

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
        raise MissingFileError(f"image folder not found: {root}")
    subfolders = sorted(d for d in root.iterdir() if d.is_dir())
    class_dirs = [d for d in subfolders if not is_hidden_name(d.name)]
    hidden = [d.name for d in subfolders if is_hidden_name(d.name)]
    skipped = f" (hidden folders are skipped: {hidden})" if hidden else ""
    if not class_dirs:
        raise InputError(f"{root}: no class subfolders found (expected {root}/<class>/<image>, "
                         f"or pass a label table){skipped}")
    if len(class_dirs) == 1:
        raise InputError(f"{root}: only one class folder, {class_dirs[0].name!r}; a classifier needs at least "
                         f"two (one subfolder per class){skipped}")
    split_names = [d.name for d in class_dirs if d.name.casefold() in SPLIT_FOLDER_NAMES]
    if len(split_names) == len(class_dirs):  # train/ and test/ as two classes would train on nonsense, silently
        raise InputError(f"{root}: its subfolders {split_names} look like a split made beforehand, not classes; "
                         f"the workbook makes its own split (with copies and subjects kept together), so point "
                         f"data_root at one folder of class subfolders (merge the splits' class folders), or list "
                         f"every image with its class in a labels_csv")
    loose = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if loose:  # no class folder says what they are: name them rather than drop them unmentioned
        warnings.warn(f"{root}: {len(loose)} image(s) directly in the folder belong to no class and are not used: "
                      f"{loose[:10]} (move each into its class folder)", stacklevel=2)
    rows, ignored, broken = [], [], []
    for class_dir in class_dirs:
        files, dangling = _files_below(class_dir)
        broken += dangling
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        ignored += [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
        if not images:
            others = [p.relative_to(class_dir).as_posix() for p in files][:5]
            raise InputError(f"class folder {class_dir} has no images (extensions {list(IMAGE_EXTENSIONS)})"
                             + (f", only {others}" if others else "") + ": add its images, or move the folder "
                             f"out of {root} if it is not a class")
        rows += [(p.relative_to(root).as_posix(), class_dir.name) for p in images]
    check_utf8_names([file for file, _ in rows], f"class folders of {root}")
    if ignored:
        warnings.warn(f"{root}: ignored {len(ignored)} file(s) whose extension is not one read as an image "
                      f"({' '.join(IMAGE_EXTENSIONS)}): {[str(p.relative_to(root)) for p in ignored[:10]]}"
                      + (f" and {len(ignored) - 10} more" if len(ignored) > 10 else ""), stacklevel=2)
    if broken:
        warnings.warn(f"{root}: ignored {len(broken)} symbolic link(s) that point nowhere: "
                      f"{[str(p.relative_to(root)) for p in broken[:10]]}", stacklevel=2)
    return pd.DataFrame(rows, columns=["file", "label"])


def _files_below(folder: Path) -> tuple[list[Path], list[Path]]:
    """(files, dangling links) under ``folder``, sorted, hidden names skipped. Links to folders are followed (a class
    assembled from links is common), each real folder once, so a link back up cannot loop forever."""
    files, dangling, seen = [], [], set()
    for current, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not is_hidden_name(d))
        for name in names:
            if is_hidden_name(name):
                continue
            path = Path(current) / name
            if path.is_file():
                files.append(path)
            elif path.is_symlink() and not path.exists():
                dangling.append(path)
    return sorted(files), sorted(dangling)


def check_utf8_names(names: Sequence[str], where: str) -> None:
    """Refuse file or folder names that are not valid UTF-8 (the bytes of an old Windows or Mac archive unzipped
    on Linux: Python holds them as lone surrogates), naming them: they read fine, but every table, split file and
    CSV the workbook writes would fail on them later, after the work is done."""
    bad = []
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            bad.append(name)
    if bad:
        shown = ", ".join(ascii(name) for name in bad[:5])
        raise InputError(f"{where}: {len(bad)} name(s) are not valid UTF-8, e.g. {shown}; rename them (for Latin-1 "
                         f"names: convmv -f latin1 -t utf8 -r --notest <folder>)")


def natural_key(name: str) -> tuple:
    """Sort key that puts numbers in text in numeric order: 'class 2' before 'class 10', '9.png' before '10.png'.
    Names that differ only in their digits' spelling ('1' and '01') still sort apart, in a fixed order."""
    import re

    parts = tuple((0, int(part), part) if part.isdecimal() else (1, part.casefold(), part)
                  for part in re.split(r"(\d+)", name) if part)
    return parts + ((-1, name, name),)  # the end sorts first: 'dog' before 'dog2', '1' before '1e3'


def is_hidden_name(name: str) -> bool:
    """Folders and files that hold no user images: hidden ones (.thumbs, .ipynb_checkpoints), a NAS's
    thumbnails (@eaDir) and the resource forks of a macOS zip (__MACOSX). `helpers.predict` skips them too."""
    return name.startswith(".") or name in ("@eaDir", "__MACOSX")


def _read_label_csv(path: Path) -> pd.DataFrame:
    """A label CSV as strings, with errors that name the file.

    Excel writes a trailing comma on every row; pandas would then take the first column as the
    row index and shift every column by one, so we read with ``index_col=False`` and make sure
    any extra fields are empty rather than drop data.
    """
    import csv

    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{path} is not UTF-8 text (byte 0x{raw[err.start]:02x} at position {err.start}); "
                         f"save it as 'CSV UTF-8' (Excel) or convert it, e.g. "
                         f"iconv -f latin1 -t utf-8 in.csv > out.csv") from err
    if not text.strip():
        raise InputError(f"{path} is empty: a label table needs a header row (e.g. file,label) and one row "
                         f"per image")
    first = next(line for line in text.splitlines() if line.strip())
    # Excel writes ';' where the decimal mark is a comma (most of Europe), and some tools write tabs:
    # a header without a comma but with one of those is read with it rather than as a single column.
    delimiter = next((d for d in (";", "\t") if "," not in first and d in first), ",")
    reader, header = csv.reader(io.StringIO(text), delimiter=delimiter), None
    try:
        for row in reader:
            if not row:  # pandas skips blank lines too
                continue
            if header is None:
                header = row
            elif any(cell.strip() for cell in row[len(header):]):
                raise InputError(f"{path}: line {reader.line_num} has {len(row)} fields but the header has "
                                 f"{len(header)} ({header}): {row[:len(header) + 3]}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pd.errors.ParserWarning)  # the extra fields are empty: checked above
            frame = pd.read_csv(io.StringIO(text), sep=delimiter, dtype=str, keep_default_na=False, na_values=[""],
                                index_col=False, skip_blank_lines=True)
    except (csv.Error, pd.errors.ParserError) as err:  # an unclosed quote, a NUL byte
        raise InputError(f"{path} cannot be read as a table near line {reader.line_num}: {err}; check its quotes "
                         f"(a cell with a comma needs \"...\" around it)") from err
    # A trailing comma in the header adds an unnamed, empty column: drop it rather than carry it along.
    unnamed = [c for c in frame.columns if str(c).startswith("Unnamed: ") and frame[c].isna().all()]
    frame = frame.drop(columns=unnamed)
    spaced = [c for c in frame.columns if c != c.strip()]
    if spaced:  # "file, label": the column is ' label' to pandas, a typo to nobody
        warnings.warn(f"{path}: stripped spaces around column name(s) {spaced}", stacklevel=3)
        frame.columns = [c.strip() for c in frame.columns]
    return frame


def _check_column_names(file_col: object, label_col: object, group_col: object, subject_col: object) -> None:
    for name, value in (("file_col", file_col), ("label_col", label_col), ("group_col", group_col),
                        ("subject_col", subject_col)):
        if name in ("group_col", "subject_col") and value is None:
            continue
        if not isinstance(value, str) or not value:
            raise InputError(f"{name} must be a column name (text), got {value!r}")


def _outside_root(files: pd.Series) -> list[str]:
    """Listed paths that are absolute or climb out of the root with ``..`` (judged by spelling,
    so images that are symbolic links into another folder stay allowed)."""
    def outside(name: str) -> bool:
        normal = os.path.normpath(name.replace("\\", "/"))
        return os.path.isabs(name) or normal == ".." or normal.startswith("../")

    return [f for f in files if outside(f)]


def _file_identity(path: Path) -> tuple[int, int] | Path:
    """What makes two names one file: device and inode where the file exists (that also catches hard links and
    case-insensitive file systems, which resolved paths miss), else the resolved path."""
    try:
        stat = path.stat()
    except OSError:
        return path.resolve()
    return (stat.st_dev, stat.st_ino) if stat.st_ino else path.resolve()  # some file systems report inode 0


def _same_file_twice(files: pd.Series, paths: list[Path]) -> list[str]:
    """Groups of listed names that are the same file (``img/a.png``, ``./img/a.png``,
    ``img/../img/a.png``, a symbolic or hard link to it), as ``'a' = 'b'`` strings."""
    seen: dict[tuple[int, int] | Path, list[str]] = {}
    for name, path in zip(files, paths, strict=True):
        seen.setdefault(_file_identity(path), []).append(name)
    return [" = ".join(repr(n) for n in names) for names in seen.values() if len(names) > 1]


def _strip_labels(labels: pd.Series, source: str, label_col: str) -> pd.Series:
    """Labels without surrounding spaces ('defective ' would otherwise be a class of its own)."""
    stripped = labels.str.strip()
    changed = labels[stripped != labels]
    if len(changed):
        warnings.warn(f"{source}: stripped surrounding spaces from {len(changed)} {label_col!r} value(s), "
                      f"e.g. {changed.iloc[0]!r}", stacklevel=3)
    return stripped


def _blank_rows(frame: pd.DataFrame, col: str) -> list[int]:
    """Data rows (the first under the header is 1) whose ``col`` is missing or only spaces."""
    values = frame[col]
    blank = values.isna().to_numpy() | (values.astype(str).str.strip() == "").to_numpy()
    return [int(i) + 1 for i in np.flatnonzero(blank)]


def _windows_paths(files: pd.Series, root: Path, source: str) -> pd.Series:
    """``img\\a.png`` as ``img/a.png`` where only the latter exists (a table written on Windows)."""
    fixed = files.str.replace("\\", "/", regex=False)
    changed = pd.Series([f != g and not (root / f).is_file() and (root / g).is_file()
                         for f, g in zip(files, fixed, strict=True)], index=files.index)
    if changed.any():
        warnings.warn(f"{source}: read {int(changed.sum())} path(s) written with backslashes as '/' paths, "
                      f"e.g. {files[changed].iloc[0]!r}", stacklevel=3)
    return files.where(~changed, fixed)


def _absolute_inside_root(files: pd.Series, root: Path, source: str) -> pd.Series:
    """Absolute paths that lie under ``root`` (a table written with full paths) as paths relative to it, so the
    run can move with its folder; absolute paths elsewhere stay as they are (and are refused as outside)."""
    def relative(name: str) -> str:
        if not os.path.isabs(name):
            return name
        # As written first (a link inside the root stays a link), then with every link resolved (a root reached
        # through a link); a path under neither is left absolute, and refused as outside.
        for path, base in ((Path(os.path.normpath(name)), Path(os.path.abspath(root))),
                           (Path(os.path.normpath(name)), root.resolve()),  # the root given through a link
                           (Path(name).resolve(), root.resolve())):
            try:
                return path.relative_to(base).as_posix()
            except ValueError:
                continue
        return name

    fixed = files.map(relative)
    changed = fixed != files
    if changed.any():
        warnings.warn(f"{source}: read {int(changed.sum())} absolute path(s) under {root} as paths relative to it, "
                      f"e.g. {files[changed].iloc[0]!r} as {fixed[changed].iloc[0]!r}", stacklevel=3)
    return fixed


def _unicode_spellings(files: pd.Series, root: Path, source: str) -> pd.Series:
    """A listed name that is missing but exists in the other Unicode normal form (``café`` typed as one character,
    stored as 'e' + accent, as macOS and some zip tools write names), read as the stored one."""
    import unicodedata

    def stored(name: str) -> str:
        if name.isascii() or (root / name).is_file():
            return name
        for form in ("NFC", "NFD"):
            other = unicodedata.normalize(form, name)
            if other != name and (root / other).is_file():
                return other
        return name

    fixed = files.map(stored)
    changed = fixed != files
    if changed.any():
        warnings.warn(f"{source}: {int(changed.sum())} file name(s) are stored in another Unicode form than the table "
                      f"spells them (accents as separate characters, or not), e.g. {files[changed].iloc[0]!r}; read "
                      f"as the stored names", stacklevel=3)
    return fixed


def _stored_names(files: pd.Series, root: Path, source: str) -> pd.Series:
    """The listed names as stored under ``root``: Windows backslashes, absolute paths under the root and the other
    Unicode normal form each read as the stored name, with a warning."""
    files = _absolute_inside_root(_windows_paths(files, root, source), root, source)
    return _unicode_spellings(files, root, source)


def _check_listed_once(table: pd.DataFrame, source: str, also: str = "") -> None:
    """Refuse a file listed twice, saying whether its rows disagree on the label (and ``also``: the table's other
    problems, so that one round of fixes mends them all)."""
    duplicated = table["file"][table["file"].duplicated()].unique().tolist()
    if not duplicated:
        return
    labels_of = table[table["file"].isin(duplicated)].groupby("file", sort=False)["label"].unique()
    conflicts = [f"{name!r} as {sorted(labels)}" for name, labels in labels_of.items() if len(labels) > 1]
    raise InputError(f"{source}: {len(duplicated)} file name(s) listed more than once: {duplicated[:10]}"
                     + (f"; {len(conflicts)} of them with different labels: {conflicts[:5]} (one image "
                        f"cannot be two classes: keep the right row)" if conflicts else " (keep one row each)")
                     + (f"; also {also}" if also else ""))


def _missing_hint(missing: list[str], root: Path) -> str:
    """Why listed files may be missing, when the folder shows it: a missing extension, another case."""
    name = missing[0]
    folder = (root / name).parent
    if not folder.is_dir():
        return f" (there is no folder {folder})" if folder != root else ""
    listed = Path(name)
    try:
        near = sorted(p.name for p in folder.iterdir() if p.is_file() and (
            p.stem in (listed.name, listed.stem) or p.name.casefold() == listed.name.casefold()))
    except OSError:  # a folder we may not list: no hint, the missing files are named anyway
        return ""
    return f" ({name!r} is not there, but {near[:3]} are: check the extension and case)" if near else ""


_WARNED_LABEL_CLASHES: set[tuple[str, ...]] = set()  # (source, spellings) already warned about in this process


def _warn_near_duplicate_labels(labels: pd.Series, source: str) -> None:
    """Warn when two labels differ only in case, spacing or Unicode form ('Cat' and 'cat'; 'café' with é as one
    character or as e and an accent, as macOS writes folder names): each would be its own class."""
    spellings: dict[str, set[str]] = {}
    for label in labels.unique():
        spellings.setdefault(" ".join(unicodedata.normalize("NFKC", label).casefold().split()), set()).add(label)
    # Names that print alike are shown with their escapes, or the message would list one name twice
    clashes = [sorted(names) if len({unicodedata.normalize("NFKC", n) for n in names}) == len(names)
               else sorted(ascii(n) for n in names) for names in spellings.values() if len(names) > 1]
    # Every dataset built from the table checks it again (notebook 03 builds dozens): say each clash once
    clashes = [names for names in clashes if (source, *names) not in _WARNED_LABEL_CLASHES]
    _WARNED_LABEL_CLASHES.update((source, *names) for names in clashes)
    if clashes:
        shown = "; ".join(" and ".join(names) for names in clashes[:5])
        warnings.warn(f"{source}: labels that differ only in case, spacing or Unicode form are separate classes: "
                      f"{shown}; spell each class one way if they are the same", stacklevel=3)


def load_table(root: str | os.PathLike, table: str | os.PathLike | pd.DataFrame | None = None,
               file_col: str = "file", label_col: str = "label", group_col: str | None = None,
               subject_col: str | None = None, check_empty: bool = True,
               allow_outside_root: bool = False) -> pd.DataFrame:
    """Validated table with columns ``file``, ``label`` (str) and ``group`` (str or None), plus ``subject``
    (str) when ``subject_col`` names who or what each image shows (a patient, a specimen, a panel).

    ``table`` is a CSV path (UTF-8), a DataFrame, or None for the class-per-subfolder layout.
    Fails, naming the culprit, on: missing folder, missing column, empty labels, a file listed
    twice (also under two spellings of one path, e.g. ``a.png`` and ``./a.png``), files listed
    but missing, files outside ``root`` (absolute paths, ``../``; allowed with
    ``allow_outside_root=True``), empty file, label or group cells (naming the rows), and
    zero-byte files (unless ``check_empty=False``, which `ImageDataset` uses with
    ``skip_bad=True`` to skip them with a warning instead). Labels are stripped of surrounding
    spaces, with a warning; labels that differ only in case get a warning; Windows paths
    (``img\\a.png``) are read as ``img/a.png`` where only that exists.
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"image folder not found: {root}")
    _check_column_names(file_col, label_col, group_col, subject_col)
    if table is None:
        for name, col in (("group_col", group_col), ("subject_col", subject_col)):
            if col is not None:
                raise InputError(f"{name} {col!r} needs a label table: class folders of {root} give only "
                                 f"file and label (pass labels_csv, or leave {name} unset)")
        frame = scan_class_folders(root)
        file_col, label_col = "file", "label"
        source = f"class folders of {root}"
    else:
        source = str(table) if not isinstance(table, pd.DataFrame) else "the label DataFrame"
        if not isinstance(table, pd.DataFrame):
            if not Path(table).is_file():
                raise MissingFileError(f"label table not found: {table}")
            table = _read_label_csv(Path(table))
        frame = table
        for col in (file_col, label_col, group_col, subject_col):
            if col is not None and col not in frame.columns:
                raise MissingColumnError(f"{source} has no column {col!r}; its columns are {list(frame.columns)}")
    if len(frame) == 0:
        raise InputError(f"{source} lists no images")

    for col in (file_col, label_col, group_col, subject_col):
        blank = _blank_rows(frame, col) if col is not None else []
        if blank:  # a stray row, or a cell left empty: name the rows, as a spreadsheet numbers them
            hint = " (fill them, e.g. with 'unknown', or leave group_col unset)" if col == group_col else ""
            if col == subject_col:  # 'unknown' would make one large subject of every unlabelled image
                hint = " (give each image its subject; an image of its own can use its file name)"
            files = "" if col == file_col else f", files {[str(frame[file_col].iat[i - 1]) for i in blank[:10]]}"
            raise InputError(f"{source}: empty {col!r} in {len(blank)} row(s): data rows {blank[:10]} (the row "
                             f"under the header is 1){files}{hint}")
    out = pd.DataFrame({"file": _stored_names(frame[file_col].astype(str), root, source).to_numpy()})
    out["label"] = _strip_labels(frame[label_col].astype(str), source, label_col).to_numpy()
    _warn_near_duplicate_labels(out["label"], source)
    out["group"] = frame[group_col].astype(str).str.strip().to_numpy() if group_col else None
    if subject_col:
        out["subject"] = frame[subject_col].astype(str).str.strip().to_numpy()

    check_utf8_names(list(out["file"]), source)
    _check_files(out, root, source, check_empty, allow_outside_root)
    return out


def _check_files(out: pd.DataFrame, root: Path, source: str, check_empty: bool, allow_outside_root: bool) -> None:
    """`load_table`'s checks of the listed files: each listed once, inside ``root``, present, not twice under two
    spellings, not empty; several problems are named in one error, so that one round of fixes mends them."""
    paths = [root / f for f in out["file"]]
    missing = [f for f, p in zip(out["file"], paths, strict=True) if not p.is_file()]
    missing_note = (f"{len(missing)} listed file(s) missing under {root}: {missing[:10]}{_missing_hint(missing, root)}"
                    if missing else "")
    empty = [f for f, p in zip(out["file"], paths, strict=True) if check_empty and p.is_file() and not p.stat().st_size]
    empty_note = f"{len(empty)} empty file(s) (0 bytes) under {root}: {empty[:10]}" if empty else ""
    _check_listed_once(out, source, also="; ".join(n for n in (missing_note, empty_note) if n))
    outside = _outside_root(out["file"])
    if outside and not allow_outside_root:
        raise InputError(f"{source}: {len(outside)} path(s) point outside {root} (absolute, or climbing out "
                         f"with ..): {outside[:10]}; set data_root to a folder that holds every image, or "
                         f"pass allow_outside_root=True")
    if missing:
        raise MissingFileError(f"{source}: {missing_note}" + (f"; also {empty_note}" if empty else ""))
    aliases = _same_file_twice(out["file"], paths)
    if aliases:
        raise InputError(f"{source}: {len(aliases)} file(s) listed more than once under different spellings "
                         f"of the same path (they would leak between splits): {aliases[:10]}"
                         + (f"; also {empty_note}" if empty else ""))
    if empty:  # decoded images come later (notebook 02), all at once; an empty file needs no decoding to find
        raise ImageReadError(f"{source}: {empty_note}; notebook 02 then decodes every other image and names all "
                             f"it cannot read at once")


def overlapping_files(splits: dict[str, pd.DataFrame], root: str | os.PathLike) -> list[str]:
    """Files that occur in more than one split, compared as files (so ``a.png`` in train and ``./a.png``,
    or a hard link to it, in test count as the same image), as 'file (train, test)' strings."""
    where: dict[tuple[int, int] | Path, list[tuple[str, str]]] = {}
    for split, frame in splits.items():
        for name in frame["file"]:
            where.setdefault(_file_identity(Path(root) / name), []).append((split, name))
    shared = [entries for entries in where.values() if len({s for s, _ in entries}) > 1]
    return [f"{entries[0][1]} ({', '.join(s for s, _ in entries)})" for entries in shared]


def identical_files(root: str | os.PathLike, files: Sequence[str]) -> list[list[str]]:
    """Groups of listed files whose bytes are identical: one picture saved under several names (a download
    run twice, a copy in a second class folder). A split by file name could put one copy in train and the
    other in test, and the test score would then reward memory. Only exact copies are found: a resized or
    re-encoded copy has other bytes."""
    # Files of different sizes cannot be equal, so only files that share their size with another are read.
    by_size: dict[int, list[tuple[str, os.stat_result]]] = {}
    for name in files:
        stat = (Path(root) / name).stat()
        by_size.setdefault(stat.st_size, []).append((name, stat))
    by_content: dict[str, list[str]] = {}
    for entries in by_size.values():
        if len(entries) > 1:
            for name, stat in entries:
                by_content.setdefault(_content_digest(Path(root) / name, stat), []).append(name)
    return [names for names in by_content.values() if len(names) > 1]


# Digests already computed in this process, by path and what a rewrite changes (size, modification and change
# times, inode): a notebook looks for copies again for every cross-validation (`fold_units`), and on same-size
# formats (BMP, raw TIFF) that reads every file.
_DIGESTS: dict[tuple, str] = {}


def _content_digest(path: Path, stat: os.stat_result) -> str:
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    if key not in _DIGESTS:
        digest = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


class ImageDataset(Dataset):
    """Images in a folder with labels from a table (or from class subfolders).

    Returns ``(image_tensor, label_index)``. Pass ``classes=train_set.classes`` to the
    validation and test sets so the same label always gets the same index; a label the
    training split never had is an error, not a new class. ``group_col`` (e.g. ELPV's
    mono/poly) is carried along in ``.frame`` for per-group evaluation, ``subject_col`` (as
    ``subject``) for cross-validation that keeps subjects whole (`subjects_of`).

    With ``skip_bad=True`` every image is decoded once up front and unreadable ones are
    dropped with a warning that counts and lists them (all of them in ``.skipped``, with the
    reason); by default they raise. Paths outside ``root`` are refused unless
    ``allow_outside_root=True`` (see `load_table`).
    """

    def __init__(self, root: str | os.PathLike, table: str | os.PathLike | pd.DataFrame | None = None,
                 file_col: str = "file", label_col: str = "label", group_col: str | None = None,
                 classes: Sequence[str] | None = None, transform: Callable | None = None,
                 skip_bad: bool = False, allow_outside_root: bool = False, subject_col: str | None = None):
        self.root = Path(root)
        frame = load_table(self.root, table, file_col, label_col, group_col, subject_col, check_empty=not skip_bad,
                           allow_outside_root=allow_outside_root)
        if classes is None:
            classes = sorted(frame["label"].unique(), key=natural_key)
        self.classes = [str(c) for c in classes]
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes contain duplicates: {self.classes}")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        unknown = frame.loc[~frame["label"].isin(self.classes)]
        if len(unknown):
            first = unknown.iloc[0]
            raise InputError(
                f"label {first['label']!r} of {first['file']!r} is not among the known classes {self.classes} "
                f"({len(unknown)} row(s) affected; a validation/test label must also occur in training)")
        self.skipped: dict[str, str] = {}  # file -> why it was skipped (skip_bad=True only)
        if skip_bad:
            frame = self._drop_unreadable(frame)
        frame["target"] = frame["label"].map(self.class_to_idx).astype(int)
        self.frame = frame.reset_index(drop=True)
        self.transform = transform

    def _unreadable(self, files: Sequence[str]) -> dict[str, str]:
        """{file: error} of the ``files`` that cannot be read, each decoded once."""
        bad = {}
        for file in files:
            try:
                read_image(self.root / file)
            except ImageReadError as err:
                bad[file] = str(err)
        return bad

    def _drop_unreadable(self, frame: pd.DataFrame) -> pd.DataFrame:
        bad = self._unreadable(frame["file"])
        self.skipped = bad
        if bad:
            warnings.warn(f"skipped {len(bad)} unreadable image(s) of {len(frame)}: {list(bad.values())[:20]}",
                          stacklevel=3)
            frame = frame[~frame["file"].isin(list(bad))]
        if len(frame) == 0:
            raise InputError(f"{self.root}: no readable images left")
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
        try:
            image = read_image(self.root / self.frame["file"].iat[index])
        except ImageReadError as err:
            # Name every unreadable image at once, not one per rerun: decoding them all costs what one epoch's
            # reading does, and only on this path. Not under torchrun: the other processes would wait in a
            # collective call for as long, and could time out before the message arrives.
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                raise
            bad = self._unreadable(self.files)
            if len(bad) <= 1:
                raise ImageReadError(f"{err}; the only unreadable one of these {len(self)} images: replace or "
                                     f"delete it (or drop its row from the label table) and rerun") from None
            raise ImageReadError(f"{len(bad)} of {len(self)} image(s) cannot be read: {list(bad.values())[:20]}; "
                                 f"replace or delete them (or drop their rows from the label table) and "
                                 f"rerun") from None
        return torch.from_numpy(image).permute(2, 0, 1).contiguous()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.frame["target"].iat[index])


# ----------------------------------------------------------------------------------------
# Splits


def make_splits(frame: pd.DataFrame, label_col: str = "label", group_col: str | None = "group",
                test_size: float = 0.25, val_size: float = 0.15, seed: int = 0,
                copies: Sequence[Sequence[str]] = (), subject_col: str | None = None) -> dict[str, pd.DataFrame]:
    """Seeded train/val/test split, stratified on label x group.

    ``test_size`` is the share of all images held out for testing (25 % as in Deitsch et al.
    2019); ``val_size`` is the share of the remaining training images used for validation.
    ``copies`` are groups of ``file`` names that hold one picture (`identical_files`): each group
    lands whole in the split of its first name, and its names must agree on the label and group.
    ``subject_col`` names who or what each image shows (a patient, a specimen): all images of one
    subject then land in one split, so the test score is on subjects the model never saw. Whole
    subjects are dealt out (`subject_folds`, scikit-learn's ``StratifiedGroupKFold`` rule), so the shares are close to
    ``test_size`` and ``val_size`` rather than exact.
    """
    from sklearn.model_selection import train_test_split

    for name, value in (("test_size", test_size), ("val_size", val_size)):
        if not 0.0 < value < 1.0:
            raise InputError(f"{name} must be in (0, 1), got {value}")
    if label_col not in frame.columns:
        raise MissingColumnError(f"no column {label_col!r} to stratify on; columns are {list(frame.columns)}")
    agree_on = [c for c in dict.fromkeys(["label", label_col, group_col]) if c in frame.columns]
    followers = _copy_followers(frame, copies, agree_on)
    if subject_col is not None:
        return _subject_splits(frame, label_col, group_col, test_size, val_size, seed, copies, subject_col)
    # Split one row per picture, then let every further copy follow its first into the same split.
    everything, frame = frame, frame.drop(index=list(followers))
    strata = frame[label_col].astype(str)
    grouped = bool(group_col and group_col in frame.columns and frame[group_col].notna().all())
    if grouped:
        strata = strata + "|" + frame[group_col].astype(str)
    counts = strata.value_counts()
    what = "label x group" if grouped else "class"
    if (counts < 4).any():
        raise InputError(f"too few images to stratify three splits: {counts[counts < 4].to_dict()} "
                         f"(each {what} needs at least 4)")
    # scikit-learn needs at least one image per stratum in every split: check it here, where we can
    # say how many images that takes, instead of letting it fail with "test_size = 6 should be ...".
    sizes = split_sizes(len(frame), test_size, val_size)
    short = {name: n for name, n in sizes.items() if n < len(counts)}
    if short:
        needed = minimum_split_size(len(counts), test_size, val_size)
        raise InputError(f"too few images for {len(counts)} "
                         f"{'classes' if what == 'class' else what + ' strata'} ({len(frame)} images): the "
                         + " and ".join(f"{name} split would get {n}" for name, n in short.items())
                         + f" image(s), fewer than one per stratum; a stratified split takes at least {needed} "
                         f"images (about {math.ceil(needed / len(counts))} per {what})"
                         + (", or fewer groups (group_col)" if what != "class" else ""))

    rest, test = train_test_split(frame, test_size=test_size, stratify=strata, random_state=seed)
    train, val = train_test_split(rest, test_size=val_size, stratify=strata.loc[rest.index], random_state=seed)
    splits = {"train": train, "val": val, "test": test}
    for name, split in splits.items():
        own = [row for row, first in followers.items() if first in split.index]
        splits[name] = pd.concat([split, everything.loc[own]]).reset_index(drop=True)
    _warn_absent_classes(splits, label_col)
    return splits


def _warn_absent_classes(splits: dict[str, pd.DataFrame], label_col: str) -> None:
    """A class this rare is scored on nothing, or chosen on nothing: say so now, not in notebook 05."""
    every = set().union(*(set(split[label_col].astype(str)) for split in splits.values()))
    absent = {name: sorted(every - set(split[label_col].astype(str))) for name, split in splits.items()}
    absent = {name: labels for name, labels in absent.items() if labels}
    if absent:
        warnings.warn(f"class(es) with no image in a split: {absent}; with so few images of a class its results "
                      f"cannot be judged (add images of it if you can)", stacklevel=3)


def _subject_splits(frame: pd.DataFrame, label_col: str, group_col: str | None, test_size: float, val_size: float,
                    seed: int, copies: Sequence[Sequence[str]], subject_col: str) -> dict[str, pd.DataFrame]:
    """`make_splits` with whole subjects dealt out: test first, then validation from the rest."""
    if subject_col not in frame.columns or frame[subject_col].isna().any():
        raise MissingColumnError(f"subject column {subject_col!r} is missing or has empty cells; columns are "
                                 f"{list(frame.columns)}")
    units = _subject_units(frame, copies, subject_col)  # copies of one picture join their subjects into one
    strata = frame[label_col].astype(str)
    if group_col and group_col in frame.columns and frame[group_col].notna().all():
        strata = strata + "|" + frame[group_col].astype(str)
    rest, test = _hold_out_subjects(frame, strata, units, test_size, seed, "test")
    train, val = _hold_out_subjects(rest, strata.loc[rest.index], units.loc[rest.index], val_size, seed, "val")
    splits = {"train": train.reset_index(drop=True), "val": val.reset_index(drop=True),
              "test": test.reset_index(drop=True)}
    _warn_absent_classes(splits, label_col)
    return splits


def _subject_units(frame: pd.DataFrame, copies: Sequence[Sequence[str]], subject_col: str | None) -> pd.Series:
    """Per row, the unit that must stay in one split: its subject (its file, without ``subject_col``), merged
    with the subjects of its copies."""
    keys = frame[subject_col].astype(str) if subject_col else frame["file"].astype(str)
    parent = {s: s for s in keys}

    def root(s: str) -> str:
        while parent[s] != s:
            parent[s] = parent[parent[s]]
            s = parent[s]
        return s

    subject_of = dict(zip(frame["file"], keys, strict=True))
    for names in copies:
        first = root(subject_of[names[0]])
        for name in names[1:]:
            parent[root(subject_of[name])] = first
    return keys.map(root)


def fold_units(root: str | os.PathLike, frame: pd.DataFrame) -> np.ndarray | None:
    """Per row of ``frame`` (a split table: ``file``, and ``subject`` with subject_col), the unit that
    cross-validation must keep on one side of every fold: its subject, merged with those of its byte-identical
    copies (`identical_files`); without subjects, each picture with its copies. The split keeps copies together,
    but inside the training split a copy in the fit part and one in the score part would reward memory there
    too: a high C for the probe, the strategy that memorizes in 03. None when there are neither subjects nor
    copies: plain stratified folds then do."""
    subject_col = "subject" if "subject" in frame.columns else None
    if subject_col and frame[subject_col].isna().any():
        raise MissingColumnError(f"{int(frame[subject_col].isna().sum())} image(s) have no subject, e.g. "
                                 f"{frame.loc[frame[subject_col].isna(), 'file'].iloc[0]!r}")
    copies = identical_files(root, frame["file"].tolist())
    if subject_col is None and not copies:
        return None
    return _subject_units(frame.reset_index(drop=True), copies, subject_col).to_numpy()


def _hold_out_subjects(frame: pd.DataFrame, strata: pd.Series, units: pd.Series, share: float, seed: int,
                       split: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rest, held out): about ``share`` of ``frame``'s images, whole subjects only, stratified where it can."""
    folds = max(2, round(1 / share))
    if units.nunique() < folds:
        raise InputError(f"too few subjects to hold out a {split} split of about {share:.0%}: {units.nunique()} "
                         f"subject(s) among {len(frame)} images, at least {folds} needed (more subjects, or leave "
                         f"subject_col unset if images of one subject are not alike)")
    keep, held = subject_folds(strata.to_numpy(), units.to_numpy(), folds, seed)[0]
    return frame.iloc[keep], frame.iloc[held]


def fold_count(labels: Sequence, units: Sequence | None, folds: int) -> int:
    """How many cross-validation folds ``labels`` allow, at most ``folds``: at most as many as the units (images,
    or with ``units`` subjects or pictures with their copies) of the class with fewest, since a class needs a
    unit outside each fold to be fitted on (`subject_folds` then keeps one outside each fold, where subjects that
    hold several classes allow it). Below 2 there is nothing to cross-validate."""
    per_class = _units_per_class(labels, units)
    return int(min(folds, per_class.min())) if len(per_class) else 0


def _units_per_class(labels: Sequence, units: Sequence | None) -> pd.Series:
    """Distinct units (images without ``units``) of each class."""
    labels = np.asarray(labels)
    return pd.Series(np.asarray(units) if units is not None else np.arange(len(labels))).groupby(labels).nunique()


def require_folds(labels: Sequence, units: Sequence | None, folds: int, what: str) -> int:
    """`fold_count`, or an `InputError` naming the classes that leave fewer than 2 folds for ``what``."""
    count = fold_count(labels, units, folds)
    if count < 2:
        per_class = _units_per_class(labels, units)
        raise InputError(f"cannot cross-validate {what} on {len(labels)} images: class(es) "
                         f"{per_class[per_class < 2].index.tolist()} have a single image, or all their images of one "
                         f"subject or as copies of one picture; add images of them")
    return count


def subject_folds(labels: Sequence, subjects: Sequence, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit rows, score rows) of ``folds`` stratified folds that keep each subject's images on one side:
    cross-validation with ``subject_col``, where plain folds would score a model on subjects it was fitted on.

    Whole subjects are dealt out greedily, each to the fold whose class shares it disturbs least (scikit-learn's
    ``StratifiedGroupKFold`` rule), largest subjects first and, among equal sizes, in an order drawn from
    ``seed``. scikit-learn orders the subjects by how uneven their classes are instead, and shuffles only ties:
    with subjects of distinct class mixes (ELPV's blocks) every seed then gave the same folds. Where the deal has
    put every subject of a class in one fold, subjects are moved so that the other folds have it too
    (`_keep_classes_outside`)."""
    labels, subjects = np.asarray(labels), np.asarray(subjects)
    classes, y = np.unique(labels, return_inverse=True)
    names, group = np.unique(subjects, return_inverse=True)
    if len(names) < folds:
        raise InputError(f"{folds} folds need at least {folds} subjects, got {len(names)}")
    counts = np.zeros((len(names), len(classes)))
    np.add.at(counts, (group, y), 1)
    totals = counts.sum(0)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.permutation(len(names)), -counts.sum(1)))  # largest first, ties in a seeded order
    per_fold, assigned = np.zeros((folds, len(classes))), np.empty(len(names), dtype=int)
    for g in order:
        # the fold whose per-class shares stay most even with this subject added; then the emptiest fold
        spread = [np.std((per_fold + counts[g] * (np.arange(folds) == f)[:, None]) / totals, axis=0).mean()
                  for f in range(folds)]
        best = min(range(folds), key=lambda f: (round(spread[f], 12), per_fold[f].sum(), f))
        per_fold[best] += counts[g]
        assigned[g] = best
    _keep_classes_outside(counts, per_fold, assigned)
    empty = [f for f in range(folds) if not per_fold[f].any()]
    if empty:  # a few subjects much larger than the rest: evening out the shares left a fold without any
        raise InputError(f"cannot deal {len(names)} subjects into {folds} folds that all hold images (sizes "
                         f"{sorted(counts.sum(1).astype(int).tolist(), reverse=True)[:10]}...); more subjects, "
                         f"or fewer folds")
    # The largest subject always opens fold 0, and the splits hold out fold 0: number the folds at random, so that
    # the largest subject is not in every seed's test split.
    fold_of = rng.permutation(folds)[assigned][group]
    return [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(folds)]


def _keep_classes_outside(counts: np.ndarray, per_fold: np.ndarray, assigned: np.ndarray) -> None:
    """Move subjects until no fold holds every subject of a class that has several: the other folds are what a
    fold's model is fitted on (or, in a split, the training images), and they must have each class. The greedy
    deal can trap a class in one fold when subjects hold several classes. Each move takes one of the trapped
    class's subjects to another fold, the move that leaves the fewest classes trapped (then the smallest subject,
    to the emptiest fold); bounded, in case no move frees them all."""
    holders, totals = counts > 0, counts.sum(0)
    several = holders.sum(0) > 1

    def trapped(table: np.ndarray) -> np.ndarray:  # fold x class: every image of a class of several subjects
        return (table == totals) & several

    for _ in range(len(assigned)):
        stuck = np.argwhere(trapped(per_fold))
        if not len(stuck):
            return
        f, c = stuck[0]
        moves = []
        for g in np.flatnonzero((assigned == f) & holders[:, c]):
            for h in range(len(per_fold)):
                if h != f:
                    after = per_fold.copy()
                    after[f] -= counts[g]
                    after[h] += counts[g]
                    moves.append((int(trapped(after).sum()), counts[g].sum(), per_fold[h].sum(), g, h))
        _, _, _, g, h = min(moves)
        per_fold[f] -= counts[g]
        per_fold[h] += counts[g]
        assigned[g] = h


def shared_subjects(splits: dict[str, pd.DataFrame]) -> list[str]:
    """Subjects with images in more than one split, as 'subject (train, test)' strings; [] without subjects."""
    where: dict[str, list[str]] = {}
    for name, frame in splits.items():
        if "subject" in frame.columns:
            for subject in frame["subject"].dropna().astype(str).unique():
                where.setdefault(subject, []).append(name)
    return [f"{subject} ({', '.join(names)})" for subject, names in where.items() if len(names) > 1]


def _copy_followers(frame: pd.DataFrame, copies: Sequence[Sequence[str]], columns: list[str]) -> dict:
    """Row of each later copy -> row of its group's first copy; copies whose labels disagree are an error."""
    row_of = dict(zip(frame["file"], frame.index, strict=True)) if len(copies) else {}
    followers, conflicts = {}, []
    for names in copies:
        unknown = [n for n in names if n not in row_of]
        if unknown:
            raise KeyError(f"copies name file(s) that are not in the table: {unknown[:10]}")
        rows = [row_of[n] for n in names]
        values = frame.loc[rows, columns].astype(str).agg("|".join, axis=1)
        if values.nunique() > 1:
            conflicts.append(" = ".join(f"{n!r} ({v})" for n, v in zip(names, values, strict=True)))
        followers.update({row: rows[0] for row in rows[1:]})
    if conflicts:
        raise InputError(f"{len(conflicts)} picture(s) stored more than once with different labels (byte-identical "
                         f"files; one picture cannot be two classes: delete or relabel the wrong copy): "
                         f"{conflicts[:10]}")
    return followers


def subsample(frame: pd.DataFrame, n: int, seed: int = 0, column: str = "label", per_class: int = 2) -> pd.DataFrame:
    """At most ``n`` rows of ``frame`` (all when there are fewer), stratified on ``column``, keeping at least
    ``per_class`` rows of every class (all of a class with fewer), so that the sample can still be
    cross-validated, even where that takes the total above ``n`` (rare classes, or more classes than ``n``).
    Where no class falls short, the rows are exactly scikit-learn's stratified ``train_test_split``."""
    if n >= len(frame):
        return frame.reset_index(drop=True)
    from sklearn.model_selection import train_test_split

    counts = frame[column].value_counts()
    rare = frame[frame[column].isin(counts.index[counts < 2])]  # stratification needs 2 per class: keep these
    rest = frame.drop(rare.index)
    size = n - len(rare)
    if rest.empty or size < rest[column].nunique():  # fewer rows than classes: one of each
        part = rest.groupby(column, sort=False).head(1)
    elif len(rest) - size < rest[column].nunique():  # scikit-learn wants a row of every class left out as well
        part = rest.drop(_left_out_of_largest(rest, len(rest) - size, column, seed).index)
    else:
        part, _ = train_test_split(rest, train_size=size, stratify=rest[column], random_state=seed)
    taken = part[column].value_counts()
    short = [label for label in counts.index if taken.get(label, 0) < min(per_class, counts[label])]
    if short:  # stratified rounding left a class below per_class: add its next rows
        extra = [rest[(rest[column] == label) & ~rest.index.isin(part.index)].head(per_class - taken.get(label, 0))
                 for label in short if label not in rare[column].values]
        part = pd.concat([part, *extra])
    return pd.concat([part, rare]).reset_index(drop=True)


def _left_out_of_largest(rest: pd.DataFrame, k: int, column: str, seed: int) -> pd.DataFrame:
    """One random row from each of the ``k`` largest classes of ``rest``: leaving out fewer rows than there are
    classes cannot be stratified, and taking them from the largest classes keeps the proportions closest."""
    largest = rest[column].value_counts().index[:k]
    return rest[rest[column].isin(largest)].groupby(column, sort=False).sample(1, random_state=seed)


def subjects_of(dataset: torch.utils.data.Dataset) -> np.ndarray | None:
    """The subject of every item of ``dataset`` (an `ImageDataset` made with ``subject_col``, or a ``Subset`` of
    one), in order; None when it names none."""
    if isinstance(dataset, torch.utils.data.Subset):
        parent = subjects_of(dataset.dataset)
        return None if parent is None else parent[np.asarray(dataset.indices)]
    frame = getattr(dataset, "frame", None)
    return frame["subject"].astype(str).to_numpy() if frame is not None and "subject" in frame else None


def units_of(dataset: torch.utils.data.Dataset) -> np.ndarray | None:
    """`fold_units` of every item of ``dataset`` (an `ImageDataset`, or a ``Subset`` of one), in order: the
    groups for cross-validating on its images (the probe's C, 03's folds) and for resampling them whole in a
    margin's bootstrap, since copies of one picture are one piece of evidence; None when single images do."""
    if isinstance(dataset, torch.utils.data.Subset):
        parent = units_of(dataset.dataset)
        return None if parent is None else parent[np.asarray(dataset.indices)]
    frame = getattr(dataset, "frame", None)
    return None if frame is None else fold_units(dataset.root, frame)


def unit_name(dataset: torch.utils.data.Dataset) -> str:
    """What `units_of` groups ``dataset``'s images by, for the text beside a margin: "subject" when the data
    names subjects (their copies merged in), else "picture" (a picture with its byte-identical copies)."""
    return "subject" if subjects_of(dataset) is not None else "picture"


def targets_of(dataset: torch.utils.data.Dataset) -> list[int] | None:
    """The class index of every item of ``dataset``, looking through ``Subset``s without loading an image;
    None for a dataset that does not say (no ``targets`` attribute)."""
    if hasattr(dataset, "targets"):
        return [int(t) for t in dataset.targets]
    if isinstance(dataset, torch.utils.data.Subset):
        parent = targets_of(dataset.dataset)
        return None if parent is None else [parent[i] for i in dataset.indices]
    return None


def minimum_split_size(strata: int, test_size: float = 0.25, val_size: float = 0.15) -> int:
    """The fewest images `make_splits` can split into three splits with one image per stratum in each."""
    n = strata
    while min(split_sizes(n, test_size, val_size).values()) < strata:
        n += 1
    return n


def split_sizes(n: int, test_size: float = 0.25, val_size: float = 0.15) -> dict[str, int]:
    """Images per split for ``n`` images, rounded as scikit-learn's `train_test_split` rounds them."""
    test = math.ceil(test_size * n)
    val = math.ceil(val_size * (n - test))
    return {"train": n - test - val, "val": val, "test": test}


def save_splits(splits: dict[str, pd.DataFrame], folder: str | os.PathLike) -> list[Path]:
    """Write ``train.csv``, ``val.csv`` and ``test.csv`` into ``folder``."""
    return [write_csv(frame, Path(folder) / f"{name}.csv") for name, frame in splits.items()]


def load_splits(folder: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """Read the split CSVs written by `save_splits`."""
    folder = Path(folder)
    missing = [n for n in ("train", "val", "test") if not (folder / f"{n}.csv").is_file()]
    if missing:
        raise MissingFileError(f"{folder}: split file(s) {missing} missing; "
                                f"run notebooks/02_prepare_dataset.ipynb first")
    splits = {}
    for name in ("train", "val", "test"):
        path = folder / f"{name}.csv"
        try:
            splits[name] = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
            raise InputError(f"{path} cannot be read ({err}); rerun notebooks/02_prepare_dataset.ipynb") from err
        missing = [c for c in ("file", "label", "group") if c not in splits[name].columns]
        if missing:
            raise InputError(f"{path} lacks column(s) {missing}; rerun notebooks/02_prepare_dataset.ipynb")
    return splits


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


ELPV_MODULE_CELLS = 60  # the 60-cell modules the first runs of one cell type are multiples of


def elpv_blocks(types: Sequence[str], cells: int = ELPV_MODULE_CELLS) -> list[str]:
    """A block name per cell, the cells in file order: each run of consecutive cells of one type cut into
    blocks of ``cells`` (the last block of a run may be shorter).

    ELPV's cells come from 44 modules, and which module each came from is not recorded. The numbering
    hints at it: the types come in runs of 60, 300, 180, 360, ... cells, and consecutive cells share their
    label far more often than shuffled labels do (`benchmarks/elpv_modules.py`). A block is therefore a
    *proxy* for a module, for ``subject_col="block"``: test on blocks the model never saw."""
    names, run, position, previous = [], 0, 0, None
    for kind in types:
        if kind != previous:
            run, position, previous = run + 1, 0, kind
        names.append(f"{kind}{run:02d}-{position // cells:02d}")
        position += 1
    return names


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
        "block": elpv_blocks(raw["type"]),
    })


def prepare_elpv(dest: str | os.PathLike = "data/elpv") -> Path:
    """Copy the 2,624 ELPV cell images out of the installed package into ``dest``.

    Writes ``dest/images/cellNNNN.png`` and ``dest/labels.csv`` (file, probability, label =
    functional/defective at p >= 0.5, label4 = the four probability classes, type = mono/poly,
    block = `elpv_blocks`, a proxy for the module). ``labels.csv`` is written last, so its presence
    marks a complete copy and a second call returns at once (a copy made before a column was added
    gets the new table; its images are kept).
    """
    dest = Path(dest)
    labels_path = dest / "labels.csv"
    if labels_path.is_file():
        existing = pd.read_csv(labels_path, dtype=str)
        if (len(existing) == 2624 and "block" in existing.columns
                and all((dest / f).is_file() for f in existing["file"])):
            return dest
    table = _elpv_labels()
    source = _elpv_package_dir() / "images"
    (dest / "images").mkdir(parents=True, exist_ok=True)
    for name in table["file"]:
        target = dest / "images" / name
        if target.is_file() and target.stat().st_size == (source / name).stat().st_size:
            continue  # copied by an earlier, interrupted call
        atomic_copy(source / name, target)  # a copy killed half-way never leaves a truncated image
    table["file"] = "images/" + table["file"]
    write_csv(table, labels_path)
    return dest


def make_tiny_elpv(dest: str | os.PathLike = "data/elpv_tiny", per_stratum: int = 8, size: int = 64) -> Path:
    """A deterministic miniature ELPV for CI: ``per_stratum`` images of each 4-class label x
    type (64 images by default), downscaled to ``size`` px. Takes a second or two."""
    dest = Path(dest)
    labels_path = dest / "labels.csv"
    expected = per_stratum * 8
    if labels_path.is_file():
        done = pd.read_csv(labels_path)
        first = _stored_shape(dest / done["file"].iloc[0]) if len(done) else None
        if len(done) == expected and "block" in done.columns and first is not None and first[:2] == (size, size):
            return dest  # made before with these settings (another size is made again)
    table = _elpv_labels()
    # Spread the picks over the whole file list instead of taking the first few of each stratum.
    chosen = []
    for _, stratum in table.groupby(["label4", "type"]):
        chosen += list(stratum.index[np.linspace(0, len(stratum) - 1, per_stratum).round().astype(int)])
    picks = table.loc[chosen]
    source = _elpv_package_dir() / "images"
    (dest / "images").mkdir(parents=True, exist_ok=True)
    for name in picks["file"]:
        image = decode_image(source / name)  # as stored: ELPV's cells are 8-bit grey
        small = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        encoded, data = cv2.imencode(".png", small)
        if not encoded:
            raise OSError(f"could not encode {source / name} as PNG")
        with atomic_open(dest / "images" / name) as handle:
            handle.write(data.tobytes())
    picks = picks.sort_values("file").copy()
    picks["file"] = "images/" + picks["file"]
    write_csv(picks, labels_path)
    return dest
