"""helpers.export and the `python -m helpers.predict` command, on real tiny ELPV images."""

import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch

from helpers.checkpoint import atomic_save, describe_model
from helpers.transforms import Preprocessing, resolve_preprocessing
from helpers.data import ELPV_TASKS, read_image
from helpers.transforms import eval_transform
from helpers.export import (META_FILE, export_model, export_transform, is_exported, load_exported,
                            preprocess_for_export)
from helpers.freezing import apply_strategy
from helpers.models import create_model
from helpers.predict import main
from helpers.runtime import seed_everything

CLASSES = ELPV_TASKS["binary"][1]
SIZE = 64


def make_model(strategy: str):
    seed_everything(0)
    model = create_model("efficientnet_lite0", 2)  # real ImageNet weights, fresh head
    return apply_strategy(model, strategy).eval()


def checkpoint(model) -> dict:
    """What `fit` stores in best.pt, without training."""
    prep = resolve_preprocessing(model, SIZE, crop_pct=1.0)
    return {**describe_model(model, CLASSES, prep), "meta": {"task": "binary"},
            "epoch": 1, "score": 0.5, "metric": "accuracy", "model": model.state_dict()}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Export each strategy's model once per module: strategy -> (model, path)."""
    done = {}

    def get(strategy: str):
        if strategy not in done:
            model = make_model(strategy)
            folder = tmp_path_factory.mktemp(f"export_{strategy}") / "sub"
            done[strategy] = model, export_model(model, checkpoint(model), folder / "model.pt2")
        return done[strategy]
    return get


@pytest.fixture(params=["head", "truncate"])
def exported(request, exports):
    """A plain model and a truncated one (different architecture), both exported."""
    return exports(request.param)


@pytest.fixture()
def head_export(exports):
    return exports("head")


@pytest.fixture(scope="module")
def image_files(tiny_root):
    return sorted((tiny_root / "images").glob("*.png"))[:12]


def reference_probs(model, files):
    """The PyTorch model with the training code's own eval_transform."""
    transform = eval_transform(model, SIZE, crop_pct=1.0)
    x = torch.stack([transform(torch.from_numpy(read_image(f)).permute(2, 0, 1)) for f in files])
    with torch.no_grad():
        return model(x).softmax(1)


def test_exported_model_matches_pytorch(exported, image_files):
    model, path = exported
    module, meta = load_exported(path)
    x = torch.stack([preprocess_for_export(read_image(f), meta) for f in image_files])
    assert x.shape == (len(image_files), 3, SIZE, SIZE) and 0.0 <= x.min() and x.max() <= 1.0
    with torch.no_grad():
        got = module(x)
    expected = reference_probs(model, image_files)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    with torch.no_grad():  # any batch size, including one image
        torch.testing.assert_close(module(x[:1]), expected[:1], atol=1e-5, rtol=0)


def test_export_carries_preprocessing_and_classes(exported):
    model, path = exported
    _, meta = load_exported(path)
    assert meta["classes"] == CLASSES
    assert meta["preprocessing"] == resolve_preprocessing(model, SIZE, crop_pct=1.0).to_dict()
    assert meta["preprocessing"]["image_size"] == SIZE and meta["preprocessing"]["crop_pct"] == 1.0
    assert meta["backbone"] == "efficientnet_lite0"
    assert meta["strategy"] == model.strategy and meta["task"] == "binary"
    assert [p.name for p in path.parent.iterdir()] == ["model.pt2"]  # atomic: no temporary file left


def test_preprocess_matches_eval_transform(image_files):
    prep = Preprocessing(image_size=SIZE, crop_pct=0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                         interpolation="bilinear")
    meta = {"classes": CLASSES, "preprocessing": prep.to_dict()}
    from helpers.models import BACKBONES

    reference = eval_transform(BACKBONES["resnet18"], SIZE, crop_pct=0.875)
    assert reference.preprocessing == prep
    image = read_image(image_files[0])[:, 5:]  # not square: exercises SquarePad
    unit = preprocess_for_export(image, meta)
    normalized = (unit - torch.tensor(prep.mean).view(3, 1, 1)) / torch.tensor(prep.std).view(3, 1, 1)
    torch.testing.assert_close(normalized, reference(torch.from_numpy(image).permute(2, 0, 1)), atol=1e-6, rtol=0)
    assert len(export_transform(meta).transforms) == len(reference.transforms) - 1
    with pytest.raises(ValueError, match="RGB"):
        preprocess_for_export(image[:, :, 0], meta)


def test_export_leaves_the_model_alone(tmp_path):
    model = make_model("head").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prep = resolve_preprocessing(model, SIZE)
    with pytest.raises(ValueError, match="3 classes"):
        export_model(model, {"classes": ["a", "b", "c"], "preprocessing": prep}, tmp_path / "m.pt2")
    assert not (tmp_path / "m.pt2").exists()
    with pytest.raises(KeyError, match="preprocessing"):
        export_model(model, {"classes": CLASSES}, tmp_path / "m.pt2")
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_exported_rejects_other_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt2"):
        load_exported(tmp_path / "nope.pt2")
    model = make_model("head")
    atomic_save(checkpoint(model), tmp_path / "best.pt")
    assert not is_exported(tmp_path / "best.pt")
    with pytest.raises(ValueError, match="model_from_checkpoint"):
        load_exported(tmp_path / "best.pt")


# ----------------------------------------------------------------------------------------
# python -m helpers.predict


@pytest.fixture()
def folder(tmp_path, image_files):
    images = tmp_path / "images"
    images.mkdir()
    for f in image_files[:6]:
        shutil.copy(f, images / f.name)
    return images


def read_predictions(path):
    table = pd.read_csv(path)
    assert list(table.columns) == ["file", "predicted", "confidence", "prob_functional", "prob_defective"]
    return table


def test_predict_cli_with_export_and_checkpoint_agree(head_export, folder, tmp_path, capsys):
    model, path = head_export
    assert main([str(path), str(folder), "--out", str(tmp_path / "a.csv"), "--batch-size", "4",
                 "--device", "cpu", "--num-workers", "0"]) == 0
    by_export = read_predictions(tmp_path / "a.csv")
    files = sorted(folder.iterdir())
    assert by_export["file"].tolist() == [f.name for f in files]
    expected = reference_probs(model, files)
    torch.testing.assert_close(torch.tensor(by_export[["prob_functional", "prob_defective"]].to_numpy(),
                                            dtype=torch.float32), expected, atol=1e-5, rtol=0)
    assert by_export["predicted"].tolist() == [CLASSES[i] for i in expected.argmax(1)]
    assert "wrote" in capsys.readouterr().out

    atomic_save(checkpoint(model), tmp_path / "best.pt")
    assert main([str(tmp_path / "best.pt"), str(folder), "--out", str(tmp_path / "b.csv"),
                 "--num-workers", "0"]) == 0
    by_checkpoint = read_predictions(tmp_path / "b.csv")
    assert by_checkpoint["predicted"].tolist() == by_export["predicted"].tolist()
    pd.testing.assert_series_equal(by_checkpoint["confidence"], by_export["confidence"], atol=1e-5)


def test_predict_cli_refuses_overwrite(head_export, folder, tmp_path, capsys):
    _, path = head_export
    out = tmp_path / "p.csv"
    out.write_text("keep me")
    assert main([str(path), str(folder), "--out", str(out), "--num-workers", "0"]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "keep me"
    assert main([str(path), str(folder), "--out", str(out), "--overwrite", "--num-workers", "0"]) == 0
    assert len(read_predictions(out)) == 6


def test_predict_cli_bad_images(head_export, folder, tmp_path, capsys):
    _, path = head_export
    (folder / "broken.png").write_bytes(b"this is not a png")
    (folder / "notes.txt").write_text("not an image, ignored by extension")
    out = tmp_path / "p.csv"
    assert main([str(path), str(folder), "--out", str(out), "--num-workers", "0"]) == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "1 unreadable" in err and not out.exists()
    assert main([str(path), str(folder), "--out", str(out), "--skip-bad", "--num-workers", "0"]) == 0
    assert "warning: skipped 1" in capsys.readouterr().err
    table = read_predictions(out)
    assert len(table) == 6 and "broken.png" not in table["file"].tolist()


def test_predict_cli_recursive(head_export, folder, tmp_path, capsys):
    _, path = head_export
    sub = folder / "more"
    sub.mkdir()
    shutil.copy(next(folder.glob("*.png")), sub / "copy.png")
    (folder / "notes.txt").write_text("not an image")
    assert main([str(path), str(folder), "--out", str(tmp_path / "flat.csv"), "--num-workers", "0"]) == 0
    # What the command left out is said, not only when it found nothing
    assert ("not read: 1 image(s) in subfolders (add --recursive); 1 file(s) with other extensions, e.g. "
            "'notes.txt'") in capsys.readouterr().out
    assert main([str(path), str(folder), "--out", str(tmp_path / "deep.csv"), "--recursive",
                 "--num-workers", "0"]) == 0
    assert "in subfolders" not in capsys.readouterr().out
    (folder / "notes.txt").unlink()
    files = read_predictions(tmp_path / "deep.csv")["file"].tolist()
    assert len(files) == 7 and "more/copy.png" in files  # without --recursive: 6 (see the CLI tests above)


def test_predict_cli_all_files_reads_images_without_an_image_extension(head_export, folder, tmp_path, capsys):
    _, path = head_export
    shutil.copy(next(folder.glob("*.png")), folder / "scan_0001")  # a label table may list such names
    (folder / ".thumbs").mkdir()
    shutil.copy(next(folder.glob("*.png")), folder / ".thumbs" / "t.png")  # hidden: skipped, as training does
    assert main([str(path), str(folder), "--out", str(tmp_path / "p.csv"), "--num-workers", "0",
                 "--recursive"]) == 0
    assert "scan_0001" not in read_predictions(tmp_path / "p.csv")["file"].tolist()
    assert main([str(path), str(folder), "--out", str(tmp_path / "all.csv"), "--all-files", "--recursive",
                 "--num-workers", "0"]) == 0
    files = read_predictions(tmp_path / "all.csv")["file"].tolist()
    assert len(files) == 7 and "scan_0001" in files and ".thumbs/t.png" not in files
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(folder / "scan_0001", only / "scan_0001")
    assert main([str(path), str(only), "--out", str(tmp_path / "q.csv")]) == 2
    assert "files with other extensions are read with --all-files" in capsys.readouterr().err


def test_predict_cli_input_errors(head_export, folder, tmp_path, capsys):
    _, path = head_export
    out = str(tmp_path / "p.csv")
    assert main([str(tmp_path / "missing.pt2"), str(folder), "--out", out]) == 2
    assert "model file not found" in capsys.readouterr().err
    assert main([str(path), str(tmp_path / "nowhere"), "--out", out]) == 2
    assert "image folder not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "deeper").mkdir(parents=True)
    assert main([str(path), str(empty), "--out", out]) == 2
    assert "no images" in capsys.readouterr().err
    shutil.copy(next(folder.glob("*.png")), empty / "deeper" / "x.png")
    assert main([str(path), str(empty), "--out", out]) == 2
    assert "--recursive" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    assert main([str(junk), str(folder), "--out", out]) == 2
    assert "neither an exported model" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform != "linux", reason="only Linux file systems store names that are not UTF-8")
def test_predict_cli_refuses_names_that_are_not_utf8(head_export, folder, tmp_path, capsys):
    # A Latin-1 name unzipped on Linux is not UTF-8: refused before labelling, not after, when the CSV is written.
    _, path = head_export
    out = str(tmp_path / "p.csv")
    shutil.copy(next(folder.glob("*.png")), os.fsencode(folder) + b"/caf\xe9.png")
    assert main([str(path), str(folder), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "not valid UTF-8" in err and "caf\\udce9.png" in err and not os.path.exists(out)


def test_predict_module_runs_as_a_command(head_export, folder, tmp_path):
    _, path = head_export
    out = tmp_path / "p.csv"
    result = subprocess.run([sys.executable, "-m", "helpers.predict", str(path), str(folder), "--out", str(out),
                             "--num-workers", "0"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(read_predictions(out)) == 6


def test_predict_cli_names_an_export_whose_metadata_cannot_be_used(head_export, folder, tmp_path, capsys):
    import json
    import zipfile

    _, path = head_export
    broken = tmp_path / "broken.pt2"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(broken, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename.endswith(f"extra/{META_FILE}"):
                meta = json.loads(data)
                data = json.dumps({**meta, "preprocessing": {"image_size": meta["preprocessing"]["image_size"]}})
            target.writestr(item, data)
    assert main([str(broken), str(folder), "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {broken}: its metadata cannot be used") and "Traceback" not in err
    assert not (tmp_path / "p.csv").exists()
