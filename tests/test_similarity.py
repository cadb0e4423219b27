"""`measure_similarity` puts each kind of data on the side of the guide it belongs to.

Small samples (24 images per kind, at the probe's 224 px) of the offline datasets that
benchmarks/datasets.py builds; the full study, with margins, is benchmarks/similarity.py.
"""

import hashlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.data import ImageDataset, scan_class_folders
from helpers.freezing import SIMILARITY_THRESHOLD, measure_similarity, recommend
from helpers.models import BACKBONES, create_model
from helpers.transforms import eval_transform

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 24


def _load_benchmark_datasets():
    # A file, not a package; a unique module name so it cannot clash with any installed `datasets`.
    spec = importlib.util.spec_from_file_location("benchmark_datasets", ROOT / "benchmarks" / "datasets.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark_datasets()


@pytest.fixture(scope="module")
def probe():
    return create_model("efficientnet_lite0", None)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Build a benchmark dataset once per module (seed 0); returns its folder."""
    folders = {}

    def get(name: str) -> Path:
        if name not in folders:
            folders[name] = bench.build(name, tmp_path_factory.mktemp("byod") / name, seed=0)["dest"]
        return Path(folders[name])

    return get


@pytest.fixture(scope="module")
def scored(built, probe):
    """`measure_similarity` of ``N_IMAGES`` images of a benchmark dataset, computed once."""
    results = {}

    def get(name: str) -> dict:
        if name not in results:
            results[name] = measure_similarity(sample_batch(built(name)), probe)
        return results[name]

    return get


def sample_batch(root: Path, n: int = N_IMAGES, seed: int = 0) -> torch.Tensor:
    """``n`` images drawn across the classes, preprocessed as notebook 01 does for the probe."""
    table = scan_class_folders(root)
    picks = np.random.default_rng(seed).choice(len(table), min(n, len(table)), replace=False)
    dataset = ImageDataset(root, table.iloc[np.sort(picks)], transform=eval_transform(BACKBONES["efficientnet_lite0"]))
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


@pytest.mark.parametrize("name", ["photos", "photos_small", "photos_gray", "faces"])
def test_natural_photos_score_similar(name, scored):
    # Colour, grayscale, 32-48 px thumbnails and the 25 px grayscale faces: all photos.
    result = scored(name)
    assert result["images"] == N_IMAGES
    assert result["similar"] and result["similarity"] >= SIMILARITY_THRESHOLD, result["similarity"]
    assert recommend(200, 4, result["similarity"])[0] == "head"


@pytest.mark.parametrize("name", ["noise", "digits"])
def test_noise_and_digits_score_different(name, scored):
    result = scored(name)
    assert not result["similar"] and result["similarity"] < SIMILARITY_THRESHOLD, result["similarity"]
    assert recommend(200, 4, result["similarity"])[0] == "truncate"


def test_photos_score_well_above_noise(scored):
    # Not just either side of a line: the ordering the guide relies on, with room to spare.
    photos, noise = scored("photos"), scored("noise")
    assert photos["similarity"] - noise["similarity"] > 0.3, (photos["similarity"], noise["similarity"])
    assert photos["activation_distance"] < noise["activation_distance"] / 3


@pytest.mark.parametrize("name", ["photos", "noise"])
def test_scores_are_in_range_and_complete(name, scored):
    result = scored(name)
    assert 0.0 < result["similarity"] <= 1.0 and result["activation_distance"] >= 0.0
    per_image = result["per_image_similarity"]
    assert per_image.shape == (N_IMAGES,) and np.all((per_image > 0) & (per_image <= 1))
    assert 0.0 <= result["mean_top1_probability"] <= 1.0 and 0.0 <= result["entropy_similarity"] <= 1.0
    assert result["threshold"] == SIMILARITY_THRESHOLD and isinstance(result["similar"], bool)


def test_batching_does_not_change_the_score(built, probe):
    images = sample_batch(built("photos_small"), n=8)
    whole = measure_similarity(images, probe)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(8)), batch_size=3)
    batched = measure_similarity(loader, probe)
    assert batched["images"] == 8
    assert batched["similarity"] == pytest.approx(whole["similarity"], abs=1e-6)
    np.testing.assert_allclose(batched["per_image_similarity"], whole["per_image_similarity"], atol=2e-4)


def test_refuses_a_model_without_its_imagenet_statistics():
    images = torch.zeros(2, 3, 64, 64)
    with pytest.raises(ValueError, match="untouched pretrained ImageNet network"):
        measure_similarity(images, create_model("efficientnet_lite0", 3))  # a new head: maybe fine-tuned
    with pytest.raises(ValueError, match="untouched pretrained ImageNet network"):
        measure_similarity(images, create_model("efficientnet_lite0", None, pretrained=False))
    no_batchnorm = create_model("convnext_tiny", None, pretrained=False)  # LayerNorm only
    no_batchnorm.imagenet_classifier = True  # pretend, to reach the next check
    with pytest.raises(ValueError, match="no BatchNorm"):
        measure_similarity(images, no_batchnorm)
    with pytest.raises(ValueError, match="no images"):
        measure_similarity([], create_model("efficientnet_lite0", None))


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def test_datasets_are_built_deterministically_and_safely(tmp_path):
    first = bench.build("noise", tmp_path / "a", seed=3)
    assert first["images"] == 200 and first["classes"] == 2 and first["formats"] == ["PNG"]
    bench.build("noise", tmp_path / "b", seed=3)
    bench.build("noise", tmp_path / "c", seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    with pytest.raises(FileExistsError, match="--overwrite"):
        bench.build("noise", tmp_path / "a", seed=3)
    bench.build("noise", tmp_path / "a", seed=4, overwrite=True)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "c")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a dataset")
    with pytest.raises(FileExistsError, match="more than class folders"):
        bench.build("noise", tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").is_file()
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        bench.build("cifar", tmp_path / "d")
