"""The linear probe, the baselines, the strategy comparison and the floor (the final model never ships
below the probe on validation)."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import selection, workbook
from helpers.checkpoint import load_checkpoint, model_from_checkpoint, save_model
from helpers.freezing import apply_strategy
from helpers.models import create_model
from helpers.probe import fit_probe, install_probe, majority_baseline, pooled_features, probe_linear
from helpers.runtime import seed_everything
from helpers.transforms import resolve_preprocessing


def blobs(n_classes: int, per_class: int = 30, dim: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (n_classes, dim))
    x = np.concatenate([c + rng.normal(0, 1.0, (per_class, dim)) * rng.uniform(0.5, 2, dim) + 5 for c in centres])
    return x, np.repeat(np.arange(n_classes), per_class)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_probe_folds_into_one_linear_layer_with_the_same_probabilities(n_classes):
    x, y = blobs(n_classes)
    probe = fit_probe(x, y, folds=3)
    assert probe.C in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0) and probe.folds == 3 and probe.cv_score > 0.5
    weight, bias = probe_linear(probe, n_classes)
    logits = torch.tensor(x, dtype=torch.float32) @ weight.T + bias
    np.testing.assert_allclose(logits.softmax(1).numpy(), probe.pipeline.predict_proba(x), atol=1e-4)
    assert (logits.argmax(1).numpy() == probe.predict(x)).all()


def test_the_probe_s_regularization_is_the_one_cross_validation_prefers_wherever_it_sits_in_the_grid():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(24, 40)), np.repeat([0, 1], 12)
    x[:, 0] += 1.5 * y  # one informative feature among 40 noisy ones: strong regularization wins
    forward, backward = fit_probe(x, y, folds=3, grid=(0.001, 1.0)), fit_probe(x, y, folds=3, grid=(1.0, 0.001))
    assert forward.C == backward.C == 0.001


def test_a_class_absent_from_training_is_never_predicted():
    x, y = blobs(3)
    keep = y != 1
    probe = fit_probe(x[keep], np.where(y[keep] == 2, 2, 0), folds=3)
    weight, bias = probe_linear(probe, 3)
    logits = torch.tensor(x, dtype=torch.float32) @ weight.T + bias
    assert not (logits.argmax(1) == 1).any()
    # Two classes remain, whose folded logits are -z/2 and +z/2 (one is always >= 0): the absent class needs a
    # probability of about zero, not merely a logit of 0, or it would be predicted wherever z is near 0.
    assert logits.softmax(1)[:, 1].max() < 1e-6


def test_a_probe_judged_on_macro_f1_weighs_rare_classes_and_finds_more_of_them():
    rng = np.random.default_rng(0)
    # 300 common and 30 rare images whose features overlap: accuracy is cheapest bought by ignoring the rare ones
    x = np.concatenate([rng.normal(0, 1, (300, 8)), rng.normal(0.8, 1, (30, 8))])
    y = np.repeat([0, 1], [300, 30])
    by_accuracy, by_macro_f1 = fit_probe(x, y, folds=3), fit_probe(x, y, folds=3, metric="macro_f1")
    assert by_accuracy.metric == "accuracy" and by_macro_f1.metric == "macro_f1"
    assert by_accuracy.pipeline[-1].class_weight is None and by_macro_f1.pipeline[-1].class_weight == "balanced"
    found = lambda probe: (probe.predict(x[y == 1]) == 1).mean()  # noqa: E731  recall of the rare class
    assert found(by_macro_f1) > found(by_accuracy) + 0.3
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        fit_probe(x, y, metric="f1")


def test_probe_without_enough_images_to_cross_validate_uses_a_default():
    x, y = blobs(2, per_class=5)
    y[0] = 2  # a class with a single image
    probe = fit_probe(x, y)
    assert probe.cv_score is None and probe.C == 0.1 and probe.folds == 0
    with pytest.raises(ValueError, match="at least two classes"):
        fit_probe(x[:3], np.zeros(3, dtype=int))


def test_installed_probe_is_the_models_classifier(tiny_sets):
    train, val = tiny_sets
    seed_everything(0)
    model = apply_strategy(create_model("efficientnet_lite0", 2), "head")
    features, targets = pooled_features(model, train, "cpu", num_workers=0)
    probe = fit_probe(features, targets)
    install_probe(model.eval(), probe)
    images = torch.stack([val[i][0] for i in range(len(val))])
    with torch.no_grad():
        by_model = model(images).softmax(1).numpy()
    val_features, _ = pooled_features(model, val, "cpu", num_workers=0)
    np.testing.assert_allclose(by_model, probe.pipeline.predict_proba(val_features), atol=1e-4)
    other = apply_strategy(create_model("efficientnet_lite0", 2), "truncate", n=1)
    with pytest.raises(ValueError, match="fitted on 1280 features"):
        install_probe(other, probe)


def test_majority_baseline_counts_the_training_labels():
    result = majority_baseline(np.array([0, 1, 1, 1]), np.array([1, 0, 0, 1, 1]))
    # Always "1" on [1, 0, 0, 1, 1]: accuracy 3/5; recalls 0 and 1; F1 0 and 2 * 0.6 * 1 / 1.6 = 0.75.
    assert result == {"class_index": 1, "accuracy": 0.6, "balanced_accuracy": 0.5, "macro_f1": 0.375}


# ----------------------------------------------------------------------------------------
# The comparison


def test_protocol_cross_validates_small_validation_splits():
    assert selection.protocol(250)["name"] == "holdout" and selection.protocol(249)["name"] == "k-fold"
    small = selection.protocol(68)
    assert small["name"] == "k-fold" and "68 validation images" in small["why"]


def _files(root, names, content=None):
    """Files of distinct bytes (``content`` maps a name to its bytes, for copies)."""
    for name in names:
        (root / name).write_bytes((content or {}).get(name, name.encode()))


def test_folds_cover_train_and_validation_once_each(tmp_path):
    train = pd.DataFrame({"file": [f"t{i}" for i in range(30)], "label": ["a", "b", "c"] * 10})
    val = pd.DataFrame({"file": [f"v{i}" for i in range(9)], "label": ["a", "b", "c"] * 3})
    _files(tmp_path, list(train["file"]) + list(val["file"]))
    folds = selection.make_folds(train, val, {"name": "k-fold", "folds": 3}, seed=0, root=tmp_path)
    scored = pd.concat([s for _, s in folds])
    assert sorted(scored["file"]) == sorted(train["file"].tolist() + val["file"].tolist())
    for fit_part, score_part in folds:
        assert not set(fit_part["file"]) & set(score_part["file"])
        assert score_part["label"].value_counts().min() >= 3  # stratified
    assert selection.make_folds(train, val, {"name": "holdout", "folds": 1}, 0, root=tmp_path)[0][1] is val


def test_folds_and_the_probes_c_search_keep_the_copies_of_a_picture_together(tmp_path):
    from helpers.data import ImageDataset, fold_units, units_of

    # Six pictures stored three times each (in train and validation alike): a copy in the fit part and one in
    # the score part would reward memory, so every fold must hold each picture's copies on one side.
    train = pd.DataFrame({"file": [f"t{i}.png" for i in range(30)], "label": ["a", "b", "c"] * 10})
    val = pd.DataFrame({"file": [f"v{i}.png" for i in range(9)], "label": ["a", "b", "c"] * 3})
    groups = [[f"t{i}.png", f"t{i + 6}.png", f"v{i}.png"] for i in range(6)]  # i, i + 6: the same label
    content = {name: f"picture {k}".encode() for k, names in enumerate(groups) for name in names}
    _files(tmp_path, list(train["file"]) + list(val["file"]), content)
    assert fold_units(tmp_path, train.iloc[12:]) is None  # no copies left, no subjects: plain folds
    for seed in range(3):
        for fit_part, score_part in selection.make_folds(train, val, {"name": "k-fold", "folds": 3}, seed,
                                                         root=tmp_path):
            for names in groups:
                assert set(names) <= set(fit_part["file"]) or set(names) <= set(score_part["file"]), names
    units = units_of(torch.utils.data.Subset(ImageDataset(tmp_path, pd.concat([train, val])), range(30)))
    assert len(units) == 30 and len(set(units)) == 30 - 6  # t0..t5 share their unit with t6..t11
    assert all(units[i] == units[i + 6] for i in range(6))
    # With subjects, a picture stored under two subjects joins them into one unit
    subjects = train.assign(subject=[f"s{i // 2}" for i in range(30)])
    units = fold_units(tmp_path, subjects)
    assert units[0] == units[1] == units[6] == units[7] and len(set(units)) == 15 - 3  # s0+s3, s1+s4, s2+s5


def test_folds_need_each_class_in_several_units_and_the_wiring_passes_the_units(tmp_path, monkeypatch):
    from helpers import lessons
    from helpers.data import ImageDataset, fold_count, fold_units, require_folds
    from helpers.errors import InputError, MissingColumnError

    labels = ["a"] * 6 + ["b"] * 3
    assert fold_count(labels, None, 5) == 3  # three images of b: three folds at most
    assert fold_count(labels, ["u0", "u1", "u2", "u3", "u4", "u5", "p", "p", "q"], 5) == 2  # b: two units
    assert fold_count(labels, list(range(6)) + ["p"] * 3, 5) == 1  # b is one picture: nothing to cross-validate
    with pytest.raises(InputError, match=r"cannot cross-validate the probe on 9 images: class\(es\) \['b'\]"):
        require_folds(labels, list(range(6)) + ["p"] * 3, 5, "the probe")  # notebook 01's check
    # A probe whose class is one unit falls back to the default C instead of failing folds (cv = nan)
    features, targets = blobs(2, per_class=20)
    groups = np.array([f"u{i}" for i in range(20)] + ["copy"] * 20)
    probe = fit_probe(features, targets, seed=0, groups=groups)
    assert probe.folds == 0 and probe.C == 0.1 and probe.cv_score is None
    # Notebook 01's probe says which class cannot be cross-validated, before loading any model
    names = ["a0.png", "a1.png", "b0.png", "b1.png"]
    _files(tmp_path, names, {"b0.png": b"same", "b1.png": b"same"})
    frame = pd.DataFrame({"file": names, "label": ["a", "a", "b", "b"]})
    with pytest.raises(InputError, match=r"class\(es\) \['b'\] have a single image, or all their images"):
        lessons.linear_probe("efficientnet_lite0", tmp_path, frame, ["a", "b"], 32)
    with pytest.raises(MissingColumnError, match="1 image\\(s\\) have no subject, e.g. 'a1.png'"):
        fold_units(tmp_path, frame.assign(subject=["s", None, "t", "t"]))
    # phase_one hands the probe's C search the training split's units (copies here), not None
    seen = {}

    def fit(*args, groups=None, **kwargs):
        seen["groups"] = groups
        return SimpleNamespace()

    monkeypatch.setattr(selection, "pooled_features", lambda model, data, device: (features[:4], targets[18:22]))
    monkeypatch.setattr(selection, "fit_probe", fit)
    monkeypatch.setattr(selection, "install_probe", lambda model, probe: model)
    selection.phase_one(None, ImageDataset(tmp_path, frame), "cpu", seed=0)
    assert list(seen["groups"]) == ["a0.png", "a1.png", "b0.png", "b0.png"]


def _run(strategy, correct, fold=0, trainable=10):
    return {"strategy": strategy, "score": float(np.mean(correct)), "correct": np.array(correct, dtype=bool),
            "files": list(range(len(correct))), "trainable": trainable, "seconds": 1.0, "fold": fold}


def test_a_strategy_within_the_noise_goes_to_the_cheaper_one():
    rng = np.random.default_rng(0)
    base = rng.random(200) < 0.80
    almost = base.copy()
    almost[np.flatnonzero(base)[:2]] = False  # two fewer right: within the noise
    clearly = base.copy()
    clearly[np.flatnonzero(base)[:40]] = False  # forty fewer: not
    table = selection.summarize([_run("full", base), _run("head", almost), _run("last_n", clearly),
                                 _run("scratch", clearly)], guide_pick="last_n")
    assert list(table["strategy"][:2]) == ["full", "head"] and table.set_index("strategy").loc["last_n", "rank"] == 3
    assert table.set_index("strategy").loc["last_n", "guide_pick"]
    chosen, reason = selection.choose(table)
    assert chosen == "head" and "within the noise" in reason and selection.ties_with_best(table) == ["full", "head"]
    chosen, reason = selection.choose(selection.summarize([_run("full", base), _run("head", clearly)]))
    assert chosen == "full" and "clear of the others" in reason


def test_equal_scores_rank_the_cheaper_strategy_first():
    same = np.r_[np.ones(40), np.zeros(10)].astype(bool)
    table = selection.summarize([_run("last_n", same), _run("head", same), _run("truncate", same),
                                 _run("scratch", same)])
    assert list(table["strategy"]) == ["truncate", "head", "last_n", "scratch"]
    assert (table.set_index("strategy")["se_vs_best"].drop("truncate") == 0).all()  # identical answers
    assert selection.choose(table)[0] == "truncate"


def test_the_control_is_never_chosen():
    best = np.ones(50, dtype=bool)
    worse = np.r_[np.ones(25), np.zeros(25)].astype(bool)
    table = selection.summarize([_run("scratch", best), _run("head", worse)])
    assert table.iloc[0]["strategy"] == "scratch" and selection.choose(table)[0] == "head"


def test_truncate_cuts_at_two_thirds_of_the_depth():
    model = create_model("efficientnet_lite0", 2, pretrained=False)
    assert selection.truncation_point(model) == "stage5"
    built = selection.build_model("efficientnet_lite0", 2, "truncate", pretrained=False)
    assert built.group_names[-3] == "stage5" and built.strategy == {"name": "truncate", "after": "stage5", "n": 1}
    # apply_strategy's default cuts at the same point as the course (it used to cut in the middle, stage4)
    assert apply_strategy(model, "truncate", n=1).strategy["after"] == "stage5"
    scratch = selection.build_model("efficientnet_lite0", 2, "scratch")
    assert scratch.weight_source == "random" and all(p.requires_grad for p in scratch.parameters())


# ----------------------------------------------------------------------------------------
# The floor


@pytest.fixture()
def run_with_two_models(tmp_path):
    params = workbook.resolve_params({"run_name": str(tmp_path / "run")}, smoke=True, settled=False)
    workbook.prepare_split(params)  # notebook 04 always trains on 02's split; final.json records which
    model = apply_strategy(create_model("efficientnet_lite0", 2, pretrained=False), "head")
    prep = resolve_preprocessing(model, 64, 1.0)
    save_model(model, ["functional", "defective"], prep, params.run / "probe.pt", meta={"phase": 1})
    with torch.no_grad():
        model.classifier[1].weight.add_(1.0)
    save_model(model, ["functional", "defective"], prep, params.run / "candidate.pt", meta={"phase": 2})
    with torch.no_grad():  # fit's best epoch, picked on validation: never what the floor keeps
        model.classifier[1].weight.add_(1.0)
    save_model(model, ["functional", "defective"], prep, params.run / "best.pt", meta={"phase": 2})
    return params


def test_a_finished_run_without_phase_2_sets_an_older_interrupted_checkpoint_aside(run_with_two_models):
    params = run_with_two_models
    (params.run / "last.pt").write_bytes(b"an earlier last_n run, killed in epoch 2")
    (params.run / "fit.json").write_text(json.dumps({"finished": False}))
    assert workbook.interrupted_training(params.run)
    scores = {"probe": 0.85, "fine_tuned": None, "noise": 0.02, "n": 100}
    info = workbook.choose_final(params, scores, "accuracy", train_seconds=5.0, epochs=0)  # head: nothing trained
    assert not (params.run / "last.pt").exists() and "last.interrupted.pt" in info["explanation"]
    assert (params.run / workbook.STALE_CHECKPOINT).read_bytes() == b"an earlier last_n run, killed in epoch 2"
    assert workbook.finished_final(params.run)["model"] == "probe"  # notebook 05 no longer refuses the run
    (params.run / "last.pt").write_bytes(b"this run's phase 2, killed")  # epochs > 0: this run's own checkpoint
    workbook.choose_final(params, {**scores, "fine_tuned": 0.8}, "accuracy", train_seconds=5.0, epochs=2)
    assert (params.run / "last.pt").is_file()


@pytest.mark.parametrize("candidate, probe, noise, kept", [(0.86, 0.85, 0.0, "fine-tuned"),
                                                          (0.86, 0.85, 0.02, "probe"),  # within the noise
                                                          (0.85, 0.85, 0.0, "probe"), (0.60, 0.85, 0.0, "probe"),
                                                          (0.83, 0.85, 0.04, "probe")])  # below, within the noise
def test_the_final_model_is_the_fine_tuned_one_only_when_it_beats_the_probe_beyond_the_noise(
        run_with_two_models, candidate, probe, noise, kept):
    params = run_with_two_models
    scores = {"probe": probe, "fine_tuned": candidate, "noise": noise, "n": 100}
    info = workbook.choose_final(params, scores, "accuracy", train_seconds=15.0, epochs=3, strategy="last_n")
    assert info["model"] == kept and info["train_seconds"] == 15.0 and info["epochs"] == 3
    assert info["candidate"] == "last_n" and "`last_n` model" in info["explanation"]  # named even when not kept
    assert info["split"] == workbook.split_fingerprint(params.run)
    source = "candidate.pt" if kept == "fine-tuned" else "probe.pt"
    assert (params.run / "final.pt").read_bytes() == (params.run / source).read_bytes()
    assert json.loads((params.run / "final.json").read_text())["model"] == kept
    assert load_checkpoint(params.run / "final.pt")["meta"]["phase"] == (2 if kept == "fine-tuned" else 1)
    model_from_checkpoint(params.run / "final.pt")  # loads like any checkpoint
    if noise and candidate > probe:
        assert "within the noise" in info["explanation"]
    if candidate <= probe:  # a loss beyond the noise is not called a tie, nor a tie a loss
        assert (("below it by more than the noise" if probe - candidate > noise else
                 "exactly the same score, a tie" if candidate == probe else "a tie within the noise")
                in info["explanation"])


def test_head_is_the_probe(run_with_two_models):
    scores = {"probe": 0.8, "fine_tuned": None, "noise": None, "n": 10}
    info = workbook.choose_final(run_with_two_models, scores, "accuracy", train_seconds=2.0)
    assert info["model"] == "probe" and info["epochs"] == 0 and info["val_fine_tuned"] is None


def test_floor_scores_count_two_lucky_images_of_34_as_noise_and_a_clear_gain_as_real():
    targets = np.zeros(34, dtype=int)
    probe = np.r_[np.zeros(27), np.ones(7)].astype(int)  # 27 of 34 right
    tuned = np.r_[np.zeros(29), np.ones(5)].astype(int)  # 29 of 34: the digits run that lost 8 points on test
    scores = selection.floor_scores("accuracy", targets, probe, tuned)
    assert scores["fine_tuned"] - scores["probe"] == pytest.approx(2 / 34)
    assert scores["noise"] > 2 / 34 and scores["n"] == 34
    targets = np.zeros(300, dtype=int)
    probe = np.r_[np.zeros(240), np.ones(60)].astype(int)  # 0.80
    tuned = np.r_[np.zeros(270), np.ones(30)].astype(int)  # 0.90, right on every image the probe got right
    scores = selection.floor_scores("accuracy", targets, probe, tuned)
    assert scores["fine_tuned"] - scores["probe"] == pytest.approx(0.1) and scores["noise"] < 0.05
    assert selection.floor_scores("accuracy", targets, probe, None)["noise"] is None


def test_difference_se_of_macro_f1_is_a_bootstrap_of_the_paired_difference():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, 200)
    a = np.where(rng.random(200) < 0.8, targets, rng.integers(0, 3, 200))
    b = np.where(rng.random(200) < 0.6, targets, rng.integers(0, 3, 200))
    se = selection.difference_se("macro_f1", targets, a, b)
    assert 0.01 < se < 0.1 and se == selection.difference_se("macro_f1", targets, a, b)  # seeded
    assert selection.difference_se("macro_f1", targets, a, a) == 0.0
    # For accuracy, the bootstrap and the paired formula agree
    boot = selection.difference_se("balanced_accuracy", targets, a, b)  # close to accuracy on balanced data
    assert boot == pytest.approx(selection.difference_se("accuracy", targets, a, b), rel=0.3)


def test_bootstrap_scores_equal_scikit_learn_on_every_resample():
    from helpers.metrics import bootstrap_scores, score

    rng = np.random.default_rng(1)
    targets = rng.integers(0, 4, 60)
    a = np.where(rng.random(60) < 0.7, targets, rng.integers(0, 4, 60))
    b = rng.integers(0, 3, 60)  # never predicts class 3
    for metric in ("accuracy", "balanced_accuracy", "macro_f1"):
        fast = bootstrap_scores(metric, targets, [a, b], rounds=40, seed=5)
        draw, slow = np.random.default_rng(5), []
        for _ in range(40):
            i = draw.integers(0, 60, 60)
            slow.append([score(metric, targets[i], a[i]), score(metric, targets[i], b[i])])
        np.testing.assert_allclose(fast, slow, atol=1e-12, err_msg=metric)


def test_macro_f1_ties_are_judged_with_macro_f1_noise():
    # Two rare classes of 10 among 300 images: `full` misses 3 of each, `head` 5 of each. In accuracy that is
    # 4 images (a clear paired difference); in macro-F1 it is 11 points, within the noise of 20 rare images as
    # a bootstrap of macro-F1 shows, so the cheaper `head` is chosen. (Judged with the accuracy's noise, as
    # before, the same table chose `full`.)
    targets = np.r_[np.zeros(280), np.ones(10), np.full(10, 2)].astype(int)
    full = targets.copy()
    full[[280, 281, 282, 290, 291, 292]] = 0
    head = targets.copy()
    head[[280, 281, 282, 283, 284, 290, 291, 292, 293, 294]] = 0

    def run(strategy, pred):
        return {"strategy": strategy, "score": selection.score("macro_f1", targets, pred), "correct": pred == targets,
                "targets": targets, "predicted": pred, "files": list(range(300)), "trainable": 1, "seconds": 1.0}

    table = selection.summarize([run("full", full), run("head", head)], metric="macro_f1")
    by_name = table.set_index("strategy")
    gap = by_name.loc["full", "score"] - by_name.loc["head", "score"]
    assert gap > 0.05 and by_name.loc["head", "se_vs_best"] > gap / selection.TIE_SE
    assert selection.choose(table)[0] == "head"
    assert by_name.loc["full", "differs_from_probe"] == 4 and by_name.loc["head", "differs_from_probe"] == 0
    with pytest.raises(ValueError, match=r"needs each run's \['predicted', 'targets'\]"):
        selection.summarize([_run("full", full == targets), _run("head", head == targets)], metric="macro_f1")


def test_the_comparison_counts_the_answers_phase_two_changed_and_needs_the_same_images():
    targets = np.array([0, 1, 0, 1, 0, 1])

    def run(strategy, pred, fold, files):
        pred = np.array(pred)
        return {"strategy": strategy, "score": float(np.mean(pred == targets)), "correct": pred == targets,
                "targets": targets, "predicted": pred, "files": files, "trainable": 1, "seconds": 1.0, "fold": fold}

    names = [f"{i}.png" for i in range(6)]
    runs = [run("head", [0, 1, 0, 1, 0, 0], 0, names), run("full", [0, 1, 1, 1, 0, 1], 0, names),
            run("head", [1, 1, 0, 1, 0, 1], 1, names), run("full", [1, 1, 0, 0, 0, 1], 1, names)]
    table = selection.summarize(runs).set_index("strategy")
    assert table.loc["full", "differs_from_probe"] == 3 and table.loc["head", "differs_from_probe"] == 0  # 2 + 1
    assert np.isnan(selection.summarize(runs[1::2]).set_index("strategy").loc["full", "differs_from_probe"])
    runs[1]["files"] = names[::-1]
    with pytest.raises(ValueError, match="full and head were scored on different images"):
        selection.summarize(runs)


def test_validation_scores_rescore_both_checkpoints_on_the_same_images(run_with_two_models, tiny_sets, monkeypatch):
    import helpers.checkpoint

    _, val = tiny_sets
    loaded, load = [], helpers.checkpoint.model_from_checkpoint
    monkeypatch.setattr(helpers.checkpoint, "model_from_checkpoint",
                        lambda path: loaded.append(path.name) or load(path))
    scores = workbook.validation_scores(run_with_two_models, val, "accuracy", fine_tuned=True, device="cpu")
    assert loaded == ["probe.pt", "candidate.pt"]  # never best.pt: its epoch was picked on these images
    assert scores["n"] == len(val) and scores["noise"] >= 0.0
    from helpers.evaluation import predict
    from helpers.metrics import score

    def accuracy_of(name):
        pred = predict(model_from_checkpoint(run_with_two_models.run / name)[0], val, device="cpu")
        return score("accuracy", pred["target"].to_numpy(), pred["predicted"].to_numpy())

    assert scores["probe"] == accuracy_of("probe.pt") and scores["fine_tuned"] == accuracy_of("candidate.pt")
    only_probe = workbook.validation_scores(run_with_two_models, val, "accuracy", fine_tuned=False, device="cpu")
    assert only_probe["probe"] == scores["probe"] and only_probe["fine_tuned"] is None


def test_notebook_05_needs_notebook_04_to_have_chosen(tmp_path):
    with pytest.raises(FileNotFoundError, match="run notebooks/04_fine_tune.ipynb first"):
        workbook.finished_final(tmp_path)


def test_the_floor_judges_phase_two_after_its_last_epoch_not_its_best(run_with_two_models):
    # The best epoch was picked on the validation images the floor compares on, which flatters it
    # (benchmarks/floor_check.py --selection); notebook 04 and helpers.train train with these settings.
    params = run_with_two_models
    budget = workbook.training_budget(params, "last_n", "efficientnet_lite0")
    assert workbook.fine_tune_settings(params, budget)["restore_best"] is False
    from helpers.checkpoint import checkpoint_preprocessing
    from helpers.transforms import eval_transform

    model, ckpt = model_from_checkpoint(params.run / "candidate.pt")
    transform = eval_transform(checkpoint_preprocessing(ckpt))
    val = workbook.load_datasets(params, transform, transform)["val"]
    history = pd.DataFrame({"epoch": [1, 2, 3], "val_accuracy": [0.70, 0.90, 0.80]})
    path = workbook.save_candidate(params, model, ["functional", "defective"], val, "accuracy", history)
    saved = load_checkpoint(path)
    assert path.name == "candidate.pt" and saved["score"] == 0.80 and saved["meta"]["epochs"] == saved["epoch"] == 3


@pytest.mark.parametrize("task, weights", [("binary", None), ("4class", "balanced")])
def test_phase_two_weighs_the_classes_as_the_probe_does_for_the_tasks_metric(tmp_path, task, weights):
    params = workbook.resolve_params({"run_name": str(tmp_path / "run"), "task": task}, smoke=True)
    budget = workbook.training_budget(params, "last_n", "efficientnet_lite0")
    assert workbook.fine_tune_settings(params, budget)["class_weights"] == weights
    metric = workbook.selection_metric(params)
    x, y = blobs(2)
    assert fit_probe(x, y, folds=3, metric=metric).pipeline[-1].class_weight == weights
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        selection.class_weighting("f1")


def test_notebook_01_picks_the_backbone_by_flops_not_by_a_latency_a_busy_machine_can_flip():
    from helpers.lessons import choose_backbone

    ranking = pd.DataFrame({"backbone": ["efficientnet_lite2", "efficientnet_lite0", "efficientnet_lite1"],
                            "accuracy": [0.685, 0.680, 0.640]})
    # Measured while another job ran: the larger network happened to time faster
    costs = pd.DataFrame({"backbone": ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"],
                          "GFLOPs": [0.78, 1.20, 1.72], "cpu_ms_per_image": [41.0, 30.0, 35.0]})
    assert choose_backbone(ranking, costs, metric="accuracy") == "efficientnet_lite0"
    ranking.loc[1, "accuracy"] = 0.60  # lite0 now clearly behind: the best one within 2 points wins
    assert choose_backbone(ranking, costs, metric="accuracy") == "efficientnet_lite2"


def test_a_fine_tuned_candidate_is_scored_after_its_last_epoch_not_its_best(tiny_root, tiny_splits, monkeypatch):
    """Its best epoch is picked on the images it is scored on: that would flatter the strategies trained for
    epochs over the probe and truncate, which are fitted once."""
    import helpers.training as training

    train, val = tiny_splits["train"], tiny_splits["val"]
    classes = sorted(train["label"].unique())
    calls, original = [], training.fit

    def recording_fit(*args, **kwargs):
        calls.append((kwargs, original(*args, **kwargs)))
        return calls[-1][1]

    monkeypatch.setattr(training, "fit", recording_fit)
    budget = selection.Budget(image_size=32, epochs=3, batch_size=8, lr=1e-2)
    result = selection.evaluate_candidate("last_n", "efficientnet_lite0", train, val, classes, tiny_root, budget,
                                          None, 0, "cpu")
    ((kwargs, history),) = calls
    assert kwargs["restore_best"] is False and len(history) == 3  # its whole budget, no early stop
    assert result["score"] == pytest.approx(history["val_accuracy"].iloc[-1])  # the weights after epoch 3


def test_the_scratch_control_trains_as_random_weights_need_on_the_same_budget(tiny_root, tiny_splits, monkeypatch):
    """A pretrained network's small rate, layer decay and frozen BatchNorm statistics would leave a random network
    barely trained: the control gets 10x the rate, no decay and learned statistics, and nothing else changes."""
    import helpers.training as training

    train, val = tiny_splits["train"], tiny_splits["val"]
    classes = sorted(train["label"].unique())
    calls = []
    monkeypatch.setattr(training, "fit", lambda model, *args, **kwargs: (calls.append(kwargs), None)[1])
    monkeypatch.setattr(selection, "_shared_phase_one", lambda *args: (None, False))
    budget = selection.Budget(image_size=32, epochs=2, batch_size=8, lr=1e-4)
    for strategy in ("last_n", selection.CONTROL):
        selection.evaluate_candidate(strategy, "efficientnet_lite0", train, val, classes, tiny_root, budget, None, 0,
                                     "cpu")
    pretrained, control = calls
    assert (pretrained["lr"], pretrained["layer_decay"], pretrained["freeze_batchnorm"]) == (1e-4, 0.8, True)
    assert (control["lr"], control["layer_decay"], control["freeze_batchnorm"]) == (pytest.approx(1e-3), 1.0, False)
    same = ("epochs", "batch_size", "label_smoothing", "cache", "cache_views", "seed", "restore_best")
    assert {k: pretrained[k] for k in same} == {k: control[k] for k in same}


def test_a_candidate_that_reuses_the_folds_probe_is_charged_its_time(tiny_root, tiny_splits):
    """The seconds column is each strategy's own cost, whichever candidate happened to fit the shared probe."""
    train, val = tiny_splits["train"], tiny_splits["val"]
    classes = sorted(train["label"].unique())
    budget = selection.Budget(image_size=32, epochs=1, batch_size=8)
    selection._FOLD_PROBES.clear()
    fitted_on = []
    pooled = selection.pooled_features

    def spy(model, dataset, *args, **kwargs):  # phase 1 must see the training part only, never the scored one
        fitted_on.append(sorted(dataset.files))
        return pooled(model, dataset, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(selection, "pooled_features", spy)
        first = selection.evaluate_candidate("head", "efficientnet_lite0", train, val, classes, tiny_root, budget,
                                             None, 0, "cpu")
    assert fitted_on == [sorted(train["file"])]
    (probe,) = selection._FOLD_PROBES.values()
    again = selection.evaluate_candidate("head", "efficientnet_lite0", train, val, classes, tiny_root, budget,
                                         None, 0, "cpu")
    assert first["score"] == again["score"]
    assert again["seconds"] >= probe.seconds > 0 and first["seconds"] >= probe.seconds
    # The same file names with other labels (a rerun with another label column) fit a probe of their own
    relabelled = train.assign(label=train["label"].map({classes[0]: classes[1], classes[1]: classes[0]}))
    selection.evaluate_candidate("head", "efficientnet_lite0", relabelled, val, classes, tiny_root, budget,
                                 None, 0, "cpu")
    (other,) = selection._FOLD_PROBES.values()
    assert other is not probe


# ----------------------------------------------------------------------------------------
# Margins over subjects: images of one subject are right or wrong together


def _clustered(subjects: int = 10, per_subject: int = 20):
    """Targets all 0; the probe wrong on whole subjects 0-3, the tuned model on whole subjects 0-1: +0.2 on 200
    images, which per image looks like a clear gain and over 10 subjects is 2 subjects' luck."""
    subject = np.repeat([f"s{i}" for i in range(subjects)], per_subject)
    index = np.repeat(np.arange(subjects), per_subject)
    targets = np.zeros(subjects * per_subject, dtype=int)
    return targets, (index < 4).astype(int), (index < 2).astype(int), subject


# scikit-learn's notes on the loop's resamples of one class
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true:UserWarning")
@pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")
def test_the_cluster_bootstrap_draws_whole_subjects_and_equals_a_loop_over_them():
    from helpers.metrics import bootstrap_scores, resample_counts, score

    targets, probe, tuned, subject = _clustered(subjects=6, per_subject=5)
    subject[:3] = "odd"  # subjects of unequal sizes: 3 and 7 images
    counts = resample_counts(len(targets), 50, seed=2, groups=subject)
    for s in np.unique(subject):  # every image of a subject is drawn as often as the others
        assert (counts[:, subject == s] == counts[:, subject == s][:, :1]).all()
    names, group_of = np.unique(subject, return_inverse=True)
    # Unequal subjects: accuracy divides by the images drawn, not n. Every target is class 0 and both models
    # predict class 1 too: balanced accuracy averages the recall of the targets' classes only.
    for metric in ("accuracy", "macro_f1", "balanced_accuracy"):
        fast = bootstrap_scores(metric, targets, [probe, tuned], rounds=50, seed=2, groups=subject)
        draw, slow = np.random.default_rng(2), []
        for _ in range(50):
            i = np.concatenate([np.flatnonzero(group_of == g) for g in draw.integers(0, len(names), len(names))])
            slow.append([score(metric, targets[i], probe[i]), score(metric, targets[i], tuned[i])])
        np.testing.assert_allclose(fast, slow, atol=1e-12, err_msg=metric)
    with pytest.raises(ValueError, match="groups has 3 entries for 30 images"):
        resample_counts(30, 5, groups=["a", "b", "c"])


def test_margins_over_subjects_are_wider_when_subjects_err_together():
    from helpers.lessons import accuracy_noise, noise_note
    from helpers.metrics import score_margin

    targets, probe, tuned, subject = _clustered()
    per_image = selection.difference_se("accuracy", targets, tuned, probe)
    per_subject = selection.difference_se("accuracy", targets, tuned, probe, groups=subject)
    assert per_subject > 3 * per_image
    assert score_margin("accuracy", targets, probe, groups=subject) > 3 * score_margin("accuracy", targets, probe)
    # Without clustering, resampling subjects gives about the per-image noise (never less: the per-image error is
    # the floor of the grouped one, so only the upper bound can fail)
    scattered = np.random.default_rng(0).permutation(subject)
    assert per_image <= selection.difference_se("accuracy", targets, tuned, probe, groups=scattered) <= 1.5 * per_image
    assert accuracy_noise(targets, probe, subject) > accuracy_noise(targets, probe)  # the formula: a floor
    # The margin is one of the two estimates the sentence names, never a third
    from helpers.metrics import subject_margin
    assert accuracy_noise(targets, probe, subject) == max(accuracy_noise(targets, probe),
                                                          subject_margin("accuracy", targets, probe, subject))
    assert "of 10 subjects" in noise_note(200, 0.8, accuracy_noise(targets, probe, subject), 10)


def test_the_floor_keeps_the_probe_when_the_gain_is_two_subjects_luck(run_with_two_models):
    targets, probe, tuned, subject = _clustered()
    per_image = selection.floor_scores("accuracy", targets, probe, tuned)
    assert per_image["fine_tuned"] - per_image["probe"] > per_image["noise"] and per_image["subjects"] is None
    scores = selection.floor_scores("accuracy", targets, probe, tuned, subjects=subject)
    assert scores["fine_tuned"] - scores["probe"] < scores["noise"] and scores["subjects"] == 10
    params = run_with_two_models
    info = workbook.choose_final(params, scores, "accuracy", train_seconds=1.0)
    assert info["model"] == "probe"
    assert (params.run / "final.pt").read_bytes() == (params.run / "probe.pt").read_bytes()
    assert "200 images of 10 subjects, resampled whole" in info["explanation"]


def test_the_floor_resamples_each_picture_with_its_copies(run_with_two_models, tiny_root, tiny_splits, tmp_path):
    import shutil

    from helpers.data import ELPV_TASKS, ImageDataset
    from helpers.lessons import noise_note
    from helpers.models import BACKBONES
    from helpers.transforms import eval_transform

    # Every validation picture stored twice: a copy is right or wrong with its original, so it adds no evidence
    val = tiny_splits["val"]
    root = tmp_path / "twice"
    for name in val["file"]:
        for copy in (name, f"copy_{Path(name).name}"):
            (root / copy).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tiny_root / name, root / copy)
    twice = pd.concat([val, val.assign(file=[f"copy_{Path(name).name}" for name in val["file"]])], ignore_index=True)
    dataset = ImageDataset(root, twice, group_col="group", classes=ELPV_TASKS["binary"][1],
                           transform=eval_transform(BACKBONES["efficientnet_lite0"], image_size=64, crop_pct=1.0))
    scores = workbook.validation_scores(run_with_two_models, dataset, "accuracy", fine_tuned=True, device="cpu")
    assert scores["n"] == 2 * len(val) and scores["subjects"] == len(val) and scores["unit"] == "picture"
    info = workbook.choose_final(run_with_two_models, scores, "accuracy", train_seconds=1.0)
    assert f"{2 * len(val)} images of {len(val)} pictures, each resampled with its copies" in info["explanation"]
    # The margin: resampling pictures whole is wider than counting each copy as evidence
    targets, probe, tuned, _ = _clustered()
    pictures = np.repeat(np.arange(len(targets)), 2)
    doubled = [np.repeat(a, 2) for a in (targets, probe, tuned)]
    per_file = selection.floor_scores("accuracy", *doubled)["noise"]
    per_picture = selection.floor_scores("accuracy", *doubled, subjects=pictures)["noise"]
    assert per_picture > 1.25 * per_file  # about sqrt(2): half as many independent answers
    assert "of 200 pictures" in noise_note(400, 0.8, per_picture, 200, per_picture, unit="picture")


def test_summarize_resamples_subjects_when_the_runs_carry_them():
    targets, probe, tuned, subject = _clustered()

    def runs(subjects):
        return [{"strategy": name, "score": float((pred == targets).mean()), "correct": pred == targets,
                 "files": [f"{i}.png" for i in range(len(targets))], "targets": targets, "predicted": pred,
                 "subjects": subjects, "trainable": 1, "seconds": 1.0}
                for name, pred in (("head", probe), ("full", tuned))]

    plain, grouped = selection.summarize(runs(None)), selection.summarize(runs(subject))
    assert grouped.set_index("strategy").loc["head", "se_vs_best"] > 3 * plain.set_index("strategy").loc[
        "head", "se_vs_best"]
    assert selection.ties_with_best(plain) == ["full"]  # per image, full's +0.2 is clear
    assert selection.ties_with_best(grouped) == ["full", "head"]  # over 10 subjects it is a tie: the cheaper wins
    assert selection.choose(grouped)[0] == "head"


def test_summarize_keeps_the_units_of_folds_that_have_them():
    # Two folds: the first holds copies (units), the second none (units_of gives None): the first still counts
    # its copies as one answer each, the second its images one by one
    targets, probe, tuned, subject = _clustered()
    half = len(targets) // 2

    def runs(second_units):
        return [{"strategy": name, "fold": fold, "score": float((pred[part] == targets[part]).mean()),
                 "correct": pred[part] == targets[part], "files": [f"{fold}/{i}.png" for i in range(half)],
                 "targets": targets[part], "predicted": pred[part], "trainable": 1, "seconds": 1.0,
                 "subjects": subject[part] if fold == 0 else second_units}
                for name, pred in (("head", probe), ("full", tuned))
                for fold, part in ((0, slice(0, half)), (1, slice(half, None)))]

    mixed = selection.summarize(runs(None)).set_index("strategy")
    plain = selection.summarize([{k: v for k, v in r.items() if k != "subjects"} for r in runs(None)])
    assert mixed.loc["head", "se_vs_best"] > 1.5 * plain.set_index("strategy").loc["head", "se_vs_best"]


def test_one_subject_gives_no_measurable_margin_and_few_subjects_never_less_than_per_image(run_with_two_models):
    import json
    import math

    from helpers.evaluation import ece_difference_se
    from helpers.lessons import accuracy_noise, noise_note, plus_minus
    from helpers.metrics import score_margin

    targets, probe, tuned, subject = _clustered()
    one = np.full(len(targets), "p1")  # every image of one patient: resampling it changes nothing
    assert math.isinf(selection.difference_se("accuracy", targets, tuned, probe, groups=one))
    assert math.isinf(score_margin("macro_f1", targets, tuned, groups=one))
    assert math.isinf(accuracy_noise(targets, tuned, one))
    probs = np.eye(2)[tuned] * 0.9 + 0.05
    assert math.isinf(ece_difference_se(probs, np.full((len(targets), 2), 0.5), targets, groups=one))
    assert "cannot be measured" in noise_note(200, 0.9, math.inf, 1) and plus_minus(math.inf).startswith("not")
    scores = selection.floor_scores("accuracy", targets, probe, tuned, subjects=one)
    info = workbook.choose_final(run_with_two_models, scores, "accuracy", train_seconds=1.0)
    assert info["model"] == "probe" and "all of one subject, so the noise cannot be measured" in info["explanation"]
    assert json.loads((run_with_two_models.run / "final.json").read_text())["noise"] is None  # JSON has no inf
    # Two subjects that err alike: the subject bootstrap alone would say less noise than the images do
    scattered = np.where(np.arange(len(targets)) % 2 == 0, "a", "b")
    per_image = selection.difference_se("accuracy", targets, tuned, probe)
    assert selection.difference_se("accuracy", targets, tuned, probe, groups=scattered) >= per_image


def test_the_training_span_changes_the_probes_size_not_its_optimum():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from helpers.probe import TrainingSpan

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 10)
    x = rng.normal(size=(30, 200)) + rng.normal(size=(3, 200))[y]
    span = TrainingSpan().fit(x)
    assert span.components_.shape == (29, 200)  # 30 centred images span 29 directions
    np.testing.assert_allclose(span.components_ @ span.components_.T, np.eye(29), atol=1e-10)
    new = rng.normal(size=(5, 200))
    plain = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, tol=1e-10, max_iter=10000)).fit(x, y)
    spanned = make_pipeline(StandardScaler(), TrainingSpan(), LogisticRegression(C=0.1, tol=1e-10, max_iter=10000))
    np.testing.assert_allclose(spanned.fit(x, y).predict_proba(new), plain.predict_proba(new), atol=1e-6)
    assert TrainingSpan().fit(x[:, :50]).components_ is None  # over half as many images as features: not worth it
    probe = fit_probe(x, y, folds=3)
    assert [type(step).__name__ for step in probe.pipeline] == ["StandardScaler", "LogisticRegression"]
