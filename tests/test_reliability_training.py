"""Training that survives: exact resume after SIGKILL, NaN and out-of-memory handled, inputs validated."""

import math
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest
import torch

from helpers.checkpoint import load_checkpoint
from helpers.data import ELPV_TASKS, ImageDataset, save_splits
from helpers.transforms import eval_transform
from helpers.freezing import STRATEGIES, apply_strategy
from helpers.models import BACKBONES, create_model
from helpers.training import NonFiniteLossError, fit
from helpers.runtime import seed_everything

COMPARE = ["epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy"]
LITE0 = BACKBONES["efficientnet_lite0"]


def small_splits(splits):
    """16 training images (8 per class) and the 8 validation images: enough to test, quick to train."""
    return {"train": splits["train"].groupby("label").head(8).reset_index(drop=True), "val": splits["val"],
            "test": splits["test"]}


def make_sets(root, splits, classes=None, size=64):
    transform = eval_transform(LITE0, image_size=size, crop_pct=1.0)
    classes = classes or ELPV_TASKS["binary"][1]
    splits = small_splits(splits)
    return tuple(ImageDataset(root, splits[s], group_col="group", classes=classes, transform=transform)
                 for s in ("train", "val"))


def fresh_model(strategy="head", name="efficientnet_lite0", **options):
    seed_everything(0)  # the new classifier's initial weights
    return apply_strategy(create_model(name, 2, pretrained=name == "efficientnet_lite0"), strategy, **options)


# ----------------------------------------------------------------------------------------
# SIGKILL in the middle of an epoch, then resume

# The child trains like a learner's notebook would. Its training set hangs half-way through
# epoch 2 (after 2 of 4 optimizer steps) and touches a marker: the kill lands mid-epoch, with
# partly updated weights in memory that must not leak into the resumed run.
_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from helpers.data import ELPV_TASKS, ImageDataset, load_splits
    from helpers.transforms import eval_transform
    from helpers.freezing import apply_strategy
    from helpers.models import BACKBONES, create_model
    from helpers.training import fit
    from helpers.runtime import seed_everything

    root, splits_dir, out, marker, threads = sys.argv[1:6]
    torch.set_num_threads(int(threads))
    splits = load_splits(splits_dir)
    transform = eval_transform(BACKBONES["efficientnet_lite0"], image_size=64, crop_pct=1.0)
    train, val = (ImageDataset(root, splits[s], group_col="group", classes=ELPV_TASKS["binary"][1],
                               transform=transform) for s in ("train", "val"))
    assert len(train) == 16

    class HangInEpoch2(torch.utils.data.Dataset):
        def __init__(self, dataset):
            self.dataset, self.classes, self.calls = dataset, dataset.classes, 0
        def __len__(self):
            return len(self.dataset)
        def __getitem__(self, index):
            self.calls += 1  # fit reads item 0 once, then every item once per epoch
            if self.calls > 1 + len(self) + len(self) // 2:
                Path(marker).touch()
                time.sleep(600)
            return self.dataset[index]

    seed_everything(0)
    model = apply_strategy(create_model("efficientnet_lite0", 2), "last_n", n=1)
    fit(model, HangInEpoch2(train), val, out_dir=out, resume=True, **eval(sys.argv[6]))
""")


def test_resume_after_sigkill_mid_epoch_equals_an_uninterrupted_run(tiny_root, tiny_splits, tmp_path):
    settings = dict(epochs=3, lr=2e-3, batch_size=4, seed=7, cache=False, num_workers=0, progress=False)
    save_splits(small_splits(tiny_splits), tmp_path / "splits")
    run, marker = tmp_path / "run", tmp_path / "in_epoch_2"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tiny_root), str(tmp_path / "splits"), str(run),
                              str(marker), str(torch.get_num_threads()), repr(settings)])
    try:
        # The uninterrupted reference runs meanwhile.
        train, val = make_sets(tiny_root, tiny_splits)
        full_model = fresh_model("last_n", n=1)
        full = fit(full_model, train, val, out_dir=tmp_path / "full", **settings)

        deadline = time.monotonic() + 300
        while not marker.exists():
            assert child.poll() is None, f"training ended (exit code {child.returncode}) before the kill"
            assert time.monotonic() < deadline, "training never reached epoch 2"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    # Killed mid-run: only epoch 1 is on disk.
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert len(pd.read_csv(run / "history.csv")) == 1 < settings["epochs"]

    resumed_model = fresh_model("last_n", n=1)
    resumed = fit(resumed_model, train, val, out_dir=run, resume=True, **settings)

    assert len(full) == 3
    pd.testing.assert_frame_equal(full[COMPARE], resumed[COMPARE])
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)  # the best epoch's weights, restored at the end
    last_full, last_resumed = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(run / "last.pt")
    assert last_full["epoch"] == last_resumed["epoch"] == 3
    for name, a in last_full["model"].items():
        torch.testing.assert_close(a, last_resumed["model"][name], msg=name)


# ----------------------------------------------------------------------------------------
# NaN / inf and out of memory


def _break_classifier(model, phase, after_calls):
    """Make the classifier output NaN from its ``after_calls + 1``-th call in ``phase`` on."""
    calls = {"train": 0, "eval": 0}

    def hook(module, inputs, output):
        key = "train" if module.training else "eval"
        calls[key] += 1
        if key == phase and calls[key] > after_calls:
            return output * math.nan
        return output

    return model.classifier.register_forward_hook(hook)


@pytest.mark.parametrize("phase", ["train", "eval"])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_root, tiny_splits, tmp_path, phase):
    train, val = make_sets(tiny_root, tiny_splits)
    batch_size = 16
    model = fresh_model("head")
    # Epoch 1 runs clean; epoch 2 breaks in training (loss) or in validation (as blown-up weights would).
    steps = math.ceil(len(train) / batch_size) if phase == "train" else 1
    _break_classifier(model, phase, after_calls=steps)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan in epoch 2.*last good checkpoint is unchanged"):
        fit(model, train, val, epochs=3, batch_size=batch_size, out_dir=tmp_path, progress=False, num_workers=0)
    for name in ("best.pt", "last.pt"):
        ckpt = load_checkpoint(tmp_path / name)
        assert ckpt["epoch"] == 1
        assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert pd.read_csv(tmp_path / "history.csv")["epoch"].tolist() == [1]


@pytest.mark.parametrize("cache", [True, False])
def test_out_of_memory_suggests_a_smaller_batch_or_image(tiny_root, tiny_splits, cache):
    train, val = make_sets(tiny_root, tiny_splits)
    model = fresh_model("head")

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model.forward_groups = out_of_memory  # cached: fails while caching features; uncached: in training
    with pytest.raises(RuntimeError, match=r"ran out of memory at batch_size=32 and image size 64: try a smaller "
                                           r"batch_size \(e\.g\. 16\) or image_size") as caught:
        fit(model, train, val, epochs=1, batch_size=32, cache=cache, progress=False, num_workers=0)
    assert isinstance(caught.value.__cause__, torch.cuda.OutOfMemoryError)


# ----------------------------------------------------------------------------------------
# Parameters of create_model, apply_strategy and fit


def test_create_model_rejects_bad_arguments_and_lists_choices():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet19'; choose one of \[.*'efficientnet_lite0'.*"
                                         r"'resnet18'.*\].*offline"):
        create_model("resnet19", 2)
    with pytest.raises(TypeError, match=r"backbone name must be a string, got None; choose one of"):
        create_model(None, 2)
    with pytest.raises(ValueError, match=r"unknown timm model 'no_such_net_xyz'"):
        create_model("timm/no_such_net_xyz", 2, pretrained=False)
    for bad in (1, 0, -3, 2.5, True, "2"):
        with pytest.raises(ValueError, match=rf"num_classes must be an integer >= 2, got {bad!r}"):
            create_model("efficientnet_lite0", bad, pretrained=False)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout must be in"):
            create_model("efficientnet_lite0", 2, pretrained=False, dropout=bad)


def test_apply_strategy_rejects_bad_arguments_and_lists_choices():
    model = create_model("efficientnet_lite0", 2, pretrained=False)
    with pytest.raises(ValueError, match=rf"unknown strategy 'freeze'; choose one of {list(STRATEGIES)}"
                       .replace("[", r"\[").replace("]", r"\]")):
        apply_strategy(model, "freeze")
    groups_before_classifier = len(model.group_names) - 1
    for strategy in ("last_n", "initial"):
        for bad in (0, groups_before_classifier + 1):
            with pytest.raises(ValueError, match=rf"{strategy} needs 1 <= n <= {groups_before_classifier}"):
                apply_strategy(model, strategy, n=bad)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=rf"n must be a non-negative integer, got {bad!r}"):
            apply_strategy(model, "last_n", n=bad)
    with pytest.raises(ValueError, match=r"cannot truncate after 'stage99'; choose one of \['stem', 'stage1'"):
        apply_strategy(model, "truncate", after="stage99")
    with pytest.raises(ValueError, match=r"after='stage3' only applies to strategy 'truncate', not 'last_n'"):
        apply_strategy(model, "last_n", n=1, after="stage3")
    with pytest.raises(TypeError, match="expected a TransferModel"):
        apply_strategy(torch.nn.Linear(2, 2), "head")
    assert model.strategy == {"name": "full"}  # nothing was half-applied


def test_fit_rejects_bad_arguments_before_any_work(tiny_root, tiny_splits):
    train, val = make_sets(tiny_root, tiny_splits)
    model = fresh_model("head")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [
        (dict(epochs=0), r"epochs must be a positive integer, got 0"),
        (dict(epochs=-2), r"epochs must be a positive integer, got -2"),
        (dict(epochs=2.5), r"epochs must be a positive integer, got 2\.5"),
        (dict(epochs=True), r"epochs must be a positive integer, got True"),
        (dict(lr=0), r"lr must be a positive number below 10, got 0"),
        (dict(lr=-1e-3), r"lr must be a positive number below 10, got -0\.001"),
        (dict(lr=math.nan), r"lr must be a positive number below 10, got nan"),
        (dict(lr=50.0), r"lr must be a positive number below 10, got 50\.0"),
        (dict(lr="1e-3"), r"lr must be a positive number below 10, got '1e-3'"),
        (dict(batch_size=0), r"batch_size must be a positive integer, got 0"),
        (dict(metric="f1"), r"unknown metric 'f1'; choose one of \['accuracy', 'balanced_accuracy', 'macro_f1'\]"),
        (dict(optimizer="adam"), r"unknown optimizer 'adam'; choose one of \['adamw', 'sgd'\]"),
        (dict(schedule="step"), r"unknown schedule 'step'; choose one of \['cosine', 'onecycle', 'constant'\]"),
        (dict(cache="yes"), r"unknown cache 'yes'; choose one of \['auto', True, False\]"),
        (dict(device="gpu"), r"unknown device 'gpu'; choose 'cuda', 'mps', 'cpu' or 'auto'"),
        (dict(class_weights=[1.0, 2.0, 3.0]), r"class_weights needs 2 values \(one per class\), got shape \(3,\)"),
        (dict(class_weights="inverse"), r"class_weights must be 'balanced', a tensor or None, got 'inverse'"),
        (dict(class_weights=[1.0, 0.0]), r"class_weights must all be positive and finite, got \[1\.0, 0\.0\]"),
        (dict(class_weights=[1.0, math.nan]), r"class_weights must all be positive and finite, got \[1\.0, nan\]"),
        (dict(resume=True), r"resume=True needs out_dir"),
        (dict(label_smoothing=1.0), r"label_smoothing must be in \[0, 1\), got 1\.0"),
        (dict(patience=0), r"patience must be None or a positive integer, got 0"),
        (dict(cache_views=0), r"cache_views must be a positive integer, got 0"),
        (dict(layer_decay=0.0), r"layer_decay must be in \(0, 1\], got 0\.0"),
        (dict(warmup_epochs=-1), r"warmup_epochs must be >= 0, got -1"),
        (dict(weight_decay=-0.1), r"weight_decay must be >= 0, got -0\.1"),
        (dict(max_grad_norm=0), r"max_grad_norm must be None or > 0, got 0"),
        (dict(unfreeze_schedule={4: 2}), r"unfreeze_schedule entry 4: 2 is invalid; keys are epochs 1\.\.3"),
        (dict(unfreeze_schedule={2: 99}), rf"entry 2: 99 is invalid.*groups 1\.\.{len(model.group_names)}"),
    ]
    for kwargs, message in cases:
        settings = {"epochs": 3, **kwargs}
        with pytest.raises(ValueError, match=message):
            fit(model, train, val, progress=False, num_workers=0, **settings)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' requested but no CUDA GPU is available"):
            fit(model, train, val, epochs=1, device="cuda", progress=False, num_workers=0)
    with pytest.raises(TypeError, match="fit needs a TransferModel"):
        fit(torch.nn.Linear(2, 2), train, val)
    with pytest.raises(ValueError, match=r"empty dataset: 0 training"):
        fit(model, torch.utils.data.TensorDataset(torch.zeros(0, 3, 64, 64), torch.zeros(0)), val)
    for name, value in model.state_dict().items():  # every refusal came before any training
        torch.testing.assert_close(value, before[name], msg=name)


def test_fit_refuses_inconsistent_label_encodings(tiny_root, tiny_splits):
    train, val = make_sets(tiny_root, tiny_splits)
    # The article's bug: the validation set encoded on its own, so "defective" means 0 there and 1 in training.
    val_own = ImageDataset(tiny_root, tiny_splits["val"], transform=val.transform)
    assert val_own.classes == ["defective", "functional"] != train.classes
    with pytest.raises(ValueError, match=r"training set's classes \['functional', 'defective'\] differ from the "
                                         r"validation set's \['defective', 'functional'\].*classes=train_set\.classes"):
        fit(fresh_model("head"), train, val_own, epochs=1, progress=False, num_workers=0)
    three = apply_strategy(create_model("efficientnet_lite0", 3, pretrained=False), "head")
    with pytest.raises(ValueError, match=r"model has 3 outputs but the training set has 2 classes.*num_classes=2"):
        fit(three, train, val, epochs=1, progress=False, num_workers=0)


def test_balanced_class_weights_read_the_labels_through_a_subset(tiny_root, tiny_splits):
    from torch.utils.data import Subset, TensorDataset

    train, val = make_sets(tiny_root, tiny_splits)
    history = fit(fresh_model("head"), Subset(train, list(range(0, len(train), 2))), val, epochs=1,
                  class_weights="balanced", progress=False, num_workers=0)
    assert len(history) == 1
    tensors = TensorDataset(torch.zeros(4, 3, 64, 64), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match=r"class_weights='balanced' counts the training labels, but a TensorDataset"):
        fit(fresh_model("head"), tensors, val, epochs=1, class_weights="balanced", progress=False, num_workers=0)


@pytest.fixture(scope="module")
def one_epoch_run(tiny_root, tiny_splits, tmp_path_factory):
    """A finished 1-epoch run (head strategy, lr 1e-3) whose last.pt the resume tests try to continue.

    Uncached, so that a refused resume fails before any feature is computed."""
    out = tmp_path_factory.mktemp("one_epoch")
    train, val = make_sets(tiny_root, tiny_splits)
    fit(fresh_model("head"), train, val, epochs=1, lr=1e-3, cache=False, out_dir=out, progress=False,
        num_workers=0)
    return out


@pytest.mark.parametrize("change, message", [
    ("backbone", r"backbone is 'efficientnet_lite0' there but 'efficientnet_lite1' now"),
    ("strategy", r"strategy is \{'name': 'head'\} there but \{'name': 'last_n', 'n': 1\} now"),
    ("classes", r"classes is \['functional', 'defective'\] there but \['defective', 'functional'\] now"),
    ("image_size", r"image_size is 64 there but 48 now"),
    ("lr", r"training settings differ: lr is 0\.001 there but 0\.002 now"),
    ("epochs", r"training settings differ: epochs is 1 there but 2 now"),
])
def test_resume_with_different_settings_names_the_field(one_epoch_run, tiny_root, tiny_splits, change, message):
    before = (one_epoch_run / "last.pt").read_bytes()
    classes = ["defective", "functional"] if change == "classes" else None
    train, val = make_sets(tiny_root, tiny_splits, classes=classes, size=48 if change == "image_size" else 64)
    model = fresh_model("last_n", n=1) if change == "strategy" else fresh_model(
        name="efficientnet_lite1" if change == "backbone" else "efficientnet_lite0")
    settings = dict(epochs=2 if change == "epochs" else 1, lr=2e-3 if change == "lr" else 1e-3)
    with pytest.raises(ValueError, match=r"cannot resume from .*last\.pt: " + message):
        fit(model, train, val, out_dir=one_epoch_run, resume=True, cache=False, progress=False, num_workers=0,
            **settings)
    assert (one_epoch_run / "last.pt").read_bytes() == before  # the refused resume changed nothing
