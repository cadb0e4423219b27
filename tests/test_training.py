from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers.checkpoint import load_checkpoint, model_from_checkpoint
from helpers.data import ImageDataset
from helpers.transforms import train_transform
from helpers.freezing import apply_strategy, frozen_prefix_length
from helpers.models import BACKBONES, create_model
from helpers.cache import CachedViewsWarning, extract_features
from helpers.training import fit
from helpers.runtime import pick_device, seed_everything


def fresh_model(strategy="last_n", **options):
    """The same starting weights every call (the new classifier is randomly initialized)."""
    seed_everything(0)
    return apply_strategy(create_model("efficientnet_lite0", 2), strategy, **options)

COMPARE = ["epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy"]


def test_two_epochs_lower_the_training_loss(tiny_sets):
    train, val = tiny_sets
    torch.manual_seed(0)
    model = apply_strategy(create_model("efficientnet_lite0", 2), "last_n", n=2)
    history = fit(model, train, val, epochs=2, lr=3e-3, batch_size=16, warmup_epochs=0, progress=False,
                  num_workers=0)
    assert list(history["epoch"]) == [1, 2]
    assert history["train_loss"].iloc[1] < history["train_loss"].iloc[0]
    assert history[["train_accuracy", "val_accuracy"]].apply(lambda c: c.between(0, 1)).all().all()
    assert history.attrs["device"] == "cpu" and history.attrs["cached"]


def test_cached_prefix_computes_the_same_logits(tiny_sets):
    train, _ = tiny_sets
    model = apply_strategy(create_model("efficientnet_lite0", 2), "last_n", n=2).eval()
    prefix = frozen_prefix_length(model)
    features, targets = extract_features(model, train, prefix, torch.device("cpu"), batch_size=8, num_workers=0,
                                         progress=False)
    images = torch.stack([train[i][0] for i in range(len(train))])
    with torch.no_grad():
        torch.testing.assert_close(model.forward_groups(features, prefix), model(images), rtol=1e-4, atol=1e-4)
    assert targets.tolist() == train.targets


def test_cached_and_uncached_training_give_the_same_history(tiny_sets):
    train, val = tiny_sets
    runs = {}
    for cache in (True, False):
        model = fresh_model(n=2)
        runs[cache] = (fit(model, train, val, epochs=2, batch_size=16, cache=cache, progress=False,
                           num_workers=0), model)
    assert runs[True][0].attrs["cached"] and not runs[False][0].attrs["cached"]
    pd.testing.assert_frame_equal(runs[True][0][COMPARE], runs[False][0][COMPARE], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(runs[True][1].classifier[1].weight, runs[False][1].classifier[1].weight,
                               atol=1e-4, rtol=1e-3)


def test_gradual_unfreezing_caches_only_the_groups_that_stay_frozen_to_the_end(tiny_sets):
    from helpers.cache import plan

    train, _ = tiny_sets
    model = fresh_model("head")  # 10 groups, 9 frozen
    assert plan(model, train, "auto", 1, {}) == (9, 1)
    # Unfreezing the last 2 groups at epoch 1 and the last 4 at epoch 2: the first 6 stay frozen throughout
    assert plan(model, train, "auto", 1, {1: 2, 2: 4}) == (6, 1) == plan(model, train, "auto", 1, {2: 4, 1: 2})
    assert plan(model, train, False, 1, {}) == (0, 0)


def test_random_augmentation_is_not_cached_unless_asked(tiny_root, tiny_splits, tiny_sets):
    _, val = tiny_sets
    augmented = ImageDataset(tiny_root, tiny_splits["train"], classes=val.classes,
                             transform=train_transform(BACKBONES["efficientnet_lite0"], 64, augment="cells"))
    model = apply_strategy(create_model("efficientnet_lite0", 2), "head")
    assert not fit(model, augmented, val, epochs=1, progress=False, num_workers=0).attrs["cached"]
    with pytest.warns(CachedViewsWarning, match="2 augmented view"):
        history = fit(model, augmented, val, epochs=2, cache=True, cache_views=2, progress=False, num_workers=0)
    assert history.attrs["cached"] and history.attrs["cache_views"] == 2


def test_early_stopping_ends_after_patience_epochs_without_improvement(tiny_sets, monkeypatch):
    from helpers import training

    train, val = tiny_sets
    scores = iter([0.5, 0.6, 0.6, 0.55, 0.9, 0.9, 0.9, 0.9])  # epoch 5 would improve: it must never run
    monkeypatch.setattr(training, "_epoch", lambda epoch, *args, **kwargs: {
        "epoch": epoch, "lr": 0.0, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.0,
        "val_accuracy": next(scores), "seconds": 0.0})
    history = fit(fresh_model("head"), train, val, epochs=8, patience=2, cache=False, progress=False, num_workers=0)
    assert list(history["epoch"]) == [1, 2, 3, 4] and history.attrs["stopped_early"]
    assert history.attrs["best_epoch"] == 2  # a tie (0.6 again) is not an improvement


@pytest.mark.parametrize("cache", [False, True])
def test_training_steps_use_mixed_precision_but_validation_is_fp32(tiny_sets, monkeypatch, cache):
    # bf16 flips a few answers; the floor, metrics and export score in fp32, so the epoch fit keeps and the score it
    # quotes must come from fp32 too. CPU bf16 autocast stands in for a GPU's.
    from helpers import cache as feature_cache, training

    train, val = tiny_sets
    seen = {"train": [], "evaluate": [], "cache": []}
    real_train, real_evaluate = training.train_one_epoch, training.evaluate
    real_extract = feature_cache.extract_features
    monkeypatch.setattr(training, "amp_dtype", lambda device: torch.bfloat16)
    monkeypatch.setattr(training, "train_one_epoch", lambda *a, dtype=None, **k: (
        seen["train"].append(dtype), real_train(*a, dtype=dtype, **k))[1])
    monkeypatch.setattr(training, "evaluate", lambda *a, dtype=None, **k: (
        seen["evaluate"].append(dtype), real_evaluate(*a, dtype=dtype, **k))[1])
    monkeypatch.setattr(feature_cache, "extract_features", lambda model, dataset, *a: (
        seen["cache"].append((dataset is val, a[-2])), real_extract(model, dataset, *a))[1])
    history = fit(fresh_model("head"), train, val, epochs=2, ema_decay=0.9, cache=cache, progress=False,
                  num_workers=0)
    assert history.attrs["amp"] == "bfloat16" and seen["train"] == [torch.bfloat16] * 2
    assert seen["evaluate"] == [None] * 4  # the averaged weights and the raw ones, each epoch
    # The cached training view is computed under the training precision, the cached validation set in fp32.
    assert seen["cache"] == ([(False, torch.bfloat16), (True, None)] if cache else [])


@pytest.mark.parametrize("cache", [False, True])
def test_a_last_batch_of_one_image_is_dropped_so_trainable_batchnorm_can_train(tiny_root, tiny_splits, monkeypatch,
                                                                              cache):
    # At 32 px the backbone ends in 1x1 maps: a training-mode BatchNorm refuses a batch of one image there
    # ("Expected more than 1 value per channel"), and at any size it would learn its statistics from one image.
    from helpers import training
    from helpers.data import ELPV_TASKS, ImageDataset
    from helpers.transforms import eval_transform

    transform = eval_transform(BACKBONES["efficientnet_lite0"], image_size=32, crop_pct=1.0)
    classes = ELPV_TASKS["binary"][1]
    train, val = (ImageDataset(tiny_root, tiny_splits[k], group_col="group", classes=classes, transform=transform)
                  for k in ("train", "val"))
    batches, steps = [], []
    real, real_schedule = training.train_one_epoch, training.make_scheduler
    monkeypatch.setattr(training, "train_one_epoch", lambda net, loader, *a, **k: (
        batches.append([len(y) for _, y in loader]), real(net, loader, *a, **k))[1])
    monkeypatch.setattr(training, "make_scheduler", lambda optimizer, config, per_epoch: (
        steps.append(per_epoch), real_schedule(optimizer, config, per_epoch))[1])  # the schedule's steps per epoch
    size = len(train) - 1  # the last batch would hold one image
    history = fit(fresh_model("last_n", n=2), train, val, epochs=2, batch_size=size, cache=cache, progress=False,
                  num_workers=0)
    assert len(history) == 2 and batches == [[size], [size]] and steps == [1]
    full = []  # a batch size that leaves a last batch of two: nothing is dropped
    monkeypatch.setattr(training, "train_one_epoch", lambda net, loader, *a, **k: (
        full.append(sum(len(y) for _, y in loader)), real(net, loader, *a, **k))[1])
    fit(fresh_model("last_n", n=2), train, val, epochs=1, batch_size=len(train) - 2, cache=cache, progress=False,
        num_workers=0)
    assert full == [len(train)] and steps == [1, 2]


def test_resume_re_applies_the_unfreezing_of_every_finished_epoch(tiny_sets, tmp_path):
    from helpers.freezing import trainable_groups

    train, val = tiny_sets
    settings = dict(epochs=3, lr=2e-3, batch_size=16, seed=7, progress=False, num_workers=0, cache=False,
                    unfreeze_schedule={2: 4})  # head + classifier, then also stage6 and stage7 from epoch 2
    full_model = fresh_model(n=1)
    fit(full_model, train, val, out_dir=tmp_path / "full", **settings)
    _train_epochs_then_stop(fresh_model(n=1), train, val, tmp_path / "split", stop_after=2, **settings)
    resumed_model = fresh_model(n=1)
    fit(resumed_model, train, val, out_dir=tmp_path / "split", resume=True, **settings)
    assert trainable_groups(resumed_model) == trainable_groups(full_model)
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_resume_after_interruption_matches_an_uninterrupted_run(tiny_sets, tmp_path, ema_decay):
    train, val = tiny_sets
    settings = dict(epochs=3, lr=2e-3, batch_size=16, seed=7, progress=False, num_workers=0, cache=False,
                    ema_decay=ema_decay)

    full_model = fresh_model(n=1)
    full = fit(full_model, train, val, out_dir=tmp_path / "full", **settings)

    # Interrupt after epoch 2 of the same 3-epoch schedule, then resume in a fresh model.
    interrupted = fresh_model(n=1)
    _train_epochs_then_stop(interrupted, train, val, tmp_path / "split", stop_after=2, **settings)
    resumed_model = fresh_model(n=1)
    resumed = fit(resumed_model, train, val, out_dir=tmp_path / "split", resume=True, **settings)

    pd.testing.assert_frame_equal(full[COMPARE], resumed[COMPARE])
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_ema_weights_are_the_ones_validated_and_saved(tiny_sets, tmp_path):
    from helpers.runtime import make_loader
    from helpers.training import evaluate

    train, val = tiny_sets
    model = fresh_model(n=2)
    history = fit(model, train, val, epochs=2, lr=3e-3, batch_size=16, cache=False, ema_decay=0.9,
                  out_dir=tmp_path, progress=False, num_workers=0)
    assert {"raw_val_loss", "raw_val_accuracy"} <= set(history.columns)
    last, head = load_checkpoint(tmp_path / "last.pt"), "groups.classifier.1.weight"
    # The average differs from the raw weights it follows.
    assert not torch.allclose(last["ema"][head], last["model"][head])
    loader = make_loader(val, 32, False, torch.device("cpu"), num_workers=0)
    for weights, column in ((last["ema"], "val_loss"), (last["model"], "raw_val_loss")):
        probe = fresh_model(n=2)
        probe.load_state_dict(weights)
        loss = evaluate(probe, loader, torch.nn.CrossEntropyLoss(), torch.device("cpu"))["loss"]
        assert loss == pytest.approx(history[column].iloc[-1], rel=1e-4), column
    # best.pt holds averaged weights, and fit hands them back.
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == int(history["val_accuracy"].idxmax()) + 1
    if best["epoch"] == 2:
        torch.testing.assert_close(best["model"][head], last["ema"][head])
    torch.testing.assert_close(model.state_dict()[head], best["model"][head])


@pytest.mark.parametrize("bad", [0.0, 1.0, 1, "0.99"])
def test_bad_ema_decay_is_refused(tiny_sets, bad):
    train, val = tiny_sets
    with pytest.raises(ValueError, match="ema_decay"):
        fit(fresh_model(n=1), train, val, epochs=1, ema_decay=bad, progress=False, num_workers=0)


class _Stop(Exception):
    pass


def _train_epochs_then_stop(model, train, val, out_dir, stop_after, **settings):
    """Run fit and abort it (like a kill) right after epoch ``stop_after`` is checkpointed."""
    import helpers.training as training

    original = training._save

    def save_then_maybe_stop(out, run, epoch, *rest):
        original(out, run, epoch, *rest)
        if epoch == stop_after:
            raise _Stop

    training._save = save_then_maybe_stop
    try:
        with pytest.raises(_Stop):
            fit(model, train, val, out_dir=out_dir, **settings)
    finally:
        training._save = original
    assert load_checkpoint(out_dir / "last.pt")["epoch"] == stop_after


@pytest.mark.parametrize("left", ["stale", "damaged"])
def test_a_kill_between_last_and_best_is_repaired_on_resume(tiny_sets, tmp_path, monkeypatch, left):
    # last.pt is written first: killed before best.pt (or with best.pt cut off), the resumed run rewrites best.pt
    # from last.pt's averaged weights, whether or not a later epoch improves (on a GPU the re-run would not be
    # bit-identical, so nothing else could repair it).
    from helpers import training

    train, val = tiny_sets
    scores = {1: 0.5, 2: 0.6, 3: 0.55}  # epoch 2 improves, epoch 3 does not

    def fake_epoch(epoch, model, net, loader, val_loader, parts, *args, **kwargs):
        with torch.no_grad():  # the raw weights and their average move apart, so a mix-up between them shows
            for raw, average in zip(model.parameters(), parts["ema"].module.parameters(), strict=True):
                raw.add_(0.1 * epoch)
                average.add_(0.01 * epoch)
        return {"epoch": epoch, "lr": 0.0, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.0,
                "val_accuracy": scores[epoch], "seconds": 0.0}

    monkeypatch.setattr(training, "_epoch", fake_epoch)
    real_save = training.atomic_save

    def killed_before_best_of_epoch_2(payload, path):
        if Path(path).name == "best.pt" and payload["epoch"] == 2:
            raise _Stop
        real_save(payload, path)

    monkeypatch.setattr(training, "atomic_save", killed_before_best_of_epoch_2)
    settings = dict(epochs=3, ema_decay=0.9, cache=False, progress=False, num_workers=0)
    with pytest.raises(_Stop):
        fit(fresh_model("head"), train, val, out_dir=tmp_path, **settings)
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2 and load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    if left == "damaged":
        (tmp_path / "best.pt").write_bytes(b"cut off")
    stopped = load_checkpoint(tmp_path / "last.pt")
    monkeypatch.setattr(training, "atomic_save", real_save)
    history = fit(fresh_model("head"), train, val, out_dir=tmp_path, resume=True, **settings)
    best = load_checkpoint(tmp_path / "best.pt")
    assert (best["epoch"], best["score"]) == (2, 0.6) and history.attrs["best_epoch"] == 2
    for name, weights in best["model"].items():  # the averaged weights that epoch 2 validated, not the raw ones
        torch.testing.assert_close(weights, stopped["ema"][name], msg=name)
    assert any(not torch.equal(stopped["ema"][k], stopped["model"][k]) for k in stopped["model"]
               if stopped["model"][k].is_floating_point())


def test_checkpoints_rebuild_the_model(tiny_sets, tmp_path):
    train, val = tiny_sets
    model = apply_strategy(create_model("efficientnet_lite0", 2), "truncate", after="stage3", n=1)
    fit(model, train, val, epochs=1, out_dir=tmp_path, progress=False, num_workers=0)
    rebuilt, ckpt = model_from_checkpoint(tmp_path / "best.pt")
    assert ckpt["classes"] == ["functional", "defective"] and ckpt["preprocessing"]["image_size"] == 64
    assert ckpt["strategy"] == {"name": "truncate", "after": "stage3", "n": 1}
    assert ckpt["preprocessing"]["crop_pct"] == 1.0
    x = torch.stack([val[i][0] for i in range(4)])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model.eval()(x))
    assert (tmp_path / "history.csv").is_file() and (tmp_path / "fit.json").is_file()


def test_device_choice():
    assert pick_device().type in ("cpu", "cuda", "mps")
    assert pick_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="cuda"):
        pick_device("tpu")


def test_evaluate_reports_the_weighted_mean_loss_of_the_whole_set_whatever_the_batches():
    # With class weights, CrossEntropyLoss averages each batch over its images' weights; summing batch means
    # times batch sizes (as before) gave a number that depended on how the images fell into batches.
    from torch.utils.data import DataLoader, TensorDataset

    from helpers.training import evaluate

    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.tensor([0, 0, 0, 1, 1, 0, 0, 1])
    model = torch.nn.Linear(3, 2)
    criterion = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 5.0]), label_smoothing=0.1)
    whole = criterion(model(x), y).item()
    for batch_size in (3, 4, 8):
        result = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=batch_size), criterion,
                          torch.device("cpu"), channels_last=False)
        assert result["loss"] == pytest.approx(whole, rel=1e-6), batch_size
