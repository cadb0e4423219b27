"""The notebook glue in helpers.lessons that turns results into the sentences the lessons print."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import lessons
from helpers.models import create_model


def test_majority_score_uses_the_metric_the_models_are_compared_by():
    train = pd.DataFrame({"label": ["a", "b", "b", "c"]})
    scored = [pd.DataFrame({"label": ["a", "b"]}), pd.DataFrame({"label": ["c", "b"]})]
    assert lessons.majority_score(train, scored) == 0.5  # always "b": 2 of 4
    assert math.isclose(lessons.majority_score(train, scored, "balanced_accuracy"), 1 / 3)
    # F1 of "b": precision 2/4, recall 1 -> 2/3; the other two classes 0; mean over three classes.
    assert math.isclose(lessons.majority_score(train, scored, "macro_f1"), 2 / 9)


def test_equally_frequent_labels_give_the_majority_answer_notebook_05_gives():
    from helpers.probe import majority_baseline

    train = pd.DataFrame({"label": ["b", "a", "b", "a"]})
    test = pd.DataFrame({"label": ["a", "a", "a", "b"]})
    for classes in (["a", "b"], ["b", "a"]):
        train_index, test_index = (frame["label"].map(classes.index).to_numpy() for frame in (train, test))
        expected = majority_baseline(train_index, test_index)["accuracy"]
        assert lessons.majority_score(train, [test], "accuracy", classes) == expected
    assert lessons.majority_score(train, [test]) == 0.75  # without classes: the first in sorted order, "a"


def test_accuracy_margin_is_never_zero_and_shrinks_with_more_images():
    assert lessons.accuracy_margin(1.0, 50) > 0.03  # a perfect score on 50 images is not a certainty
    assert lessons.accuracy_margin(0.0, 50) == pytest.approx(lessons.accuracy_margin(1.0, 50))
    assert lessons.accuracy_margin(0.85, 656) < lessons.accuracy_margin(0.85, 100)
    # Close to the textbook 2 * sqrt(p (1 - p) / n) when n is large and p is not extreme.
    assert lessons.accuracy_margin(0.85, 10_000) == pytest.approx(2 * math.sqrt(0.85 * 0.15 / 10_000), rel=0.01)


def _baselines(scratch: bool = True) -> dict:
    out = {"majority": {"class": "ok", "accuracy": 0.7, "balanced_accuracy": 0.5, "macro_f1": 0.41, "classes": 2},
           "probe": {"accuracy": 0.85, "balanced_accuracy": 0.8, "macro_f1": 0.81}}
    if scratch:
        out["scratch"] = {"score": 0.6, "pretrained_score": 0.75, "split": "validation"}
    return out


def test_results_table_puts_the_validation_controls_in_the_metric_they_were_selected_by():
    metrics = {"accuracy": 0.86, "balanced_accuracy": 0.82, "macro_f1": 0.83}
    table = lessons.results_table(metrics, _baselines(), metric="macro_f1").set_index("model")
    assert table.loc["from scratch (03's budget)", "macro_f1"] == 0.6
    assert pd.isna(table.loc["from scratch (03's budget)", "accuracy"])
    assert table.loc["majority class", "macro_f1"] == 0.41  # every row of the test split has every metric
    assert table.loc["final model", "accuracy"] == 0.86
    assert list(lessons.results_table(metrics, _baselines(False), "accuracy")["model"]) == [
        "majority class", "linear probe", "final model"]
    # When the floor kept the probe, the last row repeats the probe's and says why
    assert list(lessons.results_table(metrics, _baselines(False), "accuracy", final="probe")["model"]) == [
        "majority class", "linear probe", "final model (the probe)"]
    # 03's scores say where they come from: its validation split, or cross-validation when that was small
    assert table.loc["from scratch (03's budget)", "split"] == "validation"
    assert "best pretrained (03's budget)" in table.index  # a run from before 03's best strategy was recorded
    named = _baselines()
    named["scratch"]["pretrained_strategy"] = "last_n"
    assert "best pretrained, last_n (03's budget)" in list(lessons.results_table(metrics, named, "accuracy")["model"])
    cross_validated = _baselines()
    cross_validated["scratch"]["split"] = "3-fold CV on train + validation"
    table = lessons.results_table(metrics, cross_validated, "accuracy").set_index("model")
    assert list(table["split"]) == ["test", "test", "3-fold CV on train + validation",
                                    "3-fold CV on train + validation", "test"]


def test_history_summary_reports_the_best_epoch_and_the_gap_from_the_history():
    history = pd.DataFrame({"epoch": [1, 2, 3], "train_accuracy": [0.7, 0.9, 1.0], "val_accuracy": [0.6, 0.8, 0.7],
                            "train_loss": [1.0, 0.5, 0.2], "val_loss": [1.1, 0.7, 0.9]})
    history.attrs.update(train_seconds=12.0, device="cpu", cached=True, cache_seconds=3.0, stopped_early=False)
    text = lessons.history_summary(history)
    assert "0.800 at epoch 2 of 3" in text and "a gap of +0.300" in text and "overfitting" in text
    assert "12 s on cpu, 3.0 s of it for the feature cache" in text
    assert "fell to 0.700 by the last epoch, and the best checkpoint keeps epoch 2" in text
    history.attrs.update(stopped_early=True)
    assert "no improvement for 2 epochs" in lessons.history_summary(history, patience=2)
    # Notebook 04 keeps the last epoch (restore_best=False): the text must not promise the best checkpoint
    last = lessons.history_summary(history, patience=2, constant=0.65, kept="last")
    assert "fell to 0.700 by the last epoch, whose model is the one judged" in last and "best checkpoint" not in last
    assert "the last epoch is 0.050 above that" in last and "overfitting; early stopping ended it." in last
    with pytest.raises(ValueError, match="kept must be 'best' or 'last'"):
        lessons.history_summary(history, kept="first")
    # A fall of 0.100 is overfitting only if it is more than the noise of one validation score.
    assert "sign of overfitting" in lessons.history_summary(history, noise=0.08)
    wide = lessons.history_summary(history, noise=0.15)
    assert "sign of overfitting" not in wide and "by 0.100, within the noise of one validation score (±0.150)" in wide


def test_history_summary_tells_a_rising_curve_from_overfitting_and_flags_a_constant_answer():
    # Training above validation, but validation best at the last epoch: still improving, not overfitting
    history = pd.DataFrame({"epoch": [1, 2, 3], "train_accuracy": [0.70, 0.80, 0.80],
                            "val_accuracy": [0.60, 0.65, 0.70], "train_loss": [1.0, 0.5, 0.4],
                            "val_loss": [1.1, 0.9, 0.8]})
    text = lessons.history_summary(history)
    assert "0.700 at epoch 3 of 3" in text and "had not turned down yet, so more epochs may help" in text
    assert "a gap of +0.100" in text and "not overfitting yet" in text and "sign of overfitting" not in text
    assert "learned little" not in text and "validation loss, though" not in text
    # The accuracy still at its best, but the loss rising by more than a tenth: said, since the curve hides it.
    rising = history.assign(val_loss=[1.1, 0.9, 1.2])
    assert ("The validation loss, though, rose from its lowest, 0.900 at epoch 2, to 1.200"
            in lessons.history_summary(rising))
    assert ("Always answering the most frequent class scores 0.690 here: the best epoch is 0.010 above that, "
            "within the noise (±0.020), so the model has learned little") in lessons.history_summary(history,
                                                                                            constant=0.69)
    assert "0.050 below that, within the noise" in lessons.history_summary(history, constant=0.75, noise=0.06)
    assert ("0.050 below that, by more than the noise (±0.020): worse than a constant answer"
            in lessons.history_summary(history, constant=0.75))
    assert "0.100 above that." in lessons.history_summary(history, constant=0.60)  # clear of it: no warning
    assert "learned little" in lessons.history_summary(history, constant=0.60, noise=0.12)  # wider noise
    # Every training image right, validation far behind and flat: memorized, more epochs will not help much
    flat = pd.DataFrame({"epoch": [1, 2, 3], "train_accuracy": [0.9, 1.0, 1.0], "val_accuracy": [0.40, 0.41, 0.41],
                         "train_loss": [0.5, 0.1, 0.05], "val_loss": [1.5, 1.6, 1.6]})
    text = lessons.history_summary(flat)
    assert "already all but memorized, so more epochs are unlikely to help much" in text
    assert "more epochs may help" not in text and "learned its training images far better than the task" in text


def test_cpu_latency_times_each_model_in_interleaved_rounds():
    import time

    from torch import nn

    calls = []

    class Slow(nn.Module):
        def __init__(self, name, seconds):
            super().__init__()
            self.name, self.seconds, self.layer = name, seconds, nn.Conv2d(3, 2, 1)

        def forward(self, x):
            calls.append(self.name)
            time.sleep(self.seconds)
            return self.layer(x)

    latency = lessons.cpu_latency_ms([Slow("fast", 0.0), Slow("slow", 0.02)], [8, 8], repeats=3)
    assert calls == ["fast", "slow"] * 4  # a warm-up round, then three timed rounds, one pass of each in turn
    assert latency[1] >= 20 and latency[0] < latency[1]


def test_training_step_speed_measures_every_layout_side_by_side():
    table = lessons.training_step_speed("efficientnet_lite0", "cpu", image_size=32, batch_size=2, steps=1)
    assert list(table["channels_last"]) == [False, True] and (table["images_per_second"] > 0).all()
    assert table.loc[0, "speedup"] == 1.0


def test_history_summary_explains_a_training_score_below_validation():
    history = pd.DataFrame({"epoch": [1, 2], "train_accuracy": [0.35, 0.5], "val_accuracy": [0.5, 0.75],
                            "train_loss": [2.1, 1.5], "val_loss": [1.1, 0.8]})
    text = lessons.history_summary(history)
    assert "a gap of -0.250" in text and "no overfitting yet" in text and "overfitting that" not in text


def _half_bright(n: int, seed: int) -> torch.utils.data.TensorDataset:
    """Class 0: the left half is bright; class 1: the right half. A horizontal mirror swaps the classes, a
    vertical one keeps them."""
    generator = torch.Generator().manual_seed(seed)
    images = 0.2 * torch.randn(n, 3, 64, 64, generator=generator)
    labels = torch.arange(n) % 2
    images[labels == 0, :, :, :32] += 2.0
    images[labels == 1, :, :, 32:] += 2.0
    return torch.utils.data.TensorDataset(images, labels)


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_mirror_check_finds_the_mirror_that_changes_the_label_and_not_the_one_that_keeps_it(metric):
    model = create_model("efficientnet_lite0", 2)
    check = lessons.mirror_check(model, _half_bright(40, 0), _half_bright(30, 1),
                                 ["horizontal mirror", "vertical mirror"], device="cpu", metric=metric)
    assert list(check["use"]) == ["as stored"] + ["scored on mirrors", "averaged at test", "trained on mirrors"] * 2
    assert (check["metric"] == metric).all() and check.iloc[0]["accuracy"] > 0.9 and check.iloc[0]["score"] > 0.9
    assert check["difference"].tolist() == pytest.approx((check["score"] - check.iloc[0]["score"]).tolist())
    if metric == "accuracy":
        assert check["score"].tolist() == check["accuracy"].tolist()
    horizontal = check[check["mirror"] == "horizontal mirror"].set_index("use")
    vertical = check[check["mirror"] == "vertical mirror"].set_index("use")
    assert horizontal.loc["scored on mirrors", "score"] < 0.5
    assert horizontal.loc["scored on mirrors", "changed_answers"] > 15
    # training on mirrors labelled as the original teaches the probe contradictions: it must lose too
    assert horizontal.loc["trained on mirrors", "loss_beyond_noise"]
    assert horizontal["loss_beyond_noise"].all()
    assert not vertical["loss_beyond_noise"].any() and (vertical["score"] > 0.9).all()
    assert f"it loses {metric.replace('_', '-')} beyond the noise" in lessons.mirror_advice(check, "natural", 30)
    natural = lessons.mirror_advice(check, "natural", 30)  # a recipe the user set: advice only
    assert 'set `augment = "natural_no_flip"`' in natural and "averages over it" in natural
    assert 'set `augment = "cells_no_flip"`' in lessons.mirror_advice(check, "cells", 30)
    switched = lessons.mirror_advice(check, "natural", 30, settled="natural_no_flip")
    assert "notebooks 03–05 use `natural_no_flip` instead" in switched and 'set `augment = "natural"`' in switched
    assert lessons.mirror_conflicts(check, "cells") == ["horizontal mirror"]
    assert "weaker kind of evidence" not in switched  # every row of the horizontal mirror lost here
    diagnostic_only = check.copy()
    diagnostic_only.loc[diagnostic_only["use"] != "scored on mirrors", "loss_beyond_noise"] = False
    assert "Only the diagnostic row (*scored on mirrors*) lost" in lessons.mirror_advice(
        diagnostic_only, "natural", 30, settled="natural_no_flip")
    assert lessons.mirror_conflicts(check, "none") == lessons.mirror_conflicts(check, "natural_no_flip") == []
    assert "keep it" in lessons.mirror_advice(check, "none", 30)
    assert "keep it" in lessons.mirror_advice(check, "natural_no_flip", 30)
    harmless = check[check["mirror"] != "horizontal mirror"]
    assert 'augment = "natural"` (which adds it) may suit' in lessons.mirror_advice(harmless, "none", 30)
    assert 'augment = "natural"` (which adds it) may suit' in lessons.mirror_advice(harmless, "natural_no_flip", 30)
    assert "Nothing here argues against the `cells`" in lessons.mirror_advice(harmless, "cells", 30)
    # Many changed answers and no loss beyond the noise: the check could not tell, and the advice says so
    unsure = check.copy()
    unsure["loss_beyond_noise"], unsure["changed_answers"], unsure["margin"] = False, 12, 0.2
    weak = lessons.mirror_advice(unsure, "natural", 30)
    assert "weak evidence here: a mirror changed up to 12 of the 30" in weak and "±0.200 would go unnoticed" in weak
    assert 'set `augment = "natural_no_flip"`' in weak and "Nothing here argues" not in weak
    assert "cannot be judged" in lessons.mirror_advice(check, "natural", 3)


def test_mirror_check_refuses_an_empty_validation_set_and_judges_nothing_on_a_handful():
    model = create_model("efficientnet_lite0", 2)
    with pytest.raises(ValueError, match="validation split is empty"):
        lessons.mirror_check(model, _half_bright(10, 0), torch.utils.data.Subset(_half_bright(4, 1), []),
                             ["horizontal mirror"])
    few = lessons.mirror_check(model, _half_bright(20, 0), _half_bright(3, 1), ["horizontal mirror"])
    assert not few["loss_beyond_noise"].any()  # 3 images: even a total loss is not evidence


def test_stratified_subset_keeps_every_class_in_its_share():
    class Labelled(torch.utils.data.Dataset):
        targets = [0] * 90 + [1] * 9 + [2] * 1

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            return i, self.targets[i]

    picked = [Labelled.targets[i] for i in lessons.stratified_subset(Labelled(), 20, seed=3).indices]
    assert sorted(set(picked)) == [0, 1, 2] and picked.count(0) == 18 and picked.count(1) == 2


def test_recipe_mirrors_follow_the_test_time_flips():
    assert lessons.recipe_mirrors("cells") == ["horizontal mirror", "vertical mirror"]
    assert lessons.recipe_mirrors("natural") == ["horizontal mirror"]
    assert lessons.recipe_mirrors("none") == ["horizontal mirror"]  # what "natural" would add
    with pytest.raises(ValueError, match="unknown mirror"):
        lessons.mirror_check(None, None, None, ["diagonal"])


def test_threshold_for_recall_needs_a_positive_example():
    from helpers import solutions

    scores = np.array([0.1, 0.4, 0.35, 0.8])
    assert solutions.threshold_for_recall(scores, np.array([False, False, True, True]), 0.9) == 0.35
    with pytest.raises(ValueError, match="no positive example"):
        solutions.threshold_for_recall(scores, np.zeros(4, bool), 0.9)


def test_an_unwritten_exercise_runs_the_reference_but_a_forgotten_return_is_an_error(capsys):
    from helpers import solutions

    table = pd.DataFrame({"label": ["a", "a", "b"]})

    def stub(t, classes):
        raise NotImplementedError

    # Always "a": accuracy 2/3; its precision is 2/3 and its recall 1, so F1 0.8, and "b" is never predicted (F1 0):
    # macro-F1 0.4.
    same = lambda answer: np.allclose(answer, (2 / 3, 0.4))  # noqa: E731
    assert solutions.check("majority_baseline", stub, table, ["a", "b"], verify=same) == pytest.approx((2 / 3, 0.4))
    assert "not attempted yet" in capsys.readouterr().out
    with pytest.raises(AssertionError, match=r"exercise majority_baseline: your function returned None: does it "
                                             r"end with `return \.\.\.`\?"):
        solutions.check("majority_baseline", lambda t, c: None, table, ["a", "b"], verify=same)
    assert solutions.check("majority_baseline", lambda t, c: (2 / 3, 0.4), table, ["a", "b"], verify=same)
    assert "your answer checks out" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="is not right"):  # the accuracy twice: macro-F1 is not the accuracy
        solutions.check("majority_baseline", lambda t, c: (2 / 3, 2 / 3), table, ["a", "b"], verify=same)


def test_the_majority_baseline_solution_is_scikit_learns_on_a_constant_answer():
    from sklearn.metrics import accuracy_score, f1_score

    from helpers import solutions

    rng = np.random.default_rng(0)
    classes = ["a", "b", "c", "d", "e"]
    for _ in range(20):  # imbalanced tables, some classes absent from them
        labels = rng.choice(classes[:4], size=int(rng.integers(5, 60)), p=[0.55, 0.25, 0.15, 0.05])
        table = pd.DataFrame({"label": labels})
        constant = [table["label"].value_counts().index[0]] * len(labels)
        expected = (accuracy_score(labels, constant),
                    f1_score(labels, constant, labels=classes, average="macro", zero_division=0))
        assert solutions.majority_baseline(table, classes) == pytest.approx(expected)


def test_an_answer_of_the_wrong_kind_is_named_with_the_exercise_and_the_hint():
    from helpers import solutions

    table = pd.DataFrame({"label": ["a", "a", "b"]})
    with pytest.raises(AssertionError, match=r"exercise majority_baseline: your answer is a str \('a'\), where the "
                                             r"check needs something like 0\.66.*Count the labels"):
        solutions.check("majority_baseline", lambda t, c: t["label"].value_counts().idxmax(), table, ["a", "b"],
                        expected=2 / 3, hint="Count the labels.")
    with pytest.raises(AssertionError, match=r"your answer is a list .*where the check needs another kind of value"):
        solutions.check("with_rotation", lambda t, d: [1, 2], None, 15, verify=lambda t: t.transforms[-3] is None)
    long = list(range(1000))
    with pytest.raises(AssertionError, match=r"got \[0, 1, 2, .* \.\.\.\. "):
        solutions.check("with_rotation", lambda t, d: long, None, 15, verify=lambda t: False)


def test_bgr_demo_does_not_rely_on_imread_and_imwrite(monkeypatch):
    # OpenCV on Windows: imread returns None and imwrite False for a non-ASCII path (a user's temp folder)
    import cv2
    import matplotlib.pyplot as plt
    import skimage.data

    monkeypatch.setattr(cv2, "imread", lambda *args, **kwargs: None)
    monkeypatch.setattr(cv2, "imwrite", lambda *args, **kwargs: False)
    fig = lessons.bgr_demo()
    try:
        article, helpers_view = (np.asarray(ax.images[0].get_array()) for ax in fig.axes)
        rgb = skimage.data.coffee()
        assert article.tolist() == rgb[..., ::-1].tolist() and helpers_view.tolist() == rgb.tolist()
    finally:
        plt.close(fig)


def test_plot_examples_of_60_classes_shows_20_and_says_how_many_are_left_out():
    import types

    import matplotlib.pyplot as plt

    classes = [f"c{i}" for i in range(60)]
    dataset = types.SimpleNamespace(classes=classes, targets=[i // 2 for i in range(120)],
                                    load=lambda i: torch.full((3, 8, 8), i, dtype=torch.uint8))
    fig = lessons.plot_examples(dataset, per_class=2)
    try:
        assert len(fig.axes) == 20 * 2 and max(fig.get_size_inches()) <= 40
        assert fig._suptitle.get_text() == "the first 20 of 60 classes (40 left out)"
        assert [ax.get_title(loc="left") for ax in fig.axes[::2]] == classes[:20]
    finally:
        plt.close(fig)
    few = lessons.plot_examples(types.SimpleNamespace(classes=classes[:3], targets=[0, 1, 2], load=dataset.load), 1)
    assert len(few.axes) == 3 and few._suptitle is None
    plt.close(few)


def test_neighbour_agreement_tells_an_order_that_carries_the_labels_from_a_shuffled_one():
    runs = np.repeat([0, 1, 0, 1], 25)  # labels in runs, as cells of one module
    ordered = lessons.neighbour_agreement(runs)
    assert ordered["observed"] == pytest.approx(96 / 99) and ordered["observed"] > ordered["shuffled_high"]
    shuffled = lessons.neighbour_agreement(np.random.default_rng(0).permutation(runs))
    assert shuffled["observed"] <= shuffled["shuffled_high"]
    with pytest.raises(ValueError, match="at least 3 labels"):
        lessons.neighbour_agreement([0, 1])


def test_the_elpv_module_note_says_what_the_split_tests_on():
    table = pd.DataFrame({"file": [f"images/cell{i:04d}.png" for i in range(120)],
                          "label": np.repeat(["functional", "defective"] * 2, 30)})
    note = lessons.elpv_module_note(table, {"test": table}, None)
    assert "beyond chance" in note and "new cells of modules the model has seen" in note
    assert "-p subject_col block" in note
    by_block = table.assign(subject=np.repeat(["a", "b", "c", "d"], 30))
    splits = {"train": by_block[by_block["subject"] != "d"], "test": by_block[by_block["subject"] == "d"]}
    assert "the 1 test block has no cell in train" in lessons.elpv_module_note(by_block, splits, "block")
    alike_by_chance = table.assign(label=np.random.default_rng(0).permutation(table["label"].to_numpy()))
    assert "no more alike than chance" in lessons.elpv_module_note(alike_by_chance, {"test": table}, None)


def test_class_names_the_plot_font_cannot_draw_are_said_once_and_their_warnings_silenced():
    import warnings

    import matplotlib.pyplot as plt

    assert lessons.missing_glyphs(["cat", "café crème", "Ωmega"]) == [] and lessons.font_note(["cat"]) == ""
    assert lessons.missing_glyphs(["日本", "cat"]) == ["日", "本"]
    assert "2 character(s) the plots' font" in lessons.font_note(["日本"])
    # A font later in font.family supplies what the first lacks (matplotlib's fallback): ⌚ is in STIX, not DejaVu
    assert lessons.missing_glyphs(["⌚ 日"]) == ["⌚", "日"]
    with plt.rc_context({"font.family": ["DejaVu Sans", "STIXGeneral"]}):
        assert lessons.missing_glyphs(["⌚ 日"]) == ["日"] and "(DejaVuSans, STIXGeneral)" in lessons.font_note(["日"])
    from helpers import workbook

    workbook.environment()  # every notebook's setup cell: silences matplotlib's warning per missing glyph
    fig, ax = plt.subplots()
    ax.set_title("日本")
    with warnings.catch_warnings(record=True) as caught:  # keeps the filters set so far
        fig.canvas.draw()
    plt.close(fig)
    assert not [w for w in caught if "missing from font" in str(w.message)]


def test_a_mirror_that_gains_beyond_the_noise_is_said_not_hidden():
    row = {"metric": "accuracy", "changed_answers": 20, "loss_beyond_noise": False}
    check = pd.DataFrame([
        {**row, "mirror": "none", "use": "as stored", "score": 0.80, "accuracy": 0.80, "difference": 0.0,
         "margin": 0.0, "changed_answers": 0},
        {**row, "mirror": "vertical mirror", "use": "scored on mirrors", "score": 0.85, "accuracy": 0.85,
         "difference": 0.05, "margin": 0.04},
        {**row, "mirror": "vertical mirror", "use": "averaged at test", "score": 0.81, "accuracy": 0.81,
         "difference": 0.01, "margin": 0.03}])
    advice = lessons.mirror_advice(check, "cells", 300)
    assert "no loss beyond the noise; *scored on mirrors* gained beyond it" in advice
    assert "gained" not in lessons.mirror_advice(check.assign(difference=[0.0, 0.03, 0.01]), "cells", 300)


def test_accuracy_by_stratum_splits_merged_labels_and_names_the_hardest():
    # ELPV's binary task: four expert probabilities merged into two classes
    files = [f"cell{i}.png" for i in range(40)]
    stratum = ["0.00"] * 20 + ["0.33"] * 5 + ["0.67"] * 5 + ["1.00"] * 10
    true = ["functional"] * 25 + ["defective"] * 15
    right = [True] * 20 + [True] * 4 + [False] + [False] * 4 + [True] + [True] * 9 + [False]
    pred = pd.DataFrame({"file": files[::-1], "true": true[::-1], "target": [t == "defective" for t in true[::-1]]})
    pred["predicted"] = np.where(right[::-1], pred["target"], ~pred["target"])
    table = lessons.accuracy_by_stratum(pred, pd.DataFrame({"file": files, "label": true, "stratum": stratum}))
    by = table.set_index("stratum")
    assert by.loc["0.67", "right"] == 1 and by.loc["0.67", "images"] == 5 and by.loc["0.67", "class"] == "defective"
    assert by["images"].sum() == 40 and by.loc["0.00", "accuracy"] == 1.0
    note = lessons.stratum_note(table)
    assert note.startswith("The hardest finer label is 0.67 (class *defective*): 1 of 5 right (0.20), against 0.94 "
                           "on the other 35 test images; a gap beyond chance")
    # Eight labels equally good, the worst picked: at most 1 in 20 such tables may claim a real gap (picking the
    # worst and testing it at 2 standard errors claimed one in about 1 of 3, a normal approximation in 1 of 8)
    rng = np.random.default_rng(0)
    claims = 0
    for _ in range(400):
        right = rng.binomial(5, 0.8, size=8)
        equal = pd.DataFrame({"stratum": list("abcdefgh"), "class": "x", "images": 5, "right": right,
                              "accuracy": right / 5})
        claims += "beyond chance" in lessons.stratum_note(equal)
    assert claims < 0.05 * 400
    # No finer label, or one per class: nothing to show
    split = pd.DataFrame({"file": files, "label": true})
    assert lessons.accuracy_by_stratum(pred, split) is None
    assert lessons.accuracy_by_stratum(pred, split.assign(stratum=true)) is None
    with pytest.raises(ValueError, match="not in the split table, e.g. 'cell39.png'"):
        lessons.accuracy_by_stratum(pred, split.assign(stratum=stratum).iloc[:-1])


def test_common_mistakes_names_the_top_pair_or_the_tie_in_words():
    def pred(pairs):
        return pd.DataFrame(pairs, columns=["true", "pred"])

    assert lessons.common_mistakes(pred([("a", "a"), ("b", "b")])) == "0 of 2 test images are wrong."
    one = lessons.common_mistakes(pred([("a", "b"), ("a", "b"), ("b", "a"), ("a", "a")]))
    assert one == ("3 of 4 test images are wrong; the most common mistake is *a* predicted as *b* (2 images, 67% of "
                   "the mistakes).")
    # Two different mistakes of one image each: a tie (this once crashed on numpy's bool times a string).
    tie = lessons.common_mistakes(pred([("a", "b"), ("b", "c"), ("c", "c")]))
    assert tie == ("2 of 3 test images are wrong; 2 mistakes tie as the most common, 1 image each: *a* predicted as "
                   "*b*, *b* predicted as *c*.")
    many = lessons.common_mistakes(pred([(str(i), "x") for i in range(7)]), shown=5)
    assert many.endswith(", ...") is False and "7 mistakes tie" in many and many.count("predicted as") == 5
    assert many.endswith("*4* predicted as *x*, ....")
