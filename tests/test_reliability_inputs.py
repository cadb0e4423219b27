"""Bad and unusual inputs: every bad file fails with its name, every valid image loads as RGB.

Test images are generated here with OpenCV and Pillow, so each expected pixel value is known.
"""

import io
import os
import sys
import warnings

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from helpers.data import ImageDataset, ImageReadError, load_table, read_image, scan_class_folders

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _noise(seed=0, size=32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _table(*files, label="a") -> pd.DataFrame:
    return pd.DataFrame({"file": list(files), "label": [label] * len(files)})


# ----------------------------------------------------------------------------------------
# Bad files


def test_zero_byte_file_is_named(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.png.*0 bytes"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(ImageReadError, match=r"empty\.png"):
        load_table(tmp_path, _table("empty.png"))
    with pytest.raises(ImageReadError, match=r"empty\.png"):
        ImageDataset(tmp_path, _table("empty.png"))


@pytest.mark.parametrize("kind", ["png", "jpg"])
def test_truncated_image_is_named(tmp_path, kind):
    data = _png_bytes(_noise()) if kind == "png" else _jpeg_bytes(_noise())
    path = tmp_path / f"cut.{kind}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=rf"cut\.{kind}: truncated"):
        read_image(path)


@pytest.mark.parametrize("kind", ["png", "jpg"])
def test_extra_bytes_after_a_complete_image_are_not_called_truncated(tmp_path, kind):
    # Phones append data after the image (motion photos put a whole video there).
    image = _noise(1)
    data = _png_bytes(image) if kind == "png" else _jpeg_bytes(image)
    (tmp_path / f"plain.{kind}").write_bytes(data)
    (tmp_path / f"trailer.{kind}").write_bytes(data + b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
    loaded = read_image(tmp_path / f"trailer.{kind}")
    np.testing.assert_array_equal(loaded, read_image(tmp_path / f"plain.{kind}"))
    if kind == "png":  # lossless: exactly the pixels written
        np.testing.assert_array_equal(loaded, image)


@pytest.mark.parametrize("name, content", [("notes.jpg", b"shopping list: milk, eggs\n" * 20),
                                           ("page.png", b"<!DOCTYPE html><html><body>403 Forbidden</body></html>"),
                                           ("random.bmp", bytes(range(256)) * 4)])
def test_non_image_with_an_image_extension_is_named(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageReadError, match=name.replace(".", r"\.")):
        read_image(tmp_path / name)
    dataset = ImageDataset(tmp_path, _table(name))  # the table is fine; reading the image is not
    with pytest.raises(ImageReadError, match=name.replace(".", r"\.")):
        dataset[0]


def test_missing_listed_files_are_counted_and_named(tmp_path):
    (tmp_path / "here.png").write_bytes(_png_bytes(_noise()))
    table = _table("here.png", "gone1.png", "sub/gone2.png")
    with pytest.raises(FileNotFoundError, match=r"2 listed file\(s\) missing.*gone1\.png.*sub/gone2\.png"):
        load_table(tmp_path, table)
    # skip_bad is for unreadable images; a missing file usually means a wrong folder, so it still fails.
    with pytest.raises(FileNotFoundError, match="gone1.png"):
        ImageDataset(tmp_path, table, skip_bad=True)
    with pytest.raises(FileNotFoundError, match="labels.csv"):
        load_table(tmp_path, tmp_path / "labels.csv")


def test_missing_column_is_named_with_the_columns_that_exist(tmp_path):
    (tmp_path / "a.png").write_bytes(_png_bytes(_noise()))
    pd.DataFrame({"filename": ["a.png"], "label": ["x"]}).to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(KeyError, match=r"labels\.csv has no column 'file'; its columns are \['filename', 'label'\]"):
        ImageDataset(tmp_path, tmp_path / "labels.csv")
    with pytest.raises(KeyError, match=r"no column 'kind'"):
        load_table(tmp_path, tmp_path / "labels.csv", file_col="filename", group_col="kind")
    ImageDataset(tmp_path, tmp_path / "labels.csv", file_col="filename")  # the right name works


def test_empty_label_is_named(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(_png_bytes(_noise()))
    (tmp_path / "labels.csv").write_text("file,label\na.png,cat\nb.png,\n")
    with pytest.raises(ValueError, match=r"empty 'label' in 1 row\(s\): data rows \[2\] .*files \['b\.png'\]"):
        load_table(tmp_path, tmp_path / "labels.csv")


def test_empty_file_and_group_cells_name_their_rows(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(_png_bytes(_noise()))
    (tmp_path / "blank_file.csv").write_text("file,label\na.png,cat\n,dog\nb.png,dog\n")
    with pytest.raises(ValueError, match=r"empty 'file' in 1 row\(s\): data rows \[2\]"):
        load_table(tmp_path, tmp_path / "blank_file.csv")
    (tmp_path / "blank_group.csv").write_text("file,label,site\na.png,cat,A\nb.png,dog,\nc.png,dog,  \n")
    with pytest.raises(ValueError, match=r"empty 'site' in 2 row\(s\): data rows \[2, 3\].*or leave group_col unset"):
        load_table(tmp_path, tmp_path / "blank_group.csv", group_col="site")  # not silently unstratified
    assert load_table(tmp_path, tmp_path / "blank_group.csv")["label"].tolist() == ["cat", "dog", "dog"]


@pytest.mark.parametrize("separator", [";", "\t"])
def test_semicolon_and_tab_separated_tables_and_spaced_headers(tmp_path, separator):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(_png_bytes(_noise()))
    (tmp_path / "labels.csv").write_text(f"file{separator}label\na.png{separator}cat\nb.png{separator}dog\n")
    assert load_table(tmp_path, tmp_path / "labels.csv")["label"].tolist() == ["cat", "dog"]
    (tmp_path / "spaced.csv").write_text("file, label\na.png,cat\nb.png,dog\n")
    with pytest.warns(UserWarning, match=r"stripped spaces around column name\(s\) \[' label'\]"):
        assert load_table(tmp_path, tmp_path / "spaced.csv")["label"].tolist() == ["cat", "dog"]


def test_windows_paths_and_near_duplicate_labels(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "img" / name).write_bytes(_png_bytes(_noise()))
    (tmp_path / "labels.csv").write_text("file,label\nimg\\a.png,Cat\nimg/b.png,cat\n")
    with pytest.warns(UserWarning) as caught:
        table = load_table(tmp_path, tmp_path / "labels.csv")
    assert table["file"].tolist() == ["img/a.png", "img/b.png"]
    messages = " ".join(str(w.message) for w in caught)
    assert "read 1 path(s) written with backslashes" in messages
    assert "differ only in case, spacing or Unicode form are separate classes: Cat and cat;" in messages
    # 'café' as one character and as e + accent (macOS folder names): alike on screen, so shown with escapes
    table = pd.DataFrame({"file": ["img/a.png", "img/b.png"], "label": ["caf\u00e9", "cafe\u0301"]})
    with pytest.warns(UserWarning, match=r"Unicode form are separate classes: 'caf\\xe9' and 'cafe\\u0301';"):
        load_table(tmp_path, table)
    with warnings.catch_warnings():  # said once: notebook 03 builds dozens of datasets from one table
        warnings.simplefilter("error")
        load_table(tmp_path, table)


def test_label_unseen_in_training_is_an_error_not_a_new_class(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(_png_bytes(_noise()))
    train = ImageDataset(tmp_path, pd.DataFrame({"file": ["a.png", "b.png"], "label": ["cat", "dog"]}))
    val_table = pd.DataFrame({"file": ["c.png"], "label": ["bird"]})
    with pytest.raises(ValueError, match=r"label 'bird' of 'c\.png' is not among the known classes \['cat', 'dog'\]"):
        ImageDataset(tmp_path, val_table, classes=train.classes)


def test_empty_folder_and_flat_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no class subfolders"):
        ImageDataset(tmp_path / "empty")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(_png_bytes(_noise()))
    with pytest.raises(ValueError, match=r"flat: no class subfolders"):
        scan_class_folders(tmp_path / "flat")


def test_class_folder_without_images_is_named(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "1.png").write_bytes(_png_bytes(_noise()))
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "readme.txt").write_text("photos to come")
    with pytest.raises(ValueError, match=r"class folder .*dog has no images .*, only \['readme\.txt'\]: add its "
                                         r"images, or move the folder out of"):
        ImageDataset(tmp_path)
    # Non-image files next to images are reported, not silently dropped.
    (tmp_path / "dog" / "1.jpg").write_bytes(_jpeg_bytes(_noise()))
    with pytest.warns(UserWarning, match=r"ignored 1 file\(s\) whose extension is not one read as an image "
                                         r"\(\.png .*\): \['dog/readme\.txt'\]"):
        dataset = ImageDataset(tmp_path)
    assert dataset.files == ["cat/1.png", "dog/1.jpg"]


def test_duplicate_file_names_are_named(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(_png_bytes(_noise()))
    table = pd.DataFrame({"file": ["a.png", "b.png", "a.png"], "label": ["x", "y", "y"]})
    with pytest.raises(ValueError, match=r"1 file name\(s\) listed more than once: \['a\.png'\]"):
        ImageDataset(tmp_path, table)


def test_skip_bad_warns_counts_and_lists_every_skipped_file(tmp_path):
    good = _noise(2)
    (tmp_path / "good.png").write_bytes(_png_bytes(good))
    (tmp_path / "also good (1).png").write_bytes(_png_bytes(_noise(3)))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut (1).jpg").write_bytes(_jpeg_bytes(_noise())[:300])  # a name with " (" in it
    (tmp_path / "text.png").write_text("not an image")
    table = _table("good.png", "empty.png", "cut (1).jpg", "also good (1).png", "text.png")
    with pytest.warns(UserWarning, match=r"skipped 3 unreadable image\(s\) of 5") as caught:
        dataset = ImageDataset(tmp_path, table, skip_bad=True)
    message = str(caught[0].message)
    assert "empty.png" in message and "cut (1).jpg" in message and "text.png" in message
    assert dataset.files == ["good.png", "also good (1).png"]
    assert sorted(dataset.skipped) == ["cut (1).jpg", "empty.png", "text.png"]
    assert "truncated" in dataset.skipped["cut (1).jpg"] and "0 bytes" in dataset.skipped["empty.png"]
    np.testing.assert_array_equal(dataset.load(0).permute(1, 2, 0).numpy(), good)
    assert ImageDataset(tmp_path, _table("good.png"), skip_bad=True).skipped == {}


def test_skip_bad_with_nothing_readable_left_fails(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipped 1"), pytest.raises(ValueError, match="no readable images"):
        ImageDataset(tmp_path, _table("empty.png"), skip_bad=True)


# ----------------------------------------------------------------------------------------
# Valid but unusual images: all come out as RGB uint8 with the right pixels


def _load_via_dataset(folder, name):
    """Load through ImageDataset, as training does: a (3, H, W) uint8 tensor, returned as HxWx3."""
    image = ImageDataset(folder, _table(name)).load(0)
    assert image.ndim == 3 and image.shape[0] == 3 and str(image.dtype) == "torch.uint8"
    return image.permute(1, 2, 0).numpy()


def test_grayscale_png_and_jpeg(tmp_path):
    Image.new("L", (6, 4), 99).save(tmp_path / "gray.png")
    Image.new("L", (6, 4), 99).save(tmp_path / "gray.jpg", quality=95)
    Image.new("1", (6, 4), 1).save(tmp_path / "bilevel.png")
    assert (_load_via_dataset(tmp_path, "gray.png") == 99).all()
    assert np.abs(_load_via_dataset(tmp_path, "gray.jpg").astype(int) - 99).max() <= 1
    assert (_load_via_dataset(tmp_path, "bilevel.png") == 255).all()


def test_alpha_channels_are_dropped_not_mixed_in(tmp_path):
    Image.new("RGBA", (5, 5), (10, 20, 30, 0)).save(tmp_path / "rgba.png")  # fully transparent
    Image.new("LA", (5, 5), (77, 128)).save(tmp_path / "la.png")
    assert _load_via_dataset(tmp_path, "rgba.png")[2, 2].tolist() == [10, 20, 30]
    assert _load_via_dataset(tmp_path, "la.png")[2, 2].tolist() == [77, 77, 77]


def test_16_bit_png_is_scaled_to_8_bit(tmp_path):
    Image.fromarray(np.full((4, 4), 30000, np.uint16)).save(tmp_path / "gray16.png")
    bgr16 = np.zeros((4, 4, 3), np.uint16)
    bgr16[..., 2], bgr16[..., 1] = 65535, 257 * 100  # R = max, G = 100 in 8-bit terms, B = 0
    assert cv2.imwrite(str(tmp_path / "rgb16.png"), bgr16)
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I;16")
    assert (_load_via_dataset(tmp_path, "gray16.png") == round(30000 / 257)).all()
    assert _load_via_dataset(tmp_path, "rgb16.png")[1, 1].tolist() == [255, 100, 0]


@pytest.mark.parametrize("cmyk, rgb", [((0, 255, 255, 0), (255, 0, 0)), ((255, 0, 0, 0), (0, 255, 255)),
                                       ((0, 0, 0, 128), (127, 127, 127))])
def test_cmyk_jpeg_colours(tmp_path, cmyk, rgb):
    Image.new("CMYK", (16, 16), cmyk).save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    pixel = _load_via_dataset(tmp_path, "cmyk.jpg")[8, 8].astype(int)
    assert np.abs(pixel - rgb).max() <= 3, pixel


@pytest.mark.parametrize("transparency", [None, 0])
def test_palette_png_colours(tmp_path, transparency):
    indices = np.zeros((6, 8), np.uint8)
    indices[:, 4:] = 1
    image = Image.fromarray(indices, "P")
    image.putpalette([*RED, *BLUE] + [0] * (256 * 3 - 6))
    image.save(tmp_path / "palette.png", **({"transparency": transparency} if transparency is not None else {}))
    assert Image.open(tmp_path / "palette.png").mode == "P"
    loaded = _load_via_dataset(tmp_path, "palette.png")
    assert loaded.shape == (6, 8, 3)
    assert (loaded[:, :4] == RED).all() and (loaded[:, 4:] == BLUE).all()


@pytest.mark.parametrize("orientation, top, bottom", [(6, RED, BLUE), (8, BLUE, RED)])
def test_exif_rotated_jpeg_comes_out_as_displayed(tmp_path, orientation, top, bottom):
    # Stored 20 wide x 10 high, left half red; the EXIF tag says how to turn it for display.
    stored = np.zeros((10, 20, 3), np.uint8)
    stored[:, :10], stored[:, 10:] = RED, BLUE
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    loaded = _load_via_dataset(tmp_path, "rotated.jpg").astype(int)
    assert loaded.shape == (20, 10, 3)  # portrait, as displayed
    assert np.abs(loaded[2:8, 2:8] - top).max() <= 8 and np.abs(loaded[12:18, 2:8] - bottom).max() <= 8
    shown = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "rotated.jpg"))).astype(int)
    assert np.abs(loaded - shown).max() <= 8  # and it agrees with Pillow's reading of the tag


def test_floating_point_images_outside_0_to_1_are_refused_not_whitened(tmp_path):
    inside = np.linspace(0, 1, 16 * 16 * 3, dtype=np.float32).reshape(16, 16, 3)
    cv2.imwrite(str(tmp_path / "unit.tiff"), inside)
    assert read_image(tmp_path / "unit.tiff").max() == 255  # 0..1 floats: read as they are meant
    cv2.imwrite(str(tmp_path / "bytes.tiff"), inside * 255)  # ImageJ-style 0..255 floats
    with pytest.raises(ImageReadError, match=r"bytes\.tiff: floating-point pixels range over \[0, 255\]"):
        read_image(tmp_path / "bytes.tiff")


def test_class_folders_skip_hidden_and_system_folders_and_name_loose_images(tmp_path):
    for folder in ("cat", "cat/.thumbs", "cat/@eaDir", "dog", "dog/sub", "__MACOSX/dog"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    for name in ("cat/1.png", "cat/.thumbs/1.png", "cat/@eaDir/1.png", "dog/sub/2.png", "__MACOSX/dog/2.png",
                 "stray.png"):
        (tmp_path / name).write_bytes(_png_bytes(_noise()))
    with pytest.warns(UserWarning, match=r"1 image\(s\) directly in the folder belong to no class .*\['stray\.png'\]"):
        table = scan_class_folders(tmp_path)
    assert table.values.tolist() == [["cat/1.png", "cat"], ["dog/sub/2.png", "dog"]]


def test_a_label_table_s_problems_are_named_in_one_error(tmp_path):
    # One round of fixes should mend them all: a duplicated row, a missing file and an empty file at once
    (tmp_path / "a.png").write_bytes(_png_bytes(_noise()))
    (tmp_path / "empty.png").write_bytes(b"")
    table = pd.DataFrame({"file": ["a.png", "a.png", "gone.png", "empty.png"], "label": ["x", "x", "y", "y"]})
    with pytest.raises(ValueError, match=r"listed more than once: \['a\.png'\] \(keep one row each\); also 1 listed "
                                         r"file\(s\) missing under .*\['gone\.png'\]; 1 empty file\(s\) .*"
                                         r"\['empty\.png'\]"):
        load_table(tmp_path, table)
    with pytest.raises(FileNotFoundError, match=r"missing under .*\['gone\.png'\]; also 1 empty file"):
        load_table(tmp_path, table.drop(index=1))
    with pytest.raises(ValueError, match=r"1 empty file\(s\) .*\['empty\.png'\]; notebook 02 then decodes"):
        load_table(tmp_path, table.drop(index=[1, 2]))


def test_gif_and_jfif_files_in_class_folders_are_read_on_every_opencv_build(tmp_path):
    # JPEG's other extensions are JPEGs; a GIF is decoded by Pillow (its first frame), whatever OpenCV can read
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    (tmp_path / "cat" / "a.jfif").write_bytes(_jpeg_bytes(_noise()))
    frames = [Image.fromarray(np.full((8, 8, 3), value, np.uint8)) for value in (10, 200)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])  # an animation
    (tmp_path / "dog" / "b.gif").write_bytes(buffer.getvalue())
    assert scan_class_folders(tmp_path).values.tolist() == [["cat/a.jfif", "cat"], ["dog/b.gif", "dog"]]
    first = read_image(tmp_path / "dog" / "b.gif")
    assert first.shape == (8, 8, 3) and (first == 10).all()
    (tmp_path / "dog" / "c.gif").write_bytes(b"GIF89a and then nothing an image needs")
    with pytest.raises(ImageReadError, match=r"c\.gif: not a readable image \(Pillow"):
        read_image(tmp_path / "dog" / "c.gif")


@pytest.mark.skipif(sys.platform != "linux", reason="only Linux file systems store names that are not UTF-8")
def test_names_that_are_not_utf8_are_refused_by_name_before_anything_is_written(tmp_path):
    # Bytes of an old archive's Latin-1 name: Python holds them as a lone surrogate, which reads fine but cannot be
    # written into a split file or CSV. Both ways in (class folders, a label table) name the file.
    from helpers.errors import InputError

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        (tmp_path / label / "ok.png").write_bytes(_png_bytes(_noise()))
    with open(os.fsencode(tmp_path) + b"/a/caf\xe9.png", "wb") as handle:
        handle.write(_png_bytes(_noise(1)))
    with pytest.raises(InputError, match=r"not valid UTF-8.*caf\\udce9\.png.*convmv"):
        scan_class_folders(tmp_path)
    table = pd.DataFrame({"file": ["a/ok.png", "b/ok.png", os.fsdecode(b"a/caf\xe9.png")], "label": ["a", "b", "a"]})
    with pytest.raises(InputError, match="not valid UTF-8"):
        load_table(tmp_path, table)
