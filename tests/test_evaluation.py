"""helpers.evaluation: predictions, metrics against scikit-learn, calibration, Grad-CAM, plots."""

import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from helpers import evaluation as ev
from helpers.files import write_json
from helpers.freezing import apply_strategy
from helpers.models import available_backbones, create_model
from helpers.runtime import seed_everything

BINARY = ["functional", "defective"]


@pytest.fixture(scope="module")
def model():
    """Real ImageNet backbone, untrained 2-class head, only the head trainable (as in the course)."""
    seed_everything(0)
    return apply_strategy(create_model("efficientnet_lite0", 2), "head").eval()


def table(targets, predicted, probs, classes, groups=None):
    """A prediction table by hand, shaped like `ev.predict`'s."""
    probs = np.asarray(probs, dtype=float)
    frame = pd.DataFrame({"file": [f"img{i}.png" for i in range(len(targets))], "group": groups,
                          "true": [classes[t] for t in targets], "pred": [classes[p] for p in predicted],
                          "target": targets, "predicted": predicted})
    for j, c in enumerate(classes):
        frame[f"prob_{c}"] = probs[:, j]
    frame["confidence"] = probs.max(1)
    for j, c in enumerate(classes):
        frame[f"logit_{c}"] = np.log(probs[:, j])
    return frame


# ----------------------------------------------------------------------------------------
# predict


def test_predict_scores_in_fp32_as_the_export_runs_unless_asked_for_mixed_precision(model, tiny_sets, monkeypatch):
    # On a GPU the device's mixed precision (bf16) would flip answers of a probe with large folded weights, so the
    # reported scores would not be those of the fp32 model that ships. A CPU stands in: bf16 autocast works there.
    _, val = tiny_sets
    plain = ev.predict(model, val, batch_size=4, num_workers=0)
    monkeypatch.setattr(ev, "amp_dtype", lambda device: torch.bfloat16)
    default = ev.predict(model, val, batch_size=4, num_workers=0)
    mixed = ev.predict(model, val, batch_size=4, num_workers=0, amp=True)
    logits = ["logit_functional", "logit_defective"]
    np.testing.assert_array_equal(default[logits].to_numpy(), plain[logits].to_numpy())
    assert np.abs(mixed[logits].to_numpy() - plain[logits].to_numpy()).max() > 1e-4  # amp=True did run in bf16


def test_predict_columns_order_and_probabilities(model, tiny_sets):
    _, val = tiny_sets
    pred = ev.predict(model, val, batch_size=4, num_workers=0)
    expected = ["file", "group", "true", "pred", "target", "predicted", "prob_functional", "prob_defective",
                "confidence", "logit_functional", "logit_defective"]
    assert list(pred.columns) == expected
    assert pred["file"].tolist() == val.files  # dataset order
    assert pred["group"].tolist() == val.frame["group"].tolist()
    assert pred["target"].tolist() == val.targets
    probs = pred[["prob_functional", "prob_defective"]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)
    np.testing.assert_allclose(pred["confidence"], probs.max(1))
    assert (pred["predicted"] == probs.argmax(1)).all()
    assert (pred["pred"] == [BINARY[i] for i in pred["predicted"]]).all()
    # prob_ is the softmax of logit_, and logit_ is what the model outputs.
    logits = torch.tensor(pred[["logit_functional", "logit_defective"]].to_numpy())
    np.testing.assert_allclose(logits.softmax(1).numpy(), probs, atol=1e-9)
    with torch.no_grad():
        direct = model(torch.stack([val[i][0] for i in range(3)])).double()
    np.testing.assert_allclose(logits[:3].numpy(), direct.numpy(), atol=1e-4)


def test_saved_test_predictions_are_one_row_per_image_and_escape_formulas(tmp_path):
    pred = table([0, 1, 1], [0, 0, 1], [[0.9, 0.1], [0.7, 0.3], [0.2, 0.8]], BINARY)
    pred.loc[1, "file"] = "=HYPERLINK(evil).png"
    calibrated = ev.apply_temperature(pred, 2.0, BINARY)
    written = pd.read_csv(ev.save_predictions(pred, tmp_path / "test_predictions.csv", calibrated))
    assert list(written.columns) == ["file", "true", "pred", "correct", "confidence", "calibrated_confidence",
                                     "prob_functional", "prob_defective"]  # no group column: the data has none
    assert written["correct"].tolist() == [True, False, True] and written["file"][1] == "'=HYPERLINK(evil).png"
    np.testing.assert_allclose(written["confidence"], [0.9, 0.7, 0.8])
    assert (written["calibrated_confidence"] < written["confidence"]).all()  # T = 2 softens every answer
    with pytest.raises(ValueError, match="other images"):
        ev.save_predictions(pred, tmp_path / "x.csv", calibrated.iloc[::-1])


@pytest.mark.parametrize("tta", ["hflip", "hvflip"])
def test_predict_tta_averages_only_the_allowed_flips(model, tiny_sets, tta):
    _, val = tiny_sets
    pred = ev.predict(model, val, batch_size=8, tta=tta, num_workers=0)
    x = torch.stack([val[i][0] for i in range(len(val))])
    views = (x, x.flip(-1)) if tta == "hflip" else (x, x.flip(-1), x.flip(-2))  # photos have an 'up'
    with torch.no_grad():
        manual = torch.stack([model(v).softmax(1) for v in views]).mean(0)
    np.testing.assert_allclose(pred[["prob_functional", "prob_defective"]].to_numpy(), manual.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="unknown tta True"):
        ev.predict(model, val, tta=True, num_workers=0)


def test_tta_follows_the_augmentation_recipe():
    from helpers.transforms import TTA_FLIPS

    assert TTA_FLIPS["natural"] == "hflip" and TTA_FLIPS["cells"] == "hvflip"
    # data a flip can change (digits, text) gets no flips at test time either
    assert TTA_FLIPS["none"] is None and TTA_FLIPS["natural_no_flip"] is None


def test_predict_rejects_class_mismatch(tiny_sets):
    _, val = tiny_sets
    three = create_model("efficientnet_lite0", 3, pretrained=False)
    with pytest.raises(ValueError, match="3 outputs"):
        ev.predict(three, val, num_workers=0)


# ----------------------------------------------------------------------------------------
# compute_metrics


def test_compute_metrics_known_answers():
    targets, predicted = [0, 0, 1, 1], [0, 1, 1, 1]
    prob_b = [0.1, 0.6, 0.8, 0.9]
    pred = table(targets, predicted, [[1 - p, p] for p in prob_b], ["a", "b"], groups=["x", "y", "x", "y"])
    m = ev.compute_metrics(pred, ["a", "b"])
    assert m["accuracy"] == 0.75  # 3 of 4
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)  # a: P=1 R=.5; b: P=2/3 R=1
    assert m["roc_auc"] == 1.0  # every defective scored above every functional
    assert m["n"] == 4
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["per_group"]["x"]["accuracy"] == 1.0 and m["per_group"]["x"]["n"] == 2
    assert m["per_group"]["y"]["accuracy"] == 0.5
    json.dumps(m)  # plain Python types only


def test_compute_metrics_matches_sklearn_multiclass():
    rng = np.random.default_rng(0)
    classes = ["0.00", "0.33", "0.67", "1.00"]
    targets = rng.integers(0, 4, 60)
    probs = rng.dirichlet(np.ones(4), 60)
    probs[np.arange(60), targets] += 0.5  # better than chance
    probs /= probs.sum(1, keepdims=True)
    predicted = probs.argmax(1)
    m = ev.compute_metrics(table(targets, predicted, probs, classes), classes)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(targets, predicted))
    assert m["macro_f1"] == pytest.approx(f1_score(targets, predicted, average="macro"))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(targets, probs, multi_class="ovr", average="macro"))
    assert m["per_group"] == {}  # no groups given


def test_compute_metrics_group_missing_a_class_has_no_auc():
    pred = table([0, 1, 0, 0], [0, 1, 1, 0], [[.9, .1], [.2, .8], [.4, .6], [.7, .3]], BINARY,
                 groups=["mono", "mono", "poly", "poly"])
    m = ev.compute_metrics(pred, BINARY)
    assert m["per_group"]["poly"]["roc_auc"] is None
    assert "defective" in m["per_group"]["poly"]["roc_auc_note"]
    assert m["per_group"]["mono"]["roc_auc"] == 1.0
    assert m["roc_auc"] == pytest.approx(1.0)  # overall both classes exist


def test_compute_metrics_names_missing_columns():
    pred = table([0, 1], [0, 1], [[.9, .1], [.2, .8]], BINARY).drop(columns="prob_defective")
    with pytest.raises(KeyError, match="prob_defective"):
        ev.compute_metrics(pred, BINARY)


# ----------------------------------------------------------------------------------------
# Calibration


def test_ece_hand_example():
    probs = np.array([[0.8, 0.2], [0.8, 0.2]])
    assert ev.expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.3)  # 50 % right at 0.8
    # Two bins of four: 0.75 sits in (0.5, 0.75] with another 0.75 (one right: gap 0.25), 0.8 alone in (0.75, 1]
    # (right: gap 0.2). Weighted by their sizes: 2/3 x 0.25 + 1/3 x 0.2 = 7/30.
    probs = np.array([[0.75, 0.25], [0.75, 0.25], [0.8, 0.2]])
    assert ev.expected_calibration_error(probs, np.array([0, 1, 0]), n_bins=4) == pytest.approx(7 / 30, abs=1e-12)


def test_ece_calibrated_vs_overconfident():
    rng = np.random.default_rng(0)
    n = 20000
    confidence = rng.uniform(0.5, 1.0, n)
    probs = np.stack([confidence, 1 - confidence], 1)  # always predicts class 0 ...
    targets = np.where(rng.uniform(size=n) < confidence, 0, 1)  # ... and is right with that probability
    assert ev.expected_calibration_error(probs, targets) < 0.02
    overconfident = np.tile([0.99, 0.01], (n, 1))
    wrong_40 = np.where(rng.uniform(size=n) < 0.6, 0, 1)
    assert ev.expected_calibration_error(overconfident, wrong_40) == pytest.approx(0.39, abs=0.02)


def test_ece_by_chance_is_what_a_calibrated_model_scores_on_that_many_images():
    rng = np.random.default_rng(1)
    seen = {}
    for n in (40, 400, 4000):
        confidence = rng.uniform(0.5, 1.0, n)
        probs = np.stack([confidence, 1 - confidence], 1)
        # ECEs of 200 test sets drawn from this calibrated model: their mean is what chance alone gives
        draws = [ev.expected_calibration_error(probs, np.where(rng.uniform(size=n) < confidence, 0, 1))
                 for _ in range(200)]
        seen[n] = ev.ece_by_chance(probs)
        assert seen[n] == pytest.approx(np.mean(draws), rel=0.15), n
    assert seen[40] > 3 * seen[4000] > 0  # the bias shrinks with more images
    assert ev.ece_by_chance(probs, quantile=0.95) > seen[4000]  # the mean of the draws is below their 95th centile
    with pytest.raises(ValueError, match="quantile must be in"):
        ev.ece_by_chance(probs, quantile=95)
    assert ev.ece_by_chance(np.tile([1.0, 0.0], (50, 1))) == 0.0  # certain and always right: no gap to find
    assert ev.ece_by_chance(np.tile([0.7, 0.3], (50, 1))) == ev.ece_by_chance(np.tile([0.7, 0.3], (50, 1)))
    with pytest.raises(ValueError, match="non-empty"):
        ev.ece_by_chance(np.zeros((0, 2)))


def toy_logits(n, seed):
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(size=(n, 3)) * 2.0
    p = torch.tensor(true_logits).softmax(1).numpy()
    labels = np.array([rng.choice(3, p=row) for row in p])
    return true_logits * 2.0, labels  # a model twice as sure as it should be


def nll(logits, labels, t=1.0):
    return float(torch.nn.functional.cross_entropy(torch.tensor(logits) / t, torch.tensor(labels)))


def test_ece_difference_se_is_zero_for_equal_probabilities_and_shrinks_with_more_images():
    rng = np.random.default_rng(0)

    def sample(n):
        targets = rng.integers(0, 2, n)
        confident = np.where(rng.random(n) < 0.8, targets, 1 - targets)  # right 80 % of the time
        sharp = np.eye(2)[confident] * 0.98 + 0.01  # claims 99 %
        return sharp, np.full((n, 2), 0.5) + (np.eye(2)[confident] - 0.5) * 0.6, targets  # and 80 %

    sharp, soft, targets = sample(60)
    assert ev.ece_difference_se(sharp, sharp, targets) == 0.0
    small = ev.ece_difference_se(sharp, soft, targets)
    assert small > 0.0
    assert ev.ece_difference_se(*sample(2000)) < small / 3  # about 1 / sqrt(33) of it
    with pytest.raises(ValueError, match="same shape"):
        ev.ece_difference_se(sharp, np.full((60, 3), 1 / 3), targets)


def test_ece_difference_se_over_subjects_is_wider_when_subjects_err_together():
    # 12 subjects of 20 images: the sharp model is wrong on every image of subjects 0-2, the soft one hedges.
    subject = np.repeat(np.arange(12), 20)
    targets = np.zeros(240, dtype=int)
    sharp = np.where((subject < 3)[:, None], [[0.02, 0.98]], [[0.98, 0.02]])
    soft = np.where((subject < 3)[:, None], [[0.4, 0.6]], [[0.75, 0.25]])
    per_image = ev.ece_difference_se(sharp, soft, targets)
    assert ev.ece_difference_se(sharp, soft, targets, groups=subject) > 2 * per_image
    with pytest.raises(ValueError, match="groups has 3 entries for 240 images"):
        ev.ece_difference_se(sharp, soft, targets, groups=[1, 2, 3])


def test_fit_temperature_recovers_two_and_lowers_heldout_nll():
    logits, labels = toy_logits(4000, seed=0)
    t = ev.fit_temperature(logits, labels)
    assert t == pytest.approx(2.0, rel=0.1)
    held_logits, held_labels = toy_logits(2000, seed=1)
    assert nll(held_logits, held_labels, t) < nll(held_logits, held_labels) - 0.05
    # Also accepts tensors.
    assert ev.fit_temperature(torch.tensor(logits), torch.tensor(labels)) == pytest.approx(t, rel=1e-4)


def test_a_temperature_at_the_end_of_its_range_is_flagged():
    labels = np.array([0, 1] * 20)
    wrong_and_sure = np.where(labels[:, None] == np.arange(2), -5.0, 5.0)  # confidently wrong every time
    with pytest.warns(ev.TemperatureLimitWarning, match="search limit"):
        t = ev.fit_temperature(wrong_and_sure, labels)
    assert ev.temperature_at_limit(t) and t == pytest.approx(ev.TEMPERATURE_RANGE[1], rel=1e-3)
    assert not ev.temperature_at_limit(2.0) and not ev.temperature_at_limit(1.0)


def test_fit_temperature_validates():
    with pytest.raises(ValueError, match="class indices"):
        ev.fit_temperature(np.zeros((3, 2)), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="NaN"):
        ev.fit_temperature(np.array([[np.nan, 0.0], [0.0, 1.0]]), np.array([0, 1]))


def test_apply_temperature_recomputes_probabilities():
    logits, labels = toy_logits(50, seed=2)
    probs = torch.tensor(logits).softmax(1).numpy()
    classes = ["a", "b", "c"]
    pred = table(labels, probs.argmax(1), probs, classes)
    cooled = ev.apply_temperature(pred, 2.0, classes)
    expected = torch.tensor(logits / 2.0).softmax(1).numpy()
    np.testing.assert_allclose(cooled[["prob_a", "prob_b", "prob_c"]].to_numpy(), expected, atol=1e-9)
    assert (cooled["predicted"] == pred["predicted"]).all()  # T > 0 never changes the winner
    assert (cooled["confidence"] < pred["confidence"]).all()
    assert (pred[["prob_a"]].to_numpy() == probs[:, :1]).all()  # the input is not modified
    with pytest.raises(ValueError, match="temperature"):
        ev.apply_temperature(pred, 0.0, classes)


# ----------------------------------------------------------------------------------------
# Error analysis and Grad-CAM


def test_most_confident_mistakes_order():
    pred = table([0, 0, 1, 1, 0], [1, 0, 0, 0, 1], [[.4, .6], [.9, .1], [.7, .3], [.95, .05], [.1, .9]], BINARY)
    top = ev.most_confident_mistakes(pred, k=3)
    assert top.index.tolist() == [3, 4, 2]  # wrong ones only, surest first
    assert top["confidence"].is_monotonic_decreasing
    assert (top["predicted"] != top["target"]).all()
    assert len(ev.most_confident_mistakes(pred, k=10)) == 4


def test_plot_mistakes_shows_the_images(model, tiny_sets):
    _, val = tiny_sets
    pred = ev.predict(model, val, num_workers=0)
    pred["predicted"] = 1 - pred["target"]  # make every image a mistake
    pred["pred"] = [BINARY[i] for i in pred["predicted"]]
    fig = ev.plot_mistakes(pred, val, k=3)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 3
    assert shown[0].images[0].get_array().shape[:2] == tuple(val.load(0).shape[1:])
    assert "true" in shown[0].get_title() and "pred" in shown[0].get_title()
    plt.close(fig)


def test_gradcam_maps_and_overlays(model, tiny_sets):
    _, val = tiny_sets
    images, cams, probs = ev.gradcam_maps(model, val, [0, 1])
    assert cams.shape == (2, 64, 64)  # heat map at the size of the image the model saw
    assert images.shape == (2, 64, 64, 3) and 0.0 <= images.min() and images.max() <= 1.0
    assert 0.0 <= cams.min() and cams.max() <= 1.0 and cams.max() > 0.0
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert not any(p.requires_grad for p in model.groups["stage1"].parameters())  # freezing left alone
    fig = ev.gradcam_overlays(model, val, [0, 1, 2], target_class="defective")
    assert isinstance(fig, Figure) and sum(bool(ax.images) for ax in fig.axes) == 3
    assert "defective" in fig._suptitle.get_text()
    plt.close(fig)
    with pytest.raises(ValueError, match="classes are"):
        ev.gradcam_maps(model, val, [0], target_class="cracked")


# One of each architecture family in the registry (lite1/2 and resnet50 share code with lite0/resnet18).
FAMILIES = ["efficientnet_lite0", "resnet18", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny",
            "timm/convnext_atto", "timm/resnet10t"]


def test_families_cover_the_registry():
    assert set(available_backbones()) - set(FAMILIES) <= {"efficientnet_lite1", "efficientnet_lite2", "resnet50"}


@pytest.mark.parametrize("name", FAMILIES)
def test_gradcam_target_layer_is_the_map_global_pooling_reads(name):
    m = create_model(name, 2, pretrained=False).eval()
    layer = ev.gradcam_target_layer(m)
    pool = next(c for c in m.groups["head"].modules() if "Pool" in type(c).__name__)
    seen = {}
    handles = [layer.register_forward_hook(lambda mod, inp, out: seen.setdefault("layer", []).append(out)),
               pool.register_forward_hook(lambda mod, inp, out: seen.setdefault("pool", []).append(inp[0]))]
    with torch.no_grad():
        m(torch.zeros(1, 3, 64, 64))
    for handle in handles:
        handle.remove()
    (out,), (pooled,) = seen["layer"], seen["pool"]
    # A spatial map, hit once per forward, and exactly what the pooling reads (after any residual add,
    # normalization and activation: not the last Conv2d inside ResNet's or ConvNeXt's last block)
    assert out.ndim == 4 and torch.equal(out, pooled)


def test_gradcam_target_layer_of_truncated_model():
    m = apply_strategy(create_model("efficientnet_lite0", 2, pretrained=False), "truncate", after="stage3")
    assert ev.gradcam_target_layer(m) is m.groups["stage3"]


# ----------------------------------------------------------------------------------------
# Plots


def test_plots_return_figures():
    rng = np.random.default_rng(0)
    classes = ["0.00", "0.33", "0.67", "1.00"]
    targets = np.array([0, 0, 1, 3, 3, 0, 1, 3])  # no "0.67": listed, not drawn
    probs = rng.dirichlet(np.ones(4), len(targets))
    pred = table(targets, probs.argmax(1), probs, classes)
    history = pd.DataFrame({"epoch": [1, 2, 3], "lr": [1e-3] * 3, "train_loss": [1.0, 0.7, 0.5],
                            "train_accuracy": [0.5, 0.7, 0.8], "val_loss": [0.9, 0.8, 0.85],
                            "val_accuracy": [0.6, 0.7, 0.65], "val_macro_f1": [0.5, 0.6, 0.55]})
    figures = [ev.plot_confusion_matrix(pred, classes), ev.plot_confusion_matrix(pred, classes, normalize=True),
               ev.plot_roc_pr(pred, classes), ev.plot_learning_curves(history),
               ev.plot_reliability(probs, targets)]
    bin_pred = table([0, 1, 1, 0], [0, 1, 0, 0], [[.8, .2], [.3, .7], [.6, .4], [.9, .1]], BINARY)
    figures.append(ev.plot_roc_pr(bin_pred, BINARY))
    assert all(isinstance(f, Figure) for f in figures)
    assert "0.67" in figures[2].axes[1].get_title()  # the class that could not be drawn is named
    assert "epoch 2" in figures[3].axes[1].get_title()  # best val_macro_f1
    judged_last = ev.plot_learning_curves(history, kept="last")  # notebook 04's phase 2: the last epoch is judged
    assert judged_last.axes[1].get_title() == "scores (best val_macro_f1 at epoch 2; judged: epoch 3, the last)"
    assert [line.get_xdata()[0] for line in judged_last.axes[0].lines[-2:]] == [2, 3]
    figures.append(judged_last)
    for f in figures:
        plt.close(f)
    with pytest.raises(KeyError, match="val_loss"):
        ev.plot_learning_curves(history.drop(columns="val_loss"))


# ----------------------------------------------------------------------------------------
# Results files


def test_summarize_run_and_write_json(tmp_path):
    pred = table([0, 1, 1, 0], [0, 1, 0, 0], [[.8, .2], [.3, .7], [.6, .4], [.9, .1]], BINARY,
                 groups=["mono", "poly", "mono", "poly"])
    ckpt = {"backbone": "efficientnet_lite0", "strategy": {"name": "head"}, "classes": BINARY,
            "preprocessing": {"image_size": 224, "crop_pct": 1.0}, "meta": {"task": "binary"}}
    fit_summary = {"train_seconds": 12.5, "config": {"epochs": 3}}
    summary = ev.summarize_run(pred, BINARY, ckpt, fit_summary, ece=0.1, ece_after=0.05, temperature=1.5,
                               tta_pred=pred, tta="hvflip")
    assert tuple(summary) == ev.METRICS_KEYS
    assert summary["test_accuracy"] == 0.75 and summary["tta_accuracy"] == 0.75 and summary["tta"] == "hvflip"
    assert summary["image_size"] == 224
    assert summary["ece_by_chance"] == ev.ece_by_chance(np.array([[.8, .2], [.3, .7], [.6, .4], [.9, .1]]))
    assert summary["task"] == "binary" and summary["epochs"] == 3 and summary["n_test"] == 4
    assert summary["per_group"]["mono"]["n"] == 2
    assert summary["baseline_majority"] is None and summary["selection_metric"] is None  # no baselines given
    baselines = {"majority": {"class": "functional", "accuracy": 0.5, "balanced_accuracy": 0.5, "macro_f1": 0.33},
                 "probe": {"accuracy": 0.75, "balanced_accuracy": 0.7, "macro_f1": 0.72},
                 "scratch": {"score": 0.4, "pretrained_score": 0.6, "metric": "macro_f1"}}
    with_baselines = ev.summarize_run(pred, BINARY, ckpt, fit_summary, ece=0.1, ece_after=0.05, temperature=1.5,
                                      baselines=baselines, final="probe", candidate="last_n")
    assert summary["candidate_strategy"] is None and with_baselines["candidate_strategy"] == "last_n"
    assert with_baselines["baseline_majority_macro_f1"] == 0.33 and with_baselines["baseline_probe_macro_f1"] == 0.72
    assert with_baselines["baseline_scratch_val"] == 0.4 and with_baselines["selection_metric"] == "macro_f1"
    assert with_baselines["tta"] is None and with_baselines["tta_accuracy"] is None
    path = write_json(tmp_path / "run" / "metrics.json", summary)
    assert json.loads(path.read_text()) == json.loads(json.dumps(summary))
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temporary file left
    with pytest.raises(KeyError, match="train_seconds"):
        ev.summarize_run(pred, BINARY, ckpt, {"epochs": 3}, 0.1, 0.05, 1.5)
    with pytest.raises(ValueError, match="classes"):
        ev.summarize_run(pred, ["x", "y"], ckpt, fit_summary, 0.1, 0.05, 1.5)


def test_write_json_refuses_nan_and_converts_numpy(tmp_path):
    with pytest.raises(ValueError, match="bad.json"):
        write_json(tmp_path / "bad.json", {"x": float("nan")})
    assert not (tmp_path / "bad.json").exists()
    path = write_json(tmp_path / "ok.json", {"a": np.float32(0.5), "b": np.int64(3), "c": np.arange(2)})
    assert json.loads(path.read_text()) == {"a": 0.5, "b": 3, "c": [0, 1]}


def test_published_results():
    table_ = ev.published_results()
    assert {"source", "protocol", "model", "task", "metric", "value"} <= set(table_.columns)
    deitsch = table_[table_["source"].str.startswith("Deitsch")]
    assert sorted(deitsch["value"]) == [0.8244, 0.8842]
    assert table_["protocol"].str.len().min() > 20
    assert table_["value"].between(0, 1).all()
    assert set(table_["task"]) == {"binary", "4class", "unclear"}


def test_published_figures_are_compared_on_the_same_task_metric_and_cell_type():
    scores = {"accuracy": 0.7, "balanced_accuracy": 0.6, "macro_f1": 0.5}
    metrics = {"test_accuracy": 0.75, "test_macro_f1": 0.55,
               "per_group": {"mono": {**scores, "accuracy": 0.8}, "poly": {**scores, "macro_f1": 0.4}}}
    four = ev.published_comparison(ev.published_results(), "4class", metrics)
    assert not any("binary" in line for line in four)  # Song's binary figure is not a 4-class result
    assert len(four) == 6  # Deitsch's two (task unclear) and Song's four per-cell-type rows
    assert "- Song et al. 2024: VGG-19 (4class), mono cells, accuracy: ≈0.810; this run 0.800 (-0.010)" in four
    assert "- Song et al. 2024: VGG-19 (4class), poly cells, macro-f1: 0.590; this run 0.400 (-0.190)" in four
    assert ("- Deitsch et al. 2019: VGG-19 (ImageNet, fine-tuned) (task not stated), both cell types, accuracy: "
            "0.884; this run 0.750 (no difference given: the figure may be for the other task)") in four
    binary = ev.published_comparison(ev.published_results(), "binary", metrics)
    # Song's binary figure is per cell type (a model for each): compared with each group's score
    assert [line for line in binary if "(binary)" in line] == [
        "- Song et al. 2024: VGG-19 (binary), mono cells (the paper gives one figure for its mono and poly models), "
        "accuracy: ≈0.900; this run 0.800 (-0.100)",
        "- Song et al. 2024: VGG-19 (binary), poly cells (the paper gives one figure for its mono and poly models), "
        "accuracy: ≈0.900; this run 0.700 (-0.200)"]
    assert len(ev.published_comparison(ev.published_results(), "4class", {**metrics, "per_group": {}})) == 2


def test_published_comparison_gives_each_score_its_own_bootstrap_noise():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 4, 400)
    predicted = np.where(rng.random(400) < 0.7, targets, rng.integers(0, 4, 400))
    group = np.where(np.arange(400) < 100, "mono", "poly")
    pred = pd.DataFrame({"target": targets, "predicted": predicted, "group": group})
    per_group = {g: {"accuracy": float((predicted == targets)[group == g].mean()), "macro_f1": 0.5}
                 for g in ("mono", "poly")}
    lines = ev.published_comparison(ev.published_results(), "4class",
                                    {"test_accuracy": 0.7, "test_macro_f1": 0.6, "per_group": per_group}, pred)
    margins = {line.split(", ")[1]: float(line.split("images: ±")[1].split(",")[0]) for line in lines
               if "accuracy" in line and "Song" in line}
    assert "on its 100 images" in next(line for line in lines if "mono cells, accuracy" in line)
    # The difference to a published figure is about sqrt(2) as noisy as this run's score, and gets a verdict
    mono = next(line for line in lines if "mono cells, accuracy" in line)
    margin = margins["mono cells"]
    gap = per_group["mono"]["accuracy"] - 0.81
    assert f"of the difference about ±{np.sqrt(2) * margin:.3f}: " in mono
    assert mono.endswith("within the noise)" if abs(gap) <= np.sqrt(2) * margin else "by more than the noise)")
    far = {**per_group, "mono": {"accuracy": 0.81 - 2 * np.sqrt(2) * margin, "macro_f1": 0.5}}
    lines_far = ev.published_comparison(ev.published_results(), "4class",
                                        {"test_accuracy": 0.7, "test_macro_f1": 0.6, "per_group": far}, pred)
    assert next(line for line in lines_far if "mono cells, accuracy" in line).endswith(
        ": below it by more than the noise)")
    # 100 mono images are noisier than 300 poly ones, and close to the binomial two standard errors
    assert margins["mono cells"] > 1.5 * margins["poly cells"]
    accuracy = per_group["mono"]["accuracy"]
    assert margins["mono cells"] == pytest.approx(2 * np.sqrt(accuracy * (1 - accuracy) / 100), rel=0.15)
    all_wrong = pred.assign(predicted=(pred["target"] + 1) % 4)  # no spread to bootstrap: not a margin of zero
    lines = ev.published_comparison(ev.published_results(), "4class",
                                    {"test_accuracy": 0.0, "test_macro_f1": 0.0, "per_group": per_group}, all_wrong)
    assert "every resample of its 100 images scores the same, so the bootstrap cannot measure its noise" in lines[2]


def test_score_margin_is_two_bootstrap_standard_errors_and_zero_without_spread():
    from helpers.metrics import score_margin

    rng = np.random.default_rng(1)
    targets = rng.integers(0, 2, 400)
    predicted = np.where(rng.random(400) < 0.8, targets, 1 - targets)
    accuracy = float((predicted == targets).mean())
    assert score_margin("accuracy", targets, predicted) == pytest.approx(
        2 * np.sqrt(accuracy * (1 - accuracy) / 400), rel=0.1)
    assert score_margin("macro_f1", targets, targets) == 0.0


@pytest.mark.filterwarnings("ignore::pandas.errors.PerformanceWarning")  # table() adds 60 logit columns one by one
def test_a_confusion_matrix_of_60_classes_stays_a_readable_size():
    rng = np.random.default_rng(0)
    classes = [f"class {i}" for i in range(60)]
    targets = rng.integers(0, 60, 300)
    probs = rng.dirichlet(np.ones(60), len(targets))
    pred = table(targets, probs.argmax(1), probs, classes)
    for normalize in (False, True):
        fig = ev.plot_confusion_matrix(pred, classes, normalize=normalize)
        try:
            assert max(fig.get_size_inches()) <= ev.MAX_MATRIX_INCHES  # 1.2 in a cell would be 74.5 inches
            assert not fig.axes[0].texts and "60 classes, numbers left out" in fig.axes[0].get_title()
        finally:
            plt.close(fig)
    few = ev.plot_confusion_matrix(table([0, 1, 1], [0, 1, 0], [[.8, .2], [.3, .7], [.6, .4]], BINARY), BINARY)
    assert len(few.axes[0].texts) == 4  # a small matrix keeps its numbers
    plt.close(few)


def test_per_subject_lists_the_worst_subjects_first():
    pred = pd.DataFrame({"target": [0, 0, 1, 1, 1, 0], "predicted": [0, 1, 0, 0, 1, 0],
                         "true": ["a", "a", "b", "b", "b", "a"]})
    table = ev.per_subject(pred, ["s1", "s1", "s2", "s2", "s3", "s3"])
    assert list(table["subject"]) == ["s2", "s1", "s3"]  # 0/2, then 1/2, then 2/2
    assert list(table["right"]) == [0, 1, 2] and list(table["accuracy"]) == [0.0, 0.5, 1.0]
    assert table.set_index("subject").loc["s3", "classes"] == "a, b"
    # 3 of 6 right overall: a subject of 2 images moves by 2 * sqrt(0.25 / 2) = 0.71 by chance, so none stands out
    assert np.allclose(table["chance"], 2 * np.sqrt(0.25 / 2)) and not table["beyond_chance"].any()
    with pytest.raises(ValueError, match="subjects has 2 entries for 6 predictions"):
        ev.per_subject(pred, ["s1", "s2"])


def test_a_temperature_is_kept_only_if_it_helps_on_validation_images_it_was_not_fitted_on():
    from helpers.evaluation import fit_temperature, temperature_holds_up

    rng = np.random.default_rng(0)
    calibrated = rng.normal(0, 1, (400, 3))
    targets = np.array([rng.choice(3, p=p) for p in torch.tensor(calibrated).softmax(1).numpy()])
    overconfident = temperature_holds_up(5 * calibrated, targets)  # what temperature scaling is for
    assert overconfident["holds_up"] and overconfident["nll_fitted"] < 0.6 * overconfident["nll_plain"]
    assert overconfident["folds"] == 10
    # Four equally sure answers, one wrong: T = 1.8 fits them, but each fit on three images misjudges the fourth
    logits, few = np.array([[2.0, 0.0]] * 4), np.array([0, 0, 0, 1])
    assert fit_temperature(logits, few) == pytest.approx(1.82, abs=0.01)
    held_out = temperature_holds_up(logits, few)
    assert held_out["folds"] == 4 and not held_out["holds_up"] and held_out["nll_fitted"] > held_out["nll_plain"]
    assert not temperature_holds_up(logits[:1], few[:1])["holds_up"]  # one image: nothing to hold out
    # With groups (copies of one picture), whole groups are held out: two copies of each of the four answers
    grouped = temperature_holds_up(np.repeat(logits, 2, axis=0), np.repeat(few, 2), groups=np.repeat(np.arange(4), 2))
    assert grouped["folds"] == 4 and not grouped["holds_up"]
    assert grouped["nll_fitted"] == pytest.approx(held_out["nll_fitted"], rel=0.05)  # as without the copies


def test_published_verdicts_resample_whole_subjects_when_given():
    # Test cells of one module right or wrong together: over modules the noise is wider, never narrower
    rng = np.random.default_rng(0)
    module = np.repeat(np.arange(20), 20)
    good = rng.random(20) < 0.8  # whole modules right, or whole modules wrong
    targets = np.zeros(400, dtype=int)
    pred = pd.DataFrame({"target": targets, "predicted": np.where(good[module], 0, 1),
                         "group": np.where(module < 10, "mono", "poly")})
    metrics = {"test_accuracy": 0.8, "per_group": {g: {"accuracy": float((pred["predicted"] == 0)[pred["group"] == g]
                                                                      .mean())} for g in ("mono", "poly")}}

    def margin(lines):
        line = next(line for line in lines if "(binary), mono cells" in line)
        return float(line.split("images: ±")[1].split(",")[0])

    per_image = margin(ev.published_comparison(ev.published_results(), "binary", metrics, pred))
    per_module = margin(ev.published_comparison(ev.published_results(), "binary", metrics, pred, units=module))
    assert per_module > 2 * per_image
    one = ev.published_comparison(ev.published_results(), "binary", metrics, pred, units=np.zeros(400))
    assert "show one subject, so the noise cannot be measured" in next(line for line in one if "mono cells" in line)
