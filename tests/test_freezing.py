import numpy as np
import pytest
import torch
from skimage import data as skdata

from helpers.transforms import eval_transform
from helpers.freezing import (SIMILARITY_THRESHOLD, apply_strategy, frozen_prefix_length, measure_similarity,
                              param_groups, recommend, trainable_summary, unfreeze_last)
from helpers.models import create_model
from helpers.training import fit


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# efficientnet_lite0 with 2 classes: classifier 1280*2+2, head (conv_head + bn2) 412,160,
# stage7 605,440, stem 928, stage1 896, stage4 198,480 (80 output channels).
@pytest.mark.parametrize("strategy, options, expected, prefix", [
    ("head", {}, 2_562, 9),
    ("last_n", {"n": 2}, 605_440 + 412_160 + 2_562, 7),
    ("initial", {"n": 2}, 928 + 896 + 2_562, 0),
    ("truncate", {"n": 1, "after": "stage4"}, 80 * 2 + 2, 6),
    ("truncate", {"n": 2, "after": "stage4"}, 198_480 + 80 * 2 + 2, 4),
    ("full", {}, 3_373_570, 0),
])
def test_each_strategy_trains_exactly_the_intended_parameters(strategy, options, expected, prefix):
    model = apply_strategy(create_model("efficientnet_lite0", 2), strategy, **options)
    assert trainable(model) == expected
    assert frozen_prefix_length(model) == prefix
    assert model.strategy["name"] == strategy
    summary = trainable_summary(model)
    assert summary.iloc[-1]["trainable"] == expected
    assert summary.iloc[-1]["parameters"] == sum(p.numel() for p in model.parameters())


def test_truncate_builds_a_shorter_network():
    model = apply_strategy(create_model("efficientnet_lite0", 3), "truncate", after="stage3", n=1)
    assert model.group_names == ["stem", "stage1", "stage2", "stage3", "head", "classifier"]
    assert model.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(ValueError, match="head.*last_n.*initial.*truncate.*full"):
        apply_strategy(create_model("efficientnet_lite0", 2), "half")


def test_frozen_batchnorm_statistics_do_not_change_during_a_head_epoch(tiny_sets):
    train, val = tiny_sets
    model = apply_strategy(create_model("efficientnet_lite0", 2), "head")
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    head_before = model.classifier[1].weight.detach().clone()
    fit(model, train, val, epochs=1, batch_size=16, cache=False, progress=False, num_workers=0)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert not torch.equal(head_before, model.classifier[1].weight)  # the head did train

    # Without the safeguard, the same epoch drifts the "frozen" statistics.
    drifting = apply_strategy(create_model("efficientnet_lite0", 2), "head")
    drifting.keep_frozen_eval = False
    fit(drifting, train, val, epochs=1, batch_size=16, cache=False, progress=False, num_workers=0)
    assert any(not torch.equal(v, drifting.state_dict()[k]) for k, v in before.items())


def test_discriminative_learning_rates_decay_towards_the_stem():
    model = create_model("efficientnet_lite0", 2)
    groups = param_groups(model, lr=1e-3, layer_decay=0.5)
    lrs = {g["group"]: g["lr"] for g in groups}
    assert lrs["classifier"] == pytest.approx(1e-3)
    assert lrs["head"] == pytest.approx(5e-4)
    assert lrs["stem"] == pytest.approx(1e-3 * 0.5 ** 9)
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    assert all(g["weight_decay"] == 0.0 for g in groups if all(p.ndim <= 1 for p in g["params"]))


def test_gradual_unfreezing_follows_the_schedule(tiny_sets):
    train, val = tiny_sets
    model = apply_strategy(create_model("efficientnet_lite0", 2), "head")
    unfreeze_last(model, 1)
    stage7 = model.groups["stage7"][0].conv_pwl.weight.detach().clone()
    history = fit(model, train, val, epochs=2, batch_size=32, unfreeze_schedule={2: 3}, progress=False,
                  num_workers=0, restore_best=False)
    assert len(history) == 2
    assert trainable(model) == 605_440 + 412_160 + 2_562
    assert not torch.equal(stage7, model.groups["stage7"][0].conv_pwl.weight)
    assert history.attrs["cached_groups"][-1] == "stage6"  # only what stays frozen all run is cached


@pytest.mark.parametrize("n, similarity, expected", [
    (200, "similar", "head"), (200, "different", "truncate"),
    (50_000, "similar", "last_n"), (50_000, "different", "full"),
    (200, SIMILARITY_THRESHOLD + 0.1, "head"), (200, SIMILARITY_THRESHOLD - 0.1, "truncate"),
])
def test_recommend_implements_the_guide(n, similarity, expected):
    strategy, why = recommend(n, 2, similarity)
    assert strategy == expected
    assert expected in why and str(n) in why


def test_measured_similarity_separates_photos_from_solar_cells(tiny_root):
    from helpers.data import ImageDataset
    from helpers.models import BACKBONES

    transform = eval_transform(BACKBONES["efficientnet_lite0"])
    photos = torch.stack([transform(torch.from_numpy(getattr(skdata, n)()).permute(2, 0, 1))
                          for n in ("chelsea", "coffee", "astronaut", "rocket")])
    cells = ImageDataset(tiny_root, tiny_root / "labels.csv", transform=transform)
    cell_batch = torch.stack([cells[i][0] for i in range(0, 64, 4)])
    probe = create_model("efficientnet_lite0", None)
    photo_score = measure_similarity(photos, probe)
    cell_score = measure_similarity(cell_batch, probe)
    assert photo_score["similar"] and not cell_score["similar"]
    assert photo_score["similarity"] > SIMILARITY_THRESHOLD > cell_score["similarity"]
    assert 0 <= cell_score["mean_top1_probability"] <= 1 and cell_score["images"] == 16
    assert np.all((cell_score["per_image_similarity"] >= 0) & (cell_score["per_image_similarity"] <= 1))
