"""Offline class-folder image datasets, built deterministically from a seed.

The workbook is judged on image folders it never saw, and the size x similarity guide needs data
of known kinds to be tested on. Each builder writes ``DEST/<class>/<image>.png|.jpg`` (the
layout `helpers.data.scan_class_folders` reads) from data that installs offline, a few hundred
images each, in different sizes, formats (PNG, JPEG; RGB, 8-bit grayscale) and class counts:

    python benchmarks/datasets.py --list
    python benchmarks/datasets.py photos data/byod/photos --seed 0
    python benchmarks/datasets.py all data/byod --seed 0          # every dataset under data/byod/<name>

The same seed gives the same files, byte for byte (JPEG included: fixed quality, one encoder).
Nothing here is committed: ELPV images are CC BY-NC-SA 4.0, write them under data/ (ignored by git)
or /tmp. Sources: scikit-image sample data (photos: astronaut, chelsea, coffee, rocket, motorcycle;
textures: brick, grass, gravel, moon; faces: `lfw_subset`), scikit-learn (digits; china.jpg,
flower.jpg), Debian's dataset-fashion-mnist (``apt-get install -y dataset-fashion-mnist``), and
the elpv-dataset package through `helpers.data.prepare_elpv`.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import shutil
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: `helpers` is the repository's package
    sys.path.insert(0, str(ROOT))

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle_boot")
JPEG_QUALITY = 90
_IMAGE_SUFFIXES = (".png", ".jpg")


class DatasetUnavailable(RuntimeError):
    """The source data of a dataset is not installed (the message says how to install it)."""


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset builder and what the similarity study expects of it."""

    name: str
    build: Callable[..., None]  # (dest, rng) or, with ``elpv``, (dest, rng, source)
    summary: str
    # The side of the size x similarity guide this kind of data belongs on, decided from what the
    # images are (not from a measurement): True = ImageNet-like, False = not, None = open question.
    expected_similar: bool | None
    elpv: bool = False  # copies ELPV out of the elpv-dataset package first (prepare_elpv)


# ----------------------------------------------------------------------------------------
# Writing and augmenting images


def _write(path: Path, image: np.ndarray) -> None:
    """Write an RGB (H, W, 3) or grayscale (H, W) uint8 image; the suffix picks PNG or JPEG."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"{path}: expected a uint8 (H, W) or (H, W, 3) image, got {image.dtype} {image.shape}")
    data = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if path.suffix == ".jpg" else []
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), data, params):
        raise OSError(f"could not write {path}")


def _random_crop(image: np.ndarray, rng: np.random.Generator, scale: tuple[float, float],
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """A random crop covering ``scale`` of the image's area with aspect ratio in ``ratio``
    (torchvision's RandomResizedCrop sampling, without the resize)."""
    h, w = image.shape[:2]
    for _ in range(20):
        area = h * w * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        ch, cw = round(np.sqrt(area / aspect)), round(np.sqrt(area * aspect))
        if 8 <= ch <= h and 8 <= cw <= w:
            top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            return image[top:top + ch, left:left + cw]
    side = min(h, w)
    return image[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    # INTER_AREA when shrinking (no aliasing), bicubic when enlarging.
    shrink = width * height < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def _colour_jitter(image: np.ndarray, rng: np.random.Generator, strength: float = 0.2) -> np.ndarray:
    """Random brightness, contrast and (for RGB) saturation, each by a factor in 1 +- strength."""
    x = image.astype(np.float32)
    x *= rng.uniform(1 - strength, 1 + strength)  # brightness
    mean = x.mean()
    x = (x - mean) * rng.uniform(1 - strength, 1 + strength) + mean  # contrast
    if x.ndim == 3:
        gray = x.mean(axis=2, keepdims=True)
        x = (x - gray) * rng.uniform(1 - strength, 1 + strength) + gray  # saturation
    return np.clip(x, 0, 255).round().astype(np.uint8)


def _dihedral(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random 90-degree rotation and mirror: textures and noise have no 'up'."""
    image = np.rot90(image, int(rng.integers(0, 4)))
    return np.ascontiguousarray(image[:, ::-1] if rng.random() < 0.5 else image)


def _gray(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


# ----------------------------------------------------------------------------------------
# Sources


@functools.lru_cache(maxsize=1)
def _photo_sources() -> dict[str, np.ndarray]:
    """Seven everyday colour photos (RGB uint8): the classes of the photo datasets. Cached (they
    take seconds to decode) and never modified: crops are copied before they are changed."""
    import skimage.data
    from sklearn.datasets import load_sample_image

    return {
        "astronaut": skimage.data.astronaut(),
        "cat": skimage.data.chelsea(),
        "coffee": skimage.data.coffee(),
        "rocket": skimage.data.rocket(),
        "motorcycle": skimage.data.stereo_motorcycle()[0],
        "pagoda": load_sample_image("china.jpg"),
        "flower": load_sample_image("flower.jpg"),
    }


def _photo_crops(dest: Path, rng: np.random.Generator, per_class: int, sizes: tuple[int, int], suffix: str,
                 gray: bool, square: bool) -> None:
    """Random crops (10-50 % of the area, flipped, colour-jittered) of each source photo, one
    class per photo, resized so the longer side is in ``sizes``."""
    for name, photo in _photo_sources().items():
        for i in range(per_class):
            crop = _random_crop(photo, rng, scale=(0.1, 0.5), ratio=(1.0, 1.0) if square else (3 / 4, 4 / 3))
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            crop = _colour_jitter(np.ascontiguousarray(crop), rng)
            side = int(rng.integers(sizes[0], sizes[1] + 1))
            h, w = crop.shape[:2]
            short = max(8, round(min(h, w) * side / max(h, w)))  # the longer side is exactly `side`
            image = _resize(crop, side if w >= h else short, side if h > w else short)
            _write(dest / name / f"{name}_{i:03d}{suffix}", _gray(image) if gray else image)


def build_photos(dest: Path, rng: np.random.Generator) -> None:
    """7 classes x 40 RGB JPEGs, 128-224 px on the longer side, aspect ratio 3:4 to 4:3."""
    _photo_crops(dest, rng, 40, (128, 224), ".jpg", gray=False, square=False)


def build_photos_small(dest: Path, rng: np.random.Generator) -> None:
    """7 classes x 40 RGB PNGs of 32-48 px (CIFAR-like thumbnails)."""
    _photo_crops(dest, rng, 40, (32, 48), ".png", gray=False, square=True)


def build_photos_gray(dest: Path, rng: np.random.Generator) -> None:
    """7 classes x 40 grayscale PNGs, 96-160 px on the longer side."""
    _photo_crops(dest, rng, 40, (96, 160), ".png", gray=True, square=False)


def build_faces(dest: Path, rng: np.random.Generator) -> None:
    """scikit-image's `lfw_subset`: 100 face and 100 non-face grayscale photos of 25 x 25 px
    (the issue's "200 small face photos"). The seed only shuffles the file numbering."""
    import skimage.data

    images = (np.clip(skimage.data.lfw_subset(), 0, 1) * 255).round().astype(np.uint8)  # (200, 25, 25)
    order = rng.permutation(len(images))
    for number, index in enumerate(order):
        label = "face" if index < 100 else "not_face"
        _write(dest / label / f"{label}_{number:03d}.png", images[index])


def build_digits(dest: Path, rng: np.random.Generator) -> None:
    """scikit-learn's handwritten digits: 10 classes x 30 grayscale PNGs, 8 x 8 upscaled to 32 px
    (nearest neighbour, so the pixels stay visible: this is what the data really holds)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    for label in range(10):
        picks = rng.choice(np.flatnonzero(digits.target == label), 30, replace=False)
        for i, index in enumerate(sorted(picks)):
            big = cv2.resize(images[index], (32, 32), interpolation=cv2.INTER_NEAREST)
            _write(dest / f"digit_{label}" / f"digit{label}_{i:03d}.png", big)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def build_fashion(dest: Path, rng: np.random.Generator) -> None:
    """Fashion-MNIST test images: 10 classes x 30 grayscale PNGs of 28 x 28 px."""
    images_path = FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz"
    labels_path = FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz"
    if not images_path.is_file() or not labels_path.is_file():
        raise DatasetUnavailable(f"Fashion-MNIST is not installed ({images_path} missing): on Debian/Ubuntu run "
                                 f"`apt-get install -y dataset-fashion-mnist`")
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    for label, name in enumerate(FASHION_CLASSES):
        picks = rng.choice(np.flatnonzero(labels == label), 30, replace=False)
        for i, index in enumerate(sorted(picks)):
            _write(dest / name / f"{name}_{i:03d}.png", images[index])


def build_textures(dest: Path, rng: np.random.Generator) -> None:
    """4 classes x 60 grayscale JPEGs of 96 px: random crops (2-25 % of the area, rotated and
    mirrored) of scikit-image's brick, grass and gravel textures and of its lunar surface."""
    import skimage.data

    sources = {"brick": skimage.data.brick(), "grass": skimage.data.grass(), "gravel": skimage.data.gravel(),
               "moon_surface": skimage.data.moon()}
    for name, texture in sources.items():
        for i in range(60):
            crop = _dihedral(_random_crop(texture, rng, scale=(0.02, 0.25), ratio=(1.0, 1.0)), rng)
            _write(dest / name / f"{name}_{i:03d}.jpg", _colour_jitter(_resize(crop, 96, 96), rng, 0.15))


def _pink_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Noise with a 1/f amplitude spectrum (the spectrum of natural images) per channel."""
    fy, fx = np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :]
    radius = np.sqrt(fx ** 2 + fy ** 2)
    radius[0, 0] = 1.0
    spectrum = (rng.standard_normal((3, size, size // 2 + 1)) + 1j * rng.standard_normal((3, size, size // 2 + 1)))
    noise = np.fft.irfft2(spectrum / radius, s=(size, size)).transpose(1, 2, 0)
    return (noise - noise.mean()) / noise.std()


def build_noise(dest: Path, rng: np.random.Generator) -> None:
    """2 classes x 100 RGB PNGs of 64 px: white Gaussian noise vs pink (1/f) noise with the same
    mean and standard deviation (grey 128 +- 48): the classes differ only in spatial correlation."""
    for i in range(100):
        white = rng.standard_normal((64, 64, 3))
        for label, noise in (("white", white), ("pink", _pink_noise(rng, 64))):
            image = np.clip(128 + 48 * noise, 0, 255).round().astype(np.uint8)
            _write(dest / label / f"{label}_{i:03d}.png", image)


def _elpv_subset(dest: Path, rng: np.random.Generator, label_col: str, source: Path | None) -> None:
    """200 ELPV cells (25 per 4-class label x cell type, drawn with ``rng``), copied as 300 px
    grayscale PNGs into class folders by ``label_col``."""
    import pandas as pd

    from helpers.data import prepare_elpv

    try:
        root = prepare_elpv(source or ROOT / "data" / "elpv")
    except ModuleNotFoundError as err:
        raise DatasetUnavailable(str(err)) from err
    table = pd.read_csv(root / "labels.csv", dtype=str)
    for _, stratum in table.groupby(["label4", "type"]):
        for _, row in stratum.loc[sorted(rng.choice(stratum.index, 25, replace=False))].iterrows():
            folder = row[label_col] if label_col == "label" else f"p{row[label_col]}"
            target = dest / folder / Path(row["file"]).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / row["file"], target)


def build_elpv(dest: Path, rng: np.random.Generator, source: Path | None = None) -> None:
    """ELPV binary (functional / defective at p >= 0.5): 200 cells, 25 per expert class x type."""
    _elpv_subset(dest, rng, "label", source)


def build_elpv4(dest: Path, rng: np.random.Generator, source: Path | None = None) -> None:
    """ELPV 4-class (folders p0.00, p0.33, p0.67, p1.00): the same 200 cells as `elpv` for one seed."""
    _elpv_subset(dest, rng, "label4", source)


DATASETS: dict[str, DatasetInfo] = {d.name: d for d in [
    DatasetInfo("photos", build_photos, "7 classes x 40, RGB JPEG 128-224 px, crops of everyday photos", True),
    DatasetInfo("photos_small", build_photos_small, "7 classes x 40, RGB PNG 32-48 px thumbnails", True),
    DatasetInfo("photos_gray", build_photos_gray, "7 classes x 40, grayscale PNG 96-160 px", True),
    DatasetInfo("faces", build_faces, "2 classes x 100, grayscale PNG 25 px (skimage lfw_subset)", True),
    # Photos of materials: ImageNet holds such surfaces in many photos (and classes such as stone
    # wall or honeycomb), and its features are known to describe textures well (Cimpoi et al. 2015);
    # but nothing in these crops is an object. Either side is defensible: measured, not assumed.
    DatasetInfo("textures", build_textures, "4 classes x 60, grayscale JPEG 96 px (brick/grass/gravel/moon)", None),
    DatasetInfo("digits", build_digits, "10 classes x 30, grayscale PNG 32 px (sklearn 8x8 digits)", False),
    # Zalando product photos of garments, shoes and bags (ImageNet has jerseys, sandals, running
    # shoes, purses), shrunk to 28 px grayscale silhouettes: ImageNet-like content, unlike rendering.
    DatasetInfo("fashion", build_fashion, "10 classes x 30, grayscale PNG 28 px (Fashion-MNIST test set)", None),
    DatasetInfo("noise", build_noise, "2 classes x 100, RGB PNG 64 px (white vs pink noise)", False),
    DatasetInfo("elpv", build_elpv, "2 classes, 200 ELPV cells, grayscale PNG 300 px", False, elpv=True),
    DatasetInfo("elpv4", build_elpv4, "4 classes, the same 200 ELPV cells", False, elpv=True),
]}


# ----------------------------------------------------------------------------------------
# Building


def _is_image_tree(folder: Path) -> bool:
    """True when ``folder`` holds only class folders of .png/.jpg files (what `build` writes)."""
    for entry in folder.iterdir():
        if not entry.is_dir() or any(not f.is_file() or f.suffix not in _IMAGE_SUFFIXES for f in entry.iterdir()):
            return False
    return True


def build(name: str, dest: str | Path, seed: int = 0, overwrite: bool = False,
          elpv_source: str | Path | None = None) -> dict:
    """Write dataset ``name`` into ``dest`` (class folders) from ``seed``; returns a summary.

    An existing non-empty ``dest`` is an error unless ``overwrite``, and even then it is only
    replaced when it holds nothing but class folders of images (never someone's other files).
    The dataset is written to a sibling folder first and renamed, so ``dest`` is never half-built.
    ``elpv_source``: where `prepare_elpv` copies all of ELPV first (default: data/elpv).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{dest} exists and is not empty; pass --overwrite to replace it")
        if not dest.is_dir() or not _is_image_tree(dest):
            raise FileExistsError(f"{dest} holds more than class folders of images; not replacing it")
    started = time.perf_counter()
    partial = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    # One random stream per (seed, dataset): datasets do not change when others are added.
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    try:
        info = DATASETS[name]
        info.build(partial, rng, Path(elpv_source) if elpv_source else None) if info.elpv else info.build(partial, rng)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if dest.exists():
        shutil.rmtree(dest)
    partial.rename(dest)
    return summarize(dest) | {"name": name, "seed": seed, "seconds": round(time.perf_counter() - started, 1)}


def summarize(root: str | Path) -> dict:
    """Classes, image count, formats and pixel sizes of a class-folder dataset."""
    root = Path(root)
    files = sorted(p for p in root.glob("*/*") if p.suffix in _IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{root}: no .png/.jpg images in class folders")
    sides, channels = [], set()
    for path in files:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        sides.append(max(image.shape[:2]))
        channels.add("gray" if image.ndim == 2 else "RGB")
    counts = {d.name: sum(1 for _ in d.iterdir()) for d in sorted(root.iterdir()) if d.is_dir()}
    return {"dest": str(root), "classes": len(counts), "images": len(files), "per_class": counts,
            "formats": sorted({p.suffix[1:].upper() for p in files}), "channels": sorted(channels),
            "longer_side_px": [int(min(sides)), int(max(sides))]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="datasets:\n" + "\n".join(f"  {d.name:13s} {d.summary}"
                                                                     for d in DATASETS.values()))
    parser.add_argument("name", nargs="?", help=f"one of {list(DATASETS)}, or 'all' (DEST/<name> each)")
    parser.add_argument("dest", nargs="?", help="folder to write (must not exist or be empty)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace DEST if it is a dataset written here")
    parser.add_argument("--elpv-source", type=Path, default=None,
                        help="where prepare_elpv copies all of ELPV first (default: data/elpv)")
    parser.add_argument("--list", action="store_true", help="list the datasets and exit")
    args = parser.parse_args(argv)
    if args.list or not args.name:
        for d in DATASETS.values():
            print(f"{d.name:13s} {d.summary}")
        return 0
    if not args.dest:
        parser.error("DEST is required")
    names = list(DATASETS) if args.name == "all" else [args.name]
    if args.name != "all" and args.name not in DATASETS:
        parser.error(f"unknown dataset {args.name!r}; choose one of {list(DATASETS)} or 'all'")
    failed = 0
    for name in names:
        dest = Path(args.dest) / name if args.name == "all" else Path(args.dest)
        try:
            info = build(name, dest, args.seed, args.overwrite, args.elpv_source)
        except DatasetUnavailable as err:
            print(f"{name}: skipped: {err}", file=sys.stderr)
            failed += args.name != "all"  # 'all' skips what is not installed; one named dataset fails
            continue
        except (FileExistsError, ValueError) as err:
            print(f"{name}: error: {err}", file=sys.stderr)
            failed += 1
            continue
        print(f"{name}: {info['images']} images, {info['classes']} classes, {'/'.join(info['formats'])} "
              f"{'/'.join(info['channels'])}, {info['longer_side_px'][0]}-{info['longer_side_px'][1]} px, "
              f"{info['seconds']} s -> {info['dest']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
