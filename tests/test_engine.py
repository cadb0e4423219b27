"""The training engine: TrainConfig, the loop's parts, one preprocessing spec, the feature cache,
and the fixes found in review (each of these tests failed on the engine before the refactor)."""

import dataclasses
import subprocess
import sys

import pytest
import torch
from torch.utils.data import TensorDataset

from helpers import cache, runtime
from helpers.checkpoint import load_checkpoint
from helpers.data import ELPV_TASKS, ImageDataset
from helpers.freezing import apply_strategy, trainable_groups, unfreeze_last
from helpers.models import TransferModel, _timm_grouper, create_model
from helpers.runtime import seed_everything
from helpers.training import TrainConfig, evaluate, fit, make_scheduler, train_one_epoch
from helpers.transforms import Preprocessing, eval_transform, train_transform

CPU = torch.device("cpu")


def fresh(strategy="head", **options):
    seed_everything(0)
    return apply_strategy(create_model("efficientnet_lite0", 2), strategy, **options)


# ----------------------------------------------------------------------------------------
# TrainConfig and resume


# A changed value for every field: a new field must be added here, so resume is checked for it too.
CHANGED = {"epochs": 2, "lr": 2e-3, "batch_size": 8, "optimizer": "sgd", "weight_decay": 0.0, "schedule": "constant",
           "warmup_epochs": 0.5, "label_smoothing": 0.1, "class_weights": "balanced", "metric": "macro_f1",
           "patience": 3, "seed": 1, "amp": False, "channels_last": False, "cache": "auto", "cache_views": 2,
           "layer_decay": 0.8, "unfreeze_schedule": {1: 2}, "max_grad_norm": 1.0, "ema_decay": 0.9,
           "num_workers": 1, "freeze_batchnorm": True, "sync_batchnorm": True}
BASE = dict(epochs=1, lr=1e-3, cache=False, num_workers=0)


def test_every_field_has_a_changed_value_in_this_test():
    assert set(CHANGED) == {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.fixture(scope="module")
def finished_run(tiny_sets_module, tmp_path_factory):
    train, val = tiny_sets_module
    out = tmp_path_factory.mktemp("run")
    fit(fresh(), train, val, out_dir=out, progress=False, **BASE)
    return out


@pytest.fixture(scope="module")
def tiny_sets_module(tiny_root, tiny_splits):
    transform = eval_transform(create_model("efficientnet_lite0", 2, pretrained=False), 64, crop_pct=1.0)
    return tuple(ImageDataset(tiny_root, tiny_splits[s], group_col="group", classes=ELPV_TASKS["binary"][1],
                              transform=transform) for s in ("train", "val"))


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_resume_compares_every_training_setting(finished_run, tiny_sets_module, field):
    train, val = tiny_sets_module
    before = (finished_run / "last.pt").read_bytes()
    settings = {**BASE, field: CHANGED[field]}
    with pytest.raises(ValueError, match=rf"training settings differ: {field} is .* there but .* now"):
        fit(fresh(), train, val, out_dir=finished_run, resume=True, progress=False, **settings)
    assert (finished_run / "last.pt").read_bytes() == before


def test_config_is_saved_whole(finished_run):
    saved = load_checkpoint(finished_run / "last.pt")["config"]
    assert saved == dataclasses.asdict(TrainConfig(**BASE))


@pytest.mark.parametrize("bad, message", [
    ({"lr": float("nan")}, "lr must be"), ({"lr": float("inf")}, "lr must be"), ({"warmup_epochs": -1}, "warmup"),
    ({"class_weights": "inverse"}, "class_weights"), ({"unfreeze_schedule": {0: 2}}, "unfreeze_schedule"),
    ({"num_workers": -1}, "num_workers"), ({"schedule": "step"}, "unknown schedule"),
])
def test_config_checks_each_setting_where_it_is_made(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**bad)


def test_schedules_round_trip_through_state_dict():
    def lrs(scheduler, optimizer, steps):
        out = []
        for _ in range(steps):
            optimizer.step()
            scheduler.step()
            out.append(optimizer.param_groups[0]["lr"])
        return out

    config = TrainConfig(epochs=4, warmup_epochs=1.0)
    params = [torch.nn.Parameter(torch.zeros(1))]
    first = torch.optim.SGD(params, lr=1.0)
    reference = make_scheduler(first, config, steps_per_epoch=5)
    full = lrs(reference, first, 20)
    assert full[4] == pytest.approx(1.0) and full[-1] == pytest.approx(0.0, abs=1e-12)  # warm-up, then cosine to 0
    second = torch.optim.SGD(params, lr=1.0)
    interrupted = make_scheduler(second, config, 5)
    head = lrs(interrupted, second, 7)
    third = torch.optim.SGD(params, lr=1.0)
    resumed = make_scheduler(third, config, 5)
    third.load_state_dict(second.state_dict())
    resumed.load_state_dict(interrupted.state_dict())
    assert head + lrs(resumed, third, 13) == pytest.approx(full)


# ----------------------------------------------------------------------------------------
# The loop a learner writes


def test_train_one_epoch_and_evaluate_are_the_loop_fit_runs(tiny_sets):
    train, val = tiny_sets
    loader = runtime.make_loader(train, 16, True, CPU, seed=3, num_workers=0)
    val_loader = runtime.make_loader(val, 32, False, CPU, num_workers=0)
    by_hand = fresh()
    optimizer = torch.optim.AdamW([p for p in by_hand.parameters() if p.requires_grad], lr=1e-3)
    seed_everything(3)
    stats = train_one_epoch(by_hand, loader, optimizer, torch.nn.CrossEntropyLoss(), CPU)
    result = evaluate(by_hand, val_loader, torch.nn.CrossEntropyLoss(), CPU)
    assert 0 <= stats["accuracy"] <= 1 and stats["loss"] > 0
    assert result["targets"].tolist() == val.targets and len(result["predictions"]) == len(val)


def test_a_progress_bar_does_not_change_the_shuffled_order():
    # tqdm.auto, handed a DataLoader, creates a second iterator that draws from the loader's generator.
    data = TensorDataset(torch.arange(40), torch.arange(40))
    orders = [[b[0].tolist() for b in runtime.with_progress(runtime.make_loader(data, 16, True, CPU, seed=0,
                                                                                num_workers=0), "x", shown)]
              for shown in (False, True)]
    assert orders[0] == orders[1]
    assert orders[0] == [b[0].tolist() for b in runtime.make_loader(data, 16, True, CPU, seed=0, num_workers=0)]


# ----------------------------------------------------------------------------------------
# One preprocessing spec


def test_checkpoint_preprocessing_gives_predict_the_tensors_evaluation_saw(tiny_root, tiny_splits, tmp_path):
    """fit with no extra arguments; predict must prepare each image exactly as validation did."""
    from helpers.predict import FolderImages, load_model

    model = fresh()
    transform = eval_transform(model, 48)  # the backbone's own crop (0.875), not 1.0
    classes = ELPV_TASKS["binary"][1]
    train, val = (ImageDataset(tiny_root, tiny_splits[s], classes=classes, transform=transform)
                  for s in ("train", "val"))
    fit(model, train, val, epochs=1, out_dir=tmp_path, progress=False, num_workers=0)
    served, meta = load_model(tmp_path / "best.pt")
    assert Preprocessing.from_dict(meta["preprocessing"]) == transform.preprocessing
    files = [tiny_root / f for f in val.files[:4]]
    unit = torch.stack([FolderImages(files, meta)[i][0] for i in range(4)])
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (model.spec.mean, model.spec.std))
    torch.testing.assert_close((unit - mean) / std, torch.stack([val[i][0] for i in range(4)]), atol=1e-6, rtol=0)


def test_fit_refuses_preprocessing_in_meta_and_unknown_transforms(tiny_sets, tmp_path):
    train, val = tiny_sets
    with pytest.raises(ValueError, match=r"meta holds preprocessing settings \['crop_pct'\]"):
        fit(fresh(), train, val, epochs=1, meta={"crop_pct": 1.0}, progress=False, num_workers=0)
    images = torch.stack([val[i][0] for i in range(len(val))])
    bare = TensorDataset(images, torch.tensor(val.targets))
    with pytest.raises(ValueError, match="cannot tell from the validation set"):
        fit(fresh(), train, bare, epochs=1, out_dir=tmp_path, progress=False, num_workers=0)


def test_preprocessing_round_trips_and_checks_its_values():
    prep = Preprocessing(224, 0.875, (0.5, 0.5, 0.5), [0.5, 0.5, 0.5], "bilinear")
    assert Preprocessing.from_dict(prep.to_dict()) == prep and prep.resize_size == 256
    with pytest.raises(ValueError, match="crop_pct"):
        Preprocessing(224, 1.5, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="image_size"):
        Preprocessing(100000, 1.0, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="missing"):
        Preprocessing.from_dict({"image_size": 64})


# ----------------------------------------------------------------------------------------
# The frozen-prefix cache


def test_each_augmented_view_has_its_own_seed_also_in_workers(tiny_root, tiny_splits):
    model = fresh("last_n", n=1).eval()
    augmented = ImageDataset(tiny_root, tiny_splits["val"], classes=ELPV_TASKS["binary"][1],
                             transform=train_transform(model, 48, augment="cells"))
    prefix = 2

    def view(seed):
        return cache.extract_features(model, augmented, prefix, CPU, batch_size=4, num_workers=2, progress=False,
                                      seed=seed)[0]

    first, again, other = view(777), view(777), view(778)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert not torch.allclose(first, other)



def test_a_cached_view_is_seeded_without_resetting_the_callers_random_stream(tiny_root, tiny_splits):
    import random

    import numpy as np

    model = fresh("last_n", n=1).eval()
    augmented = ImageDataset(tiny_root, tiny_splits["val"], classes=ELPV_TASKS["binary"][1],
                             transform=train_transform(model, 48, augment="cells"))

    def view():  # in this process: the augmentation draws from the global generators the helper seeds
        return cache.extract_features(model, augmented, 2, CPU, batch_size=4, num_workers=0, progress=False,
                                      seed=5)[0]

    seed_everything(123)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    seed_everything(123)
    first = view()
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected  # as if the view had not been drawn
    seed_everything(0)
    torch.testing.assert_close(view(), first, atol=0, rtol=0)  # the view follows its seed, not the caller's

def test_cache_honours_precision_and_treats_unknown_transforms_as_random(tiny_sets):
    train, val = tiny_sets
    model = fresh().eval()
    plain = cache.extract_features(model, val, 3, CPU, num_workers=0, progress=False)[0]
    with torch.no_grad():
        direct = model.forward_groups(torch.stack([val[i][0] for i in range(len(val))]), 0, 3)
    torch.testing.assert_close(plain, direct, atol=1e-5, rtol=1e-4)  # fp32 when no dtype is given
    lower = cache.extract_features(model, val, 3, CPU, num_workers=0, progress=False, dtype=torch.bfloat16)[0]
    assert not torch.equal(lower, plain)
    images = torch.stack([train[i][0] for i in range(len(train))])
    bare = TensorDataset(images, torch.tensor(train.targets))
    assert cache.plan(model, bare, "auto", 1, {}) == (0, 0)  # a transform it cannot inspect: not cached
    assert cache.plan(model, train, "auto", 1, {})[0] == len(model.group_names) - 1


def test_cache_refuses_what_would_not_fit_in_memory(tiny_sets, monkeypatch):
    train, val = tiny_sets
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda: 100_000)
    with pytest.raises(MemoryError, match=r"feature cache would need .* smaller image_size, fewer cache_views"):
        fit(fresh("last_n", n=1), train, val, epochs=1, progress=False, num_workers=0)


# ----------------------------------------------------------------------------------------
# Fixes found in review


def test_freeze_batchnorm_keeps_trainable_batchnorm_statistics_but_trains_their_weights(tiny_sets):
    train, val = tiny_sets
    model = fresh("last_n", n=1)
    bn = model.groups["head"][1]  # conv_head's BatchNorm: trainable under last_n n=1
    stats, weight = bn.running_mean.clone(), bn.weight.detach().clone()
    fit(model, train, val, epochs=1, lr=1e-2, cache=False, freeze_batchnorm=True, progress=False, num_workers=0)
    assert torch.equal(bn.running_mean, stats) and not torch.equal(bn.weight, weight)
    assert not model.freeze_batchnorm  # the setting belongs to the run, not to the model
    fit(model, train, val, epochs=1, lr=1e-2, cache=False, progress=False, num_workers=0)
    assert not torch.equal(bn.running_mean, stats)  # by default trainable BatchNorm layers update


def test_gradual_unfreezing_adds_groups():
    model = apply_strategy(create_model("efficientnet_lite0", 2, pretrained=False), "initial", n=2)
    assert trainable_groups(model) == ["stem", "stage1", "classifier"]
    unfreeze_last(model, 2)
    assert trainable_groups(model) == ["stem", "stage1", "head", "classifier"]


def test_a_thousand_classes_get_a_fresh_head_and_none_keeps_imagenets():
    imagenet = create_model("efficientnet_lite0", None)
    fresh_head = create_model("efficientnet_lite0", 1000)
    assert imagenet.imagenet_classifier and not fresh_head.imagenet_classifier
    assert fresh_head.num_classes == imagenet.num_classes == 1000
    assert not torch.equal(imagenet.classifier.weight, fresh_head.classifier[1].weight)


TIMM_FAMILIES = [("tf_efficientnet_lite0", {}), ("efficientnet_b0", {}), ("resnet18", {}), ("resnet50d", {}),
                 ("convnext_atto", {}), ("convnext_atto", {"head_hidden_size": 32}),
                 ("convnext_atto", {"head_norm_first": True})]


@pytest.mark.parametrize("arch, kwargs", TIMM_FAMILIES)
def test_grouped_forward_equals_timms_own(arch, kwargs):
    import timm

    torch.manual_seed(0)
    base = timm.create_model(arch, pretrained=False, **kwargs).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = base(x)
        grouped = TransferModel(_timm_grouper(base)(base), create_model("efficientnet_lite0", None,
                                                                           pretrained=False).spec, "random").eval()
        torch.testing.assert_close(grouped(x), expected)


def test_timm_offline_uses_the_cache_through_the_api_and_sets_no_global_switch(tmp_path, monkeypatch):
    import os

    import timm
    from safetensors.torch import save_file

    from helpers import models

    monkeypatch.setattr(models, "_host_reachable", lambda host, timeout=3.0: False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(RuntimeError, match="huggingface.co is unreachable"):
        create_model("timm/resnet18.a1_in1k", 2)
    # Put weights into the cache the way the hub client lays them out; then they load offline.
    torch.manual_seed(1)
    weights = timm.create_model("resnet18", pretrained=False).state_dict()
    snapshot = tmp_path / "hub" / "models--timm--resnet18.a1_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file(weights, str(snapshot / "model.safetensors"))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    model = create_model("timm/resnet18.a1_in1k", None)
    torch.testing.assert_close(model.groups["stage1"][0].conv1.weight, weights["layer1.0.conv1.weight"])
    assert "HF_HUB_OFFLINE" not in os.environ


def test_exported_program_is_moved_with_the_supported_pass(tmp_path, monkeypatch):
    import torch.export.passes as passes

    from helpers.export import export_model, load_exported
    from helpers.transforms import resolve_preprocessing

    model = fresh().eval()
    path = export_model(model, {"classes": ["a", "b"], "preprocessing": resolve_preprocessing(model, 32)},
                        tmp_path / "m.pt2")
    moved = []
    original = passes.move_to_device_pass
    monkeypatch.setattr(passes, "move_to_device_pass", lambda ep, loc: moved.append(loc) or original(ep, loc))
    module, _ = load_exported(path, "cpu")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(module(x), model((x - 0.5) / 0.5).softmax(1), atol=1e-5, rtol=0)
    assert moved == [torch.device("cpu")]


# ----------------------------------------------------------------------------------------
# Tidy: no import-time side effects, predict without the training loop


def test_importing_helpers_changes_nothing_and_predict_needs_no_training_module():
    code = ("import sys, cv2; before = cv2.getNumThreads(); import helpers, helpers.data, helpers.predict; "
            "assert cv2.getNumThreads() == before, 'import changed OpenCV threads'; "
            "assert 'helpers.training' not in sys.modules, 'helpers.predict imported the training loop'; "
            "from helpers.runtime import tune_cpu; changed = tune_cpu(); "
            "assert cv2.getNumThreads() != before or before == 1; print(changed)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "opencv_threads" in result.stdout


def test_one_write_json_converts_numpy_and_refuses_nan(tmp_path):
    import numpy as np

    from helpers.files import write_json

    path = write_json(tmp_path / "a.json", {"x": np.float32(0.5), "n": np.int64(2), "t": torch.tensor([1, 2])})
    assert path.read_text().split() == ["{", '"x":', "0.5,", '"n":', "2,", '"t":', "[", "1,", "2", "]", "}"]
    with pytest.raises(ValueError, match="b.json"):
        write_json(tmp_path / "b.json", {"x": float("nan")})
