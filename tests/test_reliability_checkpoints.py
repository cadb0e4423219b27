"""Checkpoints: atomic under SIGKILL, loaded with weights_only, self-describing, refused when they do not fit."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from helpers.checkpoint import (FORMAT_VERSION, atomic_save, load_checkpoint, load_weights,
                                model_from_checkpoint)
from helpers.data import ELPV_TASKS, ImageDataset
from helpers.transforms import eval_transform
from helpers.freezing import apply_strategy
from helpers.models import BACKBONES, create_model
from helpers.training import fit
from helpers.runtime import seed_everything


@pytest.fixture(scope="module")
def trained(tiny_root, tiny_splits, tmp_path_factory):
    """One epoch of head-only training on the tiny set, with checkpoints in ``out``."""
    transform = eval_transform(BACKBONES["efficientnet_lite0"], image_size=64, crop_pct=1.0)
    classes = ELPV_TASKS["binary"][1]
    train, val = (ImageDataset(tiny_root, tiny_splits[s], group_col="group", classes=classes, transform=transform)
                  for s in ("train", "val"))
    seed_everything(0)
    model = apply_strategy(create_model("efficientnet_lite0", 2), "head")
    out = tmp_path_factory.mktemp("trained")
    fit(model, train, val, epochs=1, batch_size=16, out_dir=out, progress=False, num_workers=0,
        meta={"task": "binary"})
    return out, model, val


def test_checkpoints_describe_the_model_and_its_preprocessing(trained):
    out, model, val = trained
    for name in ("best.pt", "last.pt"):
        ckpt = load_checkpoint(out / name)
        assert ckpt["format_version"] == FORMAT_VERSION
        assert ckpt["backbone"] == "efficientnet_lite0"
        assert ckpt["classes"] == ["functional", "defective"] and ckpt["num_classes"] == 2
        assert ckpt["strategy"] == {"name": "head"}
        assert ckpt["preprocessing"] == {"image_size": 64, "crop_pct": 1.0, "mean": [0.5, 0.5, 0.5],
                                         "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "square_pad": True}
        assert ckpt["epoch"] == 1 and ckpt["metric"] == "accuracy" and ckpt["meta"]["task"] == "binary"
    last = load_checkpoint(out / "last.pt")
    assert {"config", "optimizer", "scheduler", "scaler", "history", "best_score", "bad_epochs"} <= set(last)
    rebuilt, _ = model_from_checkpoint(out / "best.pt")
    x = torch.stack([val[i][0] for i in range(3)])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model.eval()(x))
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))  # no temp files left behind


def test_loading_into_a_different_model_names_the_field(trained):
    out, _, _ = trained
    ckpt = load_checkpoint(out / "best.pt")
    expected = r"backbone is 'efficientnet_lite0' in the checkpoint but 'efficientnet_lite1'"
    with pytest.raises(ValueError, match=expected):
        load_weights(create_model("efficientnet_lite1", 2, pretrained=False), ckpt)
    with pytest.raises(ValueError, match=r"num_classes is 2 in the checkpoint but 3"):
        load_weights(create_model("efficientnet_lite0", 3, pretrained=False), out / "best.pt")
    truncated = apply_strategy(create_model("efficientnet_lite0", 2, pretrained=False), "truncate", n=1)
    with pytest.raises(ValueError, match=r"strategy is \{'name': 'head'\} in the checkpoint"):
        load_weights(truncated, ckpt)
    # The same backbone, classes and architecture loads (freezing differently is allowed).
    same = apply_strategy(create_model("efficientnet_lite0", 2, pretrained=False), "full")
    load_weights(same, ckpt)
    torch.testing.assert_close(same.classifier[1].weight, ckpt["model"]["groups.classifier.1.weight"])


def test_wrong_format_version_and_foreign_files_are_refused(trained, tmp_path):
    out, _, _ = trained
    ckpt = load_checkpoint(out / "best.pt")
    atomic_save({**ckpt, "format_version": FORMAT_VERSION + 1}, tmp_path / "future.pt")
    with pytest.raises(ValueError, match=rf"future\.pt: checkpoint format {FORMAT_VERSION + 1}"):
        load_checkpoint(tmp_path / "future.pt")
    torch.save(ckpt["model"], tmp_path / "plain_state_dict.pt")
    with pytest.raises(ValueError, match=r"plain_state_dict\.pt is not a workbook checkpoint"):
        load_checkpoint(tmp_path / "plain_state_dict.pt")
    data = (out / "best.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.pt is damaged or not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.pt is damaged"):
        load_checkpoint(tmp_path / "empty.pt")
    # Not a pickle at all (a JSON file): not "contains Python objects", which would wrongly suggest a risk
    (tmp_path / "settings.json").write_text('{"lr": 0.001}')
    with pytest.raises(ValueError, match=r"settings\.json is damaged or not a PyTorch checkpoint \(Unsupported "):
        load_checkpoint(tmp_path / "settings.json")
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_format_1_checkpoint_is_upgraded_or_refused_naming_the_file_and_the_missing_field(tmp_path):
    old = {"format_version": 1, "image_size": 64,
           "preprocessing": {"crop_pct": 1.0, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                             "interpolation": "bilinear"}}
    atomic_save(old, tmp_path / "v1.pt")
    upgraded = load_checkpoint(tmp_path / "v1.pt")
    assert upgraded["format_version"] == FORMAT_VERSION and "image_size" not in upgraded
    assert upgraded["preprocessing"]["image_size"] == 64 and upgraded["preprocessing"]["interpolation"] == "bilinear"
    no_crop = {**old, "preprocessing": {k: v for k, v in old["preprocessing"].items() if k != "crop_pct"}}
    atomic_save(no_crop, tmp_path / "no_crop.pt")
    with pytest.raises(ValueError, match=r"no_crop\.pt: format 1 checkpoint's preprocessing lacks \['crop_pct'\]"):
        load_checkpoint(tmp_path / "no_crop.pt")
    atomic_save({k: v for k, v in old.items() if k != "image_size"}, tmp_path / "no_size.pt")
    with pytest.raises(ValueError, match=r"no_size\.pt: format 1 checkpoint lacks \['image_size'\]"):
        load_checkpoint(tmp_path / "no_size.pt")


class _Payload:
    """Runs a shell command when unpickled, as a booby-trapped checkpoint would."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"format_version": FORMAT_VERSION, "backbone": "efficientnet_lite0", "payload": _Payload(marker)},
               tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"refusing to load .*evil\.pt.*weights_only"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refusing"):
        model_from_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    # The trap is real: an unsafe load would have run it.
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_non_plain_meta_is_refused_before_training(trained):
    # A numpy number or a Path would be saved fine and then make every checkpoint unloadable.
    import numpy as np

    out, model, val = trained
    for meta, culprit in (({"threshold": np.float64(0.5)}, r"meta\['threshold'\] is a float64"),
                          ({"paths": [out]}, r"meta\['paths'\]\[0\] is a \w*Path")):
        with pytest.raises(TypeError, match=culprit):
            fit(model, val, val, epochs=1, meta=meta, progress=False, num_workers=0)


def test_a_failed_save_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"format_version": FORMAT_VERSION, "epoch": 1}, path)

    def save_half_then_crash(obj, handle):
        handle.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"format_version": FORMAT_VERSION, "epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # the temporary file is cleaned up


_STALLED_SAVE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from helpers.checkpoint import FORMAT_VERSION, atomic_save

    path, marker = Path(sys.argv[1]), Path(sys.argv[2])
    atomic_save({"format_version": FORMAT_VERSION, "epoch": 1, "model": {"w": torch.zeros(1000)}}, path)
    real_save = torch.save

    class Stall:  # passes bytes through, then stops for good half-way: the moment of the kill
        def __init__(self, handle):
            self.handle, self.written = handle, 0
        def write(self, data):
            self.handle.write(data)
            self.written += len(data)
            if self.written > 1_500_000:
                self.handle.flush()
                marker.touch()
                time.sleep(600)
            return len(data)
        def flush(self):
            self.handle.flush()

    torch.save = lambda obj, handle: real_save(obj, Stall(handle))
    new = {f"w{i}": torch.ones(250_000) for i in range(8)}  # 8 MB, written tensor by tensor
    atomic_save({"format_version": FORMAT_VERSION, "epoch": 2, "model": new}, path)
""")


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    path, marker = tmp_path / "last.pt", tmp_path / "stalled"
    child = subprocess.Popen([sys.executable, "-c", _STALLED_SAVE, str(path), str(marker)])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, "the saving process ended before stalling"
            assert time.monotonic() < deadline, "the saving process never reached the middle of the save"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    ckpt = load_checkpoint(path)  # the old, complete checkpoint
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["model"]["w"], torch.zeros(1000))
    # The half-written new one exists only as a temporary file, which is unreadable: writing it
    # straight to last.pt would have destroyed the only good checkpoint.
    (partial,) = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert 1_500_000 < partial.stat().st_size < 7_000_000
    with pytest.raises(ValueError, match="damaged"):
        load_checkpoint(partial)
