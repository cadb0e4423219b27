
import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from helpers.data import (ELPV_TASKS, ImageDataset, ImageReadError, elpv_blocks, load_splits, load_table,
                          make_splits, make_tiny_elpv, minimum_split_size, prepare_elpv, read_image, save_splits,
                          split_sizes)
from helpers.transforms import SquarePad, eval_transform, is_deterministic, train_transform
from helpers.models import BACKBONES

LITE0 = BACKBONES["efficientnet_lite0"]


def test_read_image_converts_bgr_to_rgb(tmp_path):
    bgr = np.zeros((4, 6, 3), np.uint8)
    bgr[..., 2] = 255  # pure red in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "red.png"), bgr)
    rgb = read_image(tmp_path / "red.png")
    assert rgb.shape == (4, 6, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [255, 0, 0]


def test_read_image_gray_alpha_and_16_bit(tmp_path):
    cv2.imwrite(str(tmp_path / "gray.png"), np.full((5, 5), 100, np.uint8))
    cv2.imwrite(str(tmp_path / "deep.png"), np.full((5, 5), 65535, np.uint16))
    rgba = np.zeros((5, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10  # blue, nearly transparent
    cv2.imwrite(str(tmp_path / "alpha.png"), rgba)
    assert read_image(tmp_path / "gray.png")[2, 2].tolist() == [100, 100, 100]
    assert read_image(tmp_path / "deep.png")[2, 2].tolist() == [255, 255, 255]
    assert read_image(tmp_path / "alpha.png")[2, 2].tolist() == [0, 0, 200]


def test_square_pad_keeps_aspect_ratio():
    padded = SquarePad()(torch.ones(3, 10, 4))
    assert padded.shape == (3, 10, 10)
    assert padded[:, :, :3].sum() == 0 and padded[:, :, 3:7].min() == 1 and padded[:, :, 7:].sum() == 0
    wide = SquarePad()(torch.ones(3, 4, 10))  # padded above and below, evenly
    assert wide.shape == (3, 10, 10)
    assert wide[:, :3].sum() == 0 and wide[:, 3:7].min() == 1 and wide[:, 7:].sum() == 0


def test_presets_follow_the_backbone():
    image = torch.randint(0, 256, (3, 300, 200), dtype=torch.uint8)
    out = eval_transform(LITE0)(image)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0  # mean = std = 0.5
    assert train_transform(LITE0, 128, augment="cells")(image).shape == (3, 128, 128)
    assert train_transform(LITE0, 128, augment="natural")(image).shape == (3, 128, 128)
    assert is_deterministic(eval_transform(LITE0)) and is_deterministic(train_transform(LITE0, augment="none"))
    assert not is_deterministic(train_transform(LITE0, augment="cells"))
    with pytest.raises(ValueError, match="cells"):
        train_transform(LITE0, augment="mixup")


def test_the_recipes_without_flips_never_mirror_an_image():
    # brightness rises from left to right: crops and colour jitter keep that order, a horizontal mirror reverses it
    ramp = torch.linspace(0, 255, 200).round().to(torch.uint8).expand(3, 160, 200).contiguous()
    torch.manual_seed(0)

    def reversed_views(augment: str) -> int:
        views = [train_transform(LITE0, 64, augment=augment)(ramp) for _ in range(40)]
        return sum(bool(view[:, :, :8].mean() > view[:, :, -8:].mean()) for view in views)

    assert reversed_views("natural_no_flip") == reversed_views("cells_no_flip") == 0
    assert reversed_views("natural") > 5  # half of them, give or take; none in 40 has odds 2**-40
    assert reversed_views("cells") > 5  # a horizontal flip, or a half turn, in about half of them


def test_elpv_materializes_all_2624_labelled_images(tmp_path):
    root = prepare_elpv(tmp_path / "elpv")
    table = pd.read_csv(root / "labels.csv", dtype=str)
    assert len(table) == 2624 and list(table.columns) == ["file", "probability", "label", "label4", "type", "block"]
    assert table["type"].value_counts().to_dict() == {"poly": 1550, "mono": 1074}
    assert table["block"].nunique() == 45 and table.groupby("block")["type"].nunique().eq(1).all()
    assert (table["label"] == "defective").sum() == 313 + 56 + 402 + 50
    dataset = ImageDataset(root, root / "labels.csv", label_col="label4", group_col="type",
                           classes=ELPV_TASKS["4class"][1], transform=eval_transform(LITE0, 64, crop_pct=1.0))
    assert len(dataset) == 2624
    counts = np.bincount(dataset.targets)
    assert counts.tolist() == [588 + 920, 117 + 178, 56 + 50, 313 + 402]
    image, label = dataset[2623]
    assert image.shape == (3, 64, 64) and 0 <= label < 4
    raw = dataset.load(0)
    assert raw.shape == (3, 300, 300) and raw.dtype == torch.uint8
    torch.testing.assert_close(raw[0], raw[1])  # grayscale cells become three equal channels
    # Second call is a no-op.
    (root / "labels.csv").touch()
    before = (root / "labels.csv").stat().st_mtime_ns
    prepare_elpv(root)
    assert (root / "labels.csv").stat().st_mtime_ns == before
    # A copy killed half-way (labels.csv is written last): the truncated image is copied again
    cell = root / table["file"].iat[7]
    full = cell.read_bytes()
    cell.write_bytes(full[:500])
    (root / "labels.csv").unlink()
    prepare_elpv(root)
    assert cell.read_bytes() == full and not list((root / "images").glob(".*"))
    # A copy made before the block column existed gets the new table, and keeps its images.
    table.drop(columns="block").to_csv(root / "labels.csv", index=False)
    images_before = cell.stat().st_mtime_ns
    prepare_elpv(root)
    assert "block" in pd.read_csv(root / "labels.csv").columns and cell.stat().st_mtime_ns == images_before


def test_elpv_blocks_cut_each_run_of_one_cell_type_into_blocks():
    types = ["mono"] * 5 + ["poly"] * 3 + ["mono"] * 2
    assert elpv_blocks(types, cells=2) == ["mono01-00", "mono01-00", "mono01-01", "mono01-01", "mono01-02",
                                           "poly02-00", "poly02-00", "poly02-01", "mono03-00", "mono03-00"]


def test_tiny_dataset_is_deterministic(tmp_path, tiny_root):
    other = make_tiny_elpv(tmp_path / "again")
    a, b = pd.read_csv(tiny_root / "labels.csv"), pd.read_csv(other / "labels.csv")
    pd.testing.assert_frame_equal(a, b)
    assert len(a) == 64 and a.groupby(["label4", "type"]).size().eq(8).all()
    assert read_image(tiny_root / a["file"].iat[0]).shape == (64, 64, 3)
    smaller = make_tiny_elpv(tmp_path / "again", size=32)  # another size is made again, not the old copy returned
    assert read_image(smaller / a["file"].iat[0]).shape == (32, 32, 3)


def test_splits_are_disjoint_stratified_and_reproducible(tmp_path, tiny_root):
    table = load_table(tiny_root, tiny_root / "labels.csv", "file", "label4", "type")
    splits = make_splits(table, seed=3)
    files = [set(s["file"]) for s in splits.values()]
    assert not (files[0] & files[1]) and not (files[0] & files[2]) and not (files[1] & files[2])
    assert sum(len(f) for f in files) == len(table)
    assert len(splits["test"]) == 16  # 25 %
    # Every label x type stratum appears in every split.
    for part in splits.values():
        assert part.groupby(["label", "group"]).ngroups == 8
    save_splits(splits, tmp_path / "run")
    loaded = load_splits(tmp_path / "run")
    assert loaded["test"]["file"].tolist() == splits["test"]["file"].tolist()
    assert make_splits(table, seed=3)["test"]["file"].tolist() == splits["test"]["file"].tolist()
    assert make_splits(table, seed=4)["test"]["file"].tolist() != splits["test"]["file"].tolist()


def test_label_encoder_is_shared_across_splits(tiny_root, tiny_splits):
    train = ImageDataset(tiny_root, tiny_splits["train"], group_col="group")
    test = ImageDataset(tiny_root, tiny_splits["test"].head(3), group_col="group", classes=train.classes)
    assert test.classes == train.classes == ["defective", "functional"]
    for i in range(3):
        assert test.classes[test[i][1]] == tiny_splits["test"]["label"].iat[i]
    assert set(test.frame["group"]) <= {"mono", "poly"}
    with pytest.raises(ValueError, match="not among the known classes"):
        ImageDataset(tiny_root, tiny_splits["test"], classes=["functional"])


def test_class_folder_layout(tmp_path):
    for cls, value in (("cat", 30), ("dog", 200)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            cv2.imwrite(str(tmp_path / cls / f"{i}.jpg"), np.full((20, 30, 3), value, np.uint8))
    dataset = ImageDataset(tmp_path, transform=eval_transform(LITE0, 32))
    assert dataset.classes == ["cat", "dog"] and len(dataset) == 6
    image, label = dataset[5]
    assert image.shape == (3, 32, 32) and label == 1


def test_clear_errors_name_the_culprit(tmp_path, tiny_root):
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        ImageDataset(tmp_path / "no_such_folder")
    with pytest.raises(KeyError, match="'severity'"):
        ImageDataset(tiny_root, tiny_root / "labels.csv", label_col="severity")
    table = pd.DataFrame({"file": ["images/ghost.png"], "label": ["x"]})
    with pytest.raises(FileNotFoundError, match="ghost.png"):
        ImageDataset(tiny_root, table)
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    dataset = ImageDataset(tmp_path, pd.DataFrame({"file": ["broken.png"], "label": ["x"]}))
    with pytest.raises(ImageReadError, match="broken.png"):
        dataset[0]


def _equal_classes(classes: int, per_class: int, groups: int = 0) -> pd.DataFrame:
    rows = [(f"{c}_{i}", f"class{c}", f"site{i % groups}" if groups else None)
            for c in range(classes) for i in range(per_class)]
    return pd.DataFrame(rows, columns=["file", "label", "group"])


@pytest.mark.parametrize("classes, per_class", [(2, 5), (3, 7), (5, 8), (12, 9)])
def test_a_split_too_small_for_its_classes_says_how_many_images_it_takes(classes, per_class):
    splits = make_splits(_equal_classes(classes, per_class), group_col=None)  # the smallest that splits
    assert all(split["label"].nunique() == classes for split in splits.values())
    assert minimum_split_size(classes) <= classes * per_class
    with pytest.raises(ValueError, match=rf"too few images for {classes} classes \({classes * (per_class - 1)} "
                                         rf"images\): .*takes at least {minimum_split_size(classes)} images"):
        make_splits(_equal_classes(classes, per_class - 1), group_col=None)


def test_split_sizes_round_as_scikit_learn_does_and_groups_count_as_strata():
    from sklearn.model_selection import train_test_split

    for n in (10, 17, 64, 99, 2624):
        rest, test = train_test_split(np.arange(n), test_size=0.25, random_state=0)
        train, val = train_test_split(rest, test_size=0.15, random_state=0)
        assert split_sizes(n) == {"train": len(train), "val": len(val), "test": len(test)}
    with pytest.raises(ValueError, match=r"for 10 label x group strata .*or fewer groups \(group_col\)"):
        make_splits(_equal_classes(2, 30, groups=5))  # 2 classes x 5 sites, 6 images each


def test_a_class_missing_from_a_split_is_named():
    table = pd.DataFrame({"file": [f"f{i}" for i in range(44)], "label": ["ok"] * 40 + ["defect"] * 4})
    with pytest.warns(UserWarning, match=r"class\(es\) with no image in a split: \{'val': \['defect'\]\}"):
        make_splits(table, group_col=None)


def test_subsample_keeps_two_of_every_class_so_the_sample_can_be_cross_validated():
    from sklearn.model_selection import train_test_split

    from helpers.data import subsample
    from helpers.lessons import linear_probe

    frame = pd.DataFrame({"file": [f"{i}.png" for i in range(1003)],
                          "label": ["big"] * 700 + ["mid"] * 300 + ["rare"] * 3})
    # scikit-learn's stratified rounding alone keeps 1 of the 3 rare images: no 2-fold split is possible
    plain, _ = train_test_split(frame, train_size=400, stratify=frame["label"], random_state=0)
    assert plain["label"].value_counts()["rare"] == 1
    sample = subsample(frame, 400, seed=0)
    assert sample["label"].value_counts().to_dict() == {"big": 279, "mid": 120, "rare": 2}
    assert not sample["file"].duplicated().any()
    # a class with a single image is kept whole; with no class short, the rows are scikit-learn's own
    single = pd.DataFrame({"file": [f"{i}" for i in range(102)], "label": ["a"] * 100 + ["b", "c"]})
    assert subsample(single, 50, seed=0)["label"].value_counts()[["b", "c"]].tolist() == [1, 1]
    assert subsample(single.tail(2), 1)["label"].tolist() == ["b", "c"]  # only single-image classes: all kept
    even = pd.DataFrame({"file": [f"{i}" for i in range(100)], "label": ["a", "b"] * 50})
    expected, _ = train_test_split(even, train_size=40, stratify=even["label"], random_state=3)
    assert subsample(even, 40, seed=3)["file"].tolist() == expected["file"].tolist()
    with pytest.raises(ValueError, match=r"a class has only one of them \(images per class: \{'a': 5, 'b': 1\}\)"):
        linear_probe("efficientnet_lite0", ".", pd.DataFrame({"file": list("abcdef"), "label": ["a"] * 5 + ["b"]}),
                     ["a", "b"], 64)


@pytest.mark.parametrize("classes", [2, 40])
@pytest.mark.parametrize("left_out", [1, 3])
def test_subsample_leaves_out_fewer_rows_than_there_are_classes(classes, left_out):
    # scikit-learn's stratified split refuses a left-out part with fewer rows than classes (601 rows, n=600)
    from helpers.data import subsample

    labels = [f"c{i % classes}" for i in range(15 * classes + 1)]
    frame = pd.DataFrame({"file": [f"{i}.png" for i in range(len(labels))], "label": labels})
    sample = subsample(frame, len(frame) - left_out, seed=1)
    assert len(sample) == len(frame) - left_out
    assert not sample["file"].duplicated().any()
    counts = sample["label"].value_counts()
    assert len(counts) == classes and counts.min() >= 14  # one left out of a class at most: still stratified


def test_subsample_leaving_out_one_of_a_two_image_class_tops_it_up():
    from helpers.data import subsample

    frame = pd.DataFrame({"file": [f"{i}" for i in range(60)], "label": [f"c{i % 30}" for i in range(60)]})
    sample = subsample(frame, 59, seed=0)
    assert sample["label"].value_counts().min() == 2  # per_class wins over n, as the docstring says
    assert sorted(sample["file"]) == sorted(frame["file"])


def _imread_fails_like_windows_on_non_ascii(monkeypatch):
    """OpenCV on Windows: imread returns None and imwrite False for a non-ASCII path, without an error."""
    monkeypatch.setattr(cv2, "imread", lambda *args, **kwargs: None)
    monkeypatch.setattr(cv2, "imwrite", lambda *args, **kwargs: False)


def test_tiny_dataset_is_made_and_found_again_in_a_non_ascii_folder(tmp_path, monkeypatch):
    import helpers.data

    _imread_fails_like_windows_on_non_ascii(monkeypatch)
    root = make_tiny_elpv(tmp_path / "données_é" / "elpv_tiny", per_stratum=1, size=16)
    table = pd.read_csv(root / "labels.csv")
    assert len(table) == 8 and read_image(root / table["file"].iat[0]).shape == (16, 16, 3)
    # The second call must read the first image back to see the copy is complete, not make it again.
    monkeypatch.setattr(helpers.data, "_elpv_labels", lambda: pytest.fail("made again: its image was not read"))
    assert make_tiny_elpv(root, per_stratum=1, size=16) == root


def test_decode_image_names_the_file_it_cannot_decode_and_keeps_what_is_stored(tmp_path):
    from helpers.data import decode_image

    for name, data in (("empty é.png", b""), ("text é.png", b"not an image")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageReadError, match=name):
            decode_image(tmp_path / name)
    gray = np.full((3, 5), 7, np.uint8)
    cv2.imencode(".png", gray)[1].tofile(tmp_path / "gris é.png")
    assert decode_image(tmp_path / "gris é.png").tolist() == gray.tolist()  # one channel, as stored


@pytest.mark.parametrize("suffix", [".png", ".webp"])
def test_png_and_webp_are_turned_upright_by_their_exif_orientation_as_jpegs_are(tmp_path, suffix):
    from PIL import Image, ImageOps

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8))  # 10 wide, 6 high, no symmetry
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}{suffix}"
        picture.save(path, exif=exif, **({"lossless": True} if suffix == ".webp" else {}))
        upright = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
        np.testing.assert_array_equal(read_image(path), upright, err_msg=f"orientation {orientation}")
    assert read_image(tmp_path / f"o6{suffix}").shape == (10, 6, 3)  # stored sideways, read upright
