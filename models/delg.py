"""DELG in PyTorch: one backbone, a global head (GeM -> whitening FC -> L2 -> ArcFace) on the last stage
and a local head (attention + autoencoder, behind a stop-gradient) on the stage before it.

Published details (Cao, Araujo & Sim, ECCV 2020; official TF2 code): GeM p=3, ArcFace margin 0.1 and
scale sqrt(D) (not trained), attention = 1x1 conv -> BN -> ReLU -> 1x1 conv -> softplus, autoencoder
1x1 conv to 128-d and back with ReLU, loss = CE_global + 1.0 CE_attention + 10 MSE_reconstruction.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.backbone import create_backbone
from models.config import ModelConfig


def gem(x: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean pooling. x: [B x C x H x W] -> [B x C]."""
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class ArcFace(nn.Module):
    """Cosine classifier with an additive angular margin; optional sub-centers and per-class margins.

    embeddings: [B x D] (L2-normalised), labels: [B] -> logits [B x C].
    """

    def __init__(self, dim: int, num_classes: int, margin: float = 0.1, scale: float = 0.0, subcenters: int = 1,
                 class_counts: torch.Tensor | None = None):
        super().__init__()
        self.k = subcenters
        self.weight = nn.Parameter(torch.empty(num_classes * subcenters, dim))
        nn.init.xavier_uniform_(self.weight)
        self.register_buffer("scale", torch.tensor(scale or math.sqrt(dim)))  # not trained (official code)
        if class_counts is not None:  # rare classes get larger margins: 0.05 .. 0.5
            t = class_counts.float().clamp(min=1).pow(-0.25)
            t = (t - t.min()) / (t.max() - t.min() + 1e-12)
            margins = t * 0.45 + 0.05
        else:
            margins = torch.full((num_classes,), float(margin))
        self.register_buffer("margins", margins)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(embeddings, dim=-1), F.normalize(self.weight, dim=-1))
        if self.k > 1:
            cos = cos.view(cos.shape[0], -1, self.k).amax(dim=-1)
        return cos

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(embeddings).clamp(-1 + 1e-7, 1 - 1e-7)
        m = self.margins[labels]
        target = cos.gather(1, labels[:, None]).squeeze(1)
        theta = torch.acos(target)
        with_margin = torch.where(theta <= math.pi - m, torch.cos(theta + m), target)
        logits = cos.scatter(1, labels[:, None], with_margin[:, None])
        return logits * self.scale


class Attention(nn.Module):
    """Keypoint attention. features: [B x C x h x w] -> scores [B x 1 x h x w] (softplus, >= 0)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, 1, 1), nn.Softplus())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class Autoencoder(nn.Module):
    """1x1 conv reduction to the local descriptor size and back.

    The paper puts a ReLU on the expansion because ResNet's conv4 output is post-ReLU; EfficientNet
    stages end in a linear bottleneck with negative values, so the expansion is linear here.
    """

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.encode = nn.Conv2d(channels, dim, 1)
        self.decode = nn.Conv2d(dim, channels, 1)


class DELG(nn.Module):
    def __init__(self, cfg: ModelConfig, num_classes: int = 0, class_counts: torch.Tensor | None = None,
                 load_pretrained: bool | None = None, off_the_shelf: bool = False):
        super().__init__()
        self.off_the_shelf = off_the_shelf
        self.backbone = create_backbone(cfg.backbone, cfg.pretrained if load_pretrained is None else load_pretrained)
        if cfg.mean is None or cfg.std is None:  # the backbone's own normalisation, kept with its timm config
            norm = getattr(self.backbone, "pretrained_cfg", None) or {}
            cfg = dataclasses.replace(cfg, mean=tuple(norm.get("mean", (0.485, 0.456, 0.406))),
                                      std=tuple(norm.get("std", (0.229, 0.224, 0.225))))
        self.cfg = cfg
        c_local, c_global = self.backbone.feature_info.channels()
        self.local_stride, self.global_stride = self.backbone.feature_info.reduction()
        self.local_dim = cfg.local_dim or (128 if c_local >= 256 else 64)
        hidden = cfg.attention_hidden or (512 if c_local >= 256 else 256)
        self.whiten = nn.Linear(c_global, cfg.dim)
        self.attention = Attention(c_local, hidden)
        self.autoencoder = Autoencoder(c_local, self.local_dim)
        self.num_classes = num_classes
        if num_classes:
            self.arcface = ArcFace(cfg.dim, num_classes, cfg.arcface_margin, cfg.arcface_scale, cfg.subcenters,
                                   class_counts if cfg.dynamic_margins else None)
            self.attention_classifier = nn.Linear(c_local, num_classes)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: [B x 3 x H x W] normalised -> (local map [B x C4 x H/16 x W/16], global map [B x C5 x H/32 x W/32])."""
        local_map, global_map = self.backbone(images)
        return local_map, global_map

    @property
    def descriptor_dim(self) -> int:
        """Length of global_descriptor(): C5 off the shelf, D learned, C5 + D for learned+gem."""
        if self.off_the_shelf:
            return self.whiten.in_features
        return self.cfg.dim + (self.whiten.in_features if self.cfg.global_descriptor == "learned+gem" else 0)

    def learned_descriptor(self, global_map: torch.Tensor) -> torch.Tensor:
        """[B x C5 x h x w] -> L2-normalised whiten(GeM) [B x D]: what the ArcFace loss trains."""
        return F.normalize(self.whiten(gem(global_map, self.cfg.gem_p)), dim=-1)

    def global_descriptor(self, global_map: torch.Tensor) -> torch.Tensor:
        """[B x C5 x h x w] -> L2-normalised [B x descriptor_dim] (off the shelf: GeM of the backbone;
        learned+gem: [gem_weight * GeM ; whiten(GeM)], each half normalised, then the whole)."""
        pooled = gem(global_map, self.cfg.gem_p)
        if self.off_the_shelf:
            return F.normalize(pooled, dim=-1)
        learned = F.normalize(self.whiten(pooled), dim=-1)
        if self.cfg.global_descriptor == "learned":
            return learned
        if self.cfg.global_descriptor == "learned+gem":
            return F.normalize(torch.cat([self.cfg.gem_weight * F.normalize(pooled, dim=-1), learned], dim=-1), dim=-1)
        raise ValueError(f"unknown model.global_descriptor {self.cfg.global_descriptor!r}: learned | learned+gem")

    def local_head(self, local_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B x C4 x h x w] -> (attention [B x h x w], L2-normalised descriptors [B x d x h x w]).

        Off the shelf (untrained heads): attention = feature norm, descriptors = the stage itself (DELF's
        pre-attention baseline). Trained with `local_descriptors: backbone`: the learned attention, the
        stage itself as descriptors."""
        if self.off_the_shelf:
            return local_map.norm(dim=1), F.normalize(local_map, dim=1)
        attn = self.attention(local_map).squeeze(1)
        if self.cfg.local_descriptors == "backbone":
            return attn, F.normalize(local_map, dim=1)
        return attn, F.normalize(self.autoencoder.encode(local_map), dim=1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inference in one backbone pass: (global [B x D], attention [B x h x w], local [B x d x h x w])."""
        local_map, global_map = self.features(images)
        attn, desc = self.local_head(local_map)
        return self.global_descriptor(global_map), attn, desc

    def losses(self, images: torch.Tensor, labels: torch.Tensor, teacher: nn.Module | None = None,
               distill_weight: float = 0.0) -> dict[str, torch.Tensor]:
        """Training losses; the local branch sees the backbone through a stop-gradient. With a teacher (a
        frozen pretrained backbone), also distill_weight x the mean (1 - cosine) between its GeM descriptors
        and the student's, plus the same over the local stage's descriptors at every position."""
        local_map, global_map = self.features(images)
        emb = self.learned_descriptor(global_map)
        global_logits = self.arcface(emb, labels)
        block = local_map.detach()  # stop-gradient: local losses do not train the backbone
        attn = self.attention(block)
        code = self.autoencoder.encode(block)
        recon = self.autoencoder.decode(code)
        pooled = (F.normalize(block, dim=1) * attn).mean(dim=(-2, -1))
        attn_logits = self.attention_classifier(pooled)
        out = {"global_ce": F.cross_entropy(global_logits, labels),
               "attention_ce": F.cross_entropy(attn_logits, labels),
               "reconstruction_mse": F.mse_loss(recon, block)}
        out["loss"] = (out["global_ce"] + self.cfg.attention_loss_weight * out["attention_ce"]
                       + self.cfg.reconstruction_loss_weight * out["reconstruction_mse"])
        if teacher is not None:
            with torch.no_grad():
                local_t, global_t = teacher(images)
            g = 1 - F.cosine_similarity(gem(global_map.float(), self.cfg.gem_p), gem(global_t.float(), self.cfg.gem_p),
                                        dim=-1)
            loc = 1 - F.cosine_similarity(local_map.float(), local_t.float(), dim=1)
            out["distill"] = distill_weight * (g.mean() + loc.mean())
            out["loss"] = out["loss"] + out["distill"]
        with torch.no_grad():
            out["accuracy"] = (global_logits.argmax(1) == labels).float().mean()
        return out

    def inference_state(self) -> dict[str, torch.Tensor]:
        """Weights needed to extract features (classifiers dropped: they depend on the training classes)."""
        return {k: v for k, v in self.state_dict().items()
                if not k.startswith(("arcface.", "attention_classifier."))}
