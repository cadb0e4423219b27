import os

import pytest
import torch

# Two cores: more threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """The CI dataset: 64 ELPV cells at 64 px, 8 per 4-class label x type."""
    from helpers.data import make_tiny_elpv

    return make_tiny_elpv(tmp_path_factory.mktemp("data") / "elpv_tiny")


@pytest.fixture(scope="session")
def tiny_splits(tiny_root):
    from helpers.data import load_table, make_splits

    table = load_table(tiny_root, tiny_root / "labels.csv", "file", "label", "type")
    return make_splits(table, seed=0)


@pytest.fixture()
def tiny_sets(tiny_root, tiny_splits):
    """Train and validation `ImageDataset`s of the binary task at 64 px, no augmentation."""
    from helpers.data import ELPV_TASKS, ImageDataset
    from helpers.transforms import eval_transform
    from helpers.models import BACKBONES

    transform = eval_transform(BACKBONES["efficientnet_lite0"], image_size=64, crop_pct=1.0)
    classes = ELPV_TASKS["binary"][1]
    train = ImageDataset(tiny_root, tiny_splits["train"], group_col="group", classes=classes, transform=transform)
    val = ImageDataset(tiny_root, tiny_splits["val"], group_col="group", classes=classes, transform=transform)
    return train, val
